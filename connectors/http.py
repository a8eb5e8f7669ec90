"""A generic HTTP/JSON connector: for a CRM without a built-in connector, or an internal service.

Each upsert is one request whose URL, headers and JSON body are Jinja2 templates, rendered in
the rule engine's immutable sandbox (bridge.rules.ENV) with the record in their context:

    record       {"object", "id_property", "id_value", "fields", "record_id"}
    fields, id_property, id_value, object, record_id    the same, at the top level
    records      the batch, a list of `record`s (batch_body only)
    activity     the activity's fields (activity_body only), with its `key` to dedupe on

With `batch_body` and `max_batch` > 1, up to `max_batch` records go out in one request. The
answer maps back to records by one of two simple rules (`batch_results`): "array", a JSON
array with one item per record in request order (an item with a non-null `error`, or a
`status` >= 400, is that record's failure); or "all", the status decides for every record.

Errors are classified once, here: 429 (its Retry-After honoured, and the limiter paused), 5xx,
timeouts and network failures are retryable; 401 and 403 are AuthenticationFailed; any other
status outside `success_status` (3xx included: redirects are never followed) is permanent, with
the service's own message. TLS is always verified, against `ca_bundle` when set.

The service must treat a request as an upsert keyed by `id_value` (and an activity as keyed by
`activity.key`): delivery is at-least-once, so the same request may come twice.
"""

from __future__ import annotations

import json
import ssl
import time
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
import jinja2
from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.errors import AuthenticationFailed, DeliveryError, PermanentDelivery, RetryableDelivery
from bridge.ratelimit import RateLimiter
from bridge.rules import ENV
from connectors.base import (
    Activity,
    Connector,
    ConnectorConfig,
    DeliveryResult,
    LeadUpsert,
    Outcome,
    Outcomes,
    per_record,
)
from connectors.outbound import OutboundRefused, template_guard

# The most records one request may carry; the delivery engine hands out at most this many.
MAX_BATCH = 100
# A 429 without a Retry-After: wait this long (or one rate-limit window when that is longer).
DEFAULT_RETRY_AFTER = 10.0
# Long enough for a message, short enough for a log line and the store.
MESSAGE_MAX = 500


def _compiles(source: str) -> str:
    try:
        ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"template syntax error: {exc.message} (line {exc.lineno})") from exc
    return source


class HttpConfig(ConnectorConfig):
    type: Literal["http"] = "http"
    # Where records go (a template: `https://crm.internal/leads/{{ id_value | urlencode }}`).
    url: str = ""
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    # Header templates; secrets go in `secret_headers`, sent as they are and never logged.
    headers: dict[str, str] = Field(default_factory=dict)
    secret_headers: dict[str, SecretStr] = Field(default_factory=dict)
    # A template rendering the JSON body of one record's request.
    body: str = "{{ record | tojson }}"
    # A template rendering the JSON body of a batch (`records`); needed for max_batch > 1.
    batch_body: str | None = None
    max_batch: int = Field(default=1, ge=1, le=MAX_BATCH)
    batch_results: Literal["array", "all"] = "array"
    # Activities (log_activity): off unless `activity_body` is set; the url defaults to `url`.
    activity_url: str | None = None
    activity_body: str | None = None
    # The answer's statuses that mean "written"; everything else is classified as an error.
    success_status: list[int] = Field(default_factory=lambda: [200, 201, 202, 204], min_length=1)
    # Members of a JSON answer (or of a batch item) that carry the record's id and "created".
    id_key: str = "id"
    created_key: str = "created"
    # A client-side limit: at most `rate_limit_requests` requests per `rate_limit_seconds`.
    rate_limit_requests: int | None = Field(default=None, ge=1)
    rate_limit_seconds: float = Field(default=1.0, gt=0)

    @field_validator("url", "body", "batch_body", "activity_url", "activity_body")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        return None if value is None else _compiles(value)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            _compiles(template)
        return value

    @field_validator("success_status")
    @classmethod
    def _check_success(cls, value: list[int]) -> list[int]:
        if any(not 200 <= s < 300 for s in value):
            raise ValueError("success statuses must be 2xx")
        return value

    @model_validator(mode="after")
    def _batch_needs_body(self) -> HttpConfig:
        if self.max_batch > 1 and self.batch_body is None:
            raise ValueError("max_batch > 1 needs a batch_body template")
        if self.url and not self.url.startswith(("http://", "https://", "{{")):
            raise ValueError("url must start with http:// or https://")
        return self

    def has_credentials(self) -> bool:
        # Nothing to log in with necessarily (an internal service): a URL makes it live.
        return bool(self.url)


def _honourable(lead: LeadUpsert) -> None:
    """A generic endpoint cannot be read before writing: refuse what would need it."""
    if lead.guarded() or not lead.create:
        raise PermanentDelivery(
            "the http connector cannot honour write policies (if_empty, on_create, monotonic) "
            "or update-only writes: it cannot read the record first"
        )


def _record(lead: LeadUpsert) -> dict[str, Any]:
    return {
        "object": lead.object,
        "id_property": lead.id_property,
        "id_value": lead.id_value,
        "fields": lead.fields,
        "record_id": lead.record_id,
    }


def _parse(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


def _message(data: Any, text: str) -> str:
    """The service's own message: `message`, `error` (or its `message`), `detail`, or the text."""
    if isinstance(data, dict):
        for key in ("message", "error", "detail", "title"):
            value = data.get(key)
            if isinstance(value, dict) and value.get("message"):
                value = value["message"]
            if value:
                return str(value)[:MESSAGE_MAX]
    return (text.strip() or "(empty body)")[:MESSAGE_MAX]


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header, in seconds or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify(status: int, text: str, retry_after: float | None = None) -> DeliveryError:
    """The error for a status outside the success list (429, 5xx, 401/403, other)."""
    data = _parse(text)
    message = f"HTTP {status}: {_message(data, text)}"
    if status == 429:
        return RetryableDelivery(message, retry_after=retry_after or DEFAULT_RETRY_AFTER)
    if status >= 500:
        return RetryableDelivery(message, retry_after=retry_after)
    if status in (401, 403):
        return AuthenticationFailed(message)
    return PermanentDelivery(
        message, detail={"status": status, "body": data if data is not None else text[:500]}
    )


class HttpConnector(Connector):
    """Records as templated JSON requests to one HTTP endpoint."""

    name = "http"
    config_model = HttpConfig
    # The engine hands out up to this many; they go out in requests of `config.max_batch`.
    max_batch = MAX_BATCH
    config: HttpConfig

    def __init__(self, instance: str, config: ConnectorConfig) -> None:
        assert isinstance(config, HttpConfig)
        super().__init__(instance, config)
        self._session: aiohttp.ClientSession | None = None
        if config.rate_limit_requests is not None:
            self.limiter = RateLimiter(config.rate_limit_requests, config.rate_limit_seconds)
        self._url = ENV.from_string(config.url)
        self._headers = {k: ENV.from_string(v) for k, v in config.headers.items()}
        self._body = ENV.from_string(config.body)
        self._batch_body = ENV.from_string(config.batch_body) if config.batch_body else None
        self._activity_url = ENV.from_string(config.activity_url or config.url)
        # Rendered URLs stay on the hosts the templates name (connectors/outbound.py).
        self._guard = template_guard([config.url, config.activity_url])
        self._activity_body = (
            ENV.from_string(config.activity_body) if config.activity_body else None
        )

    async def open(self) -> None:
        self._client()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await super().close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Verified TLS always: against the system's CAs, or the configured bundle.
            context = ssl.create_default_context(
                cafile=str(self.config.ca_bundle) if self.config.ca_bundle else None
            )
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=self.config.max_concurrency),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                trust_env=False,
            )
        return self._session

    # -- upserts ------------------------------------------------------------------------------
    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        _honourable(lead)
        record = _record(lead)
        data = await self._request(self._url, self._body, {**record, "record": record})
        return self._result(data)

    async def upsert_leads(self, leads: list[LeadUpsert]) -> list[Outcome]:
        """Requests of up to `config.max_batch` records; one outcome per record, in order."""
        if self._batch_body is None:
            return await super().upsert_leads(leads)
        size = self.config.max_batch

        async def send(outcomes: Outcomes) -> None:
            for start in range(0, len(leads), size):
                await self._send_batch(leads[start : start + size], start, outcomes)

        refused: dict[int, Outcome] = {}
        for position, lead in enumerate(leads):
            try:
                _honourable(lead)
            except PermanentDelivery as exc:
                refused[position] = exc
        if not refused:
            return await per_record(len(leads), f"{self.instance} (http)", send)
        sent = iter(await self.upsert_leads([x for i, x in enumerate(leads) if i not in refused]))
        return [refused[i] if i in refused else next(sent) for i in range(len(leads))]

    async def _send_batch(self, leads: list[LeadUpsert], start: int, outcomes: Outcomes) -> None:
        assert self._batch_body is not None
        records = [_record(lead) for lead in leads]
        data = await self._request(self._url, self._batch_body, {"records": records})
        if self.config.batch_results == "all":
            for i in range(len(leads)):
                outcomes[start + i] = DeliveryResult(created=None)
            return
        if not isinstance(data, list) or len(data) != len(leads):
            # Written or not, we cannot tell which: an upsert repeated is harmless.
            raise RetryableDelivery(
                f"{self.instance}: the batch answer is not an array of {len(leads)} results"
            )
        for i, item in enumerate(data):
            outcomes[start + i] = self._item_outcome(item)

    def _item_outcome(self, item: Any) -> Outcome:
        if isinstance(item, dict):
            status = item.get("status")
            failed = item.get("error") is not None or (isinstance(status, int) and status >= 400)
            if failed:
                code = status if isinstance(status, int) and status >= 400 else 400
                return classify(code, json.dumps(item))
        return self._result(item)

    def _result(self, data: Any) -> DeliveryResult:
        if not isinstance(data, dict):
            return DeliveryResult()
        record_id = data.get(self.config.id_key)
        created = data.get(self.config.created_key)
        return DeliveryResult(
            record_id=None if record_id is None else str(record_id),
            created=created if isinstance(created, bool) else None,
        )

    # -- activities ---------------------------------------------------------------------------
    async def log_activity(self, activity: Activity) -> DeliveryResult:
        """One request rendered from `activity_body`; the service dedupes on `activity.key`."""
        if self._activity_body is None:
            return await super().log_activity(activity)
        context = {
            "activity": activity.model_dump(),
            "id_property": activity.id_property,
            "id_value": activity.id_value,
            "object": activity.object,
            "record_id": activity.record_id,
        }
        data = await self._request(self._activity_url, self._activity_body, context)
        return self._result(data)

    # -- one request --------------------------------------------------------------------------
    def _render(
        self, url: jinja2.Template, body: jinja2.Template, context: dict[str, Any]
    ) -> tuple[str, dict[str, str], Any]:
        """URL, headers and parsed body; a template that fails for this record is permanent."""
        try:
            target = url.render(context).strip()
            headers = {k: t.render(context) for k, t in self._headers.items()}
            text = body.render(context)
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise PermanentDelivery(f"{self.instance}: a template failed: {exc}") from exc
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise PermanentDelivery(
                f"{self.instance}: the body template did not render JSON: {exc}",
                detail={"rendered": text[:MESSAGE_MAX]},
            ) from exc
        if not target.startswith(("http://", "https://")):
            raise PermanentDelivery(f"{self.instance}: the url rendered as {target!r}")
        if any("\n" in v or "\r" in v for v in headers.values()):
            raise PermanentDelivery(f"{self.instance}: a header rendered with a line break")
        headers.update({k: v.get_secret_value() for k, v in self.config.secret_headers.items()})
        return target, headers, payload

    async def _request(
        self, url: jinja2.Template, body: jinja2.Template, context: dict[str, Any]
    ) -> Any:
        """Send one request under the limiter; the parsed JSON answer, or a classified error."""
        target, headers, payload = self._render(url, body, context)
        if self._guard is not None:
            try:
                self._guard.check(target)
            except OutboundRefused as exc:
                raise PermanentDelivery(f"{self.instance}: {exc}") from exc
        if self.limiter is not None:
            await self.limiter.acquire()
        try:
            async with self._client().request(
                self.config.method,
                target,
                json=payload,
                headers=headers,
                allow_redirects=False,
            ) as response:
                status = response.status
                text = await response.text(errors="replace")
                wait = retry_after_seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RetryableDelivery(
                f"{self.instance} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if status in self.config.success_status:
            return _parse(text)
        if 300 <= status < 400:
            location = response.headers.get("Location", "?")
            raise PermanentDelivery(
                f"HTTP {status}: redirect to {location} not followed (set the final url)",
                detail={"status": status, "location": location},
            )
        if status == 429:
            wait = wait if wait is not None else max(DEFAULT_RETRY_AFTER, self._window())
            if self.limiter is not None:
                self.limiter.pause(wait)
        raise classify(status, text, wait)

    def _window(self) -> float:
        return self.config.rate_limit_seconds if self.limiter is not None else 0.0
