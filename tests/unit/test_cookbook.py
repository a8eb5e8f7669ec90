"""Every recipe of the README's rule cookbook loads, and does what its text says."""

import re
from pathlib import Path

import pytest
import yaml

from bridge.config import parse_config
from bridge.rules import RuleSet
from tests.support import sample

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text()
COOKBOOK = README.split("## Rule cookbook", 1)[1].split("\n## ", 1)[0]
RECIPES = re.findall(r"```yaml\n(.*?)```", COOKBOOK, re.DOTALL)
CONNECTORS = "connectors:\n  hubspot: {type: hubspot}\n  salesforce: {type: salesforce}\n"


def load(recipe: str):
    text = recipe if "connectors:" in recipe else CONNECTORS + recipe
    return parse_config(text, "README.md")


def deliveries(config, source="supersend", **contact):
    ruleset = RuleSet(config.rules)
    data = sample(**contact)
    context = RuleSet.context(source, data, data["contact"], 1_700_000_000.0)
    return [(d.rule, d.operation) for d in ruleset.evaluate(context, "e1", 0.0).deliveries]


def test_there_are_five_recipes():
    assert len(RECIPES) == 5
    assert all(yaml.safe_load(r)["rules"] for r in RECIPES)


def test_interested_contacts_go_to_both_crms():
    config = load(RECIPES[0])
    made = deliveries(config, type="interest", last_name="Pierno", company_name=None)
    assert [rule for rule, _ in made] == ["interested-to-hubspot", "interested-to-salesforce"]
    assert made[1][1].fields == {
        "LastName": "Pierno",
        "Company": "Unknown",
        "LeadSource": "Supersend",
    }
    assert deliveries(config, type="interest", interest="not_interested") == []


def test_replies_are_logged_as_activities():
    made = deliveries(load(RECIPES[1]), type="reply", first_name="Andrew")
    assert [(rule, op.kind, op.subject) for rule, op in made] == [
        ("reply-note", "note", "Replied to campaign d9ff359d-8d50-378b-989a-34100a0503c1"),
        ("reply-task", "task", "Replied to campaign d9ff359d-8d50-378b-989a-34100a0503c1"),
    ]
    assert made[0][1].body == "Andrew replied to ap@supersend.io on 14 Nov 2023."


def test_bounces_mark_existing_records_only():
    made = deliveries(load(RECIPES[2]), type="bounce")
    assert [(rule, op.create) for rule, op in made] == [
        ("bounce-marks-the-lead", False),
        ("bounce-marks-the-contact", False),
    ]
    assert made[0][1].fields["EmailBouncedDate"] == "2023-11-14T22:13:20.000Z"


@pytest.mark.parametrize(("appointment", "expected"), [(True, 2), (False, 0)])
def test_appointments_move_the_status_forward(appointment, expected):
    made = deliveries(load(RECIPES[3]), type="appointment", appointment=appointment)
    assert len(made) == expected
    if expected:
        assert made[0][1].fields == {"hs_lead_status": "CONNECTED"}
        assert made[0][1].policies["hs_lead_status"].mode == "monotonic"


def test_two_teams_go_to_two_portals():
    config = load(RECIPES[4])
    emea = deliveries(config, "supersend_emea", type="interest")
    us = deliveries(config, "supersend_us", type="interest", TeamId="another-team")
    assert [rule for rule, _ in emea] == ["emea-interested"]
    assert [rule for rule, _ in us] == ["us-interested"]
