"""Activities logged exactly once, through the real SDKs against the emulators.

HubSpot: a note or a completed task, created with its association to the contact. Salesforce:
a completed Task whose WhoId is the Lead or Contact. Each carries its key (HubSpot: an HTML
comment ending the body; Salesforce: a marker line ending the Description). The crash case:
the first attempt's create reaches the CRM but its answer never comes back (the emulator
serves it after the connector's timeout); the next attempt finds it and writes nothing.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import hubspot
import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer
from hubspot.crm.objects.notes import ApiException as NotesApiException
from hubspot.crm.objects.notes import SimplePublicObjectInputForCreate as NoteInput
from hubspot.crm.objects.tasks import BatchReadInputSimplePublicObjectId, SimplePublicObjectId
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest

from bridge.config import parse_config
from bridge.errors import PermanentDelivery, RetryableDelivery
from bridge.server import create_app
from connectors.base import Activity
from tests.support import TOKEN, config_yaml, sample

# 2024-05-01T12:00:00.250Z
OCCURRED_AT = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC).timestamp()
NOTES, TASKS = "/crm/v3/objects/notes", "/crm/v3/objects/tasks"
CONTACTS_READ = "/crm/v3/objects/contacts/batch/read"
ASSOCIATIONS = "/crm/v4/associations/contacts/"


def activity(**overrides) -> Activity:
    values = {
        "kind": "note",
        "object": "contact",
        "id_value": "ada@example.com",
        "subject": "Replied to <Launch>",
        "body": "Thanks & see you\nMonday",
        "occurred_at": OCCURRED_AT,
        "key": "k1",
    } | overrides
    return Activity(**values)


# -- fixtures ----------------------------------------------------------------------------------
def calls_since(emulator, start: int) -> list[str]:
    """The requests made since `start` calls, as "METHOD path"."""
    with emulator.lock:
        return [f"{c.method} {c.path}" for c in emulator.calls[start:]]


def hubspot_contact(emulator, email="ada@example.com"):
    return emulator.add_contact({"email": email, "firstname": "Ada"})


def salesforce_tasks(emulator) -> list[dict]:
    return emulator.records("Task")


# -- HubSpot -----------------------------------------------------------------------------------
async def test_hubspot_note_on_the_contact_found_by_email(hubspot_emulator, hubspot_of):
    contact = hubspot_contact(hubspot_emulator)
    connector = await hubspot_of()

    result = await connector.log_activity(activity())

    assert (result.record_id, result.created) == (contact.id, True)
    (note,) = hubspot_emulator.engagements_of("notes", contact.id)
    assert result.detail["activity_id"] == note.id
    assert note.properties["hs_timestamp"] == "2024-05-01T12:00:00.250Z"
    assert note.properties["hs_note_body"] == (
        "<p><strong>Replied to &lt;Launch&gt;</strong></p>"
        "<p>Thanks &amp; see you<br>Monday</p><!-- crm-bridge:k1 -->"
    )
    # A batch read by email (never search: it lags behind writes), then the batch create with
    # its association: no lookup of earlier notes on a first attempt.
    read, create = hubspot_emulator.calls
    assert (read.method, read.path) == ("POST", CONTACTS_READ)
    assert read.json["idProperty"] == "email"
    assert read.json["inputs"] == [{"id": "ada@example.com"}]
    assert (create.method, create.path) == ("POST", f"{NOTES}/batch/create")
    assert create.json["inputs"][0]["associations"] == [
        {
            "to": {"id": contact.id},
            "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 202}],
        }
    ]


async def test_hubspot_completed_task_on_the_hinted_contact(hubspot_emulator, hubspot_of):
    contact = hubspot_contact(hubspot_emulator)
    connector = await hubspot_of()

    result = await connector.log_activity(activity(kind="task", record_id=contact.id))

    assert (result.record_id, result.created) == (contact.id, True)
    (task,) = hubspot_emulator.engagements_of("tasks", contact.id)
    assert {k: task.properties[k] for k in ("hs_task_subject", "hs_task_status")} == {
        "hs_task_subject": "Replied to <Launch>",
        "hs_task_status": "COMPLETED",
    }
    assert task.properties["hs_task_body"] == (
        "<p>Thanks &amp; see you<br>Monday</p><!-- crm-bridge:k1 -->"
    )
    assert task.properties["hs_timestamp"] == "2024-05-01T12:00:00.250Z"
    # The hint spares the lookup: one call.
    (create,) = hubspot_emulator.calls
    assert (create.method, create.path) == ("POST", f"{TASKS}/batch/create")
    assert create.json["inputs"][0]["associations"][0]["types"][0]["associationTypeId"] == 204


async def test_hubspot_reports_a_missing_contact_instead_of_creating_one(
    hubspot_emulator, hubspot_of
):
    connector = await hubspot_of()

    result = await connector.log_activity(activity(id_value="New@Example.com"))

    # The delivery engine decides (wait for the contact's upsert, skip, dead-letter).
    assert result.missing is True and result.record_id is None
    assert "New@Example.com" in result.skipped
    assert hubspot_emulator.contacts == {} and hubspot_emulator.notes == {}
    assert [f"{c.method} {c.path}" for c in hubspot_emulator.calls] == [f"POST {CONTACTS_READ}"]


async def test_hubspot_a_stale_hint_falls_back_to_the_email(hubspot_emulator, hubspot_of):
    contact = hubspot_contact(hubspot_emulator)
    connector = await hubspot_of()

    result = await connector.log_activity(activity(record_id="999999"))

    assert (result.record_id, result.created) == (contact.id, True)
    assert len(hubspot_emulator.engagements_of("notes", contact.id)) == 1
    assert not hubspot_emulator.engagements_of("notes", "999999")


@pytest.mark.parametrize(("kind", "path"), [("note", NOTES), ("task", TASKS)])
async def test_hubspot_a_lost_answer_is_found_by_the_next_attempt(
    hubspot_emulator, hubspot_of, kind, path
):
    contact = hubspot_contact(hubspot_emulator)
    first = await hubspot_of(timeout=0.2, activity_settle_seconds=45)
    # Given a create that HubSpot serves only after the connector stopped listening
    hubspot_emulator.delay_next(1, 0.6, match=f"POST {path}")

    # When the first attempt times out
    with pytest.raises(RetryableDelivery, match="may have been written") as info:
        await first.log_activity(activity(kind=kind, record_id=contact.id))
    # then its delivery waits for the lost write to land before looking for it
    assert info.value.retry_after == 45
    await asyncio.to_thread(hubspot_emulator.wait_idle)
    (written,) = hubspot_emulator.engagements_of(f"{kind}s", contact.id)

    # Then a second attempt, after a restart (nothing remembered in memory), finds it
    restarted = await hubspot_of()
    start = len(hubspot_emulator.calls)
    result = await restarted.log_activity(activity(kind=kind, record_id=contact.id, attempt=2))

    assert (result.record_id, result.created) == (contact.id, False)
    assert result.detail["activity_id"] == written.id
    assert len(hubspot_emulator.engagements_of(f"{kind}s", contact.id)) == 1
    assert calls_since(hubspot_emulator, start) == [
        f"POST {ASSOCIATIONS}{kind}s/batch/read",
        f"POST {path}/batch/read",
    ]


async def test_hubspot_a_retry_with_the_same_attempt_looks_first(hubspot_emulator, hubspot_of):
    # The delivery engine's in-call retry repeats a call with the same `attempt`: the connector
    # remembers that its create got no answer.
    contact = hubspot_contact(hubspot_emulator)
    connector = await hubspot_of(timeout=0.2)
    hubspot_emulator.delay_next(1, 0.6, match=f"POST {NOTES}")
    with pytest.raises(RetryableDelivery):
        await connector.log_activity(activity(record_id=contact.id))
    await asyncio.to_thread(hubspot_emulator.wait_idle)

    result = await connector.log_activity(activity(record_id=contact.id))

    assert result.created is False
    assert len(hubspot_emulator.engagements_of("notes", contact.id)) == 1


async def test_hubspot_a_later_attempt_without_an_earlier_write_creates(
    hubspot_emulator, hubspot_of
):
    contact = hubspot_contact(hubspot_emulator)
    # Other notes on the contact, one of them with a longer key that starts with this one
    hubspot_emulator.add_engagement(
        "notes",
        {"hs_timestamp": "1700000000000", "hs_note_body": "<p>x</p><!-- crm-bridge:k10 -->"},
        contact.id,
    )
    hubspot_emulator.add_engagement("notes", {"hs_timestamp": "1700000000000"}, contact.id)
    connector = await hubspot_of()

    result = await connector.log_activity(activity(record_id=contact.id, attempt=3))

    assert (result.record_id, result.created) == (contact.id, True)
    assert len(hubspot_emulator.engagements_of("notes", contact.id)) == 3
    assert calls_since(hubspot_emulator, 0) == [
        f"POST {ASSOCIATIONS}notes/batch/read",
        f"POST {NOTES}/batch/read",
        f"POST {NOTES}/batch/create",
    ]


async def test_hubspot_finds_an_old_note_among_many_pages(hubspot_emulator, hubspot_of):
    contact = hubspot_contact(hubspot_emulator)
    body = {"hs_timestamp": "1700000000000", "hs_note_body": "<!-- crm-bridge:k1 -->"}
    ours = hubspot_emulator.add_engagement("notes", body, contact.id)
    for n in range(600):
        other = {"hs_timestamp": "1700000000000", "hs_note_body": f"note {n}"}
        hubspot_emulator.add_engagement("notes", other, contact.id)
    connector = await hubspot_of()

    result = await connector.log_activity(activity(record_id=contact.id, attempt=2))

    assert result.detail["activity_id"] == ours.id and result.created is False
    lists = hubspot_emulator.calls_to("POST", ASSOCIATIONS)
    reads = hubspot_emulator.calls_to("POST", f"{NOTES}/batch/read")
    assert (len(lists), len(reads)) == (2, 7)  # 500 a page; 100 a read, newest first
    assert "after" not in lists[0].json["inputs"][0] and lists[1].json["inputs"][0]["after"]


async def test_hubspot_activity_errors_are_classified(hubspot_emulator, hubspot_of):
    contact = hubspot_contact(hubspot_emulator)
    connector = await hubspot_of()
    hubspot_emulator.fail_next_rate_limited(1, retry_after=0.05, match=f"POST {NOTES}")
    with pytest.raises(RetryableDelivery) as info:
        await connector.log_activity(activity(record_id=contact.id))
    assert info.value.retry_after == 0.05  # refused before any write: no settle wait
    hubspot_emulator.fail_next(1, 400, match=f"POST {NOTES}")
    with pytest.raises(PermanentDelivery):
        await connector.log_activity(activity(record_id=contact.id))
    # Neither left the key marked unsure: the next first attempt creates without looking.
    start = len(hubspot_emulator.calls)
    assert (await connector.log_activity(activity(record_id=contact.id))).created is True
    assert calls_since(hubspot_emulator, start) == [f"POST {NOTES}/batch/create"]


# -- Salesforce --------------------------------------------------------------------------------
async def test_salesforce_task_on_the_lead_found_by_email(salesforce_emulator, salesforce_of):
    lead = salesforce_emulator.seed(
        "Lead", {"LastName": "Lovelace", "Company": "AE", "Email": "Ada@Example.com"}
    )
    connector = await salesforce_of()
    start = len(salesforce_emulator.calls)

    result = await connector.log_activity(activity(object="lead"))

    assert (result.record_id, result.created) == (lead, True)
    (task,) = salesforce_tasks(salesforce_emulator)
    assert result.detail["activity_id"] == task["Id"]
    assert {k: task[k] for k in ("Subject", "WhoId", "Status", "Priority", "ActivityDate")} == {
        "Subject": "Replied to <Launch>",
        "WhoId": lead,
        "Status": "Completed",
        "Priority": "Normal",
        "ActivityDate": "2024-05-01",
    }
    assert task["Description"] == "Thanks & see you\nMonday\n\n[crm-bridge:k1]"
    query, create = calls_since(salesforce_emulator, start)
    assert query.startswith("GET /services/data/v59.0/query")
    assert create == "POST /services/data/v59.0/sobjects/Task/"


async def test_salesforce_task_on_the_oldest_contact_with_the_email(
    salesforce_emulator, salesforce_of
):
    oldest = salesforce_emulator.seed("Contact", {"LastName": "A", "Email": "ada@example.com"})
    salesforce_emulator.seed("Contact", {"LastName": "B", "Email": "ada@example.com"})
    lead = salesforce_emulator.seed(
        "Lead", {"LastName": "L", "Company": "C", "Email": "ada@example.com"}
    )
    connector = await salesforce_of()

    # A Lead's id as the hint of a Contact activity is not the Contact's: ignored.
    result = await connector.log_activity(activity(object="contact", record_id=lead))

    assert result.record_id == oldest
    assert [t["WhoId"] for t in salesforce_tasks(salesforce_emulator)] == [oldest]


async def test_salesforce_hinted_task_costs_one_call(salesforce_emulator, salesforce_of):
    contact = salesforce_emulator.seed("Contact", {"LastName": "A", "Email": "ada@example.com"})
    connector = await salesforce_of()
    start = len(salesforce_emulator.calls)

    result = await connector.log_activity(activity(record_id=contact))

    assert (result.record_id, result.created) == (contact, True)
    assert calls_since(salesforce_emulator, start) == ["POST /services/data/v59.0/sobjects/Task/"]


async def test_salesforce_a_stale_hint_falls_back_to_the_email(salesforce_emulator, salesforce_of):
    gone = salesforce_emulator.seed("Lead", {"LastName": "A", "Company": "C", "Email": "a@b.io"})
    salesforce_emulator.delete(gone)
    live = salesforce_emulator.seed("Lead", {"LastName": "B", "Company": "C", "Email": "a@b.io"})
    connector = await salesforce_of()

    result = await connector.log_activity(
        activity(object="lead", id_value="a@b.io", record_id=gone)
    )

    assert (result.record_id, result.created) == (live, True)
    assert [t["WhoId"] for t in salesforce_tasks(salesforce_emulator)] == [live]


async def test_salesforce_a_missing_lead_is_reported_missing_and_named(
    salesforce_emulator, salesforce_of
):
    connector = await salesforce_of()

    # The delivery engine decides (wait for the upsert creating it, skip, dead-letter).
    result = await connector.log_activity(activity(object="lead", id_value="nobody@example.com"))

    assert result.missing is True
    assert result.skipped.startswith("no Salesforce Lead with Email nobody@example.com")
    assert salesforce_tasks(salesforce_emulator) == []


async def test_salesforce_a_lost_answer_is_found_by_the_next_attempt(
    salesforce_emulator, salesforce_of
):
    lead = salesforce_emulator.seed("Lead", {"LastName": "A", "Company": "C", "Email": "a@b.io"})
    first = await salesforce_of(timeout=0.2, activity_settle_seconds=45)
    # Given a Task create that Salesforce serves only after the connector stopped listening
    salesforce_emulator.delay_next(1, 0.6, match="/sobjects/Task", method="POST")

    # When the first attempt times out
    with pytest.raises(RetryableDelivery, match="may have been written") as info:
        await first.log_activity(activity(object="lead", id_value="a@b.io", record_id=lead))
    assert info.value.retry_after == 45
    await asyncio.to_thread(salesforce_emulator.wait_idle)
    (written,) = salesforce_tasks(salesforce_emulator)

    # Then a second attempt, after a restart, finds it by WhoId and Subject and the marker
    restarted = await salesforce_of()
    start = len(salesforce_emulator.calls)
    result = await restarted.log_activity(
        activity(object="lead", id_value="a@b.io", record_id=lead, attempt=2)
    )

    assert (result.record_id, result.created) == (lead, False)
    assert result.detail["activity_id"] == written["Id"]
    assert len(salesforce_tasks(salesforce_emulator)) == 1
    (query,) = salesforce_emulator.calls[start:]
    assert query.param("q") == (
        f"SELECT Id, WhoId, Description FROM Task WHERE WhoId IN ('{lead}') "
        "AND Subject IN ('Replied to <Launch>')"
    )


async def test_salesforce_a_later_attempt_without_an_earlier_write_creates(
    salesforce_emulator, salesforce_of
):
    lead = salesforce_emulator.seed("Lead", {"LastName": "A", "Company": "C", "Email": "a@b.io"})
    # A Task with the same subject but another key's marker is not this activity's
    salesforce_emulator.seed(
        "Task",
        {"Subject": "Replied to <Launch>", "WhoId": lead, "Description": "[crm-bridge:k10]"},
    )
    connector = await salesforce_of()
    salesforce_emulator.expire_sessions()  # and the lookup survives an expired session

    result = await connector.log_activity(
        activity(object="lead", id_value="a@b.io", record_id=lead, attempt=2)
    )

    assert (result.record_id, result.created) == (lead, True)
    assert len(salesforce_tasks(salesforce_emulator)) == 2
    assert salesforce_emulator.logins == 2


async def test_salesforce_a_locked_row_is_retryable_without_settling(
    salesforce_emulator, salesforce_of
):
    lead = salesforce_emulator.seed("Lead", {"LastName": "A", "Company": "C", "Email": "a@b.io"})
    connector = await salesforce_of()
    salesforce_emulator.lock_rows(1, match="/sobjects/Task")

    with pytest.raises(RetryableDelivery, match="UNABLE_TO_LOCK_ROW") as info:
        await connector.log_activity(activity(object="lead", record_id=lead))

    assert info.value.retry_after is None
    assert salesforce_tasks(salesforce_emulator) == []


# -- end to end --------------------------------------------------------------------------------
RULES = """
  - name: clicked-contact
    when: type == 'click'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
  - name: clicked-note
    when: type == 'click'
    connector: hubspot
    action: log_activity
    activity:
      kind: note
      subject: "Clicked in campaign {{ CampaignId }}"
      body: "{{ contact.first_name }} clicked a link"
"""


async def test_a_note_whose_answer_was_lost_is_logged_once_end_to_end(tmp_path, hubspot_emulator):
    # Given the note's create answered only after the connector's timeout
    hubspot_emulator.delay_next(1, 0.6, match=f"POST {NOTES}")
    settings = {
        "access_token": "pat-na1-test",
        "base_url": hubspot_emulator.url,
        "timeout": 0.2,
        "activity_settle_seconds": 1.0,
    }
    text = config_yaml(tmp_path / "bridge.db", hubspot=settings, rules=RULES)
    client = TestClient(TestServer(create_app(parse_config(text))))
    await client.start_server()
    try:
        # When the event is delivered
        response = await client.post(f"/webhooks/supersend/{TOKEN}", json=sample(first_name="Ada"))
        assert response.status == 202, await response.text()
        event_id = (await response.json())["event_id"]

        async def settled() -> list[dict]:
            while True:
                event = await (await client.get(f"/events/{event_id}")).json()
                deliveries = event["deliveries"]
                if event["routed_at"] and all(d["status"] == "done" for d in deliveries):
                    return deliveries
                await asyncio.sleep(0.02)

        deliveries = await asyncio.wait_for(settled(), 20)
    finally:
        await client.close()

    # Then the contact has exactly one note, found by the retry rather than written twice
    contact = hubspot_emulator.contact_by_email("andrew@xoxo.capital")
    assert contact is not None
    (note,) = hubspot_emulator.engagements_of("notes", contact.id)
    assert "Ada clicked a link" in note.properties["hs_note_body"]
    # The note used the contact id its upsert delivery remembered: no GET by email.
    assert hubspot_emulator.calls_to("GET", "/crm/v3/objects/contacts/") == []
    (logged,) = [d for d in deliveries if d["action"] == "log_activity"]
    assert logged["attempts"] == 2
    assert logged["result"]["created"] is False
    assert logged["result"]["record_id"] == contact.id  # the contact, remembered as its hint
    assert logged["result"]["detail"] == {
        "object_type": "notes",
        "activity_id": note.id,
        "found_existing": True,
    }


# -- the emulator routes these rely on ---------------------------------------------------------
def test_hubspot_emulator_batch_read_reports_missing_ids_with_207(hubspot_emulator):
    task = hubspot_emulator.add_engagement(
        "tasks", {"hs_timestamp": "2024-05-01", "hs_task_body": "b"}
    )
    client = hubspot.HubSpot(access_token="pat-na1-test", host=hubspot_emulator.url, retry=False)
    batch = client.crm.objects.tasks.batch_api
    body = BatchReadInputSimplePublicObjectId(
        properties=["hs_task_body"],
        properties_with_history=[],
        inputs=[SimplePublicObjectId(id=task.id), SimplePublicObjectId(id="999")],
    )
    response, status, _ = batch.read_with_http_info(body)
    assert status == 207
    assert [r.properties["hs_task_body"] for r in response.results] == ["b"]
    assert response.errors[0].context == {"ids": ["999"]}
    batch.api_client.rest_client.pool_manager.clear()


def test_hubspot_emulator_refuses_a_timestamp_that_is_no_datetime(hubspot_emulator):
    client = hubspot.HubSpot(access_token="pat-na1-test", host=hubspot_emulator.url, retry=False)
    notes = client.crm.objects.notes.basic_api
    with pytest.raises(NotesApiException) as info:
        notes.create(NoteInput(properties={"hs_timestamp": "yesterday"}))
    assert info.value.status == 400 and "hs_timestamp" in info.value.body
    notes.api_client.rest_client.pool_manager.clear()


def test_salesforce_emulator_cannot_filter_on_a_long_text_area(salesforce_emulator):
    session = requests.Session()
    session.verify, session.trust_env = salesforce_emulator.ca_path, False
    sf = Salesforce(
        session_id=salesforce_emulator.new_session(),
        instance=salesforce_emulator.instance,
        session=session,
    )
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.query("SELECT Id FROM Task WHERE Description = 'x'")
    assert info.value.content[0]["errorCode"] == "INVALID_FIELD"
    assert "can not be filtered" in info.value.content[0]["message"]
    session.close()
