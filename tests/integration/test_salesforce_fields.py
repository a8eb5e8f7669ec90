"""Salesforce field checks against the org's describe data, through simple-salesforce.

Values are coerced to the field's type (booleans, numbers, dates, datetimes, picklists)
before anything is sent; a value that cannot be is refused with a message naming the field,
the value and what the org allows, and the other records of the batch still land.
"""

from __future__ import annotations

import pytest

from bridge.errors import PermanentDelivery
from connectors.base import DeliveryResult, LeadUpsert, WritePolicy

LEAD_STATUSES = [
    "Open - Not Contacted",
    "Working - Contacted",
    "Closed - Converted",
    "Closed - Not Converted",
]


def lead(email: str = "ada@example.com", **fields) -> LeadUpsert:
    return LeadUpsert(object="lead", id_value=email, fields=fields or {"FirstName": "Ada"})


def writes(emulator) -> list:
    with emulator.lock:
        return [c for c in emulator.calls if c.method in ("POST", "PATCH") and "sobjects" in c.path]


@pytest.fixture
def custom_fields(salesforce_emulator):
    emulator = salesforce_emulator
    emulator.add_field("Lead", "Opted_In__c", "boolean")
    emulator.add_field("Lead", "Meeting_Date__c", "date")
    emulator.add_field("Lead", "Last_Reply__c", "datetime")
    emulator.add_field("Lead", "Score__c", "double")
    return emulator


async def test_describe_lists_the_fields_with_their_picklist_values(salesforce):
    fields = await salesforce.describe("lead")

    status = fields["Status"]
    assert (status.type, status.options) == ("picklist", tuple(LEAD_STATUSES))
    assert fields["LastName"].max_length == 80
    assert fields["IsConverted"].writable is False
    assert "Subject" in await salesforce.describe("task")


async def test_describe_is_read_once_and_again_after_open(salesforce_emulator, salesforce):
    await salesforce.upsert_leads([lead("a@x.io"), lead("b@x.io")])
    await salesforce.upsert_lead(lead("c@x.io"))
    assert len(salesforce_emulator.calls_to(path_contains="/Lead/describe")) == 1

    # A field the admin added since: a reload (open) reads describe again and accepts it.
    salesforce_emulator.add_field("Lead", "Segment__c")
    await salesforce.open()
    result = await salesforce.upsert_lead(lead("d@x.io", Segment__c="SMB"))
    assert salesforce_emulator.record(result.record_id)["Segment__c"] == "SMB"
    assert len(salesforce_emulator.calls_to(path_contains="/Lead/describe")) == 2


async def test_values_are_coerced_to_the_field_types(custom_fields, salesforce):
    result = await salesforce.upsert_lead(
        lead(
            "ada@example.com",
            LastName="Lovelace",
            Opted_In__c="yes",
            Meeting_Date__c="2026-11-27T22:30:00-05:00",  # the UTC day is the 28th
            Last_Reply__c=1_764_201_600_000,  # epoch milliseconds
            Score__c="42.5",
            Status="working - contacted",  # any case: the org's own spelling is written
        )
    )

    record = custom_fields.record(result.record_id)
    assert record["Opted_In__c"] is True
    assert record["Meeting_Date__c"] == "2026-11-28"
    assert record["Last_Reply__c"] == "2025-11-27T00:00:00.000Z"
    assert record["Score__c"] == 42.5
    assert record["Status"] == "Working - Contacted"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"Status": "Hot"},
            "Salesforce Lead field 'Status': 'Hot' is not one of the allowed values: "
            "[Open - Not Contacted, Working - Contacted, Closed - Converted, "
            "Closed - Not Converted]",
        ),
        (
            {"Opted_In__c": "maybe"},
            "Salesforce Lead field 'Opted_In__c': 'maybe' is not a boolean (true or false)",
        ),
        ({"Score__c": "lots"}, "Salesforce Lead field 'Score__c': 'lots' is not a number"),
        (
            {"Meeting_Date__c": "next week"},
            "Salesforce Lead field 'Meeting_Date__c': 'next week' is not a date (YYYY-MM-DD)",
        ),
        (
            {"FirstName": "A" * 41},
            f"Salesforce Lead field 'FirstName': '{'A' * 41}' is not at most 40 characters long"
            " (it has 41)",
        ),
        (
            {"Favourite_Colour__c": "blue"},
            "Salesforce Lead field 'Favourite_Colour__c' does not exist (value 'blue')",
        ),
        ({"IsConverted": True}, "Salesforce Lead field 'IsConverted' is read-only (value True)"),
    ],
)
async def test_a_value_the_org_refuses_names_field_value_and_expectation(
    custom_fields, salesforce, fields, message
):
    good, bad = await salesforce.upsert_leads([lead("good@x.io"), lead("bad@x.io", **fields)])

    assert isinstance(good, DeliveryResult) and good.created is True
    assert isinstance(bad, PermanentDelivery)
    assert str(bad) == message
    assert [r["Email"] for r in custom_fields.records("Lead")] == ["good@x.io"]


async def test_every_refused_field_is_reported_with_the_allowed_values(
    salesforce_emulator, salesforce
):
    salesforce_emulator.add_field(
        "Lead", "Tier__c", "picklist", picklist=["A", "B"], restricted=True
    )
    with pytest.raises(PermanentDelivery) as info:
        await salesforce.upsert_lead(lead(Status="Hot", Tier__c="C"))

    problems = info.value.detail["invalid_fields"]
    assert [p["field"] for p in problems] == ["Status", "Tier__c"]
    assert problems[0]["allowed"] == LEAD_STATUSES
    assert problems[1]["allowed"] == ["A", "B"]


async def test_an_unrestricted_picklist_takes_a_new_value_as_salesforce_does(
    salesforce_emulator, salesforce
):
    result = await salesforce.upsert_lead(lead(LeadSource="Carrier pigeon"))
    again = await salesforce.upsert_lead(lead("b@x.io", LeadSource="web"))  # an option, any case

    assert salesforce_emulator.record(result.record_id)["LeadSource"] == "Carrier pigeon"
    assert salesforce_emulator.record(again.record_id)["LeadSource"] == "Web"


async def test_without_validation_values_go_out_as_given(salesforce_emulator, salesforce_of):
    salesforce = await salesforce_of(validate_fields=False)

    with pytest.raises(PermanentDelivery, match="INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"):
        await salesforce.upsert_lead(lead(Status="Hot"))
    assert salesforce_emulator.calls_to(path_contains="describe") == []


async def test_an_update_only_write_by_external_id_finds_it_in_any_case(
    salesforce_emulator, salesforce
):
    salesforce_emulator.add_field("Lead", "Ext__c", external_id=True, unique=True)
    existing = salesforce_emulator.seed(
        "Lead", {"LastName": "L", "Company": "C", "Ext__c": "ABC-1", "Title": "CTO"}
    )
    write = LeadUpsert(
        object="lead",
        id_property="Ext__c",
        id_value="abc-1",
        fields={"Title": "CEO"},
        policies={"Title": WritePolicy(mode="if_empty")},
        create=False,
    )

    result = await salesforce.upsert_lead(write)

    assert result.skipped is None and result.record_id == existing
    assert result.detail["held_back"] == {"Title": "if_empty: the CRM holds 'CTO'"}
    assert salesforce_emulator.record(existing)["Title"] == "CTO"
