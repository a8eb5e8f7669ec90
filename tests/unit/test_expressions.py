"""Conditions and templates run as Python give exactly what Jinja2 gives."""

import itertools

import pytest

from bridge.expressions import Condition, Scope, Template
from bridge.rules import RuleSet
from tests.support import sample

CONTACTS = [
    {},
    {"first_name": None, "custom": None, "Sender": None},
    {
        "first_name": "  ada ",
        "interest": "not_interested",
        "appointment": True,
        "custom": {"plan": "pro", "items": "x", "seats": 3},
        "TeamId": "team-b",
        "items": "a field named like a dict method",
    },
]
TYPES = ["click", "reply", "interest", "appointment", "unsubscribe"]
CONDITIONS = [
    "type == 'interest' and contact.interest == 'interested'",
    "type in ('reply', 'bounce') or contact.appointment",
    "not contact.replied and contact.interest != 'interested'",
    "contact.custom.plan == 'pro'",
    "contact.custom.seats > 2",
    "contact.nothing == none",
    "contact.first_name is none",
    "contact.Sender.email is endswith('@supersend.io')",
    "contact.email is match('^and') and sender.provider in ['smtp', 'gmail']",
    "contact.TeamId in ('team-a', 'team-b') and source == 'supersend'",
    "contact.items == 'a field named like a dict method'",
    "contact.custom.items",
    "event.type == type and event.source == 'supersend'",
    "contact.first_name | trim | lower == 'ada'",
    "1 < 2 < 3",
]
TEMPLATES = [
    "{{ contact.first_name }}",
    "{{ contact.first_name | trim | title }}",
    "Replied to {{ CampaignId }} from {{ sender.email }}.",
    "{{ contact.first_name | default(contact.email, true) }} replied",
    "{{ contact.first_name | default('x') }}",
    "{{ contact.nothing.deeper }}",
    "{{ contact.custom.plan }}/{{ contact.custom }}",
    "{{ contact.appointment }} {{ contact.opened }}",
    "{{ contact.items }}",
    "{{ contact.createdAt | date('%d %b %Y') }}",
    "{{ event.received_at | datetime }}",
    "{{ contact.title | truncate_to(3) }}",
    "{{ range }}",
]


def outcome(fn):
    try:
        return fn()
    except Exception as exc:  # both sides must fail alike
        return type(exc)


def scopes():
    for type_, contact in itertools.product(TYPES, CONTACTS):
        data = sample(type=type_, **contact)
        yield Scope(RuleSet.context("supersend", data, data["contact"], 1_700_000_000.0))


@pytest.mark.parametrize("source", CONDITIONS)
def test_conditions_run_as_python_agree_with_jinja(source):
    condition = Condition(source)
    assert condition.python is not None, "expected to take the Python path"
    for scope in scopes():
        python = outcome(lambda s=scope: bool(condition.python(s.variables)))
        assert python == outcome(lambda s=scope: s.holds(condition.jinja))


@pytest.mark.parametrize("source", TEMPLATES)
def test_templates_rendered_in_python_agree_with_jinja(source):
    template = Template(source)
    for scope in scopes():
        expected = outcome(lambda s=scope: s.render(template.jinja))
        assert template.parts is not None
        assert outcome(lambda s=scope: template.render(s.variables)) == expected


def test_what_python_cannot_run_goes_to_jinja():
    assert Condition("contact['email'] == 'x'").python is None
    assert Condition("contact.items() | list").python is None
    assert Template("{% if contact.opened %}yes{% endif %}").parts is None
    assert Template("{{ contact.custom.seats + 1 }}").parts is None
