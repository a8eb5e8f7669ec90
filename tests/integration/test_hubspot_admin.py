"""HubSpot portal rules, through the real SDK against the emulator: property definitions
(validation and coercion), lifecyclestage's forward-only rule, 409 "already exists" on create,
OAuth access tokens renewed from a refresh token."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs

import pytest
from pydantic import ValidationError

from bridge.errors import AuthenticationFailed, PermanentDelivery, RetryableDelivery
from connectors.base import Activity, DeliveryResult, LeadUpsert, WritePolicy
from connectors.hubspot import HubSpotConfig
from tests.emulators.runner import Reply

UPSERT = "/crm/v3/objects/contacts/batch/upsert"
PROPERTIES = "/crm/v3/properties/contacts"
TOKEN = "/oauth/v1/token"
OAUTH = {"client_id": "client-1", "client_secret": "s3cret", "refresh_token": "refresh-1"}


@pytest.fixture
def oauth_portal(hubspot_emulator):
    hubspot_emulator.add_oauth_app(**OAUTH)
    return hubspot_emulator


def contact(email: str, **fields) -> LeadUpsert:
    return LeadUpsert(object="contact", id_value=email, fields=fields)


def paths(emulator, method: str, path: str) -> int:
    return len(emulator.calls_to(method, path))


# -- property validation -------------------------------------------------------------------------
async def test_an_unknown_property_is_refused_before_sending(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    with pytest.raises(PermanentDelivery) as info:
        await connector.upsert_lead(contact("ada@example.com", no_such_property="x"))
    assert "'no_such_property'" in str(info.value) and "'x'" in str(info.value)
    assert info.value.detail["invalid_fields"][0]["field"] == "no_such_property"
    assert hubspot_emulator.calls_to("POST", UPSERT) == []


async def test_an_invalid_option_names_field_value_and_allowed_values(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    leads = [
        contact("a@example.com", hs_lead_status="NEW"),
        contact("b@example.com", hs_lead_status="HOT"),
        contact("c@example.com", lifecyclestage="lead"),
    ]
    ok, bad, other = await connector.upsert_leads(leads)
    assert isinstance(ok, DeliveryResult) and isinstance(other, DeliveryResult)
    assert isinstance(bad, PermanentDelivery)
    message = str(bad)
    assert "'hs_lead_status'" in message and "'HOT'" in message
    assert "NEW, OPEN, IN_PROGRESS" in message
    (problem,) = bad.detail["invalid_fields"]
    assert problem["allowed"][:2] == ["NEW", "OPEN"]
    # One call, without the refused record.
    (call,) = hubspot_emulator.calls_to("POST", UPSERT)
    assert [i["id"] for i in call.json["inputs"]] == ["a@example.com", "c@example.com"]


async def test_custom_enumerations_and_option_case(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_property("tier", "enumeration", "select", ["gold", "silver"])
    hubspot_emulator.add_property("tags", "enumeration", "checkbox", ["a", "b", "c"])
    connector = await hubspot_of()
    await connector.upsert_lead(
        contact("ada@example.com", tier="GOLD", tags=["a", "c"], hs_lead_status="new")
    )
    props = hubspot_emulator.contact_by_email("ada@example.com").properties
    assert (props["tier"], props["tags"], props["hs_lead_status"]) == ("gold", "a;c", "NEW")
    with pytest.raises(PermanentDelivery, match=r"'tier': 'bronze'.*\[gold, silver\]"):
        await connector.upsert_lead(contact("ada@example.com", tier="bronze"))


async def test_definitions_are_cached_and_read_again_on_open(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_property("tier", "enumeration", "select", ["gold"])
    connector = await hubspot_of()
    await connector.upsert_lead(contact("ada@example.com", tier="gold"))
    hubspot_emulator.set_property_options("tier", ["gold", "platinum"])
    # Loaded just now: trusted (no reload within a minute), so the new option is not known yet.
    with pytest.raises(PermanentDelivery, match="platinum"):
        await connector.upsert_lead(contact("ada@example.com", tier="platinum"))
    assert paths(hubspot_emulator, "GET", PROPERTIES) == 1
    await connector.open()
    await connector.upsert_lead(contact("ada@example.com", tier="platinum"))
    assert paths(hubspot_emulator, "GET", PROPERTIES) == 2
    assert hubspot_emulator.contact_by_email("ada@example.com").properties["tier"] == "platinum"


async def test_an_old_cache_is_reloaded_once_before_refusing(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    await connector.upsert_lead(contact("ada@example.com", firstname="Ada"))
    hubspot_emulator.add_property("tier", "enumeration", "select", ["gold"])
    connector._definitions_at = time.monotonic() - 61  # loaded over a minute ago
    await connector.upsert_lead(contact("ada@example.com", tier="gold"))
    assert paths(hubspot_emulator, "GET", PROPERTIES) == 2


async def test_values_are_coerced_to_the_property_types(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_property("opted_in", "bool", "booleancheckbox")
    hubspot_emulator.add_property("employees", "number", "number")
    hubspot_emulator.add_property("birthday", "date", "date")
    hubspot_emulator.add_property("signed_up", "datetime", "date")
    hubspot_emulator.add_property("renewal", "date", "date")
    connector = await hubspot_of()  # coercion does not need validate_properties
    await connector.upsert_lead(
        contact(
            "ada@example.com",
            opted_in=True,
            employees=42.0,
            birthday="1815-12-10T00:00:00Z",
            signed_up=1714564800,  # epoch seconds
            renewal=1717200000000,  # epoch ms at midnight UTC
            firstname=None,
        )
    )
    (call,) = hubspot_emulator.calls_to("POST", UPSERT)
    sent = call.json["inputs"][0]["properties"]
    assert sent["opted_in"] == "true"
    assert sent["employees"] == "42"
    assert sent["birthday"] == "1815-12-10"
    assert sent["signed_up"] == "2024-05-01T12:00:00.000Z"
    assert sent["renewal"] == "2024-06-01"
    assert sent["firstname"] == ""  # None clears
    stored = hubspot_emulator.contact_by_email("ada@example.com").properties
    assert stored["birthday"] == "1815-12-10" and stored["opted_in"] == "true"


@pytest.mark.parametrize(
    ("name", "kind", "value", "expected"),
    [
        ("employees", "number", "many", "a number"),
        ("opted_in", "bool", "maybe", "a boolean"),
        ("birthday", "date", "2024-05-01T10:30:00Z", "midnight UTC"),
        ("birthday", "date", "tomorrow", "a date"),
        ("signed_up", "datetime", "last tuesday", "a datetime"),
    ],
)
async def test_values_of_the_wrong_type_name_field_value_and_type(
    hubspot_emulator, hubspot_of, name, kind, value, expected
):
    hubspot_emulator.add_property(name, kind, "text")
    connector = await hubspot_of()
    with pytest.raises(PermanentDelivery) as info:
        await connector.upsert_lead(contact("ada@example.com", **{name: value}))
    message = str(info.value)
    assert f"'{name}'" in message and repr(value) in message and expected in message
    (problem,) = info.value.detail["invalid_fields"]
    assert (problem["field"], problem["value"], problem["type"]) == (name, value, kind)
    assert hubspot_emulator.calls_to("POST", UPSERT) == []


async def test_a_read_only_property_is_refused(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    with pytest.raises(PermanentDelivery, match="'createdate' is read-only"):
        await connector.upsert_lead(contact("ada@example.com", createdate="2024-01-01"))


async def test_the_emulator_refuses_a_date_that_is_not_midnight(hubspot_emulator, hubspot_of):
    # Without validation the record goes out as given, and HubSpot refuses it.
    hubspot_emulator.add_property("birthday", "date", "date")
    connector = await hubspot_of(validate_properties=False)
    with pytest.raises(PermanentDelivery, match="not midnight"):
        await connector.upsert_lead(contact("ada@example.com", birthday="1714564800001"))


# -- lifecyclestage --------------------------------------------------------------------------------
async def test_a_backward_stage_is_left_out_and_noted(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "customer"})
    connector = await hubspot_of()
    result = await connector.upsert_lead(
        contact("ada@example.com", lifecyclestage="lead", firstname="Ada")
    )
    assert result.detail["lifecyclestage_skipped"] == {"current": "customer", "requested": "lead"}
    props = hubspot_emulator.contact_by_email("ada@example.com").properties
    assert (props["lifecyclestage"], props["firstname"]) == ("customer", "Ada")
    (call,) = hubspot_emulator.calls_to("POST", UPSERT)
    assert "lifecyclestage" not in call.json["inputs"][0]["properties"]
    assert hubspot_emulator.calls_to("PATCH", "/crm/v3/objects/contacts") == []


async def test_demotion_clears_then_sets_the_stage(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "customer"})
    connector = await hubspot_of(lifecycle_demotion=True)
    result = await connector.upsert_lead(contact("ada@example.com", lifecyclestage="lead"))
    assert result.detail["lifecyclestage_demoted"] == {"from": "customer", "to": "lead"}
    assert hubspot_emulator.contact_by_email("ada@example.com").properties["lifecyclestage"] == (
        "lead"
    )
    writes = [
        (c.method, c.json["properties"] if "properties" in c.json else c.json["inputs"])
        for c in hubspot_emulator.calls
        if c.method in ("PATCH", "POST") and not c.path.endswith("/batch/read")
    ]
    assert writes[0] == ("PATCH", {"lifecyclestage": ""})
    assert writes[1][0] == "POST" and writes[1][1][0]["properties"]["lifecyclestage"] == "lead"
    assert len(writes) == 2


async def test_a_rule_writing_the_stage_always_demotes_it_alone(hubspot_emulator, hubspot):
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "customer"})
    hubspot_emulator.add_contact({"email": "bob@example.com", "lifecyclestage": "customer"})
    always = contact("ada@example.com", lifecyclestage="lead").model_copy(
        update={"policies": {"lifecyclestage": WritePolicy(mode="always")}}
    )

    demoted, kept = await hubspot.upsert_leads(
        [always, contact("bob@example.com", lifecyclestage="lead")]
    )

    assert demoted.detail["lifecyclestage_demoted"] == {"from": "customer", "to": "lead"}
    assert kept.detail["lifecyclestage_skipped"] == {"current": "customer", "requested": "lead"}
    stages = {
        email: hubspot_emulator.contact_by_email(email).properties["lifecyclestage"]
        for email in ("ada@example.com", "bob@example.com")
    }
    assert stages == {"ada@example.com": "lead", "bob@example.com": "customer"}


async def test_a_forward_stage_and_a_new_contact_need_no_clear(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "lead"})
    connector = await hubspot_of(lifecycle_demotion=True)
    await connector.upsert_lead(contact("ada@example.com", lifecyclestage="customer"))
    new = await connector.upsert_lead(contact("new@example.com", lifecyclestage="subscriber"))
    assert new.created is True and "lifecyclestage_demoted" not in new.detail
    assert hubspot_emulator.contact_by_email("ada@example.com").properties["lifecyclestage"] == (
        "customer"
    )
    assert hubspot_emulator.calls_to("PATCH", "/crm/v3/objects/contacts") == []


async def test_custom_stages_follow_the_portals_order(hubspot_emulator, hubspot_of):
    hubspot_emulator.set_property_options("lifecyclestage", ["lead", "1234567", "customer"])
    hubspot_emulator.add_contact({"email": "ada@example.com", "lifecyclestage": "customer"})
    connector = await hubspot_of()
    result = await connector.upsert_lead(contact("ada@example.com", lifecyclestage="1234567"))
    assert result.detail["lifecyclestage_skipped"]["requested"] == "1234567"


# -- 409 on create -------------------------------------------------------------------------------
async def test_a_409_on_create_updates_the_existing_contact(hubspot_emulator, hubspot_of):
    hubspot_emulator.add_property("external_id", unique=True)
    existing = hubspot_emulator.add_contact({"email": "ada@example.com"})
    connector = await hubspot_of()
    leads = [
        LeadUpsert(
            id_property="external_id",
            id_value="E1",
            fields={"email": "ada@example.com", "firstname": "Ada"},
        ),
        LeadUpsert(id_property="external_id", id_value="E2", fields={"email": "bob@example.com"}),
    ]
    ada, bob = await connector.upsert_leads(leads)
    assert isinstance(ada, DeliveryResult) and isinstance(bob, DeliveryResult)
    assert (ada.record_id, ada.created) == (existing.id, False)
    assert ada.detail["resolved_conflict"] == existing.id
    assert bob.created is True
    props = hubspot_emulator.contact_by_email("ada@example.com").properties
    assert (props["external_id"], props["firstname"]) == ("E1", "Ada")
    assert len(hubspot_emulator.contacts) == 2
    assert 409 in [c.status for c in hubspot_emulator.calls_to("POST", UPSERT)]
    (patch,) = hubspot_emulator.calls_to("PATCH", "/crm/v3/objects/contacts")
    assert patch.path.endswith(f"/{existing.id}")


# -- OAuth -----------------------------------------------------------------------------------------
async def test_oauth_gets_an_access_token_from_the_refresh_token(oauth_portal, hubspot_of):
    connector = await hubspot_of(access_token=None, oauth=OAUTH)
    await connector.verify()
    assert (await connector.upsert_lead(contact("ada@example.com"))).created is True
    (token_call,) = oauth_portal.calls_to("POST", TOKEN)
    form = {k: v[0] for k, v in parse_qs(token_call.body).items()}
    assert form == {"grant_type": "refresh_token", **OAUTH}
    bearer = {c.headers["Authorization"] for c in oauth_portal.calls if c.path != TOKEN}
    assert len(bearer) == 1 and bearer.pop().removeprefix("Bearer ") in oauth_portal.oauth_tokens


async def test_oauth_renews_before_expiry(oauth_portal, hubspot_of):
    oauth_portal.oauth_expires_in = 1
    connector = await hubspot_of(access_token=None, oauth=OAUTH)
    await connector.verify()
    await asyncio.sleep(1.0)
    await connector.verify()
    assert paths(oauth_portal, "POST", TOKEN) == 2
    assert all(c.status == 200 for c in oauth_portal.calls)  # renewed before any 401


async def test_oauth_renews_once_on_a_401_under_a_lock(oauth_portal, hubspot_of):
    connector = await hubspot_of(access_token=None, oauth=OAUTH)
    await connector.verify()
    oauth_portal.expire_oauth_tokens()
    results = await asyncio.gather(
        *(connector.upsert_lead(contact(f"c{i}@example.com")) for i in range(4))
    )
    assert all(r.created for r in results)
    assert paths(oauth_portal, "POST", TOKEN) == 2
    assert 401 in [c.status for c in oauth_portal.calls]
    # Notes and tasks use the renewed token too.
    activity = Activity(id_value="c0@example.com", subject="Hi", occurred_at=1.7e9, key="k1")
    assert (await connector.log_activity(activity)).created is True


async def test_a_refused_refresh_token_waits_for_a_fixed_config(oauth_portal, hubspot_of):
    connector = await hubspot_of(access_token=None, oauth=OAUTH | {"refresh_token": "revoked"})
    with pytest.raises(AuthenticationFailed, match="BAD_REFRESH_TOKEN") as info:
        await connector.upsert_lead(contact("ada@example.com"))
    assert isinstance(info.value, RetryableDelivery) and info.value.retry_after == 300
    assert oauth_portal.calls_to("POST", UPSERT) == []


def test_oauth_config_is_secret_and_exclusive():
    config = HubSpotConfig.model_validate({"type": "hubspot", "oauth": OAUTH})
    assert config.has_credentials() and "s3cret" not in repr(config)
    assert "refresh-1" not in repr(config)
    with pytest.raises(ValidationError, match="either access_token or oauth"):
        HubSpotConfig.model_validate({"type": "hubspot", "access_token": "pat", "oauth": OAUTH})


# -- the Leads object ---------------------------------------------------------------------------
def wanting_a_lead(email: str, lead: dict | None = None, **fields) -> LeadUpsert:
    return contact(email, **fields).model_copy(update={"hubspot_lead": lead or {}})


async def test_a_rule_can_open_a_lead_associated_with_the_contact(hubspot_emulator, hubspot):
    result = await hubspot.upsert_lead(
        wanting_a_lead(
            "ada@example.com", {"hs_lead_type": "new_business"}, firstname="Ada", lastname="L"
        )
    )

    (lead,) = hubspot_emulator.engagements_of("leads", result.record_id)
    assert lead.properties["hs_lead_name"] == "Ada L"
    assert lead.properties["hs_lead_type"] == "NEW_BUSINESS"  # the option, in any case
    assert result.detail["hubspot_lead"] == {"id": lead.id, "created": True}
    (create,) = hubspot_emulator.calls_to("POST", "/crm/v3/objects/leads")
    (association,) = create.json["associations"]
    assert association["types"] == [
        {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 578}
    ]


async def test_a_contact_gets_one_lead_however_often_it_is_delivered(hubspot_emulator, hubspot):
    first = await hubspot.upsert_lead(wanting_a_lead("ada@example.com"))
    again = await hubspot.upsert_leads(
        [wanting_a_lead("ada@example.com"), wanting_a_lead("ADA@example.com")]
    )

    (lead,) = hubspot_emulator.engagements_of("leads", first.record_id)
    assert lead.properties["hs_lead_name"] == "ada@example.com"  # no name: the email
    assert [o.detail["hubspot_lead"] for o in again] == [{"id": lead.id, "created": False}] * 2


async def test_a_contact_that_has_a_lead_gets_no_other(hubspot_emulator, hubspot):
    existing = hubspot_emulator.add_contact({"email": "ada@example.com"})
    hubspot_emulator.add_engagement("leads", {"hs_lead_name": "From a rep"}, existing.id)

    result = await hubspot.upsert_lead(wanting_a_lead("ada@example.com"))

    assert len(hubspot_emulator.engagements_of("leads", existing.id)) == 1
    assert result.detail["hubspot_lead"]["created"] is False


async def test_a_lead_property_the_portal_refuses_names_the_allowed_values(
    hubspot_emulator, hubspot
):
    with pytest.raises(PermanentDelivery) as info:
        await hubspot.upsert_lead(wanting_a_lead("ada@example.com", {"hs_lead_type": "Hot"}))

    assert str(info.value) == (
        "HubSpot Lead: HubSpot property 'hs_lead_type': 'Hot' is not one of the allowed values: "
        "[NEW_BUSINESS, UPSELL, RE_ATTEMPTING]"
    )
    assert hubspot_emulator.contact_by_email("ada@example.com") is not None
    assert hubspot_emulator.calls_to("POST", "/crm/v3/objects/leads") == []


async def test_describe_reads_the_portal_property_definitions(hubspot):
    contacts = await hubspot.describe("contact")
    leads = await hubspot.describe("leads")

    assert contacts["hs_lead_status"].type == "enumeration"
    assert "CONNECTED" in (contacts["hs_lead_status"].options or ())
    assert contacts["hs_object_id"].writable is False
    assert leads["hs_lead_type"].options == ("NEW_BUSINESS", "UPSELL", "RE_ATTEMPTING")


async def test_contacts_that_landed_get_their_lead_when_a_later_call_fails(
    hubspot_emulator, hubspot_of
):
    hubspot = await hubspot_of(validate_properties=False)  # HubSpot's 400 splits the batch
    leads = [wanting_a_lead(f"l{i}@example.com") for i in range(4)]
    leads[2] = wanting_a_lead("l2@example.com", no_such_property="x")
    # The call that retries the suspect alone meets a bad gateway, after the others landed.
    hubspot_emulator.add_rule(
        lambda call: call.json is not None and len(call.json.get("inputs", [])) == 1,
        1,
        Reply(502, "<html>502 Bad Gateway</html>", {}, "text/html"),
    )

    outcomes = await hubspot.upsert_leads(leads)

    assert isinstance(outcomes[2], RetryableDelivery)
    for i in (0, 1, 3):
        assert outcomes[i].detail["hubspot_lead"]["created"] is True
        contact_id = outcomes[i].record_id
        assert len(hubspot_emulator.engagements_of("leads", contact_id)) == 1
