"""Outbound safety: no other host, no redirects, TLS verified, a Salesforce instance in the
login's domain."""

from __future__ import annotations

import asyncio

import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.errors import AuthenticationFailed, DeliveryError, PermanentDelivery
from connectors.base import LeadUpsert
from connectors.http import HttpConfig, HttpConnector
from connectors.hubspot import HubSpotConfig, HubSpotConnector
from connectors.outbound import (
    HostGuard,
    OutboundRefused,
    guard_session,
    instance_belongs,
    template_guard,
)
from connectors.salesforce import SalesforceConfig, SalesforceConnector


@pytest.mark.parametrize(
    ("instance", "login_url", "ok"),
    [
        ("acme.my.salesforce.com", "https://login.salesforce.com", True),
        ("na1.salesforce.com", "https://test.salesforce.com", True),
        ("acme.lightning.force.com", "https://acme.my.salesforce.com", True),
        ("https://acme.my.salesforce.com", "https://login.salesforce.com", True),
        ("evil.example.com", "https://login.salesforce.com", False),
        ("salesforce.com.evil.io", "https://login.salesforce.com", False),
        ("evilsalesforce.com", "https://login.salesforce.com", False),
        ("acme.my.salesforce.com:8443", "https://login.salesforce.com", False),
        ("127.0.0.1:8443", "https://127.0.0.1:8443", True),
        ("127.0.0.1:9999", "https://127.0.0.1:8443", False),
        ("acme.my.salesforce.com", "https://127.0.0.1:8443", False),
    ],
)
def test_a_salesforce_instance_must_belong_to_the_login_domain(instance, login_url, ok):
    assert instance_belongs(instance, login_url) is ok


def test_template_guard():
    guard = template_guard(["https://crm.internal/leads/{{ id_value | urlencode }}", None])
    assert guard is not None
    guard.check("https://crm.internal/leads/x%40y")
    with pytest.raises(OutboundRefused):
        guard.check("https://crm.internal.evil.io/leads/x")
    assert template_guard(["{{ contact.custom.url }}"]) is None


@pytest.fixture
async def servers():
    """A target that counts its hits, and a server that redirects everything to it."""
    hits = []

    async def target(request):
        hits.append(request.path)
        return web.json_response({"id": "1"})

    async def redirect(request):
        raise web.HTTPTemporaryRedirect(f"{target_server.make_url('/stolen')}")

    target_app = web.Application()
    target_app.router.add_route("*", "/{tail:.*}", target)
    redirect_app = web.Application()
    redirect_app.router.add_route("*", "/{tail:.*}", redirect)
    target_server = TestServer(target_app, host="127.0.0.1")
    redirect_server = TestServer(redirect_app, host="127.0.0.1")
    await target_server.start_server()
    await redirect_server.start_server()
    yield redirect_server, target_server, hits
    await redirect_server.close()
    await target_server.close()


async def test_a_guarded_session_neither_follows_redirects_nor_leaves_its_hosts(servers):
    redirector, target, hits = servers
    session = requests.Session()
    guard_session(session, [str(redirector.make_url("/"))])

    # A redirect followed by default cannot leave the configured hosts...
    with pytest.raises(OutboundRefused):
        await asyncio.to_thread(session.post, str(redirector.make_url("/x")), timeout=5)
    assert hits == []
    # Asked not to follow (as the Salesforce connector's session does), the 3xx is the answer.
    response = await asyncio.to_thread(
        session.post, str(redirector.make_url("/x")), timeout=5, allow_redirects=False
    )
    assert response.status_code == 307 and hits == []
    with pytest.raises(OutboundRefused):
        await asyncio.to_thread(session.get, str(target.make_url("/y")), timeout=5)
    assert hits == []
    session.close()


async def test_hubspot_does_not_follow_a_redirect_to_another_host(servers):
    redirector, _, hits = servers
    settings = {
        "type": "hubspot",
        "access_token": "pat-na1-redirect-test",
        "base_url": str(redirector.make_url("")).rstrip("/"),
        "timeout": 2,
    }
    connector = HubSpotConnector("hubspot", HubSpotConfig.model_validate(settings))
    await connector.open()
    try:
        with pytest.raises(DeliveryError, match="307"):
            await connector.upsert_lead(
                LeadUpsert(object="contact", id_value="a@example.com", fields={"x": "1"})
            )
    finally:
        await connector.close()
    assert hits == []  # the bearer token never reached the other host


async def test_http_connector_refuses_a_rendered_url_on_another_host(servers):
    redirector, _, hits = servers
    config = HttpConfig.model_validate(
        {"type": "http", "url": f"{redirector.make_url('/leads')}/{{{{ id_value }}}}"}
    )
    connector = HttpConnector("svc", config)
    await connector.open()
    try:
        with pytest.raises(DeliveryError):  # a 307 answer, not followed
            await connector.upsert_lead(LeadUpsert(id_value="a", fields={}))
        connector._guard = HostGuard(["https://elsewhere.example"])
        with pytest.raises(PermanentDelivery, match="not in the connector's config"):
            await connector.upsert_lead(LeadUpsert(id_value="a", fields={}))
    finally:
        await connector.close()
    assert hits == []


async def test_a_salesforce_login_naming_a_foreign_instance_is_refused(monkeypatch):
    import simple_salesforce.login

    monkeypatch.setattr(
        simple_salesforce.login, "SalesforceLogin", lambda **kw: ("00D!sid", "evil.example.com")
    )
    settings = {
        "type": "salesforce",
        "username": "user@example.com",
        "password": "pw",
        "security_token": "tok",
        "login_url": "https://login.salesforce.com",
    }
    connector = SalesforceConnector("salesforce", SalesforceConfig.model_validate(settings))
    await connector.open()
    try:
        with pytest.raises(AuthenticationFailed, match="instance outside"):
            await connector.verify()
    finally:
        await connector.close()


async def test_tls_is_verified_and_requests_ca_bundle_is_ignored(tls_ca, monkeypatch):
    from connectors.salesforce import _Session

    app = web.Application()

    async def ok(request):
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=tls_ca.server_context())
    url = f"https://127.0.0.1:{server.port}/"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_ca.ca_path))  # must change nothing
    untrusting, trusting = _Session(5, True), _Session(5, str(tls_ca.ca_path))
    for session in (untrusting, trusting):
        guard_session(session, [url])
    try:
        with pytest.raises(requests.exceptions.SSLError):
            await asyncio.to_thread(untrusting.get, url)
        assert (await asyncio.to_thread(trusting.get, url)).text == "ok"
    finally:
        untrusting.close()
        trusting.close()
        await server.close()
