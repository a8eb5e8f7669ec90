import json
from pathlib import Path

import pytest

from bridge.config import RuleConfig
from bridge.models import WebhookPayload
from bridge.rules import RuleSet

SAMPLE = json.loads((Path(__file__).parent.parent / "data" / "supersend-click.json").read_text())


def event(type_: str, **contact) -> dict:
    data = json.loads(json.dumps(SAMPLE))
    data["type"] = type_
    data["contact"].update(contact)
    return data


def evaluate(rules: list[dict], data: dict):
    ruleset = RuleSet([RuleConfig.model_validate(r) for r in rules])
    payload = WebhookPayload.model_validate(data)
    contact = {**data["contact"], "email": payload.contact.email}
    return ruleset.evaluate(RuleSet.context("supersend", data, contact))


INTERESTED = {
    "name": "interested",
    "when": "type == 'interest' and contact.interest == 'interested'",
    "connector": "hubspot",
    "action": "upsert_contact",
    "fields": {"firstname": "{{ contact.first_name }}", "hs_lead_status": "OPEN"},
}


@pytest.mark.parametrize(
    ("type_", "interest", "matches"),
    [
        ("interest", "interested", True),
        ("interest", "not_interested", False),
        ("interest", None, False),
        ("click", "interested", False),
        ("open", "interested", False),
        ("reply", "interested", False),
        ("bounce", "interested", False),
        ("appointment", "interested", False),
        ("unsubscribe", "interested", False),
    ],
)
def test_the_documented_use_case_matches_only_interested_interest_events(type_, interest, matches):
    result = evaluate([INTERESTED], event(type_, interest=interest, first_name="Ada"))
    assert [d.rule for d in result.deliveries] == (["interested"] if matches else [])


def test_fields_are_mapped_from_templates_and_constants():
    result = evaluate([INTERESTED], event("interest", first_name="Ada", email=" Ada@Example.COM "))
    (delivery,) = result.deliveries
    assert delivery.connector == "hubspot"
    assert delivery.contact_key == "ada@example.com"
    assert delivery.operation.id_value == "ada@example.com"
    assert delivery.operation.object == "contact"
    assert delivery.operation.fields == {"firstname": "Ada", "hs_lead_status": "OPEN"}


def test_null_fields_are_left_out_not_written_as_none():
    (delivery,) = evaluate([INTERESTED], event("interest", first_name=None)).deliveries
    assert delivery.operation.fields == {"hs_lead_status": "OPEN"}


def test_missing_nested_fields_are_false_not_errors():
    rule = {**INTERESTED, "when": "contact.Sender.nothing.deeper == 'x' or contact.no_such_field"}
    result = evaluate([rule], event("interest", Sender=None))
    assert result.deliveries == [] and result.notes == []


def test_unknown_fields_and_the_sender_are_visible_to_rules():
    rule = {**INTERESTED, "when": "contact.test_letter == 'a' and sender.provider == 'smtp'"}
    assert len(evaluate([rule], event("click")).deliveries) == 1


def test_a_contact_without_email_is_not_sent_and_the_reason_is_kept():
    result = evaluate([INTERESTED], event("interest", email=None))
    assert result.deliveries == []
    assert result.notes == [
        "rule 'interested' matched but the record key ({{ contact.email }}) is empty:"
        " nothing sent to hubspot"
    ]


def test_a_rule_may_key_records_on_another_field():
    rule = {**INTERESTED, "id_property": "linkedin", "id_value": "{{ contact.id }}"}
    (delivery,) = evaluate([rule], event("interest", email=None)).deliveries
    assert delivery.operation.id_property == "linkedin"
    assert delivery.operation.id_value == "345b2b81-b2cf-4879-bf46-73a33275e22b"


def test_several_rules_fan_out_in_file_order():
    second = {
        **INTERESTED,
        "name": "to-salesforce",
        "connector": "salesforce",
        "action": "upsert_lead",
    }
    result = evaluate([INTERESTED, second], event("interest"))
    assert [(d.rule, d.connector, d.operation.object) for d in result.deliveries] == [
        ("interested", "hubspot", "contact"),
        ("to-salesforce", "salesforce", "lead"),
    ]


def test_the_sandbox_refuses_attribute_escapes():
    rule = {**INTERESTED, "when": "contact.__class__.__mro__[1].__subclasses__()"}
    result = evaluate([rule], event("interest"))
    assert result.deliveries == []
    assert len(result.notes) == 1 and "could not be evaluated" in result.notes[0]


@pytest.mark.parametrize(
    ("when", "types"),
    [
        ("type == 'reply'", {"reply"}),
        ("type == 'interest' and contact.interest == 'interested'", {"interest"}),
        ("contact.interest == 'interested' and type in ('open', 'click')", {"open", "click"}),
        ("type == 'reply' or type == 'bounce'", {"reply", "bounce"}),
        ("type == 'reply' or contact.replied", None),
        ("contact.appointment", None),
        ("type != 'open'", None),
    ],
)
def test_rules_that_name_their_types_are_skipped_for_other_types(when, types):
    rule = RuleSet([RuleConfig.model_validate({**INTERESTED, "when": when})]).rules[0]
    assert rule.types == (frozenset(types) if types is not None else None)
    # The shortcut never changes a result: every type gives what full evaluation gives.
    for kind in ("open", "click", "reply", "bounce", "interest", "appointment"):
        data = event(kind, replied=True, appointment=True)
        full = bool(rule.when(**RuleSet.context("supersend", data, data["contact"])))
        got = len(evaluate([{**INTERESTED, "when": when}], data).deliveries) == 1
        assert got == full


REPLY_NOTE = {
    "name": "reply-note",
    "when": "type == 'reply'",
    "connector": "hubspot",
    "action": "log_activity",
    "activity": {
        "subject": "Replied to campaign {{ CampaignId }}",
        "body": "{{ contact.first_name | default('Someone', true) }} replied.",
    },
}


def test_an_activity_is_templated_and_keyed_by_event_and_rule():
    ruleset = RuleSet([RuleConfig.model_validate(REPLY_NOTE)])
    data = event("reply", first_name=None)
    context = RuleSet.context("supersend", data, data["contact"])
    (first,) = ruleset.evaluate(context, "event-1", 1700000000.0).deliveries
    (again,) = ruleset.evaluate(context, "event-1", 1700000000.0).deliveries
    (other,) = ruleset.evaluate(context, "event-2", 1700000000.0).deliveries
    activity = first.operation
    assert (activity.subject, activity.body) == (
        "Replied to campaign d9ff359d-8d50-378b-989a-34100a0503c1",
        "Someone replied.",
    )
    assert (activity.kind, activity.object, activity.occurred_at) == (
        "note",
        "contact",
        1700000000.0,
    )
    assert activity.key == again.operation.key != other.operation.key


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({**REPLY_NOTE, "activity": None}, "action log_activity needs an `activity:`"),
        (
            {**INTERESTED, "activity": REPLY_NOTE["activity"]},
            "`activity:` is only for action log_activity",
        ),
    ],
)
def test_activity_settings_go_with_the_log_activity_action(rule, message):
    with pytest.raises(ValueError, match=message):
        RuleConfig.model_validate(rule)


@pytest.mark.parametrize(
    ("template", "contact", "expected"),
    [
        ("{{ contact.name | first_name }}", {"name": "Ada King Lovelace"}, "Ada"),
        ("{{ contact.name | last_name }}", {"name": "Ada King Lovelace"}, "King Lovelace"),
        ("{{ (contact.name | split_name)[1] }}", {"name": "Ada"}, ""),
        ("{{ contact.name | last_name | default('Unknown', true) }}", {"name": "Ada"}, "Unknown"),
        ("{{ contact.name | trim | title }}", {"name": "  ada lovelace "}, "Ada Lovelace"),
        ("{{ contact.name | trim | title | upper }}", {"name": None}, ""),
        ("{{ contact.name | replace('a', 'b') | truncate(3) }}", {"name": None}, ""),
        ("{{ contact.name | upper }}/{{ contact.name | lower }}", {"name": "Ada"}, "ADA/ada"),
        ("{{ contact.title | truncate_to(5) }}", {"title": "Chief Executive"}, "Chief"),
        ("{{ contact.createdAt | date }}", {}, "2023-01-26"),
        ("{{ contact.createdAt | date('%d/%m/%Y %H:%M') }}", {}, "26/01/2023 04:41"),
        ("{{ contact.createdAt | datetime }}", {}, "2023-01-26T04:41:10.639Z"),
        ("{{ contact.createdAt | timestamp_ms }}", {}, "1674708070639"),
        ("{{ contact.nothing | date }}", {}, ""),
        ("{{ contact.custom.plan | default('free') }}", {"custom": {"plan": "pro"}}, "pro"),
        ("{{ contact.custom.plan | default('free') }}", {}, "free"),
    ],
)
def test_filters(template, contact, expected):
    rule = {**INTERESTED, "fields": {"x": template}}
    (delivery,) = evaluate([rule], event("interest", **contact)).deliveries
    assert delivery.operation.fields.get("x", "") == expected


@pytest.mark.parametrize(
    ("mapping", "contact", "expected"),
    [
        ({"value": "{{ contact.interest }}", "map": {"interested": "OPEN"}}, {}, "OPEN"),
        ({"value": "{{ contact.interest }}", "map": {"INTERESTED": "OPEN"}}, {}, "OPEN"),
        ({"value": "{{ contact.interest }}", "map": {"x": "OPEN"}}, {}, None),
        ({"value": "{{ contact.interest }}", "map": {"x": "A"}, "default": "NEW"}, {}, "NEW"),
        ({"value": "{{ contact.appointment }}", "map": {"true": "CONNECTED"}}, {}, None),
        (
            {"value": "{{ contact.appointment }}", "map": {"true": "CONNECTED"}},
            {"appointment": True},
            "CONNECTED",
        ),
        ({"value": "{{ contact.phone }}", "default": "n/a"}, {}, "n/a"),
        (
            {"value": "{{ contact.custom.seats }}", "type": "integer"},
            {"custom": {"seats": "12"}},
            12,
        ),
        (
            {"value": "{{ contact.custom.score }}", "type": "number"},
            {"custom": {"score": "1.5"}},
            1.5,
        ),
        (
            {"value": "{{ contact.custom.score }}", "type": "number"},
            {"custom": {"score": "x"}},
            None,
        ),
        ({"value": "{{ contact.verified }}", "type": "boolean"}, {}, True),
        ({"value": "{{ contact.createdAt }}", "type": "date"}, {}, "2023-01-26"),
        ({"value": "{{ contact.title }}", "max_length": 3}, {"title": "Chief"}, "Chi"),
        ({"value": 42}, {}, 42),
        ({"value": True}, {}, True),
    ],
)
def test_field_mappings(mapping, contact, expected):
    rule = {**INTERESTED, "fields": {"x": mapping}}
    (delivery,) = evaluate([rule], event("interest", **contact)).deliveries
    assert delivery.operation.fields.get("x") == expected


def test_update_status_never_creates_and_stop_ends_the_evaluation():
    rules = [
        {**INTERESTED, "name": "status", "action": "update_status", "object": "contact"},
        {"name": "stop", "when": "type == 'interest'", "action": "stop"},
        {**INTERESTED, "name": "never"},
    ]
    result = evaluate(rules, event("interest"))
    (delivery,) = result.deliveries
    assert (delivery.action, delivery.operation.create, delivery.operation.object) == (
        "update_status",
        False,
        "contact",
    )
    assert (result.matched, result.stopped_by) == (["status", "stop"], "stop")


def test_the_received_time_and_the_source_are_visible():
    rule = {
        **INTERESTED,
        "when": "event.source == 'supersend'",
        "fields": {"at": "{{ event.received_at | datetime }}"},
    }
    ruleset = RuleSet([RuleConfig.model_validate(rule)])
    data = event("interest")
    result = ruleset.evaluate(RuleSet.context("supersend", data, data["contact"], 1700000000.0))
    assert result.deliveries[0].operation.fields == {"at": "2023-11-14T22:13:20.000Z"}


def test_an_explicit_always_policy_is_passed_on_and_an_unstated_one_is_not():
    rule = {
        **INTERESTED,
        "fields": {
            "lifecyclestage": {"value": "lead", "policy": "always"},
            "firstname": "{{ contact.first_name }}",
        },
    }
    (delivery,) = evaluate([rule], event("interest", first_name="Ada")).deliveries
    assert {k: p.mode for k, p in delivery.operation.policies.items()} == {
        "lifecyclestage": "always"
    }


def test_a_rule_may_open_a_hubspot_lead_object():
    rule = {
        **INTERESTED,
        "hubspot_lead": {"hs_lead_name": "{{ contact.first_name }} (Supersend)", "x": "{{ no }}"},
    }
    (delivery,) = evaluate([rule], event("interest", first_name="Ada")).deliveries
    assert delivery.operation.hubspot_lead == {"hs_lead_name": "Ada (Supersend)"}
    (plain,) = evaluate([INTERESTED], event("interest")).deliveries
    assert plain.operation.hubspot_lead is None
    with pytest.raises(ValueError, match="`hubspot_lead:` goes with an upsert action"):
        RuleConfig.model_validate({**REPLY_NOTE, "hubspot_lead": {}})


def test_a_hubspot_lead_template_failing_on_sender_data_is_a_note_not_a_crash():
    rule = {**INTERESTED, "hubspot_lead": {"hs_lead_name": "{{ contact.score + 1 }}"}}
    data = event("interest")
    data["contact"]["score"] = "abc"  # a string where the rule expects a number

    result = evaluate([rule, {**INTERESTED, "name": "second"}], data)

    assert [d.rule for d in result.deliveries] == ["second"]
    assert len(result.notes) == 1 and result.notes[0].startswith("rule 'interested': ")


def test_a_record_key_with_a_nul_is_no_key():
    rule = {**INTERESTED, "id_value": "{{ contact.custom_id }}"}
    data = event("interest")
    data["contact"]["custom_id"] = "abc\x00def"

    result = evaluate([rule], data)

    assert result.deliveries == []
    assert "the record key ({{ contact.custom_id }}) is empty" in result.notes[0]
