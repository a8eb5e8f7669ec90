"""The store interface the server and the delivery workers rely on.

Once `ingest` returns the event is durable, and only then does the webhook get its 202. The
router then hands stored events to the rules and stores the deliveries they make, marking the
event routed in the same transaction, so a crash in between routes it again. Deliveries are claimed
under a lease, oldest first, and never while an earlier delivery for the same contact on the
same connector is unfinished, so each CRM sees a contact's changes in the order they came.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from bridge.models import (
    ClaimedGroup,
    Delivery,
    Finish,
    IngestResult,
    NewEvent,
    Routed,
    StoredEvent,
)
from bridge.staleness import Ledger

if TYPE_CHECKING:
    from bridge.config import PostgresStoreConfig, SqliteStoreConfig


@dataclass(frozen=True)
class QueueStat:
    """One connector's waiting deliveries: how many, and when the oldest pending one was made."""

    pending: int = 0
    in_flight: int = 0
    oldest_pending_at: float | None = None  # created_at, wall-clock seconds


@dataclass(frozen=True)
class LastError:
    """The most recent error of a connector's pending or dead deliveries."""

    delivery_id: int
    status: str
    error: str
    at: float  # when it was recorded (updated_at)


class SharedWindow(abc.ABC):
    """One rate limit shared by every instance on the same store (see bridge.ratelimit)."""

    @abc.abstractmethod
    async def take(self, requests: int, per_seconds: float, pause: float) -> float:
        """Take a start in the shared window and return 0, or return the seconds to wait
        before asking again (the window is full, or paused). `pause` > 0 first extends the
        shared pause by that many seconds from now (a CRM's Retry-After seen here)."""


class Store(abc.ABC):
    """Events and deliveries, durably."""

    async def open(self) -> None:
        """Create the schema if needed and get ready to serve."""

    async def close(self) -> None:
        """Flush and release everything."""

    async def migrate(self) -> list[str]:
        """Bring the schema of a store that is not open up to date (`crm-bridge migrate`);
        the migrations applied. By default `open` makes the schema: open and close."""
        await self.open()
        await self.close()
        return []

    def shared_window(self, name: str) -> SharedWindow | None:
        """The rate-limit window that every instance on this store shares for `name`, or None
        when one process owns the store (its limiter's own log is then the whole truth)."""
        return None

    @abc.abstractmethod
    async def ingest(self, event: NewEvent) -> IngestResult:
        """Store an event durably, or report that its twin (same id) is stored already."""

    @abc.abstractmethod
    async def unrouted(self, limit: int) -> list[StoredEvent]:
        """Stored events the rules have not seen yet, oldest first."""

    @abc.abstractmethod
    async def route(self, routed: list[Routed], now: float, delay: float = 0.0) -> list[int]:
        """Store the deliveries the rules made (due after `delay`) and mark the events routed,
        in one transaction; the new deliveries' ids."""

    @abc.abstractmethod
    async def claim(
        self, connector: str, limit: int, now: float, lease_seconds: float, coalesce: int = 0
    ) -> list[ClaimedGroup]:
        """Take up to `limit` contacts' next deliveries on one connector, marking them in flight.

        With `coalesce` > 0, up to that many more queued deliveries of the same contact and
        action join the first one's group, to be merged into one write.
        """

    @abc.abstractmethod
    async def finish(self, finishes: list[Finish], now: float) -> set[int]:
        """Record how claimed deliveries ended, all in one transaction; the ids recorded.

        A delivery's outcome is recorded only while the claim it was sent under still holds it
        (in flight, `attempts` equal to its claim in the Finish): not once another instance
        has claimed it again after the lease ran out, nor after it was deleted (`forget`).
        What the CRM holds for the contact (`contact_state`) is remembered only along with a
        recorded outcome."""

    @abc.abstractmethod
    async def backlog(self) -> int:
        """Work waiting: events not routed yet plus deliveries not finished, all connectors."""

    @abc.abstractmethod
    async def event(self, event_id: str) -> dict[str, Any] | None:
        """One stored event with its deliveries, for operators."""

    @abc.abstractmethod
    async def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        """One delivery with its event, for operators."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries by connector and status."""

    @abc.abstractmethod
    async def queue_stats(self) -> dict[str, QueueStat]:
        """Waiting deliveries per connector (only those that have some); cheap enough to run
        at every metrics scrape."""

    @abc.abstractmethod
    async def last_errors(self) -> dict[str, LastError]:
        """Per connector, the most recent error of a delivery waiting for a retry or dead."""

    @abc.abstractmethod
    async def dead_letters(
        self, connector: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Dead deliveries, oldest first."""

    @abc.abstractmethod
    async def retry_dead(self, delivery_id: int | None, now: float) -> int:
        """Queue one dead delivery (or all, with None) again, with a fresh horizon."""

    @abc.abstractmethod
    async def purge_dead(self, before: float) -> int:
        """Delete dead deliveries last touched before `before`."""

    @abc.abstractmethod
    async def retry_now(self, connector: str, now: float) -> int:
        """Make a connector's pending deliveries that failed before (waiting out a backoff or
        an authentication pause) due now: a reload changed its settings or reset its breaker."""

    # Personal data and replay protection (issue 6). Not abstract, so a store written before
    # them still loads; each implementation overrides them.

    async def forget(self, email: str) -> tuple[int, int]:
        """Delete every event whose stored contact email (normalised lower-case) is `email`,
        and all their deliveries, whatever their status (dead letters included); the numbers
        of events and deliveries deleted."""
        raise NotImplementedError

    async def purge_delivered(self, before: float) -> int:
        """Delete the events received before `before` (epoch seconds) that are routed and
        whose deliveries all ended delivered or skipped (none pending, in flight or dead),
        with those deliveries; the number of events deleted."""
        raise NotImplementedError

    async def seen_message(self, source: str, message_id: str, now: float, keep: float) -> bool:
        """Remember a signed webhook's message id durably for `keep` seconds: True if it is
        new, False if it was seen within `keep` (a replay). Expired ids may be purged."""
        raise NotImplementedError


# Actions whose queued burst for one contact merges into one write (activities never merge).
COALESCED_ACTIONS = ("upsert_lead", "upsert_contact")


def coalesced_members(
    heads: Sequence[Any], followers: Iterable[Any], coalesce: int
) -> dict[int, list[int]]:
    """Each claimed head's delivery ids: itself, then up to `coalesce` queued followers of the
    same contact and action (`followers` rows in order), when that action merges."""
    members: dict[int, list[int]] = {h["id"]: [h["id"]] for h in heads}
    by_key = {h["contact_key"]: h for h in heads}
    for row in followers:
        head = by_key[row["contact_key"]]
        group = members[head["id"]]
        if (
            row["id"] != head["id"]
            and row["action"] == head["action"]
            and head["action"] in COALESCED_ACTIONS
            and len(group) <= coalesce
        ):
            group.append(row["id"])
    return members


def claimed_groups(
    heads: Sequence[Any],
    members: dict[int, list[int]],
    rows: dict[int, Delivery],
    states: dict[str, Any],
) -> list[ClaimedGroup]:
    """Each claimed head's group (its deliveries in order), with what the CRM already has for
    its contact (`states` rows by contact key: record id, field ledger); both backends' rows
    read alike."""
    groups = []
    for head in heads:
        state = states.get(head["contact_key"])
        groups.append(
            ClaimedGroup(
                deliveries=sorted(
                    (rows[i] for i in members[head["id"]]), key=lambda d: (d.sort_at, d.id)
                ),
                applied_sort_at=state["applied_sort_at"] if state else None,
                record_id=state["record_id"] if state else None,
                ledger=Ledger.model_validate_json(state["fields"])
                if state and state["fields"]
                else Ledger(),
            )
        )
    return groups


@cache
def queries(dialect: str) -> dict[str, str]:
    """Named SQL blocks (`-- name: x`) of bridge/store/sql/<dialect>.sql, read once."""
    text = resources.files("bridge.store").joinpath("sql", f"{dialect}.sql").read_text()
    blocks = re.split(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(blocks[1::2], blocks[2::2], strict=True)}


def open_store(
    config: SqliteStoreConfig | PostgresStoreConfig,
    *,
    exclusive: bool = True,
) -> Store:
    """The store the config names. `exclusive=False` is for the CLI beside a running daemon
    (a PostgreSQL store is shared anyway: the CLI gets a small pool and never migrates)."""
    if config.type == "postgres":
        from bridge.store.postgres import PostgresStore

        return PostgresStore(
            config.url.get_secret_value(),
            pool_min=config.pool_min if exclusive else 0,
            pool_max=config.pool_max if exclusive else 2,
            migrate_on_start=config.migrate_on_start and exclusive,
            command_timeout=config.command_timeout,
        )
    from bridge.store.sqlite import SqliteStore

    return SqliteStore(config.path, exclusive=exclusive)
