"""Backfill: contacts from a CSV or JSON-lines file stored as events, exactly as webhooks are.

Each line goes through the webhook's validation (`WebhookPayload`) and becomes a `NewEvent` with
the webhook's idempotency key, so a second run stores nothing new and a webhook with the same
content later is a duplicate. The daemon's router then applies the rules to what was stored
(within `delivery.poll_interval` while it runs, or when it next starts).

- CSV: the header row names contact fields (`email,first_name,company_name,...`; a dotted name
  such as `custom.industry` fills a nested object). Empty cells are null. Cells stay strings
  except where the model types a field as a boolean (`"true"` becomes `true`), so rules see what
  a webhook would send.
- JSON lines: each line is a full webhook payload (`{"type", "CampaignId", "contact": {...}}`,
  kept as it is, with its own type) or a bare contact object.

Bare contacts (every CSV row) get the type given with `--type`, `backfill` by default: rules
match on `type`, so pass e.g. `--type interest` for them to be treated as interest events.

The file is streamed and stored in chunks: memory stays bounded, and the chunk's `ingest` calls
are awaited together so the store commits each chunk in one group.
"""

from __future__ import annotations

import asyncio
import csv
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import ValidationError
from tqdm import tqdm

from bridge.config import Config
from bridge.errors import BridgeError
from bridge.models import Contact, NewEvent, WebhookPayload, idempotency_key
from bridge.store import Store

DEFAULT_TYPE = "backfill"
CHUNK = 500  # events per ingest round: within the store's group size, so one commit each
MAX_LISTED = 20  # invalid lines listed in the summary

Format = Literal["csv", "jsonl"]
Progress = Callable[[int], object]  # told how many bytes of the file were consumed


class BackfillError(BridgeError):
    """The backfill cannot run (bad file or arguments); nothing more is stored."""


@dataclass
class Line:
    """One record of the file: the payload to validate, or why it cannot be one."""

    number: int  # where the record starts, 1-based
    data: dict[str, Any] | None
    text: str | None = None  # the payload as received, when it came as JSON text
    bare: bool = False  # a contact without its payload: `type` was filled in
    problems: list[str] = field(default_factory=list)


@dataclass
class Invalid:
    line: int
    problems: list[str]

    def __str__(self) -> str:
        return f"line {self.line}: " + "; ".join(self.problems)


@dataclass
class Summary:
    """What a backfill did; `invalid_lines` holds the first MAX_LISTED invalid ones."""

    source: str = ""
    probed_all: bool = False  # the first stored chunk was probed for every other type
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    invalid: int = 0
    stored_bare: int = 0
    invalid_lines: list[Invalid] = field(default_factory=list)
    # Rows stored now that an earlier run had stored with another --type, by that type.
    other_types: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False  # Ctrl-C: the figures are what was stored until then

    def add_invalid(self, line: int, problems: list[str]) -> None:
        self.invalid += 1
        if len(self.invalid_lines) < MAX_LISTED:
            self.invalid_lines.append(Invalid(line, problems))


def pick_source(config: Config, name: str | None) -> str:
    """The named source, or the first configured one; BackfillError if there is none."""
    if name is None:
        if not config.sources:
            raise BackfillError("no source is configured")
        return next(iter(config.sources))
    if name not in config.sources:
        raise BackfillError(
            f"no source named {name!r}; configured: {', '.join(config.sources) or 'none'}"
        )
    return name


def detect_format(path: Path) -> Format:
    """By extension (.csv; .jsonl, .ndjson, .json), else by the first character (`{`: JSON)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if head.startswith(b"{") else "csv"


def _binary_lines(f: Any, progress: Progress) -> Iterator[bytes]:
    for raw in f:
        progress(len(raw))
        yield raw


def read_jsonl(path: Path, type_: str, progress: Progress) -> Iterator[Line]:
    """Lines of a JSON-lines file; blank lines are skipped."""
    with path.open("rb") as f:
        for number, raw in enumerate(_binary_lines(f, progress), start=1):
            stripped = raw.strip()
            if number == 1:
                stripped = stripped.removeprefix(b"\xef\xbb\xbf").strip()
            if not stripped:
                continue
            if number == 1 and stripped.startswith(b"["):
                raise BackfillError(
                    f"{path} holds a JSON array: write one object per line (jq -c '.[]' does)"
                )
            try:
                data = orjson.loads(stripped)
            except orjson.JSONDecodeError as exc:
                yield Line(number, None, problems=[f"not valid JSON: {exc}"])
                continue
            if not isinstance(data, dict):
                yield Line(number, None, problems=["must be a JSON object"])
            elif "contact" in data:
                yield Line(number, data, text=stripped.decode())
            else:
                yield Line(number, {"type": type_, "contact": data}, bare=True)


def _nesting_conflict(names: list[str]) -> str | None:
    """Why `a` and `a.b` cannot both be columns, if the header has such a pair."""
    paths = {tuple(name.split(".")) for name in names}
    for path in sorted(paths):
        for i in range(1, len(path)):
            if path[:i] in paths:
                return f"columns {'.'.join(path[:i])!r} and {'.'.join(path)!r} overlap"
    return None


def _nest(names: list[str], values: list[str | None]) -> dict[str, Any]:
    """A contact from a CSV row; `a.b` headers build nested objects (checked not to overlap)."""
    contact: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        *parents, leaf = name.split(".")
        target = contact
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return contact


def _csv_header(reader: Any, path: Path) -> list[str]:
    for row in reader:
        names = [cell.strip() for cell in row]
        if not any(names):
            continue  # blank lines before the header
        if not all(names):
            raise BackfillError(f"{path}:{reader.line_num}: the header has an empty column name")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BackfillError(f"{path}:{reader.line_num}: duplicate column {', '.join(twice)}")
        conflict = _nesting_conflict(names)
        if conflict:
            raise BackfillError(f"{path}:{reader.line_num}: {conflict}")
        return names
    return []


def read_csv(path: Path, type_: str, progress: Progress) -> Iterator[Line]:
    """Rows of a CSV file with a header row; rows with every cell empty are skipped."""
    with path.open("rb") as f:
        # Decoded line by line so the progress follows the bytes; bytes that are not UTF-8 are
        # kept as surrogates and reported on their row instead of ending the whole run.
        text = (
            raw.decode("utf-8-sig" if i == 0 else "utf-8", "surrogateescape")
            for i, raw in enumerate(_binary_lines(f, progress))
        )
        reader = csv.reader(text, strict=True)
        try:
            names = _csv_header(reader, path)
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                yield _csv_line(start, names, row, type_)
        except csv.Error as exc:
            raise BackfillError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None


def _csv_line(number: int, names: list[str], row: list[str], type_: str) -> Line:
    if len(row) > len(names):
        return Line(number, None, problems=[f"{len(row)} cells, the header has {len(names)}"])
    try:
        for cell in row:
            cell.encode()
    except UnicodeEncodeError:
        return Line(number, None, problems=["not UTF-8 text"])
    cells: list[str | None] = [cell if cell.strip() else None for cell in row]
    cells += [None] * (len(names) - len(cells))
    return Line(number, {"type": type_, "contact": _nest(names, cells)}, bare=True)


def _typed_cells(raw: dict[str, Any], contact: Contact) -> None:
    """Give boolean fields the value the model read from their text ("true" -> true)."""
    for name in Contact.model_fields:
        value = getattr(contact, name)
        if isinstance(raw.get(name), str) and isinstance(value, bool):
            raw[name] = value


def to_event(line: Line, source: str, now: float, *, typed_cells: bool) -> NewEvent:
    """The event the webhook would have stored for this payload; ValidationError if invalid."""
    assert line.data is not None
    payload = WebhookPayload.model_validate(line.data)
    if typed_cells:
        _typed_cells(line.data["contact"], payload.contact)
    updated = payload.contact.updatedAt
    return NewEvent(
        id=idempotency_key(source, line.data),
        source=source,
        type=payload.type,
        email=payload.contact.email,
        received_at=now,
        sort_at=updated.timestamp() if updated else now,
        body=line.text if line.text is not None else orjson.dumps(line.data).decode(),
    )


def _problems(exc: ValidationError, bare: bool) -> list[str]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if bare and loc[:1] == ["contact"]:
            loc = loc[1:]  # the user wrote the contact only: name its own fields
        out.append(f"{'.'.join(loc) or '(line)'}: {err['msg']}")
    return out


Chunk = list[tuple[NewEvent, Line]]


async def _store_chunk(store: Store, chunk: Chunk, summary: Summary, probe: list[str]) -> None:
    results = await asyncio.gather(*(store.ingest(event) for event, _ in chunk))
    fresh: list[Line] = []
    for result, (_, line) in zip(results, chunk, strict=True):
        if result.duplicate:
            summary.duplicates += 1
        else:
            summary.stored += 1
            summary.stored_bare += line.bare
            if line.bare:
                fresh.append(line)
    await _find_other_types(store, fresh, probe, summary)


async def _find_other_types(
    store: Store, fresh: list[Line], probe: list[str], summary: Summary
) -> None:
    """Bare rows just stored that a run with another --type stored before: the type is part
    of the event, so the same row is a new event. The first chunk is probed for every known
    type, the rest for those found in it only."""
    if not fresh or not probe:
        return
    source = summary.source
    keys = [
        (t, idempotency_key(source, {**line.data, "type": t}))
        for line in fresh
        if line.data is not None
        for t in probe
    ]
    found = await asyncio.gather(*(store.event(key) for _, key in keys))
    for (type_, _), event in zip(keys, found, strict=True):
        if event is not None:
            summary.other_types[type_] = summary.other_types.get(type_, 0) + 1
    if summary.probed_all:
        return
    summary.probed_all = True
    probe[:] = [t for t in probe if t in summary.other_types]


async def run_backfill(
    store: Store,
    path: Path,
    *,
    source: str,
    type_: str = DEFAULT_TYPE,
    fmt: Format | None = None,
    clock: Callable[[], float] = time.time,
    other_types: tuple[str, ...] = (),
) -> Summary:
    """Validate and store every line of `path`; what happened, line by line where it failed.
    `other_types`: the types an earlier run may have given the same bare rows (reported in
    `Summary.other_types`). Cancelled (Ctrl-C), it lets the chunk being stored finish and
    returns what was done, `interrupted`."""
    fmt = fmt or detect_format(path)
    summary = Summary(source=source)
    probe = [t for t in other_types if t != type_]
    bar = tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=path.name,
        file=sys.stderr,
        disable=None,  # no bar when stderr is not a terminal (cron, CI, pipes)
    )
    reader = read_csv if fmt == "csv" else read_jsonl
    chunk: Chunk = []
    with bar:
        try:
            for line in reader(path, type_, bar.update):
                summary.read += 1
                if line.problems:
                    summary.add_invalid(line.number, line.problems)
                    continue
                try:
                    chunk.append((to_event(line, source, clock(), typed_cells=fmt == "csv"), line))
                except ValidationError as exc:
                    summary.add_invalid(line.number, _problems(exc, line.bare))
                if len(chunk) >= CHUNK:
                    await _finish_chunk(store, chunk, summary, probe)
                    chunk = []
                    bar.set_postfix_str(f"stored={summary.stored} invalid={summary.invalid}", False)
            if chunk:
                await _finish_chunk(store, chunk, summary, probe)
        except asyncio.CancelledError:
            summary.interrupted = True
    return summary


async def _finish_chunk(store: Store, chunk: Chunk, summary: Summary, probe: list[str]) -> None:
    """Store a chunk; a cancellation meanwhile waits for the store's answer (what it was
    handed is committed anyway), counts it, then goes on."""
    task = asyncio.ensure_future(_store_chunk(store, chunk, summary, probe))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def render_summary(summary: Summary, path: Path, source: str, type_: str) -> str:
    lines = [
        f"backfill {path} into source {source!r}:",
        f"  read            {summary.read}",
        f"  stored          {summary.stored}",
        f"  already stored  {summary.duplicates}",
        f"  invalid         {summary.invalid}",
    ]
    if summary.invalid:
        listed = len(summary.invalid_lines)
        of = f"first {listed} of {summary.invalid}" if listed < summary.invalid else str(listed)
        lines.append(f"invalid lines ({of}):")
        lines += [f"  {invalid}" for invalid in summary.invalid_lines]
    if summary.stored_bare and type_ == DEFAULT_TYPE:
        lines.append(
            f"{summary.stored_bare} contact(s) stored with type {type_!r}: rules match on type, "
            "so only rules for that type apply to them (pass e.g. --type interest)"
        )
    if summary.other_types:
        earlier = ", ".join(f"{n} with --type {t}" for t, n in sorted(summary.other_types.items()))
        lines.append(
            f"rows of this file were stored before by a run with another --type ({earlier}):"
            f" the type is part of an event, so they are now stored twice, once as {type_!r},"
            " and the rules apply to both"
        )
    if summary.stored:
        lines.append(
            "the daemon applies the rules to stored events as it polls, or when it next starts"
        )
    if summary.interrupted:
        lines.append(
            f"interrupted after {summary.read} line(s): run it again to store the rest (what"
            " is stored already is skipped)"
        )
    return "\n".join(lines)
