"""The dead-letter queue for operators: durations, and dead deliveries as a table or JSON.

`crm-bridge dlq` reads and changes the store through the `Store` interface only; this module
turns what the store returns into what a person (or a script, with `--json`) reads.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from datetime import UTC, datetime
from typing import Any

from bridge.store import Store

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
PIPED_ERROR_WIDTH = 160
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Columns whose numbers are wall-clock seconds, shown as ISO-8601 UTC.
_TIME_KEYS = frozenset(
    {
        "created_at",
        "next_attempt_at",
        "sort_at",
        "horizon_start",
        "lease_until",
        "updated_at",
        "received_at",
        "routed_at",
    }
)


async def list_dead(
    store: Store, connector: str | None, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """Up to `limit` dead deliveries, oldest first, and how many there are in all."""
    counts = await store.counts()
    total = sum(by.get("dead", 0) for name, by in counts.items() if connector in (None, name))
    return await store.dead_letters(connector, limit), total


async def retry(store: Store, delivery_id: int | None, now: float) -> tuple[int, str | None]:
    """Queue one dead delivery (all, with None) again: how many, or why that one cannot be."""
    if delivery_id is not None:
        delivery = await store.delivery(delivery_id)
        if delivery is None:
            return 0, f"no delivery {delivery_id}"
        if delivery["status"] != "dead":
            return 0, f"delivery {delivery_id} is {delivery['status']}, not dead"
    queued = await store.retry_dead(delivery_id, now)
    if delivery_id is not None and not queued:
        return 0, f"delivery {delivery_id} is no longer dead"  # retried meanwhile
    return queued, None


def parse_duration(text: str) -> float:
    """Seconds in `30s`, `30m`, `12h`, `7d` or `2w`; ValueError for anything else."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(f"not a duration: {text!r} (write e.g. 30m, 12h or 7d)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def iso(timestamp: float | None, *, precise: bool = False) -> str | None:
    """Wall-clock seconds as `2024-05-01T12:00:00Z` (`precise`: `...:00.250Z`)."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    if precise:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def readable(row: Any, *, body_as_json: bool = True, precise: bool = False) -> Any:
    """A store row with its times as ISO-8601 and an event's body as JSON (unless
    `body_as_json` is false: then as stored, byte for byte), recursively."""
    if isinstance(row, list):
        return [readable(v, body_as_json=body_as_json, precise=precise) for v in row]
    if not isinstance(row, dict):
        return row
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in _TIME_KEYS and isinstance(value, int | float):
            out[key] = iso(value, precise=precise)
        elif key == "body" and isinstance(value, str) and body_as_json:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value  # stored as received; show it as it is
        else:
            out[key] = readable(value, body_as_json=body_as_json, precise=precise)
    return out


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def render_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """Dead deliveries as aligned columns, one line each.

    The last error is cut to fit `width` (default: the terminal's; when the output goes to a
    pipe or file, to PIPED_ERROR_WIDTH characters). `dlq show` and `--json` have it in full.
    """
    headers = ("ID", "CONNECTOR", "RULE", "CONTACT", "ATTEMPTS", "WHEN", "LAST ERROR")
    cells = [
        (
            str(r["id"]),
            str(r["connector"]),
            str(r["rule"]),
            str(r["contact_key"]),
            str(r["attempts"]),
            iso(r["updated_at"]) or "",
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers[:-1])]
    used = sum(widths) + 2 * len(widths)
    if width is None and not sys.stdout.isatty():
        error_width = PIPED_ERROR_WIDTH
    else:
        error_width = max((width or shutil.get_terminal_size().columns) - used, 24)
    lines = ["  ".join([*(h.ljust(w) for h, w in zip(headers, widths, strict=False)), headers[-1]])]
    for row, c in zip(rows, cells, strict=True):
        padded = (v.ljust(w) for v, w in zip(c, widths, strict=True))
        lines.append("  ".join([*padded, _one_line(row["last_error"], error_width)]))
    return "\n".join(line.rstrip() for line in lines)
