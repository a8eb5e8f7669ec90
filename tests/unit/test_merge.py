"""A contact's queued burst merged into one write keeps each field's write policy."""

from bridge.delivery import merge
from bridge.models import Delivery, DeliveryStatus
from connectors.base import LeadUpsert, WritePolicy

STATUS = WritePolicy(mode="monotonic", order=("NEW", "OPEN", "IN_PROGRESS", "CONNECTED"))


def delivery(i: int, fields: dict, policies: dict | None = None, create: bool = True) -> Delivery:
    return Delivery(
        id=i,
        event_id=f"e{i}",
        rule="r",
        connector="hubspot",
        action="upsert_contact",
        contact_key="ada@example.com",
        operation=LeadUpsert(
            object="contact",
            id_value="ada@example.com",
            fields=fields,
            policies=policies or {},
            create=create,
        ),
        status=DeliveryStatus.IN_FLIGHT,
        attempts=1,
        created_at=0,
        next_attempt_at=0,
        sort_at=i,
        horizon_start=0,
    )


def test_a_monotonic_field_keeps_the_furthest_value_of_a_burst():
    merged = merge(
        [
            delivery(
                1, {"hs_lead_status": "IN_PROGRESS", "firstname": "A"}, {"hs_lead_status": STATUS}
            ),
            delivery(2, {"hs_lead_status": "OPEN", "firstname": "Ada"}, {"hs_lead_status": STATUS}),
        ],
        "rec-1",
    )
    assert merged.fields == {"hs_lead_status": "IN_PROGRESS", "firstname": "Ada"}
    assert merged.policies == {"hs_lead_status": STATUS}
    assert merged.record_id == "rec-1"


def test_each_field_takes_the_later_writes_policy_and_the_merge_may_create_if_one_part_may():
    merged = merge(
        [
            delivery(
                1, {"company": "Acme"}, {"company": WritePolicy(mode="if_empty")}, create=False
            ),
            delivery(2, {"company": "Acme Inc"}),
        ],
        None,
    )
    assert (merged.fields, merged.create) == ({"company": "Acme Inc"}, True)
    # In sequence the second write (no policy) would write whatever the first left: so does
    # the merge, unguarded.
    assert merged.policies == {}


def test_an_if_empty_value_after_a_value_keeps_the_first_as_two_writes_would():
    first = WritePolicy(mode="if_empty")
    merged = merge(
        [
            delivery(1, {"company": "Acme", "title": ""}, {"company": first}),
            delivery(2, {"company": "Other", "title": "CTO"}, {"company": first, "title": first}),
        ],
        None,
    )
    assert merged.fields == {"company": "Acme", "title": "CTO"}
    assert merged.policies == {"company": first, "title": first}
