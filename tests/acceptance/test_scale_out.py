"""Three `crm-bridge serve` processes on one PostgreSQL database behind a round-robin "load
balancer", one of them killed with SIGKILL mid-run: the CRM ends with one record per email
holding its latest values, and every activity once."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import requests

from tests.postgres import store_yaml
from tests.support import config_yaml, hubspot_settings, sample, wait_for

pytestmark = pytest.mark.postgres

CONTACTS = 12
UPDATES = 5  # per contact, each newer than the last; a reply comes in the middle
RULES = """
  - name: interested-to-hubspot
    when: type in ('interest', 'click') and contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
      hs_lead_status: OPEN
  - name: reply-note
    when: type == 'reply'
    connector: hubspot
    action: log_activity
    activity:
      kind: note
      subject: "Replied"
      body: "{{ contact.email }} replied"
"""


def events() -> list[dict]:
    """Every contact's updates, interleaved across contacts as a platform would send them."""
    out = []
    for n in range(UPDATES):
        for c in range(CONTACTS):
            stamp = f"2024-01-01T00:00:{n * 2:02d}Z"
            out.append(sample(email=f"c{c}@scale.example", first_name=f"v{n}", updatedAt=stamp))
            if n == UPDATES // 2:
                reply = f"2024-01-01T00:00:{n * 2 + 1:02d}Z"
                out.append(sample(type="reply", email=f"c{c}@scale.example", updatedAt=reply))
    return out


@pytest.fixture
def config_path(tmp_path, request, hubspot_emulator) -> Path:
    path = tmp_path / "config.yaml"
    store = store_yaml("postgres", request, tmp_path / "unused.db")
    path.write_text(
        config_yaml(
            tmp_path / "unused.db",
            hubspot=hubspot_settings(hubspot_emulator),
            rules=RULES,
            # A short lease: the killed instance's claims come back within the test.
            delivery="lease_seconds: 2\ncoalesce_max: 3",
            store=store,
        )
    )
    return path


def test_three_instances_one_killed_deliver_everything_once(
    daemon_factory, config_path, hubspot_emulator
):
    hubspot_emulator.latency = 0.02  # CRM calls take a while: some are in flight at the kill
    daemons = [daemon_factory(config_path) for _ in range(3)]
    victim = daemons[1]
    payloads = events()
    acknowledged: set[str] = set()
    turn = itertools.cycle(daemons)
    for i, payload in enumerate(payloads):
        if i == len(payloads) // 3:
            # Once it is delivering (its calls take a while: some are in flight), SIGKILL.
            wait_for(lambda: victim.actions("delivery.done"), timeout=30)
            victim.kill()
        # Round-robin; a dead instance's connection fails and the sender tries the next one,
        # as a load balancer (or the platform's resend) would.
        while True:
            daemon = next(turn)
            if daemon.proc.poll() is not None:
                continue
            try:
                response = daemon.post(payload)
            except requests.ConnectionError:
                continue
            break
        assert response.status_code == 202, response.text
        acknowledged.add(response.json()["event_id"])
    assert len(acknowledged) == len(payloads)
    survivor = daemons[0]

    def drained() -> dict | None:
        status = survivor.session.get(f"{survivor.url}/status", timeout=10).json()
        return status if status["backlog"] == 0 else None

    status = wait_for(drained, timeout=60, interval=0.1)
    # Every delivery finished, none dead: upserts done or skipped/merged, notes done.
    counts = status["deliveries"]["hubspot"]
    assert set(counts) <= {"done", "skipped"}, counts
    assert sum(counts.values()) == len(payloads)

    with hubspot_emulator.lock:
        records = list(hubspot_emulator.contacts.values())
    by_email: dict[str, list] = {}
    for record in records:
        by_email.setdefault(record.properties["email"], []).append(record)
    assert sorted(by_email) == sorted(f"c{c}@scale.example" for c in range(CONTACTS))
    for email, found in by_email.items():
        (record,) = found  # exactly one record per email
        assert record.properties["firstname"] == f"v{UPDATES - 1}", email
        notes = hubspot_emulator.engagements_of("notes", record.id)
        assert len(notes) == 1, (email, [n.properties for n in notes])
    # The victim really was killed mid-run, and the others kept serving.
    assert victim.proc.returncode == -9
    assert all(d.proc.poll() is None for d in daemons if d is not victim)
