"""`simulate` and `check --online` over the connector interface, with an in-memory CRM."""

from pathlib import Path

import pytest

from bridge.check import check_online
from bridge.config import load_config, parse_config
from bridge.simulate import plan, render, simulate
from connectors.base import Connector, DeliveryResult, FieldInfo, LeadUpsert
from tests.support import sample

ROOT = Path(__file__).parent.parent.parent
CONFIG = load_config(ROOT / "config.example.yaml")
RECEIVED = 1_700_000_000.0


class MemoryConnector(Connector):
    """A CRM held in a dict: records by email, fields as `describe` would give them."""

    name = "memory"

    def __init__(self, records=None, fields=None) -> None:
        super().__init__("memory", CONFIG.connector_settings["hubspot"])
        self.records = records or {}
        self.fields = fields or {}
        self.opened = self.closed = 0

    async def open(self):
        self.opened += 1

    async def close(self):
        self.closed += 1

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        raise AssertionError("simulate must never write")

    async def describe(self, object, reload=False):
        return self.fields

    async def current(self, lead, names):
        record = self.records.get(lead.id_value)
        return None if record is None else {n: record.get(n) for n in names}


def run(type_: str, **contact):
    return simulate(CONFIG, sample(type=type_, **contact), "supersend", RECEIVED)


def test_every_rule_says_whether_it_matched_and_why_not():
    result = run("interest", interest="maybe", first_name="Ada")
    reasons = {o.name: (o.matched, o.reason) for o in result.rules}
    assert reasons["skip-internal-addresses"] == (
        False,
        "`contact.email is endswith('@supersend.io')` is false"
        " (contact.email = 'andrew@xoxo.capital')",
    )
    assert reasons["interested-to-hubspot"] == (
        False,
        "`contact.interest == 'interested'` is false (contact.interest = 'maybe')",
    )
    assert reasons["not-interested-to-hubspot"] == (
        True,
        "rule 'not-interested-to-hubspot' matched but every field is empty: nothing sent to"
        " hubspot",
    )
    assert reasons["replied-to-hubspot"] == (False, "type is 'interest'; the rule is for 'reply'")
    (status,) = [o for o in result.rules if o.name == "not-interested-to-hubspot"]
    assert status.omitted == {"hs_lead_status": "'maybe' is not in the map"}


def test_a_stop_rule_skips_the_rest():
    result = run("reply", email="seed@supersend.io")
    assert [(o.matched, o.reason) for o in result.rules[:2]] == [
        (True, "stop: the rules after it are not evaluated"),
        (None, "not evaluated: a stop rule matched first"),
    ]
    assert all(o.delivery is None for o in result.rules)


def test_the_operations_are_the_ones_the_router_would_queue():
    result = run("reply", first_name="Ada")
    text = render(result)
    assert "Operations (nothing is written):" in text
    assert (
        "  [replied-to-salesforce] salesforce: update (never create) the lead"
        " email=andrew@xoxo.capital\n"
        '      Status = "Working - Contacted"  (monotonic)'
    ) in text
    assert "  [reply-note-to-hubspot] + hubspot: log a note on the contact" in text
    assert "      subject: Replied to campaign d9ff359d-8d50-378b-989a-34100a0503c1" in text


async def test_the_online_plan_shows_each_field_from_what_to_what(with_credentials):
    # Given HubSpot holds the contact with a status further along and a company a rep typed
    hubspot = MemoryConnector(
        {
            "andrew@xoxo.capital": {
                "firstname": "Andy",
                "lastname": "Pierno",
                "company": "XOXO Capital (rep)",
                "hs_lead_status": "IN_PROGRESS",
                "phone": None,
            }
        }
    )
    salesforce = MemoryConnector()
    result = run(
        "interest", first_name="Andrew", last_name="Pierno", company_name="xoxo", phone="+1 555"
    )
    planned = await plan(result, CONFIG, {"hubspot": hubspot, "salesforce": salesforce})
    text = render(result, planned)
    assert (
        "  [interested-to-hubspot] ~ hubspot: contact email=andrew@xoxo.capital: updated\n"
        '    ~ firstname: "Andy" -> "Andrew"\n'
        '    = lastname: "Pierno"\n'
        '    ~ phone: (empty) -> "+1 555"\n'
        '    ! company: "XOXO Capital (rep)" kept, not "xoxo" (if_empty: the CRM holds'
        " 'XOXO Capital (rep)')\n"
        '    ! hs_lead_status: "IN_PROGRESS" kept, not "OPEN" (monotonic: \'OPEN\' is not after'
        " 'IN_PROGRESS')\n"
    ) in text
    assert (
        "  [interested-to-salesforce] + salesforce: lead email=andrew@xoxo.capital: created\n"
        '    + FirstName: "Andrew"\n'
    ) in text
    assert text.endswith("Plan: 1 to create or log, 1 to change, 0 unchanged.")


async def test_an_update_only_rule_plans_nothing_for_a_missing_record(with_credentials):
    result = run("reply")
    planned = await plan(
        result, CONFIG, {"hubspot": MemoryConnector(), "salesforce": MemoryConnector()}
    )
    (status,) = [p for p in planned if p.rule == "replied-to-salesforce"]
    assert status.headline == (
        "  salesforce: lead email=andrew@xoxo.capital: no such record; update_status never"
        " creates one"
    )


HUBSPOT_FIELDS = {
    "firstname": FieldInfo(name="firstname", type="string"),
    "lastname": FieldInfo(name="lastname", type="string"),
    "jobtitle": FieldInfo(name="jobtitle", type="string"),
    "phone": FieldInfo(name="phone", type="string"),
    "company": FieldInfo(name="company", type="string"),
    "hs_lead_status": FieldInfo(
        name="hs_lead_status",
        type="enumeration",
        options=("NEW", "OPEN", "IN_PROGRESS", "UNQUALIFIED", "CONNECTED"),
    ),
}


@pytest.fixture
def with_credentials(monkeypatch):
    for name in ("hubspot", "salesforce"):
        monkeypatch.setattr(
            type(CONFIG.connector_settings[name]), "has_credentials", lambda s: True
        )


async def test_check_online_finds_missing_fields_bad_options_and_read_only_ones(with_credentials):
    fields = dict(HUBSPOT_FIELDS)
    del fields["jobtitle"]
    fields["job_title"] = FieldInfo(name="job_title", type="string")
    fields["hs_lead_status"] = FieldInfo(
        name="hs_lead_status", type="enumeration", options=("NEW", "OPEN", "IN_PROGRESS")
    )
    fields["phone"] = FieldInfo(name="phone", type="string", writable=False)
    hubspot = MemoryConnector(fields=fields)
    salesforce = MemoryConnector(fields={})
    findings = await check_online(CONFIG, {"hubspot": hubspot})
    assert (hubspot.opened, hubspot.closed) == (1, 1)
    lines = [str(f.problem).split(": ", 1)[1] for f in findings]
    assert (
        "rules[1].fields.jobtitle: hubspot has no field 'jobtitle' on contact"
        " (did you mean `job_title`?)" in lines
    )
    assert "rules[1].fields.phone: phone is read-only in the CRM" in lines
    assert (
        "rules[1].fields.hs_lead_status.order[3]: 'CONNECTED' is not an option of hs_lead_status"
        " (enumeration: [NEW, OPEN, IN_PROGRESS])"
    ) in lines
    assert (
        "rules[3].fields.hs_lead_status.map.not_interested: 'UNQUALIFIED' is not an option of"
        " hs_lead_status (enumeration: [NEW, OPEN, IN_PROGRESS])"
    ) in lines
    assert all(f.fatal for f in findings)
    assert salesforce.opened == 0  # not asked


async def test_check_online_passes_when_the_crm_has_every_field(with_credentials):
    findings = await check_online(CONFIG, {"hubspot": MemoryConnector(fields=HUBSPOT_FIELDS)})
    assert [str(f.problem) for f in findings] == []


async def test_check_online_finds_an_unknown_record_key(with_credentials):
    text = (
        (ROOT / "config.example.yaml")
        .read_text()
        .replace(
            "    action: upsert_contact          # HubSpot",
            "    id_property: linkedin_url\n    id_value: '{{ contact.linkedin_url }}'\n"
            "    action: upsert_contact          # HubSpot",
            1,
        )
    )
    config = parse_config(text, "config.yaml")
    findings = await check_online(config, {"hubspot": MemoryConnector(fields=HUBSPOT_FIELDS)})
    assert [str(f.problem).split(": ", 1)[1] for f in findings] == [
        "rules[1].id_property: hubspot has no field 'linkedin_url' on contact"
    ]
