"""The example config's rules over every event type and every interest/appointment value."""

import itertools
import json
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.rules import RuleSet

ROOT = Path(__file__).parent.parent.parent
SAMPLE = json.loads((ROOT / "tests" / "data" / "supersend-click.json").read_text())
RULES = RuleSet(load_config(ROOT / "config.example.yaml").rules)
RECEIVED = 1_700_000_000.0  # 2023-11-14T22:13:20Z
TYPES = ("open", "click", "reply", "bounce", "interest", "appointment")
# `interested` is the platform's documented value; the others stand for "anything else".
INTERESTS = ("interested", "not_interested", "maybe", None)
APPOINTMENTS = (True, False, None)

REPLY = [
    (
        "replied-to-hubspot",
        "hubspot",
        "upsert_contact",
        {"firstname": "Ada", "lastname": "Lovelace", "hs_lead_status": "IN_PROGRESS"},
    ),
    ("replied-to-salesforce", "salesforce", "update_status", {"Status": "Working - Contacted"}),
    ("reply-note-to-hubspot", "hubspot", "log_activity", "Replied to campaign d9ff359d"),
    ("reply-task-to-salesforce", "salesforce", "log_activity", "Replied to campaign d9ff359d"),
]
BOUNCE = [
    (
        "bounce-to-salesforce",
        "salesforce",
        "update_status",
        {
            "EmailBouncedReason": "Bounced in Supersend campaign d9ff359d",
            # the contact's updatedAt in the sample, the same however often it is resent
            "EmailBouncedDate": "2023-01-26T04:48:04.762Z",
        },
    ),
    ("bounce-note-to-hubspot", "hubspot", "log_activity", "Email bounced (campaign d9ff359d)"),
]
INTERESTED = [
    (
        "interested-to-hubspot",
        "hubspot",
        "upsert_contact",
        {
            "firstname": "Ada",
            "lastname": "Lovelace",
            "company": "Analytical Engines",
            "hs_lead_status": "OPEN",
        },
    ),
    (
        "interested-to-salesforce",
        "salesforce",
        "upsert_lead",
        {
            "FirstName": "Ada",
            "LastName": "Lovelace",
            "Company": "Analytical Engines",
            "LeadSource": "Supersend",
            "Status": "Open - Not Contacted",
        },
    ),
]
APPOINTMENT = [
    ("appointment-to-hubspot", "hubspot", "upsert_contact", {"hs_lead_status": "CONNECTED"}),
    ("appointment-to-salesforce", "salesforce", "update_status", {"Status": "Working - Contacted"}),
]
CLICK = [
    (
        "interested-click-to-hubspot",
        "hubspot",
        "upsert_contact",
        {"firstname": "Ada", "lastname": "Lovelace", "hs_lead_status": "OPEN"},
    ),
]
NOT_INTERESTED = [
    ("not-interested-to-hubspot", "hubspot", "update_status", {"hs_lead_status": "UNQUALIFIED"}),
]

# (type, interest, appointment) -> deliveries; "*" is any value.
TABLE = {
    ("open", "*", "*"): [],
    ("click", "interested", "*"): CLICK,
    ("click", "*", "*"): [],
    ("reply", "*", "*"): REPLY,
    ("bounce", "*", "*"): BOUNCE,
    ("interest", "interested", "*"): INTERESTED,
    ("interest", "not_interested", "*"): NOT_INTERESTED,
    ("interest", "*", "*"): [],  # the status rule matches, its map names nothing: no write
    ("appointment", "*", True): APPOINTMENT,
    ("appointment", "*", "*"): [],
}


def expected(type_, interest, appointment):
    for (t, i, a), deliveries in TABLE.items():
        if t == type_ and i in ("*", interest) and a in ("*", appointment):
            return deliveries
    raise AssertionError("no row")


def evaluate(type_, **contact):
    data = json.loads(json.dumps(SAMPLE))
    data["type"] = type_
    data["CampaignId"] = "d9ff359d"
    data["contact"].update(
        first_name=" Ada ", last_name="Lovelace", company_name="Analytical Engines", **contact
    )
    context = RuleSet.context("supersend", data, data["contact"], RECEIVED)
    return RULES.evaluate(context, "event-1", RECEIVED)


def described(delivery):
    op = delivery.operation
    what = op.fields if delivery.action != "log_activity" else op.subject
    return (delivery.rule, delivery.connector, delivery.action, what)


@pytest.mark.parametrize(
    ("type_", "interest", "appointment"), list(itertools.product(TYPES, INTERESTS, APPOINTMENTS))
)
def test_the_example_rules_over_every_type_interest_and_appointment(type_, interest, appointment):
    result = evaluate(type_, interest=interest, appointment=appointment)
    assert [described(d) for d in result.deliveries] == expected(type_, interest, appointment)


def test_status_fields_carry_their_monotonic_order_and_status_updates_never_create():
    (hubspot, salesforce) = evaluate("appointment", appointment=True).deliveries
    assert hubspot.operation.create is True
    policy = hubspot.operation.policies["hs_lead_status"]
    assert (policy.mode, policy.order) == ("monotonic", ("NEW", "OPEN", "IN_PROGRESS", "CONNECTED"))
    assert salesforce.operation.create is False
    assert salesforce.operation.object == "lead"
    (hubspot, salesforce) = evaluate("interest", interest="interested").deliveries
    assert {k: p.mode for k, p in hubspot.operation.policies.items()} == {
        "company": "if_empty",
        "hs_lead_status": "monotonic",
    }
    assert salesforce.operation.policies["LeadSource"].mode == "on_create"


def test_internal_addresses_stop_the_evaluation():
    result = evaluate("reply", email="seed@supersend.io")
    assert (result.deliveries, result.stopped_by) == ([], "skip-internal-addresses")
    assert result.matched == ["skip-internal-addresses"]


def test_an_unmapped_interest_is_noted_not_sent():
    result = evaluate("interest", interest="maybe")
    assert result.notes == [
        "rule 'not-interested-to-hubspot' matched but every field is empty: nothing sent to hubspot"
    ]
