"""The embedded store: SQLite in WAL mode, written by one thread with group commit.

Every store call is a small function run on the writer thread. The thread takes whatever calls
are waiting, runs each inside its own savepoint, and commits them together: one fsync covers a
whole burst of webhooks, and a failing call rolls back alone. The event loop only waits.
`synchronous=FULL` makes each commit durable before any caller is answered.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
    Store,
    claimed_groups,
    coalesced_members,
    queries,
)

T = TypeVar("T")
log = logging.getLogger("crm_bridge.store")
SQL = queries("sqlite")
MAX_GROUP = 512  # calls committed together at most
PURGE_MESSAGES_EVERY = 1000  # seen_message calls between purges of expired message ids

EventRow = tuple[str, str, str, str | None, float, float, str]  # events' columns, in order
_Work = Callable[[sqlite3.Connection], Any] | EventRow
_Call = tuple[_Work, asyncio.Future[Any], asyncio.AbstractEventLoop]


def _resolve(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in outcomes:
        if fut.cancelled():
            continue  # the caller went away; what was committed stays committed
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class _Writer:
    """The one thread that owns the SQLite connection."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise StoreUnavailable(f"cannot open {self._path}: {self._error}") from self._error

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, work: _Work) -> asyncio.Future[Any]:
        """Queue a function of the connection, or an event row to insert; await the commit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put((work, fut, loop))
        return fut

    def _connect(self) -> sqlite3.Connection:
        # People's emails and names: owner only, from the first byte (created here with 0600
        # rather than chmod-ed afterwards); SQLite gives -wal and -shm the database's mode.
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA secure_delete=ON")  # a forgotten person leaves no bytes behind
        conn.executescript(SQL["schema"])  # executescript commits: run it before any group
        columns = {row["name"] for row in conn.execute("PRAGMA table_info(contact_state)")}
        if "fields" not in columns:  # a store made before the field ledger
            conn.execute(SQL["add_ledger"])
        return conn

    def _run(self) -> None:
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            self._commit(conn, group)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, group: list[_Call]) -> None:
        # Webhooks first, in a transaction of their own: an acknowledgement never waits for
        # the background work (claims, routing) queued beside it.
        events = [call for call in group if isinstance(call[0], tuple)]
        calls = [call for call in group if not isinstance(call[0], tuple)]
        for part in (events, calls):
            if part:
                self._answer(part, self._transaction(conn, part))

    def _transaction(
        self, conn: sqlite3.Connection, group: list[_Call]
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            new_events = self._insert_events(conn, [w for w, _, _ in group if isinstance(w, tuple)])
            for work, fut, _ in group:
                if isinstance(work, tuple):
                    # The first of equal payloads in a group is new; any later one is a duplicate.
                    new = work[0] in new_events
                    new_events.discard(work[0])
                    outcomes.append((fut, True, IngestResult(event_id=work[0], duplicate=not new)))
                    continue
                conn.execute("SAVEPOINT call")
                try:
                    value = work(conn)
                except Exception as exc:  # noqa: BLE001 - handed to the caller, not swallowed
                    conn.execute("ROLLBACK TO call")
                    outcomes.append((fut, False, exc))
                else:
                    outcomes.append((fut, True, value))
                conn.execute("RELEASE call")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Disk full, I/O error: nothing in this group is durable, so nobody hears "done".
            log.error("store commit failed: %s", exc, extra={"action": "store.commit_failed"})
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"the store could not commit: {exc}")
            outcomes = [(fut, False, failure) for _, fut, _ in group]
        return outcomes

    @staticmethod
    def _answer(group: list[_Call], outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, _, loop), outcome in zip(group, outcomes, strict=True):
            by_loop.setdefault(loop, []).append(outcome)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_resolve, items)

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, rows: list[EventRow]) -> set[str]:
        """Insert a whole group's events in one statement; the ids that were new."""
        if not rows:
            return set()
        unique = list({row[0]: row for row in rows}.values())
        placeholders = ",".join(["(?,?,?,?,?,?,?)"] * len(unique))
        params = [value for row in unique for value in row]
        sql = SQL["insert_events"].format(rows=placeholders)
        return {r[0] for r in conn.execute(sql, params).fetchall()}


def _delivery(row: sqlite3.Row) -> Delivery:
    data = dict(row)
    data["operation"] = json.loads(data["operation"])
    data["result"] = json.loads(data["result"]) if data["result"] else None
    return Delivery.model_validate(data)


def _row(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for key in ("operation", "result", "notes"):
        if isinstance(data.get(key), str):
            data[key] = json.loads(data[key])
    return data


class SqliteStore(Store):
    """Events and deliveries in one SQLite file, owned by one daemon at a time.

    `exclusive=False` opens it beside a running daemon (the CLI's `dlq`, `backfill`): WAL lets
    both write, and in-flight deliveries are left alone.
    """

    def __init__(self, path: Path, *, exclusive: bool = True) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self._writer = _Writer(self.path)
        self._lock_fd: int | None = None
        self._messages_seen = 0

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.exclusive:
            self._take_lock()
        self._writer.start()
        if not self.exclusive:
            return
        released = await self._run(lambda c: c.execute(SQL["release_claims"]).rowcount)
        if released:
            log.info(
                "resuming %d interrupted deliveries", released, extra={"action": "store.resume"}
            )

    async def close(self) -> None:
        self._writer.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnavailable(
                f"{self.path} is in use by another crm-bridge process "
                "(SQLite serves one daemon; use PostgreSQL for several)"
            ) from None
        self._lock_fd = fd

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result: T = await self._writer.submit(fn)
        return result

    async def ingest(self, event: NewEvent) -> IngestResult:
        row: EventRow = (
            event.id,
            event.source,
            event.type,
            event.email,
            event.received_at,
            event.sort_at,
            event.body,
        )
        result: IngestResult = await self._writer.submit(row)
        return result

    async def unrouted(self, limit: int) -> list[StoredEvent]:
        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(SQL["unrouted"], {"limit": limit}).fetchall()
            return [StoredEvent.model_validate(dict(r)) for r in rows]

        return await self._run(read)

    async def route(self, routed: list[Routed], now: float, delay: float = 0.0) -> list[int]:
        deliveries = [
            {
                "event_id": r.event_id,
                "rule": d.rule,
                "connector": d.connector,
                "action": d.action,
                "contact_key": d.contact_key,
                "operation": d.operation.model_dump_json(),
                "now": now,
                "due": now + delay,
                "sort_at": r.sort_at,
            }
            for r in routed
            for d in r.deliveries
        ]
        marks = [{"id": r.event_id, "now": now, "notes": json.dumps(r.notes)} for r in routed]

        def write(conn: sqlite3.Connection) -> list[int]:
            ids = [m["id"] for m in marks]
            sql = SQL["existing_events"].format(ids=",".join("?" * len(ids)))
            present = {row[0] for row in conn.execute(sql, ids)} if ids else set()
            conn.executemany(SQL["mark_routed"], marks)
            return [
                conn.execute(SQL["insert_delivery"], d).lastrowid or 0
                for d in deliveries
                if d["event_id"] in present
            ]

        return await self._run(write)

    async def claim(
        self, connector: str, limit: int, now: float, lease_seconds: float, coalesce: int = 0
    ) -> list[ClaimedGroup]:
        params = {"connector": connector, "limit": limit, "now": now}

        def claim(conn: sqlite3.Connection) -> list[ClaimedGroup]:
            conn.execute(SQL["awaited_enough"], {"connector": connector, "now": now})
            heads = conn.execute(SQL["claim_heads"], params).fetchall()[:limit]
            if not heads:
                return []
            keys = list({h["contact_key"] for h in heads})
            marks = ",".join("?" * len(keys))
            followers = (
                conn.execute(SQL["claim_followers"].format(keys=marks), [connector, now, *keys])
                if coalesce
                else []
            )
            members = coalesced_members(heads, followers, coalesce)
            ids = [i for group in members.values() for i in group]
            sql = SQL["mark_claimed"].format(ids=",".join("?" * len(ids)))
            rows = {
                r["id"]: _delivery(r) for r in conn.execute(sql, [now + lease_seconds, now, *ids])
            }
            sql = SQL["contact_states"].format(keys=marks)
            states = {r["contact_key"]: r for r in conn.execute(sql, [connector, *keys])}
            return claimed_groups(heads, members, rows, states)

        return await self._run(claim)

    async def finish(self, finishes: list[Finish], now: float) -> set[int]:
        def write(conn: sqlite3.Connection) -> set[int]:
            recorded: set[int] = set()
            for f in finishes:
                result = json.dumps(f.result) if f.result is not None else None
                for i, claim in zip(f.delivery_ids, f.claims, strict=True):
                    params = {
                        "id": i,
                        "claim": claim,
                        "status": f.status,
                        "result": result,
                        "error": f.error,
                        "next_attempt_at": f.next_attempt_at,
                        "now": now,
                    }
                    if conn.execute(SQL["finish"], params).rowcount:
                        recorded.add(i)
                # What the CRM holds for the contact, only with an outcome recorded: not for a
                # contact forgotten meanwhile, nor by a claim that has lost its delivery.
                applied = recorded.intersection(f.delivery_ids)
                if applied and f.connector and f.contact_key and f.applied_sort_at is not None:
                    conn.execute(
                        SQL["remember_contact"],
                        {
                            "connector": f.connector,
                            "contact_key": f.contact_key,
                            "record_id": f.record_id,
                            "applied_sort_at": f.applied_sort_at,
                            "now": now,
                            "fields": f.ledger.model_dump_json() if f.ledger else None,
                        },
                    )
                    if f.status == DeliveryStatus.DONE:
                        conn.execute(
                            SQL["release_awaiting"],
                            {"connector": f.connector, "contact_key": f.contact_key, "now": now},
                        )
            return recorded

        return await self._run(write)

    async def backlog(self) -> int:
        return await self._run(lambda c: int(c.execute(SQL["backlog"]).fetchone()[0]))

    async def event(self, event_id: str) -> dict[str, Any] | None:
        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(SQL["event"], {"id": event_id}).fetchone()
            if row is None:
                return None
            out = _row(row)
            out["deliveries"] = [
                _row(r) for r in conn.execute(SQL["deliveries_of_event"], {"id": event_id})
            ]
            return out

        return await self._run(read)

    async def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(SQL["delivery"], {"id": delivery_id}).fetchone()
            if row is None:
                return None
            out = _row(row)
            event = conn.execute(SQL["event"], {"id": out["event_id"]}).fetchone()
            out["event"] = _row(event) if event else None
            return out

        return await self._run(read)

    async def counts(self) -> dict[str, dict[str, int]]:
        def read(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for row in conn.execute(SQL["counts"]):
                out.setdefault(row["connector"], {})[row["status"]] = row["n"]
            return out

        return await self._run(read)

    async def queue_stats(self) -> dict[str, QueueStat]:
        def read(conn: sqlite3.Connection) -> dict[str, QueueStat]:
            found: dict[str, dict[str, Any]] = {}
            for row in conn.execute(SQL["queue_stats"]):
                stat = found.setdefault(row["connector"], {})
                stat[row["status"]] = row["n"]
                if row["status"] == "pending":
                    stat["oldest_pending_at"] = row["oldest"]
            return {name: QueueStat(**stat) for name, stat in found.items()}

        return await self._run(read)

    async def last_errors(self) -> dict[str, LastError]:
        def read(conn: sqlite3.Connection) -> dict[str, LastError]:
            return {
                row["connector"]: LastError(
                    delivery_id=row["id"],
                    status=row["status"],
                    error=row["last_error"],
                    at=row["updated_at"],
                )
                for row in conn.execute(SQL["last_errors"])
            }

        return await self._run(read)

    async def dead_letters(
        self, connector: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params = {"connector": connector, "limit": limit}
        return await self._run(
            lambda c: [dict(r) for r in c.execute(SQL["dlq_list"], params).fetchall()]
        )

    async def retry_dead(self, delivery_id: int | None, now: float) -> int:
        params = {"id": delivery_id, "now": now}
        return await self._run(lambda c: c.execute(SQL["dlq_retry"], params).rowcount)

    async def purge_dead(self, before: float) -> int:
        return await self._run(lambda c: c.execute(SQL["dlq_purge"], {"before": before}).rowcount)

    async def retry_now(self, connector: str, now: float) -> int:
        params = {"connector": connector, "now": now}
        return await self._run(lambda c: c.execute(SQL["retry_now"], params).rowcount)

    async def forget(self, email: str) -> tuple[int, int]:
        email = email.strip().lower()

        def delete(conn: sqlite3.Connection) -> tuple[int, int]:
            ids = [r[0] for r in conn.execute(SQL["forget_events"], {"email": email})]
            deliveries = _delete_events(conn, ids)
            conn.execute(SQL["forget_contact_state"], {"email": email})
            return len(ids), deliveries

        return await self._run(delete)

    async def purge_delivered(self, before: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute(SQL["purge_delivered"], {"before": before})]
            _delete_events(conn, ids)
            if ids:
                conn.execute(SQL["purge_contact_state"])
            return len(ids)

        return await self._run(delete)

    async def seen_message(self, source: str, message_id: str, now: float, keep: float) -> bool:
        self._messages_seen += 1
        purge = self._messages_seen % PURGE_MESSAGES_EVERY == 1
        params = {"source": source, "message_id": message_id, "now": now, "cutoff": now - keep}

        def remember(conn: sqlite3.Connection) -> bool:
            if purge:
                conn.execute(SQL["purge_messages"], {"cutoff": now - keep})
            return conn.execute(SQL["seen_message"], params).fetchone() is not None

        return await self._run(remember)


def _delete_events(conn: sqlite3.Connection, ids: list[str]) -> int:
    """Delete events and their deliveries; the number of deliveries deleted."""
    deliveries = 0
    for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        deliveries += conn.execute(
            f"DELETE FROM deliveries WHERE event_id IN ({marks})", chunk
        ).rowcount
        conn.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)
    return deliveries
