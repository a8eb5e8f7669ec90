"""The HTTP side: receive a webhook, validate it, store it, answer 202; and the app's lifecycle.

A handler never calls a CRM, nor evaluates rules. It answers 202 only after the store has
committed the event; the router and the delivery workers (started and stopped with the app)
do the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from bridge.breaker import CircuitBreaker
from bridge.config import Config, ServerConfig, SignatureConfig, SourceConfig
from bridge.delivery import DeliveryWorker
from bridge.dlq import readable
from bridge.errors import FieldIssue, PayloadError, StoreUnavailable
from bridge.ingress.auth import (
    check_address,
    check_signature,
    check_token,
    client_address,
    is_local,
    presented_token,
    replayed,
)
from bridge.ingress.limits import RateLimits, check_json_shape, overloaded
from bridge.ingress.signatures import SignedMessage
from bridge.logs import REDACTOR, LogLimiter, RedactingAccessLogger, mask_address
from bridge.metrics import CONTENT_TYPE, UNKNOWN, Metrics
from bridge.models import NewEvent, WebhookPayload, idempotency_key
from bridge.openapi import document
from bridge.retry import RetryPolicy
from bridge.router import Router
from bridge.rules import RuleSet
from bridge.store import Store, open_store
from connectors import registry
from connectors.base import Connector, DryRunConnector

log = logging.getLogger("crm_bridge.server")

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
WORKERS = web.AppKey("workers", dict[str, DeliveryWorker])
ROUTER = web.AppKey("router", Router)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
METRICS = web.AppKey("metrics", Metrics)


class Backlog:
    """Waiting work (unrouted events, unfinished deliveries) as last counted by the store,
    plus the events ingested since.

    Counting on every request would cost a query; a refresh each poll interval is enough to
    answer 503 before the queue grows without bound.
    """

    def __init__(self) -> None:
        self.value = 0

    async def refresh_forever(self, store: Store, interval: float) -> None:
        while True:
            self.value = await store.backlog()
            await asyncio.sleep(interval)


BACKLOG = web.AppKey("backlog", Backlog)


class IngestLoad:
    """Webhook requests in flight. During a burst, background work (routing, delivery) yields
    to them, taking at most `share` of the event loop: acknowledgements stay fast and the
    queue drains as soon as the burst ends. It only slows background work, never stops it.
    """

    def __init__(self, share: float = 0.25) -> None:
        self.inflight = 0
        self.share = share

    async def pace(self, spent: float) -> None:
        """Called by a background loop after a step that took `spent` seconds."""
        if self.inflight and spent > 0:
            await asyncio.sleep(min(spent * (1 - self.share) / self.share, 1.0))


LOAD = web.AppKey("load", IngestLoad)
RATE_LIMITS = web.AppKey("rate_limits", RateLimits)
UNKNOWN_SOURCES = web.AppKey("unknown_sources", LogLimiter)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _error(exc: PayloadError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


def _field_issues(exc: ValidationError) -> list[FieldIssue]:
    return [
        FieldIssue(".".join(str(p) for p in err["loc"]) or "(body)", err["msg"])
        for err in exc.errors()
    ]


async def _read_body(request: web.Request, server: ServerConfig) -> bytes:
    if request.content_type != "application/json" and not request.content_type.endswith("+json"):
        raise PayloadError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {request.content_type[:100]!r}",
        )
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadError(413, "payload_too_large", f"body is larger than {limit} bytes")
    try:
        # A slow client holds a slot of max_concurrent_requests: it gets read_timeout, no more.
        async with asyncio.timeout(server.read_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadError(413, "payload_too_large", f"body is larger than {limit} bytes") from None
    except TimeoutError:
        raise PayloadError(
            408, "request_timeout", f"body not received within {server.read_timeout:g} seconds"
        ) from None


def _parse_payload(body: bytes, server: ServerConfig) -> tuple[str, dict[str, Any], WebhookPayload]:
    try:
        text = body.decode()
        data = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    check_json_shape(data, server.max_json_depth, server.max_json_fields)
    if not isinstance(data, dict):
        raise PayloadError(
            422,
            "invalid_payload",
            "body must be a JSON object",
            [FieldIssue("(body)", "must be a JSON object")],
        )
    try:
        payload = WebhookPayload.model_validate(data)
    except ValidationError as exc:
        issues = _field_issues(exc)
        raise PayloadError(
            422, "invalid_payload", "invalid field " + ", ".join(i.field for i in issues), issues
        ) from None
    return text, data, payload


def _check_backlog(backlog: int, limit: int) -> None:
    if backlog >= limit:
        raise PayloadError(
            503,
            "backlog_full",
            f"{backlog} events and deliveries are waiting; try again later",
            retry_after=30,
        )


class _AlreadyStored(Exception):
    """A replayed signed message whose event is stored: answered as a duplicate."""


async def _admit(
    request: web.Request, config: Config, source: str, settings: SourceConfig
) -> tuple[str, dict[str, Any], WebhookPayload, SignedMessage | None]:
    """Every check before the store, cheapest and least revealing first: address, token,
    backlog, body, signature, rate, JSON shape, schema."""
    server = config.server
    # Every X-Forwarded-For line, in order: a proxy may append its own line after the client's.
    forwarded_for = ", ".join(request.headers.getall("X-Forwarded-For", []))
    peer = client_address(request.remote, forwarded_for, server.trusted_proxies)
    check_address(peer, settings.allow_ips)
    given = presented_token(
        settings.token_in, request.match_info.get("token"), request.query, request.headers
    )
    check_token(settings, given, is_local(request.remote, request.headers, server.trusted_proxies))
    _check_backlog(request.app[BACKLOG].value, config.delivery.max_backlog)
    body = await _read_body(request, server)
    signed = None
    if settings.signature is not None:
        signed = check_signature(settings.signature, request.headers, body, request.app[CLOCK]())
    if settings.rate_limit is not None:
        # Counted once the sender is known: a stranger's flood cannot spend a source's budget.
        request.app[RATE_LIMITS].check(source, settings.rate_limit.rate, settings.rate_limit.burst)
    text, data, payload = _parse_payload(body, server)
    return text, data, payload, signed


async def _check_replay(
    app: web.Application,
    source: str,
    signature: SignatureConfig,
    signed: SignedMessage,
    event_id: str,
) -> None:
    """A webhook-id remembered within the replay window is refused, unless its event is stored:
    then it is the sender retrying an answer it lost, and gets its 202 again.

    This only asks; the id is remembered once its event is stored (`_remember`), so a retry of
    a webhook whose event failed to commit is accepted by any instance, before or after a
    restart. The store's one question is insert-if-new: asked as of `now - replay_window` and
    keeping nothing, it answers "seen within the window?" and writes at most an entry that has
    already expired.
    """
    store = app[STORE]
    probe_at = app[CLOCK]() - signature.replay_window
    if await store.seen_message(source, signed.message_id, probe_at, 0.0):
        return
    if await store.event(event_id) is not None:
        raise _AlreadyStored
    raise replayed()


async def _remember(
    app: web.Application, source: str, signature: SignatureConfig, signed: SignedMessage
) -> None:
    """Remember a signed message's id for the replay window, once its event is stored."""
    await app[STORE].seen_message(source, signed.message_id, app[CLOCK](), signature.replay_window)


def _unavailable(
    app: web.Application, source: str, kind: str | None, exc: Exception
) -> web.Response:
    app[METRICS].received(source, kind, "refused:503")
    return _error(PayloadError(503, "store_unavailable", str(exc), retry_after=5))


async def receive_webhook(request: web.Request) -> web.Response:
    load = request.app[LOAD]
    if load.inflight >= request.app[CONFIG].server.max_concurrent_requests:
        request.app[METRICS].received(UNKNOWN, None, "refused:503")
        return _error(overloaded())
    load.inflight += 1
    try:
        return await _receive(request)
    finally:
        load.inflight -= 1


async def _receive(request: web.Request) -> web.Response:
    app = request.app
    config, store = app[CONFIG], app[STORE]
    source = request.match_info["source"]
    # Read once: a reload may replace `config.sources` while this request awaits.
    settings = config.sources.get(source)
    if settings is None:
        app[METRICS].received(UNKNOWN, None, "refused:404")  # any name: not a label value
        refusal = PayloadError(404, "unknown_source", f"no source named {source[:64]!r}")
        _log_unknown_source(request, refusal, source)
        return _error(refusal)
    signature = settings.signature
    try:
        text, data, payload, signed = await _admit(request, config, source, settings)
        event_id = idempotency_key(source, data)
        if signed is not None:
            assert signature is not None  # only a signed source yields a SignedMessage
            await _check_replay(app, source, signature, signed, event_id)
    except PayloadError as exc:
        log.info(
            "webhook refused: %s %s",
            exc.status,
            exc,
            extra={
                "action": "webhook.refused",
                "source": source,
                "status": exc.status,
                "error": exc.code,
            },
        )
        app[METRICS].received(source, None, f"refused:{exc.status}")
        return _error(exc)
    except _AlreadyStored:
        app[METRICS].received(source, payload.type, "duplicate")
        return web.json_response({"event_id": event_id, "duplicate": True}, status=202)
    except StoreUnavailable as exc:
        return _unavailable(app, source, None, exc)

    received_at = app[CLOCK]()
    updated = payload.contact.updatedAt
    event = NewEvent(
        id=event_id,
        source=source,
        type=payload.type,
        email=payload.contact.email,
        received_at=received_at,
        sort_at=updated.timestamp() if updated else received_at,
        body=text,
    )
    try:
        stored = await store.ingest(event)
    except StoreUnavailable as exc:
        return _unavailable(app, source, payload.type, exc)
    if not stored.duplicate:
        app[BACKLOG].value += 1
        app[ROUTER].wake()
    if signed is not None:
        assert signature is not None
        try:
            await _remember(app, source, signature, signed)
        except StoreUnavailable as exc:
            # The event is stored but its id is not remembered: a 503 makes the sender retry,
            # and its retry (a 202 duplicate) remembers it.
            return _unavailable(app, source, payload.type, exc)
    app[METRICS].received(source, payload.type, "duplicate" if stored.duplicate else "stored")
    if stored.duplicate:
        log.debug(
            "event %s was already stored",
            stored.event_id,
            extra={"action": "webhook.duplicate", "event_id": stored.event_id},
        )
    # The one log line per event is the router's, once it knows what the rules made of it.
    return web.json_response(
        {"event_id": stored.event_id, "duplicate": stored.duplicate}, status=202, dumps=_dumps
    )


def _log_unknown_source(request: web.Request, refusal: PayloadError, source: str) -> None:
    """A webhook to a source the config does not name (most likely a wrong URL in the
    platform's form) is logged like every refusal, but 10 lines a minute at most: a scanner
    trying names must not flood the log; each line counts those held back before it."""
    app = request.app
    held_back = app[UNKNOWN_SOURCES].allow(time.monotonic())
    if held_back is None:
        return
    log.info(
        "webhook refused: 404 %s (configured: %s)",
        refusal,
        ", ".join(sorted(app[CONFIG].sources)) or "none",
        extra={
            "action": "webhook.refused",
            "source": source[:64],
            "status": 404,
            "error": refusal.code,
            "remote": request.remote,
            "held_back": held_back,
        },
    )


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every refusal is JSON with a stable `error` code, aiohttp's own (404, 405) included;
    an unexpected failure is a 500 that says nothing about its cause (the log has it)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(
            {"error": _HTTP_CODES.get(exc.status, f"http_{exc.status}"), "message": exc.reason},
            status=exc.status,
            headers=headers,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request failed", extra={"action": "http.error", "path": request.path})
        return web.json_response(
            {"error": "internal_error", "message": "internal error"}, status=500
        )


def runner_options(config: Config) -> dict[str, Any]:
    """How the HTTP server treats connections (the daemon's and the tests' runners)."""
    return {
        # Also the time a new connection gets to send its first request's headers: a client
        # trickling headers (slowloris) is closed after it.
        "keepalive_timeout": config.server.header_timeout,
        "shutdown_timeout": config.server.shutdown_timeout,
        "access_log_class": RedactingAccessLogger,
        "access_log": logging.getLogger("crm_bridge.access") if config.logging.access_log else None,
    }


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _loopback_only(request: web.Request) -> web.Response | None:
    # Events hold people's data; only the machine itself may read them back, not a request a
    # reverse proxy on this host passes on (it comes from loopback too).
    trusted = request.app[CONFIG].server.trusted_proxies
    if not is_local(request.remote, request.headers, trusted):
        return web.json_response({"error": "forbidden", "message": "loopback only"}, status=403)
    return None


def _public(text: str) -> str:
    return mask_address(REDACTOR.text(text))


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store commits, and no connector is paused by its circuit breaker.

    Public: the reasons (a CRM's or the database's own error text) are redacted as a log line
    is, and emails masked whatever `logging.mask_personal_data` says."""
    reasons: dict[str, str] = {}
    try:
        await request.app[STORE].backlog()  # a round trip through the writer's transaction
    except StoreUnavailable as exc:
        reasons["store"] = _public(str(exc))
    for name, worker in request.app[WORKERS].items():
        if worker.breaker.state == "open":
            reasons[name] = _public(f"paused: {worker.breaker.reason}")
    body = {"ready": not reasons, "reasons": reasons}
    return web.json_response(body, status=503 if reasons else 200)


async def show_status(request: web.Request) -> web.Response:
    if refused := _loopback_only(request):
        return refused
    from bridge.status import live_pauses  # what `crm-bridge status` and the metrics show

    workers = request.app[WORKERS]
    connectors: dict[str, Any] = {}
    now = time.time()
    for name, w in workers.items():
        # The breaker's pause and the connector's own (rate limit, daily allocation, ...):
        # a connector holding its calls back shows, even while its breaker stays closed.
        pauses = live_pauses(w.breaker, w.connector, now)
        connectors[name] = {
            "breaker": w.breaker.state,
            "reason": w.breaker.reason,
            "paused_for": max((p["seconds_left"] for p in pauses), default=0.0),
            "pauses": pauses,
        }
    return web.json_response(
        {
            "backlog": await request.app[STORE].backlog(),
            "deliveries": await request.app[STORE].counts(),
            "connectors": connectors,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (no personal data: counts, durations and states by connector)."""
    body = await request.app[METRICS].scrape(request.app[STORE])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def show_event(request: web.Request) -> web.Response:
    if refused := _loopback_only(request):
        return refused
    event = await request.app[STORE].event(request.match_info["event_id"])
    if event is None:
        return web.json_response({"error": "not_found", "message": "no such event"}, status=404)
    # Times as `crm-bridge dlq show` gives them (ISO 8601 UTC, to the millisecond); the body
    # as it was received, byte for byte.
    return web.json_response(readable(event, body_as_json=False, precise=True))


async def openapi(request: web.Request) -> web.Response:
    """The API's OpenAPI document, naming the configured sources."""
    return web.json_response(document(sorted(request.app[CONFIG].sources)))


def build_connector(name: str, config: Config) -> Connector:
    """The configured connector, or a dry-run stand-in when it has no credentials."""
    settings = config.connector_settings[name]
    if not settings.has_credentials():
        log.warning(
            "connector %s has no credentials: dry run, writing nothing",
            name,
            extra={"action": "connector.dry_run", "connector": name},
        )
        return DryRunConnector(name, settings)
    cls = registry.get(settings.type)
    assert cls is not None  # the config loader checked it
    return cls(name, settings)


def build_worker(
    app: web.Application, name: str, connector: Connector, config: Config
) -> DeliveryWorker:
    """The delivery worker of one opened connector (at start, and when a reload rebuilds it)."""
    delivery = config.delivery
    return DeliveryWorker(
        name,
        connector,
        app[STORE],
        RetryPolicy.from_config(delivery),
        concurrency=config.connector_settings[name].max_concurrency,
        lease_seconds=delivery.lease_seconds,
        poll_interval=delivery.poll_interval,
        coalesce=delivery.coalesce_max,
        breaker=CircuitBreaker(
            threshold=delivery.breaker_failures,
            cooldown=delivery.breaker_cooldown,
            cooldown_max=delivery.breaker_cooldown_max,
            auth_cooldown=delivery.auth_pause,
        ),
        clock=app[CLOCK],
        pace=app[LOAD].pace,
        metrics=app[METRICS],
        await_record=delivery.await_record,
        gather=delivery.batch_gather,
    )


async def purge_forever(app: web.Application) -> None:
    """Retention: delete delivered (or skipped) events older than `privacy.retention_days`."""
    while True:
        privacy = app[CONFIG].privacy
        if privacy.retention_days is not None:
            before = app[CLOCK]() - privacy.retention_days * 86400
            try:
                purged = await app[STORE].purge_delivered(before)
            except StoreUnavailable as exc:
                log.warning("retention purge failed: %s", exc, extra={"action": "retention.failed"})
            else:
                if purged:
                    log.info(
                        "retention: deleted %d delivered events",
                        purged,
                        extra={"action": "retention.purged", "events": purged},
                    )
        await asyncio.sleep(privacy.purge_interval)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = app[STORE]
    await store.open()
    connectors = {name: build_connector(name, config) for name in config.connectors}
    workers: dict[str, DeliveryWorker] = {}
    delivery = config.delivery
    refresher = asyncio.create_task(app[BACKLOG].refresh_forever(store, delivery.poll_interval))
    purger = asyncio.create_task(purge_forever(app))
    started = False
    try:
        for name, connector in connectors.items():
            await connector.open()
            workers[name] = build_worker(app, name, connector, config)
        app[WORKERS].update(workers)
        started = True
        for worker in workers.values():
            worker.start()
        app[ROUTER].start()
        yield
    finally:
        refresher.cancel()
        purger.cancel()
        await app[ROUTER].stop()
        if started:  # a reload (bridge.reload) may have replaced some: stop the current ones
            workers = app[WORKERS].copy()
            connectors = {name: w.connector for name, w in workers.items()}
        # All workers wait for their calls in flight at once, within one shutdown timeout.
        await asyncio.gather(*(w.stop(config.server.shutdown_timeout) for w in workers.values()))
        await asyncio.gather(refresher, purger, return_exceptions=True)
        for connector in connectors.values():
            await connector.close()
        await store.close()


def create_app(
    config: Config, store: Store | None = None, clock: Callable[[], float] = time.time
) -> web.Application:
    """The daemon's aiohttp application; workers start and stop with it.

    `clock` (wall-clock seconds) dates events and schedules retries; tests pass a manual one.
    """
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[json_errors])
    app[CONFIG] = config
    app[CLOCK] = clock
    app[BACKLOG] = Backlog()
    app[LOAD] = IngestLoad()
    app[RATE_LIMITS] = RateLimits(clock)
    app[UNKNOWN_SOURCES] = LogLimiter(burst=10, period=60.0)
    app[STORE] = store or open_store(config.store)
    app[WORKERS] = {}

    def running_workers() -> dict[str, DeliveryWorker]:
        return app[WORKERS]  # read at each scrape: a reload may replace workers

    app[METRICS] = Metrics(running_workers, clock)

    def wake_workers(connectors: set[str]) -> None:
        for name in connectors:
            if name in app[WORKERS]:
                app[WORKERS][name].wake()

    app[ROUTER] = Router(
        app[STORE],
        RuleSet(config.rules),
        on_routed=wake_workers,
        poll_interval=config.delivery.poll_interval,
        delay=config.delivery.coalesce_window,
        clock=clock,
    )
    app.router.add_post("/webhooks/{source}", receive_webhook)
    app.router.add_post("/webhooks/{source}/{token}", receive_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/events/{event_id}", show_event)
    app.router.add_get("/status", show_status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.cleanup_ctx.append(_lifecycle)
    return app
