"""`crm-bridge dlq` and `crm-bridge backfill` as processes, beside a daemon running or stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import (
    config_yaml,
    delivery_states_of,
    hubspot_emails,
    hubspot_settings,
    salesforce_emails,
    salesforce_settings,
    sample,
    wait_for,
)

HUBSPOT_ONLY_RULES = """
  - name: interested-to-hubspot
    when: type in ('interest', 'click') and contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
"""
# What HubSpot answers when it refuses a record for good.
REFUSAL = {
    "status": "error",
    "message": "Contact blocked by a workflow in this portal",
    "category": "VALIDATION_ERROR",
    "correlationId": "0f1e2d3c-test",
}


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "SALESFORCE_"))}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def hubspot_config(tmp_path, store_config, hubspot_emulator) -> Path:
    """On each backend in turn: the CLI works on a shared PostgreSQL store as on SQLite."""
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(
            tmp_path / "bridge.db",
            hubspot=hubspot_settings(hubspot_emulator),
            rules=HUBSPOT_ONLY_RULES,
            store=store_config,
        )
    )
    return path


def refused_delivery(daemon, emulator, email: str) -> int:
    """Post a contact the CRM refuses for good; the id of its dead delivery."""
    emulator.fail_next(1, 400, body=REFUSAL, match="/batch/upsert")
    response = daemon.post(sample(email=email, first_name=email.split("@")[0]))
    assert response.status_code == 202
    (delivery,) = wait_for(lambda: daemon.settled(response.json()["event_id"]))
    assert delivery["status"] == "dead"
    return int(delivery["id"])


def test_dlq_beside_a_running_daemon(daemon_factory, hubspot_config, hubspot_emulator):
    # Given two deliveries HubSpot refused
    daemon = daemon_factory(hubspot_config)
    first = refused_delivery(daemon, hubspot_emulator, "ann@example.com")
    second = refused_delivery(daemon, hubspot_emulator, "bob@example.com")
    assert hubspot_emails(hubspot_emulator) == []

    # `dlq list` shows them with the CRM's error
    listed = cli("dlq", "list", config=hubspot_config)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "CONNECTOR", "RULE", "CONTACT"]
    assert [r.split()[:4] for r in rows] == [
        [str(first), "hubspot", "interested-to-hubspot", "ann@example.com"],
        [str(second), "hubspot", "interested-to-hubspot", "bob@example.com"],
    ]
    assert all("Contact blocked by a workflow" in r for r in rows)

    as_json = json.loads(cli("dlq", "list", "--json", config=hubspot_config).stdout)
    assert [(r["id"], r["contact_key"], r["attempts"]) for r in as_json] == [
        (first, "ann@example.com", 1),
        (second, "bob@example.com", 1),
    ]
    assert "Contact blocked by a workflow in this portal" in as_json[0]["last_error"]
    assert as_json[0]["updated_at"].endswith("Z")

    limited = cli("dlq", "list", "--limit", "1", config=hubspot_config)
    assert [line.split()[0] for line in limited.stdout.splitlines()[1:]] == [str(first), "(1"]
    assert limited.stdout.splitlines()[-1] == "(1 of 2 shown; raise --limit to see more)"
    other = cli("dlq", "list", "--connector", "salesforce", config=hubspot_config)
    assert other.stdout.strip() == "no dead deliveries"

    # `dlq show` gives the delivery, what it would write, and its event's body
    shown = cli("dlq", "show", str(first), config=hubspot_config)
    assert shown.returncode == 0, shown.stderr
    delivery = json.loads(shown.stdout)
    assert delivery["status"] == "dead"
    assert "Contact blocked by a workflow" in delivery["last_error"]
    assert delivery["operation"]["id_value"] == "ann@example.com"
    assert delivery["event"]["body"]["contact"]["email"] == "ann@example.com"
    missing = cli("dlq", "show", "9999", config=hubspot_config)
    assert (missing.returncode, missing.stderr.strip()) == (1, "crm-bridge: no delivery 9999")

    # When they are queued again, HubSpot (accepting now) gets both contacts
    retried = cli("dlq", "retry", "--all", config=hubspot_config)
    assert (retried.returncode, retried.stdout.strip()) == (0, "queued 2 dead deliveries again")
    wait_for(lambda: hubspot_emails(hubspot_emulator) == ["ann@example.com", "bob@example.com"])
    wait_for(lambda: delivery_states_of(hubspot_config) == {"done": 2})
    assert cli("dlq", "list", config=hubspot_config).stdout.strip() == "no dead deliveries"
    again = cli("dlq", "retry", str(first), config=hubspot_config)
    assert again.returncode == 1
    assert again.stderr.strip() == f"crm-bridge: delivery {first} is done, not dead"
    assert daemon.stop() == 0


def test_dlq_while_the_daemon_is_stopped(daemon_factory, hubspot_config, hubspot_emulator):
    # Given two dead deliveries, and the daemon stopped
    daemon = daemon_factory(hubspot_config)
    kept = refused_delivery(daemon, hubspot_emulator, "kept@example.com")
    dropped = refused_delivery(daemon, hubspot_emulator, "dropped@example.com")
    assert daemon.stop() == 0

    listed = cli("dlq", "list", config=hubspot_config)
    assert [r.split()[0] for r in listed.stdout.splitlines()[1:]] == [str(kept), str(dropped)]

    # When one is queued again and the other purged
    retried = cli("dlq", "retry", str(kept), config=hubspot_config)
    assert (retried.returncode, retried.stdout.strip()) == (0, "queued 1 dead delivery again")
    recent = cli("dlq", "purge", "--older-than", "1h", config=hubspot_config)
    assert recent.stdout.startswith("purged 0 dead deliveries last touched before ")
    purged = cli("dlq", "purge", "--older-than", "0s", config=hubspot_config)
    assert purged.stdout.startswith("purged 1 dead delivery ")
    assert cli("dlq", "list", config=hubspot_config).stdout.strip() == "no dead deliveries"

    # Then the restarted daemon delivers the retried one only
    restarted = daemon_factory(hubspot_config)
    wait_for(lambda: delivery_states_of(hubspot_config) == {"done": 1})
    assert hubspot_emails(hubspot_emulator) == ["kept@example.com"]
    assert restarted.stop() == 0


CSV = """\
email,first_name,last_name,company_name,interest,replied,custom.industry
ann@example.com,Ann,Lee,Acme,interested,true,fintech
bob@example.com,Bob,Stone,Initech,interested,false,
not-an-email,Xavier,Ray,Hooli,interested,,

cid@example.com,Cid,"Moss
Jr.",Hooli,not_interested,,
dee@example.com,Dee,Park,Globex,interested,maybe,
"""


def test_backfill_into_a_running_daemon(
    daemon_factory, tmp_path, hubspot_emulator, salesforce_emulator
):
    config = tmp_path / "config.yaml"
    config.write_text(
        config_yaml(
            tmp_path / "bridge.db",
            hubspot=hubspot_settings(hubspot_emulator),
            salesforce=salesforce_settings(salesforce_emulator),
        )
    )
    daemon = daemon_factory(config)
    csv_file = tmp_path / "contacts.csv"
    csv_file.write_text(CSV)

    # A CSV with two invalid rows: the valid ones are stored, the invalid ones reported
    first = cli("backfill", str(csv_file), "--type", "interest", config=config)
    assert first.returncode == 1, first.stderr
    assert first.stdout.splitlines()[1:8] == [
        "  read            5",
        "  stored          3",
        "  already stored  0",
        "  invalid         2",
        "invalid lines (2):",
        "  line 4: email: Value error, not an email address",
        "  line 8: replied: Input should be a valid boolean, unable to interpret input",
    ]
    both = ["ann@example.com", "bob@example.com"]
    wait_for(lambda: hubspot_emails(hubspot_emulator) == both)
    wait_for(lambda: salesforce_emails(salesforce_emulator) == both)
    (lead,) = [r for r in salesforce_emulator.records("Lead") if r["Email"] == "ann@example.com"]
    assert (lead["FirstName"], lead["LastName"], lead["Company"]) == ("Ann", "Lee", "Acme")

    # Run again, it stores nothing new
    second = cli("backfill", str(csv_file), "--type", "interest", config=config)
    assert "  stored          0" in second.stdout
    assert "  already stored  3" in second.stdout

    # JSON lines: a full payload (keeps its type), a bare contact (gets --type), broken lines
    payload = sample(email="eve@example.com", first_name="Eve", last_name="Adams")
    bare = {"email": "fay@example.com", "last_name": "Ng", "interest": "interested"}
    lines = [
        json.dumps(payload),
        json.dumps(bare),
        "",
        "{not json",
        "[1, 2]",
        json.dumps({"type": "click", "contact": {"email": "gus@example.com", "updatedAt": "?"}}),
    ]
    jsonl = tmp_path / "contacts.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    result = cli("backfill", str(jsonl), "--type", "interest", config=config)
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert out[1:5] == [
        "  read            5",
        "  stored          2",
        "  already stored  0",
        "  invalid         3",
    ]
    assert out[6].startswith("  line 4: not valid JSON: ")
    assert out[7] == "  line 5: must be a JSON object"
    assert out[8].startswith("  line 6: contact.updatedAt: Input should be a valid datetime")
    everyone = ["ann@example.com", "bob@example.com", "eve@example.com", "fay@example.com"]
    wait_for(lambda: hubspot_emails(hubspot_emulator) == everyone)
    wait_for(lambda: salesforce_emails(salesforce_emulator) == everyone)

    # The same payload arriving later by webhook is a duplicate
    assert daemon.post(payload).json()["duplicate"] is True
    assert daemon.stop() == 0


def test_usage_and_config_errors_exit_2(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(tmp_path / "bridge.db"))
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("email\nann@example.com\n")

    no_store = cli("dlq", "list", config=config)
    assert (no_store.returncode, no_store.stderr.strip()) == (
        2,
        f"crm-bridge: no store at {tmp_path / 'bridge.db'}",
    )
    assert not (tmp_path / "bridge.db").exists()
    assert cli("dlq", "purge", "--older-than", "7 days", config=config).returncode == 2
    assert cli("dlq", "retry", config=config).returncode == 2
    unknown = cli("backfill", str(contacts), "--source", "zapier", config=config)
    assert unknown.returncode == 2
    assert "no source named 'zapier'; configured: supersend" in unknown.stderr
    # Without --type the contact is stored as a `backfill` event, and the summary says so.
    stored = cli("backfill", str(contacts), config=config)
    assert stored.returncode == 0
    assert "1 contact(s) stored with type 'backfill'" in stored.stdout
