#!/usr/bin/env python
"""Rule evaluation cost per event, with 1, 10 and 100 rules, as a share of the ingest path's.

    python bench/rules.py [--requests N] [--events M] [--rounds R]

Both are measured in the same run, on the same machine, as CPU time:

* ingest: `crm-bridge serve --port 0` with no rules (dry-run connectors, SQLite store in a temp
  dir) receives N webhooks (every body unique) from a client in this process, C at a time. The
  ingest path's cost per event is the daemon's CPU time (user + system, all threads, from /proc)
  from the first request until every event is stored and routed, divided by N: HTTP, payload
  validation, the durable commit, the router's bookkeeping and its log line, without rules.
* rules: in this process, `Router.evaluate` (what the router runs per event: the stored body
  parsed, the context built, every rule evaluated, the deliveries made) over M stored events,
  the six event types and the interest/appointment values mixed, from sixteen platform teams.
  Rule sets: 1 rule (the documented use case), 10 (the first ten of config.example.yaml) and 100
  (the example's rules, then team-routing rules: half name their event type at the top, so
  the engine skips them for other types; the others test the email domain with a regex, the
  appointment flag or `custom` fields). The figure is the least of R rounds of process time.

Prints, side by side, per event: the ingest path's cost; for each rule set the router's whole
evaluation (body parsed, context built, rules, deliveries made) and the same less the router
with no rules (the rules alone), each also as a share of ingest; the goal is checked on the
whole evaluation.
Bounded: about 30 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as `python bench/rules.py`: the bench folder is on sys.path, the project root is not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ingest
from procstat import cpu_seconds

from bridge.config import RuleConfig, load_config
from bridge.models import StoredEvent
from bridge.router import Router
from bridge.rules import RuleSet

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = json.loads((ROOT / "tests" / "data" / "supersend-click.json").read_text())
TYPES = ("open", "click", "reply", "bounce", "interest", "appointment")
INTERESTS = ("interested", "not_interested", "maybe", None)
TEAMS = [f"team-{i:02d}" for i in range(16)]
GOAL = 0.05  # at 10 rules


def events(count: int, seed: int = 7) -> list[StoredEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        data = json.loads(json.dumps(SAMPLE))
        data["type"] = TYPES[i % len(TYPES)]
        team = rng.choice(TEAMS)
        data["contact"].update(
            email=f"c{i}@{team}.example.com",
            first_name=f"First{i}",
            last_name=f"Last{i}",
            company_name="Acme",
            interest=rng.choice(INTERESTS),
            appointment=rng.random() < 0.3,
            TeamId=team,
            custom={"plan": rng.choice(["free", "pro"]), "seats": str(rng.randint(1, 50))},
        )
        out.append(
            StoredEvent(
                id=f"e{i}",
                source="supersend",
                body=json.dumps(data),
                received_at=1_700_000_000.0 + i,
                sort_at=1_700_000_000.0 + i,
            )
        )
    return out


def team_rule(i: int) -> dict[str, Any]:
    team = TEAMS[i % len(TEAMS)]
    kind = i % 4
    connector = "hubspot" if i % 2 else "salesforce"
    base: dict[str, Any] = {"name": f"team-rule-{i}", "connector": connector}
    if kind == 0:
        when = f"type == 'interest' and contact.TeamId == '{team}' and contact.interest"
        fields = {
            "hs_lead_status": {
                "value": "{{ contact.interest }}",
                "map": {"interested": "OPEN", "not_interested": "UNQUALIFIED"},
                "policy": "monotonic",
                "order": ["NEW", "OPEN", "IN_PROGRESS", "CONNECTED", "UNQUALIFIED"],
            },
            "firstname": "{{ contact.first_name | trim | title }}",
        }
        return base | {"when": when, "action": "upsert_contact", "fields": fields}
    if kind == 1:
        when = f"type in ('reply', 'appointment') and contact.TeamId == '{team}'"
        return base | {
            "when": when,
            "action": "log_activity",
            "activity": {"subject": "{{ type | title }} in campaign {{ CampaignId }}"},
        }
    if kind == 2:
        when = f"contact.email is search('@{team}\\.example') and contact.appointment"
        fields = {"Status": {"value": "Working - Contacted", "policy": "if_empty"}}
        return base | {"when": when, "action": "update_status", "fields": fields}
    when = f"contact.custom.plan == 'pro' and contact.TeamId == '{team}' and source == 'supersend'"
    fields = {
        "Seats__c": {"value": "{{ contact.custom.seats }}", "type": "integer"},
        "Title": "{{ contact.title | default('', true) | truncate_to(128) }}",
        "LastSeen__c": "{{ event.received_at | datetime }}",
    }
    return base | {"when": when, "action": "upsert_lead", "fields": fields}


def rule_sets() -> dict[int, RuleSet]:
    example = load_config(ROOT / "config.example.yaml").rules
    generated = [RuleConfig.model_validate(team_rule(i)) for i in range(100 - len(example))]
    documented = next(r for r in example if r.name == "interested-to-hubspot")
    return {
        1: RuleSet([documented]),
        10: RuleSet(example[:10]),
        100: RuleSet(example + generated),
    }


def evaluation_cost(ruleset: RuleSet, stored: list[StoredEvent], rounds: int) -> tuple[float, int]:
    """The least process seconds per event over the rounds (the run least disturbed by other
    processes, as `timeit` advises), and the deliveries made per pass."""
    samples = []
    made = 0
    for _ in range(rounds):
        start = time.process_time()
        made = sum(len(Router.evaluate(ruleset, e).deliveries) for e in stored)
        samples.append((time.process_time() - start) / len(stored))
    return min(samples), made


async def _post_all(url: str, bodies: list[bytes], concurrency: int) -> int:
    import aiohttp

    headers = {"Content-Type": "application/json", "X-Webhook-Token": ingest.TOKEN}
    queue = list(reversed(bodies))
    acked = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal acked
        while queue:
            body = queue.pop()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                acked += response.status == 202

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return acked


def unrouted(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE routed_at IS NULL").fetchone()
    return int(row[0])


def ingest_cost(requests: int, concurrency: int) -> tuple[float, int]:
    """The daemon's CPU seconds per event, over `requests` webhooks, rules left out."""
    with tempfile.TemporaryDirectory(prefix="crm-bridge-rules-bench-") as tmp:
        directory = Path(tmp)
        config = ingest.write_bridge_config(directory, [])
        server = ingest.Server("crm-bridge", ingest.bridge_command(config), directory / "log")
        server.start()
        try:
            url = server.url + "/webhooks/supersend"
            warmup = ingest.make_bodies(SAMPLE, "warm", 500)
            asyncio.run(_post_all(url, warmup, concurrency))
            bodies = ingest.make_bodies(SAMPLE, "run", requests)
            db = directory / "bench.db"
            deadline = time.monotonic() + 30
            while unrouted(db) and time.monotonic() < deadline:
                time.sleep(0.05)
            before = cpu_seconds(server.pid)
            acked = asyncio.run(_post_all(url, bodies, concurrency))
            deadline = time.monotonic() + 60
            while unrouted(db) and time.monotonic() < deadline:
                time.sleep(0.02)
            spent = cpu_seconds(server.pid) - before
        finally:
            server.stop()
    return spent / max(acked, 1), acked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="webhooks for ingest (5000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--events", type=int, default=3000, help="events per evaluation pass")
    parser.add_argument("--rounds", type=int, default=5, help="evaluation passes per rule set")
    args = parser.parse_args(argv)

    per_event_ingest, acked = ingest_cost(args.requests, args.concurrency)
    stored = events(args.events)
    baseline, _ = evaluation_cost(RuleSet([]), stored, args.rounds)
    rows = []
    for count, ruleset in rule_sets().items():
        cost, made = evaluation_cost(ruleset, stored, args.rounds)
        rows.append((count, cost, made))

    print(f"ingest path (crm-bridge serve, no rules): {per_event_ingest * 1e6:7.1f} us CPU/event"
          f"  ({acked} webhooks acknowledged)")  # fmt: skip
    print(f"router with no rules (parse + context):   {baseline * 1e6:7.1f} us CPU/event")
    print()
    print(f"{'rules':>5}  {'router us/event':>15}  {'of ingest':>9}  {'rules alone us/event':>20}"
          f"  {'of ingest':>9}  {'deliveries/event':>16}")  # fmt: skip
    for count, cost, made in rows:
        alone = cost - baseline
        print(f"{count:>5}  {cost * 1e6:>15.1f}  {cost / per_event_ingest:>9.1%}"
              f"  {alone * 1e6:>20.1f}  {alone / per_event_ingest:>9.1%}"
              f"  {made / len(stored):>16.2f}")  # fmt: skip
    ten = next(cost for count, cost, _ in rows if count == 10) / per_event_ingest
    verdict = "met" if ten < GOAL else "NOT met"
    print(f"\ngoal: under {GOAL:.0%} of ingest at 10 rules: {verdict} ({ten:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
