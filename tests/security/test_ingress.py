"""Every refusal of the webhook endpoint, with its status and JSON body, and the paths that
get through: tokens where a source allows them, signatures, addresses, limits."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from bridge.errors import StoreUnavailable
from bridge.ingress.signatures import decode_secret, sign
from bridge.server import CONFIG, LOAD, STORE, WORKERS, create_app
from tests.security.conftest import JSON, NOW, OLD_SECRET, SECRET, Clock, answer
from tests.support import SAMPLE_TEXT, TOKEN, sample

BODY = SAMPLE_TEXT.encode()
SIGNED = f"""\
  supersend:
    signature:
      scheme: standard_webhooks
      secrets: ["{OLD_SECRET}", "{SECRET}"]
"""


def signed_headers(body=BODY, message_id="msg_1", timestamp=int(NOW), secret=SECRET):
    return {
        **JSON,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(decode_secret(secret), message_id, timestamp, body),
    }


async def post(client, path="/webhooks/supersend", body=BODY, headers=JSON):
    return await answer(await client.post(path, data=body, headers=headers))


# --- tokens ----------------------------------------------------------------------------------


async def test_a_header_only_source_refuses_a_token_in_the_url(client_for):
    client = await client_for(f'  supersend:\n    tokens: ["{TOKEN}"]\n    token_in: [header]')
    for path in (f"/webhooks/supersend/{TOKEN}", f"/webhooks/supersend?token={TOKEN}"):
        assert await post(client, path) == (
            401,
            {"error": "unauthorized", "message": "missing or wrong webhook token"},
        )
    status, _ = await post(client, headers={**JSON, "X-Webhook-Token": TOKEN})
    assert status == 202


async def test_several_tokens_are_active_at_once(client_for):
    new = "a-new-token-0123456789"
    client = await client_for(f'  supersend:\n    tokens: ["{TOKEN}", "{new}"]')
    for token in (TOKEN, new):
        status, _ = await post(client, f"/webhooks/supersend/{token}")
        assert status == 202


# --- signatures ------------------------------------------------------------------------------


async def test_a_signed_webhook_is_stored(client_for):
    client = await client_for(SIGNED)
    status, body = await post(client, headers=signed_headers())
    assert status == 202 and body["duplicate"] is False


async def test_either_active_secret_signs(client_for):
    client = await client_for(SIGNED)
    status, _ = await post(client, headers=signed_headers(secret=OLD_SECRET))
    assert status == 202


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (
            lambda h: {k: v for k, v in h.items() if k != "webhook-signature"},
            "signature_missing",
            "webhook-id, webhook-timestamp and webhook-signature headers are required",
        ),
        (
            lambda h: {**h, "webhook-signature": "v1,AAAA"},
            "signature_invalid",
            "no valid signature for this message",
        ),
        (
            lambda h: {**h, "webhook-id": "msg_2"},
            "signature_invalid",
            "no valid signature for this message",
        ),
        (
            lambda h: signed_headers(timestamp=int(NOW) - 301),
            "signature_expired",
            "webhook-timestamp is more than 300 seconds from the receiver's clock",
        ),
        (
            lambda h: signed_headers(timestamp=int(NOW) + 301),
            "signature_expired",
            "webhook-timestamp is more than 300 seconds from the receiver's clock",
        ),
    ],
)
async def test_signature_refusals(client_for, change, code, message):
    client = await client_for(SIGNED)
    assert await post(client, headers=change(signed_headers())) == (
        401,
        {"error": code, "message": message},
    )


async def test_a_tampered_body_is_refused(client_for):
    client = await client_for(SIGNED)
    tampered = BODY.replace(b"andrew", b"mallory")
    assert await post(client, body=tampered, headers=signed_headers()) == (
        401,
        {"error": "signature_invalid", "message": "no valid signature for this message"},
    )


async def test_a_replay_is_refused_once_its_event_is_gone(client_for):
    clock = Clock()
    client = await client_for(SIGNED, clock=clock)
    headers = signed_headers()
    status, first = await post(client, headers=headers)
    assert status == 202
    # The sender retrying an answer it lost: its event is stored, so it hears 202 again.
    clock.now += 60
    assert await post(client, headers=headers) == (
        202,
        {"event_id": first["event_id"], "duplicate": True},
    )
    # Once the person is forgotten, a captured request cannot bring their data back.
    await client.server.app[STORE].forget("andrew@xoxo.capital")
    assert await post(client, headers=headers) == (
        409,
        {
            "error": "replayed",
            "message": "this webhook-id was already received and its event is not stored",
        },
    )


def fail_ingest_once(monkeypatch, store):
    ingest = store.ingest

    async def failing(event):
        monkeypatch.setattr(store, "ingest", ingest)  # once
        raise StoreUnavailable("the store could not commit: disk I/O error")

    monkeypatch.setattr(store, "ingest", failing)


async def test_a_retry_after_a_failed_commit_is_not_a_replay(client_for, monkeypatch):
    client = await client_for(SIGNED)
    fail_ingest_once(monkeypatch, client.server.app[STORE])
    status, body = await post(client, headers=signed_headers())
    assert (status, body["error"]) == (503, "store_unavailable")
    status, body = await post(client, headers=signed_headers())
    assert (status, body["duplicate"]) == (202, False)


@asynccontextmanager
async def restarted(client, clock):
    """The daemon of `client` stopped and started again on its store (as another instance
    sharing a PostgreSQL store would be: nothing in memory carries over)."""
    await client.close()
    app = create_app(client.server.app[CONFIG], clock=clock)
    again = TestClient(TestServer(app, host="127.0.0.1"))
    await again.start_server()
    try:
        yield again
    finally:
        await again.close()


async def test_a_retry_after_a_failed_commit_and_a_restart_is_accepted(client_for, monkeypatch):
    # Given a signed webhook whose event failed to commit (a 503 to the sender)
    clock = Clock()
    client = await client_for(SIGNED, clock=clock)
    fail_ingest_once(monkeypatch, client.server.app[STORE])
    status, body = await post(client, headers=signed_headers())
    assert (status, body["error"]) == (503, "store_unavailable")
    # When the sender retries once the daemon has restarted
    clock.now += 30
    async with restarted(client, clock) as client:
        status, body = await post(client, headers=signed_headers())
        # Then it is stored, once: the failed attempt remembered nothing
        assert (status, body["duplicate"]) == (202, False)
        assert await post(client, headers=signed_headers()) == (
            202,
            {"event_id": body["event_id"], "duplicate": True},
        )
        # And, its event stored, its id is remembered: forgotten, the event cannot be replayed
        await client.server.app[STORE].forget("andrew@xoxo.capital")
        status, body = await post(client, headers=signed_headers())
        assert (status, body["error"]) == (409, "replayed")


async def test_an_id_the_store_failed_to_remember_is_remembered_by_the_retry(
    client_for, monkeypatch
):
    client = await client_for(SIGNED)
    store = client.server.app[STORE]
    seen_message = store.seen_message

    async def failing_to_remember(source, message_id, now, keep):
        if keep:  # the question (keep 0) is answered; remembering the id fails, once
            monkeypatch.setattr(store, "seen_message", seen_message)
            raise StoreUnavailable("the store could not commit: disk I/O error")
        return await seen_message(source, message_id, now, keep)

    monkeypatch.setattr(store, "seen_message", failing_to_remember)
    status, body = await post(client, headers=signed_headers())
    assert (status, body["error"]) == (503, "store_unavailable")
    status, body = await post(client, headers=signed_headers())
    assert (status, body["duplicate"]) == (202, True)
    await store.forget("andrew@xoxo.capital")
    status, body = await post(client, headers=signed_headers())
    assert (status, body["error"]) == (409, "replayed")


async def test_a_reload_while_a_request_awaits_changes_nothing_for_it(client_for, monkeypatch):
    import bridge.server

    client = await client_for(SIGNED)
    app = client.server.app
    read_body = bridge.server._read_body

    async def reloaded_meanwhile(request, server):
        app[CONFIG].sources = {}  # what a reload removing the source does, while the body comes
        return await read_body(request, server)

    monkeypatch.setattr(bridge.server, "_read_body", reloaded_meanwhile)
    status, body = await post(client, headers=signed_headers())
    assert (status, body["duplicate"]) == (202, False)


async def test_a_generic_hmac_source(client_for):
    secret = "a-generic-hmac-secret"
    client = await client_for(
        "  supersend:\n    signature:\n      scheme: hmac\n"
        f'      secrets: ["{secret}"]\n      header: X-Hub-Signature-256\n      prefix: sha256='
    )
    import hashlib
    import hmac

    good = "sha256=" + hmac.new(secret.encode(), BODY, hashlib.sha256).hexdigest()
    status, _ = await post(client, headers={**JSON, "X-Hub-Signature-256": good})
    assert status == 202
    assert await post(client, headers={**JSON, "X-Hub-Signature-256": "sha256=00"}) == (
        401,
        {"error": "signature_invalid", "message": "no valid signature for this body"},
    )
    assert await post(client) == (
        401,
        {"error": "signature_missing", "message": "the signature header is missing"},
    )


# --- addresses -------------------------------------------------------------------------------

ALLOW = f'  supersend:\n    tokens: ["{TOKEN}"]\n    allow_ips: ["10.0.0.0/8", "2001:db8::/32"]'
FORBIDDEN = (403, {"error": "ip_forbidden", "message": "this address may not post to this source"})


async def test_an_address_outside_the_allow_list_is_refused(client_for):
    client = await client_for(ALLOW)
    assert await post(client, f"/webhooks/supersend/{TOKEN}") == FORBIDDEN


async def test_forwarded_for_is_ignored_from_an_untrusted_peer(client_for):
    client = await client_for(ALLOW)
    headers = {**JSON, "X-Forwarded-For": "10.1.2.3"}
    assert await post(client, f"/webhooks/supersend/{TOKEN}", headers=headers) == FORBIDDEN


@pytest.mark.parametrize(
    ("forwarded", "status"),
    [
        ("10.1.2.3", 202),
        ("2001:db8::5", 202),
        ("192.168.1.9, 10.1.2.3", 202),  # the client's own claim (left) is not believed
        ("10.1.2.3, 192.168.1.9", 403),  # the proxy saw 192.168.1.9
        ("10.1.2.3, 127.0.0.2", 202),  # a second trusted proxy is skipped
        ("not-an-address", 403),
    ],
)
async def test_forwarded_for_from_a_trusted_proxy(client_for, forwarded, status):
    client = await client_for(ALLOW, server="  trusted_proxies: [127.0.0.0/8]")
    headers = {**JSON, "X-Forwarded-For": forwarded}
    got, body = await post(client, f"/webhooks/supersend/{TOKEN}", headers=headers)
    assert got == status, body


async def test_forwarded_for_in_several_lines_is_read_whole(client_for):
    # Given a client that sends its own X-Forwarded-For line, and a proxy that adds another
    client = await client_for(ALLOW, server="  trusted_proxies: [127.0.0.0/8]")
    headers = MultiDict([*JSON.items(), ("X-Forwarded-For", "10.1.2.3")])
    headers.add("X-Forwarded-For", "192.168.1.9")
    # Then the address is the proxy's line, not the client's claim
    got = await post(client, f"/webhooks/supersend/{TOKEN}", headers=headers)
    assert got == FORBIDDEN
    headers = MultiDict([*JSON.items(), ("X-Forwarded-For", "192.168.1.9")])
    headers.add("X-Forwarded-For", "10.1.2.3")
    status, _ = await post(client, f"/webhooks/supersend/{TOKEN}", headers=headers)
    assert status == 202


# --- limits ----------------------------------------------------------------------------------


async def test_json_nested_too_deep_is_refused(client_for):
    client = await client_for(server="  max_json_depth: 8")
    deep = sample()
    deep["contact"]["custom"] = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}
    assert await post(client, f"/webhooks/supersend/{TOKEN}", body=json.dumps(deep)) == (
        400,
        {"error": "json_too_deep", "message": "JSON nested deeper than 8 levels"},
    )


async def test_json_with_too_many_fields_is_refused(client_for):
    client = await client_for(server="  max_json_fields: 100")
    wide = sample()
    wide["contact"]["custom"] = {"tags": list(range(100))}
    assert await post(client, f"/webhooks/supersend/{TOKEN}", body=json.dumps(wide)) == (
        400,
        {"error": "json_too_many_fields", "message": "JSON holds more than 100 fields"},
    )


async def test_a_source_over_its_rate_gets_429_with_retry_after(client_for):
    clock = Clock()
    client = await client_for(
        f'  supersend:\n    tokens: ["{TOKEN}"]\n    rate_limit: {{rate: 0.5, burst: 2}}',
        clock=clock,
    )
    path = f"/webhooks/supersend/{TOKEN}"
    for i in range(2):
        status, _ = await post(client, path, body=json.dumps(sample(first_name=str(i))))
        assert status == 202
    response = await client.post(path, data=BODY, headers=JSON)
    assert (response.status, await response.json()) == (
        429,
        {
            "error": "rate_limited",
            "message": "source 'supersend' is over its rate limit; retry later",
        },
    )
    assert response.headers["Retry-After"] == "2"
    clock.now += 2  # one token back
    status, _ = await post(client, path)
    assert status == 202


async def test_unauthenticated_requests_do_not_spend_the_rate(client_for):
    client = await client_for(
        f'  supersend:\n    tokens: ["{TOKEN}"]\n    rate_limit: {{rate: 0.001, burst: 1}}'
    )
    for _ in range(5):
        status, _ = await post(client, "/webhooks/supersend/wrong-token-0123456789")
        assert status == 401
    status, _ = await post(client, f"/webhooks/supersend/{TOKEN}")
    assert status == 202


async def stalled_request(client, path: str, declared: int = 1000):
    """Open a connection and send headers and half a body, then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n{{".encode()
    )
    await writer.drain()
    return reader, writer


async def shut(writer):
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the server closed it first


async def until(condition, timeout: float = 5.0):
    """Wait for a condition the server reaches on its own (no fixed sleep)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_slow_body_gets_408_after_the_read_timeout(client_for):
    client = await client_for(server="  read_timeout: 0.3")
    reader, writer = await stalled_request(client, f"/webhooks/supersend/{TOKEN}")
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read(1000)
    finally:
        await shut(writer)
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body) == {
        "error": "request_timeout",
        "message": "body not received within 0.3 seconds",
    }


async def test_a_client_trickling_headers_is_disconnected(client_for):
    client = await client_for(server="  header_timeout: 0.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /webhooks/supersend HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by the server
    await shut(writer)


async def test_over_the_concurrency_cap_new_requests_get_503(client_for):
    client = await client_for(server="  max_concurrent_requests: 1")
    _, writer = await stalled_request(client, f"/webhooks/supersend/{TOKEN}")
    try:
        await until(lambda: client.server.app[LOAD].inflight == 1)
        response = await client.post(f"/webhooks/supersend/{TOKEN}", data=BODY, headers=JSON)
        assert (response.status, await response.json()) == (
            503,
            {"error": "overloaded", "message": "too many requests in progress; retry shortly"},
        )
        assert response.headers["Retry-After"] == "1"
    finally:
        await shut(writer)
    await until(lambda: client.server.app[LOAD].inflight == 0)
    status, _ = await post(client, f"/webhooks/supersend/{TOKEN}")
    assert status == 202


# --- aiohttp's own refusals are JSON too -----------------------------------------------------


async def test_unknown_routes_and_methods_answer_json(client_for):
    client = await client_for()
    response = await client.get("/nowhere")
    assert (response.status, await response.json()) == (
        404,
        {"error": "not_found", "message": "Not Found"},
    )
    response = await client.get("/webhooks/supersend")
    assert (response.status, await response.json()) == (
        405,
        {"error": "method_not_allowed", "message": "Method Not Allowed"},
    )
    assert response.headers["Allow"] == "POST"


async def test_a_failing_handler_is_a_500_that_says_nothing(client_for, monkeypatch):
    client = await client_for()

    async def broken(event_id):
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(client.server.app[STORE], "event", broken)
    response = await client.get("/events/x")
    assert (response.status, await response.json()) == (
        500,
        {"error": "internal_error", "message": "internal error"},
    )


@pytest.mark.parametrize("path", ["/status", "/events/abc"])
async def test_operator_endpoints_answer_the_machine_itself_only(client_for, path):
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from bridge.server import show_event, show_status

    client = await client_for()
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("203.0.113.9", 40000) if name == "peername" else default
    )
    request = make_mocked_request(
        "GET", path, app=client.server.app, transport=transport, match_info={"event_id": "abc"}
    )
    handler = show_status if path == "/status" else show_event
    response = await handler(request)
    assert (response.status, json.loads(response.body)) == (
        403,
        {"error": "forbidden", "message": "loopback only"},
    )


LOOPBACK_ONLY = (403, {"error": "forbidden", "message": "loopback only"})


@pytest.mark.parametrize("path", ["/status", "/events/abc"])
@pytest.mark.parametrize(
    ("server", "headers"),
    [
        ("", {"X-Forwarded-For": "203.0.113.9"}),
        ("", {"Forwarded": "for=203.0.113.9;proto=https"}),
        ("", {"X-Real-IP": "203.0.113.9"}),
        ("  trusted_proxies: [127.0.0.1/32]", {}),  # the proxy, even when it says nothing
    ],
)
async def test_operator_endpoints_refuse_what_a_proxy_on_this_host_passes_on(
    client_for, path, server, headers
):
    client = await client_for(server=server)
    response = await client.get(path, headers=headers)
    assert (response.status, await response.json()) == LOOPBACK_ONLY


async def test_operator_endpoints_answer_this_machine_behind_a_proxy_elsewhere(client_for):
    client = await client_for(server="  trusted_proxies: [10.0.0.0/8]")
    response = await client.get("/status")
    assert response.status == 200
    response = await client.get("/events/abc")
    assert response.status == 404


async def test_a_tokenless_source_takes_this_machines_requests_only(client_for):
    client = await client_for("  supersend:\n    tokens: []")
    status, _ = await post(client)
    assert status == 202
    refused = (
        401,
        {
            "error": "unauthorized",
            "message": "this source has no token: only this machine may post to it",
        },
    )
    for forwarded in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        assert await post(client, headers={**JSON, **forwarded}) == refused


async def test_readiness_reasons_are_redacted(client_for):
    # Given a connector paused on an error whose text holds a credential and an email
    client = await client_for()
    breaker = client.server.app[WORKERS]["hubspot"].breaker
    breaker.record_failure(
        'HubSpot 401: {"hubspot_token": "pat-na1-0123456789", "user": "jane@example.com"}',
        auth=True,
    )
    # Then the public readiness answer says why without either
    response = await client.get("/readyz")
    assert (response.status, await response.json()) == (
        503,
        {
            "ready": False,
            "reasons": {
                "hubspot": 'paused: HubSpot 401: {"hubspot_token": "***",'
                ' "user": "j***@example.com"}'
            },
        },
    )
