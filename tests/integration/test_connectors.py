"""The connector contract, through the real SDKs against the emulators.

Every connector must: create, update the existing record (never a second one), classify
429 (+ Retry-After) and 5xx and transport failures as retryable, 400 as permanent with the
CRM's own message, and survive an expired session.
"""

from __future__ import annotations

import pytest

from bridge.errors import PermanentDelivery, RetryableDelivery
from connectors.base import Connector, DeliveryResult, LeadUpsert, WritePolicy
from connectors.hubspot import HubSpotConfig, HubSpotConnector
from connectors.salesforce import SalesforceConfig, SalesforceConnector


class HubSpotCase:
    email_field = "email"
    title = "jobtitle"
    status = "hs_lead_status"
    statuses = ("NEW", "OPEN", "IN_PROGRESS", "CONNECTED")

    def __init__(self, emulator):
        self.emulator = emulator

    def connector(self, **overrides) -> Connector:
        settings = {
            "type": "hubspot",
            "access_token": "pat-na1-test",
            "base_url": self.emulator.url,
            "timeout": 2,
        } | overrides
        return HubSpotConnector("hubspot", HubSpotConfig.model_validate(settings))

    def lead(self, email: str, **fields) -> LeadUpsert:
        return LeadUpsert(object="contact", id_value=email, fields=fields or {"firstname": "Ada"})

    def bad_field(self) -> dict:
        return {"no_such_property": "x"}

    def records(self, email: str) -> list[dict]:
        with self.emulator.lock:
            return [
                dict(r.properties)
                for r in self.emulator.contacts.values()
                if r.properties.get("email") == email
            ]

    def first_name(self, record: dict) -> str:
        return record["firstname"]

    def write_path(self) -> str:
        return "/crm/v3/objects/contacts/batch/upsert"


class SalesforceCase:
    email_field = "Email"
    title = "Title"
    status = "Status"
    statuses = ("Open - Not Contacted", "Working - Contacted", "Closed - Converted")

    def __init__(self, emulator):
        self.emulator = emulator

    def connector(self, **overrides) -> Connector:
        settings = {
            "type": "salesforce",
            "username": "user@example.com",
            "password": "pw",
            "security_token": "tok",
            "login_url": self.emulator.url,
            "ca_bundle": str(self.emulator.ca_path),
            "timeout": 2,
        } | overrides
        return SalesforceConnector("salesforce", SalesforceConfig.model_validate(settings))

    def lead(self, email: str, **fields) -> LeadUpsert:
        return LeadUpsert(object="lead", id_value=email, fields=fields or {"FirstName": "Ada"})

    def bad_field(self) -> dict:
        return {"NoSuchField": "x"}

    def records(self, email: str) -> list[dict]:
        return [r for r in self.emulator.records("Lead") if (r.get("Email") or "").lower() == email]

    def first_name(self, record: dict) -> str:
        return record["FirstName"]

    def write_path(self) -> str:
        return "/sobjects/Lead"


@pytest.fixture(params=["hubspot", "salesforce"])
def case(request):
    if request.param == "hubspot":
        return HubSpotCase(request.getfixturevalue("hubspot_emulator"))
    return SalesforceCase(request.getfixturevalue("salesforce_emulator"))


@pytest.fixture
async def connector_of(case):
    opened: list[Connector] = []

    async def make(**overrides) -> Connector:
        connector = case.connector(**overrides)
        await connector.open()
        opened.append(connector)
        return connector

    yield make
    for connector in opened:
        await connector.close()


async def test_creates_then_updates_the_same_record(case, connector_of):
    connector = await connector_of()
    created = await connector.upsert_lead(case.lead("ada@example.com"))
    assert created.created is True and created.record_id
    updated = await connector.upsert_lead(
        case.lead(
            "ada@example.com",
            **{("firstname" if case.email_field == "email" else "FirstName"): "Augusta"},
        )
    )
    assert updated.created is False and updated.record_id == created.record_id
    (record,) = case.records("ada@example.com")
    assert case.first_name(record) == "Augusta"


async def test_a_rate_limit_is_retryable_after_the_delay_the_crm_asked(case, connector_of):
    connector = await connector_of()
    case.emulator.fail_next(1, 429, headers={"Retry-After": "7"}, match=case.write_path())
    with pytest.raises(RetryableDelivery) as info:
        await connector.upsert_lead(case.lead("ada@example.com"))
    if case.email_field == "email":  # HubSpot answers 429; Salesforce has no 429 of its own
        assert info.value.retry_after == 7
    assert case.records("ada@example.com") == []


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(case, connector_of, status):
    connector = await connector_of()
    case.emulator.fail_next(1, status, match=case.write_path())
    with pytest.raises(RetryableDelivery):
        await connector.upsert_lead(case.lead("ada@example.com"))
    # and the same delivery succeeds once the CRM is back
    assert (await connector.upsert_lead(case.lead("ada@example.com"))).created is True


async def test_a_validation_error_is_permanent_and_carries_the_crms_message(case, connector_of):
    connector = await connector_of()
    with pytest.raises(PermanentDelivery) as info:
        await connector.upsert_lead(case.lead("ada@example.com", **case.bad_field()))
    message = str(info.value)
    assert "no_such_property" in message or "NoSuchField" in message


async def test_an_unreachable_crm_is_retryable(case, connector_of):
    connector = await connector_of()
    case.emulator.stop()
    with pytest.raises(RetryableDelivery, match="unreachable"):
        await connector.upsert_lead(case.lead("ada@example.com"))


async def test_a_slow_crm_times_out_as_retryable(case, connector_of):
    connector = await connector_of(timeout=0.2)
    case.emulator.delay_next(
        1, 1.0, match=case.write_path() if case.email_field == "email" else "/query"
    )
    with pytest.raises(RetryableDelivery):
        await connector.upsert_lead(case.lead("ada@example.com"))


async def test_salesforce_logs_in_again_once_when_the_session_expires(salesforce_emulator):
    case = SalesforceCase(salesforce_emulator)
    connector = case.connector()
    await connector.open()
    try:
        assert salesforce_emulator.logins == 1
        salesforce_emulator.expire_sessions()
        result = await connector.upsert_lead(case.lead("ada@example.com"))
        assert result.created is True
        assert salesforce_emulator.logins == 2
        assert len(case.records("ada@example.com")) == 1
    finally:
        await connector.close()


async def test_salesforce_fills_required_lead_fields_only_when_creating(salesforce_emulator):
    case = SalesforceCase(salesforce_emulator)
    connector = case.connector()
    await connector.open()
    try:
        await connector.upsert_lead(
            LeadUpsert(object="lead", id_value="ada.l@analytical.example", fields={})
        )
        (lead,) = case.records("ada.l@analytical.example")
        assert (lead["LastName"], lead["Company"]) == ("ada.l", "analytical.example")
        await connector.upsert_lead(
            LeadUpsert(
                object="lead",
                id_value="ada.l@analytical.example",
                fields={"Company": "Analytical Engines"},
            )
        )
        (lead,) = case.records("ada.l@analytical.example")
        assert (lead["LastName"], lead["Company"]) == ("ada.l", "Analytical Engines")
    finally:
        await connector.close()


async def test_salesforce_updates_an_existing_lead_found_by_email(salesforce_emulator):
    case = SalesforceCase(salesforce_emulator)
    existing = salesforce_emulator.seed(
        "Lead", {"LastName": "Byron", "Company": "Rep typed this", "Email": "Ada@Example.com"}
    )
    connector = case.connector()
    await connector.open()
    try:
        result = await connector.upsert_lead(case.lead("ada@example.com", Title="Countess"))
        assert (result.record_id, result.created) == (existing, False)
        (lead,) = case.records("ada@example.com")
        assert (lead["Company"], lead["Title"]) == ("Rep typed this", "Countess")
    finally:
        await connector.close()


async def test_salesforce_with_wrong_password_waits_instead_of_dropping(salesforce_emulator):
    case = SalesforceCase(salesforce_emulator)
    connector = case.connector(password="wrong")
    await connector.open()  # logs the failure, does not crash the daemon
    try:
        with pytest.raises(RetryableDelivery, match="login failed") as info:
            await connector.upsert_lead(case.lead("ada@example.com"))
        assert info.value.retry_after == 300
    finally:
        await connector.close()


async def test_salesforce_ignores_the_environment_ca_bundle(salesforce_emulator, monkeypatch):
    # Our machines set REQUESTS_CA_BUNDLE; it must not replace the configured CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    case = SalesforceCase(salesforce_emulator)
    connector = case.connector()
    await connector.open()
    try:
        assert (await connector.upsert_lead(case.lead("ada@example.com"))).created is True
    finally:
        await connector.close()


async def test_salesforce_refuses_an_untrusted_certificate(salesforce_emulator):
    case = SalesforceCase(salesforce_emulator)
    connector = case.connector(ca_bundle=None)
    await connector.open()
    try:
        with pytest.raises(RetryableDelivery, match="unreachable: SSLError"):
            await connector.upsert_lead(case.lead("ada@example.com"))
    finally:
        await connector.close()


async def test_hubspot_with_a_revoked_token_waits_instead_of_dropping(hubspot_emulator):
    case = HubSpotCase(hubspot_emulator)
    connector = case.connector(access_token="pat-na1-revoked")
    await connector.open()
    try:
        with pytest.raises(RetryableDelivery, match="HubSpot 401") as info:
            await connector.upsert_lead(case.lead("ada@example.com"))
        assert info.value.retry_after == 300
    finally:
        await connector.close()


async def test_salesforce_with_an_existing_session_needs_no_login(salesforce_emulator):
    settings = {
        "type": "salesforce",
        "session_id": salesforce_emulator.new_session(),
        "instance_url": f"https://{salesforce_emulator.instance}",
        "ca_bundle": str(salesforce_emulator.ca_path),
    }
    connector = SalesforceConnector("salesforce", SalesforceConfig.model_validate(settings))
    await connector.open()
    try:
        assert (
            await connector.upsert_lead(SalesforceCase(salesforce_emulator).lead("a@b.io"))
        ).created
        assert salesforce_emulator.logins == 0
        # A session cannot be renewed: expiry waits for a new one instead of dropping the delivery.
        salesforce_emulator.expire_sessions()
        with pytest.raises(RetryableDelivery, match="session expired"):
            await connector.upsert_lead(SalesforceCase(salesforce_emulator).lead("a@b.io"))
    finally:
        await connector.close()


async def test_hubspot_over_tls_trusts_the_configured_ca(tls_ca):
    from tests.emulators import HubSpotEmulator

    with HubSpotEmulator(tls=tls_ca) as emulator:
        case = HubSpotCase(emulator)
        connector = case.connector(ca_bundle=str(tls_ca.ca_path))
        await connector.open()
        try:
            assert (await connector.upsert_lead(case.lead("ada@example.com"))).created is True
        finally:
            await connector.close()


# -- write policies ------------------------------------------------------------------------------
def guarded(case, email: str, policies: dict[str, WritePolicy], create: bool = True, **fields):
    lead = case.lead(email, **fields)
    return lead.model_copy(update={"policies": policies, "create": create})


async def test_if_empty_never_overwrites_what_a_rep_typed(case, connector_of):
    connector = await connector_of()
    await connector.upsert_lead(case.lead("ada@example.com", **{case.title: "CTO"}))
    policies = {case.title: WritePolicy(mode="if_empty"), "phone": WritePolicy(mode="if_empty")}
    phone = "phone" if case.email_field == "email" else "Phone"
    policies[phone] = policies.pop("phone")

    result = await connector.upsert_lead(
        guarded(case, "ada@example.com", policies, **{case.title: "Engineer", phone: "+1 555"})
    )

    (record,) = case.records("ada@example.com")
    assert (record[case.title], record[phone]) == ("CTO", "+1 555")
    assert result.detail["held_back"] == {case.title: "if_empty: the CRM holds 'CTO'"}


async def test_on_create_fields_are_written_only_into_a_new_record(case, connector_of):
    connector = await connector_of()
    policies = {case.title: WritePolicy(mode="on_create")}

    created = await connector.upsert_lead(
        guarded(case, "ada@example.com", policies, **{case.title: "First"})
    )
    updated = await connector.upsert_lead(
        guarded(case, "ada@example.com", policies, **{case.title: "Second"})
    )

    assert (created.created, updated.created) == (True, False)
    (record,) = case.records("ada@example.com")
    assert record[case.title] == "First"


async def test_a_monotonic_status_only_moves_forward(case, connector_of):
    connector = await connector_of()
    policies = {case.status: WritePolicy(mode="monotonic", order=case.statuses)}
    first, second, third = case.statuses[0], case.statuses[1], case.statuses[2]

    for status in (second, first, third, second):  # a late `open` after a `reply`, and so on
        await connector.upsert_lead(
            guarded(case, "ada@example.com", policies, **{case.status: status})
        )

    (record,) = case.records("ada@example.com")
    assert record[case.status] == third


async def test_monotonic_fields_merged_in_one_batch_keep_the_furthest(case, connector_of):
    connector = await connector_of()
    policies = {case.status: WritePolicy(mode="monotonic", order=case.statuses)}
    later, earlier = case.statuses[2], case.statuses[0]

    outcomes = await connector.upsert_leads(
        [
            guarded(case, "ada@example.com", policies, **{case.status: later}),
            guarded(case, "ada@example.com", policies, **{case.status: earlier}),
        ]
    )

    assert [o.created for o in outcomes] == [True, True]
    (record,) = case.records("ada@example.com")
    assert record[case.status] == later


async def test_an_update_only_write_skips_a_missing_record(case, connector_of):
    connector = await connector_of()
    status = case.statuses[1]
    write = guarded(case, "ghost@example.com", {}, create=False, **{case.status: status})

    (missing,) = await connector.upsert_leads([write])
    await connector.upsert_lead(case.lead("ada@example.com"))
    existing = await connector.upsert_lead(write.model_copy(update={"id_value": "ada@example.com"}))

    assert isinstance(missing, DeliveryResult) and missing.record_id is None
    assert missing.skipped == (
        f"no {'contact' if case.email_field == 'email' else 'Lead'} with "
        f"{case.email_field if case.email_field == 'email' else 'Email'} 'ghost@example.com' "
        "to update, and the rule does not create one"
    )
    assert case.records("ghost@example.com") == []
    assert existing.created is False
    (record,) = case.records("ada@example.com")
    assert record[case.status] == status


async def test_current_reads_the_record_or_none(case, connector_of):
    connector = await connector_of()
    await connector.upsert_lead(case.lead("ada@example.com", **{case.title: "CTO"}))

    found = await connector.current(case.lead("ADA@example.com"), [case.title])
    missing = await connector.current(case.lead("nobody@example.com"), [case.title])

    assert found == {case.title: "CTO"}
    assert missing is None
