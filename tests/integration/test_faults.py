"""Faults: a CRM outage over many retry steps (on a manual clock), a full disk, a full queue."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import parse_config
from bridge.server import create_app
from tests.emulators import ManualClock
from tests.support import TOKEN, config_yaml, hubspot_settings, salesforce_settings, sample


async def start(tmp_path, hubspot_emulator, *, delivery: str = "", clock=None, db=None):
    text = config_yaml(
        db or tmp_path / "bridge.db",
        hubspot=hubspot_settings(hubspot_emulator),
        rules="""
  - name: interested
    when: contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
""",
        delivery=delivery,
    ).replace("  salesforce:\n    type: salesforce\n", "")
    app = create_app(parse_config(text), clock=clock or __import__("time").time)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def post(client, body):
    response = await client.post(f"/webhooks/supersend/{TOKEN}", json=body)
    return response.status, await response.json(), response.headers


def epoch(moment: str) -> float:
    """A time `/events/<id>` gives (ISO 8601, to the millisecond) as wall-clock seconds."""
    return datetime.fromisoformat(moment).timestamp()


async def delivery_of(client, event_id, predicate, timeout=20.0):
    async def poll():
        while True:
            event = await (await client.get(f"/events/{event_id}")).json()
            if event["deliveries"] and predicate(event["deliveries"][0]):
                return event["deliveries"][0]
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(poll(), timeout)


REAL_BACKOFF = """\
  backoff_initial: 30
  backoff_max: 3600
  horizon: 86400
  breaker_failures: 1000"""


async def test_an_outage_over_many_retry_steps_ends_in_one_record(tmp_path, hubspot_emulator):
    # Given a CRM that fails every call for the first 8 attempts (3 calls each)
    clock = ManualClock(start=1_700_000_000.0)
    client = await start(tmp_path, hubspot_emulator, delivery=REAL_BACKOFF, clock=clock)
    try:
        hubspot_emulator.fail_next_server_error(8 * 3, status=503, match="/batch/upsert")
        _, body, _ = await post(client, sample(first_name="Ada"))
        delays = []
        for attempt in range(1, 9):
            # When each scheduled retry comes due (no real waiting: the clock moves)
            failed = await delivery_of(
                client,
                body["event_id"],
                lambda d, n=attempt: d["attempts"] == n and d["status"] == "pending",
            )
            delays.append(epoch(failed["next_attempt_at"]) - clock())
            assert failed["last_error"].startswith("HubSpot 503")
            clock.advance(epoch(failed["next_attempt_at"]) - clock() + 0.001)
        # Then the ninth attempt lands, once
        done = await delivery_of(client, body["event_id"], lambda d: d["status"] == "done")
        assert done["attempts"] == 9
        assert len(hubspot_emulator.contacts) == 1
        # and the waits doubled from 30 s up to the one-hour cap, each jittered in its upper half
        for attempt, delay in enumerate(delays, start=1):
            ceiling = min(3600, 30 * 2 ** (attempt - 1))
            assert ceiling / 2 <= delay <= ceiling
    finally:
        await client.close()


async def test_an_outage_longer_than_the_horizon_dead_letters(tmp_path, hubspot_emulator):
    clock = ManualClock(start=1_700_000_000.0)
    delivery = REAL_BACKOFF.replace("horizon: 86400", "horizon: 7200")
    client = await start(tmp_path, hubspot_emulator, delivery=delivery, clock=clock)
    try:
        hubspot_emulator.fail_next_server_error(1000, status=503, match="/batch/upsert")
        _, body, _ = await post(client, sample())
        while True:
            d = await delivery_of(
                client, body["event_id"], lambda d: d["status"] != "in_flight" and d["attempts"] > 0
            )
            if d["status"] == "dead":
                break
            clock.advance(epoch(d["next_attempt_at"]) - clock() + 0.001)
        assert d["last_error"].startswith(f"gave up after {d['attempts']} attempts: HubSpot 503")
        assert clock() - 1_700_000_000.0 <= 7200
    finally:
        hubspot_emulator.clear_failures()
        await client.close()


async def test_a_full_queue_answers_503_with_retry_after(tmp_path, hubspot_emulator):
    client = await start(tmp_path, hubspot_emulator, delivery="  max_backlog: 3")
    hubspot_emulator.fail_next_server_error(100_000, status=503)  # nothing drains
    try:
        statuses = []
        for i in range(5):
            status, body, headers = await post(client, sample(email=f"p{i}@example.com"))
            statuses.append(status)
        assert statuses == [202, 202, 202, 503, 503]
        assert body["error"] == "backlog_full" and headers["Retry-After"] == "30"
    finally:
        await client.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up. Needs root (CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path):
    """Fill the filesystem holding `path` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_acknowledges_nothing_and_recovers_by_itself(tiny_disk, hubspot_emulator):
    client = await start(tiny_disk, hubspot_emulator, db=tiny_disk / "bridge.db")
    try:
        status, first, _ = await post(client, sample(email="before@example.com"))
        assert status == 202
        filler = fill(tiny_disk)
        # While the disk is full nothing is acknowledged (each event is bigger than a page)
        refused = []
        for i in range(5):
            payload = sample(email=f"full{i}@example.com", note="x" * 2000)
            status, body, headers = await post(client, payload)
            refused.append((status, body.get("error"), headers.get("Retry-After")))
        assert set(refused) == {(503, "store_unavailable", "5")}
        # and once space is back the same daemon takes events again, without a restart
        filler.unlink()
        status, after, _ = await post(client, sample(email="after@example.com"))
        assert status == 202
        for event_id in (first["event_id"], after["event_id"]):
            await delivery_of(client, event_id, lambda d: d["status"] == "done")
        with hubspot_emulator.lock:
            emails = sorted(r.properties["email"] for r in hubspot_emulator.contacts.values())
        assert emails == ["after@example.com", "before@example.com"]
    finally:
        await client.close()


async def status(client):
    return await (await client.get("/status")).json()


async def test_a_refused_token_pauses_the_connector_and_nothing_is_dropped(
    tmp_path, hubspot_emulator
):
    # Given a HubSpot that refuses the configured token
    hubspot_emulator.token = "pat-na1-rotated"
    client = await start(tmp_path, hubspot_emulator, delivery="  auth_pause: 1.0")
    try:
        _, first, _ = await post(client, sample(email="a@example.com"))

        async def paused():
            while (await status(client))["connectors"]["hubspot"]["breaker"] != "open":
                await asyncio.sleep(0.01)
            return await status(client)

        state = await asyncio.wait_for(paused(), 20)
        assert state["connectors"]["hubspot"]["reason"].startswith("HubSpot 401")
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["reasons"]["hubspot"].startswith("paused: HubSpot 401")
        calls = len(hubspot_emulator.calls)
        # While paused, new events queue up without calls to the CRM
        _, second, _ = await post(client, sample(email="b@example.com"))
        await delivery_of(client, second["event_id"], lambda d: d["status"] == "pending")
        assert len(hubspot_emulator.calls) == calls
        # When the token is accepted again, the probe after the pause succeeds and all lands
        hubspot_emulator.token = "pat-na1-test"
        for body in (first, second):
            await delivery_of(client, body["event_id"], lambda d: d["status"] == "done")
        assert (await status(client))["connectors"]["hubspot"]["breaker"] == "closed"
        assert (await client.get("/readyz")).status == 200
        with hubspot_emulator.lock:
            assert len(hubspot_emulator.contacts) == 2
    finally:
        await client.close()


async def test_repeated_failures_open_the_breaker_then_one_probe_closes_it(
    tmp_path, hubspot_emulator
):
    delivery = "  breaker_failures: 2\n  breaker_cooldown: 0.3"
    client = await start(tmp_path, hubspot_emulator, delivery=delivery)
    try:
        hubspot_emulator.fail_next_server_error(
            6, status=503, match="/batch/upsert"
        )  # two attempts of three calls
        _, body, _ = await post(client, sample())

        async def opened():
            while (await status(client))["connectors"]["hubspot"]["breaker"] != "open":
                await asyncio.sleep(0.005)

        await asyncio.wait_for(opened(), 20)
        assert len(hubspot_emulator.calls_to("POST", "/batch/upsert")) == 6
        done = await delivery_of(client, body["event_id"], lambda d: d["status"] == "done")
        assert done["attempts"] == 3
        assert (await status(client))["connectors"]["hubspot"]["breaker"] == "closed"
    finally:
        await client.close()


async def test_storms_end_with_one_record_per_email_and_only_bad_records_dead(
    tmp_path, hubspot_emulator, salesforce_emulator
):
    # Given both CRMs, rules that also write a field the CRM lacks for "bad" contacts
    rules = """
  - name: to-hubspot
    when: contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
  - name: bad-to-hubspot
    when: contact.custom and contact.custom.bad
    connector: hubspot
    action: upsert_contact
    fields:
      no_such_property: x
  - name: to-salesforce
    when: contact.interest == 'interested'
    connector: salesforce
    action: upsert_lead
    fields:
      FirstName: "{{ contact.first_name }}"
"""
    text = config_yaml(
        tmp_path / "bridge.db",
        hubspot=hubspot_settings(hubspot_emulator),
        salesforce=salesforce_settings(salesforce_emulator),
        rules=rules,
    )
    client = TestClient(TestServer(create_app(parse_config(text))))
    await client.start_server()
    try:
        # and CRMs that misbehave: a 429 storm, connections reset after the write, expired
        # sessions, a locked row
        hubspot_emulator.fail_next_rate_limited(3, retry_after=1)
        hubspot_emulator.drop_next(2, match="/batch/upsert")
        salesforce_emulator.drop_next(2, match="/sobjects")
        salesforce_emulator.lock_rows(2)
        emails = [f"s{i}@example.com" for i in range(30)]
        ids = []
        for version in range(2):
            if version == 1:
                salesforce_emulator.expire_sessions()
            for i, email in enumerate(emails):
                custom = {"bad": True} if i % 10 == 0 else None
                _, body, _ = await post(
                    client,
                    sample(
                        email=email,
                        first_name=f"{email}-v{version}",
                        custom=custom,
                        updatedAt=f"2024-01-01T00:00:{10 * version + i % 10:02d}Z",
                    ),
                )
                ids.append(body["event_id"])

        # When everything has settled
        async def settled():
            while True:
                counts = (await status(client))["deliveries"]
                unfinished = sum(
                    n
                    for c in counts.values()
                    for s, n in c.items()
                    if s in ("pending", "in_flight")
                )
                if counts and not unfinished and (await status(client))["backlog"] == 0:
                    return counts
                await asyncio.sleep(0.05)

        counts = await asyncio.wait_for(settled(), 60)
        # Then each email is one record holding the latest values, in both CRMs
        with hubspot_emulator.lock:
            hubspot = {
                r.properties["email"]: r.properties.get("firstname")
                for r in hubspot_emulator.contacts.values()
            }
        assert len(hubspot_emulator.contacts) == len(emails)
        assert hubspot == {e: f"{e}-v1" for e in emails}
        leads = salesforce_emulator.records("Lead")
        assert sorted(r["Email"] for r in leads) == sorted(emails)
        assert {r["Email"]: r["FirstName"] for r in leads} == {e: f"{e}-v1" for e in emails}
        # and the dead letters are exactly the bad records' writes
        assert counts["salesforce"].get("dead", 0) == 0
        dead = (await status(client))["deliveries"]["hubspot"].get("dead", 0)
        assert dead == 2 * len([e for i, e in enumerate(emails) if i % 10 == 0])
    finally:
        await client.close()


async def test_readiness_shows_refused_credentials_before_any_delivery(tmp_path, hubspot_emulator):
    hubspot_emulator.token = "pat-na1-rotated"
    client = await start(tmp_path, hubspot_emulator, delivery="  auth_pause: 30")
    try:

        async def unready():
            while (response := await client.get("/readyz")).status != 503:
                await asyncio.sleep(0.01)
            return await response.json()

        body = await asyncio.wait_for(unready(), 20)
        assert body["reasons"]["hubspot"].startswith("paused: HubSpot 401")
        # one cheap call, no write: nothing was sent yet
        assert hubspot_emulator.calls_to("GET", "/crm/v3/properties/contacts/email")
        assert not hubspot_emulator.calls_to("POST")
    finally:
        await client.close()


async def test_good_credentials_are_ready(tmp_path, hubspot_emulator):
    client = await start(tmp_path, hubspot_emulator)
    try:

        async def verified():
            while not hubspot_emulator.calls_to("GET", "/crm/v3/properties/contacts/email"):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(verified(), 20)
        response = await client.get("/readyz")
        assert response.status == 200
        assert await response.json() == {"ready": True, "reasons": {}}
    finally:
        await client.close()
