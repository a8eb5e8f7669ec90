"""The store interface the server and the delivery workers rely on.

An event and the deliveries its rules produced are written in one transaction: once `ingest`
returns, both are durable, and only then does the webhook get its 202. Deliveries are claimed
under a lease, oldest first, and never while an earlier delivery for the same contact on the
same connector is unfinished, so each CRM sees a contact's changes in the order they came.
"""

from __future__ import annotations

import abc
import re
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from bridge.models import Delivery, IngestResult, NewDelivery, NewEvent

if TYPE_CHECKING:
    from bridge.config import SqliteStoreConfig


class Store(abc.ABC):
    """Events and deliveries, durably."""

    async def open(self) -> None:
        """Create the schema if needed and get ready to serve."""

    async def close(self) -> None:
        """Flush and release everything."""

    @abc.abstractmethod
    async def ingest(self, event: NewEvent, deliveries: list[NewDelivery]) -> IngestResult:
        """Store an event with its deliveries, or report the stored twin of a resent one."""

    @abc.abstractmethod
    async def claim(
        self, connector: str, limit: int, now: float, lease_seconds: float
    ) -> list[Delivery]:
        """Take up to `limit` due deliveries of one connector, marking them in flight."""

    @abc.abstractmethod
    async def complete(
        self, delivery_id: int, status: str, result: dict[str, Any], now: float
    ) -> None:
        """Record that the CRM confirmed the delivery (or, dry, what it would have written)."""

    @abc.abstractmethod
    async def retry_later(
        self, delivery_id: int, next_attempt_at: float, error: str, now: float
    ) -> None:
        """Put an attempted delivery back in the queue, due at `next_attempt_at`."""

    @abc.abstractmethod
    async def dead_letter(self, delivery_id: int, error: str, now: float) -> None:
        """Give up on a delivery, keeping the CRM's error."""

    @abc.abstractmethod
    async def event(self, event_id: str) -> dict[str, Any] | None:
        """One stored event with its deliveries, for operators."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries by connector and status."""


@cache
def queries(dialect: str) -> dict[str, str]:
    """Named SQL blocks (`-- name: x`) of bridge/store/sql/<dialect>.sql, read once."""
    text = resources.files("bridge.store").joinpath("sql", f"{dialect}.sql").read_text()
    blocks = re.split(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(blocks[1::2], blocks[2::2], strict=True)}


def open_store(config: SqliteStoreConfig) -> Store:
    """The store the config names."""
    from bridge.store.sqlite import SqliteStore

    return SqliteStore(config.path)
