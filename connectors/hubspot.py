"""HubSpot contacts through hubspot-api-client (private-app token).

Create-or-update is one batch upsert keyed by `idProperty=email`: HubSpot decides create versus
update atomically, so there is no search-then-create race and a repeated delivery is harmless.
The SDK's own urllib3 retries are off (`retry=False`): retries are the delivery engine's.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import urllib3
from pydantic import SecretStr

from bridge.errors import DeliveryError, PermanentDelivery, RetryableDelivery
from connectors.base import Connector, ConnectorConfig, DeliveryResult, LeadUpsert

# Without Retry-After, a 429 means the 10-second window is spent: wait for the next one.
RATE_WINDOW_SECONDS = 10.0
AUTH_PAUSE_SECONDS = 300.0


class HubSpotConfig(ConnectorConfig):
    type: Literal["hubspot"] = "hubspot"
    access_token: SecretStr | None = None
    base_url: str = "https://api.hubapi.com"

    def has_credentials(self) -> bool:
        return bool(self.access_token and self.access_token.get_secret_value())


def _property_value(value: Any) -> str:
    # HubSpot properties are strings on the wire; booleans are "true"/"false".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _message(body: Any) -> str:
    try:
        data = json.loads(body) if isinstance(body, (str, bytes)) else body
    except ValueError:
        return str(body)[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data)
    return str(data)[:500]


def classify(exc: Exception) -> DeliveryError | None:
    """Map what the SDK raised to retryable or permanent; None for anything unexpected."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and hasattr(exc, "body"):
        # Every API package has its own ApiException class: recognise them by attributes.
        message = f"HubSpot {status}: {_message(exc.body)}"
        headers = getattr(exc, "headers", None) or {}
        if status == 429:
            retry_after = headers.get("Retry-After")
            wait = float(retry_after) if retry_after else RATE_WINDOW_SECONDS
            return RetryableDelivery(message, retry_after=wait)
        if status >= 500:
            return RetryableDelivery(message)
        if status == 401:
            # A revoked or mistyped token: keep the delivery and wait for a fixed config.
            return RetryableDelivery(message, retry_after=AUTH_PAUSE_SECONDS)
        return PermanentDelivery(message, detail={"status": status, "body": _message(exc.body)})
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, TimeoutError)):
        return RetryableDelivery(f"HubSpot unreachable: {type(exc).__name__}: {exc}")
    return None


class HubSpotConnector(Connector):
    """Contacts in one HubSpot portal. A "lead" is a contact here, as in HubSpot's own CRM."""

    name = "hubspot"
    config_model = HubSpotConfig
    config: HubSpotConfig

    async def open(self) -> None:
        from hubspot import HubSpot

        assert self.config.access_token is not None
        client = HubSpot(
            access_token=self.config.access_token.get_secret_value(),
            host=self.config.base_url.rstrip("/"),
            retry=False,
            ssl_ca_cert=str(self.config.ca_bundle) if self.config.ca_bundle else None,
            connection_pool_maxsize=self.config.max_concurrency,
        )
        # Each attribute access builds a new API object with a new pool: build it once.
        self._batch = client.crm.contacts.batch_api

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        from hubspot.crm.contacts import (
            BatchInputSimplePublicObjectBatchInputUpsert,
            SimplePublicObjectBatchInputUpsert,
        )

        id_property = lead.id_property or "email"
        properties = {k: _property_value(v) for k, v in lead.fields.items()}
        if id_property == "email":
            properties.setdefault("email", lead.id_value)
        body = BatchInputSimplePublicObjectBatchInputUpsert(
            inputs=[
                SimplePublicObjectBatchInputUpsert(
                    id=lead.id_value, id_property=id_property, properties=properties
                )
            ]
        )
        try:
            response = await self.run_blocking(
                self._batch.upsert,
                batch_input_simple_public_object_batch_input_upsert=body,
                _request_timeout=self.config.timeout,
            )
        except Exception as exc:
            mapped = classify(exc)
            if mapped is None:
                raise
            raise mapped from exc
        errors = getattr(response, "errors", None)
        if errors:
            raise PermanentDelivery(
                f"HubSpot refused the record: {errors[0].message}",
                detail={"errors": [e.to_dict() for e in errors]},
            )
        record = response.results[0]
        return DeliveryResult(record_id=record.id, created=getattr(record, "new", None))
