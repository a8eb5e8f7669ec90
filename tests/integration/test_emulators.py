"""The emulators driven through the real SDKs: every route and every failure switch.

Time-dependent behaviour (rate windows, search lag) runs on a ManualClock; slow
responses use sub-second latencies against even shorter client timeouts.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import aiohttp
import hubspot
import jwt
import pytest
import requests
import urllib3
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hubspot.crm.associations.v4 import ApiException as AssociationsApiException
from hubspot.crm.contacts import (
    ApiException,
    BatchInputSimplePublicObjectBatchInputUpsert,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInputUpsert,
    SimplePublicObjectInput,
    SimplePublicObjectInputForCreate,
)
from hubspot.crm.contacts.exceptions import (
    NotFoundException,
    ServiceException,
    UnauthorizedException,
)
from hubspot.crm.objects.notes import ApiException as NotesApiException
from hubspot.crm.objects.notes import AssociationSpec, PublicAssociationsForObject, PublicObjectId
from hubspot.crm.objects.notes import (
    SimplePublicObjectInputForCreate as NoteInput,
)
from hubspot.crm.properties import ApiException as PropertiesApiException
from simple_salesforce import Salesforce, SalesforceLogin, format_external_id, format_soql
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceMalformedRequest,
    SalesforceMoreThanOneRecord,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)
from simple_salesforce.login import token_login

from tests.emulators import HubSpotEmulator, LocalCA, ManualClock, SalesforceEmulator, ServerThread
from tests.emulators.salesforce import sf_id18

TOKEN = "pat-na1-test"


# -- HubSpot fixtures -----------------------------------------------------------------------------
def hubspot_apis(url: str, token: str = TOKEN, **config: Any) -> SimpleNamespace:
    """API objects built once, as the doc advises (each access makes a new pool)."""
    client = hubspot.HubSpot(access_token=token, host=url, retry=False, **config)
    return SimpleNamespace(
        basic=client.crm.contacts.basic_api,
        batch=client.crm.contacts.batch_api,
        search=client.crm.contacts.search_api,
        notes=client.crm.objects.notes.basic_api,
        assoc=client.crm.associations.v4.basic_api,
        props=client.crm.properties.core_api,
    )


def close_apis(apis: SimpleNamespace) -> None:
    for api in vars(apis).values():
        api.api_client.rest_client.pool_manager.clear()


@pytest.fixture
def hs(hubspot_emulator: HubSpotEmulator) -> Iterator[SimpleNamespace]:
    apis = hubspot_apis(hubspot_emulator.url)
    yield apis
    close_apis(apis)


@pytest.fixture
def clock(hubspot_emulator: HubSpotEmulator) -> ManualClock:
    hubspot_emulator.clock = clock = ManualClock()
    return clock


def create_contact(hs: SimpleNamespace, **props: str) -> Any:
    return hs.basic.create(SimplePublicObjectInputForCreate(properties=props))


def error_body(exc: Any) -> dict[str, Any]:
    return json.loads(exc.body)


def email_search(email: str, **kwargs: Any) -> PublicObjectSearchRequest:
    flt = Filter(property_name="email", operator="EQ", value=email)
    return PublicObjectSearchRequest(filter_groups=[FilterGroup(filters=[flt])], **kwargs)


def plain_session(verify: Any = True) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = verify
    return session


# -- HubSpot: contacts ----------------------------------------------------------------------------
def test_hubspot_create_contact_returns_record_and_rate_headers(hubspot_emulator, hs):
    record, status, headers = hs.basic.create_with_http_info(
        SimplePublicObjectInputForCreate(
            properties={"email": "Ann@Example.com", "firstname": "Ann"}
        )
    )
    assert status == 201
    assert record.properties["email"] == "ann@example.com"  # HubSpot lower-cases emails
    assert record.properties["hs_object_id"] == record.id
    assert {"createdate", "lastmodifieddate"} <= record.properties.keys()
    assert record.created_at is not None and record.archived is False
    assert headers["X-HubSpot-RateLimit-Max"] == "100"
    assert headers["X-HubSpot-RateLimit-Remaining"] == "99"
    assert headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert headers["X-HubSpot-RateLimit-Daily"] == "250000"
    assert headers["X-HubSpot-RateLimit-Daily-Remaining"] == "249999"
    assert hubspot_emulator.contacts[record.id].properties["firstname"] == "Ann"
    [call] = hubspot_emulator.calls
    assert (call.method, call.path, call.status) == ("POST", "/crm/v3/objects/contacts", 201)
    assert call.json == {"properties": {"email": "Ann@Example.com", "firstname": "Ann"}}
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"


def test_hubspot_duplicate_email_is_409_conflict(hs):
    first = create_contact(hs, email="dup@example.com")
    with pytest.raises(ApiException) as info:
        create_contact(hs, email="DUP@example.com")
    body = error_body(info.value)
    assert info.value.status == 409
    assert body["category"] == "CONFLICT"
    assert body["message"] == f"Contact already exists. Existing ID: {first.id}"
    assert body["status"] == "error" and body["correlationId"]


def test_hubspot_get_by_email_with_repeated_properties(hubspot_emulator, hs):
    created = create_contact(hs, email="a+b@example.com", firstname="A", phone="1")
    got = hs.basic.get_by_id(
        "A+B@example.com", id_property="email", properties=["firstname", "jobtitle"]
    )
    assert got.id == created.id
    assert got.properties == {
        "firstname": "A",
        "jobtitle": None,  # requested but unset comes back as null
        "createdate": created.properties["createdate"],
        "hs_object_id": created.id,
        "lastmodifieddate": created.properties["lastmodifieddate"],
    }
    call = hubspot_emulator.calls[-1]
    assert call.raw_path.endswith("/A%2BB%40example.com")  # the SDK percent-encodes path ids
    assert call.query["properties"] == ["firstname", "jobtitle"]
    by_id = hs.basic.get_by_id(created.id)
    assert set(by_id.properties) == {
        "createdate",
        "email",
        "firstname",
        "hs_object_id",
        "lastmodifieddate",
        "lastname",
    }


def test_hubspot_get_unknown_contact_is_404(hs):
    with pytest.raises(NotFoundException) as info:
        hs.basic.get_by_id("nobody@example.com", id_property="email")
    body = error_body(info.value)
    assert body["category"] == "OBJECT_NOT_FOUND"
    assert body["context"] == {"id": ["nobody@example.com"]}


def test_hubspot_update_by_email_and_by_id(hubspot_emulator, hs):
    created = create_contact(hs, email="u@example.com", firstname="Old")
    updated = hs.basic.update(
        "U@example.com",
        SimplePublicObjectInput(properties={"firstname": "New"}),
        id_property="email",
    )
    assert updated.properties["firstname"] == "New"
    assert hubspot_emulator.calls[-1].query["idProperty"] == ["email"]
    hs.basic.update(created.id, SimplePublicObjectInput(properties={"phone": "42"}))
    stored = hubspot_emulator.contact_by_email("u@example.com")
    assert stored is not None and stored.properties["phone"] == "42"
    with pytest.raises(NotFoundException):
        hs.basic.update(
            "x@example.com", SimplePublicObjectInput(properties={"phone": "1"}), id_property="email"
        )


def test_hubspot_update_to_another_contacts_email_is_409(hs):
    create_contact(hs, email="one@example.com")
    two = create_contact(hs, email="two@example.com")
    with pytest.raises(ApiException) as info:
        hs.basic.update(two.id, SimplePublicObjectInput(properties={"email": "ONE@example.com"}))
    assert info.value.status == 409


def test_hubspot_lifecyclestage_only_moves_forward(hubspot_emulator, hs):
    contact = create_contact(hs, email="l@example.com", lifecyclestage="opportunity")

    def stage_after(value: str) -> str | None:
        hs.basic.update(contact.id, SimplePublicObjectInput(properties={"lifecyclestage": value}))
        return hubspot_emulator.contacts[contact.id].properties.get("lifecyclestage")

    assert stage_after("lead") == "opportunity"  # backwards: silently ignored
    assert stage_after("customer") == "customer"
    assert stage_after("") is None  # empty string clears
    assert stage_after("lead") == "lead"


@pytest.mark.parametrize(
    ("props", "code"),
    [
        ({"favourite_colour": "red"}, "PROPERTY_DOESNT_EXIST"),
        ({"hs_lead_status": "MAYBE"}, "INVALID_OPTION"),
        ({"lifecyclestage": "friend"}, "INVALID_OPTION"),
        ({"email": "not-an-email"}, "INVALID_EMAIL"),
        ({"hs_object_id": "5"}, "READ_ONLY_VALUE"),
    ],
)
def test_hubspot_validation_errors_are_400(hubspot_emulator, hs, props, code):
    with pytest.raises(ApiException) as info:
        create_contact(hs, **props)
    body = error_body(info.value)
    assert info.value.status == 400
    assert (
        body["status"] == "error"
        and body["category"] == "VALIDATION_ERROR"
        and body["correlationId"]
    )
    assert body["message"].startswith("Property values were not valid: [")
    [error] = body["errors"]
    assert error["code"] == code
    assert error["context"] == {"propertyName": [next(iter(props))]}
    assert not hubspot_emulator.contacts


def test_hubspot_custom_property_and_options(hubspot_emulator, hs):
    hubspot_emulator.add_property("bridge_source", options=None)
    hubspot_emulator.add_property("tier", "enumeration", "select", ["gold", "silver"])
    contact = create_contact(hs, email="c@example.com", bridge_source="supersend", tier="gold")
    assert contact.properties["bridge_source"] == "supersend"
    with pytest.raises(ApiException):
        create_contact(hs, email="d@example.com", tier="bronze")
    hubspot_emulator.set_property_options("hs_lead_status", ["NEW", "HOT"])
    assert (
        create_contact(hs, email="e@example.com", hs_lead_status="HOT").properties["hs_lead_status"]
        == "HOT"
    )


def test_hubspot_batch_upsert_creates_and_updates(hubspot_emulator, hs):
    existing = create_contact(hs, email="old@example.com", firstname="Old")
    inputs = [
        SimplePublicObjectBatchInputUpsert(
            id="OLD@example.com", id_property="email", properties={"firstname": "Upd"}
        ),
        SimplePublicObjectBatchInputUpsert(
            id="new@example.com", id_property="email", properties={"firstname": "N"}
        ),
    ]
    result, status, _ = hs.batch.upsert_with_http_info(
        BatchInputSimplePublicObjectBatchInputUpsert(inputs=inputs)
    )
    assert status == 200
    assert result.status == "COMPLETE" and result.started_at and result.completed_at
    by_email = {r.properties["email"]: r for r in result.results}
    assert (
        by_email["old@example.com"].new is False and by_email["old@example.com"].id == existing.id
    )
    assert by_email["new@example.com"].new is True
    assert hubspot_emulator.contact_by_email("old@example.com").properties["firstname"] == "Upd"
    assert hubspot_emulator.calls[-1].json["inputs"][0]["idProperty"] == "email"


def test_hubspot_batch_upsert_with_an_invalid_input_writes_nothing(hubspot_emulator, hs):
    inputs = [
        SimplePublicObjectBatchInputUpsert(
            id="a@example.com", id_property="email", properties={"firstname": "A"}
        ),
        SimplePublicObjectBatchInputUpsert(
            id="b@example.com", id_property="email", properties={"bogus": "x"}
        ),
    ]
    with pytest.raises(ApiException) as info:
        hs.batch.upsert(BatchInputSimplePublicObjectBatchInputUpsert(inputs=inputs))
    assert info.value.status == 400 and error_body(info.value)["category"] == "VALIDATION_ERROR"
    assert not hubspot_emulator.contacts


def test_hubspot_batch_upsert_by_missing_object_id_is_207(hubspot_emulator):
    session = plain_session()
    response = session.post(
        f"{hubspot_emulator.url}/crm/v3/objects/contacts/batch/upsert",
        json={"inputs": [{"id": "999", "properties": {"firstname": "x"}}]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    session.close()
    assert response.status_code == 207
    assert response.json()["errors"][0]["category"] == "OBJECT_NOT_FOUND"


# -- HubSpot: search ------------------------------------------------------------------------------
def test_hubspot_search_by_email_has_no_rate_headers(hs):
    create_contact(hs, email="s@example.com", firstname="S")
    create_contact(hs, email="t@example.com")
    page, status, headers = hs.search.do_search_with_http_info(
        email_search("S@EXAMPLE.com", properties=["firstname"])
    )
    assert status == 200 and page.total == 1
    assert page.results[0].properties["firstname"] == "S"
    assert not [h for h in headers if h.lower().startswith("x-hubspot-ratelimit")]


def test_hubspot_search_pages_with_after(hs):
    for i in range(3):
        create_contact(hs, email=f"p{i}@example.com", company="Acme")
    flt = Filter(property_name="company", operator="EQ", value="acme")
    request = PublicObjectSearchRequest(filter_groups=[FilterGroup(filters=[flt])], limit=2)
    first = hs.search.do_search(request)
    assert first.total == 3 and len(first.results) == 2
    request.after = first.paging.next.after
    second = hs.search.do_search(request)
    assert len(second.results) == 1 and second.paging is None


def test_hubspot_search_other_operators(hs):
    create_contact(hs, email="x1@example.com", firstname="Zed")
    create_contact(hs, email="x2@example.com")
    has = Filter(property_name="firstname", operator="HAS_PROPERTY")
    within = Filter(
        property_name="email", operator="IN", values=["x1@example.com", "x2@example.com"]
    )
    result = hs.search.do_search(
        PublicObjectSearchRequest(filter_groups=[FilterGroup(filters=[has, within])])
    )
    assert [r.properties["email"] for r in result.results] == ["x1@example.com"]
    token = Filter(property_name="email", operator="CONTAINS_TOKEN", value="x2*")
    assert (
        hs.search.do_search(
            PublicObjectSearchRequest(filter_groups=[FilterGroup(filters=[token])])
        ).total
        == 1
    )


def test_hubspot_search_is_limited_to_five_per_second(hubspot_emulator, hs, clock):
    for _ in range(5):
        hs.search.do_search(email_search("a@example.com"))
    with pytest.raises(ApiException) as info:
        hs.search.do_search(email_search("a@example.com"))
    assert info.value.status == 429
    assert error_body(info.value)["message"] == "You have reached your secondly limit."
    clock.advance(1.0)
    assert hs.search.do_search(email_search("a@example.com")).total == 0


def test_hubspot_search_lags_behind_writes(hubspot_emulator, hs, clock):
    hubspot_emulator.search_delay = 2.0
    create_contact(hs, email="late@example.com")
    assert hs.search.do_search(email_search("late@example.com")).total == 0
    clock.advance(2.0)
    assert hs.search.do_search(email_search("late@example.com")).total == 1


# -- HubSpot: notes, associations, properties -----------------------------------------------------
def test_hubspot_note_with_contact_association(hubspot_emulator, hs):
    contact = create_contact(hs, email="n@example.com")
    spec = AssociationSpec(association_category="HUBSPOT_DEFINED", association_type_id=202)
    note = hs.notes.create(
        NoteInput(
            properties={"hs_timestamp": "2024-01-01T00:00:00Z", "hs_note_body": "clicked"},
            associations=[
                PublicAssociationsForObject(to=PublicObjectId(id=contact.id), types=[spec])
            ],
        )
    )
    assert note.properties["hs_note_body"] == "clicked"
    assert (note.id, contact.id) in hubspot_emulator.associations
    linked = hs.basic.get_by_id(contact.id, associations=["notes"])
    assert linked.associations["notes"].results[0].id == note.id


@pytest.mark.parametrize(
    ("properties", "to_id", "type_id"),
    [
        ({"hs_note_body": "no timestamp"}, None, 202),
        ({"hs_timestamp": "2024-01-01T00:00:00Z"}, "999999", 202),
        ({"hs_timestamp": "2024-01-01T00:00:00Z"}, None, 1),
    ],
)
def test_hubspot_invalid_notes_are_400(hubspot_emulator, hs, properties, to_id, type_id):
    contact = create_contact(hs, email="m@example.com")
    spec = AssociationSpec(association_category="HUBSPOT_DEFINED", association_type_id=type_id)
    assoc = PublicAssociationsForObject(to=PublicObjectId(id=to_id or contact.id), types=[spec])
    with pytest.raises(NotesApiException) as info:
        hs.notes.create(NoteInput(properties=properties, associations=[assoc]))
    assert info.value.status == 400
    assert not hubspot_emulator.notes


def test_hubspot_default_association_v4(hubspot_emulator, hs):
    contact = create_contact(hs, email="v4@example.com")
    note = hs.notes.create(NoteInput(properties={"hs_timestamp": "1700000000000"}))
    result = hs.assoc.create_default("notes", note.id, "contacts", contact.id)
    assert result.status == "COMPLETE"
    assert {r.association_spec.association_type_id for r in result.results} == {201, 202}
    assert (note.id, contact.id) in hubspot_emulator.associations
    assert hubspot_emulator.calls[-1].method == "PUT"
    with pytest.raises(AssociationsApiException) as info:
        hs.assoc.create_default("notes", note.id, "contacts", "999999")
    assert info.value.status == 404


def test_hubspot_default_association_from_the_contact_side(hubspot_emulator, hs):
    contact = create_contact(hs, email="side@example.com")
    note = hs.notes.create(NoteInput(properties={"hs_timestamp": "1700000000000"}))
    result = hs.assoc.create_default("contacts", contact.id, "notes", note.id)
    assert result.results[0].association_spec.association_type_id == 201
    assert (note.id, contact.id) in hubspot_emulator.associations


def test_hubspot_search_sorts_and_free_text(hs):
    for name in ("Bea", "Al", "Cy"):
        create_contact(hs, email=f"{name.lower()}@example.com", firstname=name)
    request = PublicObjectSearchRequest(
        sorts=[{"propertyName": "firstname", "direction": "DESCENDING"}]
    )
    assert [r.properties["firstname"] for r in hs.search.do_search(request).results] == [
        "Cy",
        "Bea",
        "Al",
    ]
    assert hs.search.do_search(PublicObjectSearchRequest(query="bea")).total == 1


def test_hubspot_contact_property_definitions(hubspot_emulator, hs):
    hubspot_emulator.add_property("bridge_key", label="Bridge key")
    props = {p.name: p for p in hs.props.get_all("contacts").results}
    for name in ("email", "firstname", "lastname", "phone", "company", "jobtitle", "website"):
        assert props[name].type == "string"
    assert props["lifecyclestage"].type == "enumeration"
    assert [o.value for o in props["lifecyclestage"].options][:2] == ["subscriber", "lead"]
    assert "ATTEMPTED_TO_CONTACT" in [o.value for o in props["hs_lead_status"].options]
    assert props["bridge_key"].label == "Bridge key"
    assert hs.props.get_by_name("contacts", "email").has_unique_value is True
    with pytest.raises(PropertiesApiException) as info:
        hs.props.get_by_name("contacts", "no_such_property")
    assert info.value.status == 404
    with pytest.raises(PropertiesApiException) as info:
        hs.props.get_all("widgets")
    assert error_body(info.value)["message"] == "Unable to infer object type from: widgets"


# -- HubSpot: auth, rate limits, routing ----------------------------------------------------------
def test_hubspot_bad_token_is_401(hubspot_emulator):
    apis = hubspot_apis(hubspot_emulator.url, token="pat-na1-wrong")
    with pytest.raises(UnauthorizedException) as info:
        create_contact(apis, email="x@example.com")
    close_apis(apis)
    body = error_body(info.value)
    assert body["category"] == "INVALID_AUTHENTICATION"
    assert body["message"].startswith("Authentication credentials not found.")
    assert "X-HubSpot-RateLimit-Remaining" not in info.value.headers


@pytest.mark.parametrize("retry_after", [None, 3])
def test_hubspot_ten_second_window(hubspot_emulator, hs, clock, retry_after):
    hubspot_emulator.tier_max = 3
    hubspot_emulator.retry_after = retry_after
    for i in range(3):
        create_contact(hs, email=f"r{i}@example.com")
    with pytest.raises(ApiException) as info:
        create_contact(hs, email="r3@example.com")
    body = error_body(info.value)
    assert info.value.status == 429
    assert body["policyName"] == "TEN_SECONDLY_ROLLING" and body["errorType"] == "RATE_LIMIT"
    assert body["message"] == "You have reached your ten_secondly_rolling limit."
    assert info.value.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert info.value.headers.get("Retry-After") == (None if retry_after is None else "3")
    clock.advance(10.0)
    assert create_contact(hs, email="r3@example.com").id


def test_hubspot_exhaust_rate_limit_and_daily_limit(hubspot_emulator, hs):
    hubspot_emulator.exhaust_rate_limit()
    with pytest.raises(PropertiesApiException) as info:  # each SDK package has its own exceptions
        hs.props.get_all("contacts")
    assert info.value.status == 429
    hubspot_emulator.tier_max = 1000
    hubspot_emulator.daily_used = hubspot_emulator.daily
    with pytest.raises(ApiException) as info:
        create_contact(hs, email="day@example.com")
    assert error_body(info.value)["policyName"] == "DAILY"
    assert info.value.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "0"


def test_hubspot_fail_next_with_match_and_method(hubspot_emulator, hs):
    hubspot_emulator.fail_next(
        1, 418, body={"teapot": True}, headers={"X-Test": "1"}, match="POST /contacts"
    )
    assert hs.props.get_all("contacts").results  # neither the method nor the path match
    with pytest.raises(ApiException) as info:
        create_contact(hs, email="f@example.com")
    assert info.value.status == 418 and error_body(info.value) == {"teapot": True}
    assert info.value.headers["X-Test"] == "1"
    assert create_contact(hs, email="f@example.com").id  # one-shot
    hubspot_emulator.fail_next(2, 500, method="GET")
    with pytest.raises(ServiceException):
        hs.basic.get_by_id("f@example.com", id_property="email")
    hubspot_emulator.clear_failures()
    assert hs.basic.get_by_id("f@example.com", id_property="email").id


def test_hubspot_named_failure_helpers(hubspot_emulator, hs):
    hubspot_emulator.fail_next_rate_limited(retry_after=1.5)
    with pytest.raises(ApiException) as info:
        create_contact(hs, email="h@example.com")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1.5"
    assert error_body(info.value)["policyName"] == "TEN_SECONDLY_ROLLING"
    hubspot_emulator.fail_next_server_error(status=503)
    with pytest.raises(ServiceException) as info:
        create_contact(hs, email="h@example.com")
    assert info.value.status == 503 and "<html>" in info.value.body
    hubspot_emulator.fail_next(1, 429)  # default body for the status
    with pytest.raises(ApiException) as info:
        create_contact(hs, email="h@example.com")
    assert error_body(info.value)["errorType"] == "RATE_LIMIT"
    assert not hubspot_emulator.contacts  # injected failures never reach the state


def test_hubspot_latency_and_delay_next_trip_client_timeouts(hubspot_emulator, hs):
    hubspot_emulator.delay_next(1, 0.5, match="/properties/")
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        hs.props.get_all("contacts", _request_timeout=(1.0, 0.05))
    assert hs.props.get_all("contacts", _request_timeout=(1.0, 2.0)).results
    hubspot_emulator.latency = 0.5
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        hs.basic.create(
            SimplePublicObjectInputForCreate(properties={"email": "slow@example.com"}),
            _request_timeout=(1.0, 0.05),
        )


def test_hubspot_unknown_route_is_jetty_404_and_wrong_method_405(hubspot_emulator):
    session = plain_session()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    missing = session.get(f"{hubspot_emulator.url}/crm/v3/nothing/here", headers=auth)
    wrong = session.delete(f"{hubspot_emulator.url}/crm/v3/objects/contacts/search", headers=auth)
    session.close()
    assert missing.status_code == 404 and "HTTP ERROR 404" in missing.text
    assert missing.headers["Content-Type"].startswith("text/html")
    assert "X-HubSpot-RateLimit-Remaining" in missing.headers
    assert wrong.status_code == 405


def test_hubspot_over_tls(tls_ca: LocalCA):
    with HubSpotEmulator(tls=tls_ca) as emulator:
        assert emulator.url.startswith("https://127.0.0.1:")
        apis = hubspot_apis(emulator.url, ssl_ca_cert=str(tls_ca.ca_path))
        assert create_contact(apis, email="tls@example.com").id
        close_apis(apis)


async def test_hubspot_emulator_from_async_code(hubspot_emulator):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        url = f"{hubspot_emulator.url}/crm/v3/objects/contacts"
        async with session.post(
            url, json={"properties": {"email": "as@example.com"}}, headers=headers
        ) as r:
            assert r.status == 201
            assert (await r.json())["properties"]["email"] == "as@example.com"


def test_hubspot_emulator_reachable_from_another_process(hubspot_emulator):
    hubspot_emulator.add_contact({"email": "proc@example.com"})
    script = (
        "import sys, urllib.request\n"
        "auth = {'Authorization': 'Bearer ' + sys.argv[2]}\n"
        "req = urllib.request.Request(sys.argv[1], headers=auth)\n"
        "print(urllib.request.urlopen(req).status)\n"
    )
    url = f"{hubspot_emulator.url}/crm/v3/objects/contacts/proc%40example.com?idProperty=email"
    out = subprocess.run(
        [sys.executable, "-c", script, url, TOKEN], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "200"


# -- runner ---------------------------------------------------------------------------------------
def test_server_threads_get_distinct_ports_and_stop_cleanly():
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    apps = []
    for _ in range(2):
        app = web.Application()
        app.router.add_get("/", hello)
        apps.append(ServerThread(app).start())
    assert apps[0].port != apps[1].port and apps[0].port
    session = plain_session()
    assert session.get(apps[0].url).text == "hi"
    for server in apps:
        server.stop()
        server.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        session.get(apps[0].url, timeout=1)
    session.close()


def test_server_thread_reports_startup_failure():
    with pytest.raises(RuntimeError, match="failed to start"):
        ServerThread(web.Application(), host="203.0.113.1").start()


async def test_server_thread_async_context_manager():
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="async")

    app = web.Application()
    app.router.add_get("/", hello)
    async with ServerThread(app) as server, aiohttp.ClientSession() as session:
        async with session.get(server.url) as response:
            assert await response.text() == "async"


# -- Salesforce fixtures --------------------------------------------------------------------------
@pytest.fixture
def sf_session(salesforce_emulator: SalesforceEmulator) -> Iterator[requests.Session]:
    session = plain_session(verify=salesforce_emulator.ca_path)
    yield session
    session.close()


def sf_login(
    emulator: SalesforceEmulator, session: requests.Session, version: str = "59.0"
) -> Salesforce:
    session_id, instance = SalesforceLogin(
        username="user@example.com",
        password="pw",
        security_token="tok",
        scratch_url=emulator.url,
        session=session,
        sf_version=version,
    )
    return Salesforce(
        session_id=session_id, instance_url=f"https://{instance}", session=session, version=version
    )


@pytest.fixture
def sf(salesforce_emulator: SalesforceEmulator, sf_session: requests.Session) -> Salesforce:
    return sf_login(salesforce_emulator, sf_session)


def lead(**extra: Any) -> dict[str, Any]:
    return {"LastName": "Doe", "Company": "Acme", **extra}


def first_error(exc: Any) -> dict[str, Any]:
    return exc.value.content[0]


# -- Salesforce: logins ---------------------------------------------------------------------------
def test_salesforce_soap_login(salesforce_emulator, sf_session):
    session_id, instance = SalesforceLogin(
        username="user@example.com",
        password="pw",
        security_token="tok",
        scratch_url=salesforce_emulator.url,
        session=sf_session,
    )
    assert instance == f"127.0.0.1:{salesforce_emulator.port}"
    assert session_id in salesforce_emulator.sessions and salesforce_emulator.logins == 1
    call = salesforce_emulator.calls[-1]
    assert call.path == "/services/Soap/u/59.0" and call.headers["SOAPAction"] == "login"


def test_salesforce_soap_login_failure_is_a_fault(salesforce_emulator, sf_session):
    with pytest.raises(SalesforceAuthenticationFailed) as info:
        SalesforceLogin(
            username="user@example.com",
            password="pw",
            security_token="wrong",
            scratch_url=salesforce_emulator.url,
            session=sf_session,
        )
    assert info.value.code == "INVALID_LOGIN"
    assert "Invalid username, password, security token" in info.value.auth_message
    assert salesforce_emulator.calls[-1].status == 500 and not salesforce_emulator.sessions


def oauth(
    emulator: SalesforceEmulator, session: requests.Session, data: dict[str, str], **kw: Any
) -> Any:
    """The SDK's own token exchange and response parsing, pointed at the emulator."""
    return token_login(
        f"{emulator.url}/services/oauth2/token",
        data,
        "login",
        "key",
        kw.get("headers"),
        None,
        session,
    )


def test_salesforce_oauth_password_and_client_credentials(salesforce_emulator, sf_session):
    emu = salesforce_emulator
    form = {
        "grant_type": "password",
        "client_id": emu.consumer_key,
        "client_secret": emu.consumer_secret,
        "username": "user@example.com",
        "password": "pwtok",
    }
    token, instance = oauth(emu, sf_session, form)
    assert instance == emu.instance and token in emu.sessions
    raw = sf_session.post(f"{emu.url}/services/oauth2/token", data=form).json()
    assert raw["instance_url"] == emu.url and raw["token_type"] == "Bearer"
    assert {"id", "issued_at", "signature"} <= raw.keys()
    basic = (
        "Basic " + base64.b64encode(f"{emu.consumer_key}:{emu.consumer_secret}".encode()).decode()
    )
    token, _ = oauth(
        emu, sf_session, {"grant_type": "client_credentials"}, headers={"Authorization": basic}
    )
    assert token in emu.sessions
    token, _ = oauth(
        emu,
        sf_session,
        {
            "grant_type": "client_credentials",
            "client_id": emu.consumer_key,
            "client_secret": emu.consumer_secret,
        },
    )
    assert emu.logins == 4


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"client_secret": "nope"}, "invalid_client"),
        ({"client_id": "nope"}, "invalid_client_id"),
        ({"password": "pw"}, "invalid_grant"),  # token not appended
        ({"grant_type": "authorization_code"}, "unsupported_grant_type"),
    ],
)
def test_salesforce_oauth_failures_are_400(salesforce_emulator, sf_session, changes, code):
    emu = salesforce_emulator
    form = {
        "grant_type": "password",
        "client_id": emu.consumer_key,
        "client_secret": emu.consumer_secret,
        "username": "user@example.com",
        "password": "pwtok",
        **changes,
    }
    with pytest.raises(SalesforceAuthenticationFailed) as info:
        oauth(emu, sf_session, form)
    assert info.value.code == code
    assert emu.calls[-1].status == 400


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes, bytes]:
    """(private, its public key, an unrelated private key)."""
    key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem(key), public, private_pem(other)


def jwt_assertion(private: bytes, iss: str, sub: str = "user@example.com", minutes: int = 3) -> str:
    exp = datetime.now(UTC) + timedelta(minutes=minutes)
    claims = {
        "iss": iss,
        "sub": sub,
        "aud": "https://login.salesforce.com",
        "exp": f"{exp.timestamp():.0f}",
    }
    return jwt.encode(claims, private, algorithm="RS256")


def test_salesforce_oauth_jwt_bearer(salesforce_emulator, sf_session, rsa_keys):
    emu = salesforce_emulator
    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    token, _ = oauth(
        emu,
        sf_session,
        {"grant_type": grant, "assertion": jwt_assertion(rsa_keys[0], emu.consumer_key)},
    )
    assert token in emu.sessions
    for assertion, code in [
        (jwt_assertion(rsa_keys[0], "other-key"), "invalid_client_id"),
        (jwt_assertion(rsa_keys[0], emu.consumer_key, minutes=-5), "invalid_grant"),
        ("not-a-jwt", "invalid_grant"),
    ]:
        with pytest.raises(SalesforceAuthenticationFailed) as info:
            oauth(emu, sf_session, {"grant_type": grant, "assertion": assertion})
        assert info.value.code == code
    # An unknown user gets Salesforce's "not approved" text, on which the SDK also warns.
    unknown_user = jwt_assertion(rsa_keys[0], emu.consumer_key, sub="eve@example.com")
    with (
        pytest.warns(UserWarning, match="self-authorize"),
        pytest.raises(SalesforceAuthenticationFailed),
    ):
        oauth(emu, sf_session, {"grant_type": grant, "assertion": unknown_user})
    # With a public key configured the signature is checked too.
    emu.jwt_public_key = rsa_keys[1]
    forged = jwt_assertion(rsa_keys[2], emu.consumer_key)
    with pytest.raises(SalesforceAuthenticationFailed) as info:
        oauth(emu, sf_session, {"grant_type": grant, "assertion": forged})
    assert info.value.code == "invalid_grant"
    assert oauth(
        emu,
        sf_session,
        {"grant_type": grant, "assertion": jwt_assertion(rsa_keys[0], emu.consumer_key)},
    )


# -- Salesforce: sObject rows ---------------------------------------------------------------------
def test_salesforce_create_get_update_delete(salesforce_emulator, sf):
    created = sf.Lead.create(lead(Email="Ann@Example.com"))
    assert created["success"] is True and created["errors"] == []
    lead_id = created["id"]
    assert len(lead_id) == 18 and lead_id.startswith("00Q") and lead_id == sf_id18(lead_id[:15])
    assert salesforce_emulator.calls[-1].raw_path == "/services/data/v59.0/sobjects/Lead/"
    record = sf.Lead.get(lead_id)
    assert record["Status"] == "Open - Not Contacted" and record["IsConverted"] is False
    assert record["attributes"] == {
        "type": "Lead",
        "url": f"/services/data/v59.0/sobjects/Lead/{lead_id}",
    }
    assert sf.Lead.get(lead_id[:15])["Id"] == lead_id  # 15-char ids are accepted
    assert sf.Lead.update(lead_id, {"title": "CTO"}) == 204  # field names are case-insensitive
    assert salesforce_emulator.record(lead_id)["Title"] == "CTO"
    assert sf.Lead.delete(lead_id) == 204
    assert salesforce_emulator.records("Lead") == []
    with pytest.raises(SalesforceResourceNotFound) as info:
        sf.Lead.get(lead_id)
    assert first_error(info)["errorCode"] == "ENTITY_IS_DELETED"


def test_salesforce_missing_records_are_404(sf):
    with pytest.raises(SalesforceResourceNotFound) as info:
        sf.Lead.get(sf_id18("00Q8d00000zzzzz"))
    assert first_error(info) == {
        "errorCode": "NOT_FOUND",
        "message": "The requested resource does not exist",
    }
    with pytest.raises(SalesforceResourceNotFound) as info:
        sf.Lead.get("not-an-id")
    assert first_error(info)["message"].startswith("Provided external ID field does not exist")
    with pytest.raises(SalesforceResourceNotFound):
        sf.restful("sobjects/Widget__c/")


@pytest.mark.parametrize(
    ("fields", "code", "message", "error_fields"),
    [
        (
            {},
            "REQUIRED_FIELD_MISSING",
            "Required fields are missing: [LastName, Company]",
            ["LastName", "Company"],
        ),
        (lead(Foo="x"), "INVALID_FIELD", "No such column 'Foo' on sobject of type Lead", []),
        (
            lead(Status="Hot"),
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "Status: bad value for restricted picklist field: Hot",
            ["Status"],
        ),
        (lead(IsConverted=True), "INVALID_FIELD_FOR_INSERT_UPDATE", None, ["IsConverted"]),
        (
            lead(Email="nope"),
            "INVALID_EMAIL_ADDRESS",
            "Email: invalid email address: nope",
            ["Email"],
        ),
        (lead(FirstName="x" * 41), "STRING_TOO_LONG", None, ["FirstName"]),
    ],
)
def test_salesforce_lead_validation(salesforce_emulator, sf, fields, code, message, error_fields):
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Lead.create(fields)
    error = first_error(info)
    assert error["errorCode"] == code and error["fields"] == error_fields
    if message:
        assert error["message"] == message
    assert salesforce_emulator.records("Lead") == []


def test_salesforce_update_blanking_required_field_fails(sf):
    lead_id = sf.Lead.create(lead())["id"]
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Lead.update(lead_id, {"Company": ""})
    assert first_error(info)["fields"] == ["Company"]


def test_salesforce_contact_and_task(salesforce_emulator, sf):
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Contact.create({"Email": "c@example.com"})
    assert first_error(info)["fields"] == ["LastName"]
    contact_id = sf.Contact.create({"LastName": "C", "AccountId": sf_id18("001000000000001")})["id"]
    assert contact_id.startswith("003")
    task_id = sf.Task.create(
        {"Subject": "Call", "WhoId": contact_id, "ActivityDate": "2024-05-01"}
    )["id"]
    assert task_id.startswith("00T")
    assert salesforce_emulator.record(task_id)["Status"] == "Not Started"
    for who, code in [
        ("bogus", "MALFORMED_ID"),
        (sf_id18("003000000000zzz"), "INVALID_CROSS_REFERENCE_KEY"),
        (task_id, "FIELD_INTEGRITY_EXCEPTION"),
    ]:
        with pytest.raises(SalesforceMalformedRequest) as info:
            sf.Task.create({"Subject": "x", "WhoId": who})
        assert first_error(info)["errorCode"] == code


def test_salesforce_upsert_by_external_id(salesforce_emulator, sf):
    salesforce_emulator.add_field("Lead", "Bridge_Key__c", external_id=True)
    key = format_external_id("Bridge_Key__c", "evt 1/a+b@x.com")
    created = sf.Lead.upsert(key, lead(), raw_response=True)
    assert created.status_code == 201
    assert created.json() == {
        "id": created.json()["id"],
        "success": True,
        "errors": [],
        "created": True,
    }
    assert salesforce_emulator.calls[-1].raw_path.endswith("/Bridge_Key__c/evt%201%2Fa%2Bb%40x.com")
    # get_by_custom_id quote_plus-encodes (space → "+"), which Salesforce reads as a literal "+"
    # (simple-salesforce issue #801); reads by external id need format_external_id + restful.
    with pytest.raises(SalesforceResourceNotFound):
        sf.Lead.get_by_custom_id("Bridge_Key__c", "evt 1/a+b@x.com")
    assert sf.restful("sobjects/Lead/" + key)["Id"] == created.json()["id"]
    updated = sf.Lead.upsert(key, {"Title": "VP"}, raw_response=True)
    assert updated.status_code == 200 and updated.json()["created"] is False
    [record] = salesforce_emulator.records("Lead")
    assert record["Bridge_Key__c"] == "evt 1/a+b@x.com" and record["Title"] == "VP"
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Lead.upsert(format_external_id("Bridge_Key__c", "new"), {"LastName": "only"})
    assert first_error(info)["errorCode"] == "REQUIRED_FIELD_MISSING"
    with pytest.raises(SalesforceResourceNotFound):
        sf.Lead.upsert("Email/a@x.com", lead())  # not an external id field


def test_salesforce_get_by_custom_id_and_multiple_matches(salesforce_emulator, sf):
    salesforce_emulator.add_field("Lead", "Bridge_Key__c", external_id=True)
    first = salesforce_emulator.seed("Lead", lead(Bridge_Key__c="K1"))
    assert sf.Lead.get_by_custom_id("Bridge_Key__c", "k1")["Id"] == first  # case-insensitive
    second = salesforce_emulator.seed("Lead", lead(Bridge_Key__c="K1"))
    with pytest.raises(SalesforceMoreThanOneRecord) as info:
        sf.Lead.upsert("Bridge_Key__c/K1", {"Title": "x"})
    assert info.value.status == 300
    assert info.value.content == [
        f"/services/data/v59.0/sobjects/Lead/{i}" for i in (first, second)
    ]


def test_salesforce_upsert_update_is_204_before_api_46(salesforce_emulator, sf_session):
    old = sf_login(salesforce_emulator, sf_session, version="45.0")
    salesforce_emulator.add_field("Lead", "Bridge_Key__c", external_id=True)
    assert old.Lead.upsert("Bridge_Key__c/k", lead()) == 201
    assert old.Lead.upsert("Bridge_Key__c/k", {"Title": "x"}) == 204


def test_salesforce_task_external_id(salesforce_emulator, sf):
    salesforce_emulator.add_field("Task", "Bridge_Event__c", external_id=True, unique=True)
    assert sf.Task.upsert("Bridge_Event__c/e1", {"Subject": "Clicked"}) == 201
    assert sf.Task.upsert("Bridge_Event__c/e1", {"Subject": "Clicked again"}) == 200
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Task.create({"Subject": "dup", "Bridge_Event__c": "E1"})
    assert first_error(info)["errorCode"] == "DUPLICATE_VALUE"


# -- Salesforce: SOQL -----------------------------------------------------------------------------
def test_salesforce_soql_subset(salesforce_emulator, sf):
    emu = salesforce_emulator
    a = emu.seed("Lead", lead(LastName="O'Brien \\ x", Email="A+B@Example.com", Company="Zeta"))
    b = emu.seed(
        "Lead", lead(LastName="Smith", Email="s@example.com", Status="Working - Contacted")
    )
    c = emu.seed("Lead", lead(LastName="Jones", Company="Beta"))

    def ids(soql: str, *args: Any) -> list[str]:
        return [r["Id"] for r in sf.query(format_soql(soql, *args))["records"]]

    assert ids("SELECT Id FROM Lead WHERE Email = {}", "a+b@example.COM") == [a]
    assert ids("SELECT Id FROM Lead WHERE LastName = {}", "O'Brien \\ x") == [a]
    assert ids("SELECT Id FROM Lead WHERE Email IN {}", ["s@example.com", "A+B@example.com"]) == [
        a,
        b,
    ]
    assert ids("SELECT Id FROM Lead WHERE Email = {}", None) == [c]
    assert ids("SELECT Id FROM Lead WHERE Email != {} ORDER BY LastName", None) == [a, b]
    assert ids(
        "SELECT Id FROM Lead WHERE IsConverted = {} AND Company = 'Acme' OR Company = 'Zeta'", False
    ) == [a, b]
    assert ids(
        "SELECT Id FROM Lead WHERE Status = 'Open - Not Contacted' ORDER BY Company DESC LIMIT 1"
    ) == [a]
    assert ids("SELECT Id FROM Lead WHERE NOT (Company = 'Acme') AND LastName LIKE 'j%'") == [c]
    assert ids("SELECT Id FROM Lead WHERE Id = {}", b[:15]) == [b]
    result = sf.query(format_soql("SELECT Id, email, LastName FROM Lead WHERE Id = {}", a))
    assert result["totalSize"] == 1 and result["done"] is True
    assert list(result["records"][0]) == ["attributes", "Id", "Email", "LastName"]
    assert result["records"][0]["attributes"]["type"] == "Lead"
    assert sf.query("SELECT COUNT() FROM Lead")["totalSize"] == 3
    assert len(sf.query_all("SELECT Id FROM Lead")["records"]) == 3
    assert emu.calls[-1].raw_path == "/services/data/v59.0/query/"


@pytest.mark.parametrize(
    ("soql", "code"),
    [
        ("SELECT Id FROM", "MALFORMED_QUERY"),
        ("SELECT Id FROM Lead WHERE", "MALFORMED_QUERY"),
        ("SELECT Id, Id FROM Lead", "MALFORMED_QUERY"),
        ("SELECT Bogus FROM Lead", "INVALID_FIELD"),
        ("SELECT Id FROM Lead WHERE Bogus = 'x'", "INVALID_FIELD"),
        ("SELECT Id FROM Widget__c", "INVALID_TYPE"),
    ],
)
def test_salesforce_bad_soql_is_400(sf, soql, code):
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.query(soql)
    assert first_error(info)["errorCode"] == code


def test_salesforce_query_all_includes_deleted(salesforce_emulator, sf):
    lead_id = sf.Lead.create(lead())["id"]
    sf.Lead.delete(lead_id)
    assert sf.query("SELECT Id FROM Lead")["totalSize"] == 0
    deleted = sf.query_all("SELECT Id, IsDeleted FROM Lead", include_deleted=True)["records"]
    assert [(r["Id"], r["IsDeleted"]) for r in deleted] == [(lead_id, True)]


# -- Salesforce: Collections, Composite, describe, limits -----------------------------------------
def test_salesforce_collections_create(salesforce_emulator, sf):
    records = [
        {"attributes": {"type": "Lead"}, **lead()},
        {"attributes": {"type": "Contact"}, "Email": "x@y.z"},
    ]
    results = sf.restful(
        "composite/sobjects", method="POST", json={"allOrNone": False, "records": records}
    )
    assert results[0]["success"] is True and results[0]["id"].startswith("00Q")
    assert results[1]["success"] is False
    assert results[1]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    assert len(salesforce_emulator.records("Lead")) == 1
    rolled = sf.restful(
        "composite/sobjects", method="POST", json={"allOrNone": True, "records": records}
    )
    assert rolled[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert len(salesforce_emulator.records("Lead")) == 1  # the second batch left nothing behind
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.restful("composite/sobjects", method="POST", json={"records": records * 101})
    assert first_error(info)["errorCode"] == "EXCEEDED_ID_LIMIT"


def test_salesforce_collections_upsert_and_update(salesforce_emulator, sf):
    salesforce_emulator.add_field("Lead", "Bridge_Key__c", external_id=True)
    existing = salesforce_emulator.seed("Lead", lead(Bridge_Key__c="k1"))
    records = [
        {"attributes": {"type": "Lead"}, "Bridge_Key__c": "k1", "Title": "Upd"},
        {"attributes": {"type": "Lead"}, "Bridge_Key__c": "k2", **lead()},
        {"attributes": {"type": "Lead"}, "Bridge_Key__c": "k3", "LastName": "no company"},
    ]
    results = sf.restful(
        "composite/sobjects/Lead/Bridge_Key__c",
        method="PATCH",
        json={"allOrNone": False, "records": records},
    )
    assert [(r["success"], r.get("created")) for r in results] == [
        (True, False),
        (True, True),
        (False, False),
    ]
    assert results[0]["id"] == existing
    assert salesforce_emulator.record(existing)["Title"] == "Upd"
    rolled = sf.restful(
        "composite/sobjects/Lead/Bridge_Key__c",
        method="PATCH",
        json={"allOrNone": True, "records": [{**records[0], "Title": "Again"}, records[2]]},
    )
    assert [r["success"] for r in rolled] == [False, False]
    assert salesforce_emulator.record(existing)["Title"] == "Upd"
    updates = [{"attributes": {"type": "Lead"}, "Id": existing, "Phone": "1"}]
    assert (
        sf.restful("composite/sobjects", method="PATCH", json={"records": updates})[0]["success"]
        is True
    )
    assert salesforce_emulator.record(existing)["Phone"] == "1"


def test_salesforce_composite_with_references(salesforce_emulator, sf):
    body = {
        "allOrNone": True,
        "compositeRequest": [
            {
                "method": "POST",
                "url": "/services/data/v59.0/sobjects/Lead/",
                "referenceId": "newLead",
                "body": lead(),
            },
            {
                "method": "POST",
                "url": "/services/data/v59.0/sobjects/Task/",
                "referenceId": "newTask",
                "body": {"Subject": "Call", "WhoId": "@{newLead.id}"},
            },
            {
                "method": "GET",
                "url": "/services/data/v59.0/sobjects/Lead/@{newLead.id}",
                "referenceId": "read",
            },
        ],
    }
    usage_before = salesforce_emulator.api_used
    result = sf.restful("composite", method="POST", json=body)["compositeResponse"]
    assert [r["httpStatusCode"] for r in result] == [201, 201, 200]
    lead_id = result[0]["body"]["id"]
    assert salesforce_emulator.record(result[1]["body"]["id"])["WhoId"] == lead_id
    assert salesforce_emulator.api_used == usage_before + 1  # one API call for the whole composite
    body["compositeRequest"][1]["body"]["Status"] = "Bogus"
    failed = sf.restful("composite", method="POST", json=body)["compositeResponse"]
    assert failed[0]["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert len(salesforce_emulator.records("Lead")) == 1  # rolled back


def test_salesforce_describe_and_limits(salesforce_emulator, sf):
    fields = {f["name"]: f for f in sf.Lead.describe()["fields"]}
    assert fields["Status"]["type"] == "picklist"
    assert [p["value"] for p in fields["Status"]["picklistValues"]] == [
        "Open - Not Contacted",
        "Working - Contacted",
        "Closed - Converted",
        "Closed - Not Converted",
    ]
    assert fields["LastName"]["nillable"] is False and fields["IsConverted"]["createable"] is False
    assert fields["Email"]["length"] == 80 and fields["Email"]["updateable"] is True
    salesforce_emulator.add_field("Lead", "Score__c", "double")
    assert "Score__c" in {f["name"] for f in sf.restful("sobjects/Lead/describe/")["fields"]}
    assert {f["name"] for f in sf.Contact.describe()["fields"]} >= {
        "LastName",
        "Email",
        "AccountId",
    }
    assert sf.Task.describe()["keyPrefix"] == "00T"
    limits = sf.limits()
    assert limits["DailyApiRequests"] == {
        "Max": 15000,
        "Remaining": 15000 - salesforce_emulator.api_used,
    }


# -- Salesforce: usage, sessions and failure switches ---------------------------------------------
def test_salesforce_usage_header_and_daily_limit(salesforce_emulator, sf):
    lead_sobject = sf.Lead
    lead_sobject.create(lead())
    assert lead_sobject.api_usage["api-usage"].used == salesforce_emulator.api_used == 1
    assert lead_sobject.api_usage["api-usage"].total == 15000
    salesforce_emulator.daily_max = 2
    sf.query("SELECT Id FROM Lead")
    assert sf.api_usage["api-usage"].used == 2
    with pytest.raises(SalesforceRefusedRequest) as info:
        sf.query("SELECT Id FROM Lead")
    assert first_error(info) == {
        "message": "TotalRequests Limit exceeded.",
        "errorCode": "REQUEST_LIMIT_EXCEEDED",
    }
    assert salesforce_emulator.api_used == 2


def test_salesforce_expire_sessions_then_login_again(salesforce_emulator, sf_session, sf):
    sf.query("SELECT Id FROM Lead")
    salesforce_emulator.expire_sessions()
    with pytest.raises(SalesforceExpiredSession) as info:
        sf.query("SELECT Id FROM Lead")
    assert first_error(info) == {
        "message": "Session expired or invalid",
        "errorCode": "INVALID_SESSION_ID",
    }
    assert sf_login(salesforce_emulator, sf_session).query("SELECT Id FROM Lead")["totalSize"] == 0
    assert salesforce_emulator.logins == 2


def test_salesforce_expire_always_and_one_shot_expiry(salesforce_emulator, sf_session, sf):
    salesforce_emulator.fail_next_expired(1)
    with pytest.raises(SalesforceExpiredSession):
        sf.query("SELECT Id FROM Lead")
    assert sf.query("SELECT Id FROM Lead")["totalSize"] == 0
    salesforce_emulator.expire_always = True
    fresh = sf_login(salesforce_emulator, sf_session)
    with pytest.raises(SalesforceExpiredSession):
        fresh.query("SELECT Id FROM Lead")


def test_salesforce_token_client_and_non_json_401(salesforce_emulator, sf_session):
    sf = Salesforce(
        session_id=salesforce_emulator.new_session(),
        instance_url=salesforce_emulator.url,
        session=sf_session,
    )
    salesforce_emulator.fail_next_non_json_401()
    with pytest.raises(SalesforceExpiredSession) as info:
        sf.query("SELECT Id FROM Lead")
    assert isinstance(info.value.content, str) and "<html>" in info.value.content
    with pytest.raises(SalesforceExpiredSession):
        Salesforce(
            session_id="00Dbogus", instance_url=salesforce_emulator.url, session=sf_session
        ).limits()


def test_salesforce_row_lock_then_success(salesforce_emulator, sf):
    salesforce_emulator.lock_rows(1)
    assert sf.query("SELECT Id FROM Lead")["totalSize"] == 0  # reads are not locked
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Lead.create(lead())
    assert first_error(info)["errorCode"] == "UNABLE_TO_LOCK_ROW"
    assert sf.Lead.create(lead())["success"] is True


def test_salesforce_duplicate_rule(salesforce_emulator, sf):
    salesforce_emulator.enable_duplicate_rule("Lead", ("Email",))
    original = sf.Lead.create(lead(Email="dup@example.com"))["id"]
    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Lead.create(lead(Email="DUP@example.com"))
    error = first_error(info)
    assert error["errorCode"] == "DUPLICATES_DETECTED"
    match = error["duplicateResult"]["matchResults"][0]["matchRecords"][0]["record"]
    assert match["Id"] == original
    allowed = sf.Lead.create(
        lead(Email="dup@example.com"), headers={"Sforce-Duplicate-Rule-Header": "allowSave=true"}
    )
    assert allowed["success"] is True
    salesforce_emulator.disable_duplicate_rules()
    assert sf.Lead.create(lead(Email="dup@example.com"))["success"] is True


def test_salesforce_unavailable_concurrency_and_generic_failures(salesforce_emulator, sf):
    salesforce_emulator.fail_next_unavailable()
    with pytest.raises(SalesforceGeneralError) as info:
        sf.query("SELECT Id FROM Lead")
    assert info.value.status == 503 and "Service Unavailable" in info.value.content
    salesforce_emulator.refuse_next_concurrent()
    with pytest.raises(SalesforceRefusedRequest) as info:
        sf.query("SELECT Id FROM Lead")
    assert "ConcurrentPerOrgLongTxn" in first_error(info)["message"]
    body = [{"message": "boom", "errorCode": "UNKNOWN_EXCEPTION"}]
    salesforce_emulator.fail_next(1, 500, body=body, match="/sobjects/Lead", method="POST")
    assert sf.query("SELECT Id FROM Lead")["totalSize"] == 0  # does not match
    with pytest.raises(SalesforceGeneralError) as info:
        sf.Lead.create(lead())
    assert info.value.content == body
    assert salesforce_emulator.calls[-1].status == 500
    salesforce_emulator.fail_next(1, 404)  # default body for the status
    with pytest.raises(SalesforceResourceNotFound):
        sf.limits()


def test_salesforce_slow_responses_trip_timeouts(salesforce_emulator, sf):
    salesforce_emulator.delay_next(1, 0.5, match="/query/")
    with pytest.raises(requests.Timeout):
        sf.query("SELECT Id FROM Lead", timeout=0.05)
    salesforce_emulator.latency = 0.5
    with pytest.raises(requests.Timeout):
        sf.limits(timeout=0.05)


def test_salesforce_unknown_routes_are_404_arrays(salesforce_emulator, sf_session):
    token = {"Authorization": f"Bearer {salesforce_emulator.new_session()}"}
    for path in ("/services/data/v59.0/nothing", "/services/other"):
        response = sf_session.get(f"{salesforce_emulator.url}{path}", headers=token)
        assert response.status_code == 404 and response.json()[0]["errorCode"] == "NOT_FOUND"
    assert (
        sf_session.get(f"{salesforce_emulator.url}/services/data/v59.0/limits/").status_code == 401
    )
    response = sf_session.get(
        f"{salesforce_emulator.url}/services/data/v59.0/limits/", headers=token
    )
    assert (
        response.headers["Sforce-Limit-Info"] == f"api-usage={salesforce_emulator.api_used}/15000"
    )


def test_salesforce_refuses_untrusted_clients(salesforce_emulator):
    session = plain_session(verify=True)  # system CAs do not know the test CA
    with pytest.raises(requests.exceptions.SSLError):
        session.get(f"{salesforce_emulator.url}/services/data/")
    session.close()


def test_salesforce_discovery_routes(salesforce_emulator, sf_session, sf):
    versions = sf_session.get(f"{salesforce_emulator.url}/services/data/").json()
    assert {"label": "v59.0", "url": "/services/data/v59.0", "version": "59.0"} in versions
    assert sf.restful("")["sobjects"] == "/services/data/v59.0/sobjects"
    names = {o["name"]: o["keyPrefix"] for o in sf.restful("sobjects/")["sobjects"]}
    assert names == {"Lead": "00Q", "Contact": "003", "Task": "00T"}
    assert sf.Contact.metadata()["objectDescribe"]["name"] == "Contact"


def test_salesforce_delete_by_external_id(salesforce_emulator, sf):
    salesforce_emulator.add_field("Lead", "Bridge_Key__c", external_id=True)
    salesforce_emulator.seed("Lead", lead(Bridge_Key__c="gone"))
    assert sf.restful("sobjects/Lead/Bridge_Key__c/gone", method="DELETE") is None
    assert salesforce_emulator.records("Lead") == []
    with pytest.raises(SalesforceResourceNotFound):
        sf.Lead.get_by_custom_id("Bridge_Key__c", "gone")


# -- robustness -------------------------------------------------------------------------------
MALFORMED = [
    None,
    "not json",
    "[]",
    "5",
    '{"properties": []}',
    '{"inputs": [1]}',
    '{"limit": "x"}',
    '{"sorts": [5]}',
    '{"query": 5}',
    '{"associations": [5]}',
    '{"records": [1, {"attributes": 5}]}',
    '{"compositeRequest": [{"url": 6}]}',
    '{"LastName": ["x"], "Company": {"a": 1}}',
    '{"IsConverted": "x"}',
]


def test_hubspot_malformed_requests_never_crash(hubspot_emulator):
    session, auth = plain_session(), {"Authorization": f"Bearer {TOKEN}"}
    for path in ("contacts", "contacts/batch/upsert", "contacts/search", "notes"):
        url = f"{hubspot_emulator.url}/crm/v3/objects/{path}"
        statuses = [session.post(url, data=body, headers=auth).status_code for body in MALFORMED]
        assert all(s < 500 for s in statuses)
        assert statuses[:4] == [400] * 4 or path.endswith(
            "search"
        )  # no body, not JSON, not objects
    session.close()
    # The fixture fails the test if any request raised inside the emulator.


def test_salesforce_malformed_requests_never_crash(salesforce_emulator, sf_session):
    auth = {"Authorization": f"Bearer {salesforce_emulator.new_session()}"}
    base = f"{salesforce_emulator.url}/services/data/v59.0"
    for path, method in [
        ("sobjects/Lead/", "POST"),
        ("composite/sobjects", "POST"),
        ("composite/sobjects", "PATCH"),
        ("composite", "POST"),
    ]:
        for body in MALFORMED:
            response = sf_session.request(method, f"{base}/{path}", data=body, headers=auth)
            assert 400 <= response.status_code < 500 or response.json()[0]["success"] is False


def test_emulator_bugs_are_answered_500_and_recorded(hubspot_emulator, hs):
    def broken(call):
        raise KeyError("oops")

    hubspot_emulator._respond = broken
    with pytest.raises(ServiceException):
        create_contact(hs, email="bug@example.com")
    assert [type(e) for e in hubspot_emulator.errors] == [KeyError]
    hubspot_emulator.errors.clear()  # or the fixture would fail this test
