"""Salesforce org administration concerns, through simple-salesforce against the emulator.

Login flows (SOAP, OAuth client credentials, OAuth JWT bearer, an existing session) and their
re-login on expiry; the object a record goes to (`target`, converted Leads); which record an
email lookup updates (`tie_break`); external ids matching several records; duplicate rules and
Lead assignment rules.
"""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from bridge.errors import AuthenticationFailed, PermanentDelivery
from connectors.base import DeliveryResult, LeadUpsert
from connectors.salesforce import SalesforceConfig

TOKEN_PATH = "/services/oauth2/token"


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    """(private PEM, public PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture
def key_file(tmp_path: Path, rsa_key) -> Path:
    path = tmp_path / "server.key"
    path.write_bytes(rsa_key[0])
    return path


def lead(email: str = "ada@example.com", **fields) -> LeadUpsert:
    return LeadUpsert(object="lead", id_value=email, fields=fields or {"FirstName": "Ada"})


def token_calls(emulator) -> list:
    with emulator.lock:
        return [c for c in emulator.calls if c.path == TOKEN_PATH]


def writes(emulator, method: str) -> list:
    with emulator.lock:
        return [c for c in emulator.calls if c.method == method and "/sobjects" in c.path]


def header(call, name: str) -> str | None:
    return next((v for k, v in call.headers.items() if k.lower() == name.lower()), None)


# -- authentication ----------------------------------------------------------------------------
async def test_client_credentials_login_and_relogin(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    connector = await salesforce_of(
        soap=False, consumer_key=emu.consumer_key, consumer_secret=emu.consumer_secret
    )
    assert connector.config.flow == "client_credentials"
    await connector.verify()
    (call,) = token_calls(emu)
    assert parse_qs(call.body) == {"grant_type": ["client_credentials"]}
    basic = base64.b64encode(f"{emu.consumer_key}:{emu.consumer_secret}".encode()).decode()
    assert header(call, "Authorization") == f"Basic {basic}"

    first = await connector.upsert_lead(lead())
    emu.expire_sessions()
    second = await connector.upsert_lead(lead(FirstName="Grace"))
    assert second.record_id == first.record_id
    assert emu.logins == 2 and len(token_calls(emu)) == 2
    assert emu.record(first.record_id or "")["FirstName"] == "Grace"


async def test_client_credentials_refused(salesforce_emulator, salesforce_of):
    connector = await salesforce_of(
        soap=False, auth="client_credentials", consumer_key="k", consumer_secret="wrong"
    )
    with pytest.raises(AuthenticationFailed, match="client identifier invalid"):
        await connector.verify()


async def test_jwt_bearer_login_and_relogin(salesforce_emulator, salesforce_of, key_file, rsa_key):
    emu = salesforce_emulator
    emu.jwt_public_key = rsa_key[1]  # signatures are checked
    connector = await salesforce_of(
        soap=False, username=emu.username, consumer_key=emu.consumer_key, private_key_file=key_file
    )
    assert connector.config.flow == "jwt"
    await connector.verify()
    (call,) = token_calls(emu)
    form = parse_qs(call.body)
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    claims = jwt.decode(form["assertion"][0], rsa_key[1], algorithms=["RS256"], audience=emu.url)
    assert claims["iss"] == emu.consumer_key and claims["sub"] == emu.username

    first = await connector.upsert_lead(lead())
    emu.expire_sessions()
    second = await connector.upsert_lead(lead(FirstName="Grace"))
    assert second.record_id == first.record_id and emu.logins == 2


async def test_jwt_bearer_refused(salesforce_emulator, salesforce_of, tmp_path):
    emu = salesforce_emulator
    emu.jwt_public_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    emu.jwt_public_key = emu.jwt_public_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "other.key"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    connector = await salesforce_of(
        soap=False, username=emu.username, consumer_key=emu.consumer_key, private_key_file=path
    )
    with pytest.raises(AuthenticationFailed, match="invalid assertion"):
        await connector.verify()
    path.write_text("not a key")  # read again at the next login
    with pytest.raises(AuthenticationFailed, match="cannot sign"):
        await connector.upsert_lead(lead())


async def test_existing_session_is_still_supported(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    connector = await salesforce_of(soap=False, session_id=emu.new_session(), instance_url=emu.url)
    assert connector.config.flow == "session"
    result = await connector.upsert_lead(lead())
    assert result.created and emu.logins == 0


def test_config_validation(key_file):
    base = {"type": "salesforce"}

    def config(**fields) -> SalesforceConfig:
        return SalesforceConfig.model_validate(base | fields)

    for fields, needs in [
        ({"auth": "jwt", "username": "u", "consumer_key": "k"}, "private_key_file"),
        ({"auth": "jwt", "consumer_key": "k", "private_key_file": str(key_file)}, "username"),
        ({"auth": "client_credentials", "consumer_key": "k"}, "consumer_secret"),
        ({"auth": "soap", "username": "u"}, "password"),
        ({"session_id": "s"}, "instance_url"),
        ({"private_key_file": str(key_file)}, "username, consumer_key"),
    ]:
        with pytest.raises(ValidationError, match=f"needs {needs}"):
            config(**fields)
    with pytest.raises(ValidationError, match="is not a file"):
        config(username="u", consumer_key="k", private_key_file="/no/such.key")
    with pytest.raises(ValidationError, match="assignment_rule"):
        config(assignment_rule="sometimes")
    assert config(assignment_rule="01Q000000000001").assignment_rule == "01Q000000000001"
    # No credentials at all: a dry run, as before.
    assert config().flow is None and not config().has_credentials()
    assert config(username="u", password="p").flow == "soap"
    assert config(consumer_key="k", consumer_secret="s").flow == "client_credentials"
    # The JWT audience follows the login host.
    jwt_fields = {"username": "u", "consumer_key": "k", "private_key_file": str(key_file)}
    assert config(**jwt_fields).audience() == "https://login.salesforce.com"
    sandbox = config(**jwt_fields, login_url="https://acme--uat.sandbox.my.salesforce.com")
    assert sandbox.audience() == "https://test.salesforce.com"
    my_domain = config(**jwt_fields, login_url="https://acme.my.salesforce.com")
    assert my_domain.audience() == "https://login.salesforce.com"


# -- target object, converted Leads ----------------------------------------------------------
async def test_contact_else_lead(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    contact = emu.seed("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
    connector = await salesforce_of(target="contact_else_lead")
    # One record: the Contact with the email is updated; Lead-only fields are left out.
    result = await connector.upsert_lead(lead(FirstName="Ada", Company="Analytical"))
    assert result == DeliveryResult(record_id=contact, created=False)
    assert emu.record(contact)["FirstName"] == "Ada" and emu.records("Lead") == []
    # A batch: the Contact again, and a Lead for the email no Contact has.
    outcomes = await connector.upsert_leads(
        [lead(FirstName="A", Company="X"), lead("grace@example.com", Company="Navy")]
    )
    assert outcomes[0] == DeliveryResult(record_id=contact, created=False)
    (new_lead,) = emu.records("Lead")
    assert outcomes[1] == DeliveryResult(record_id=new_lead["Id"], created=True)
    assert new_lead["Company"] == "Navy" and emu.record(contact)["FirstName"] == "A"
    # Hints of either object are used as they are.
    hinted = await connector.upsert_leads(
        [
            lead(FirstName="B").model_copy(update={"record_id": contact}),
            lead("grace@example.com", FirstName="G").model_copy(
                update={"record_id": new_lead["Id"]}
            ),
        ]
    )
    assert [o.record_id for o in hinted if isinstance(o, DeliveryResult)] == [
        contact,
        new_lead["Id"],
    ]
    assert emu.record(new_lead["Id"])["FirstName"] == "G"


async def test_target_contact_overrides_the_rule(salesforce_emulator, salesforce_of):
    connector = await salesforce_of(target="contact")
    result = await connector.upsert_lead(lead(Company="Analytical"))
    assert result.created and (result.record_id or "").startswith("003")
    assert salesforce_emulator.records("Lead") == []


async def test_a_converted_lead_updates_its_contact(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    contact = emu.seed("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
    converted = emu.seed(
        "Lead",
        {
            "LastName": "Lovelace",
            "Company": "A",
            "Email": "ada@example.com",
            "IsConverted": True,
            "ConvertedContactId": contact,
        },
    )
    connector = await salesforce_of()
    result = await connector.upsert_lead(lead(FirstName="Ada", Status="Working - Contacted"))
    assert result == DeliveryResult(record_id=contact, created=False)
    assert emu.record(contact)["FirstName"] == "Ada"
    assert emu.record(converted)["FirstName"] is None
    # A hint naming the converted Lead: Salesforce refuses the update, the lookup finds the
    # Contact instead.
    hinted = lead(FirstName="Augusta").model_copy(update={"record_id": converted})
    assert (await connector.upsert_lead(hinted)).record_id == contact
    assert emu.record(contact)["FirstName"] == "Augusta"
    # An unconverted Lead with the email wins over the converted one.
    open_lead = emu.seed("Lead", {"LastName": "L", "Company": "B", "Email": "ada@example.com"})
    outcomes = await connector.upsert_leads([lead(FirstName="Open"), lead("x@example.com")])
    assert outcomes[0] == DeliveryResult(record_id=open_lead, created=False)
    assert emu.record(open_lead)["FirstName"] == "Open"


# -- tie-break -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tie_break", "expected"), [("oldest", 0), ("newest", 1), ("most_recently_modified", 2)]
)
async def test_tie_break(salesforce_emulator, salesforce_of, tie_break, expected):
    emu = salesforce_emulator
    ids = [
        emu.seed(
            "Lead",
            {
                "LastName": str(n),
                "Company": "C",
                "Email": "ada@example.com",
                "CreatedDate": created,
                "LastModifiedDate": modified,
            },
        )
        for n, (created, modified) in enumerate(
            [
                ("2020-01-01T00:00:00.000+0000", "2020-01-01T00:00:00.000+0000"),
                ("2024-01-01T00:00:00.000+0000", "2024-01-01T00:00:00.000+0000"),
                ("2022-01-01T00:00:00.000+0000", "2025-06-01T00:00:00.000+0000"),
            ]
        )
    ]
    connector = await salesforce_of(tie_break=tie_break)
    assert (await connector.upsert_lead(lead())).record_id == ids[expected]
    outcomes = await connector.upsert_leads([lead(), lead("x@example.com")])
    assert outcomes[0] == DeliveryResult(record_id=ids[expected], created=False)


# -- external ids matching several records ------------------------------------------------------
async def test_external_id_matching_several_records(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    emu.add_field("Lead", "Ext__c", external_id=True)
    ids = [emu.seed("Lead", {"LastName": n, "Company": "C", "Ext__c": "E1"}) for n in ("A", "B")]
    connector = await salesforce_of()

    def keyed(value: str) -> LeadUpsert:
        fields = {"FirstName": "Ada", "LastName": "Lovelace", "Company": "Analytical"}
        return LeadUpsert(id_property="Ext__c", id_value=value, fields=fields)

    with pytest.raises(PermanentDelivery) as single:
        await connector.upsert_lead(keyed("E1"))
    assert single.value.detail["matches"] == ids
    outcomes = await connector.upsert_leads([keyed("E1"), keyed("E2")])
    assert isinstance(outcomes[0], PermanentDelivery)
    assert outcomes[0].detail["matches"] == ids
    assert isinstance(outcomes[1], DeliveryResult) and outcomes[1].created
    assert all(emu.record(i)["FirstName"] is None for i in ids)  # never a guess


# -- duplicate rules and assignment rules -------------------------------------------------------
async def test_duplicate_rule_blocks_with_the_matches(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    emu.enable_duplicate_rule("Lead", ("Phone",))
    existing = emu.seed(
        "Lead", {"LastName": "L", "Company": "C", "Email": "old@example.com", "Phone": "555"}
    )
    connector = await salesforce_of()
    with pytest.raises(PermanentDelivery, match="DUPLICATES_DETECTED") as single:
        await connector.upsert_lead(lead(Phone="555"))
    assert single.value.detail["duplicates"] == [existing]
    outcomes = await connector.upsert_leads([lead(Phone="555"), lead("x@example.com")])
    assert isinstance(outcomes[0], PermanentDelivery)
    assert outcomes[0].detail["duplicates"] == [existing]
    assert isinstance(outcomes[1], DeliveryResult) and outcomes[1].created
    assert not any(header(c, "Sforce-Duplicate-Rule-Header") for c in writes(emu, "POST"))


async def test_allow_save_on_duplicates(salesforce_emulator, salesforce_of):
    emu = salesforce_emulator
    emu.enable_duplicate_rule("Lead", ("Phone",))
    emu.seed("Lead", {"LastName": "L", "Company": "C", "Email": "old@example.com", "Phone": "555"})
    connector = await salesforce_of(allow_save_on_duplicates=True)
    assert (await connector.upsert_lead(lead(Phone="555"))).created
    outcomes = await connector.upsert_leads([lead(Phone="555"), lead("x@example.com", Phone="555")])
    assert all(isinstance(o, DeliveryResult) for o in outcomes)
    sent = writes(emu, "POST") + writes(emu, "PATCH")
    assert len(sent) == 3
    assert all(header(c, "Sforce-Duplicate-Rule-Header") == "allowSave=true" for c in sent)


@pytest.mark.parametrize(
    ("rule", "value"),
    [("default", "TRUE"), ("none", "FALSE"), ("01Q000000000001AAA", "01Q000000000001AAA")],
)
async def test_assignment_rule_header_on_creates(salesforce_emulator, salesforce_of, rule, value):
    emu = salesforce_emulator
    connector = await salesforce_of(assignment_rule=rule)
    await connector.upsert_lead(lead())  # single-record create
    await connector.upsert_leads([lead("b@example.com"), lead("c@example.com")])  # collection
    await connector.upsert_lead(lead(FirstName="Again"))  # an update
    creates, updates = writes(emu, "POST"), writes(emu, "PATCH")
    assert len(creates) == 2 and len(updates) == 1
    assert [header(c, "Sforce-Auto-Assign") for c in creates] == [value, value]
    assert header(updates[0], "Sforce-Auto-Assign") is None


async def test_no_assignment_header_by_default(salesforce_emulator, salesforce_of):
    connector = await salesforce_of()
    await connector.upsert_lead(lead())
    (create,) = writes(salesforce_emulator, "POST")
    assert header(create, "Sforce-Auto-Assign") is None


# -- activities follow the same record --------------------------------------------------------
async def test_activities_follow_target_and_conversion(salesforce_emulator, salesforce_of):
    from connectors.base import Activity

    emu = salesforce_emulator
    contact = emu.seed("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
    emu.seed(
        "Lead",
        {
            "LastName": "Lovelace",
            "Company": "A",
            "Email": "ada@example.com",
            "IsConverted": True,
            "ConvertedContactId": contact,
        },
    )
    note = Activity(
        object="lead", id_value="ada@example.com", subject="Reply", occurred_at=0, key="k1"
    )
    connector = await salesforce_of()
    assert (await connector.log_activity(note)).record_id == contact
    other = emu.seed("Contact", {"LastName": "Hopper", "Email": "grace@example.com"})
    either = await salesforce_of(target="contact_else_lead")
    second = note.model_copy(update={"id_value": "grace@example.com", "key": "k2"})
    assert (await either.log_activity(second)).record_id == other
    assert sorted(t["WhoId"] for t in emu.records("Task")) == sorted([contact, other])
