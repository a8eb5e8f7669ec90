"""`crm-bridge status`: the queue, the dead letters and each connector's state, for operators.

The figures come from the store, so the command works with the daemon stopped. The circuit
breakers and pauses live in the daemon only: when it answers `/status` on loopback (the
config's server.port) their states are added, and when it does not the report says so.

A connector's pauses are everything that holds its calls back now (`live_pauses`): its
circuit breaker while open, and the connector's own (`Connector.pauses`: a rate limit, a spent
daily allocation, a concurrency backoff), each with its kind, reason, end and seconds left.
`/status`, this report and the metrics all read them from there.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
from typing import Any

import aiohttp

from bridge.breaker import BreakerState, CircuitBreaker
from bridge.config import Config, ServerConfig
from bridge.dlq import iso
from bridge.store import Store
from connectors.base import Connector, ConnectorConfig

LIVE_TIMEOUT = 2.0  # seconds to wait for the daemon's answer
PIPED_ERROR_WIDTH = 160
# The kind of the pause an open circuit breaker holds (beside `connectors.base.Pause.kind`).
BREAKER_PAUSE = "circuit_breaker"


def live_pauses(breaker: CircuitBreaker, connector: Connector, now: float) -> list[dict[str, Any]]:
    """What holds the connector's calls back at wall-clock `now`, longest first: the breaker
    while open, and the connector's own pauses; each as `/status` shows it."""
    held: list[tuple[float, str, str]] = [
        (p.until, p.kind, p.reason) for p in connector.pauses() if p.until > now
    ]
    if breaker.state is BreakerState.OPEN:
        reason = breaker.reason or "repeated failures"
        held.append((now + breaker.wait_seconds(), breaker.kind or BREAKER_PAUSE, reason))
    return [
        {"kind": kind, "reason": reason, "until": iso(until), "seconds_left": round(until - now, 1)}
        for until, kind, reason in sorted(held, key=lambda h: h[0], reverse=True)
    ]


def daemon_url(server: ServerConfig) -> str | None:
    """Where the daemon answers on loopback, or None when the config does not say (port 0)."""
    if server.port == 0:
        return None
    host = server.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass  # a name (localhost): ask it as it is
    else:
        if address.is_unspecified:  # listening on every address: loopback is one of them
            host = "::1" if address.version == 6 else "127.0.0.1"
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"http://{host}:{server.port}"


async def fetch_live(url: str, timeout: float = LIVE_TIMEOUT) -> tuple[dict[str, Any] | None, str]:
    """The daemon's `/status`, or None and why not."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"{url}/status") as response,
        ):
            if response.status != 200:
                return None, f"{url}/status answered {response.status}"
            body: dict[str, Any] = await response.json()
            return body, f"running at {url}"
    except aiohttp.ClientConnectorError:
        return None, f"not running (nothing listens at {url})"
    except TimeoutError:
        return None, f"no answer from {url} within {timeout:g}s"
    except (aiohttp.ClientError, ValueError) as exc:
        return None, f"no usable answer from {url}/status: {str(exc) or type(exc).__name__}"


async def gather(store: Store, config: Config, now: float) -> dict[str, Any]:
    """The report `crm-bridge status` prints, as plain data (what `--json` prints)."""
    url = daemon_url(config.server)
    if url is None:
        live, daemon = None, "unknown (server.port is 0 in the config)"
    else:
        live, daemon = await fetch_live(url)
    counts = await store.counts()
    queue = await store.queue_stats()
    errors = await store.last_errors()
    backlog = await store.backlog()
    live_connectors: dict[str, Any] = (live or {}).get("connectors", {})
    names = list(config.connectors) + sorted((set(counts) | set(queue)) - set(config.connectors))
    connectors: dict[str, Any] = {}
    for name in names:
        stat = queue.get(name)
        oldest = stat.oldest_pending_at if stat else None
        error = errors.get(name)
        state = live_connectors.get(name, {})
        connectors[name] = {
            "mode": _mode(config.connector_settings.get(name)),
            "breaker": state.get("breaker"),
            "breaker_reason": state.get("reason"),
            "paused_for": state.get("paused_for"),
            "pauses": state.get("pauses") or [],
            "pending": stat.pending if stat else 0,
            "in_flight": stat.in_flight if stat else 0,
            "oldest_pending_at": iso(oldest),
            "oldest_pending_age": None if oldest is None else round(max(0.0, now - oldest), 1),
            "dead": counts.get(name, {}).get("dead", 0),
            "done": counts.get(name, {}).get("done", 0),
            "last_error": error.error if error else None,
            "last_error_at": iso(error.at) if error else None,
            "last_error_delivery": error.delivery_id if error else None,
        }
    ages = [a for c in connectors.values() if (a := c["oldest_pending_age"]) is not None]
    return {
        "store": config.store.describe(),
        "daemon": {"running": live is not None, "url": url, "detail": daemon},
        "backlog": backlog,
        "queue_depth": sum(c["pending"] + c["in_flight"] for c in connectors.values()),
        "oldest_pending_age": max(ages) if ages else None,
        "dead": sum(c["dead"] for c in connectors.values()),
        "connectors": connectors,
    }


def _mode(settings: ConnectorConfig | None) -> str:
    if settings is None:
        return "not configured"  # deliveries left from a connector since removed
    return "live" if settings.has_credentials() else "dry-run"


def age(seconds: float | None) -> str:
    """A duration as `45s`, `12m`, `3h` or `2d`; `-` for none."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _deliveries(n: int) -> str:
    return f"{n} deliver{'y' if n == 1 else 'ies'}"


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join((text or "-").split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def _breaker(connector: dict[str, Any]) -> str:
    state = connector["breaker"]
    if state is None:
        return "-"
    if state == "open" and connector["paused_for"]:
        return f"open({age(connector['paused_for'])})"
    return str(state)


def render(report: dict[str, Any], width: int | None = None) -> str:
    """The report as a few summary lines (one per pause holding a connector back) and one
    table row per connector.

    The last error is cut to fit `width` (default: the terminal's; to a pipe or a file,
    PIPED_ERROR_WIDTH characters); `--json` has it in full.
    """
    daemon = report["daemon"]
    lines = [
        f"store    {report['store']}",
        f"daemon   {daemon['detail']}" + ("" if daemon["running"] else "; breaker states unknown"),
        f"queue    {_deliveries(report['queue_depth'])} waiting, oldest pending "
        f"{age(report['oldest_pending_age'])}; backlog {report['backlog']} "
        f"(with the events not routed yet)",
        f"dead     {report['dead']} (crm-bridge dlq list)",
        *_pause_lines(report["connectors"], width),
        "",
    ]
    headers = ("CONNECTOR", "MODE", "BREAKER", "PENDING", "IN_FLIGHT", "OLDEST", "DEAD", "DONE")
    cells = [
        (
            name,
            c["mode"].replace(" ", "-"),
            _breaker(c),
            str(c["pending"]),
            str(c["in_flight"]),
            age(c["oldest_pending_age"]),
            str(c["dead"]),
            str(c["done"]),
        )
        for name, c in report["connectors"].items()
    ]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    used = sum(widths) + 2 * len(widths)
    if width is None and not sys.stdout.isatty():
        error_width = PIPED_ERROR_WIDTH
    else:
        error_width = max((width or shutil.get_terminal_size().columns) - used, 24)
    lines.append(
        "  ".join([*(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "LAST ERROR"])
    )
    for row, c in zip(cells, report["connectors"].values(), strict=True):
        padded = (v.ljust(w) for v, w in zip(row, widths, strict=True))
        lines.append("  ".join([*padded, _one_line(c["last_error"], error_width)]))
    return "\n".join(line.rstrip() for line in lines)


def _pause_lines(connectors: dict[str, Any], width: int | None) -> list[str]:
    """One summary line per pause, above the table (whose rows scripts read):
    `paused   salesforce  daily_allocation  4m  until 2024-05-01T12:05:00Z  <reason>`."""
    rows = [
        (name, str(p["kind"]), age(p["seconds_left"]), f"until {p['until']}", p["reason"])
        for name, c in connectors.items()
        for p in c.get("pauses") or []
    ]
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    used = 9 + sum(widths) + 2 * len(widths)
    if width is None and not sys.stdout.isatty():
        reason_width = PIPED_ERROR_WIDTH
    else:
        reason_width = max((width or shutil.get_terminal_size().columns) - used, 24)
    lines = []
    for row in rows:
        cells = [v.ljust(w) for v, w in zip(row[:4], widths, strict=True)]
        lines.append("  ".join(["paused ", *cells, _one_line(row[4], reason_width)]))
    return lines
