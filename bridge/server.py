"""The HTTP side: receive a webhook, validate it, store it, answer 202; and the app's lifecycle.

A handler never calls a CRM, nor evaluates rules. It answers 202 only after the store has
committed the event; the router and the delivery workers (started and stopped with the app)
do the rest.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from bridge.breaker import CircuitBreaker
from bridge.config import Config
from bridge.delivery import DeliveryWorker
from bridge.errors import FieldIssue, PayloadError, StoreUnavailable
from bridge.metrics import CONTENT_TYPE, UNKNOWN, Metrics
from bridge.models import NewEvent, WebhookPayload, idempotency_key
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


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _error(exc: PayloadError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


def _token(request: web.Request) -> str | None:
    """The shared secret, from the path, `?token=`, `X-Webhook-Token` or a bearer header."""
    token = request.match_info.get("token") or request.query.get("token")
    if token:
        return token
    if "X-Webhook-Token" in request.headers:
        return request.headers["X-Webhook-Token"]
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value if scheme.lower() == "bearer" and value else None


def _authenticate(request: web.Request, config: Config, source: str) -> None:
    tokens = [t.get_secret_value() for t in config.sources[source].tokens if t.get_secret_value()]
    if not tokens:
        return  # no token configured: the config loader allows this on loopback only
    given = (_token(request) or "").encode()
    # Compare against every active token, always, so timing tells nothing about which matched.
    if not any([hmac.compare_digest(given, t.encode()) for t in tokens]):
        raise PayloadError(401, "unauthorized", "missing or wrong webhook token")


def _field_issues(exc: ValidationError) -> list[FieldIssue]:
    return [
        FieldIssue(".".join(str(p) for p in err["loc"]) or "(body)", err["msg"])
        for err in exc.errors()
    ]


async def _read_payload(
    request: web.Request, limit: int
) -> tuple[str, dict[str, Any], WebhookPayload]:
    if request.content_type != "application/json" and not request.content_type.endswith("+json"):
        raise PayloadError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {request.content_type!r}",
        )
    if request.content_length is not None and request.content_length > limit:
        raise PayloadError(413, "payload_too_large", f"body is larger than {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadError(413, "payload_too_large", f"body is larger than {limit} bytes") from None
    try:
        text = body.decode()
        data = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
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
            503, "backlog_full", f"{backlog} events and deliveries are waiting; try again later"
        )


async def receive_webhook(request: web.Request) -> web.Response:
    load = request.app[LOAD]
    load.inflight += 1
    try:
        return await _receive(request)
    finally:
        load.inflight -= 1


async def _receive(request: web.Request) -> web.Response:
    app = request.app
    config, store = app[CONFIG], app[STORE]
    source = request.match_info["source"]
    if source not in config.sources:
        app[METRICS].received(UNKNOWN, None, "refused:404")  # any name: not a label value
        return _error(PayloadError(404, "unknown_source", f"no source named {source!r}"))
    try:
        _authenticate(request, config, source)
        _check_backlog(app[BACKLOG].value, config.delivery.max_backlog)
        text, data, payload = await _read_payload(request, config.server.max_body_bytes)
    except PayloadError as exc:
        log.info(
            "webhook refused: %s %s",
            exc.status,
            exc,
            extra={"action": "webhook.refused", "source": source, "status": exc.status},
        )
        app[METRICS].received(source, None, f"refused:{exc.status}")
        return _error(exc, {"Retry-After": "30"} if exc.status == 503 else None)

    received_at = app[CLOCK]()
    updated = payload.contact.updatedAt
    event = NewEvent(
        id=idempotency_key(source, data),
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
        app[METRICS].received(source, payload.type, "refused:503")
        return _error(PayloadError(503, "store_unavailable", str(exc)), {"Retry-After": "5"})
    app[METRICS].received(source, payload.type, "duplicate" if stored.duplicate else "stored")
    if not stored.duplicate:
        app[BACKLOG].value += 1
        app[ROUTER].wake()
    else:
        log.debug(
            "event %s was already stored",
            stored.event_id,
            extra={"action": "webhook.duplicate", "event_id": stored.event_id},
        )
    # The one log line per event is the router's, once it knows what the rules made of it.
    return web.json_response(
        {"event_id": stored.event_id, "duplicate": stored.duplicate}, status=202, dumps=_dumps
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _loopback_only(request: web.Request) -> web.Response | None:
    # Events hold people's data; only the machine itself may read them back.
    if not request.remote or not ipaddress.ip_address(request.remote).is_loopback:
        return web.json_response({"error": "forbidden", "message": "loopback only"}, status=403)
    return None


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store commits, and no connector is paused by its circuit breaker."""
    reasons: dict[str, str] = {}
    try:
        await request.app[STORE].backlog()  # a round trip through the writer's transaction
    except StoreUnavailable as exc:
        reasons["store"] = str(exc)
    for name, worker in request.app[WORKERS].items():
        if worker.breaker.state == "open":
            reasons[name] = f"paused: {worker.breaker.reason}"
    body = {"ready": not reasons, "reasons": reasons}
    return web.json_response(body, status=503 if reasons else 200)


async def show_status(request: web.Request) -> web.Response:
    if refused := _loopback_only(request):
        return refused
    workers = request.app[WORKERS]
    return web.json_response(
        {
            "backlog": await request.app[STORE].backlog(),
            "deliveries": await request.app[STORE].counts(),
            "connectors": {
                name: {
                    "breaker": w.breaker.state,
                    "reason": w.breaker.reason,
                    "paused_for": round(w.breaker.wait_seconds(), 1),
                }
                for name, w in workers.items()
            },
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
    return web.json_response(event)


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
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = app[STORE]
    await store.open()
    connectors = {name: build_connector(name, config) for name in config.connectors}
    workers: dict[str, DeliveryWorker] = {}
    delivery = config.delivery
    refresher = asyncio.create_task(app[BACKLOG].refresh_forever(store, delivery.poll_interval))
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
        await app[ROUTER].stop()
        if started:  # a reload (bridge.reload) may have replaced some: stop the current ones
            workers = app[WORKERS].copy()
            connectors = {name: w.connector for name, w in workers.items()}
        # All workers wait for their calls in flight at once, within one shutdown timeout.
        await asyncio.gather(*(w.stop(config.server.shutdown_timeout) for w in workers.values()))
        await asyncio.gather(refresher, return_exceptions=True)
        for connector in connectors.values():
            await connector.close()
        await store.close()


def create_app(
    config: Config, store: Store | None = None, clock: Callable[[], float] = time.time
) -> web.Application:
    """The daemon's aiohttp application; workers start and stop with it.

    `clock` (wall-clock seconds) dates events and schedules retries; tests pass a manual one.
    """
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[BACKLOG] = Backlog()
    app[LOAD] = IngestLoad()
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
    app.cleanup_ctx.append(_lifecycle)
    return app
