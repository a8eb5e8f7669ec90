"""Helpers shared by the test layers: configs that point at emulators, payloads, waiting."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DATA = Path(__file__).parent / "data"
SAMPLE_TEXT = (DATA / "supersend-click.json").read_text()
TOKEN = "test-webhook-token"


def sample(**contact: Any) -> dict[str, Any]:
    """The platform's sample event, with contact fields replaced."""
    data = json.loads(SAMPLE_TEXT)
    type_ = contact.pop("type", None)
    if type_:
        data["type"] = type_
    data["contact"].update(contact)
    return data


def hubspot_settings(emulator: Any) -> dict[str, Any]:
    """A HubSpot connector's settings pointing at the emulator, with its token."""
    return {"access_token": "pat-na1-test", "base_url": emulator.url}


def salesforce_settings(emulator: Any) -> dict[str, Any]:
    """A Salesforce connector's settings: SOAP login at the emulator, trusting its CA."""
    return {
        "username": "user@example.com",
        "password": "pw",
        "security_token": "tok",
        "login_url": emulator.url,
        "ca_bundle": emulator.ca_path,
    }


def config_yaml(
    db_path: Path,
    *,
    hubspot: dict[str, Any] | None = None,
    salesforce: dict[str, Any] | None = None,
    rules: str | None = None,
    delivery: str = "",
    server: str = "",
    store: str | None = None,
) -> str:
    """A config with the two connectors (dry when given no settings) and the example's rules;
    `store` replaces the `store:` block (tests.postgres.store_yaml), default SQLite at db_path."""

    def block(name: str, settings: dict[str, Any] | None) -> str:
        lines = [f"  {name}:", f"    type: {name}"]
        lines += [f"    {k}: {json.dumps(str(v))}" for k, v in (settings or {}).items()]
        return "\n".join(lines)

    default_rules = """
  - name: interested-to-hubspot
    when: type in ('interest', 'click') and contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
      lastname: "{{ contact.last_name }}"
      hs_lead_status: OPEN
  - name: interested-to-salesforce
    when: type in ('interest', 'click') and contact.interest == 'interested'
    connector: salesforce
    action: upsert_lead
    fields:
      FirstName: "{{ contact.first_name }}"
      LastName: "{{ contact.last_name }}"
      Title: "{{ contact.title }}"
      Company: "{{ contact.company_name }}"
"""
    delivery_settings = {
        "in_call_wait": "0.01",
        "in_call_wait_max": "0.05",
        "backoff_initial": "0.05",
        "backoff_max": "0.2",
        "poll_interval": "0.05",
    }
    for line in delivery.splitlines():
        key, _, value = line.strip().partition(":")
        if key:
            delivery_settings[key.strip()] = value.strip()
    delivery_block = "\n".join(f"  {k}: {v}" for k, v in delivery_settings.items())
    sqlite_store = f"store:\n  type: sqlite\n  path: {db_path}"
    return f"""\
server:
  host: 127.0.0.1
  port: 0
  max_body_bytes: 4096
{server}
sources:
  supersend:
    tokens: ["{TOKEN}"]
{store or sqlite_store}
delivery:
{delivery_block}
connectors:
{block("hubspot", hubspot)}
{block("salesforce", salesforce)}
rules:{rules if rules is not None else default_rules}
logging:
  format: json
"""


def hubspot_emails(emulator: Any) -> list[str]:
    """Emails of the HubSpot emulator's contacts, sorted."""
    with emulator.lock:
        return sorted(r.properties["email"] for r in emulator.contacts.values())


def salesforce_emails(emulator: Any) -> list[str]:
    """Emails of the Salesforce emulator's Leads, sorted."""
    return sorted(r["Email"] for r in emulator.records("Lead"))


def delivery_states(db: Path) -> dict[str, int]:
    """Deliveries by status, read from a store file (read-only, beside a running daemon)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
    return dict(rows)


def delivery_states_of(config_path: Path) -> dict[str, int]:
    """Deliveries by status in the store a config file names, SQLite or PostgreSQL."""
    from bridge.config import load_config
    from tests.postgres import fetch

    store = load_config(config_path).store
    if store.type == "sqlite":
        return delivery_states(store.path)
    sql = "SELECT status, count(*) FROM deliveries GROUP BY status"
    return dict(fetch(store.url.get_secret_value(), sql))


def wait_for(check: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.02) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        time.sleep(interval)
