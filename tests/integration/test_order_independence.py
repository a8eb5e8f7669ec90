"""Order independence: whatever order a contact's events arrive in, resent or not, with the
daemon restarted in the middle, each CRM ends field by field (and activity by activity) as
delivering the same events in `updatedAt` order leaves it. The example config's rules, the
real SDKs, the emulators; hypothesis draws the events, their order, the duplicates and the
restart."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bridge.config import parse_config
from bridge.server import create_app
from tests.support import TOKEN, config_yaml, hubspot_settings, salesforce_settings, sample

ROOT = Path(__file__).parents[2]
EXAMPLE_RULES = (ROOT / "config.example.yaml").read_text().split("\nrules:", 1)[1]
START = datetime(2024, 3, 1, tzinfo=UTC)
# Weighted towards the events that write (and so can meet newer data)
TYPES = ("interest", "interest", "reply", "reply", "click", "bounce", "appointment", "open")
VOLATILE = {
    "hs_object_id", "createdate", "lastmodifieddate", "Id", "CreatedDate", "LastModifiedDate",
    "SystemModstamp", "WhoId", "OwnerId",
}  # fmt: skip
runs = itertools.count()


@dataclass(frozen=True)
class Event:
    contact: int
    type: str
    at: int  # seconds after START: the contact's updatedAt
    interest: str | None
    first_name: str
    title: str
    phone: str | None
    company: str

    def body(self, prefix: str) -> dict[str, Any]:
        return sample(
            type=self.type,
            email=f"{prefix}-{self.contact}@example.com",
            first_name=self.first_name,
            last_name="Lovelace",
            title=self.title,
            phone=self.phone,
            company_name=self.company,
            interest=self.interest,
            appointment=self.type == "appointment",
            updatedAt=(START + timedelta(seconds=self.at)).isoformat().replace("+00:00", "Z"),
        )


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Event], list[tuple[Event, bool]], int]:
    """A few contacts' events (distinct updatedAt per contact); then the order they arrive
    in, with resends, and how many arrive before the restart."""
    events: list[Event] = []
    for contact in range(draw(st.integers(1, 2))):
        times = draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=6, unique=True))
        for at in times:
            events.append(
                Event(
                    contact=contact,
                    type=draw(st.sampled_from(TYPES)),
                    at=at,
                    interest=draw(
                        st.sampled_from(["interested", "interested", "not_interested", None])
                    ),
                    first_name=draw(st.sampled_from(["Ada", "Augusta"])),
                    title=draw(st.sampled_from(["CTO", "Countess"])),
                    phone=draw(st.sampled_from([None, "+44 20 7946 0000", "+44 20 7946 0999"])),
                    company=draw(st.sampled_from(["Analytical Engines", "Difference Ltd"])),
                )
            )
    resent = draw(st.lists(st.sampled_from(events), max_size=3))
    arrival = draw(st.permutations(events + resent))
    # Where the platform pauses long enough for the daemon to deliver what came so far (so
    # that a later, older event meets a CRM newer ones have written); between, a burst.
    pauses = draw(st.lists(st.booleans(), min_size=len(arrival), max_size=len(arrival)))
    return events, list(zip(arrival, pauses, strict=True)), draw(st.integers(0, len(arrival)))


class Daemon:
    """The app in process on one SQLite file, pointed at one pair of emulators."""

    def __init__(self, db: Path, hubspot: Any, salesforce: Any, window: float) -> None:
        self.db = db
        self.text = config_yaml(
            db,
            hubspot=hubspot_settings(hubspot),
            salesforce=salesforce_settings(salesforce),
            rules=EXAMPLE_RULES,
            delivery=f"coalesce_window: {window}\n  batch_gather: 0.01",
        )
        self.client: TestClient | None = None

    async def start(self) -> None:
        self.client = TestClient(TestServer(create_app(parse_config(self.text))))
        await self.client.start_server()

    async def stop(self) -> None:
        assert self.client is not None
        await self.client.close()

    async def post(self, events: list[Event], prefix: str) -> None:
        assert self.client is not None
        for event in events:
            response = await self.client.post(
                f"/webhooks/supersend/{TOKEN}", json=event.body(prefix)
            )
            assert response.status == 202, await response.text()

    def busy(self) -> int:
        """Events not routed yet and deliveries that can still change a CRM (one waiting for
        its record can only be released by one of those)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            (n,) = conn.execute(
                "SELECT (SELECT count(*) FROM events WHERE routed_at IS NULL)"
                " + (SELECT count(*) FROM deliveries WHERE status IN ('pending', 'in_flight'))"
            ).fetchone()
        return int(n)

    async def settle(self) -> None:
        async def quiet() -> None:
            while self.busy():
                await asyncio.sleep(0.02)

        await asyncio.wait_for(quiet(), 60)

    def dead_letters(self) -> list[str]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            return [
                r[0]
                for r in conn.execute("SELECT last_error FROM deliveries WHERE status = 'dead'")
            ]


def crm_state(hubspot: Any, salesforce: Any, prefix: str) -> dict[str, Any]:
    """Each contact's HubSpot properties and notes, Salesforce Lead fields and Tasks."""
    state: dict[str, Any] = {}
    with hubspot.lock:
        contacts = [
            c for c in hubspot.contacts.values() if c.properties["email"].startswith(prefix)
        ]
    for contact in contacts:
        notes = hubspot.engagements_of("notes", contact.id)
        state[f"hubspot {contact.properties['email']}"] = (
            {k: v for k, v in contact.properties.items() if k not in VOLATILE},
            sorted(n.properties["hs_note_body"] for n in notes),
        )
    tasks = salesforce.records("Task")
    for lead in salesforce.records("Lead"):
        if (lead.get("Email") or "").lower().startswith(prefix):
            fields = {k: v for k, v in lead.items() if k not in VOLATILE}
            logged = sorted(
                (t["Subject"], t.get("Description")) for t in tasks if t.get("WhoId") == lead["Id"]
            )
            state[f"salesforce {lead['Email'].lower()}"] = (fields, logged)
    return state


@pytest.fixture
def emulator_pairs(tls_ca):
    """Two HubSpot + Salesforce pairs, one for the reference run and one for the shuffled one,
    started once for all examples (each example has its own emails)."""
    from tests.emulators.hubspot import HubSpotEmulator
    from tests.emulators.salesforce import SalesforceEmulator

    pairs = [(HubSpotEmulator(), SalesforceEmulator(tls=tls_ca)) for _ in range(2)]
    for pair in pairs:
        for emulator in pair:
            emulator.start()
    yield pairs
    for pair in pairs:
        for emulator in pair:
            emulator.stop()
            assert not emulator.errors, emulator.errors


@settings(
    max_examples=20,
    deadline=None,
    # Each example runs the daemon twice against the emulators: shrinking would take minutes;
    # the failing example is printed whole anyway.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories(), window=st.sampled_from([0.0, 0.2]))
def test_any_arrival_order_ends_as_updated_at_order(emulator_pairs, tmp_path, history, window):
    events, arrival, restart_after = history
    (ref_hs, ref_sf), (hs, sf) = emulator_pairs
    prefix = f"run{next(runs)}"
    run = tmp_path / prefix
    run.mkdir()

    async def scenario() -> tuple[list[str], list[str]]:
        # The reference: each event once, in updatedAt order, one at a time.
        reference = Daemon(run / "reference.db", ref_hs, ref_sf, 0.0)
        await reference.start()
        for event in sorted(events, key=lambda e: e.at):
            await reference.post([event], prefix)
            await reference.settle()
        await reference.stop()
        # The same events as the platform may send them: shuffled, some twice, a restart.
        shuffled = Daemon(run / "shuffled.db", hs, sf, window)
        await shuffled.start()
        for i, (event, pause) in enumerate(arrival):
            if i == restart_after:
                await shuffled.stop()
                await shuffled.start()
            await shuffled.post([event], prefix)
            if pause:
                await shuffled.settle()
        await shuffled.settle()
        await shuffled.stop()
        return reference.dead_letters(), shuffled.dead_letters()

    reference_dead, shuffled_dead = asyncio.run(scenario())
    assert crm_state(hs, sf, prefix) == crm_state(ref_hs, ref_sf, prefix)
    # The example's rules are designed so that a normal run needs nobody: no dead letter.
    assert (reference_dead, shuffled_dead) == ([], [])
