"""The shared store: PostgreSQL, for several daemons behind a load balancer.

The same tables and the same rules as the SQLite store (bridge/store/sql/postgres.sql mirrors
sqlite.sql), made safe for instances that run side by side:

- an acknowledgement waits for the commit of its event: the webhooks arriving together are
  inserted by one statement in one transaction (group commit: one WAL flush per batch, at most
  `INGEST_FLUSHES` batches in flight); the primary key de-duplicates across instances
  (`ON CONFLICT DO NOTHING`); a batch that fails on its data is split in halves until only
  the bad rows fail;
- routers lease unrouted events for `ROUTE_LEASE` seconds, and `route` stores deliveries only
  for events still unrouted under a row lock, so two routers never double an event's deliveries;
- claims take rows `FOR UPDATE SKIP LOCKED` under a lease: a crashed instance's claims are
  claimable again once their lease ends (nothing is released at start-up: the other instances'
  claims are alive), and a contact's later deliveries stay behind its unfinished first one
  whoever holds it, so per-contact order holds across instances;
- rate limits are shared through `rate_windows` (`shared_window`), so N instances together stay
  under each CRM's limit.

asyncpg with a connection pool; versioned migrations (`migration_NNNN_*` blocks) applied under
an advisory lock by `crm-bridge migrate`, or at start-up with `migrate_on_start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from bridge.errors import StoreUnavailable
from bridge.models import (
    ClaimedGroup,
    Delivery,
    DeliveryStatus,
    Finish,
    IngestResult,
    NewEvent,
    Routed,
    StoredEvent,
)
from bridge.store.base import (
    LastError,
    QueueStat,
    SharedWindow,
    Store,
    claimed_groups,
    coalesced_members,
    queries,
)
from bridge.store.urls import redact_url

log = logging.getLogger("crm_bridge.store")
SQL = queries("postgres")
MIGRATIONS = sorted(name for name in SQL if name.startswith("migration_"))
MIGRATION_LOCK = 0x63726D62  # pg_advisory_xact_lock key: "crmb"
INGEST_BATCH = 500  # events inserted together at most
INGEST_FLUSHES = 2  # batches committing at once, per instance
ROUTE_LEASE = 10.0  # seconds an instance's router holds a batch of unrouted events
# Deliveries this instance has routed when it refreshes the planner's statistics itself: a
# fresh or fast-growing table would otherwise be planned blind until autovacuum's next round.
ANALYZE_AT = (200, 2_000, 20_000)
MESSAGE_PURGE_EVERY = 60.0  # seconds between opportunistic purges of old message ids

# Faults of the server or the network, not of our SQL: the caller hears StoreUnavailable
# (a webhook gets 503 + Retry-After; a worker tries again at its next poll).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    # What asyncpg raises on a connection the server dropped while it was idle in the pool
    # (the protocol finds itself in an unexpected state); the pool discards that connection.
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.TransactionRollbackError,
    asyncpg.CannotConnectNowError,
)


def _rowcount(status: str) -> int:
    """asyncpg's command tag ("UPDATE 3", "DELETE 0") as a number."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


def _row(record: asyncpg.Record) -> dict[str, Any]:
    data = dict(record)
    for key in ("operation", "result", "notes"):
        if isinstance(data.get(key), str):
            data[key] = json.loads(data[key])
    return data


def _delivery(record: asyncpg.Record) -> Delivery:
    return Delivery.model_validate(_row(record))


def _answer(
    batch: list[tuple[NewEvent, asyncio.Future[IngestResult]]], outcome: set[str] | Exception
) -> None:
    """Resolve a batch's callers: an exception for all, or the ids that were new."""
    for event, fut in batch:
        if fut.done():
            continue  # the caller went away; what was committed stays committed
        if isinstance(outcome, Exception):
            fut.set_exception(outcome)
            continue
        # The first of equal payloads in a batch is new; any later one is a duplicate.
        fresh = event.id in outcome
        outcome.discard(event.id)
        fut.set_result(IngestResult(event_id=event.id, duplicate=not fresh))


class PostgresWindow(SharedWindow):
    """A connector's rate-limit window in the shared store (crm_bridge_rate_take)."""

    def __init__(self, store: PostgresStore, name: str) -> None:
        self._store = store
        self.name = name

    async def take(self, requests: int, per_seconds: float, pause: float) -> float:
        async with self._store.connection() as conn:
            wait = await conn.fetchval(SQL["rate_take"], self.name, requests, per_seconds, pause)
        return float(wait)


class PostgresStore(Store):
    """Events and deliveries in a PostgreSQL database that several daemons share."""

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        migrate_on_start: bool = True,
        command_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.migrate_on_start = migrate_on_start
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._last_message_purge = 0.0
        self._waiting: list[tuple[NewEvent, asyncio.Future[IngestResult]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._routed = 0
        self._analyze_at = list(ANALYZE_AT)

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.pool_min,
                max_size=self.pool_max,
                command_timeout=self.command_timeout,
            )
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to {redact_url(self.url)}: {exc}") from exc
        try:
            if self.migrate_on_start:
                await self.migrate()
            else:
                await self._check_schema()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._flushes:  # acknowledgements under way get their answer first
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; server and network faults become StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except UNAVAILABLE as exc:
            log.error("store call failed: %s", exc, extra={"action": "store.commit_failed"})
            raise StoreUnavailable(f"the store could not commit: {exc}") from exc

    async def migrate(self) -> list[str]:
        """Apply the migrations this database lacks, in order, in one transaction under an
        advisory lock: instances starting together migrate once. Open or not."""
        if self._pool is not None:
            async with self.connection() as conn:
                applied = await self._migrate(conn)
        else:
            try:
                conn = await asyncpg.connect(self.url, timeout=self.command_timeout)
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                raise StoreUnavailable(f"cannot connect to {redact_url(self.url)}: {exc}") from exc
            try:
                applied = await self._migrate(conn)
            except UNAVAILABLE as exc:
                raise StoreUnavailable(f"migration failed: {exc}") from exc
            finally:
                await conn.close()
        if applied:
            log.info(
                "schema migrated: %s",
                ", ".join(applied),
                extra={"action": "store.migrated", "migrations": applied},
            )
        return applied

    @staticmethod
    async def _migrate(conn: asyncpg.Connection) -> list[str]:
        applied: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(SQL["migrations_table"])
            rows = await conn.fetch("SELECT version FROM crm_bridge_migrations")
            done = {r["version"] for r in rows}
            for name in MIGRATIONS:
                if name in done:
                    continue
                await conn.execute(SQL[name])
                await conn.execute("INSERT INTO crm_bridge_migrations (version) VALUES ($1)", name)
                applied.append(name)
        return applied

    async def _check_schema(self) -> None:
        async with self.connection() as conn:
            exists = await conn.fetchval("SELECT to_regclass('crm_bridge_migrations') IS NOT NULL")
            done = set()
            if exists:
                rows = await conn.fetch("SELECT version FROM crm_bridge_migrations")
                done = {r["version"] for r in rows}
        missing = [m for m in MIGRATIONS if m not in done]
        if missing:
            raise StoreUnavailable(
                f"the schema of {redact_url(self.url)} lacks {', '.join(missing)}: "
                "run `crm-bridge migrate` (or set store.migrate_on_start)"
            )

    def shared_window(self, name: str) -> SharedWindow:
        return PostgresWindow(self, name)

    # -- ingest and routing -----------------------------------------------------------------
    async def ingest(self, event: NewEvent) -> IngestResult:
        fut: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, fut))
        # A finished flush may still be in the set (its done-callback runs later): counting
        # it would leave this event waiting, unflushed, until the next webhook.
        if sum(not task.done() for task in self._flushes) < INGEST_FLUSHES:
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await fut

    async def _flush(self) -> None:
        """Insert what waits, batch after batch, until nothing does."""
        while self._waiting:
            batch, self._waiting = self._waiting[:INGEST_BATCH], self._waiting[INGEST_BATCH:]
            await self._insert_batch(batch)

    async def _insert_batch(
        self, batch: list[tuple[NewEvent, asyncio.Future[IngestResult]]]
    ) -> None:
        """Insert a batch and answer its callers. A batch failing on its data is halved, each
        half tried on its own: only the bad rows fail, after about 2·log2(n) statements per bad
        row rather than one statement per row, so the others' acknowledgements wait little."""
        try:
            new = await self._insert_events([e for e, _ in batch])
        except StoreUnavailable as exc:
            _answer(batch, exc)
            return
        except Exception as exc:  # noqa: BLE001 - handed to the callers, never swallowed
            if len(batch) == 1:
                _answer(batch, exc)
                return
            # In order: the first of equal payloads stays the new one.
            half = len(batch) // 2
            await self._insert_batch(batch[:half])
            await self._insert_batch(batch[half:])
            return
        _answer(batch, new)

    async def _insert_events(self, events: list[NewEvent]) -> set[str]:
        unique = list({e.id: e for e in events}.values())
        async with self.connection() as conn:
            rows = await conn.fetch(
                SQL["insert_events"],
                [e.id for e in unique],
                [e.source for e in unique],
                [e.type for e in unique],
                [e.email for e in unique],
                [e.received_at for e in unique],
                [e.sort_at for e in unique],
                [e.body for e in unique],
            )
        return {r["id"] for r in rows}

    async def unrouted(self, limit: int) -> list[StoredEvent]:
        async with self.connection() as conn, conn.transaction():
            await conn.execute(SQL["background"])  # a lease lost is taken again
            rows = await conn.fetch(SQL["unrouted"], limit, ROUTE_LEASE)
        events = [StoredEvent.model_validate(dict(r)) for r in rows]
        return sorted(events, key=lambda e: (e.received_at, e.id))

    async def route(self, routed: list[Routed], now: float, delay: float = 0.0) -> list[int]:
        if not routed:
            return []
        async with self.connection() as conn, conn.transaction():
            await conn.execute(SQL["background"])
            rows = await conn.fetch(SQL["lock_unrouted"], [r.event_id for r in routed])
            fresh = {r["id"] for r in rows}
            todo = [r for r in routed if r.event_id in fresh]
            await conn.executemany(
                SQL["mark_routed"], [(r.event_id, now, json.dumps(r.notes)) for r in todo]
            )
            deliveries = [(r, d) for r in todo for d in r.deliveries]
            if not deliveries:
                return []
            columns: list[list[Any]] = [[], [], [], [], [], [], []]
            for r, d in deliveries:
                values = (
                    r.event_id,
                    d.rule,
                    d.connector,
                    d.action,
                    d.contact_key,
                    d.operation.model_dump_json(),
                    r.sort_at,
                )
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
            ids = await conn.fetch(SQL["insert_deliveries"], *columns, now, now + delay)
        self._routed += len(ids)
        if self._analyze_at and self._routed >= self._analyze_at[0]:
            self._analyze_at.pop(0)
            await self._analyze()
        # Identities are drawn in insertion order: sorted, they follow `deliveries`.
        return sorted(int(r["id"]) for r in ids)

    async def _analyze(self) -> None:
        """Best effort, after the routing has committed: its failure must not fail `route`.
        (A role that does not own the tables raises nothing: the server skips them with a
        WARNING, and autovacuum's rounds keep the statistics.)"""
        try:
            async with self.connection() as conn:
                await conn.execute(SQL["analyze"])
        except (StoreUnavailable, asyncpg.PostgresError) as exc:
            log.warning(
                "could not refresh the statistics: %s",
                exc,
                extra={"action": "store.analyze_failed"},
            )
            return
        log.debug("statistics refreshed", extra={"action": "store.analyzed"})

    # -- delivery ---------------------------------------------------------------------------
    async def claim(
        self, connector: str, limit: int, now: float, lease_seconds: float, coalesce: int = 0
    ) -> list[ClaimedGroup]:
        async with self.connection() as conn, conn.transaction():
            await conn.execute(SQL["background"])
            await conn.execute(SQL["awaited_enough"], connector, now)
            heads = list(await conn.fetch(SQL["claim_pending"], connector, now, limit))
            if len(heads) < limit:
                heads += await conn.fetch(SQL["claim_expired"], connector, now, limit - len(heads))
            if not heads:
                return []
            keys = list({h["contact_key"] for h in heads})
            followers = (
                await conn.fetch(SQL["claim_followers"], connector, now, keys) if coalesce else []
            )
            members = coalesced_members(heads, followers, coalesce)
            ids = [i for group in members.values() for i in group]
            claimed = await conn.fetch(SQL["mark_claimed"], now + lease_seconds, now, ids)
            rows = {r["id"]: _delivery(r) for r in claimed}
            states = {
                r["contact_key"]: r
                for r in await conn.fetch(SQL["contact_states"], connector, keys)
            }
        return claimed_groups(heads, members, rows, states)

    async def finish(self, finishes: list[Finish], now: float) -> set[int]:
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for f in finishes:
            result = json.dumps(f.result) if f.result is not None else None
            for i, claim in zip(f.delivery_ids, f.claims, strict=True):
                values = (i, claim, str(f.status), result, f.error, f.next_attempt_at)
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
        if not columns[0]:
            return set()
        async with self.connection() as conn, conn.transaction():
            await conn.execute(SQL["background"])
            rows = await conn.fetch(SQL["finish"], *columns, now)
            recorded = {int(r["id"]) for r in rows}
            # What the CRM holds for the contact, only with an outcome recorded: not for a
            # contact forgotten meanwhile (its rows are gone, or locked by `forget` until they
            # are), nor by a claim that has lost its delivery to another instance.
            remembered = [
                f
                for f in finishes
                if f.connector
                and f.contact_key
                and f.applied_sort_at is not None
                and recorded.intersection(f.delivery_ids)
            ]
            if remembered:
                await conn.executemany(
                    SQL["remember_contact"],
                    [
                        (
                            f.connector,
                            f.contact_key,
                            f.record_id,
                            f.applied_sort_at,
                            now,
                            f.ledger.model_dump_json() if f.ledger else None,
                        )
                        for f in remembered
                    ],
                )
                released = [
                    (f.connector, f.contact_key, now)
                    for f in remembered
                    if f.status == DeliveryStatus.DONE
                ]
                if released:
                    await conn.executemany(SQL["release_awaiting"], released)
        return recorded

    # -- operators --------------------------------------------------------------------------
    async def backlog(self) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval(SQL["backlog"]))

    async def event(self, event_id: str) -> dict[str, Any] | None:
        async with self.connection() as conn:
            row = await conn.fetchrow(SQL["event"], event_id)
            if row is None:
                return None
            out = _row(row)
            out["deliveries"] = [
                _row(r) for r in await conn.fetch(SQL["deliveries_of_event"], event_id)
            ]
        return out

    async def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        async with self.connection() as conn:
            row = await conn.fetchrow(SQL["delivery"], delivery_id)
            if row is None:
                return None
            out = _row(row)
            event = await conn.fetchrow(SQL["event"], out["event_id"])
        out["event"] = _row(event) if event else None
        return out

    async def counts(self) -> dict[str, dict[str, int]]:
        async with self.connection() as conn:
            rows = await conn.fetch(SQL["counts"])
        out: dict[str, dict[str, int]] = {}
        for row in rows:
            out.setdefault(row["connector"], {})[row["status"]] = row["n"]
        return out

    async def queue_stats(self) -> dict[str, QueueStat]:
        async with self.connection() as conn:
            rows = await conn.fetch(SQL["queue_stats"])
        found: dict[str, dict[str, Any]] = {}
        for row in rows:
            stat = found.setdefault(row["connector"], {})
            stat[row["status"]] = row["n"]
            if row["status"] == "pending":
                stat["oldest_pending_at"] = row["oldest"]
        return {name: QueueStat(**stat) for name, stat in found.items()}

    async def last_errors(self) -> dict[str, LastError]:
        async with self.connection() as conn:
            rows = await conn.fetch(SQL["last_errors"])
        return {
            row["connector"]: LastError(
                delivery_id=row["id"],
                status=row["status"],
                error=row["last_error"],
                at=row["updated_at"],
            )
            for row in rows
        }

    async def dead_letters(
        self, connector: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            return [dict(r) for r in await conn.fetch(SQL["dlq_list"], connector, limit)]

    async def retry_dead(self, delivery_id: int | None, now: float) -> int:
        async with self.connection() as conn:
            return _rowcount(await conn.execute(SQL["dlq_retry"], delivery_id, now))

    async def purge_dead(self, before: float) -> int:
        async with self.connection() as conn:
            return _rowcount(await conn.execute(SQL["dlq_purge"], before))

    async def retry_now(self, connector: str, now: float) -> int:
        async with self.connection() as conn:
            return _rowcount(await conn.execute(SQL["retry_now"], connector, now))

    # -- retention and replays --------------------------------------------------------------
    async def forget(self, email: str) -> tuple[int, int]:
        email = email.strip().lower()
        async with self.connection() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch(SQL["events_of_email"], email)]
            deliveries = _rowcount(await conn.execute(SQL["delete_deliveries_of"], ids))
            events = _rowcount(await conn.execute(SQL["delete_events"], ids))
            await conn.execute(SQL["forget_contact_state"], email)
        return events, deliveries

    async def purge_delivered(self, before: float) -> int:
        async with self.connection() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch(SQL["delivered_events"], before)]
            if not ids:
                return 0
            await conn.execute(SQL["delete_deliveries_of"], ids)
            deleted = _rowcount(await conn.execute(SQL["delete_events"], ids))
            await conn.execute(SQL["purge_contact_state"])
            return deleted

    async def seen_message(self, source: str, message_id: str, now: float, keep: float) -> bool:
        async with self.connection() as conn:
            new = await conn.fetchval(SQL["seen_message"], source, message_id, now, keep)
            # Expired ids are purged now and then, not at every webhook.
            if time.monotonic() - self._last_message_purge > MESSAGE_PURGE_EVERY:
                self._last_message_purge = time.monotonic()
                await conn.execute(SQL["purge_messages"], now - keep)
        return new is not None
