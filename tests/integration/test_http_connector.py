"""The generic HTTP connector against a fake internal service, and a third-party plugin.

The service is a small aiohttp app on 127.0.0.1 (port 0) that records every request and
answers either with a scripted response or as an upsert endpoint would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from bridge.config import parse_config
from bridge.errors import AuthenticationFailed, PermanentDelivery, RetryableDelivery
from bridge.server import create_app
from connectors import registry
from connectors.base import Activity, DeliveryResult, LeadUpsert, WritePolicy
from connectors.http import HttpConfig, HttpConnector
from tests.acceptance.conftest import Daemon
from tests.emulators.tls import LocalCA
from tests.support import TOKEN, config_yaml, sample, wait_for

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugin_example"
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class Service:
    """The fake service: what it was sent, and the answers it is told to give next."""

    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    scripted: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    store: dict[str, dict[str, Any]] = field(default_factory=dict)

    def answer_next(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        self.scripted.append((status, body, headers or {}))

    def upsert(self, record: dict[str, Any]) -> dict[str, Any]:
        if "bad" in record["id_value"]:
            return {"status": 422, "error": {"message": f"{record['id_value']} is not valid"}}
        created = record["id_value"] not in self.store
        self.store.setdefault(record["id_value"], {}).update(record["fields"])
        return {"id": f"rec-{record['id_value']}", "created": created}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if self.scripted:
            status, answer, headers = self.scripted.pop(0)
            if isinstance(answer, str):
                return web.Response(status=status, text=answer, headers=headers)
            return web.json_response(answer, status=status, headers=headers)
        if request.path == "/batch":
            return web.json_response([self.upsert(r) for r in body["items"]])
        if request.path.startswith("/activities"):
            return web.json_response({"id": f"act-{body['key']}"}, status=201)
        return web.json_response(self.upsert(body), status=200)


@pytest.fixture
async def service():
    svc = Service()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", svc.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    svc.url = f"http://127.0.0.1:{port}"
    yield svc
    await runner.cleanup()


@pytest.fixture
async def connect(service):
    opened: list[HttpConnector] = []

    async def make(**settings: Any) -> HttpConnector:
        config = HttpConfig.model_validate(
            {"type": "http", "url": service.url + "/leads", "timeout": 2} | settings
        )
        connector = HttpConnector("crm", config)
        await connector.open()
        opened.append(connector)
        return connector

    yield make
    for connector in opened:
        await connector.close()


def lead(email: str = "ada@example.com", **fields: Any) -> LeadUpsert:
    return LeadUpsert(id_value=email, fields=fields or {"first_name": "Ada"})


# -- config ---------------------------------------------------------------------------------------
def test_the_http_connector_is_registered():
    assert registry.get("http") is HttpConnector
    assert "http" in registry.names()


def test_it_is_live_only_with_a_url():
    assert not HttpConfig(type="http").has_credentials()
    assert HttpConfig(type="http", url="https://crm.internal/leads").has_credentials()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"max_batch": 10}, "needs a batch_body"),
        ({"body": "{{ record | tojson "}, "template syntax error"),
        ({"headers": {"X-Id": "{% if %}"}}, "template syntax error"),
        ({"url": "ftp://crm.internal"}, "http:// or https://"),
        ({"success_status": [200, 302]}, "must be 2xx"),
        ({"redirects": True}, "Extra inputs"),
    ],
)
def test_bad_settings_are_refused_at_load(settings, problem):
    with pytest.raises(ValidationError, match=problem):
        HttpConfig.model_validate({"type": "http", "url": "https://x.internal"} | settings)


def test_secret_headers_do_not_show(service):
    config = HttpConfig(type="http", url="https://x", secret_headers={"Authorization": "Bearer s"})
    assert "Bearer s" not in repr(config) and "Bearer s" not in config.model_dump_json()


# -- one record -----------------------------------------------------------------------------------
async def test_create_then_update_with_templated_url_headers_and_body(connect, service):
    crm = await connect(
        url=service.url + "/v1/{{ object }}s/{{ id_value | urlencode }}",
        method="PUT",
        headers={"Idempotency-Key": "{{ object }}-{{ id_value }}", "X-Static": "yes"},
        secret_headers={"Authorization": "Bearer s3cret"},
        body='{"id_value": {{ id_value | tojson }}, "fields": {{ fields | tojson }},'
        ' "name": {{ (fields.first_name ~ " " ~ fields.last_name) | tojson }}}',
    )
    first = await crm.upsert_lead(lead("ada+x@example.com", first_name="Ada", last_name="L"))
    assert first == DeliveryResult(record_id="rec-ada+x@example.com", created=True)
    second = await crm.upsert_lead(lead("ada+x@example.com", first_name="Ada", last_name="K"))
    assert (second.record_id, second.created) == ("rec-ada+x@example.com", False)
    sent = service.requests[0]
    assert (sent.method, sent.path) == ("PUT", "/v1/leads/ada%2Bx@example.com")
    assert sent.headers["Idempotency-Key"] == "lead-ada+x@example.com"
    assert sent.headers["X-Static"] == "yes"
    assert sent.headers["Authorization"] == "Bearer s3cret"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.json == {
        "id_value": "ada+x@example.com",
        "fields": {"first_name": "Ada", "last_name": "L"},
        "name": "Ada L",
    }
    assert service.store["ada+x@example.com"]["last_name"] == "K"


async def test_the_default_body_is_the_record(connect, service):
    crm = await connect()
    await crm.upsert_lead(lead(company="ACME"))
    assert service.requests[0].json == {
        "object": "lead",
        "id_property": None,
        "id_value": "ada@example.com",
        "fields": {"company": "ACME"},
        "record_id": None,
    }


async def test_an_empty_204_is_a_success_without_an_id(connect, service):
    crm = await connect()
    service.answer_next(204, "")
    assert await crm.upsert_lead(lead()) == DeliveryResult()


async def test_a_body_that_renders_no_json_is_permanent(connect, service):
    crm = await connect(body="{{ fields.first_name }}")
    with pytest.raises(PermanentDelivery, match="did not render JSON"):
        await crm.upsert_lead(lead())
    assert service.requests == []


# -- classification -------------------------------------------------------------------------------
async def test_429_is_retryable_after_the_services_retry_after(connect, service):
    crm = await connect(rate_limit_requests=5, rate_limit_seconds=1)
    service.answer_next(429, {"message": "slow down"}, {"Retry-After": "7"})
    with pytest.raises(RetryableDelivery) as caught:
        await crm.upsert_lead(lead())
    assert caught.value.retry_after == 7
    assert str(caught.value) == "HTTP 429: slow down"
    assert crm.limiter is not None and 6 < crm.limiter.paused_for() <= 7


async def test_429_without_retry_after_still_waits(connect, service):
    crm = await connect()
    service.answer_next(429, "busy")
    with pytest.raises(RetryableDelivery) as caught:
        await crm.upsert_lead(lead())
    assert caught.value.retry_after == 10


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_retryable(connect, service, status):
    crm = await connect()
    service.answer_next(status, {"error": "database is down"})
    with pytest.raises(RetryableDelivery, match=f"HTTP {status}: database is down") as caught:
        await crm.upsert_lead(lead())
    assert not isinstance(caught.value, AuthenticationFailed)


async def test_400_is_permanent_with_the_services_message(connect, service):
    crm = await connect()
    service.answer_next(400, {"error": {"message": "email is not valid", "code": "E12"}})
    with pytest.raises(PermanentDelivery) as caught:
        await crm.upsert_lead(lead())
    assert str(caught.value) == "HTTP 400: email is not valid"
    assert caught.value.detail["status"] == 400
    assert caught.value.detail["body"]["error"]["code"] == "E12"


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_authentication_failures(connect, service, status):
    crm = await connect()
    service.answer_next(status, {"message": "bad token"})
    with pytest.raises(AuthenticationFailed, match=f"HTTP {status}: bad token"):
        await crm.upsert_lead(lead())


async def test_a_redirect_is_not_followed(connect, service):
    crm = await connect()
    service.answer_next(302, "", {"Location": service.url + "/elsewhere"})
    with pytest.raises(PermanentDelivery, match=r"redirect to .*/elsewhere not followed"):
        await crm.upsert_lead(lead())
    assert [r.path for r in service.requests] == ["/leads"]


async def test_an_unreachable_service_is_retryable(connect, service):
    crm = await connect(url="http://127.0.0.1:9/leads", timeout=1)
    with pytest.raises(RetryableDelivery, match="unreachable"):
        await crm.upsert_lead(lead())


async def test_a_slow_service_times_out_as_retryable(connect, service):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/slow", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        crm = await connect(url=str(server.make_url("/slow")), timeout=0.2)
        with pytest.raises(RetryableDelivery, match=r"unreachable: .*Timeout"):
            await crm.upsert_lead(lead())
    finally:
        await server.close()


@pytest.fixture
async def tls_service():
    """An https endpoint whose certificate only a throwaway CA vouches for."""
    ca = LocalCA()

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"id": "tls"})

    app = web.Application()
    app.router.add_post("/leads", answer)
    server = TestServer(app, host="127.0.0.1", scheme="https")
    await server.start_server(ssl=ca.server_context())
    yield ca, str(server.make_url("/leads"))
    await server.close()


async def test_tls_is_verified(connect, tls_service):
    # Nobody the system trusts vouches for it: refused, nothing sent.
    _ca, url = tls_service
    crm = await connect(url=url)
    with pytest.raises(RetryableDelivery, match=r"unreachable: .*[Cc]ertificate"):
        await crm.upsert_lead(lead())


async def test_the_ca_bundle_is_trusted(connect, tls_service, tmp_path):
    ca, url = tls_service
    crm = await connect(url=url, ca_bundle=ca.write_ca_pem(tmp_path / "ca.pem"))
    assert (await crm.upsert_lead(lead())).record_id == "tls"


# -- batches --------------------------------------------------------------------------------------
BATCH_BODY = '{"items": {{ records | tojson }}}'


async def test_a_batch_maps_results_to_records_in_order(connect, service):
    crm = await connect(url=service.url + "/batch", batch_body=BATCH_BODY, max_batch=2)
    leads = [lead("a@x.io"), lead("bad@x.io"), lead("c@x.io")]
    outcomes = await crm.upsert_leads(leads)
    assert [len(r.json["items"]) for r in service.requests] == [2, 1]
    assert outcomes[0] == DeliveryResult(record_id="rec-a@x.io", created=True)
    assert isinstance(outcomes[1], PermanentDelivery)
    assert str(outcomes[1]) == "HTTP 422: bad@x.io is not valid"
    assert outcomes[2] == DeliveryResult(record_id="rec-c@x.io", created=True)
    assert sorted(service.store) == ["a@x.io", "c@x.io"]


async def test_a_batch_item_failing_with_5xx_is_retryable(connect, service):
    crm = await connect(url=service.url + "/batch", batch_body=BATCH_BODY, max_batch=5)
    service.answer_next(200, [{"id": "1"}, {"status": 503, "message": "shard busy"}])
    ok, busy = await crm.upsert_leads([lead("a@x.io"), lead("b@x.io")])
    assert ok == DeliveryResult(record_id="1")
    assert isinstance(busy, RetryableDelivery) and str(busy) == "HTTP 503: shard busy"


async def test_a_batch_whose_answer_does_not_map_fails_as_a_whole(connect, service):
    crm = await connect(url=service.url + "/batch", batch_body=BATCH_BODY, max_batch=5)
    service.answer_next(200, {"ok": True})
    with pytest.raises(RetryableDelivery, match="not an array of 2 results"):
        await crm.upsert_leads([lead("a@x.io"), lead("b@x.io")])


async def test_a_later_chunk_failing_keeps_the_earlier_results(connect, service):
    crm = await connect(url=service.url + "/batch", batch_body=BATCH_BODY, max_batch=1)
    service.answer_next(200, [{"id": "1"}])
    service.answer_next(500, "boom")
    first, second = await crm.upsert_leads([lead("a@x.io"), lead("b@x.io")])
    assert first == DeliveryResult(record_id="1")
    assert isinstance(second, RetryableDelivery)


async def test_all_or_nothing_batches(connect, service):
    crm = await connect(
        url=service.url + "/bulk", batch_body=BATCH_BODY, max_batch=10, batch_results="all"
    )
    service.answer_next(202, "")
    outcomes = await crm.upsert_leads([lead("a@x.io"), lead("b@x.io")])
    assert outcomes == [DeliveryResult(), DeliveryResult()]
    service.answer_next(400, {"message": "row 2: bad email"})
    with pytest.raises(PermanentDelivery, match="row 2: bad email"):
        await crm.upsert_leads([lead("a@x.io"), lead("b@x.io")])


async def test_without_a_batch_body_records_go_one_by_one(connect, service):
    crm = await connect()
    outcomes = await crm.upsert_leads([lead("a@x.io"), lead("bad@x.io")])
    assert len(service.requests) == 2
    assert outcomes[0] == DeliveryResult(record_id="rec-a@x.io", created=True)
    # The service answered 200 with an error body: a success status is a success.
    assert isinstance(outcomes[1], DeliveryResult)


# -- activities -----------------------------------------------------------------------------------
async def test_an_activity_is_posted_with_its_key(connect, service):
    crm = await connect(
        activity_url=service.url + "/activities",
        activity_body='{"key": {{ activity.key | tojson }}, "on": {{ id_value | tojson }},'
        ' "subject": {{ activity.subject | tojson }}}',
    )
    activity = Activity(id_value="ada@example.com", subject="Replied", occurred_at=1.0, key="k1")
    result = await crm.log_activity(activity)
    assert result.record_id == "act-k1"
    assert service.requests[0].json == {"key": "k1", "on": "ada@example.com", "subject": "Replied"}


async def test_without_an_activity_body_activities_are_refused(connect, service):
    crm = await connect()
    activity = Activity(id_value="a@x.io", subject="s", occurred_at=1.0, key="k")
    with pytest.raises(PermanentDelivery, match="cannot log activities"):
        await crm.log_activity(activity)


# -- end to end -----------------------------------------------------------------------------------
HTTP_RULES = """
  - name: interested-to-internal
    when: contact.interest == 'interested'
    connector: internal
    action: upsert_lead
    fields:
      first_name: "{{ contact.first_name }}"
"""


async def test_a_webhook_is_delivered_through_the_http_connector(tmp_path, service):
    text = config_yaml(tmp_path / "bridge.db", rules=HTTP_RULES).replace(
        "connectors:\n",
        "connectors:\n"
        "  internal:\n"
        "    type: http\n"
        f"    url: {service.url}/leads\n"
        "    headers: {X-Source: crm-bridge}\n",
        1,
    )
    client = TestClient(TestServer(create_app(parse_config(text))))
    await client.start_server()
    try:
        response = await client.post(f"/webhooks/supersend/{TOKEN}", json=sample(first_name="Ada"))
        assert response.status == 202, await response.text()
        event_id = (await response.json())["event_id"]

        async def delivered() -> dict:
            while True:
                event = await (await client.get(f"/events/{event_id}")).json()
                done = [d for d in event["deliveries"] if d["status"] == "done"]
                if done:
                    return done[0]
                await asyncio.sleep(0.02)

        delivery = await asyncio.wait_for(delivered(), 20)
    finally:
        await client.close()
    assert delivery["connector"] == "internal"
    assert delivery["result"]["record_id"] == "rec-andrew@xoxo.capital"
    (sent,) = service.requests
    assert sent.headers["X-Source"] == "crm-bridge"
    assert sent.json["fields"] == {"first_name": "Ada"}


# -- a third-party connector as a plugin ----------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The example plugin installed into a directory of its own: the venv is left as it is."""
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(PLUGIN)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_the_example_plugin_is_found_by_its_entry_point(plugin_path, tmp_path):
    config = tmp_path / "bridge.yaml"
    config.write_text(_plugin_config(tmp_path))
    env = {"PYTHONPATH": str(plugin_path), "PATH": "/usr/bin:/bin"}
    checked = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert "connector file: jsonfile, live" in checked.stdout
    # Without the plugin on the path, the type is unknown and the installed ones are listed.
    bare = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=60,
    )
    assert bare.returncode != 0
    assert "unknown connector type 'jsonfile'" in bare.stdout + bare.stderr


def test_the_daemon_delivers_through_the_example_plugin(plugin_path, tmp_path):
    config = tmp_path / "bridge.yaml"
    config.write_text(_plugin_config(tmp_path))
    daemon = Daemon(config, {"PYTHONPATH": str(plugin_path)})
    try:
        response = daemon.post(sample(first_name="Grace"))
        assert response.status_code == 202, response.text
        event_id = response.json()["event_id"]
        (delivery,) = wait_for(lambda: daemon.settled(event_id))
    finally:
        assert daemon.stop() == 0
    assert delivery["status"] == "done", delivery
    records = json.loads((tmp_path / "crm.json").read_text())
    assert records == {"lead:email:andrew@xoxo.capital": {"FirstName": "Grace"}}
    assert delivery["result"]["record_id"] == "lead:email:andrew@xoxo.capital"


def _plugin_config(tmp_path: Path) -> str:
    rules = """
  - name: to-file
    when: contact.interest == 'interested'
    connector: file
    fields:
      FirstName: "{{ contact.first_name }}"
"""
    text = config_yaml(tmp_path / "bridge.db", rules=rules)
    # Only the plugin's connector: the built-in ones are not needed here.
    head, _, tail = text.partition("connectors:\n")
    _, _, tail = tail.partition("rules:")
    block = f"connectors:\n  file:\n    type: jsonfile\n    path: {tmp_path / 'crm.json'}\n"
    return head + block + "rules:" + tail


def test_the_docs_show_the_example_plugin_as_it_is():
    docs = (ROOT / "docs" / "connectors.md").read_text()
    for source in ("pyproject.toml", "src/crm_bridge_jsonfile/__init__.py"):
        assert (PLUGIN / source).read_text() in docs, f"docs/connectors.md: {source} differs"


async def test_writes_that_need_the_record_first_are_refused_alone(connect, service):
    crm = await connect(url=service.url + "/batch", batch_body=BATCH_BODY, max_batch=5)
    guarded = lead("b@x.io", title="CTO").model_copy(
        update={"policies": {"title": WritePolicy(mode="if_empty")}}
    )
    update_only = lead("c@x.io").model_copy(update={"create": False})

    outcomes = await crm.upsert_leads([lead("a@x.io"), guarded, update_only])

    assert outcomes[0] == DeliveryResult(record_id="rec-a@x.io", created=True)
    for refused in outcomes[1:]:
        assert isinstance(refused, PermanentDelivery)
        assert "cannot honour write policies" in str(refused)
    assert sorted(service.store) == ["a@x.io"]
    with pytest.raises(PermanentDelivery, match="it cannot read the record first"):
        await crm.upsert_lead(update_only)
