#!/usr/bin/env python
"""Scale-out benchmark: one SQLite daemon against one, two and three PostgreSQL daemons.

    python bench/scale.py [--requests N] [--concurrency C] [--drain D] [--targets ...]

For each target, in one run and with the same payloads, client and rules (config.example.yaml's
`interested-click-to-hubspot`: one dry-run HubSpot upsert per event):

* ingest: a fresh store; N `crm-bridge serve` processes on 127.0.0.1 (a PostgreSQL target gets a
  database of its own on the local server, dropped afterwards); one aiohttp client sends
  `--requests` distinct webhooks over C connections, round-robin across the instances (as a load
  balancer would), with routing and delivery running as in real use: acknowledgements per second.
* drain: the daemons stopped, `--drain` events stored with `crm-bridge backfill`, then the N
  daemons started together: deliveries finished per second, measured between 10% and 90% of the
  backlog (start-up left out), read from the store.

It then prints one line per target with both figures and their ratios to one SQLite instance and
to one PostgreSQL instance, and checks that every acknowledged event was stored once and every
delivery finished. Bounded: every wait has a timeout; nothing listens beyond 127.0.0.1.
Exit status 0 when the checks pass, 1 when one fails, 2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as `python bench/scale.py`: the bench folder is on sys.path.
from delivery import RULES, TOKEN, Bodies, Daemon, backfill, write_contacts
from procstat import cpu_seconds, machine_busy_seconds

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
DRAIN_TIMEOUT = 300.0  # seconds a drain may take at most
INGEST_TIMEOUT = 300.0
UNFINISHED = ("pending", "in_flight")


@dataclass
class Result:
    target: str
    instances: int
    acks_per_s: float = 0.0
    ingest_errors: int = 0
    daemon_cpu_ms: float = 0.0  # the instances' CPU per acknowledged event, ingest phase
    machine_busy: float = 0.0  # cores busy on the machine during the ingest phase (of os.cpu_count)
    delivered_per_s: float = 0.0
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- stores


class Store:
    """One target's store: a SQLite file, or a PostgreSQL database of its own."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory
        self.db = directory / "bench.db"
        self.name = f"crm_bridge_bench_{secrets.token_hex(4)}"
        self.url = f"{PG_SERVER}/{self.name}"

    def block(self, pool_max: int) -> dict[str, Any]:
        if self.kind == "sqlite":
            return {"type": "sqlite", "path": str(self.db)}
        return {"url": self.url, "pool_min": 2, "pool_max": pool_max}

    def create(self) -> None:
        if self.kind == "postgres":
            _pg(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        if self.kind == "postgres":
            _pg(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        else:
            for path in self.directory.glob("bench.db*"):
                path.unlink()

    def progress(self) -> tuple[int, int, int]:
        """(events stored, events not routed, deliveries finished) and unfinished ones."""
        events, unrouted, finished, waiting = self._read()
        return events, unrouted + waiting, finished

    def _read(self) -> tuple[int, int, int, int]:
        sql = (
            "SELECT (SELECT count(*) FROM events), "
            "(SELECT count(*) FROM events WHERE routed_at IS NULL), "
            "(SELECT count(*) FROM deliveries WHERE status NOT IN ('pending', 'in_flight')), "
            "(SELECT count(*) FROM deliveries WHERE status IN ('pending', 'in_flight'))"
        )
        if self.kind == "sqlite":
            with contextlib.closing(
                sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            ) as conn:
                row = conn.execute(sql).fetchone()
        else:
            row = asyncio.run(_pg_fetch(self.url, sql))
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])


async def _pg_fetch(url: str, sql: str) -> tuple[Any, ...]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return tuple(await conn.fetchrow(sql))
    finally:
        await conn.close()


def _pg(sql: str) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def write_config(directory: Path, store: Store, pool_max: int) -> Path:
    import yaml

    config = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 20},
        "sources": {"supersend": {"kind": "supersend", "tokens": [TOKEN]}},
        "store": store.block(pool_max),
        "connectors": {"hubspot": {"type": "hubspot"}, "salesforce": {"type": "salesforce"}},
        "rules": RULES,
        "logging": {"level": "INFO", "format": "json"},
    }
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- phases


async def _post_all(urls: list[str], bodies: list[str], concurrency: int) -> tuple[int, int, float]:
    """(acknowledged, failed, seconds): `bodies` round-robin over `urls`, C at a time."""
    import aiohttp

    headers = {"Content-Type": "application/json", "X-Webhook-Token": TOKEN}
    acked = failed = 0
    queue = list(enumerate(bodies))
    queue.reverse()
    deadline = time.monotonic() + INGEST_TIMEOUT

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal acked, failed
        while queue and time.monotonic() < deadline:
            i, body = queue.pop()
            url = urls[i % len(urls)] + "/webhooks/supersend"
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 202:
                        acked += 1
                    else:
                        failed += 1
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return acked, failed, time.perf_counter() - started


def start_daemons(config: Path, directory: Path, n: int, tag: str) -> list[Daemon]:
    """N daemons started at the same time (each waits for its own "listening" line)."""
    from concurrent.futures import ThreadPoolExecutor

    daemons = [Daemon(config, directory / f"{tag}-{i}.log") for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(d.start) for d in daemons]
    failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        for daemon in daemons:
            daemon.stop()
        raise RuntimeError(f"{len(failures)} daemon(s) did not start: {failures[0]}")
    return daemons


def wait_drained(store: Store, timeout: float) -> list[tuple[float, int]]:
    """Samples (time, deliveries finished) until nothing waits; bounded by `timeout`."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, waiting, finished = store.progress()
        samples.append((time.monotonic(), finished))
        if waiting == 0 and finished > 0:
            return samples
        time.sleep(0.1)
    raise TimeoutError(f"the backlog did not drain within {timeout:.0f}s")


def rate_between(samples: list[tuple[float, int]], low: float, high: float) -> float:
    """Deliveries per second between `low` and `high` fractions of the final count."""
    total = samples[-1][1]
    first = next(s for s in samples if s[1] >= total * low)
    last = next(s for s in samples if s[1] >= total * high)
    if last[0] <= first[0]:
        return 0.0
    return (last[1] - first[1]) / (last[0] - first[0])


def run_target(args: argparse.Namespace, kind: str, n: int, tmp: Path) -> Result:
    result = Result(kind, n)
    directory = tmp / f"{kind}-{n}"
    directory.mkdir()
    store = Store(kind, directory)
    config = write_config(directory, store, args.pool_max)
    tag = f"{kind}{n}-{secrets.token_hex(3)}"
    bodies = Bodies(tag)
    texts = [bodies.text(i) for i in range(args.requests)]
    # Ingest.
    store.create()
    try:
        daemons = start_daemons(config, directory, n, "ingest")
        try:
            cpu_before = sum(cpu_seconds(d.pid) for d in daemons)
            busy_before = machine_busy_seconds()
            acked, failed, seconds = asyncio.run(
                _post_all([d.url for d in daemons], texts, args.concurrency)
            )
            result.daemon_cpu_ms = (
                1000 * (sum(cpu_seconds(d.pid) for d in daemons) - cpu_before) / max(acked, 1)
            )
            result.machine_busy = (machine_busy_seconds() - busy_before) / seconds
            result.acks_per_s = acked / seconds
            result.ingest_errors = failed
            wait_drained(store, DRAIN_TIMEOUT)
        finally:
            for daemon in daemons:
                daemon.stop()
        events, _, finished = store.progress()
        if events != acked or finished != acked:
            result.problems.append(
                f"ingest: {acked} acknowledged, {events} events stored, {finished} delivered"
            )
        # Drain: a backlog stored while no daemon runs, then N daemons at once.
        contacts = directory / "drain.jsonl"
        write_contacts(contacts, args.drain, tag + "-drain")
        backfill(config, contacts)
        daemons = start_daemons(config, directory, n, "drain")
        try:
            samples = wait_drained(store, DRAIN_TIMEOUT)
        finally:
            for daemon in daemons:
                daemon.stop()
        result.delivered_per_s = rate_between(samples, 0.1, 0.9)
        events, _, finished = store.progress()
        if finished != acked + args.drain:
            result.problems.append(
                f"drain: {acked + args.drain} deliveries expected, {finished} finished"
            )
        for daemon in daemons:
            result.problems += [f"log: {m}" for m in daemon.log_problems()]
    finally:
        store.drop()
    return result


# --------------------------------------------------------------------------- report


def report(results: list[Result]) -> bool:
    base = results[0]
    pg1 = next((r for r in results if r.target == "postgres" and r.instances == 1), None)

    def ratio(value: float, of: float) -> str:
        return f"{value / of:.2f}x" if of else "-"

    print()
    print(
        f"{'target':<14}{'acks/s':>10}{'vs sqlite':>11}{'vs pg x1':>10}"
        f"{'delivered/s':>13}{'vs sqlite':>11}{'vs pg x1':>10}"
        f"{'cpu ms/ack':>12}{'cores busy':>12}"
    )
    for r in results:
        name = f"{r.target} x{r.instances}"
        print(
            f"{name:<14}{r.acks_per_s:>10,.0f}{ratio(r.acks_per_s, base.acks_per_s):>11}"
            f"{ratio(r.acks_per_s, pg1.acks_per_s) if pg1 else '-':>10}"
            f"{r.delivered_per_s:>13,.0f}{ratio(r.delivered_per_s, base.delivered_per_s):>11}"
            f"{ratio(r.delivered_per_s, pg1.delivered_per_s) if pg1 else '-':>10}"
            f"{r.daemon_cpu_ms:>12.2f}{r.machine_busy:>8.2f}/{os.cpu_count()}"
        )
    print(
        "cpu ms/ack: the instances' CPU per acknowledged event while ingesting (routing and "
        "delivery included); cores busy: the whole machine's, PostgreSQL, client and others too"
    )
    ok = True
    for r in results:
        for problem in r.problems:
            ok = False
            print(f"CHECK FAILED {r.target} x{r.instances}: {problem}")
        if r.ingest_errors:
            ok = False
            print(f"CHECK FAILED {r.target} x{r.instances}: {r.ingest_errors} requests not 202")
    print("checks: " + ("every acknowledged event stored once and delivered" if ok else "FAILED"))
    return ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="webhooks per ingest phase")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--drain", type=int, default=20000, help="events in the drain backlog")
    parser.add_argument("--pool-max", type=int, default=10, help="store.pool_max per instance")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["sqlite:1", "postgres:1", "postgres:2", "postgres:3"],
        help="kind:instances, the first is the base of the ratios",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="crm-bridge-scale-") as tmp:
            for target in args.targets:
                kind, _, count = target.partition(":")
                print(f"{kind} x{count or 1} ...", flush=True)
                results.append(run_target(args, kind, int(count or 1), Path(tmp)))
                r = results[-1]
                print(
                    f"  {r.acks_per_s:,.0f} acks/s, {r.delivered_per_s:,.0f} delivered/s",
                    flush=True,
                )
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
