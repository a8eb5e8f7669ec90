"""Every error the bridge raises on purpose, classified once by what the caller must do.

BridgeError
├── ConfigError            startup only; non-zero exit, every problem as file:line:key
├── PayloadError           HTTP 4xx, JSON body names the field; nothing stored
├── RuleError              a stored event a rule cannot map: dead-letter, no retry
├── StoreUnavailable       the store cannot commit: nothing acknowledged, HTTP 503
└── DeliveryError          raised by connectors only
    ├── RetryableDelivery  network, timeout, 429, 5xx, expired session (.retry_after)
    │   └── ConnectorUnusable  nothing will pass until a person acts: the connector pauses
    │       ├── AuthenticationFailed  the CRM refused the credentials
    │       └── Misconfigured         a metadata endpoint the set-up needs is missing (404)
    ├── PermanentDelivery  400, 403, 404, validation, ambiguous match (.detail)
    └── LeaseExpired       nothing sent: the claim's lease ran out before the call's turn
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class BridgeError(Exception):
    """crm-bridge failed."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the default message.
        super().__init__(message or (self.__doc__ or "").strip())


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.key}: {self.message}"


class ConfigError(BridgeError):
    """The configuration is invalid."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class FieldIssue:
    """One reason a webhook body was refused, with the dotted path of the field."""

    field: str
    message: str


class PayloadError(BridgeError):
    """The webhook request was refused; nothing was stored."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        issues: list[FieldIssue] | None = None,
        *,
        retry_after: int | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.issues = issues or []
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)
        super().__init__(message)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": str(self)}
        if self.issues:
            body["fields"] = [{"field": i.field, "message": i.message} for i in self.issues]
        return body


class RuleError(BridgeError):
    """A rule could not map this event."""


class StoreUnavailable(BridgeError):
    """The store could not commit; nothing was acknowledged."""


class DeliveryError(BridgeError):
    """A connector could not deliver."""


class RetryableDelivery(DeliveryError):
    """The CRM failed in a way that may pass: try again later, never sooner than retry_after."""

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ConnectorUnusable(RetryableDelivery):
    """Nothing this connector sends can pass until a person fixes its set-up: the delivery
    engine pauses the whole connector (one log line, shown in status) instead of failing
    every delivery, and keeps the deliveries queued."""


class AuthenticationFailed(ConnectorUnusable):
    """The CRM refused the connector's credentials; nothing will pass until they are fixed."""


class Misconfigured(ConnectorUnusable):
    """The CRM answered a metadata call the connector needs (HubSpot's properties API, a
    Salesforce describe) with 404 or a missing scope: a configuration problem, not a record's."""


class PermanentDelivery(DeliveryError):
    """The CRM refused this record; repeating the same request cannot succeed."""

    def __init__(self, message: str | None = None, *, detail: Any = None) -> None:
        self.detail = detail
        super().__init__(message)


class LeaseExpired(DeliveryError):
    """Nothing was sent: the claim's lease ran out before the call's turn came (the rate limit
    held it), so another instance may have claimed the delivery. Not an outcome to record: the
    delivery is left in flight for whoever claims it next."""
