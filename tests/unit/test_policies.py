"""Write policies: what a write may change given what the CRM holds, and how writes merge."""

from __future__ import annotations

import pytest

from connectors.base import LeadUpsert, WritePolicy, apply_policies, combine

ORDER = ("NEW", "OPEN", "IN_PROGRESS", "CONNECTED")
MONOTONIC = WritePolicy(mode="monotonic", order=ORDER)


def write(value: str | None = None, **policies: WritePolicy) -> LeadUpsert:
    fields = {"status": value} if value is not None else {}
    return LeadUpsert(id_value="ada@example.com", fields=fields, policies=policies)


@pytest.mark.parametrize(
    ("policy", "current", "new", "written"),
    [
        (WritePolicy(), "CTO", "CEO", True),
        (WritePolicy(mode="if_empty"), "CTO", "CEO", False),
        (WritePolicy(mode="if_empty"), "", "CEO", True),
        (WritePolicy(mode="if_empty"), "  ", "CEO", True),
        (WritePolicy(mode="if_empty"), None, "CEO", True),
        (WritePolicy(mode="on_create"), None, "CEO", False),  # the record exists: held
        (MONOTONIC, "OPEN", "CONNECTED", True),
        (MONOTONIC, "OPEN", "OPEN", False),
        (MONOTONIC, "CONNECTED", "NEW", False),
        (MONOTONIC, None, "NEW", True),
        (MONOTONIC, "BAD_TIMING", "NEW", True),  # a value a rep chose, outside the order
        (MONOTONIC, "OPEN", "UNQUALIFIED", False),  # a new value outside the order never moves
    ],
)
def test_a_policy_decides_whether_an_existing_record_is_written(policy, current, new, written):
    fields, held = apply_policies(write(new, status=policy), {"status": current})
    assert ("status" in fields) is written
    assert ("status" in held) is not written


def test_a_new_record_gets_every_field():
    lead = write("NEW", status=WritePolicy(mode="on_create"))
    assert apply_policies(lead, None) == ({"status": "NEW"}, {})


def test_held_fields_say_why():
    lead = write("NEW", status=MONOTONIC)
    _, held = apply_policies(lead, {"status": "OPEN"})
    assert held == {"status": "monotonic: 'NEW' is not after 'OPEN'"}


def test_merging_keeps_the_furthest_monotonic_value_and_the_latest_others():
    reply = write("CONNECTED", status=MONOTONIC).model_copy(
        update={"fields": {"status": "CONNECTED", "title": "CTO"}}
    )
    late_open = write("OPEN", status=MONOTONIC).model_copy(
        update={"fields": {"status": "OPEN", "title": "CEO"}}
    )

    merged = combine(combine(None, reply), late_open)

    assert merged.fields == {"status": "CONNECTED", "title": "CEO"}
    assert merged.policies == {"status": MONOTONIC}


def test_merging_creates_when_either_write_would():
    update_only = write("OPEN").model_copy(update={"create": False})
    assert combine(update_only, write("NEW")).create is True
    assert combine(update_only, update_only).create is False


def test_monotonic_compares_in_any_case_as_a_crm_may_respell_an_option():
    lead = write("replied", status=WritePolicy(mode="monotonic", order=("open", "replied")))
    fields, held = apply_policies(lead, {"status": "Open"})  # the picklist's own spelling
    assert (fields, held) == ({"status": "replied"}, {})
    _, held = apply_policies(lead, {"status": "Replied"})
    assert held == {"status": "monotonic: 'replied' is not after 'Replied'"}
