"""The daemon as a process, at DEBUG, with every secret in use: no token, password, session
id or unmasked email appears in any log line, nor in `check`'s output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import requests

from bridge.ingress.signatures import decode_secret, sign
from tests.emulators.hubspot import HubSpotEmulator
from tests.emulators.salesforce import SalesforceEmulator
from tests.security.conftest import SECRET
from tests.support import TOKEN, config_yaml, sample, wait_for

HUBSPOT_TOKEN = "pat-na1-0a1b2c3d-hubspot-secret-token"
SF_PASSWORD = "sf-Password-9f8e7d"
SF_SECURITY_TOKEN = "sfSecurityToken4321"
HEADER_TOKEN = "header-only-token-5566778899"
EMAILS = [f"Person.{i}@Example.org" for i in range(3)] + ["ann.o'hara+tag@mail.example.co.uk"]
# An email whose local part is shown (anything but a first character then ***).
UNMASKED = re.compile(r"[A-Za-z0-9._%+'-]{2,}@[A-Za-z0-9-]+\.[A-Za-z]")


@pytest.fixture
def emulators(tls_ca):
    hubspot = HubSpotEmulator(token=HUBSPOT_TOKEN)
    salesforce = SalesforceEmulator(
        password=SF_PASSWORD, security_token=SF_SECURITY_TOKEN, tls=tls_ca
    )
    hubspot.start()
    salesforce.start()
    yield hubspot, salesforce
    hubspot.stop()
    salesforce.stop()


def write_config(tmp_path, hubspot, salesforce):
    text = config_yaml(
        tmp_path / "bridge.db",
        hubspot={"access_token": HUBSPOT_TOKEN, "base_url": hubspot.url},
        salesforce={
            "username": "user@example.com",
            "password": SF_PASSWORD,
            "security_token": SF_SECURITY_TOKEN,
            "login_url": salesforce.url,
            "ca_bundle": salesforce.ca_path,
        },
    )
    text = text.replace(
        f'    tokens: ["{TOKEN}"]\n',
        f'    tokens: ["{TOKEN}"]\n'
        f'  signed:\n    tokens: []\n    signature:\n      secrets: ["{SECRET}"]\n'
        f'  headers:\n    tokens: ["{HEADER_TOKEN}"]\n    token_in: [header]\n',
    )
    text = text.replace(
        "logging:\n  format: json", "logging:\n  format: json\n  level: DEBUG\n  access_log: true"
    )
    path = tmp_path / "config.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_no_secret_or_email_in_any_log_line(daemon_factory, tmp_path, emulators):
    hubspot, salesforce = emulators
    path = write_config(tmp_path, hubspot, salesforce)
    daemon = daemon_factory(path)
    session = daemon.session
    url = daemon.url
    JSON = {"Content-Type": "application/json"}

    # Given webhooks with tokens in every place, right and wrong, signed ones, and bad ones
    for i, email in enumerate(EMAILS):
        body = json.dumps(sample(email=email, first_name=f"Firstname{i}", last_name="Lastname"))
        assert (
            session.post(
                f"{url}/webhooks/supersend/{TOKEN}", data=body, headers=JSON, timeout=10
            ).status_code
            == 202
        )
    body = json.dumps(sample(email=EMAILS[0], title="Chief"))
    session.post(f"{url}/webhooks/supersend?token={TOKEN}", data=body, headers=JSON, timeout=10)
    session.post(f"{url}/webhooks/supersend/{TOKEN}-wrong", data=body, headers=JSON, timeout=10)
    session.post(
        f"{url}/webhooks/supersend?token=guess-{TOKEN}", data=body, headers=JSON, timeout=10
    )
    session.post(f"{url}/webhooks/headers/{HEADER_TOKEN}", data=body, headers=JSON, timeout=10)
    session.post(
        f"{url}/webhooks/headers",
        data=body,
        timeout=10,
        headers={**JSON, "Authorization": f"Bearer {HEADER_TOKEN}"},
    )
    session.post(
        f"{url}/webhooks/supersend/{TOKEN}",
        data=json.dumps(sample(email="bad@")),
        headers=JSON,
        timeout=10,
    )
    now = int(time.time())
    signed = json.dumps(sample(email="signed.person@example.net")).encode()
    session.post(
        f"{url}/webhooks/signed",
        data=signed,
        timeout=10,
        headers={
            **JSON,
            "webhook-id": "msg_x",
            "webhook-timestamp": str(now),
            "webhook-signature": sign(decode_secret(SECRET), "msg_x", now, signed),
        },
    )

    # When the CRMs have received them all
    wait_for(lambda: len(hubspot.contacts) >= len(EMAILS), timeout=30)
    wait_for(lambda: len(salesforce.records("Lead")) >= len(EMAILS), timeout=30)
    assert daemon.stop() == 0

    # Then no line, at any level, carries a secret or an email in clear
    lines = [json.dumps(record) for record in daemon.logs]
    text = "\n".join(lines)
    assert any(r.get("level") == "debug" for r in daemon.logs)
    assert any(r.get("action") == "http.access" for r in daemon.logs)
    sessions = set(salesforce.sessions)
    for secret in (
        TOKEN,
        HUBSPOT_TOKEN,
        SF_PASSWORD,
        SF_SECURITY_TOKEN,
        HEADER_TOKEN,
        SECRET,
        SECRET.removeprefix("whsec_"),
        *sessions,
    ):
        assert secret not in text, f"{secret[:6]}... leaked"
    leaks = [line for line in lines if UNMASKED.search(line)]
    assert leaks == []
    assert "/webhooks/supersend/***" in text and "token=***" in text
    assert "p***@example.org" in text  # masked, yet recognisable
    assert "Firstname0" not in text and "Lastname" not in text


def test_check_prints_no_secret(tmp_path, emulators):
    hubspot, salesforce = emulators
    path = write_config(tmp_path, hubspot, salesforce)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for secret in (TOKEN, HUBSPOT_TOKEN, SF_PASSWORD, SF_SECURITY_TOKEN, HEADER_TOKEN, SECRET):
        assert secret not in out


def test_check_warns_about_a_secret_readable_by_others(tmp_path, emulators):
    hubspot, salesforce = emulators
    path = write_config(tmp_path, hubspot, salesforce)
    path.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert (
        f"crm-bridge: warning: {path} holds a secret and is readable by others (mode 0644): "
        f"chmod 600 {path}, or read the secret from ${{VAR}} or ${{file:...}}"
    ) in result.stderr
    assert HUBSPOT_TOKEN not in result.stderr


def test_a_world_readable_credential_file_is_warned_about(tmp_path):
    credential = tmp_path / "token"
    credential.write_text("a-credential-file-token-123")
    credential.chmod(0o644)
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(tmp_path / "bridge.db").replace(
            f'tokens: ["{TOKEN}"]', f'tokens: ["${{file:{credential}}}"]'
        )
    )
    path.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert f"{credential} holds a secret and is readable by others (mode 0644)" in result.stderr
    assert str(path) + " holds" not in result.stderr  # the config itself holds no secret


def test_secrets_and_emails_in_a_url_are_redacted_from_a_refusal_log(daemon_factory, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(tmp_path / "bridge.db").replace("format: json", "format: json\n  level: DEBUG")
    )
    daemon = daemon_factory(path)
    response = requests.post(f"{daemon.url}/nowhere/{TOKEN}?email=someone@example.com", timeout=10)
    assert response.status_code == 404
    daemon.stop()
    text = "\n".join(json.dumps(r) for r in daemon.logs)
    assert TOKEN not in text and "someone@example.com" not in text


def test_serve_logs_the_readable_secret_warning(daemon_factory, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(tmp_path / "bridge.db"))
    path.chmod(0o640)
    daemon = daemon_factory(path)
    assert daemon.stop() == 0
    (warning,) = daemon.actions("config.readable_secret")
    assert warning["level"] == "warning"
    assert warning["message"].startswith(f"{path} holds a secret and is readable by others")
    assert TOKEN not in json.dumps(daemon.logs)
