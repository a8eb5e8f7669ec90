#!/usr/bin/env python
"""Ingest benchmark: crm-bridge against a bare aiohttp handler, same client, same payload.

    python bench/ingest.py [--requests N] [--concurrency C] [--duration S] [--rounds R]

Targets, each a separate process:

* bare: an aiohttp handler that reads the body, json.loads it and answers 202 with a small JSON
  body, storing nothing (this file, `_bare` mode); one process for the whole run;
* bridge: `crm-bridge serve --port 0` with a temporary config: SQLite store in a temp dir, the
  supersend source with a token sent in `X-Webhook-Token`, hubspot and salesforce without
  credentials (they run dry) and the rules of config.example.yaml, so rules are evaluated and
  deliveries stored and (dry-)delivered as in real use. A fresh daemon and store for each round,
  stopped (SIGTERM) when its round ends, so its delivery backlog never runs during a bare round.

Each measured round is a fresh load-generator process (this file, `_load` mode): one aiohttp
ClientSession with TCPConnector(limit=C), C workers each sending N/C requests (every body unique:
contact.email and contact.updatedAt vary, so nothing is de-duplicated), after an unmeasured
warm-up. Rounds interleave the targets in ABBA order (bare, bridge | bridge, bare | ...), and the
summary is the median over rounds. Before each segment the bench waits (a few seconds at most) for
the machine to be quiet, and it reports the CPU that other processes used during each round.

After each bridge round the daemon is stopped and its SQLite file opened: the number of stored
events must equal the number of unique payloads acknowledged with 202 (warm-ups included), and the
number of stored deliveries the number the 202 answers listed. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as `python bench/<name>.py`: the bench folder is on sys.path.
from procstat import cpu_seconds, machine_busy_seconds, percentile

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAYLOAD = ROOT / "tests" / "data" / "supersend-click.json"
EXAMPLE_CONFIG = ROOT / "config.example.yaml"
TOKEN = "bench-token-" + uuid.uuid4().hex[:12]
START_TIMEOUT = 30.0  # seconds a server gets to start listening
STOP_TIMEOUT = 40.0  # seconds a server gets to stop on SIGTERM before SIGKILL
IDLE_TIMEOUT = 5.0  # seconds the bench waits at most for the bare server to go idle

# Used only when tests/data/supersend-click.json or config.example.yaml cannot be read.
FALLBACK_PAYLOAD: dict[str, Any] = {
    "type": "click",
    "CampaignId": "d9ff359d-8d50-378b-989a-34100a0503c1",
    "contact": {
        "id": "345b2b81-b2cf-4879-bf46-73a33275e22b",
        "first_name": None,
        "last_name": None,
        "email": "andrew@xoxo.capital",
        "interest": "interested",
        "clicked": True,
        "appointment": False,
        "createdAt": "2023-01-26T04:41:10.639Z",
        "updatedAt": "2023-01-26T04:48:04.762Z",
        "Sender": {"id": "2744c004", "provider": "smtp", "email": "ap@supersend.io"},
    },
}
FALLBACK_RULES: list[dict[str, Any]] = [
    {
        "name": "interested-to-hubspot",
        "when": "type == 'interest' and contact.interest == 'interested'",
        "connector": "hubspot",
        "action": "upsert_contact",
        "fields": {
            "firstname": "{{ contact.first_name }}",
            "lastname": "{{ contact.last_name }}",
            "hs_lead_status": "OPEN",
        },
    },
    {
        "name": "interested-to-salesforce",
        "when": "type == 'interest' and contact.interest == 'interested'",
        "connector": "salesforce",
        "action": "upsert_lead",
        "fields": {"LastName": "{{ contact.last_name }}", "LeadSource": "Supersend"},
    },
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
    },
]


# --------------------------------------------------------------------------- bare server mode


async def _bare_serve(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        data = json.loads(await request.read())
        return web.json_response(
            {"event_id": uuid.uuid4().hex, "duplicate": False, "type": data.get("type")},
            status=202,
        )

    app = web.Application(client_max_size=256 * 1024)
    app.router.add_post("/webhooks/{source}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    line = {"action": "server.listening", "url": f"http://{host}:{bound}"}
    print(json.dumps(line), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# --------------------------------------------------------------------------- load generator mode


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def make_bodies(template: dict[str, Any], tag: str, count: int) -> list[bytes]:
    """`count` distinct bodies: the template with a unique contact.email and updatedAt each."""
    base = datetime(2024, 1, 1, tzinfo=UTC)
    out = []
    for i in range(count):
        data = copy.deepcopy(template)
        contact = data.setdefault("contact", {})
        contact["email"] = f"bench-{tag}-{i}@example.com"
        stamp = base + timedelta(milliseconds=i)
        contact["updatedAt"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out.append(json.dumps(data).encode())
    return out


@dataclass
class LoadStats:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    acked: int = 0  # answered 202
    acked_new: int = 0  # answered 202 and not flagged as a duplicate
    duplicates: int = 0
    deliveries: int = 0  # deliveries listed in the 202 answers
    listing: int = 0  # 202 answers that list their deliveries at all
    latencies: list[float] = field(default_factory=list)

    def record(self, status: int, raw: bytes, latency: float) -> None:
        self.statuses[status] += 1
        self.latencies.append(latency)
        if status != 202:
            return
        self.acked += 1
        try:
            answer = json.loads(raw)
        except ValueError:
            self.errors["202 without JSON"] += 1
            return
        if answer.get("duplicate"):
            self.duplicates += 1
        else:
            self.acked_new += 1
            if isinstance(answer.get("deliveries"), list):
                self.listing += 1
                self.deliveries += len(answer["deliveries"])


async def _send_all(
    session: Any,
    url: str,
    headers: dict[str, str],
    bodies: list[bytes],
    deadline: float,
    stats: LoadStats,
) -> None:
    import aiohttp

    for body in bodies:
        if time.perf_counter() > deadline:
            return
        stats.sent += 1
        start = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.errors[type(exc).__name__] += 1
            continue
        stats.record(status, raw, time.perf_counter() - start)


async def _phase(
    session: Any,
    url: str,
    headers: dict[str, str],
    bodies: list[bytes],
    workers: int,
    seconds: float,
) -> tuple[LoadStats, float]:
    stats = LoadStats()
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _send_all(session, url, headers, bodies[w::workers], deadline, stats)
            for w in range(workers)
        )
    )
    return stats, time.perf_counter() - start


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    template = json.loads(Path(args.payload).read_text())
    warm = make_bodies(template, f"{args.tag}w", args.warmup)
    bodies = make_bodies(template, f"{args.tag}m", args.requests)
    headers = {"Content-Type": "application/json", "X-Webhook-Token": args.token}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_stats, _ = await _phase(
            session, args.url, headers, warm, args.concurrency, args.warmup_seconds
        )
        server_cpu0, client_cpu0 = cpu_seconds(args.pid), own_cpu_seconds()
        machine0 = machine_busy_seconds()
        stats, elapsed = await _phase(
            session, args.url, headers, bodies, args.concurrency, args.duration
        )
        server_cpu = cpu_seconds(args.pid) - server_cpu0
        client_cpu = own_cpu_seconds() - client_cpu0
        machine = machine_busy_seconds() - machine0
    lat = sorted(stats.latencies)
    return {
        "requests": stats.sent,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "errors": dict(stats.errors) | {f"warm-up {k}": v for k, v in warm_stats.errors.items()},
        "elapsed": elapsed,
        "acked": stats.acked,
        "rate": stats.acked / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p90_ms": percentile(lat, 90) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": (lat[-1] if lat else 0.0) * 1000,
        "server_cpu": server_cpu / elapsed if elapsed > 0 else 0.0,
        "client_cpu": client_cpu / elapsed if elapsed > 0 else 0.0,
        # Busy CPU of everything else on the machine: other people's tests skew the figures.
        "other_cpu": max(0.0, machine - server_cpu - client_cpu) / elapsed if elapsed > 0 else 0.0,
        "warmup_requests": warm_stats.sent,
        "warmup_non_202": warm_stats.sent - warm_stats.acked,
        # Over warm-up and measured phase: what the bridge must have stored.
        "acked_new_total": stats.acked_new + warm_stats.acked_new,
        "duplicates_total": stats.duplicates + warm_stats.duplicates,
        "deliveries_total": stats.deliveries + warm_stats.deliveries,
        "deliveries_listed": stats.listing + warm_stats.listing > 0,
        "non_202_total": (stats.sent - stats.acked) + (warm_stats.sent - warm_stats.acked),
    }


# --------------------------------------------------------------------------- orchestration


class Server:
    """A server subprocess whose stderr goes to a file, found listening by its JSON log line."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            url = self._listening_url()
            if url:
                self.url = url
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{self.name} did not start listening:\n{tail}")

    def _listening_url(self) -> str:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"server.listening"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("action") == "server.listening":
                    return str(entry["url"])
        return ""

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


def wait_quiet(timeout: float, threshold: float = 0.3) -> float:
    """Wait until the whole machine is busy under `threshold` cores over 0.3 s; time waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = machine_busy_seconds()
        time.sleep(0.3)
        if (machine_busy_seconds() - before) / 0.3 < threshold:
            break
    return time.monotonic() - start


def wait_idle(pids: list[int], timeout: float = IDLE_TIMEOUT, threshold: float = 0.05) -> float:
    """Wait until every process uses under `threshold` of a core over 0.3 s; the time it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = [cpu_seconds(p) for p in pids]
        time.sleep(0.3)
        used = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
        if max(used) / 0.3 < threshold:
            return time.monotonic() - start
    return -1.0


def example_rules() -> tuple[list[dict[str, Any]], str]:
    import yaml

    try:
        rules = yaml.safe_load(EXAMPLE_CONFIG.read_text()).get("rules")
    except (OSError, yaml.YAMLError, AttributeError):
        rules = None
    if isinstance(rules, list) and rules:
        return rules, str(EXAMPLE_CONFIG.relative_to(ROOT))
    return FALLBACK_RULES, "built-in copy"


def write_bridge_config(directory: Path, rules: list[dict[str, Any]]) -> Path:
    import yaml

    config = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 20},
        "sources": {"supersend": {"kind": "supersend", "tokens": [TOKEN]}},
        "store": {"type": "sqlite", "path": str(directory / "bench.db")},
        # No credentials: both connectors run dry (log and store what they would write).
        "connectors": {"hubspot": {"type": "hubspot"}, "salesforce": {"type": "salesforce"}},
        "rules": rules,
        "logging": {"level": "INFO", "format": "json"},
    }
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bridge_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("crm-bridge")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "bridge"]
    return [*prefix, "serve", "--config", str(config), "--port", "0"]


def run_load(args: argparse.Namespace, server: Server, payload: Path, tag: str) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "_load",
        "--url", server.url + "/webhooks/supersend", "--pid", str(server.pid),
        "--payload", str(payload), "--token", TOKEN, "--tag", tag,
        "--requests", str(args.requests), "--concurrency", str(args.concurrency),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--warmup-seconds", str(args.warmup_seconds),
    ]  # fmt: skip
    limit = args.duration + args.warmup_seconds + 60
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def start_profiler(args: argparse.Namespace, pid: int, round_no: int) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    out = Path(args.profile)
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
    target = out.with_name(f"{out.stem}-r{round_no}{out.suffix}")
    cmd = [
        str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid), "--threads",
        "--nonblocking", "--rate", "100", "--format", fmt, "--output", str(target),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # let py-spy attach before the load starts
    return proc


def stop_profiler(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def store_counts(db: Path) -> dict[str, Any]:
    """What the stopped daemon's SQLite file holds (read-write: a left-over WAL is replayed)."""
    conn = sqlite3.connect(db)
    try:
        events = conn.execute("SELECT count(*), count(DISTINCT id) FROM events")
        total, distinct = events.fetchone()
        rows = conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
    finally:
        conn.close()
    return {"events": total, "distinct_keys": distinct, "deliveries": dict(rows)}


def bridge_round(
    args: argparse.Namespace, tmp: Path, rules: list[dict[str, Any]], tag: str, round_no: int
) -> dict[str, Any]:
    """One round against a fresh crm-bridge (new store), stopped afterwards and its file read."""
    directory = tmp / f"bridge-{round_no}"
    directory.mkdir()
    config = write_bridge_config(directory, rules)
    server = Server("crm-bridge", bridge_command(config), directory / "bridge.log")
    profiler = None
    try:
        server.start()
        if args.profile:
            profiler = start_profiler(args, server.pid, round_no)
        result = run_load(args, server, tmp / "payload.json", tag)
    finally:
        stop_profiler(profiler)
        code = server.stop()
        if args.keep_log:
            keep = Path(args.keep_log)
            target = keep.with_name(f"{keep.stem}-r{round_no}{keep.suffix}")
            target.write_bytes(server.log_path.read_bytes())
    result["exit_status"] = code
    result["store"] = store_counts(directory / "bench.db")
    if result["non_202_total"] or code != 0:
        result["log_errors"] = log_errors(server.log_path)
    return result


def log_errors(path: Path, keep: int = 3) -> list[str]:
    """The last error lines of a daemon's log (message and exception's last line)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            # The exception's own line: the last one of the traceback that is not indented.
            lines = str(entry.get("exception", "")).splitlines()
            last = [x for x in lines if x and not x[0].isspace()][-1:]
            text = " | ".join([str(entry.get("message", ""))[:200], *(x[:300] for x in last)])
            if text not in found:
                found.append(text)
    return found[-keep:]


def _measure(
    args: argparse.Namespace, tmp: Path, bare: Server, rules: list[dict[str, Any]], run_id: str
) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        order = ["bare", "bridge"] if r % 2 else ["bridge", "bare"]
        for target in order:
            wait_idle([bare.pid], timeout=IDLE_TIMEOUT)
            wait_quiet(args.quiet_wait)
            tag = f"{run_id}-{r}{target[:2]}"
            if target == "bare":
                result = run_load(args, bare, tmp / "payload.json", tag)
            else:
                result = bridge_round(args, tmp, rules, tag, r)
            result |= {"target": target, "round": r}
            rounds.append(result)
            print(
                f"  round {r} {target:<6} {result['rate']:8.0f} ev/s  "
                f"p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    return rounds


def summarise(rounds: list[dict[str, Any]], target: str) -> dict[str, float]:
    mine = [r for r in rounds if r["target"] == target]
    keys = ("rate", "p50_ms", "p99_ms", "server_cpu", "client_cpu", "other_cpu")
    return {k: statistics.median(r[k] for r in mine) for k in keys}


def verify(rounds: list[dict[str, Any]]) -> list[str]:
    """Problems found: errors, anything but 202 from the bridge, or stored != acknowledged."""
    problems = []
    for r in rounds:
        where = f"round {r['round']} {r['target']}"
        if r["errors"]:
            problems.append(f"{where}: errors {r['errors']}")
        if r["target"] != "bridge":
            continue
        store = r["store"]
        if r["non_202_total"]:
            problems.append(
                f"{where}: {r['non_202_total']} requests not answered 202 "
                f"({r['statuses']}, warm-up non-202: {r['warmup_non_202']})"
            )
        if r["duplicates_total"]:
            problems.append(f"{where}: {r['duplicates_total']} unique payloads called duplicates")
        if store["events"] != r["acked_new_total"]:
            problems.append(
                f"{where}: stored events {store['events']} != acknowledged unique "
                f"{r['acked_new_total']}"
            )
        if store["distinct_keys"] != store["events"]:
            problems.append(f"{where}: stored events do not all have distinct idempotency keys")
        stored = sum(store["deliveries"].values())
        if r["deliveries_listed"] and stored != r["deliveries_total"]:
            problems.append(
                f"{where}: stored deliveries {stored} != acknowledged {r['deliveries_total']}"
            )
        if r["exit_status"] != 0:
            problems.append(f"{where}: crm-bridge did not stop cleanly ({r['exit_status']})")
        problems.extend(f"{where}: crm-bridge logged: {e}" for e in r.get("log_errors", ()))
    return problems


def _round_line(r: dict[str, Any]) -> str:
    line = (
        f"{r['target']:<7}{r['round']:>6}{r['requests']:>7}{r['acked']:>7}"
        f"{r['elapsed']:>10.2f}{r['rate']:>9.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        f"{r['max_ms']:>9.1f}{r['server_cpu']:>8.0%} {r['client_cpu']:>8.0%} "
        f"{r['other_cpu']:>7.0%} "
    )
    if r["target"] == "bridge":
        store = r["store"]
        delivered = store["deliveries"].get("dry_run", 0) + store["deliveries"].get("done", 0)
        line += f"{store['events']:>8}{delivered:>8}/{sum(store['deliveries'].values())}"
    return line


def report(
    args: argparse.Namespace, rounds: list[dict[str, Any]], problems: list[str], rules_origin: str
) -> None:
    print(
        f"\ncrm-bridge ingest benchmark: {args.requests} requests/round (cap {args.duration:g} s), "
        f"concurrency {args.concurrency}, warm-up {args.warmup} requests, {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs; rules from {rules_origin}"
    )
    print(
        "order: interleaved ABBA (bare, bridge | bridge, bare | ...), a fresh crm-bridge and store"
        " per round;\nsummary = median of rounds. CPU: share of one core during the measured phase"
        " (server: all threads;\nother: the rest of the machine). stored: events in the store"
        " after stop (warm-up included);\ndelivered: deliveries done (dry run) / stored.\n"
    )
    head = ("target", "round", "sent", "202", "elapsed s", "ev/s", "p50 ms", "p99 ms", "max ms",
            "srv CPU", "cli CPU", "other", "stored", "delivered")  # fmt: skip
    print("{:<7}{:>6}{:>7}{:>7}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>8}{:>8}{:>12}".format(*head))
    for r in rounds:
        print(_round_line(r))
    bare, bridge = summarise(rounds, "bare"), summarise(rounds, "bridge")
    print(f"\n{'median':<12}{'bare':>12}{'crm-bridge':>12}{'bridge/bare':>13}   range over rounds")
    for key, label, fmt in (
        ("rate", "events/s", "{:>12.0f}"),
        ("p50_ms", "p50 ms", "{:>12.2f}"),
        ("p99_ms", "p99 ms", "{:>12.2f}"),
    ):
        ratio = bridge[key] / bare[key] if bare[key] else float("nan")
        digits = 0 if key == "rate" else 1
        spread = "; ".join(
            f"{t} {min(r[key] for r in rounds if r['target'] == t):.{digits}f}"
            f"-{max(r[key] for r in rounds if r['target'] == t):.{digits}f}"
            for t in ("bare", "bridge")
        )
        print(
            f"{label:<12}" + fmt.format(bare[key]) + fmt.format(bridge[key]) + f"{ratio:>12.2f}x"
            f"   {spread}"
        )
    share = bridge["rate"] / bare["rate"] if bare["rate"] else 0.0
    verdict = "met" if share >= 0.60 else "NOT met"
    print(f"\nthroughput goal (crm-bridge >= 60% of bare): {share:.1%}, {verdict}")
    busiest = max(r["other_cpu"] for r in rounds)
    if busiest > 0.25:
        print(
            f"note: other processes used up to {busiest:.0%} of a core during a round "
            "(column `other`): figures are noisy, run again on a quiet machine"
        )
    if bare["client_cpu"] > 0.9:
        print("note: the client used about a full core against bare: bare is client-bound here")
    print("verification (all 202, stored events == acknowledged unique payloads): ", end="")
    print("OK" if not problems else "FAILED")
    for p in problems:
        print(f"  - {p}")
    if args.profile:
        print(f"\ncrm-bridge profiled with py-spy into {args.profile} (per round; figures skewed)")
        out = Path(args.profile)
        if out.suffix not in (".svg", ".json"):
            digest_profiles(sorted(out.parent.glob(f"{out.stem}-r*{out.suffix}")))


def digest_profiles(paths: list[Path], top: int = 25) -> None:
    """The functions most often on the stack, over py-spy raw (collapsed) profiles."""
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            n = int(count)
            total += n
            threads[frames[0].split(": ", 1)[-1]] += n
            # "func (file:line)" -> "func (file)", each function counted once per stack
            for name in {f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in frames[1:]}:
                inclusive[name] += n
    if not total:
        return
    print(
        f"profile digest: {total} samples; by thread: "
        + ", ".join(f"{name} {n / total:.0%}" for name, n in threads.most_common())
    )
    skip = ("asyncio/", "threading.py", "runners.py", "<module>", "bridge/cli.py")
    shown = [(k, v) for k, v in inclusive.most_common() if not any(x in k for x in skip)]
    for name, n in shown[:top]:
        print(f"  {n / total:6.1%}  {name}")


def orchestrate(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:6]
    rules, rules_origin = example_rules()
    with tempfile.TemporaryDirectory(prefix="crm-bridge-bench-") as tmpdir:
        tmp = Path(tmpdir)
        payload = tmp / "payload.json"
        if args.payload.exists():
            payload.write_bytes(args.payload.read_bytes())
        else:
            payload.write_text(json.dumps(FALLBACK_PAYLOAD))
        bare_cmd = [sys.executable, str(Path(__file__).resolve()), "_bare"]
        bare = Server("bare handler", bare_cmd, tmp / "bare.log")
        try:
            bare.start()
            rounds = _measure(args, tmp, bare, rules, run_id)
        finally:
            bare.stop()
    problems = verify(rounds)
    report(args, rounds, problems, rules_origin)
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))
    return 1 if problems else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="requests per measured round")
    parser.add_argument("--concurrency", type=int, default=32, help="connections and workers")
    parser.add_argument(
        "--duration", type=float, default=8.0, help="time cap of one measured round, seconds"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each: bare and bridge)")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured requests per round")
    parser.add_argument("--warmup-seconds", type=float, default=3.0, help="warm-up time cap")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=3.0,
        help="seconds to wait at most, before each segment, for other load on the machine to end",
    )
    parser.add_argument("--payload", type=Path, default=DEFAULT_PAYLOAD, help="template body")
    parser.add_argument(
        "--profile",
        help="record each crm-bridge round with py-spy: FILE gets -rN (.svg, .json, else raw)",
    )
    parser.add_argument("--json", help="also write the per-round figures to this file")
    parser.add_argument("--keep-log", help="copy crm-bridge's log of each round to FILE-rN")
    args = parser.parse_args(argv)
    if not (1 <= args.concurrency <= 1000 and 1 <= args.requests <= 1_000_000):
        parser.error("--concurrency must be 1..1000 and --requests 1..1000000")
    if not (
        0 < args.duration <= 600
        and 1 <= args.rounds <= 20
        and 0 <= args.warmup_seconds <= 60
        and 0 <= args.quiet_wait <= 60
    ):
        parser.error("--duration: (0, 600]; --rounds: 1..20; --warmup-seconds, --quiet-wait: 0..60")
    args.warmup = max(0, min(args.warmup, 100_000))
    return args


def _load_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ingest.py _load")
    for name in ("--url", "--payload", "--token", "--tag"):
        parser.add_argument(name, required=True)
    for name in ("--pid", "--requests", "--concurrency", "--warmup"):
        parser.add_argument(name, type=int, required=True)
    for name in ("--duration", "--warmup-seconds"):
        parser.add_argument(name, type=float, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_bare"]:
        asyncio.run(_bare_serve(int(argv[1]) if len(argv) > 1 else 0))
        return 0
    if argv[:1] == ["_load"]:
        print(json.dumps(asyncio.run(_load(_load_args(argv[1:])))))
        return 0
    try:
        return orchestrate(parse_args(argv))
    except (RuntimeError, subprocess.TimeoutExpired, sqlite3.Error) as exc:
        print(f"ingest benchmark failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
