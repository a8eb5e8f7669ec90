"""`crm-bridge simulate` and `crm-bridge check` as processes, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import sample

ROOT = Path(__file__).parent.parent.parent
EXAMPLE = ROOT / "config.example.yaml"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "SALESFORCE_"))}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )


def test_simulate_prints_rules_reasons_and_operations(tmp_path):
    event = tmp_path / "reply.json"
    event.write_text(json.dumps(sample(type="reply", first_name="Andrew")))
    done = cli("simulate", str(event), "--config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "event 'reply' from supersend, contact andrew@xoxo.capital"
    assert any(
        line.split() == ["interested-to-hubspot", "no", "type", "is", "'reply';", "the", "rule",
                         "is", "for", "'interest'"]
        for line in lines
    )  # fmt: skip
    assert any(
        line.split()[:4] == ["replied-to-hubspot", "matched", "->", "hubspot"] for line in lines
    )
    assert "Operations (nothing is written):" in lines
    assert '      hs_lead_status = "IN_PROGRESS"  (monotonic)' in lines
    assert "Plan" not in done.stdout


def test_simulate_refuses_what_is_not_a_webhook(tmp_path):
    event = tmp_path / "bad.json"
    event.write_text(json.dumps({"type": "reply"}))
    done = cli("simulate", str(event), "--config", str(EXAMPLE))
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"crm-bridge: {event}: not a webhook payload: contact: Field required",
    )
    missing = cli("simulate", str(tmp_path / "none.json"), "--config", str(EXAMPLE))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_check_offline_and_online_without_credentials():
    done = cli("check", "--config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"{EXAMPLE}: OK (2 connector(s), 13 rule(s))"
    online = cli("check", "--online", "--config", str(EXAMPLE))
    assert online.returncode == 0, online.stderr
    assert "warning: " in online.stdout and "no credentials: not checked" in online.stdout


def test_check_reports_every_problem_with_its_place(tmp_path):
    config = tmp_path / "config.yaml"
    text = EXAMPLE.read_text().replace("upsert_contact          # HubSpot", "upsert_contacts  #")
    lead = "connector: salesforce\n    action: upsert_lead"
    config.write_text(text.replace(lead, lead.replace("salesforce", "salesfroce"), 1))
    done = cli("check", "--config", str(config))
    assert done.returncode == 2
    problems = done.stderr.splitlines()
    assert problems[0] == "crm-bridge: invalid configuration (2 problem(s)):"
    assert (
        "rules[1].action: unknown action 'upsert_contacts' (did you mean `upsert_contact`?)"
        in problems[1]
    )
    assert (
        "rules[2].connector: no connector named 'salesfroce' (did you mean `salesforce`?)"
        in problems[2]
    )
