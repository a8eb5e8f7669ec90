import textwrap

import pytest

from bridge.config import load_config, parse_config
from bridge.errors import ConfigError

GOOD = """\
server:
  port: 0
connectors:
  hubspot:
    type: hubspot
    access_token: ${TEST_HUBSPOT_TOKEN:-}
rules:
  - name: interested
    when: type == 'interest' and contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "config.yaml")
    return [str(p) for p in info.value.problems]


def test_the_example_config_is_valid():
    config = load_config("config.example.yaml")
    assert set(config.connectors) == {"hubspot", "salesforce"}
    assert config.rules[1].when == "type == 'interest' and contact.interest == 'interested'"


def test_environment_variables_are_interpolated(monkeypatch):
    monkeypatch.setenv("TEST_HUBSPOT_TOKEN", "pat-na1-secret")
    config = parse_config(GOOD)
    token = config.connector_settings["hubspot"].access_token
    assert token.get_secret_value() == "pat-na1-secret"
    assert "pat-na1-secret" not in repr(config.connector_settings["hubspot"])


def test_an_unset_default_leaves_the_connector_without_credentials(monkeypatch):
    monkeypatch.delenv("TEST_HUBSPOT_TOKEN", raising=False)
    assert not parse_config(GOOD).connector_settings["hubspot"].has_credentials()


def test_a_required_variable_that_is_unset_is_reported_where_it_is_used(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    assert problems(GOOD.replace("${TEST_HUBSPOT_TOKEN:-}", "${NOT_SET_ANYWHERE}")) == [
        "config.yaml:6:5: connectors.hubspot.access_token: environment variable NOT_SET_ANYWHERE"
        " is not set (write ${NOT_SET_ANYWHERE:-} to allow it empty)"
    ]


def test_unknown_keys_are_reported_with_file_line_and_a_hint():
    assert problems(GOOD.replace("  port: 0", "  prot: 0")) == [
        "config.yaml:2:3: server.prot: unknown key (did you mean `port`?)"
    ]


def test_every_problem_is_reported_at_once():
    text = GOOD.replace("connector: hubspot", "connector: hubspt").replace(
        "type: hubspot", "type: hubspto"
    )
    assert problems(text) == [
        "config.yaml:5:5: connectors.hubspot.type: unknown connector type 'hubspto'"
        " (did you mean `hubspot`?); installed: http, hubspot, salesforce",
        "config.yaml:10:5: rules[0].connector: no connector named 'hubspt'"
        " (did you mean `hubspot`?); configured: hubspot",
    ]


def test_connector_settings_are_checked_by_the_connector_model():
    found = problems(GOOD.replace("    access_token:", "    acces_token:"))
    assert found == [
        "config.yaml:6:5: connectors.hubspot.acces_token: unknown key"
        " (did you mean `access_token`?)"
    ]


def test_expression_syntax_errors_are_caught_at_load_time():
    found = problems(GOOD.replace("contact.interest == 'interested'", "contact.interest = 'x'"))
    assert len(found) == 1
    assert found[0].startswith("config.yaml:9:5: rules[0].when: invalid expression:")


def test_template_syntax_errors_are_caught_at_load_time():
    found = problems(GOOD.replace("{{ contact.first_name }}", "{{ contact.first_name }"))
    assert len(found) == 1
    assert found[0].startswith("config.yaml:13:7: rules[0].fields.firstname: invalid template:")


def test_yaml_syntax_errors_carry_the_line():
    found = problems("server:\n  port: [1\n")
    assert len(found) == 1 and found[0].startswith("config.yaml:3:1: (syntax):")


def test_a_tokenless_source_is_refused_off_loopback():
    assert problems(GOOD.replace("  port: 0", "  port: 0\n  host: 0.0.0.0")) == [
        "config.yaml:1:1: sources.supersend.tokens: a token or a signature is required when"
        " listening on"
        " 0.0.0.0 (not loopback)"
    ]


def test_a_tokenless_source_is_refused_behind_a_trusted_proxy():
    text = GOOD.replace("  port: 0", "  port: 0\n  trusted_proxies: [127.0.0.1/32]")
    assert problems(text + "sources:\n  supersend:\n    tokens: []\n") == [
        "config.yaml:17:5: sources.supersend.tokens: a token or a signature is required when"
        " server.trusted_proxies is set (a proxy passes on anyone's requests, from its own"
        " address)"
    ]


WHSEC = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


@pytest.mark.parametrize("days", ["3.5", "0", "-1"])
def test_a_retention_shorter_than_the_senders_retries_is_refused(days):
    assert problems(GOOD + f"privacy:\n  retention_days: {days}\n") == [
        "config.yaml:15:3: privacy.retention_days: retention_days must be at least 4: senders"
        " retry for up to 3 days, and a resend of an event purged sooner would be delivered twice"
    ]


def test_a_retention_of_four_days_is_accepted():
    assert parse_config(GOOD + "privacy:\n  retention_days: 4\n").privacy.retention_days == 4


def signed_source(settings: str) -> str:
    return GOOD + f'sources:\n  signed:\n    signature:\n      secrets: ["{WHSEC}"]\n{settings}'


def test_a_tolerance_that_outlives_the_replay_window_is_refused():
    text = signed_source("      tolerance: 3600\n      replay_window: 360000\n") + (
        "  other:\n    signature:\n"
        f'      secrets: ["{WHSEC}"]\n      tolerance: 180000\n      replay_window: 360000\n'
    )
    assert problems(text) == [
        "config.yaml:21:5: sources.other.signature: tolerance (180000 s) must be less than half"
        " of replay_window (360000 s): a webhook-timestamp is good for tolerance either way, so a"
        " captured request would be accepted again once its webhook-id is forgotten"
    ]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no-such\.yaml"):
        load_config(tmp_path / "no-such.yaml")


RULE = """\
connectors:
  hubspot:
    type: hubspot
rules:
  - name: status
    when: {when}
    connector: {connector}
    action: {action}
    fields:
      {field}
"""
FINE = {
    "when": "type == 'reply'",
    "connector": "hubspot",
    "action": "upsert_contact",
    "field": "hs_lead_status: OPEN",
}


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (
            {"action": "upsert_leads"},
            "config.yaml:8:5: rules[0].action: unknown action 'upsert_leads' (did you mean"
            " `upsert_lead`?); one of: upsert_lead, upsert_contact, update_status, log_activity,"
            " stop",
        ),
        (
            {"connector": "hubspt"},
            "config.yaml:7:5: rules[0].connector: no connector named 'hubspt' (did you mean"
            " `hubspot`?); configured: hubspot",
        ),
        (
            {"when": "type = 'reply'"},
            "config.yaml:6:5: rules[0].when: invalid expression: expected token 'end of print"
            " statement', got '=' (compare with ==)",
        ),
        (
            {"when": "type == 'reply' and (contact.interest == 'x'"},
            "config.yaml:6:5: rules[0].when: invalid expression: unexpected end of template,"
            " expected ')'.",
        ),
        (
            {"when": "contact.email | lowr == 'x'"},
            "config.yaml:6:5: rules[0].when: invalid expression: unknown filter 'lowr' (did you"
            " mean `lower`?)",
        ),
        (
            {"when": "contact.email is endwith('@acme.com')"},
            "config.yaml:6:5: rules[0].when: invalid expression: unknown test 'endwith' (did you"
            " mean `endswith`?)",
        ),
        (
            {"when": "contact.email is match('(')"},
            "config.yaml:6:5: rules[0].when: invalid regular expression '(': missing ): (",
        ),
        (
            {"when": r"contact.email is match('(a)\\1')"},
            r"config.yaml:6:5: rules[0].when: invalid regular expression '(a)\\1': invalid escape"
            " sequence: \\1 (rules use RE2 syntax: no backreferences, no lookarounds)",
        ),
        (
            {"field": 'firstname: "{{ contact.first_name | tittle }}"'},
            "config.yaml:10:7: rules[0].fields.firstname: invalid template: unknown filter"
            " 'tittle' (did you mean `title`?)",
        ),
        (
            {"field": "hs_lead_status: {vaule: OPEN}"},
            "config.yaml:10:24: rules[0].fields.hs_lead_status.vaule: unknown key (did you mean"
            " `value`?)",
        ),
        (
            {"field": "hs_lead_status: {value: OPEN, policy: monotnic}"},
            "config.yaml:10:37: rules[0].fields.hs_lead_status.policy: unknown value 'monotnic'"
            " (did you mean `monotonic`?); one of: always, if_empty, on_create, monotonic",
        ),
        (
            {"field": "hs_lead_status: {value: OPEN, policy: monotonic}"},
            "config.yaml:10:7: rules[0].fields.hs_lead_status: policy monotonic needs an `order:`"
            " of at least two values",
        ),
        (
            {"field": "hs_lead_status: {value: OPN, policy: monotonic, order: [NEW, OPEN]}"},
            "config.yaml:10:24: rules[0].fields.hs_lead_status.value: 'OPN' is not in the order"
            " (NEW, OPEN) (did you mean `OPEN`?)",
        ),
        (
            {"field": "hs_lead_status: ${NOT_SET_ANYWHERE}"},
            "config.yaml:10:7: rules[0].fields.hs_lead_status: environment variable"
            " NOT_SET_ANYWHERE is not set (write ${NOT_SET_ANYWHERE:-} to allow it empty)",
        ),
        (
            {"field": "hs_lead_status: ${file:/nonexistent/credential}"},
            "config.yaml:10:7: rules[0].fields.hs_lead_status: cannot read"
            " /nonexistent/credential: No such file or directory",
        ),
        (
            {"field": "x: \"{% include '/etc/passwd' %}\""},
            "config.yaml:10:7: rules[0].fields.x: include is not allowed: rules cannot read files",
        ),
        (
            {"action": "update_status", "field": "{}"},
            "config.yaml:5:5: rules[0]: action update_status needs `fields:` (the status to set)",
        ),
    ],
)
def test_common_rule_mistakes_are_reported_word_for_word(monkeypatch, mistake, message):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    text = RULE.format(**(FINE | mistake)).replace("fields:\n      {}", "fields: {}")
    assert problems(text) == [message]


def test_a_missing_key_is_named_where_it_belongs():
    text = RULE.format(**FINE).replace("    when: type == 'reply'\n", "")
    assert problems(text) == ["config.yaml:5:5: rules[0].when: required key `when` is missing"]


def test_a_misspelt_rule_key_names_the_right_one():
    text = RULE.format(**FINE).replace("    connector:", "    conector:")
    assert problems(text) == [
        "config.yaml:7:5: rules[0].conector: unknown key (did you mean `connector`?)"
    ]


def test_secrets_come_from_files(tmp_path):
    secret = tmp_path / "hubspot_token"
    secret.write_text("pat-from-a-file\n")
    config = parse_config(GOOD.replace("${TEST_HUBSPOT_TOKEN:-}", f"${{file:{secret}}}"))
    assert config.connector_settings["hubspot"].access_token.get_secret_value() == (
        "pat-from-a-file"
    )


def test_yaml_anchors_and_merge_keys_share_a_field_setting():
    text = """\
connectors: {hubspot: {type: hubspot}}
rules:
  - name: a
    when: type == 'interest'
    connector: hubspot
    fields:
      hs_lead_status: &status {value: OPEN, policy: monotonic, order: [OPEN, CONNECTED]}
  - name: b
    when: type == 'appointment'
    connector: hubspot
    fields:
      hs_lead_status: {<<: *status, value: CONNECTED}
"""
    a, b = parse_config(text).rules
    assert b.fields["hs_lead_status"].order == ["OPEN", "CONNECTED"]
    assert (a.fields["hs_lead_status"].value, b.fields["hs_lead_status"].value) == (
        "OPEN",
        "CONNECTED",
    )


def test_a_store_url_selects_postgresql_and_the_sqlite_form_still_works(monkeypatch):
    monkeypatch.setenv("TEST_PG_URL", "postgresql://bridge:s3cret@db.internal:5432/crm")
    pg = parse_config(GOOD + "store:\n  url: ${TEST_PG_URL}\n  pool_max: 20\n").store
    assert (pg.type, pg.pool_min, pg.pool_max, pg.migrate_on_start) == ("postgres", 2, 20, True)
    assert pg.describe() == "postgresql://bridge@db.internal:5432/crm"  # no password
    assert "s3cret" not in repr(pg)
    sqlite = parse_config(GOOD + "store:\n  type: sqlite\n  path: /tmp/x.db\n").store
    assert (sqlite.type, str(sqlite.path)) == ("sqlite", "/tmp/x.db")
    assert parse_config(GOOD).store.type == "sqlite"


def test_postgresql_store_problems_are_reported_with_file_and_line():
    line = GOOD.count("\n") + 1  # where `store:` begins
    found = problems(GOOD + "store:\n  url: mysql://db/crm\n  pool_mn: 3\n")
    assert found == [
        f"config.yaml:{line + 1}:3: store.url: a PostgreSQL URL starts with postgresql://",
        f"config.yaml:{line + 2}:3: store.pool_mn: unknown key (did you mean `pool_min`?)",
    ]
    assert problems(
        GOOD + "store:\n  url: postgresql://db/crm\n  pool_min: 9\n  pool_max: 2\n"
    ) == [f"config.yaml:{line}:1: store: pool_min (9) exceeds pool_max (2)"]
