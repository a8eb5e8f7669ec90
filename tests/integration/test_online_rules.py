"""`check --online` and `simulate --online` against the HubSpot and Salesforce emulators,
through the real connectors' `describe()` and `current()`."""

from __future__ import annotations

from bridge.check import check_online
from bridge.config import parse_config
from bridge.simulate import open_connectors, plan, plan_online, render, simulate
from tests.support import config_yaml, hubspot_settings, salesforce_settings, sample

GOOD = """
  - name: hubspot-interested
    when: type == 'interest'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
      company: {value: "{{ contact.company_name }}", policy: if_empty}
      hs_lead_status:
        value: "{{ contact.interest }}"
        map: {interested: OPEN, not_interested: UNQUALIFIED}
  - name: hubspot-status
    when: type == 'reply'
    connector: hubspot
    action: update_status
    object: contact
    fields:
      hs_lead_status: {value: IN_PROGRESS, policy: monotonic, order: [NEW, OPEN, IN_PROGRESS]}
  - name: salesforce-interested
    when: type == 'interest'
    connector: salesforce
    action: upsert_lead
    fields:
      LastName: "{{ contact.last_name }}"
      Company: "{{ contact.company_name }}"
      Title: {value: "{{ contact.title }}", max_length: 128}
      Status:
        value: Open - Not Contacted
        policy: monotonic
        order: [Open - Not Contacted, Working - Contacted]
"""
BAD = """
  - name: hubspot-mistakes
    when: type == 'interest'
    connector: hubspot
    action: upsert_contact
    fields:
      hs_lead_stats: OPEN
      hs_object_id: "42"
      hs_lead_status:
        value: "{{ contact.interest }}"
        map: {interested: QUALIFIED}
  - name: salesforce-mistakes
    when: type == 'interest'
    connector: salesforce
    action: upsert_lead
    fields:
      Titel: "{{ contact.title }}"
      Status: Open
      Title: {value: "{{ contact.title }}", max_length: 200}
"""


def configured(tmp_path, hubspot_emulator, salesforce_emulator, rules):
    text = config_yaml(
        tmp_path / "bridge.db",
        hubspot=hubspot_settings(hubspot_emulator),
        salesforce=salesforce_settings(salesforce_emulator),
        rules=rules,
    )
    return parse_config(text, "config.yaml")


async def findings_of(config):
    connectors = open_connectors(config, set(config.connector_settings))
    found = await check_online(config, connectors)
    return [(str(f.problem).split(": ", 1)[1], f.fatal) for f in found]


async def test_check_online_accepts_rules_the_crms_can_take(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, GOOD)
    assert [f for f in await findings_of(config) if f[1]] == []


async def test_check_online_reports_what_the_crms_would_refuse(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, BAD)
    fatal = [message for message, is_fatal in await findings_of(config) if is_fatal]
    assert (
        "rules[0].fields.hs_lead_stats: hubspot has no field 'hs_lead_stats' on contact"
        " (did you mean `hs_lead_status`?)"
    ) in fatal
    assert "rules[0].fields.hs_object_id: hs_object_id is read-only in the CRM" in fatal
    assert any(
        m.startswith(
            "rules[0].fields.hs_lead_status.map.interested: 'QUALIFIED' is not an option of"
            " hs_lead_status"
        )
        for m in fatal
    ), fatal
    assert (
        "rules[1].fields.Titel: salesforce has no field 'Titel' on lead (did you mean `Title`?)"
    ) in fatal
    assert any(m.startswith("rules[1].fields.Status.value: 'Open' is not an option") for m in fatal)
    assert "rules[1].fields.Title.max_length: max_length 200 is more than Title's 128" in fatal


async def test_simulate_online_plans_each_field_against_the_records(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    # Given HubSpot has the contact, with a company a rep typed, and Salesforce has no lead
    hubspot_emulator.add_contact(
        {
            "email": "andrew@xoxo.capital",
            "firstname": "Andy",
            "company": "XOXO Capital",
            "hs_lead_status": "NEW",
        }
    )
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, GOOD)
    event = sample(type="interest", first_name="Andrew", last_name="Pierno", company_name="xoxo")
    result = simulate(config, event, "supersend")
    connectors = open_connectors(config, {"hubspot", "salesforce"})
    for connector in connectors.values():
        await connector.open()
    try:
        planned = await plan(result, config, connectors)
    finally:
        for connector in connectors.values():
            await connector.close()

    # Then the plan shows each change from what to what, and what a policy holds back
    hubspot, salesforce = planned
    assert hubspot.headline == "~ hubspot: contact email=andrew@xoxo.capital: updated"
    assert [(c.change, c.name, c.before, c.after) for c in hubspot.fields] == [
        ("~", "firstname", "Andy", "Andrew"),
        ("!", "company", "XOXO Capital", "xoxo"),
        ("~", "hs_lead_status", "NEW", "OPEN"),
    ]
    assert salesforce.headline == "+ salesforce: lead email=andrew@xoxo.capital: created"
    assert [(c.change, c.name, c.after) for c in salesforce.fields] == [
        ("+", "LastName", "Pierno"),
        ("+", "Company", "xoxo"),
        ("+", "Status", "Open - Not Contacted"),
    ]
    text = render(result, planned)
    assert text.endswith("Plan: 1 to create or log, 1 to change, 0 unchanged.")
    # Nothing was written
    (contact,) = hubspot_emulator.contacts.values()
    assert contact.properties["firstname"] == "Andy"
    assert salesforce_emulator.records("Lead") == []


async def test_simulate_online_shows_a_status_that_only_moves_forward(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    hubspot_emulator.add_contact({"email": "andrew@xoxo.capital", "hs_lead_status": "OPEN"})
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, GOOD)
    connectors = open_connectors(config, {"hubspot"})
    await connectors["hubspot"].open()
    try:
        forward = await plan(
            simulate(config, sample(type="reply"), "supersend"), config, connectors
        )
        hubspot_emulator.contacts[next(iter(hubspot_emulator.contacts))].properties[
            "hs_lead_status"
        ] = "IN_PROGRESS"
        again = await plan(simulate(config, sample(type="reply"), "supersend"), config, connectors)
    finally:
        await connectors["hubspot"].close()
    ((change,),) = [p.fields for p in forward]
    assert (change.change, change.before, change.after) == ("~", "OPEN", "IN_PROGRESS")
    (item,) = again
    assert item.headline == "= hubspot: contact email=andrew@xoxo.capital: nothing would change"


async def test_simulate_online_says_when_a_crm_refuses_the_login(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    hubspot_emulator.token = "pat-na1-rotated"  # the configured token is refused
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, GOOD)
    result = simulate(config, sample(type="reply"), "supersend")
    (item,) = await plan_online(result, config)
    assert item.connector == "hubspot" and item.error is not None
    assert item.error.startswith(("cannot log in:", "cannot read the record:")), item.error
    assert "Plan: 0 to create or log, 0 to change, 0 unchanged." in render(result, [item])


async def test_check_online_reports_a_refused_login_at_the_connector(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    hubspot_emulator.token = "pat-na1-rotated"
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, GOOD)
    found = await findings_of(config)
    hubspot = [(m, fatal) for m, fatal in found if m.startswith("connectors.hubspot: ")]
    assert len(hubspot) == 1 and hubspot[0][1], found
    assert [f for f in found if f[1] and not f[0].startswith("connectors.hubspot")] == []


LEAD_OBJECT = """
  - name: hubspot-lead-object
    when: type == 'interest'
    connector: hubspot
    action: upsert_contact
    hubspot_lead: {hs_lead_name: "{{ contact.first_name }}", hs_lead_type: HOT, hs_lead_tpye: x}
  - name: salesforce-lead-object
    when: type == 'interest'
    connector: salesforce
    action: upsert_lead
    hubspot_lead: {hs_lead_name: x}
"""


async def test_check_online_checks_the_hubspot_lead_objects_properties(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    config = configured(tmp_path, hubspot_emulator, salesforce_emulator, LEAD_OBJECT)
    found = await findings_of(config)
    assert (
        "rules[0].hubspot_lead.hs_lead_tpye: hubspot has no field 'hs_lead_tpye' on leads"
        " (did you mean `hs_lead_type`?)",
        True,
    ) in found
    assert any(
        m.startswith("rules[0].hubspot_lead.hs_lead_type.value: 'HOT' is not an option") and fatal
        for m, fatal in found
    ), found
    assert (
        "rules[1].hubspot_lead: salesforce is no HubSpot connector: it opens no Lead object",
        False,
    ) in found
    assert not any(m.startswith("rules[0].hubspot_lead.hs_lead_name") for m, _ in found)
