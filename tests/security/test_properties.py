"""Property tests (hypothesis, bounded) of the payload model, the JSON shape limits, rule
evaluation through the router, and email masking."""

from __future__ import annotations

import json
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from pydantic import ValidationError

from bridge.config import RuleConfig
from bridge.errors import PayloadError
from bridge.ingress.limits import check_json_shape
from bridge.logs import Redactor
from bridge.models import StoredEvent, WebhookPayload, idempotency_key
from bridge.router import Router
from bridge.rules import RuleSet

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
emails = st.one_of(
    st.emails().map(lambda e: random.Random(e).choice([e, e.upper(), f"  {e} "])),
    st.emails(),
    st.emails(),
    st.text(max_size=15),
    st.none(),
)
contact_fields = {
    "first_name": st.one_of(st.none(), st.text(max_size=12), st.integers()),
    "interest": st.sampled_from([None, "interested", "interested", "not_interested", 5]),
    "clicked": st.one_of(st.booleans(), st.booleans(), st.sampled_from([None, "yes", "nope", 2])),
    "updatedAt": st.one_of(st.none(), st.sampled_from(["2024-01-01T00:00:00Z", "x", 1.5e9])),
    "custom": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
    "Sender": st.one_of(st.none(), st.fixed_dictionaries({"email": emails}), st.text(max_size=3)),
}
contacts = st.fixed_dictionaries(
    {"email": emails}, optional={**contact_fields, "extra": json_values, "score": json_values}
)
payloads = st.fixed_dictionaries(
    {
        "contact": st.one_of(contacts, contacts, contacts, json_values),
        "type": st.sampled_from(["click", "reply", "interest", "click", "", "x" * 65, 3, None]),
    },
    optional={
        "CampaignId": st.one_of(st.none(), st.text(max_size=8)),
        "unknown": json_values,
    },
)


@BOUNDED
@given(payloads)
def test_the_model_validates_or_refuses_with_named_fields(data):
    try:
        payload = WebhookPayload.model_validate(data)
    except ValidationError as exc:
        assert exc.errors() and all(e["loc"] for e in exc.errors())
        return
    email = payload.contact.email
    assert email is None or (email == email.strip().lower() and "@" in email)
    dumped = payload.model_dump()
    for key in data:  # unknown fields are kept
        assert key in dumped
    # Validating its own output again changes nothing.
    assert WebhookPayload.model_validate(dumped).model_dump() == dumped


@BOUNDED
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.randoms())
def test_the_idempotency_key_ignores_key_order(data, rnd):
    items = list(data.items())
    rnd.shuffle(items)
    assert idempotency_key("s", dict(items)) == idempotency_key("s", data)
    assert idempotency_key("s", data) != idempotency_key("t", data)


def depth_and_fields(value, depth=1):
    if isinstance(value, dict | list):
        children = list(value.values()) if isinstance(value, dict) else value
        sub = [depth_and_fields(c, depth + 1) for c in children]
        return max([depth, *(d for d, _ in sub)]), len(children) + sum(f for _, f in sub)
    return depth - 1, 0


@BOUNDED
@given(json_values, st.integers(2, 6), st.integers(10, 30))
def test_the_shape_limits_agree_with_a_plain_recursive_count(value, max_depth, max_fields):
    depth, fields = depth_and_fields(value)
    try:
        check_json_shape(value, max_depth, max_fields)
    except PayloadError as exc:
        assert exc.status == 400
        assert (exc.code == "json_too_deep" and depth > max_depth) or (
            exc.code == "json_too_many_fields" and fields > max_fields
        )
    else:
        assert depth <= max_depth and fields <= max_fields


RULES = [
    RuleConfig(
        name="interested",
        when="type in ('interest', 'click') and contact.interest == 'interested'",
        connector="hubspot",
        action="upsert_contact",
        fields={"firstname": "{{ contact.first_name }}", "status": "OPEN"},
    ),
    RuleConfig(
        name="score",  # a comparison that fails on strings: a note, not a crash
        when="contact.score > 3",
        connector="hubspot",
        fields={"s": "{{ contact.score * 2 }}", "c": "{{ contact.custom.a.b }}"},
    ),
    RuleConfig(
        name="sender",
        when="sender.email and contact.clicked",
        connector="salesforce",
        id_value="{{ contact.email }}",
        fields={"Owner": "{{ sender.email | upper }}", "Note": "{{ contact.extra | tojson }}"},
    ),
    RuleConfig(
        name="activity",
        when="type == 'reply'",
        connector="hubspot",
        action="log_activity",
        activity={"subject": "Reply from {{ contact.first_name }}", "body": "{{ contact }}"},
    ),
]
RULESET = RuleSet(RULES)


@BOUNDED
@given(payloads)
def test_rule_evaluation_never_raises_and_is_deterministic(data):
    try:  # only what ingest accepted is ever stored
        WebhookPayload.model_validate(data)
    except ValidationError:
        note_event("refused at ingest")
        return
    body = orjson.dumps(data).decode()
    event = StoredEvent(id="e1", source="s", body=body, received_at=1.0, sort_at=1.0)
    first = Router.evaluate(RULESET, event)
    assert Router.evaluate(RULESET, event) == first
    assert json.loads(body) == data  # the stored body is untouched
    note_event(f"{len(first.deliveries)} deliveries, {len(first.notes)} notes")
    for delivery in first.deliveries:
        assert delivery.contact_key == delivery.contact_key.strip().lower()
        assert delivery.contact_key


@settings(max_examples=200, deadline=None)
@given(st.emails(), st.text(max_size=10), st.text(max_size=10))
def test_masking_hides_every_email_local_part(email, before, after):
    redactor = Redactor()
    text = redactor.text(f"{before} {email} {after}")
    local, _, domain = email.rpartition("@")
    # The first character is kept (j***@example.com): a one-letter local part shows whole.
    assert f"{email[0]}***@{domain}" in text
    if len(local) > 1:
        assert email not in text


@pytest.mark.parametrize("count", [1])
def test_the_rule_set_compiles(count):
    assert len(RULESET.rules) == len(RULES) * count
