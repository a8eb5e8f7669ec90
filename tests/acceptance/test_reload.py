"""Hot reload under a steady stream of events: nothing lost, nothing evaluated half-way."""

from __future__ import annotations

import signal
import threading
from datetime import datetime

from tests.support import config_yaml, sample, wait_for

# Version 1: one rule. Version 2: two rules. An event routed half with one set and half with
# the other would show one v1 delivery beside a v2 one, or a lone v2 delivery.
V1 = """
  - name: v1
    when: type == 'click'
    connector: hubspot
    action: upsert_contact
    fields:
      version: v1
"""
V2 = """
  - name: v2-hubspot
    when: type == 'click'
    connector: hubspot
    action: upsert_contact
    fields:
      version: v2
  - name: v2-salesforce
    when: type == 'click'
    connector: salesforce
    action: update_status
    fields:
      Status: {value: v2, policy: monotonic, order: [v1, v2]}
"""
BROKEN = V2.replace("connector: salesforce", "connector: salesfroce")
# Deliveries wait in the queue a little, so that many made before a reload are sent after it.
HOLD = "coalesce_window: 1.0"


def test_reloads_under_a_stream_of_events_lose_nothing(tmp_path, daemon_factory):
    db = tmp_path / "bridge.db"
    path = tmp_path / "config.yaml"

    def write(rules: str) -> None:
        path.write_text(config_yaml(db, rules=rules, delivery=HOLD))  # dry-run connectors

    write(V1)
    daemon = daemon_factory(path)
    acknowledged: list[str] = []
    failures: list[str] = []
    done = threading.Event()

    def stream() -> None:
        i = 0
        while not done.is_set():
            response = daemon.post(sample(email=f"c{i}@example.com", first_name=f"C{i}"))
            if response.status_code == 202:
                acknowledged.append(response.json()["event_id"])
            else:
                failures.append(f"{response.status_code} {response.text}")
            i += 1

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        # Given a steady stream, the rules are swapped ten times, and a broken file once
        versions = [V2, V1, V2, BROKEN, V1, V2, V1, V2, V1, V2, V1]
        reloaded = 0
        for n, rules in enumerate(versions):
            wait_for(lambda n=n: len(acknowledged) >= 20 * (n + 1), timeout=60)
            write(rules)
            daemon.proc.send_signal(signal.SIGHUP)
            if rules is BROKEN:
                wait_for(lambda: daemon.actions("config.reload_failed"))
            else:
                reloaded += 1
                wait_for(lambda r=reloaded: len(daemon.actions("config.reloaded")) == r)
        wait_for(lambda: len(acknowledged) >= 20 * (len(versions) + 1), timeout=60)
    finally:
        done.set()
        sender.join(60)

    # Then every acknowledged event was routed, by one rule set whole, and delivered
    assert failures == []
    assert len(acknowledged) == len(set(acknowledged)) >= 240
    seen: dict[tuple[str, ...], int] = {}
    reloads = [
        datetime.fromisoformat(r["ts"]).timestamp() for r in daemon.actions("config.reloaded")
    ]
    crossed = 0  # deliveries made before a reload and sent after it
    for event_id in acknowledged:
        deliveries = wait_for(lambda e=event_id: daemon.settled(e), timeout=60)
        rules = tuple(d["rule"] for d in deliveries)
        assert rules in (("v1",), ("v2-hubspot", "v2-salesforce")), (event_id, deliveries)
        seen[rules] = seen.get(rules, 0) + 1
        for d in deliveries:
            # A delivery queued before a reload keeps the operation it was made with.
            assert d["status"] == "dry_run", d
            written = d["result"]["detail"]["would_write"]["fields"]
            assert written == d["operation"]["fields"]
            assert set(written.values()) == {"v1" if d["rule"] == "v1" else "v2"}
            made, sent = (
                datetime.fromisoformat(d[k]).timestamp() for k in ("created_at", "updated_at")
            )
            crossed += any(made < t < sent for t in reloads)
    assert set(seen) == {("v1",), ("v2-hubspot", "v2-salesforce")}
    assert crossed > 0, crossed
    (failed,) = daemon.actions("config.reload_failed")
    assert "no connector named 'salesfroce' (did you mean `salesforce`?)" in failed["problems"][0]
    assert len(daemon.actions("config.reloaded")) == len(versions) - 1
    assert daemon.stop() == 0
