-- name: schema
-- An event's id is its idempotency key: a resent payload finds its twin by primary key.
CREATE TABLE IF NOT EXISTS events (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL,
    type            TEXT NOT NULL,
    email           TEXT,
    received_at     REAL NOT NULL,
    sort_at         REAL NOT NULL,
    body            TEXT NOT NULL,
    routed_at       REAL,           -- NULL until the rules have made its deliveries
    notes           TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS events_unrouted ON events (received_at) WHERE routed_at IS NULL;
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL REFERENCES events(id),
    rule            TEXT NOT NULL,
    connector       TEXT NOT NULL,
    action          TEXT NOT NULL,
    contact_key     TEXT NOT NULL,
    operation       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    sort_at         REAL NOT NULL,
    horizon_start   REAL NOT NULL,  -- retries stop horizon seconds after this (reset by dlq retry)
    lease_until     REAL,
    last_error      TEXT,
    result          TEXT,
    updated_at      REAL NOT NULL
);
-- What each connector last confirmed for a contact: its record id (later writes skip the
-- lookup), the newest `sort_at` applied, and the field ledger (bridge.staleness, JSON: which
-- event decided each field; added by add_ledger to stores made before it).
CREATE TABLE IF NOT EXISTS contact_state (
    connector       TEXT NOT NULL,
    contact_key     TEXT NOT NULL,
    record_id       TEXT,
    applied_sort_at REAL NOT NULL,
    updated_at      REAL NOT NULL,
    fields          TEXT,
    PRIMARY KEY (connector, contact_key)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (connector, status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_contact ON deliveries (connector, contact_key, status);
CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (event_id);
-- Only the waiting deliveries: counting them (backlog, queue_stats) and finding the oldest
-- stay cheap however many finished ones the table keeps.
CREATE INDEX IF NOT EXISTS deliveries_waiting ON deliveries (connector, status, created_at)
 WHERE status IN ('pending', 'in_flight');
CREATE INDEX IF NOT EXISTS events_by_email ON events (email);
-- Ids of signed webhooks (Standard Webhooks `webhook-id`), remembered to refuse replays.
CREATE TABLE IF NOT EXISTS webhook_messages (
    source      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    seen_at     REAL NOT NULL,
    PRIMARY KEY (source, message_id)
);
CREATE INDEX IF NOT EXISTS webhook_messages_seen ON webhook_messages (seen_at);

-- name: add_ledger
ALTER TABLE contact_state ADD COLUMN fields TEXT

-- name: insert_events
-- One multi-row statement per commit group (the VALUES rows are added in code); RETURNING
-- names the new ones, the others were already stored.
INSERT INTO events (id, source, type, email, received_at, sort_at, body) VALUES {rows}
ON CONFLICT (id) DO NOTHING
RETURNING id

-- name: unrouted
SELECT id, source, body, received_at, sort_at FROM events
 WHERE routed_at IS NULL
 ORDER BY received_at
 LIMIT :limit

-- name: mark_routed
UPDATE events SET routed_at = :now, notes = :notes WHERE id = :id

-- name: existing_events
-- Of the events being routed, those still stored (`forget` may have deleted one meanwhile).
SELECT id FROM events WHERE id IN ({ids})

-- name: insert_delivery
INSERT INTO deliveries (event_id, rule, connector, action, contact_key, operation,
                        created_at, next_attempt_at, sort_at, horizon_start, updated_at)
VALUES (:event_id, :rule, :connector, :action, :contact_key, :operation,
        :now, :due, :sort_at, :now, :now)

-- name: release_claims
-- One process owns a SQLite store (a lock file sees to it), so whatever was in flight when it
-- stopped was interrupted: send it again.
UPDATE deliveries SET status = 'pending', lease_until = NULL WHERE status = 'in_flight'

-- name: awaited_enough
-- Deliveries that waited for their record until their deadline: due again, to end as their
-- rule's `if_missing` says (or to land, if the record appeared without us).
UPDATE deliveries SET status = 'pending', updated_at = :now
 WHERE connector = :connector AND status = 'awaiting' AND next_attempt_at <= :now

-- name: release_awaiting
-- The contact's record now exists on this connector: what waited for it is due at once.
UPDATE deliveries SET status = 'pending', next_attempt_at = :now, updated_at = :now
 WHERE connector = :connector AND contact_key = :contact_key AND status = 'awaiting'

-- name: claim_heads
-- The first unfinished delivery of each contact, in (sort_at, id) order, when due; none for a
-- contact that has a delivery in flight. Two branches, each walking deliveries_due in order,
-- so the cost does not grow with the backlog.
SELECT * FROM (
    SELECT d.* FROM deliveries d
     WHERE d.connector = :connector AND d.status = 'pending' AND d.next_attempt_at <= :now
       AND NOT EXISTS (
            SELECT 1 FROM deliveries e
             WHERE e.connector = d.connector AND e.contact_key = d.contact_key
               AND e.status IN ('pending', 'in_flight') AND e.id != d.id
               AND (e.status = 'in_flight' OR e.sort_at < d.sort_at
                    OR e.sort_at = d.sort_at AND e.id < d.id))
     ORDER BY d.next_attempt_at, d.id
     LIMIT :limit)
UNION ALL
SELECT * FROM (
    SELECT d.* FROM deliveries d
     WHERE d.connector = :connector AND d.status = 'in_flight' AND d.lease_until < :now
       AND NOT EXISTS (
            SELECT 1 FROM deliveries e
             WHERE e.connector = d.connector AND e.contact_key = d.contact_key
               AND e.status IN ('pending', 'in_flight') AND e.id != d.id
               AND (e.status = 'in_flight' AND e.lease_until >= :now
                    OR e.sort_at < d.sort_at OR e.sort_at = d.sort_at AND e.id < d.id))
     ORDER BY d.id
     LIMIT :limit)

-- name: claim_followers
-- The rest of these contacts' queued bursts, to be merged into their heads' writes.
-- ({keys} is a list of placeholders added in code.)
SELECT * FROM deliveries
 WHERE connector = ? AND status = 'pending' AND next_attempt_at <= ?
   AND contact_key IN ({keys})
 ORDER BY contact_key, sort_at, id

-- name: mark_claimed
UPDATE deliveries
   SET status = 'in_flight', attempts = attempts + 1, lease_until = ?, updated_at = ?
 WHERE id IN ({ids})
RETURNING *

-- name: contact_states
SELECT contact_key, record_id, applied_sort_at, fields FROM contact_state
 WHERE connector = ? AND contact_key IN ({keys})

-- name: finish
-- Only under the claim it was sent under (still in flight, `attempts` unchanged), as in
-- postgres.sql; a delivery deleted meanwhile (`forget`) stays deleted.
UPDATE deliveries
   SET status = :status, result = :result, last_error = :error,
       next_attempt_at = coalesce(:next_attempt_at, next_attempt_at),
       lease_until = NULL, updated_at = :now
 WHERE id = :id AND status = 'in_flight' AND attempts = :claim

-- name: remember_contact
-- The ledger is replaced whole: one claim at a time holds a contact's deliveries.
INSERT INTO contact_state (connector, contact_key, record_id, applied_sort_at, updated_at,
                           fields)
VALUES (:connector, :contact_key, :record_id, :applied_sort_at, :now, :fields)
ON CONFLICT (connector, contact_key) DO UPDATE
   SET record_id = coalesce(excluded.record_id, contact_state.record_id),
       applied_sort_at = max(contact_state.applied_sort_at, excluded.applied_sort_at),
       fields = coalesce(excluded.fields, contact_state.fields),
       updated_at = excluded.updated_at

-- name: backlog
SELECT (SELECT count(*) FROM events WHERE routed_at IS NULL)
     + (SELECT count(*) FROM deliveries WHERE status IN ('pending', 'in_flight'))

-- name: event
SELECT * FROM events WHERE id = :id

-- name: deliveries_of_event
SELECT * FROM deliveries WHERE event_id = :id ORDER BY id

-- name: counts
SELECT connector, status, count(*) AS n FROM deliveries GROUP BY connector, status

-- name: queue_stats
-- Run at every metrics scrape, on the writer thread: it reads the partial index
-- deliveries_waiting only (the WHERE must stay the index's for the planner to use it).
SELECT connector, status, count(*) AS n, min(created_at) AS oldest FROM deliveries
 WHERE status IN ('pending', 'in_flight')
 GROUP BY connector, status

-- name: last_errors
-- The most recent error of a delivery still waiting for a retry or dead, per connector (for
-- `crm-bridge status`; SQLite takes the bare columns from the row holding the max).
SELECT connector, id, status, last_error, max(updated_at) AS updated_at FROM deliveries
 WHERE status IN ('pending', 'dead') AND last_error IS NOT NULL
 GROUP BY connector

-- name: dlq_list
SELECT d.id, d.event_id, d.rule, d.connector, d.action, d.contact_key, d.attempts,
       d.last_error, d.updated_at
  FROM deliveries d
 WHERE d.status = 'dead' AND (:connector IS NULL OR d.connector = :connector)
 ORDER BY d.id
 LIMIT :limit

-- name: delivery
SELECT * FROM deliveries WHERE id = :id

-- name: dlq_retry
UPDATE deliveries
   SET status = 'pending', next_attempt_at = :now, horizon_start = :now, updated_at = :now
 WHERE status = 'dead' AND (:id IS NULL OR id = :id)

-- name: retry_now
-- After a reload: what waits for a retry (attempts > 0) is due at once; new deliveries keep
-- their coalescing delay.
UPDATE deliveries
   SET next_attempt_at = :now, updated_at = :now
 WHERE connector = :connector AND status = 'pending' AND attempts > 0 AND next_attempt_at > :now

-- name: dlq_purge
DELETE FROM deliveries WHERE status = 'dead' AND updated_at < :before

-- name: forget_events
-- A person's events (by normalised email) and, first, every delivery they made, dead included.
SELECT id FROM events WHERE email = :email

-- name: forget_contact_state
DELETE FROM contact_state WHERE contact_key = :email

-- name: purge_contact_state
-- Retention: what the connectors remember of a contact goes with the last of its deliveries.
DELETE FROM contact_state
 WHERE NOT EXISTS (SELECT 1 FROM deliveries d
                    WHERE d.connector = contact_state.connector
                      AND d.contact_key = contact_state.contact_key)

-- name: purge_delivered
-- Events received before :before, routed, whose deliveries all ended delivered or skipped
-- (an event that made none qualifies too); their deliveries go with them.
SELECT e.id FROM events e
 WHERE e.received_at < :before AND e.routed_at IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM deliveries d
                    WHERE d.event_id = e.id AND d.status NOT IN ('done', 'dry_run', 'skipped'))


-- name: seen_message
-- New, or seen longer than `keep` ago (then it counts as new again): the row is (re)dated and
-- returned; a replay within `keep` returns nothing.
INSERT INTO webhook_messages (source, message_id, seen_at) VALUES (:source, :message_id, :now)
ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at
 WHERE webhook_messages.seen_at <= :cutoff
RETURNING 1

-- name: purge_messages
DELETE FROM webhook_messages WHERE seen_at <= :cutoff
