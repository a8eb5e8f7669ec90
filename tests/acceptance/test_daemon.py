"""The daemon as a process: started, fed over HTTP, killed with SIGKILL, restarted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.support import (
    SAMPLE_TEXT,
    config_yaml,
    delivery_states,
    hubspot_emails,
    hubspot_settings,
    salesforce_emails,
    salesforce_settings,
    sample,
    wait_for,
)


@pytest.fixture
def config_path(tmp_path, hubspot_emulator, salesforce_emulator) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(
            tmp_path / "bridge.db",
            hubspot=hubspot_settings(hubspot_emulator),
            salesforce=salesforce_settings(salesforce_emulator),
        )
    )
    return path


def test_the_sample_reaches_both_crms_once(
    daemon_factory, config_path, hubspot_emulator, salesforce_emulator
):
    daemon = daemon_factory(config_path)
    first = daemon.post(SAMPLE_TEXT)
    assert first.status_code == 202
    wait_for(lambda: hubspot_emails(hubspot_emulator) and salesforce_emails(salesforce_emulator))
    again = daemon.post(SAMPLE_TEXT)
    assert again.json() == {"event_id": first.json()["event_id"], "duplicate": True}
    deliveries = wait_for(lambda: daemon.settled(first.json()["event_id"]))
    assert [d["status"] for d in deliveries] == ["done", "done"]
    assert hubspot_emails(hubspot_emulator) == ["andrew@xoxo.capital"]
    assert salesforce_emails(salesforce_emulator) == ["andrew@xoxo.capital"]
    assert len(hubspot_emulator.calls_to("POST", "/batch/upsert")) == 1
    assert len(salesforce_emulator.calls_to("POST", "/sobjects/Lead")) == 1
    assert daemon.stop() == 0


def test_every_acknowledged_event_survives_sigkill(
    daemon_factory, config_path, tmp_path, hubspot_emulator, salesforce_emulator
):
    # Given a CRM slow enough that the burst is still queued when the daemon dies
    hubspot_emulator.latency = salesforce_emulator.latency = 0.05
    daemon = daemon_factory(config_path)
    emails = [f"person{i}@example.com" for i in range(40)]
    for i, email in enumerate(emails):
        response = daemon.post(sample(email=email, first_name=f"v{i}"))
        assert response.status_code == 202
    # When it is killed without warning right after acknowledging
    daemon.kill()
    db = tmp_path / "bridge.db"
    states = delivery_states(db)
    delivered = states.get("done", 0)
    assert delivered < 2 * len(emails), "all was delivered before the kill: the test proves nothing"
    # Then a restarted daemon delivers every acknowledged event, each to one record
    hubspot_emulator.latency = salesforce_emulator.latency = 0
    restarted = daemon_factory(config_path)
    wait_for(lambda: delivery_states(db) == {"done": 2 * len(emails)}, timeout=60)
    assert hubspot_emails(hubspot_emulator) == sorted(emails)
    assert salesforce_emails(salesforce_emulator) == sorted(emails)
    for i, email in enumerate(emails):
        (lead,) = [r for r in salesforce_emulator.records("Lead") if r["Email"] == email]
        assert lead["FirstName"] == f"v{i}"
    assert restarted.stop() == 0


def test_sigterm_finishes_calls_in_flight_and_loses_nothing(
    daemon_factory, config_path, tmp_path, hubspot_emulator, salesforce_emulator
):
    hubspot_emulator.latency = 0.3
    daemon = daemon_factory(config_path)
    assert daemon.post(sample(email="late@example.com")).status_code == 202
    wait_for(lambda: hubspot_emulator.calls_to("POST", "/batch/upsert") or None)
    assert daemon.stop() == 0
    # The call in flight was allowed to finish and recorded as done.
    db = tmp_path / "bridge.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT connector, status FROM deliveries ORDER BY id").fetchall()
    assert ("hubspot", "done") in rows
    assert hubspot_emails(hubspot_emulator) == ["late@example.com"]


def test_without_credentials_it_starts_and_shows_what_it_would_write(daemon_factory, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(tmp_path / "bridge.db"))
    daemon = daemon_factory(path)
    assert {r["connector"] for r in daemon.actions("connector.dry_run")} == {
        "hubspot",
        "salesforce",
    }
    assert daemon.post(SAMPLE_TEXT).status_code == 202
    would = wait_for(
        lambda: len(daemon.actions("delivery.dry_run")) == 2 and daemon.actions("delivery.dry_run")
    )
    assert {w["would_write"]["crm"] for w in would} == {"hubspot", "salesforce"}
    # Emails are masked in logs by default (logging.mask_personal_data).
    assert all(w["would_write"]["id_value"] == "a***@xoxo.capital" for w in would)
    assert daemon.stop() == 0


def test_an_invalid_config_stops_with_every_problem(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(tmp_path / "bridge.db").replace("  port: 0", "  prot: 0"))
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{path}:3:3: server.prot: unknown key (did you mean `port`?)" in result.stderr


def test_sigkill_during_a_batch_writes_each_record_once(
    daemon_factory, config_path, tmp_path, hubspot_emulator, salesforce_emulator
):
    # Given a burst big enough for full batches, and CRMs slow enough to be killed mid-call
    hubspot_emulator.latency = salesforce_emulator.latency = 0.3
    daemon = daemon_factory(config_path)
    emails = [f"batch{i}@example.com" for i in range(150)]
    for i, email in enumerate(emails):
        assert daemon.post(sample(email=email, first_name=f"n{i}")).status_code == 202
    # When the daemon dies while a batch call is in flight
    wait_for(lambda: hubspot_emulator.calls_to("POST", "/batch/upsert") or None)
    daemon.kill()
    # Then after a restart each contact exists once in each CRM, with its values
    hubspot_emulator.latency = salesforce_emulator.latency = 0
    restarted = daemon_factory(config_path)
    db = tmp_path / "bridge.db"
    wait_for(lambda: delivery_states(db) == {"done": 2 * len(emails)}, timeout=60)
    assert hubspot_emails(hubspot_emulator) == sorted(emails)
    assert salesforce_emails(salesforce_emulator) == sorted(emails)
    with hubspot_emulator.lock:
        names = {
            r.properties["email"]: r.properties["firstname"]
            for r in hubspot_emulator.contacts.values()
        }
    assert names == {email: f"n{i}" for i, email in enumerate(emails)}
    assert restarted.stop() == 0


def test_sigkill_while_logging_activities_logs_each_once(
    daemon_factory, tmp_path, hubspot_emulator
):
    # Given rules that upsert the contact and log each reply as a note
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(
            tmp_path / "bridge.db",
            hubspot=hubspot_settings(hubspot_emulator),
            rules="""
  - name: contact
    when: type == 'reply'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
  - name: note
    when: type == 'reply'
    connector: hubspot
    action: log_activity
    activity:
      subject: "Replied to {{ CampaignId }}"
      body: "{{ contact.first_name }} replied"
""",
        ).replace("  salesforce:\n    type: salesforce\n", "")
    )
    hubspot_emulator.latency = 0.3
    daemon = daemon_factory(path)
    emails = [f"reply{i}@example.com" for i in range(20)]
    for i, email in enumerate(emails):
        assert daemon.post(sample(type="reply", email=email, first_name=f"r{i}")).status_code == 202
    # When the daemon dies while notes are being written
    wait_for(lambda: hubspot_emulator.calls_to("POST", "/crm/v3/objects/notes") or None)
    daemon.kill()
    # Then after a restart every reply is on its contact's timeline exactly once
    hubspot_emulator.latency = 0
    restarted = daemon_factory(path)
    db = tmp_path / "bridge.db"
    wait_for(lambda: delivery_states(db) == {"done": 2 * len(emails)}, timeout=60)
    with hubspot_emulator.lock:
        by_email = {r.id: r.properties["email"] for r in hubspot_emulator.contacts.values()}
        notes_per_contact: dict[str, int] = {}
        for _, contact_id in hubspot_emulator.associations:
            email = by_email[contact_id]
            notes_per_contact[email] = notes_per_contact.get(email, 0) + 1
        bodies = [n.properties["hs_note_body"] for n in hubspot_emulator.notes.values()]
    assert notes_per_contact == dict.fromkeys(emails, 1)
    assert len(bodies) == len(emails)
    # and it did meet a note it had sent before the kill: it looked for it before writing again
    assert hubspot_emulator.calls_to("POST", "/associations/contacts/notes/batch/read")
    assert restarted.stop() == 0
