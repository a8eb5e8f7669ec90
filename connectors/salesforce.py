"""Salesforce Leads and Contacts through simple-salesforce.

The connector logs in itself (SOAP username + password + security token, at a configurable
login URL: production, `test` for sandboxes, My Domain, or an emulator) and builds the client
from the session it got, because the SDK's own re-login on expiry never stops on object-level
calls (simple-salesforce #804). On `INVALID_SESSION_ID` it logs in again once, under a lock so
concurrent calls share one login, and repeats the call once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import requests
from pydantic import SecretStr, model_validator

from bridge.errors import DeliveryError, PermanentDelivery, RetryableDelivery
from connectors.base import Connector, ConnectorConfig, DeliveryResult, LeadUpsert

T = TypeVar("T")
log = logging.getLogger("crm_bridge.connectors.salesforce")
AUTH_PAUSE_SECONDS = 300.0
DAILY_LIMIT_PAUSE_SECONDS = 3600.0


class SalesforceConfig(ConnectorConfig):
    type: Literal["salesforce"] = "salesforce"
    username: str | None = None
    password: SecretStr | None = None
    security_token: SecretStr | None = None  # empty for trusted-IP users
    # https://login.salesforce.com, https://test.salesforce.com (sandbox) or your My Domain.
    login_url: str = "https://login.salesforce.com"
    # Or an existing session: it cannot be renewed when it expires.
    session_id: SecretStr | None = None
    instance_url: str | None = None
    api_version: str = "59.0"

    @model_validator(mode="after")
    def _session_needs_instance(self) -> SalesforceConfig:
        if self.session_id and self.session_id.get_secret_value() and not self.instance_url:
            raise ValueError("session_id needs instance_url")
        return self

    def has_credentials(self) -> bool:
        session = bool(self.session_id and self.session_id.get_secret_value())
        password = bool(self.username and self.password and self.password.get_secret_value())
        return session or password


class _Session(requests.Session):
    """A requests session with a default timeout, no redirects, and only the configured CA."""

    def __init__(self, timeout: float, verify: str | bool) -> None:
        super().__init__()
        self.timeout = timeout
        self.verify = verify
        # REQUESTS_CA_BUNDLE in the environment would silently override `verify`.
        self.trust_env = False

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        return super().request(method, url, *args, **kwargs)


def _first_error(content: Any) -> tuple[str, str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", "")), str(content[0].get("message", ""))
    if isinstance(content, bytes):
        content = content.decode(errors="replace")
    return "", str(content)[:500]


def classify(exc: Exception) -> DeliveryError | None:
    """Map what simple-salesforce raised to retryable or permanent; None for the unexpected."""
    from simple_salesforce.exceptions import (
        SalesforceAuthenticationFailed,
        SalesforceError,
        SalesforceExpiredSession,
    )

    if isinstance(exc, SalesforceAuthenticationFailed):
        return RetryableDelivery(
            f"Salesforce login failed: {_first_error(exc.content)[1]}",
            retry_after=AUTH_PAUSE_SECONDS,
        )
    if isinstance(exc, SalesforceExpiredSession):
        return RetryableDelivery("Salesforce session expired", retry_after=AUTH_PAUSE_SECONDS)
    if isinstance(exc, SalesforceError):
        code, message = _first_error(exc.content)
        text = f"Salesforce {exc.status} {code}: {message}".replace("  ", " ")
        if code == "UNABLE_TO_LOCK_ROW" or exc.status == 429 or exc.status >= 500:
            return RetryableDelivery(text)
        if code == "REQUEST_LIMIT_EXCEEDED":
            # Too many long requests passes quickly; the daily allocation takes hours.
            long_txn = "ConcurrentPerOrgLongTxn" in message
            return RetryableDelivery(
                text, retry_after=None if long_txn else DAILY_LIMIT_PAUSE_SECONDS
            )
        return PermanentDelivery(text, detail={"status": exc.status, "errors": exc.content})
    if isinstance(exc, (requests.RequestException, OSError, TimeoutError)):
        return RetryableDelivery(f"Salesforce unreachable: {type(exc).__name__}")
    return None


def _required_for_create(obj: str, fields: dict[str, Any], email: str) -> dict[str, Any]:
    """A Lead needs LastName and Company, a Contact LastName: fill them from the email."""
    local, _, domain = email.partition("@")
    out = dict(fields)
    if not out.get("LastName"):
        out["LastName"] = local or "Unknown"
    if obj == "Lead" and not out.get("Company"):
        out["Company"] = domain or "Unknown"
    return out


class SalesforceConnector(Connector):
    """Leads and Contacts in one Salesforce org."""

    name = "salesforce"
    config_model = SalesforceConfig
    config: SalesforceConfig

    async def open(self) -> None:
        verify: str | bool = str(self.config.ca_bundle) if self.config.ca_bundle else True
        self._session = _Session(self.config.timeout, verify)
        self._login_lock = threading.Lock()
        self._sf: Any = None
        try:
            await self.run_blocking(self._login, None)
        except Exception as exc:
            # Not fatal: deliveries wait and retry, and the first one logs in again.
            mapped = classify(exc)
            if mapped is None:
                raise
            log.warning(
                "salesforce %s: login failed: %s",
                self.instance,
                mapped,
                extra={"action": "connector.login_failed", "connector": self.instance},
            )

    async def close(self) -> None:
        self._session.close()
        await super().close()

    def _login(self, stale: Any) -> Any:
        """Log in unless another thread already replaced the `stale` client."""
        from simple_salesforce.api import Salesforce
        from simple_salesforce.login import SalesforceLogin

        with self._login_lock:
            if self._sf is not None and self._sf is not stale:
                return self._sf
            cfg = self.config
            if cfg.session_id and cfg.session_id.get_secret_value():
                if stale is not None:
                    from simple_salesforce.exceptions import SalesforceExpiredSession

                    raise SalesforceExpiredSession(cfg.instance_url or "", 401, "session", b"")
                session_id = cfg.session_id.get_secret_value()
                instance = urlsplit(cfg.instance_url or "").netloc
            else:
                session_id, instance = SalesforceLogin(
                    username=cfg.username,
                    password=cfg.password.get_secret_value() if cfg.password else "",
                    security_token=cfg.security_token.get_secret_value()
                    if cfg.security_token
                    else "",
                    scratch_url=cfg.login_url.rstrip("/"),
                    sf_version=cfg.api_version,
                    session=self._session,
                )
            self._sf = Salesforce(
                session_id=session_id,
                instance=instance,
                session=self._session,
                version=cfg.api_version,
            )
            return self._sf

    def _with_session(self, call: Callable[[Any], T]) -> T:
        from simple_salesforce.exceptions import SalesforceExpiredSession

        sf = self._sf or self._login(None)
        try:
            return call(sf)
        except SalesforceExpiredSession:
            return call(self._login(sf))

    def _upsert(self, lead: LeadUpsert) -> DeliveryResult:
        from simple_salesforce.format import format_external_id, format_soql

        obj = "Lead" if lead.object == "lead" else "Contact"
        id_property = lead.id_property or "Email"
        fields = dict(lead.fields)
        if id_property.lower() != "email":
            # An external id the admin named: Salesforce decides create versus update.
            def upsert(sf: Any) -> DeliveryResult:
                path = format_external_id(id_property, lead.id_value)
                response = getattr(sf, obj).upsert(path, fields, raw_response=True)
                body = response.json() if response.content else {}
                return DeliveryResult(record_id=body.get("id"), created=response.status_code == 201)

            return self._with_session(upsert)

        # Email is not unique in Salesforce: update the oldest record with it, or create one.
        fields.setdefault("Email", lead.id_value)
        soql = format_soql(
            "SELECT Id FROM {:literal} WHERE Email = {} ORDER BY CreatedDate ASC LIMIT 1",
            obj,
            lead.id_value,
        )

        def find_then_write(sf: Any) -> DeliveryResult:
            records = sf.query(soql)["records"]
            if records:
                record_id = records[0]["Id"]
                getattr(sf, obj).update(record_id, fields)
                return DeliveryResult(record_id=record_id, created=False)
            created = getattr(sf, obj).create(_required_for_create(obj, fields, lead.id_value))
            return DeliveryResult(record_id=created["id"], created=True)

        return self._with_session(find_then_write)

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        try:
            return await self.run_blocking(self._upsert, lead)
        except Exception as exc:
            mapped = classify(exc)
            if mapped is None:
                raise
            raise mapped from exc
