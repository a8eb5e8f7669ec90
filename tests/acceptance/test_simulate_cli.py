"""`crm-bridge simulate` and `crm-bridge check` as processes, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import config_yaml, hubspot_settings, salesforce_settings, sample

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
    # Online without any credentials nothing is checked: no false pass.
    online = cli("check", "--online", "--config", str(EXAMPLE))
    assert online.returncode == 1, online.stderr
    assert "warning: " in online.stdout and "no credentials: not checked" in online.stdout
    assert online.stderr.splitlines()[-1] == (
        "crm-bridge: online: no connector was checked (not checked: hubspot, salesforce)"
    )
    assert "every mapped field exists" not in online.stdout


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


ONLINE_RULES = """
  - name: hubspot-interested
    when: type == 'interest'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
      hs_lead_status: {value: OPEN, policy: monotonic, order: [NEW, OPEN, IN_PROGRESS]}
  - name: salesforce-interested
    when: type == 'interest'
    connector: salesforce
    action: upsert_lead
    fields:
      LastName: "{{ contact.last_name }}"
      Status: {value: Open - Not Contacted, policy: if_empty}
"""


def online_config(tmp_path, hubspot_emulator, salesforce_emulator, rules: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(
            tmp_path / "bridge.db",
            hubspot=hubspot_settings(hubspot_emulator),
            salesforce=salesforce_settings(salesforce_emulator),
            rules=rules,
        )
    )
    path.chmod(0o600)  # it holds the CRM credentials
    return path


def test_check_online_against_the_crms(tmp_path, hubspot_emulator, salesforce_emulator):
    config = online_config(tmp_path, hubspot_emulator, salesforce_emulator, ONLINE_RULES)
    good = cli("check", "--online", "--config", str(config))
    assert good.returncode == 0, good.stderr
    assert (
        good.stdout.splitlines()[-1] == "online: every mapped field exists and accepts its values"
    )

    bad = online_config(
        tmp_path,
        hubspot_emulator,
        salesforce_emulator,
        ONLINE_RULES.replace("hs_lead_status:", "hs_lead_statuss:").replace(
            "value: Open - Not Contacted", "value: Open"
        ),
    )
    done = cli("check", "--online", "--config", str(bad))
    assert done.returncode == 1
    lines = bad.read_text().splitlines()
    at = lines.index(
        "      hs_lead_statuss: {value: OPEN, policy: monotonic, order: [NEW, OPEN, IN_PROGRESS]}"
    )
    assert done.stderr.splitlines() == [
        f"  {bad}:{at + 1}:7: rules[0].fields.hs_lead_statuss: hubspot has no field"
        " 'hs_lead_statuss' on contact (did you mean `hs_lead_status`?)",
        f"  {bad}:{at + 8}:16: rules[1].fields.Status.value: 'Open' is not an option of Status"
        " (picklist: [Open - Not Contacted, Working - Contacted, Closed - Converted, Closed - Not"
        " Converted])",
        "crm-bridge: 2 problem(s) found online",
    ]


def test_simulate_online_prints_a_plan(tmp_path, hubspot_emulator, salesforce_emulator):
    hubspot_emulator.add_contact(
        {"email": "andrew@xoxo.capital", "firstname": "Andy", "hs_lead_status": "IN_PROGRESS"}
    )
    salesforce_emulator.seed(
        "Lead", {"Email": "andrew@xoxo.capital", "LastName": "Pierno", "Company": "XOXO"}
    )
    config = online_config(tmp_path, hubspot_emulator, salesforce_emulator, ONLINE_RULES)
    event = tmp_path / "interest.json"
    event.write_text(json.dumps(sample(type="interest", first_name="Andrew", last_name="Pierno")))
    done = cli("simulate", str(event), "--online", "--config", str(config))
    assert done.returncode == 0, done.stderr
    plan = done.stdout.split("Plan (read from the CRMs):\n", 1)[1]
    assert plan == (
        "  [hubspot-interested] ~ hubspot: contact email=andrew@xoxo.capital: updated\n"
        '    ~ firstname: "Andy" -> "Andrew"\n'
        '    ! hs_lead_status: "IN_PROGRESS" kept, not "OPEN" (monotonic: \'OPEN\' is not after'
        " 'IN_PROGRESS')\n"
        "  [salesforce-interested] = salesforce: lead email=andrew@xoxo.capital: nothing would"
        " change\n"
        '    = LastName: "Pierno"\n'
        '    = Status: "Open - Not Contacted"\n'
        "\n"
        "Plan: 0 to create or log, 1 to change, 1 unchanged.\n"
    )
    assert salesforce_emulator.records("Lead")[0]["LastName"] == "Pierno"


def test_refused_logins_are_reported_without_the_secrets(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    path = tmp_path / "config.yaml"
    hubspot = hubspot_settings(hubspot_emulator) | {"access_token": "pat-na1-not-this-one"}
    salesforce = salesforce_settings(salesforce_emulator) | {"password": "hunter2-wrong"}
    path.write_text(
        config_yaml(
            tmp_path / "bridge.db", hubspot=hubspot, salesforce=salesforce, rules=ONLINE_RULES
        )
    )
    path.chmod(0o600)
    event = tmp_path / "interest.json"
    event.write_text(json.dumps(sample(type="interest")))

    checked = cli("check", "--online", "--config", str(path))
    simulated = cli("simulate", "--online", "--config", str(path), str(event))

    assert checked.returncode == 1
    assert "hubspot" in checked.stderr and "salesforce" in checked.stderr
    for done in (checked, simulated):
        output = done.stdout + done.stderr
        assert "not-this-one" not in output and "hunter2" not in output
