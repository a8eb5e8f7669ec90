"""What the delivery engine relies on from the HubSpot connector, through the real SDK against
the emulator: activities in batches (one contact lookup and one create per batch, hints used
without lookup, missing contacts reported, once-only on retries), lifecyclestage forward-only
inside a merge too, update-only writes finding no contact, a missing properties API as a
configuration problem, and the pauses the status page shows. Call counts are per endpoint
(`HubSpotEmulator.endpoint_counts`)."""

from __future__ import annotations

import time

import pytest

from bridge.errors import Misconfigured, RetryableDelivery
from connectors.base import Activity, DeliveryResult, LeadUpsert, WritePolicy, combine
from connectors.hubspot import DEFAULT_STAGES, HubSpotConnector

CONTACTS_READ = "POST /crm/v3/objects/contacts/batch/read"
UPSERT = "POST /crm/v3/objects/contacts/batch/upsert"
NOTES_CREATE = "POST /crm/v3/objects/notes/batch/create"
TASKS_CREATE = "POST /crm/v3/objects/tasks/batch/create"
NOTES_READ = "POST /crm/v3/objects/notes/batch/read"
NOTE_LINKS = "POST /crm/v4/associations/contacts/notes/batch/read"
PROPERTIES = "GET /crm/v3/properties/contacts"
OCCURRED_AT = 1714564800.0  # 2024-05-01T12:00:00Z


def note(email: str, key: str, **overrides) -> Activity:
    values = {
        "kind": "note",
        "id_value": email,
        "subject": f"Replied ({key})",
        "occurred_at": OCCURRED_AT,
        "key": key,
    } | overrides
    return Activity(**values)


def contact(email: str, create: bool = True, **fields) -> LeadUpsert:
    return LeadUpsert(object="contact", id_value=email, fields=fields, create=create)


def with_implicit(connector: HubSpotConnector, lead: LeadUpsert) -> LeadUpsert:
    """What the delivery engine does before merging: the connector's implicit policies for the
    fields the rule gave none."""
    extra = {
        k: p
        for k, p in connector.implicit_policies().items()
        if k in lead.fields and k not in lead.policies
    }
    return lead.model_copy(update={"policies": {**lead.policies, **extra}})


def stage(emulator, email: str) -> str | None:
    return emulator.contact_by_email(email).properties.get("lifecyclestage")


# -- activities in batches ---------------------------------------------------------------------
async def test_sixty_notes_cost_one_lookup_and_one_create(hubspot_emulator, hubspot_of):
    # Given 50 contacts HubSpot has and 10 it has not (yet)
    known = {
        f"c{i}@example.com": hubspot_emulator.add_contact({"email": f"c{i}@example.com"}).id
        for i in range(50)
    }
    activities = [note(f"c{i}@example.com", f"k{i}") for i in range(60)]
    hubspot_emulator.reverse_batch_results = True  # HubSpot does not promise input order
    connector = await hubspot_of()

    # When the engine hands the connector one batch of 60 notes
    outcomes = await connector.log_activities(activities)

    # Then two calls in all: a batch read by email and a batch create with associations
    assert hubspot_emulator.endpoint_counts() == {CONTACTS_READ: 1, NOTES_CREATE: 1}
    (read,) = hubspot_emulator.calls_to("POST", "/contacts/batch/read")
    assert read.json["idProperty"] == "email" and len(read.json["inputs"]) == 60
    (create,) = hubspot_emulator.calls_to("POST", "/notes/batch/create")
    assert len(create.json["inputs"]) == 50
    # and each outcome, in input order, is its own note on its own contact
    for i, outcome in enumerate(outcomes[:50]):
        email = f"c{i}@example.com"
        assert isinstance(outcome, DeliveryResult)
        assert (outcome.record_id, outcome.created) == (known[email], True)
        (written,) = hubspot_emulator.engagements_of("notes", known[email])
        assert outcome.detail["activity_id"] == written.id
        assert f"crm-bridge:k{i} " in written.properties["hs_note_body"]
    # and the ten without a contact are reported missing, for the engine to decide
    for i, outcome in enumerate(outcomes[50:], start=50):
        assert outcome.missing is True and f"c{i}@example.com" in outcome.skipped
    assert hubspot_emulator.contacts.keys() == set(known.values())  # none created


async def test_hinted_notes_and_tasks_need_no_lookup(hubspot_emulator, hubspot_of):
    ids = [hubspot_emulator.add_contact({"email": f"h{i}@example.com"}).id for i in range(4)]
    activities = [
        note(f"h{i}@example.com", f"k{i}", kind="task" if i % 2 else "note", record_id=ids[i])
        for i in range(4)
    ]
    connector = await hubspot_of()

    outcomes = await connector.log_activities(activities)

    assert hubspot_emulator.endpoint_counts() == {NOTES_CREATE: 1, TASKS_CREATE: 1}
    assert [o.record_id for o in outcomes] == ids
    assert [len(hubspot_emulator.engagements_of("notes", i)) for i in ids] == [1, 0, 1, 0]
    assert [len(hubspot_emulator.engagements_of("tasks", i)) for i in ids] == [0, 1, 0, 1]
    (tasks,) = hubspot_emulator.calls_to("POST", "/tasks/batch/create")
    spec = tasks.json["inputs"][0]["associations"][0]
    assert spec == {
        "to": {"id": ids[1]},
        "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 204}],
    }


async def test_a_gone_hint_in_a_batch_falls_back_to_its_email_alone(hubspot_emulator, hubspot_of):
    # Given three hinted notes, one of whose contacts was merged away (a new id, same email)
    ada, bob, cy = (
        hubspot_emulator.add_contact({"email": f"{n}@example.com"}).id for n in ("ada", "bob", "cy")
    )
    hubspot_emulator.delete_contact(bob)
    bob_now = hubspot_emulator.add_contact({"email": "bob@example.com"}).id
    activities = [
        note("ada@example.com", "a", record_id=ada),
        note("bob@example.com", "b", record_id=bob),
        note("cy@example.com", "c", record_id=cy),
    ]
    connector = await hubspot_of()

    # When they go out in one batch, which HubSpot refuses over the dead association
    outcomes = await connector.log_activities(activities)

    # Then all three land, bob's on the contact that now has his email
    assert [o.record_id for o in outcomes] == [ada, bob_now, cy]
    assert all(o.created for o in outcomes)
    for contact_id in (ada, bob_now, cy):
        assert len(hubspot_emulator.engagements_of("notes", contact_id)) == 1
    # and it took a check of the hinted ids and one lookup by email, not a call per note
    assert hubspot_emulator.endpoint_counts() == {NOTES_CREATE: 3, CONTACTS_READ: 2}


async def test_a_gone_hint_without_a_contact_by_email_is_missing(hubspot_emulator, hubspot_of):
    gone = hubspot_emulator.add_contact({"email": "gone@example.com"}).id
    hubspot_emulator.delete_contact(gone)
    connector = await hubspot_of()

    result = await connector.log_activity(note("gone@example.com", "k", record_id=gone))

    assert result.missing is True and result.skipped
    assert hubspot_emulator.notes == {}


async def test_a_retry_whose_contact_was_merged_finds_the_note_on_the_survivor(
    hubspot_emulator, hubspot_of
):
    # Given a note an earlier attempt wrote, moved by a merge onto the surviving contact
    merged = hubspot_emulator.add_contact({"email": "old@example.com"}).id
    hubspot_emulator.delete_contact(merged)
    survivor = hubspot_emulator.add_contact({"email": "ada@example.com"}).id
    body = {"hs_timestamp": "1714564800000", "hs_note_body": "<p>x</p><!-- crm-bridge:k -->"}
    earlier = hubspot_emulator.add_engagement("notes", body, survivor)
    connector = await hubspot_of()

    # When the delivery comes again with the merged-away id as its hint
    result = await connector.log_activity(note("ada@example.com", "k", record_id=merged, attempt=2))

    # Then it is found on the contact with the email, and not written twice
    assert (result.record_id, result.created) == (survivor, False)
    assert result.detail["activity_id"] == earlier.id
    assert len(hubspot_emulator.notes) == 1


async def test_a_retried_batch_looks_once_for_all_its_notes(hubspot_emulator, hubspot_of):
    # Given three contacts, one of which already has the note an earlier attempt wrote
    ids = [hubspot_emulator.add_contact({"email": f"r{i}@example.com"}).id for i in range(3)]
    body = {"hs_timestamp": "1714564800000", "hs_note_body": "<p>x</p><!-- crm-bridge:k1 -->"}
    earlier = hubspot_emulator.add_engagement("notes", body, ids[1])
    other = {"hs_timestamp": "1714564800000", "hs_note_body": "<p>someone else's</p>"}
    hubspot_emulator.add_engagement("notes", other, ids[0])
    activities = [note(f"r{i}@example.com", f"k{i}", record_id=ids[i], attempt=2) for i in range(3)]
    connector = await hubspot_of()

    # When the batch is delivered again
    outcomes = await connector.log_activities(activities)

    # Then the one written before is found, the other two written, each note once
    assert outcomes[1].created is False and outcomes[1].detail["activity_id"] == earlier.id
    assert outcomes[1].detail["found_existing"] is True
    assert [outcomes[0].created, outcomes[2].created] == [True, True]
    assert [len(hubspot_emulator.engagements_of("notes", i)) for i in ids] == [2, 1, 1]
    # with one association read and one body read for the whole batch
    assert hubspot_emulator.endpoint_counts() == {NOTE_LINKS: 1, NOTES_READ: 1, NOTES_CREATE: 1}
    (create,) = hubspot_emulator.calls_to("POST", "/notes/batch/create")
    assert len(create.json["inputs"]) == 2


async def test_a_batch_create_without_an_answer_is_looked_for_next_time(
    hubspot_emulator, hubspot_of
):
    ids = [hubspot_emulator.add_contact({"email": f"u{i}@example.com"}).id for i in range(2)]
    activities = [note(f"u{i}@example.com", f"k{i}", record_id=ids[i]) for i in range(2)]
    connector = await hubspot_of(activity_settle_seconds=30)
    # Given a batch create HubSpot performs, but whose answer is lost
    hubspot_emulator.drop_next(1, match=NOTES_CREATE)

    with pytest.raises(RetryableDelivery, match="may have been written") as info:
        await connector.log_activities(activities)
    assert info.value.retry_after == 30

    # Then the engine's in-call retry (the same attempt) finds both instead of writing again
    outcomes = await connector.log_activities(activities)
    assert [o.created for o in outcomes] == [False, False]
    assert [len(hubspot_emulator.engagements_of("notes", i)) for i in ids] == [1, 1]


# -- lifecyclestage: forward only, inside a merge too ----------------------------------------------
async def test_two_writes_of_a_new_contact_in_one_batch_keep_the_later_stage(
    hubspot_emulator, hubspot_of
):
    connector = await hubspot_of()
    interested = contact("new@example.com", lifecyclestage="salesqualifiedlead")
    reply = contact("new@example.com", lifecyclestage="lead")

    first, second = await connector.upsert_leads([interested, reply])

    assert first.created is True and second.record_id == first.record_id
    assert stage(hubspot_emulator, "new@example.com") == "salesqualifiedlead"
    (upsert,) = hubspot_emulator.calls_to("POST", "/contacts/batch/upsert")
    assert upsert.json["inputs"][0]["properties"]["lifecyclestage"] == "salesqualifiedlead"


async def test_a_merge_with_the_implicit_policies_keeps_the_later_stage(
    hubspot_emulator, hubspot_of
):
    # The delivery engine merges two queued writes itself, after applying implicit_policies.
    connector = await hubspot_of()
    interested = with_implicit(
        connector, contact("new@example.com", lifecyclestage="salesqualifiedlead")
    )
    reply = with_implicit(connector, contact("new@example.com", lifecyclestage="lead"))

    result = await connector.upsert_lead(combine(interested, reply))

    assert result.created is True
    assert stage(hubspot_emulator, "new@example.com") == "salesqualifiedlead"


async def test_a_merge_never_moves_an_existing_contact_back(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "lead"})
    connector = await hubspot_of()

    await connector.upsert_leads(
        [
            contact("ada@example.com", lifecyclestage="opportunity"),
            contact("ada@example.com", lifecyclestage="marketingqualifiedlead"),
        ]
    )

    assert stage(hubspot_emulator, "ada@example.com") == "opportunity"


async def test_the_implicit_policy_does_not_demote_like_an_explicit_always(
    hubspot_emulator, hubspot_of
):
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "customer"})
    connector = await hubspot_of()
    implicit = with_implicit(connector, contact("ada@example.com", lifecyclestage="lead"))

    result = await connector.upsert_lead(implicit)

    assert stage(hubspot_emulator, "ada@example.com") == "customer"
    assert result.detail["lifecyclestage_skipped"] == {"current": "customer", "requested": "lead"}
    assert hubspot_emulator.calls_to("PATCH") == []


async def test_implicit_policies_follow_the_portals_stage_order(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    # Before the portal's definitions are read: HubSpot's default order
    (policy,) = connector.implicit_policies().values()
    assert (policy.mode, policy.order) == ("monotonic", DEFAULT_STAGES)
    assert DEFAULT_STAGES[0] == "subscriber" and DEFAULT_STAGES[-1] == "other"
    # After: the portal's own, custom stages included
    hubspot_emulator.set_property_options("lifecyclestage", ["lead", "1234567", "customer"])
    await connector.upsert_lead(contact("ada@example.com", firstname="Ada"))
    assert connector.implicit_policies() == {
        "lifecyclestage": WritePolicy(mode="monotonic", order=("lead", "1234567", "customer"))
    }
    # With demotion configured, nothing is forward-only
    assert (await hubspot_of(lifecycle_demotion=True)).implicit_policies() == {}


async def test_new_contacts_with_a_stage_cost_one_read_per_batch(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    leads = [contact(f"s{i}@example.com", lifecyclestage="lead") for i in range(40)]

    outcomes = await connector.upsert_leads(leads)

    assert all(o.created for o in outcomes)
    # No GET per contact for its current stage: one batch read for all of them.
    assert hubspot_emulator.endpoint_counts() == {PROPERTIES: 1, CONTACTS_READ: 1, UPSERT: 1}


# -- update-only writes --------------------------------------------------------------------------
async def test_an_update_only_write_without_a_contact_is_missing(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_contact({"email": "known@example.com"})
    connector = await hubspot_of()

    missing, updated = await connector.upsert_leads(
        [
            contact("nobody@example.com", create=False, hs_lead_status="OPEN"),
            contact("known@example.com", create=False, hs_lead_status="OPEN"),
        ]
    )

    assert missing.missing is True and "nobody@example.com" in missing.skipped
    assert updated.missing is False and updated.skipped is None
    assert hubspot_emulator.contact_by_email("nobody@example.com") is None
    (upsert,) = hubspot_emulator.calls_to("POST", "/contacts/batch/upsert")
    assert [i["id"] for i in upsert.json["inputs"]] == ["known@example.com"]


# -- a missing metadata API is a configuration problem ---------------------------------------------
@pytest.mark.parametrize("refusal", ["404", "403"])
async def test_a_refused_properties_api_is_misconfiguration(hubspot_emulator, hubspot_of, refusal):
    if refusal == "404":
        hubspot_emulator.unavailable.add("/crm/v3/properties")
    else:
        hubspot_emulator.missing_scopes["/crm/v3/properties"] = "crm.schemas.contacts.read"
    connector = await hubspot_of()

    # Not a PermanentDelivery per record (a dead letter each): the whole call is unusable
    with pytest.raises(Misconfigured, match=refusal) as info:
        await connector.upsert_leads(
            [contact("a@example.com", firstname="A"), contact("b@example.com", firstname="B")]
        )
    assert "/crm/v3/properties/contacts" in str(info.value)
    assert info.value.retry_after and info.value.retry_after > 0
    with pytest.raises(Misconfigured):
        await connector.verify()
    with pytest.raises(Misconfigured):
        await connector.describe("task")
    assert hubspot_emulator.calls_to("POST", "/contacts/batch/upsert") == []


# -- pauses --------------------------------------------------------------------------------------
async def test_pauses_show_a_429_and_a_spent_daily_allocation(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    assert connector.pauses() == []

    hubspot_emulator.fail_next_rate_limited(1, retry_after=30, match=UPSERT)
    with pytest.raises(RetryableDelivery):
        await connector.upsert_lead(contact("a@example.com", firstname="A"))
    (pause,) = connector.pauses()
    assert pause.kind == "rate_limit" and "ten_secondly" in pause.reason
    assert pause.until == pytest.approx(time.time() + 30, abs=2)

    other = await hubspot_of()
    await other.upsert_lead(contact("b@example.com", firstname="B"))  # definitions now cached
    hubspot_emulator.daily_used = hubspot_emulator.daily - 1  # the next call spends the last one
    await other.upsert_lead(contact("b@example.com", firstname="Bea"))
    (pause,) = other.pauses()
    assert pause.kind == "daily_allocation" and "daily" in pause.reason
    assert pause.until == pytest.approx(time.time() + 3600, abs=5)


# -- the emulator routes these rely on, through the SDK alone --------------------------------------
@pytest.fixture
def sdk(hubspot_emulator):
    import hubspot

    client = hubspot.HubSpot(access_token="pat-na1-test", host=hubspot_emulator.url, retry=False)
    apis = {
        "contacts": client.crm.contacts.batch_api,
        "notes": client.crm.objects.notes.batch_api,
        "links": client.crm.associations.v4.batch_api,
    }
    yield apis
    for api in apis.values():
        api.api_client.rest_client.pool_manager.clear()


def test_emulator_batch_creates_notes_with_their_associations(hubspot_emulator, sdk):
    from hubspot.crm.objects.notes import (
        ApiException,
        AssociationSpec,
        BatchInputSimplePublicObjectBatchInputForCreate,
        PublicAssociationsForObject,
        PublicObjectId,
        SimplePublicObjectBatchInputForCreate,
    )

    contact = hubspot_emulator.add_contact({"email": "ada@example.com"})
    spec = AssociationSpec(association_category="HUBSPOT_DEFINED", association_type_id=202)
    body = BatchInputSimplePublicObjectBatchInputForCreate(
        inputs=[
            SimplePublicObjectBatchInputForCreate(
                properties={"hs_timestamp": "2024-05-01T12:00:00.000Z", "hs_note_body": f"n{i}"},
                associations=[
                    PublicAssociationsForObject(to=PublicObjectId(id=contact.id), types=[spec])
                ],
                object_write_trace_id=f"t{i}",
            )
            for i in range(2)
        ]
    )

    response, status, headers = sdk["notes"].create_with_http_info(body)

    assert status == 201 and headers["X-HubSpot-RateLimit-Max"] == "100"
    by_trace = {r.object_write_trace_id: r for r in response.results}
    assert {t: r.properties["hs_note_body"] for t, r in by_trace.items()} == {
        "t0": "n0",
        "t1": "n1",
    }
    assert [n.id for n in hubspot_emulator.engagements_of("notes", contact.id)] == sorted(
        r.id for r in response.results
    )
    # A wrong association type or an unknown contact refuses the whole batch, writing nothing
    body.inputs[1].associations[0].to = PublicObjectId(id="999999")
    with pytest.raises(ApiException) as info:
        sdk["notes"].create(body)
    assert info.value.status == 400 and "association" in info.value.body
    assert len(hubspot_emulator.notes) == 2


def test_emulator_batch_reads_contacts_by_email_with_207_for_the_missing(hubspot_emulator, sdk):
    from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectId

    ada = hubspot_emulator.add_contact({"email": "ada@example.com", "firstname": "Ada"})
    body = BatchReadInputSimplePublicObjectId(
        id_property="email",
        properties=["firstname"],
        properties_with_history=[],
        inputs=[SimplePublicObjectId(id="ADA@example.com"), SimplePublicObjectId(id="no@x.io")],
    )

    response, status, _ = sdk["contacts"].read_with_http_info(body)

    assert status == 207 and response.num_errors == 1
    assert [(r.id, r.properties["firstname"]) for r in response.results] == [(ada.id, "Ada")]
    (error,) = response.errors
    assert (error.category, error.context) == ("OBJECT_NOT_FOUND", {"ids": ["no@x.io"]})


def test_emulator_batch_reads_associations_a_page_per_contact(hubspot_emulator, sdk):
    from hubspot.crm.associations.v4 import (
        BatchInputPublicFetchAssociationsBatchRequest,
        PublicFetchAssociationsBatchRequest,
    )

    busy, quiet = (hubspot_emulator.add_contact({"email": e}).id for e in ("b@x.io", "q@x.io"))
    for _ in range(501):
        hubspot_emulator.add_engagement("notes", {"hs_timestamp": "1714564800000"}, busy)

    def read(*inputs):
        body = BatchInputPublicFetchAssociationsBatchRequest(
            inputs=[PublicFetchAssociationsBatchRequest(id=i, after=a) for i, a in inputs]
        )
        return sdk["links"].get_page_with_http_info("contacts", "notes", body)

    response, status, _ = read((busy, None), (quiet, None))
    assert status == 207  # the contact without notes is an error
    (page,) = response.results
    assert (page._from.id, len(page.to)) == (busy, 500)
    assert page.to[0].association_types[0].type_id == 201  # contact to note
    response, status, _ = read((busy, page.paging.next.after))
    assert status == 200 and len(response.results[0].to) == 1 and response.results[0].paging is None


def test_emulator_counts_calls_per_endpoint(hubspot_emulator, sdk):
    from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectId

    body = BatchReadInputSimplePublicObjectId(
        properties=[], properties_with_history=[], inputs=[SimplePublicObjectId(id="1")]
    )
    for _ in range(2):
        sdk["contacts"].read_with_http_info(body)

    assert hubspot_emulator.endpoint_counts() == {CONTACTS_READ: 2}
    assert hubspot_emulator.endpoint_counts(since=1) == {CONTACTS_READ: 1}
