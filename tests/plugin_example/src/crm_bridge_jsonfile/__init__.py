"""An example third-party connector: records upserted into one JSON file, keyed by id.

A stand-in for a CRM with a blocking client: the file is read and replaced through
`run_blocking`, so the event loop never waits on the disk. Writes are upserts keyed by the
record's natural id, so a delivery repeated (delivery is at-least-once) changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from bridge.errors import PermanentDelivery, RetryableDelivery
from connectors.base import Connector, ConnectorConfig, DeliveryResult, LeadUpsert


class JsonFileConfig(ConnectorConfig):
    """`type: jsonfile` and the file to write; without `path` the connector runs dry."""

    type: Literal["jsonfile"] = "jsonfile"
    path: Path | None = None
    max_fields: int = Field(default=50, ge=1)

    def has_credentials(self) -> bool:
        return self.path is not None


class JsonFileConnector(Connector):
    name = "jsonfile"
    config_model = JsonFileConfig
    config: JsonFileConfig

    def __init__(self, instance: str, config: ConnectorConfig) -> None:
        assert isinstance(config, JsonFileConfig)
        super().__init__(instance, config)
        self._lock = asyncio.Lock()  # one writer of the file at a time

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        if len(lead.fields) > self.config.max_fields:
            # Repeating the same record cannot help: permanent, with the reason.
            raise PermanentDelivery(f"{len(lead.fields)} fields, at most {self.config.max_fields}")
        key = f"{lead.object}:{lead.id_property or 'email'}:{lead.id_value.lower()}"
        async with self._lock:
            try:
                created = await self.run_blocking(self._write, key, lead.fields)
            except OSError as exc:  # a full or unmounted disk may come back
                raise RetryableDelivery(f"cannot write {self.config.path}: {exc}") from exc
        return DeliveryResult(record_id=key, created=created)

    def _write(self, key: str, fields: dict[str, Any]) -> bool:
        assert self.config.path is not None
        path = self.config.path
        records = json.loads(path.read_text()) if path.exists() else {}
        created = key not in records
        records[key] = {**records.get(key, {}), **fields}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return created
