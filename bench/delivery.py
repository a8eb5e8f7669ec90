#!/usr/bin/env python
"""Delivery benchmarks: crm-bridge's delivery side against the rate-limit ceiling, a 100k backlog
and twice its sustainable ingest rate.

    python bench/delivery.py [--scenario ceiling|drain|overload|all] [--profile DIR] [--json FILE]

Every scenario runs `crm-bridge serve --port 0` as a subprocess with a temporary config and a
fresh SQLite store in a temp dir (127.0.0.1 only), and every loop is bounded in count and time.

* ceiling: the HubSpot emulator (tests/emulators) with `--latency` per request and a rolling
  limit of `--tier-max` requests per `--interval-ms`; the hubspot connector configured with the
  same limit (`rate_limit_requests`, `rate_limit_share`). N distinct contacts are stored with
  `crm-bridge backfill` while the daemon is stopped, then the daemon starts and delivers. Steady
  rate: records HubSpot accepted between the start of the second burst of requests (the first
  rolling window is spent) and the start of the last burst observed, so only whole cycles count.
  Ceiling = batch (100) x requests per window / window. Goals: >= 90 % of the ceiling, and no 429
  after the first window.
* drain: `--backlog` events (one delivery each, dry-run connector) stored with `crm-bridge
  backfill` while the daemon is stopped; then the daemon starts, and the store is polled read-only
  until every event is routed and every delivery finished. Goal: >= 2,000 deliveries/s. The
  daemon's RSS is sampled every second (first / max / last, and VmHWM).
* overload: a closed-loop probe (`--probe-seconds`) then a wait until its deliveries are done give
  the sustainable rate = acknowledged / (probe + drain time), i.e. what ingest and delivery
  together keep up with. Then a paced open-loop client offers `--factor` (2) x that rate for
  `--overload-seconds` (60). Reported: RSS max (goal < 200 MB), acknowledged, 503s (backpressure,
  allowed: not acknowledged); after the load, the bench waits for the backlog to drain, stops
  the daemon and checks in its SQLite file that every acknowledged event is stored, routed, and
  has its deliveries all finished.

Every scenario has one rule (config.example.yaml's `interested-click-to-hubspot`), so each event
makes exactly one HubSpot upsert; delivery settings are the daemon's defaults. Load generators
are separate processes (this file, `_closed` / `_open` modes), so the bench's sampling does not
share their GIL. The HubSpot emulator runs in a thread of this process; the bench indexes its
contacts by email (the emulator looks them up by scanning, which would make it the bottleneck at
tens of thousands of contacts) and, with `--count-at arrival`, counts a request in its rate window
when it arrives rather than when it answers; nothing else in it is changed.
Exit status: 0 when every check passes, 1 when a goal or a check fails, 2 when the bench could
not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as `python bench/<name>.py`: the bench folder is on sys.path.
from procstat import cpu_seconds, machine_busy_seconds, percentile

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "supersend-click.json"
TOKEN = "bench-token-" + uuid.uuid4().hex[:12]
HUBSPOT_TOKEN = "pat-na1-bench"
START_TIMEOUT = 30.0  # seconds the daemon gets to start listening
STOP_TIMEOUT = 40.0  # seconds it gets to stop on SIGTERM before SIGKILL
BACKFILL_TIMEOUT = 300.0
MB = 1024 * 1024
UNFINISHED = ("pending", "in_flight")
FINISHED_OK = ("done", "dry_run")

# The one rule of every scenario, config.example.yaml's `interested-click-to-hubspot`: a `click`
# from an interested contact makes exactly one HubSpot upsert, so deliveries = events.
RULES: list[dict[str, Any]] = [
    {
        "name": "interested-click-to-hubspot",
        "when": "type == 'click' and contact.interest == 'interested'",
        "connector": "hubspot",
        "action": "upsert_contact",
        "fields": {
            "firstname": "{{ contact.first_name }}",
            "lastname": "{{ contact.last_name }}",
            "hs_lead_status": "OPEN",
        },
    }
]


# --------------------------------------------------------------------------- payloads


def _template() -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(SAMPLE.read_text())
    except (OSError, ValueError):
        data = {"type": "click", "CampaignId": "bench", "contact": {"interest": "interested"}}
    data["type"] = "click"
    data.setdefault("contact", {})["interest"] = "interested"
    return data


class Bodies:
    """Distinct webhook bodies, cheaply: the sample with a unique email and updatedAt each."""

    def __init__(self, tag: str) -> None:
        data = _template()
        contact = data["contact"]
        contact.update(first_name="Ann", last_name="Bench", email="@@E@@", updatedAt="@@T@@")
        text = json.dumps(data, separators=(",", ":"))
        head, rest = text.split("@@E@@")
        middle, tail = rest.split("@@T@@")
        self.parts = (head, middle, tail)
        self.tag = tag

    def text(self, i: int) -> str:
        seconds, ms = divmod(i, 1000)
        minutes, sec = divmod(seconds, 60)
        hours, minute = divmod(minutes, 60)
        days, hour = divmod(hours, 24)
        stamp = f"2024-01-{1 + days % 28:02d}T{hour:02d}:{minute:02d}:{sec:02d}.{ms:03d}Z"
        head, middle, tail = self.parts
        return f"{head}{self.tag}-{i}@example.com{middle}{stamp}{tail}"


def write_contacts(path: Path, count: int, tag: str) -> None:
    bodies = Bodies(tag)
    with path.open("w") as f:
        for i in range(count):
            f.write(bodies.text(i) + "\n")


# --------------------------------------------------------------------------- /proc readings


def proc_status_mb(pid: int, key: str) -> float | None:
    """VmRSS / VmHWM of a process in MB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []  # (monotonic, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status_mb(self.pid, "VmRSS")
            if rss is None:
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> list[float]:
        return [mb for t, mb in self.samples if start <= t <= end]


def rss_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"first": 0.0, "max": 0.0, "last": 0.0, "samples": 0}
    return {"first": values[0], "max": max(values), "last": values[-1], "samples": len(values)}


class CpuMeter:
    """Daemon CPU and the rest of the machine's busy CPU over a span, in cores."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = time.monotonic()
        self.daemon0 = cpu_seconds(pid)
        self.machine0 = machine_busy_seconds()
        self.own0 = sum(os.times()[:2])

    def read(self, others: float = 0.0) -> dict[str, float]:
        """`others`: CPU seconds of known helpers (load clients) to leave out of `other`."""
        span = max(time.monotonic() - self.start, 1e-6)
        daemon = cpu_seconds(self.pid) - self.daemon0
        own = sum(os.times()[:2]) - self.own0
        machine = machine_busy_seconds() - self.machine0
        return {
            "daemon_cpu": daemon / span,
            "bench_cpu": (own + others) / span,
            "other_cpu": max(0.0, machine - daemon - own - others) / span,
        }


# --------------------------------------------------------------------------- the daemon


def write_config(directory: Path, hubspot: dict[str, Any] | None = None) -> Path:
    """Connectors hubspot (live if given settings, else dry) and salesforce (dry), RULES, and
    the defaults of everything else (delivery settings included)."""
    import yaml

    config = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 20},
        "sources": {"supersend": {"kind": "supersend", "tokens": [TOKEN]}},
        "store": {"type": "sqlite", "path": str(directory / "bench.db")},
        "connectors": {
            "hubspot": {"type": "hubspot", **(hubspot or {})},
            "salesforce": {"type": "salesforce"},
        },
        "rules": RULES,
        "logging": {"level": "INFO", "format": "json"},
    }
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("crm-bridge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bridge"]


def backfill(config: Path, contacts: Path) -> float:
    """`crm-bridge backfill` with the daemon stopped; the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        [*_cli(), "backfill", str(contacts), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=BACKFILL_TIMEOUT,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"backfill failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return time.monotonic() - started


class Daemon:
    """`crm-bridge serve --port 0`, its log in a file, found listening by its JSON log line."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.cmd = [*_cli(), "serve", "--config", str(config), "--port", "0"]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.launched = 0.0
        self.listening = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        with self.log_path.open("wb") as log:
            self.launched = time.monotonic()
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT
            )
        deadline = time.monotonic() + START_TIMEOUT
        offset = 0
        while time.monotonic() < deadline and self.proc.poll() is None:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            lines = chunk.split(b"\n")
            offset += len(chunk) - len(lines[-1])
            for line in lines[:-1]:
                if b'"server.listening"' in line:
                    with contextlib.suppress(ValueError):
                        self.url = str(json.loads(line)["url"])
                        self.listening = time.monotonic()
                        return self
            time.sleep(0.02)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"crm-bridge did not start listening:\n{tail}")

    def hwm_mb(self) -> float | None:
        return proc_status_mb(self.pid, "VmHWM") if self.proc else None

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def log_problems(self, keep: int = 3) -> list[str]:
        """The last distinct error/critical messages of the daemon's log."""
        found: list[str] = []
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            for raw in f:
                if b'"level":"error"' not in raw and b'"level":"critical"' not in raw:
                    continue
                with contextlib.suppress(ValueError):
                    message = str(json.loads(raw).get("message", ""))[:200]
                    if message not in found:
                        found.append(message)
        return found[-keep:]


class StoreWatch:
    """The daemon's SQLite file, read-only, beside the running daemon (WAL: no blocking)."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)

    def progress(self) -> tuple[int, dict[str, int]]:
        """(events not routed yet, deliveries by status)."""
        unrouted = self.conn.execute("SELECT count(*) FROM events WHERE routed_at IS NULL")
        count = int(unrouted.fetchone()[0])
        rows = self.conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status")
        return count, {str(s): int(n) for s, n in rows.fetchall()}

    def wait_finished(
        self, expected: int, timeout: float, poll: float = 0.1
    ) -> tuple[float | None, float | None, dict[str, int]]:
        """Poll until all events are routed and `expected` deliveries finished.

        Returns (when routing was complete, when deliveries were, the last counts); None for a
        moment not reached within `timeout`.
        """
        deadline = time.monotonic() + timeout
        routed_at = done_at = None
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            unrouted, counts = self.progress()
            now = time.monotonic()
            if unrouted == 0 and routed_at is None:
                routed_at = now
            unfinished = sum(counts.get(s, 0) for s in UNFINISHED)
            if routed_at is not None and unfinished == 0 and sum(counts.values()) >= expected:
                done_at = now
                break
            time.sleep(poll)
        return routed_at, done_at, counts

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy attached to the daemon (raw collapsed stacks), when --profile is given."""

    def __init__(self, directory: str | None, name: str, pid: int) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.path: Path | None = None
        if not directory:
            return
        spy = Path(sys.executable).with_name("py-spy")
        self.path = Path(directory) / f"{name}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid), "--threads",
            "--nonblocking", "--rate", "100", "--format", "raw", "--output", str(self.path),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)  # let it attach

    def stop(self) -> list[str]:
        if self.proc is None or self.path is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return digest_profile(self.path)


def _frame_name(frame: str) -> str:
    """`func (path/file.py:12)` -> `file.py:func`, paths relative to the repository or site."""
    func, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in (str(ROOT) + "/", "site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{func}" if path else func


def digest_profile(path: Path, top: int = 12) -> list[str]:
    """Most frequent functions on the stack (inclusive) and on top of it (self), by thread."""
    if not path.exists():
        return []
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        threads[frames[0].split(": ", 1)[-1][:40]] += n
        names = [_frame_name(f) for f in frames[1:]]
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    if not total:
        return []
    lines = [
        f"{total} samples; threads: "
        + ", ".join(f"{name} {n / total:.0%}" for name, n in threads.most_common(5))
    ]
    skip = ("asyncio/", "threading.py", "runners.py", "<module>", "bridge/cli.py", "selectors.py")
    shown = [(k, v) for k, v in inclusive.most_common() if not any(x in k for x in skip)]
    lines += [f"incl {n / total:6.1%}  {name}" for name, n in shown[:top]]
    lines += [f"self {n / total:6.1%}  {name}" for name, n in own.most_common(top // 2)]
    return lines


# --------------------------------------------------------------------------- results


@dataclass
class Figures:
    """One scenario's figures: (label, value text) rows and goals (label, figure, met)."""

    name: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    goals: list[tuple[str, str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def row(self, label: str, value: str) -> None:
        self.rows.append((label, value))

    def goal(self, label: str, figure: str, met: bool) -> None:
        self.goals.append((label, figure, met))

    def print(self) -> None:
        print(f"\n== {self.name} ==")
        width = max((len(label) for label, _ in self.rows), default=10)
        for label, value in self.rows:
            print(f"  {label:<{width}}  {value}")
        for label, figure, met in self.goals:
            print(f"  goal {label}: {figure} -> {'met' if met else 'NOT met'}")
        for note in self.notes:
            print(f"  note: {note}")
        sys.stdout.flush()


def cpu_row(fig: Figures, cpu: dict[str, float]) -> None:
    fig.row(
        "CPU (cores)",
        f"daemon {cpu['daemon_cpu']:.2f}, bench+clients {cpu['bench_cpu']:.2f}, "
        f"other processes {cpu['other_cpu']:.2f} (of {os.cpu_count()})",
    )
    if cpu["other_cpu"] > 0.25:
        fig.notes.append(
            f"other processes used {cpu['other_cpu']:.2f} cores meanwhile: figures are noisy"
        )


# --------------------------------------------------------------------------- ceiling


ARRIVAL: contextvars.ContextVar[float] = contextvars.ContextVar("arrival")


def _emulator(tier_max: int, interval_ms: int, latency: float, count_at: str) -> Any:
    """The HubSpot emulator, its contacts indexed by email, its answers timed.

    As shipped, the emulator counts a request in its rate window when it answers, i.e. after
    `latency`; `count_at="arrival"` counts it when it arrives instead (the bench's variant).
    """
    sys.path.insert(0, str(ROOT))
    from tests.emulators import HubSpotEmulator

    class TimedHubSpot(HubSpotEmulator):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(token=HUBSPOT_TOKEN, tier_max=tier_max, interval_ms=interval_ms)
            self.latency = latency
            self.by_email: dict[str, Any] = {}
            # (monotonic time the emulator counted it, status, records in a 2xx answer)
            self.answers: list[tuple[float, int, int]] = []

        async def _entry(self, request: Any) -> Any:
            ARRIVAL.set(time.monotonic())  # each request is served in its own task
            return await super()._entry(request)

        def _check_rate_limit(self) -> Any:
            if count_at != "arrival":
                return super()._check_rate_limit()
            clock, arrived = self.clock, ARRIVAL.get()
            self.clock = lambda: arrived
            try:
                return super()._check_rate_limit()
            finally:
                self.clock = clock

        def _insert(self, table: Any, props: dict[str, str]) -> Any:
            record = super()._insert(table, props)
            if table is self.contacts and record.properties.get("email"):
                self.by_email[record.properties["email"]] = record
            return record

        def _apply(self, record: Any, props: dict[str, str]) -> list[str]:
            written: list[str] = super()._apply(record, props)
            if record.properties.get("email"):
                self.by_email[record.properties["email"]] = record
            return written

        def _find_contact(self, id_property: str, value: str) -> Any:
            if id_property == "email":
                return self.by_email.get(value.lower())
            return super()._find_contact(id_property, value)

        def _respond(self, call: Any) -> Any:
            now = ARRIVAL.get() if count_at == "arrival" else time.monotonic()
            reply = super()._respond(call)
            results = reply.body.get("results") if isinstance(reply.body, dict) else None
            count = len(results) if reply.status < 300 and isinstance(results, list) else 0
            self.answers.append((now, reply.status, count))
            return reply

    return TimedHubSpot().start()


@dataclass
class Burst:
    """Requests HubSpot counted without a pause longer than the gap between two of them."""

    start: float
    end: float = 0.0
    accepted: int = 0
    refused: int = 0  # 429
    records: int = 0


def bursts(answers: list[tuple[float, int, int]], gap: float) -> list[Burst]:
    out: list[Burst] = []
    last = None
    for t, status, records in sorted(answers):
        if last is None or t - last > gap:
            out.append(Burst(t))
        last = out[-1].end = t
        out[-1].accepted += status < 300
        out[-1].refused += status == 429
        out[-1].records += records
    return out


def repeat_period(sizes: list[int]) -> int | None:
    """The smallest p (1..3) with sizes[i] ~ sizes[i + p] (within 10 % of the largest burst)
    for every i; None if none fits."""
    tolerance = max(2.0, 0.1 * max(sizes, default=0))
    for p in (1, 2, 3):
        pairs = list(zip(sizes, sizes[p:], strict=False))
        if pairs and all(abs(a - b) <= tolerance for a, b in pairs):
            return p
    return None


def steady_span(
    found: list[Burst], first: float, window: float, stop: float
) -> tuple[float, float, str]:
    """The span to measure: from the second burst's start (the first window is spent) to a
    later burst's start in the same phase of the pattern, so only whole cycles count; without
    bursts, from the end of the first window to the stop."""
    if len(found) < 3:
        return first + window, stop, "from the end of the first window (no bursts to align on)"
    # The last burst may be cut short by the stop: only its start counts.
    sizes = [b.accepted for b in found[1:-1]]
    period = repeat_period(sizes) if len(sizes) >= 2 else None
    step = period or 1
    last = 1 + (len(found) - 2) // step * step
    how = (
        f"bursts 2..{last + 1}: {(last - 1) // step} whole cycle(s) of {step} burst(s)"
        if period
        else f"bursts 2..{last + 1} (no regular pattern: edges may bias it)"
    )
    return found[1].start, found[last].start, how


def _wait_ceiling(emu: Any, daemon: Daemon, wanted: int, window: float, gap: float) -> float:
    """Until `wanted` bursts have started, or the time cap; the stop time."""
    first_deadline = time.monotonic() + 60
    while not emu.answers and time.monotonic() < first_deadline:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise RuntimeError("crm-bridge exited during the ceiling scenario")
        time.sleep(0.05)
    if not emu.answers:
        raise RuntimeError("HubSpot emulator received nothing within 60 s")
    first = emu.answers[0][0]
    # Enough for the bursts even at half speed, and never more than that.
    cap = first + window * wanted * 2 + 5
    while time.monotonic() < cap:
        with emu.lock:
            found = bursts(list(emu.answers), gap)
        if len(found) >= wanted:
            break
        if len(found) < 3 and time.monotonic() > first + window * wanted:
            break  # no bursts: the flow is smooth, measured after the first window
        time.sleep(0.1)
    return time.monotonic()


def scenario_ceiling(args: argparse.Namespace, tmp: Path) -> Figures:
    from connectors.hubspot import RATE_WINDOW_SECONDS

    fig = Figures("ceiling: HubSpot emulator, rolling rate limit, batch upserts")
    window = args.interval_ms / 1000
    ceiling = 100 * args.tier_max / window
    count = args.contacts or int(ceiling * window * (args.bursts + 1))
    directory = tmp / "ceiling"
    directory.mkdir()
    emu = _emulator(args.tier_max, args.interval_ms, args.latency, args.count_at)
    daemon = profiler = sampler = None
    try:
        hubspot = {
            "access_token": HUBSPOT_TOKEN,
            "base_url": emu.url,
            "rate_limit_requests": args.tier_max,
            "rate_limit_share": args.share,
            "max_concurrency": args.hubspot_concurrency,
        }
        config = write_config(directory, hubspot)
        contacts = directory / "contacts.jsonl"
        write_contacts(contacts, count, "ceiling")
        loaded = backfill(config, contacts)
        daemon = Daemon(config, directory / "bridge.log").start()
        sampler = RssSampler(daemon.pid).start()
        profiler = Profiler(args.profile, "ceiling", daemon.pid)
        cpu = CpuMeter(daemon.pid)
        gap = min(1.0, window / 10)
        stop = _wait_ceiling(emu, daemon, args.bursts, window, gap)
        fig.notes += [f"profile: {line}" for line in profiler.stop()]
        profiler = None
        cpu_row(fig, cpu.read())
        hwm = daemon.hwm_mb()
    finally:
        if profiler is not None:
            profiler.stop()
        if sampler is not None:
            sampler.stop()
        code = daemon.stop() if daemon is not None else None
        emu.stop()
    with emu.lock:
        answers = list(emu.answers)
        created = len(emu.contacts)
    first = answers[0][0]
    found = bursts(answers, gap)
    start, end, how = steady_span(found, first, window, stop)
    measured = [a for a in answers if start <= a[0] < end]
    records = sum(n for _, s, n in measured if s < 300)
    ok_calls = sum(1 for a in measured if a[1] < 300)
    rate = records / (end - start) if end > start else 0.0
    refused = [t - first for t, s, _ in answers if s == 429]
    late_429 = sum(1 for t in refused if t >= window)
    fig.row(
        "setup",
        f"{count} contacts backfilled in {loaded:.1f} s; emulator {args.tier_max} requests / "
        f"{window:g} s counted at {args.count_at}, {args.latency * 1000:.0f} ms latency; "
        f"connector rate_limit_requests "
        f"{args.tier_max}, rate_limit_share {args.share:g}, max_concurrency "
        f"{args.hubspot_concurrency} (its window is fixed at {RATE_WINDOW_SECONDS:g} s)",
    )
    fig.row("measured span", f"{end - start:.1f} s: {how}")
    fig.row("delivered", f"{records} records in {ok_calls} calls "
            f"({records / max(ok_calls, 1):.1f} records/call)")  # fmt: skip
    fig.row("delivered/s (steady)", f"{rate:.0f}")
    fig.row("ceiling", f"{ceiling:.0f} records/s (100 x {args.tier_max} / {window:g} s)")
    fig.row("ratio", f"{rate / ceiling:.1%}")
    fig.row(
        "bursts (start: accepted/429 over)",
        ", ".join(
            f"{b.start - first:.2f} s: {b.accepted}/{b.refused} over {b.end - b.start:.1f} s"
            for b in found
        ),
    )
    fig.row(
        "429 answers",
        f"{late_429} after the first window, {len(refused) - late_429} within it"
        + (f" (at {', '.join(f'{t:.2f}' for t in refused[:8])} s)" if refused else ""),
    )
    fig.row("daemon RSS", f"max {max((m for _, m in sampler.samples), default=0):.0f} MB, "
            f"VmHWM {hwm or 0:.0f} MB")  # fmt: skip
    fig.row("HubSpot contacts", f"{created} created (of {count} queued; stopped after measuring)")
    fig.goal(">= 90% of the ceiling", f"{rate / ceiling:.1%}", rate >= 0.9 * ceiling)
    fig.goal("no 429 after the first window", str(late_429), late_429 == 0)
    if args.share < 1:
        fig.notes.append(
            f"rate_limit_share {args.share:g}: the connector allows itself "
            f"{max(1, int(args.tier_max * args.share))} requests per window, so at most "
            f"{args.share:.0%} of the ceiling"
        )
    if code not in (0, None):
        fig.notes.append(
            f"crm-bridge exited with {code}: {daemon.log_problems() if daemon else ''}"
        )
    fig.data = {
        "rate": rate, "ceiling": ceiling, "ratio": rate / ceiling, "late_429": late_429,
        "early_429": len(refused) - late_429, "records": records, "span": end - start,
        "bursts": [(b.start - first, b.accepted, b.refused, b.records) for b in found],
        "answers": [(round(t - first, 4), st, n) for t, st, n in answers],
    }  # fmt: skip
    return fig


# --------------------------------------------------------------------------- drain


def flat(values: list[float]) -> bool:
    """Memory counts as flat when it never grew by more than max(16 MB, 20 %) over the first."""
    return bool(values) and max(values) - values[0] <= max(16.0, 0.2 * values[0])


def scenario_drain(args: argparse.Namespace, tmp: Path) -> Figures:
    fig = Figures(f"drain: {args.backlog} queued deliveries through the dry-run connector")
    directory = tmp / "drain"
    directory.mkdir()
    config = write_config(directory)
    contacts = directory / "contacts.jsonl"
    write_contacts(contacts, args.backlog, "drain")
    loaded = backfill(config, contacts)
    contacts.unlink()
    daemon = Daemon(config, directory / "bridge.log")
    sampler = profiler = watch = None
    try:
        daemon.start()
        sampler = RssSampler(daemon.pid).start()
        profiler = Profiler(args.profile, "drain", daemon.pid)
        cpu = CpuMeter(daemon.pid)
        watch = StoreWatch(directory / "bench.db")
        routed_at, done_at, counts = watch.wait_finished(args.backlog, args.drain_timeout)
        cpu_figures = cpu.read()
        hwm = daemon.hwm_mb()
        fig.notes += [f"profile: {line}" for line in profiler.stop()]
        profiler = None
    finally:
        if watch is not None:
            watch.close()
        if profiler is not None:
            profiler.stop()
        if sampler is not None:
            sampler.stop()
        code = daemon.stop()
    finished = sum(counts.get(s, 0) for s in FINISHED_OK)
    elapsed = (done_at or time.monotonic()) - daemon.launched
    rate = finished / elapsed if elapsed > 0 else 0.0
    rss = rss_summary([mb for _, mb in sampler.samples] if sampler else [])
    fig.row("setup", f"{args.backlog} events stored by `crm-bridge backfill` in {loaded:.1f} s, "
            "daemon stopped; one rule: one dry-run hubspot upsert per event")  # fmt: skip
    fig.row("startup", f"{daemon.listening - daemon.launched:.2f} s from launch to listening")
    fig.row(
        "routed all events",
        f"{routed_at - daemon.launched:.1f} s after launch" if routed_at else "NOT within limit",
    )
    fig.row(
        "all deliveries finished",
        f"{elapsed:.1f} s after launch" if done_at else f"NOT within {args.drain_timeout:g} s",
    )
    fig.row("deliveries", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    fig.row("deliveries/s", f"{rate:.0f} (from launch, routing included)")
    fig.row(
        "daemon RSS",
        f"first {rss['first']:.0f} MB, max {rss['max']:.0f} MB, last {rss['last']:.0f} MB "
        f"({rss['samples']} samples, 1/s); VmHWM {hwm or 0:.0f} MB",
    )
    cpu_row(fig, cpu_figures)
    complete = done_at is not None and finished == args.backlog
    fig.goal(">= 2,000 deliveries/s", f"{rate:.0f}/s", complete and rate >= 2000)
    values = [mb for _, mb in sampler.samples] if sampler else []
    fig.goal("memory flat (max - first <= max(16 MB, 20%))",
             f"+{rss['max'] - rss['first']:.0f} MB", flat(values))  # fmt: skip
    fig.goal("every delivery finished, none dead", f"{finished}/{args.backlog}", complete)
    if code not in (0, None):
        fig.notes.append(f"crm-bridge exited with {code}: {daemon.log_problems()}")
    fig.data = {"rate": rate, "elapsed": elapsed, "rss": rss, "hwm": hwm, "counts": counts}
    return fig


# --------------------------------------------------------------------------- overload


def run_client(
    mode: str,
    daemon: Daemon,
    tag: str,
    ids: Path,
    during: Callable[[], None] | None = None,
    **options: float,
) -> dict[str, Any]:
    """One load-generator process, `during` called every 2 s while it runs; its JSON summary."""
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, "--url",
           daemon.url + "/webhooks/supersend", "--tag", tag, "--ids", str(ids),
           "--token", TOKEN]  # fmt: skip
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    deadline = time.monotonic() + options.get("seconds", 60) + 90
    errors = ids.with_suffix(".stderr")
    with errors.open("wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if during is not None:
                during()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if proc.returncode != 0:
        tail = errors.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"load client failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(out)
    return result


def verify_store(db: Path, id_files: list[Path]) -> dict[str, int]:
    """After the daemon stopped: what became of every acknowledged event."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("CREATE TEMP TABLE acked (id TEXT PRIMARY KEY)")
        for path in id_files:
            ids = [(line,) for line in path.read_text().split() if line]
            conn.executemany("INSERT OR IGNORE INTO temp.acked VALUES (?)", ids)
        one = conn.execute
        out = {
            "acked": one("SELECT count(*) FROM temp.acked").fetchone()[0],
            "stored_events": one("SELECT count(*) FROM events").fetchone()[0],
            "acked_missing": one(
                "SELECT count(*) FROM temp.acked a LEFT JOIN events e ON e.id = a.id"
                " WHERE e.id IS NULL"
            ).fetchone()[0],
            "acked_unrouted": one(
                "SELECT count(*) FROM temp.acked a JOIN events e ON e.id = a.id"
                " WHERE e.routed_at IS NULL"
            ).fetchone()[0],
            "acked_without_delivery": one(
                "SELECT count(*) FROM temp.acked a WHERE NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.event_id = a.id)"
            ).fetchone()[0],
        }
        rows = one(
            "SELECT d.status, count(*) FROM deliveries d JOIN temp.acked a ON a.id = d.event_id"
            " GROUP BY d.status"
        ).fetchall()
        out.update({f"deliveries_{status}": n for status, n in rows})
        out["deliveries"] = sum(n for _, n in rows)
    finally:
        conn.close()
    return out


def _probe(
    args: argparse.Namespace, daemon: Daemon, watch: StoreWatch, ids: Path
) -> tuple[dict[str, Any], float, float]:
    """Closed-loop burst, then the wait for its deliveries: (client summary, drain s, rate)."""
    probe = run_client(
        "_closed", daemon, "probe", ids, seconds=args.probe_seconds, concurrency=args.concurrency
    )
    acked = probe["acked_new"]
    _, done_at, _ = watch.wait_finished(acked, args.drain_timeout)
    if done_at is None:
        raise RuntimeError("the probe's deliveries did not finish within --drain-timeout")
    total = done_at - probe["started"]
    return probe, done_at - probe["ended"], acked / total if total > 0 else 0.0


def scenario_overload(args: argparse.Namespace, tmp: Path) -> Figures:
    fig = Figures(
        f"overload: {args.factor:g}x the sustainable rate for {args.overload_seconds:g} s"
    )
    directory = tmp / "overload"
    directory.mkdir()
    config = write_config(directory)
    daemon = Daemon(config, directory / "bridge.log")
    sampler = profiler = watch = None
    ids = [directory / "probe.ids", directory / "overload.ids"]
    try:
        daemon.start()
        sampler = RssSampler(daemon.pid).start()
        watch = StoreWatch(directory / "bench.db")
        probe, probe_drain, sustainable = _probe(args, daemon, watch, ids[0])
        rate = max(1.0, args.factor * sustainable)
        profiler = Profiler(args.profile, "overload", daemon.pid)
        cpu = CpuMeter(daemon.pid)
        backlog: list[tuple[float, int]] = []

        def sample_backlog() -> None:
            unrouted, counts = watch.progress()
            backlog.append((time.monotonic(), unrouted + sum(counts.get(s, 0) for s in UNFINISHED)))

        load = run_client("_open", daemon, "over", ids[1], during=sample_backlog,
                          seconds=args.overload_seconds, rate=rate, connections=args.connections,
                          max_inflight=args.max_inflight)  # fmt: skip
        cpu_figures = cpu.read(others=load["client_cpu_seconds"])
        fig.notes += [f"profile: {line}" for line in profiler.stop()]
        profiler = None
        load_end = time.monotonic()
        expected = probe["acked_new"] + load["acked_new"]
        routed_at, done_at, _ = watch.wait_finished(expected, args.drain_timeout)
        rss_load = rss_summary(sampler.between(load["started"], load["ended"]))
        hwm = daemon.hwm_mb()
    finally:
        if watch is not None:
            watch.close()
        if profiler is not None:
            profiler.stop()
        if sampler is not None:
            sampler.stop()
        code = daemon.stop()
    checked = verify_store(directory / "bench.db", ids)
    _overload_figures(fig, args, probe, probe_drain, sustainable, load)
    fig.row("timeline (per 10 s)", _timeline(load, backlog))
    rss_all = rss_summary([mb for _, mb in sampler.samples] if sampler else [])
    fig.row(
        "backlog drained",
        f"{done_at - load_end:.1f} s after the load stopped"
        if done_at
        else f"NOT within {args.drain_timeout:g} s",
    )
    fig.row(
        "daemon RSS",
        f"during load: first {rss_load['first']:.0f}, max {rss_load['max']:.0f}, last "
        f"{rss_load['last']:.0f} MB; whole run max {rss_all['max']:.0f} MB, "
        f"VmHWM {hwm or 0:.0f} MB",
    )
    cpu_row(fig, cpu_figures)
    fig.row("store check", ", ".join(f"{k} {v}" for k, v in checked.items()))
    unfinished = sum(checked.get(f"deliveries_{s}", 0) for s in UNFINISHED)
    delivered = sum(checked.get(f"deliveries_{s}", 0) for s in FINISHED_OK)
    all_done = (
        routed_at is not None
        and done_at is not None
        and checked["acked_missing"] == 0
        and checked["acked_unrouted"] == 0
        and checked["acked_without_delivery"] == 0
        and unfinished == 0
        and delivered == checked["deliveries"]
    )
    peak = max(rss_all["max"], hwm or 0.0)
    fig.goal("RSS max < 200 MB", f"{peak:.0f} MB", peak < 200)
    fig.goal(
        "every acknowledged event routed and its deliveries finished",
        f"{checked['acked']} acked, {checked['acked_missing']} missing, "
        f"{checked['acked_unrouted']} unrouted, "
        f"{delivered}/{checked['deliveries']} deliveries done",
        all_done,
    )
    if code not in (0, None):
        fig.notes.append(f"crm-bridge exited with {code}: {daemon.log_problems()}")
    fig.data = {"probe": probe, "sustainable": sustainable, "load": load, "store": checked,
                "rss_load": rss_load, "rss_all": rss_all, "hwm": hwm}  # fmt: skip
    return fig


def _timeline(load: dict[str, Any], backlog: list[tuple[float, int]]) -> str:
    """Per 10-second slot of the load: 202/s, 503/s and the backlog at the slot's end."""
    slots: dict[int, Counter[int]] = {}
    for slot, status, n in load["slots"]:
        slots.setdefault(slot, Counter())[status] += n
    parts = []
    for slot in sorted(slots):
        end = load["started"] + (slot + 1) * 10
        seen = [b for t, b in backlog if t <= end]
        parts.append(
            f"{slot * 10}-{slot * 10 + 10}s: {slots[slot][202] / 10:.0f}/s acked"
            + (f", {slots[slot][503] / 10:.0f}/s 503" if slots[slot][503] else "")
            + (f", backlog {seen[-1]}" if seen else "")
        )
    return "; ".join(parts)


def _overload_figures(
    fig: Figures,
    args: argparse.Namespace,
    probe: dict[str, Any],
    probe_drain: float,
    sustainable: float,
    load: dict[str, Any],
) -> None:
    statuses = load["statuses"]
    fig.row(
        "probe (closed loop)",
        f"{probe['acked_new']} acked in {probe['ended'] - probe['started']:.1f} s "
        f"({probe['rate']:.0f}/s, C={args.concurrency}); its deliveries done {probe_drain:.1f} s "
        "after it ended",
    )
    fig.row("sustainable rate", f"{sustainable:.0f} events/s (acked / (probe + drain time))")
    fig.row(
        "offered",
        f"{load['offered']} requests at {load['rate']:.0f}/s for {args.overload_seconds:g} s "
        f"(sent {load['sent']}, not sent by the client at its in-flight cap "
        f"{args.max_inflight}: {load['shed']})",
    )
    per_second = load["acked_new"] / max(load["elapsed"], 1e-6)
    fig.row("acknowledged (202)", f"{load['acked_new']} ({per_second:.0f}/s)")
    fig.row("503 (backpressure)", str(statuses.get("503", 0)))
    other = {k: v for k, v in statuses.items() if k not in ("202", "503")}
    fig.row("other answers / errors", f"{other or 'none'} / {load['errors'] or 'none'}")
    latency = (
        f"p50 {load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms, max {load['max_ms']:.0f} ms"
    )
    if load["first_503_s"] is not None:
        latency += f"; first 503 after {load['first_503_s']:.1f} s"
    fig.row("latency from scheduled send", latency)


# --------------------------------------------------------------------------- load clients


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    latencies: list[float] = field(default_factory=list)
    first_503: float | None = None
    started: float = field(default_factory=time.monotonic)
    # answers by 10-second slot of the run: (slot, status) -> count
    slots: Counter[tuple[int, int]] = field(default_factory=Counter)

    def record(self, status: int, raw: bytes, latency: float) -> None:
        self.statuses[status] += 1
        self.latencies.append(latency)
        now = time.monotonic()
        self.slots[(int((now - self.started) // 10), status)] += 1
        if status == 503 and self.first_503 is None:
            self.first_503 = now
        if status != 202:
            return
        try:
            answer = json.loads(raw)
        except ValueError:
            self.errors["202 without JSON"] += 1
            return
        if answer.get("duplicate"):
            self.duplicates += 1
        else:
            self.ids.append(str(answer["event_id"]))

    def summary(self, started: float, ended: float, ids_path: Path) -> dict[str, Any]:
        ids_path.write_text("\n".join(self.ids) + "\n")
        elapsed = ended - started
        return {
            "started": started,
            "ended": ended,
            "elapsed": elapsed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "acked_new": len(self.ids),
            "duplicates": self.duplicates,
            "rate": len(self.ids) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": percentile(sorted(self.latencies), 50) * 1000,
            "p99_ms": percentile(sorted(self.latencies), 99) * 1000,
            "max_ms": max(self.latencies, default=0.0) * 1000,
            "first_503_s": None if self.first_503 is None else self.first_503 - started,
            "client_cpu_seconds": sum(os.times()[:2]),
            "slots": [[slot, status, n] for (slot, status), n in sorted(self.slots.items())],
        }


async def _post(
    session: Any, args: argparse.Namespace, body: str, tally: Tally, scheduled: float
) -> None:
    import aiohttp

    headers = {"Content-Type": "application/json", "X-Webhook-Token": args.token}
    try:
        async with session.post(args.url, data=body.encode(), headers=headers) as resp:
            raw = await resp.read()
            tally.record(resp.status, raw, time.monotonic() - scheduled)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.errors[type(exc).__name__] += 1


async def _closed(args: argparse.Namespace) -> dict[str, Any]:
    """C workers, each posting the next body as soon as its previous answer came."""
    import aiohttp

    bodies, tally = Bodies(args.tag), Tally()
    counter = iter(range(10_000_000))
    started = tally.started = time.monotonic()
    deadline = started + args.seconds
    connector = aiohttp.TCPConnector(limit=int(args.concurrency))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def worker() -> None:
            while (now := time.monotonic()) < deadline:
                await _post(session, args, bodies.text(next(counter)), tally, now)

        await asyncio.gather(*(worker() for _ in range(int(args.concurrency))))
    return tally.summary(started, time.monotonic(), Path(args.ids))


async def _open(args: argparse.Namespace) -> dict[str, Any]:
    """Paced open loop: request i is due at start + i / rate, whatever the answers do.

    At most `max_inflight` requests are outstanding; a request due while the cap is reached is
    counted as shed (offered, never sent). Latency counts from the scheduled time.
    """
    import aiohttp

    bodies, tally = Bodies(args.tag), Tally()
    total = int(args.rate * args.seconds)
    tasks: set[asyncio.Task[None]] = set()
    sent = shed = 0
    connector = aiohttp.TCPConnector(limit=int(args.connections))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        started = tally.started = time.monotonic()
        hard_stop = started + args.seconds + 5
        i = 0
        while i < total and time.monotonic() < hard_stop:
            due = min(total, int((time.monotonic() - started) * args.rate) + 1)
            while i < due:
                if len(tasks) >= args.max_inflight:
                    shed += 1
                else:
                    body = bodies.text(i)
                    task = asyncio.create_task(
                        _post(session, args, body, tally, started + i / args.rate)
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                i += 1
            await asyncio.sleep(0.002)
        offered_end = time.monotonic()
        if tasks:
            await asyncio.wait(set(tasks), timeout=35)
        for task in tasks:
            task.cancel()
    summary = tally.summary(started, offered_end, Path(args.ids))
    summary.update(offered=total, sent=sent, shed=shed + (total - i), rate=args.rate)
    return summary


def _client_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="delivery.py client")
    for name in ("--url", "--tag", "--ids", "--token"):
        parser.add_argument(name, required=True)
    for name in ("--seconds", "--concurrency", "--rate", "--connections", "--max-inflight"):
        parser.add_argument(name, type=float, default=0.0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- main


def summary_table(figures: list[Figures]) -> bool:
    print("\n== summary ==")
    print(f"  {'scenario':<10} {'goal':<62} {'figure':<40} result")
    ok = True
    for fig in figures:
        name = fig.name.split(":", 1)[0]
        for label, figure, met in fig.goals:
            ok &= met
            print(f"  {name:<10} {label[:62]:<62} {figure[:40]:<40} {'met' if met else 'NOT met'}")
    return ok


SCENARIOS = {"ceiling": scenario_ceiling, "drain": scenario_drain, "overload": scenario_overload}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    group = parser.add_argument_group("ceiling")
    group.add_argument("--tier-max", type=int, default=100, help="emulator requests per window")
    group.add_argument(
        "--interval-ms", type=int, default=10000, help="emulator window (the connector's is 10 s)"
    )
    group.add_argument("--latency", type=float, default=0.1, help="emulator seconds per request")
    group.add_argument(
        "--share", type=float, default=1.0, help="connector rate_limit_share (its default: 0.8)"
    )
    group.add_argument(
        "--count-at",
        choices=["answer", "arrival"],
        default="answer",
        help="when the emulator counts a request in its window: as shipped (answer, after the "
        "latency) or on arrival (a variant)",
    )
    group.add_argument("--hubspot-concurrency", type=int, default=4, help="max_concurrency")
    group.add_argument("--bursts", type=int, default=5, help="bursts of requests to observe")
    group.add_argument("--contacts", type=int, default=0, help="queued (default: enough)")
    group = parser.add_argument_group("drain")
    group.add_argument("--backlog", type=int, default=100_000, help="deliveries to drain")
    group.add_argument(
        "--drain-timeout", type=float, default=180.0, help="seconds to wait for a drain"
    )
    group = parser.add_argument_group("overload")
    group.add_argument("--probe-seconds", type=float, default=6.0)
    group.add_argument("--concurrency", type=int, default=32, help="closed-loop probe workers")
    group.add_argument("--factor", type=float, default=2.0, help="x the sustainable rate")
    group.add_argument("--overload-seconds", type=float, default=60.0)
    group.add_argument("--connections", type=int, default=256, help="open-loop client's")
    group.add_argument("--max-inflight", type=int, default=2048, help="open-loop client's cap")
    parser.add_argument("--profile", help="directory for py-spy raw profiles of the daemon")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--keep", help="copy each scenario's directory (logs, store) here")
    args = parser.parse_args(argv)
    bounds = (
        1 <= args.tier_max <= 1000 and 100 <= args.interval_ms <= 60_000,
        0 <= args.latency <= 5 and 0 < args.share <= 1 and 3 <= args.bursts <= 12,
        1 <= args.hubspot_concurrency <= 64 and 0 <= args.contacts <= 1_000_000,
        1 <= args.backlog <= 1_000_000 and 1 <= args.drain_timeout <= 1800,
        0 < args.probe_seconds <= 120 and 1 <= args.concurrency <= 512,
        0 < args.factor <= 10 and 0 < args.overload_seconds <= 600,
        1 <= args.connections <= 2000 and 1 <= args.max_inflight <= 20_000,
    )
    if not all(bounds):
        parser.error("an argument is out of range (see --help)")
    return args


def orchestrate(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    print(
        f"crm-bridge delivery benchmark: {', '.join(names)}; {os.cpu_count()} CPUs; "
        f"python {sys.version.split()[0]}",
        flush=True,
    )
    figures = []
    with tempfile.TemporaryDirectory(prefix="crm-bridge-delivery-") as tmpdir:
        tmp = Path(tmpdir)
        for name in names:
            started = time.monotonic()
            try:
                fig = SCENARIOS[name](args, tmp)
            finally:
                if args.keep:
                    import shutil

                    with contextlib.suppress(OSError):
                        shutil.copytree(tmp / name, Path(args.keep) / name, dirs_exist_ok=True)
            fig.row("scenario wall time", f"{time.monotonic() - started:.0f} s")
            fig.print()
            figures.append(fig)
    ok = summary_table(figures)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {f.name: {"rows": f.rows, "goals": f.goals, "data": f.data} for f in figures},
                indent=2,
                default=str,
            )
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_closed"], ["_open"]):
        client = _closed if argv[0] == "_closed" else _open
        print(json.dumps(asyncio.run(client(_client_args(argv[1:])))))
        return 0
    try:
        return orchestrate(parse_args(argv))
    except (RuntimeError, OSError, subprocess.TimeoutExpired, sqlite3.Error) as exc:
        print(f"delivery benchmark failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
