"""`crm-bridge status` as a process, beside a daemon running and then stopped."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from tests.acceptance.test_cli import HUBSPOT_ONLY_RULES, cli, refused_delivery
from tests.support import config_yaml, hubspot_settings, sample, wait_for

HEADERS = "CONNECTOR MODE BREAKER PENDING IN_FLIGHT OLDEST DEAD DONE".split()


def table(stdout: str) -> dict[str, list[str]]:
    """The connector rows of the table, by connector: their cells up to the last error."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONNECTOR"))
    assert lines[start].split()[:8] == HEADERS
    return {row.split()[0]: row.split() for row in lines[start + 1 :]}


def test_status_with_the_daemon_running_then_stopped(tmp_path, daemon_factory, hubspot_emulator):
    # Given a daemon (on a port of its choosing) and, for the CLI, the same config naming it
    text = config_yaml(
        tmp_path / "bridge.db",
        hubspot=hubspot_settings(hubspot_emulator),
        rules=HUBSPOT_ONLY_RULES,
    )
    served = tmp_path / "serve.yaml"
    served.write_text(text)
    daemon = daemon_factory(served)
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("  port: 0\n", f"  port: {urlsplit(daemon.url).port}\n"))

    # and one delivery done, one HubSpot refused for good
    done = daemon.post(sample(email="ann@example.com"))
    wait_for(lambda: daemon.settled(done.json()["event_id"]))
    refused_delivery(daemon, hubspot_emulator, "bob@example.com")

    # When `status --json` runs beside the daemon
    result = cli("status", "--json", config=config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # Then it has the store's numbers and the daemon's breakers
    assert report["daemon"]["running"] is True
    assert (report["queue_depth"], report["oldest_pending_age"], report["dead"]) == (0, None, 1)
    hubspot = report["connectors"]["hubspot"]
    assert (hubspot["mode"], hubspot["breaker"]) == ("live", "closed")
    assert (hubspot["pending"], hubspot["in_flight"], hubspot["dead"], hubspot["done"]) == (
        0,
        0,
        1,
        1,
    )
    assert "Contact blocked by a workflow" in hubspot["last_error"]
    assert hubspot["last_error_at"].endswith("Z")
    salesforce = report["connectors"]["salesforce"]
    assert (salesforce["mode"], salesforce["breaker"], salesforce["dead"]) == (
        "dry-run",
        "closed",
        0,
    )

    # When HubSpot refuses the token, the next delivery waits and the connector pauses
    hubspot_emulator.token = "other"
    waiting = daemon.post(sample(email="cid@example.com")).json()["event_id"]

    def refused_and_pending():
        (delivery,) = daemon.event(waiting)["deliveries"] or [None]
        return delivery and delivery["status"] == "pending" and delivery["last_error"]

    wait_for(refused_and_pending)
    result = cli("status", config=config)
    assert result.returncode == 0, result.stderr
    assert "daemon   running at http://127.0.0.1:" in result.stdout
    assert "queue    1 delivery waiting" in result.stdout
    assert "dead     1" in result.stdout
    rows = table(result.stdout)
    assert rows["hubspot"][1:8] == [
        "live",
        rows["hubspot"][2],
        "1",
        "0",
        rows["hubspot"][5],
        "1",
        "1",
    ]
    assert rows["hubspot"][2].startswith("open(")  # paused, for how long
    assert rows["hubspot"][5].endswith("s")  # the oldest pending delivery's age
    assert " ".join(rows["hubspot"][8:]).startswith("HubSpot 401")
    assert rows["salesforce"][1:] == ["dry-run", "closed", "0", "0", "-", "0", "0", "-"]

    # When the daemon is stopped, the store's numbers are still there; the breakers are unknown
    assert daemon.stop() == 0
    result = cli("status", "--json", config=config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["daemon"]["running"] is False
    assert (report["queue_depth"], report["dead"]) == (1, 1)
    assert report["oldest_pending_age"] >= 0
    hubspot = report["connectors"]["hubspot"]
    assert (hubspot["breaker"], hubspot["pending"], hubspot["dead"], hubspot["done"]) == (
        None,
        1,
        1,
        1,
    )
    assert hubspot["last_error"].startswith("HubSpot 401")
    shown = cli("status", config=config)
    assert "breaker states unknown" in shown.stdout
    stopped = table(shown.stdout)["hubspot"]
    assert stopped[1:5] + stopped[6:8] == ["live", "-", "1", "0", "1", "1"]
