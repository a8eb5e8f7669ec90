import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.models import WebhookPayload, idempotency_key

SAMPLE = Path(__file__).parent.parent / "data" / "supersend-click.json"


def sample() -> dict:
    return json.loads(SAMPLE.read_text())


def test_the_platform_sample_parses_exactly_and_keeps_unknown_fields():
    data = sample()
    payload = WebhookPayload.model_validate(data)
    assert payload.type == "click"
    assert payload.contact.email == "andrew@xoxo.capital"
    assert payload.contact.interest == "interested"
    assert payload.contact.Sender is not None and payload.contact.Sender.send_as == "Andrew Pierno"
    # Ids that are not valid UUIDs (the sample's TeamId has a 'g') are kept as they are.
    dumped = payload.model_dump(mode="json", by_alias=True)
    assert dumped["contact"]["TeamId"] == "fd815f85-80a9-43ba-825b-dc114fa2bfcg"
    assert dumped["contact"]["test_letter"] == "a"
    assert set(dumped["contact"]) == set(data["contact"])


@pytest.mark.parametrize("raw", ["  Andrew@XOXO.Capital ", "ANDREW@xoxo.capital"])
def test_emails_are_trimmed_and_lower_cased(raw):
    data = sample()
    data["contact"]["email"] = raw
    assert WebhookPayload.model_validate(data).contact.email == "andrew@xoxo.capital"


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_a_contact_without_email_is_valid(raw):
    data = sample()
    data["contact"]["email"] = raw
    assert WebhookPayload.model_validate(data).contact.email is None


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("contact", "email"), "not-an-email", "contact.email"),
        (("contact", "email"), 42, "contact.email"),
        (("contact", "appointment"), "maybe", "contact.appointment"),
        (("contact", "updatedAt"), "yesterday", "contact.updatedAt"),
        (("type",), "", "type"),
    ],
)
def test_schema_violations_name_the_field(path, value, field):
    data = sample()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        WebhookPayload.model_validate(data)
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [field]


def test_newer_event_types_are_accepted():
    data = sample()
    for kind in ("sent", "unsubscribe", "finished"):
        data["type"] = kind
        assert WebhookPayload.model_validate(data).type == kind


def test_idempotency_key_ignores_key_order_but_not_content():
    data = sample()
    reordered = json.loads(json.dumps(dict(reversed(list(data.items())))))
    assert idempotency_key("s", data) == idempotency_key("s", reordered)
    changed = sample()
    changed["contact"]["updatedAt"] = "2023-01-26T04:48:05.000Z"
    assert idempotency_key("s", data) != idempotency_key("s", changed)
    assert idempotency_key("s", data) != idempotency_key("other", data)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("type", lambda d: d.update(type="cli\x00ck")),
        ("contact.email", lambda d: d["contact"].update(email="andrew\x00@xoxo.capital")),
    ],
)
def test_a_nul_in_a_field_stored_as_a_column_is_refused(field, change):
    # PostgreSQL's text columns cannot hold it; SQLite could: both refuse it alike.
    data = sample()
    change(data)
    with pytest.raises(ValidationError) as refused:
        WebhookPayload.model_validate(data)
    (error,) = refused.value.errors()
    assert ".".join(map(str, error["loc"])) == field
    assert "NUL" in error["msg"]
