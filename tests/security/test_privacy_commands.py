"""`crm-bridge forget EMAIL` beside a running daemon, and the retention purge."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from bridge.reload import reload_config
from tests.security.conftest import JSON, Clock, answer
from tests.support import TOKEN, config_yaml, sample, wait_for


def test_forget_removes_a_person_beside_the_running_daemon(daemon_factory, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(tmp_path / "bridge.db"))
    daemon = daemon_factory(path)
    ids = {}
    for email, name in [("ann@example.com", "A"), ("ann@example.com", "B"), ("bob@x.io", "C")]:
        response = daemon.post(json.dumps(sample(email=email, first_name=name)))
        ids[name] = response.json()["event_id"]
    for event_id in ids.values():
        wait_for(lambda event_id=event_id: daemon.settled(event_id))

    result = subprocess.run(
        [sys.executable, "-m", "bridge", "forget", "ANN@example.com", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"forgot A***@example.com: 2 event(s) and 4 deliveries deleted from {tmp_path}/bridge.db\n"
    )
    gone = daemon.session.get(f"{daemon.url}/events/{ids['A']}", timeout=10)
    assert gone.status_code == 404
    assert daemon.event(ids["C"])["email"] == "bob@x.io"
    assert daemon.stop() == 0


async def test_retention_purges_delivered_events(client_for):
    clock = Clock()
    client = await client_for(
        server="", clock=clock, privacy="  retention_days: 4\n  purge_interval: 0.05"
    )
    status, body = await answer(
        await client.post(f"/webhooks/supersend/{TOKEN}", data=json.dumps(sample()), headers=JSON)
    )
    assert status == 202
    event = f"/events/{body['event_id']}"

    async def settled() -> bool:
        stored = await (await client.get(event)).json()
        return stored.get("routed_at") is not None and all(
            d["status"] == "dry_run" for d in stored["deliveries"]
        )

    async with asyncio.timeout(10):
        while not await settled():
            await asyncio.sleep(0.01)
    clock.now += 4 * 86400 + 1  # four days later, the next purge takes it
    async with asyncio.timeout(10):
        while (await client.get(event)).status != 404:
            await asyncio.sleep(0.01)


async def test_a_reload_applies_a_new_retention(client_for, tmp_path):
    # Given a daemon keeping delivered events 30 days, and an event delivered 6 days ago
    clock = Clock()
    privacy = "  retention_days: 30\n  purge_interval: 0.05"
    client = await client_for(server="", clock=clock, privacy=privacy)
    status, body = await answer(
        await client.post(f"/webhooks/supersend/{TOKEN}", data=json.dumps(sample()), headers=JSON)
    )
    assert status == 202
    event = f"/events/{body['event_id']}"

    async def settled() -> bool:
        stored = await (await client.get(event)).json()
        return stored.get("routed_at") is not None and all(
            d["status"] == "dry_run" for d in stored["deliveries"]
        )

    async with asyncio.timeout(10):
        while not await settled():
            await asyncio.sleep(0.01)
    clock.now += 6 * 86400
    # When the config is reloaded with a retention of 5 days
    path = tmp_path / "config.yaml"
    path.write_text(
        config_yaml(tmp_path / "0" / "bridge.db")
        + "privacy:\n  retention_days: 5\n  purge_interval: 0.05\n"
    )
    changes = await reload_config(client.server.app, path)
    # Then it applies (no restart needed), and the next purge takes the event
    assert changes["restart_needed"] == []
    async with asyncio.timeout(10):
        while (await client.get(event)).status != 404:
            await asyncio.sleep(0.01)
