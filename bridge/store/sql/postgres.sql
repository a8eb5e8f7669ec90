-- The PostgreSQL store: the SQLite store's tables and rules, shared by several daemons.
-- Blocks named migration_NNNN_* are the versioned schema, applied in name order by
-- `crm-bridge migrate` (or at start-up) and recorded in crm_bridge_migrations; never edit one
-- that has shipped: add the next. Times are epoch seconds (double precision), as in SQLite.

-- name: migrations_table
CREATE TABLE IF NOT EXISTS crm_bridge_migrations (
    version    TEXT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)

-- name: migration_0001_initial
-- An event's id is its idempotency key: a resent payload finds its twin by primary key, on
-- whichever instance it lands.
CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL,
    type            TEXT NOT NULL,
    email           TEXT,
    received_at     DOUBLE PRECISION NOT NULL,
    sort_at         DOUBLE PRECISION NOT NULL,
    body            TEXT NOT NULL,              -- the raw body, byte for byte
    routed_at       DOUBLE PRECISION,           -- NULL until the rules have made its deliveries
    notes           TEXT NOT NULL DEFAULT '[]',
    route_lease_until DOUBLE PRECISION          -- an instance's router has it until then
);
CREATE INDEX events_unrouted ON events (received_at) WHERE routed_at IS NULL;
CREATE INDEX events_by_email ON events (email);
CREATE INDEX events_routed ON events (received_at) WHERE routed_at IS NOT NULL;
CREATE TABLE deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        TEXT NOT NULL REFERENCES events(id),
    rule            TEXT NOT NULL,
    connector       TEXT NOT NULL,
    action          TEXT NOT NULL,
    contact_key     TEXT NOT NULL,
    operation       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    sort_at         DOUBLE PRECISION NOT NULL,
    horizon_start   DOUBLE PRECISION NOT NULL,
    lease_until     DOUBLE PRECISION,
    last_error      TEXT,
    result          TEXT,
    updated_at      DOUBLE PRECISION NOT NULL
);
CREATE TABLE contact_state (
    connector       TEXT NOT NULL,
    contact_key     TEXT NOT NULL,
    record_id       TEXT,
    applied_sort_at DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (connector, contact_key)
);
-- (.., id): the claim walks this index in its ORDER BY and stops at its LIMIT, without a sort.
CREATE INDEX deliveries_due ON deliveries (connector, status, next_attempt_at, id);
-- A contact's unfinished deliveries: what each claim probes per candidate (and the followers);
-- being partial, it also serves the counts of waiting deliveries (backlog, queue_stats). The one
-- index on unfinished rows: a second (SQLite's deliveries_waiting) ties with it in the
-- planner's eyes while a fresh table has no statistics, and loses the claim its probe.
CREATE INDEX deliveries_unfinished_by_contact ON deliveries (connector, contact_key, sort_at, id)
 WHERE status IN ('pending', 'in_flight');
CREATE INDEX deliveries_by_event ON deliveries (event_id);
-- Message ids of signed webhooks, remembered for a while to refuse replays.
CREATE TABLE webhook_messages (
    source     TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source, message_id)
);
CREATE INDEX webhook_messages_seen ON webhook_messages (seen_at);
-- One sliding window per connector name, shared by every instance (bridge.ratelimit).
CREATE TABLE rate_windows (
    name         TEXT PRIMARY KEY,
    paused_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE rate_starts (
    name TEXT NOT NULL REFERENCES rate_windows(name),
    at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX rate_starts_by_name ON rate_starts (name, at);
-- Take a start in window p_name, or say how long to wait: one round trip, serialised per
-- window by the row lock on rate_windows. The database's clock dates the starts, so the
-- instances' clocks need not agree.
CREATE FUNCTION crm_bridge_rate_take(
    p_name TEXT, p_requests INTEGER, p_per DOUBLE PRECISION, p_pause DOUBLE PRECISION
) RETURNS DOUBLE PRECISION LANGUAGE plpgsql AS $$
DECLARE
    t      DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
    paused DOUBLE PRECISION;
    used   INTEGER;
    oldest DOUBLE PRECISION;
BEGIN
    INSERT INTO rate_windows (name) VALUES (p_name) ON CONFLICT (name) DO NOTHING;
    SELECT paused_until INTO paused FROM rate_windows WHERE name = p_name FOR UPDATE;
    IF p_pause > 0 AND t + p_pause > paused THEN
        paused := t + p_pause;
        UPDATE rate_windows SET paused_until = paused WHERE name = p_name;
    END IF;
    IF paused > t THEN
        RETURN paused - t;
    END IF;
    DELETE FROM rate_starts WHERE name = p_name AND at <= t - p_per;
    SELECT count(*), min(at) INTO used, oldest FROM rate_starts WHERE name = p_name;
    IF used < p_requests THEN
        INSERT INTO rate_starts (name, at) VALUES (p_name, t);
        RETURN 0;
    END IF;
    RETURN greatest(oldest + p_per - t, 0.001);
END
$$;

-- name: migration_0002_field_ledger
-- Per-field staleness (bridge.staleness): which event decided each field of a contact's record,
-- as JSON; and the index retention uses to drop it with the contact's last delivery.
ALTER TABLE contact_state ADD COLUMN fields TEXT;
CREATE INDEX deliveries_by_contact ON deliveries (connector, contact_key);

-- name: insert_events
-- A batch of webhooks in one statement and one commit (group commit); RETURNING names the new
-- ones, the others were already stored (by this instance or another).
INSERT INTO events (id, source, type, email, received_at, sort_at, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                     $6::float8[], $7::text[])
ON CONFLICT (id) DO NOTHING
RETURNING id

-- name: unrouted
-- Hand this instance's router a batch nobody else is routing: leased for a while (a router
-- that died lets go when the lease ends); `route` re-checks under a row lock anyway.
UPDATE events e
   SET route_lease_until = extract(epoch FROM clock_timestamp()) + $2
  FROM (SELECT id FROM events
         WHERE routed_at IS NULL
           AND (route_lease_until IS NULL
                OR route_lease_until < extract(epoch FROM clock_timestamp()))
         ORDER BY received_at
         LIMIT $1
           FOR UPDATE SKIP LOCKED) AS picked
 WHERE e.id = picked.id
RETURNING e.id, e.source, e.body, e.received_at, e.sort_at

-- name: lock_unrouted
-- Another instance may have routed some of these meanwhile: only the rest get deliveries.
SELECT id FROM events WHERE id = ANY($1::text[]) AND routed_at IS NULL ORDER BY id FOR UPDATE

-- name: mark_routed
UPDATE events SET routed_at = $2, notes = $3, route_lease_until = NULL WHERE id = $1

-- name: insert_deliveries
INSERT INTO deliveries (event_id, rule, connector, action, contact_key, operation,
                        created_at, next_attempt_at, sort_at, horizon_start, updated_at)
SELECT event_id, rule, connector, action, contact_key, operation, $8, $9, sort_at, $8, $8
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
              $7::float8[]) WITH ORDINALITY
       AS d(event_id, rule, connector, action, contact_key, operation, sort_at, n)
 ORDER BY n
RETURNING id

-- name: awaited_enough
-- Deliveries that waited for their record until their deadline: due again, to end as their
-- rule's `if_missing` says (or to land, if the record appeared without us).
UPDATE deliveries SET status = 'pending', updated_at = $2
 WHERE connector = $1 AND status = 'awaiting' AND next_attempt_at <= $2

-- name: release_awaiting
-- The contact's record now exists on this connector: what waited for it is due at once.
UPDATE deliveries SET status = 'pending', next_attempt_at = $3, updated_at = $3
 WHERE connector = $1 AND contact_key = $2 AND status = 'awaiting'

-- name: claim_pending
-- As SQLite's claim_heads, first branch: each contact's first unfinished delivery when due,
-- none for a contact with one in flight. The walk follows deliveries_due in order and stops at
-- the LIMIT; OFFSET 0 keeps each NOT EXISTS a per-row probe of
-- deliveries_unfinished_by_contact (without it the planner may turn it into a join over the
-- whole backlog, and on a fresh table, without statistics, into a nested loop over it). SKIP LOCKED: a row another instance is claiming or
-- finishing is left to it; its followers stay behind it, being unfinished in this snapshot.
SELECT d.* FROM deliveries d
 WHERE d.connector = $1 AND d.status = 'pending' AND d.next_attempt_at <= $2
   AND NOT EXISTS (
        SELECT 1 FROM deliveries e
         WHERE e.connector = d.connector AND e.contact_key = d.contact_key
           AND e.status IN ('pending', 'in_flight') AND e.id != d.id
           AND (e.status = 'in_flight' OR e.sort_at < d.sort_at
                OR e.sort_at = d.sort_at AND e.id < d.id)
        OFFSET 0)
 ORDER BY d.next_attempt_at, d.id
 LIMIT $3
   FOR UPDATE OF d SKIP LOCKED

-- name: claim_expired
-- Second branch: deliveries whose claimer's lease ran out (it crashed, or hangs).
SELECT d.* FROM deliveries d
 WHERE d.connector = $1 AND d.status = 'in_flight' AND d.lease_until < $2
   AND NOT EXISTS (
        SELECT 1 FROM deliveries e
         WHERE e.connector = d.connector AND e.contact_key = d.contact_key
           AND e.status IN ('pending', 'in_flight') AND e.id != d.id
           AND (e.status = 'in_flight' AND e.lease_until >= $2
                OR e.sort_at < d.sort_at OR e.sort_at = d.sort_at AND e.id < d.id)
        OFFSET 0)
 ORDER BY d.id
 LIMIT $3
   FOR UPDATE OF d SKIP LOCKED

-- name: claim_followers
SELECT * FROM deliveries
 WHERE connector = $1 AND status = 'pending' AND next_attempt_at <= $2
   AND contact_key = ANY($3::text[])
 ORDER BY contact_key, sort_at, id
   FOR UPDATE SKIP LOCKED

-- name: mark_claimed
UPDATE deliveries
   SET status = 'in_flight', attempts = attempts + 1, lease_until = $1, updated_at = $2
 WHERE id = ANY($3::bigint[])
RETURNING *

-- name: contact_states
SELECT contact_key, record_id, applied_sort_at, fields FROM contact_state
 WHERE connector = $1 AND contact_key = ANY($2::text[])

-- name: finish
-- All of a call's outcomes in one statement: arrays of ids, claims, statuses, results, errors,
-- times. Only under the claim they were sent under (still in flight, `attempts` unchanged): a
-- claim whose lease ran out may have been taken over by another instance, whose row this must
-- not overwrite; a delivery deleted meanwhile (`forget`) stays deleted. RETURNING: the ids
-- recorded.
UPDATE deliveries d
   SET status = f.status, result = f.result, last_error = f.error,
       next_attempt_at = coalesce(f.next_attempt_at, d.next_attempt_at),
       lease_until = NULL, updated_at = $7
  FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[], $6::float8[])
       AS f(id, claim, status, result, error, next_attempt_at)
 WHERE d.id = f.id AND d.status = 'in_flight' AND d.attempts = f.claim
RETURNING d.id

-- name: remember_contact
-- The ledger is replaced whole: one claim at a time holds a contact's deliveries.
INSERT INTO contact_state (connector, contact_key, record_id, applied_sort_at, updated_at, fields)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (connector, contact_key) DO UPDATE
   SET record_id = coalesce(excluded.record_id, contact_state.record_id),
       applied_sort_at = greatest(contact_state.applied_sort_at, excluded.applied_sort_at),
       fields = coalesce(excluded.fields, contact_state.fields),
       updated_at = excluded.updated_at

-- name: backlog
SELECT (SELECT count(*) FROM events WHERE routed_at IS NULL)
     + (SELECT count(*) FROM deliveries WHERE status IN ('pending', 'in_flight'))

-- name: event
SELECT id, source, type, email, received_at, sort_at, body, routed_at, notes
  FROM events WHERE id = $1

-- name: deliveries_of_event
SELECT * FROM deliveries WHERE event_id = $1 ORDER BY id

-- name: counts
SELECT connector, status, count(*) AS n FROM deliveries GROUP BY connector, status

-- name: queue_stats
-- At every metrics scrape: reads the unfinished rows only (deliveries_unfinished_by_contact).
SELECT connector, status, count(*) AS n, min(created_at) AS oldest FROM deliveries
 WHERE status IN ('pending', 'in_flight')
 GROUP BY connector, status

-- name: last_errors
SELECT DISTINCT ON (connector) connector, id, status, last_error, updated_at FROM deliveries
 WHERE status IN ('pending', 'dead') AND last_error IS NOT NULL
 ORDER BY connector, updated_at DESC, id DESC

-- name: dlq_list
SELECT d.id, d.event_id, d.rule, d.connector, d.action, d.contact_key, d.attempts,
       d.last_error, d.updated_at
  FROM deliveries d
 WHERE d.status = 'dead' AND ($1::text IS NULL OR d.connector = $1)
 ORDER BY d.id
 LIMIT $2

-- name: delivery
SELECT * FROM deliveries WHERE id = $1

-- name: dlq_retry
UPDATE deliveries
   SET status = 'pending', next_attempt_at = $2, horizon_start = $2, updated_at = $2
 WHERE status = 'dead' AND ($1::bigint IS NULL OR id = $1)

-- name: retry_now
UPDATE deliveries
   SET next_attempt_at = $2, updated_at = $2
 WHERE connector = $1 AND status = 'pending' AND attempts > 0 AND next_attempt_at > $2

-- name: dlq_purge
DELETE FROM deliveries WHERE status = 'dead' AND updated_at < $1

-- name: events_of_email
-- Locked in id order, as `route` locks them: the two never deadlock.
SELECT id FROM events WHERE email = $1 ORDER BY id FOR UPDATE

-- name: delete_deliveries_of
DELETE FROM deliveries WHERE event_id = ANY($1::text[])

-- name: delete_events
DELETE FROM events WHERE id = ANY($1::text[])

-- name: forget_contact_state
-- What the connectors remember of the contact (its record ids) goes too.
DELETE FROM contact_state WHERE contact_key = $1

-- name: purge_contact_state
-- Retention: what the connectors remember of a contact goes with the last of its deliveries.
DELETE FROM contact_state c
 WHERE NOT EXISTS (SELECT 1 FROM deliveries d
                    WHERE d.connector = c.connector AND d.contact_key = c.contact_key)

-- name: delivered_events
-- Routed, old enough, and nothing of theirs waiting or dead.
SELECT e.id FROM events e
 WHERE e.received_at < $1 AND e.routed_at IS NOT NULL
   AND NOT EXISTS (
        SELECT 1 FROM deliveries d
         WHERE d.event_id = e.id AND d.status IN ('pending', 'in_flight', 'awaiting', 'dead'))
   FOR UPDATE SKIP LOCKED

-- name: seen_message
-- A row back: new (or seen longer than `keep` ago). Two instances racing on one id: the unique
-- key makes the second wait for the first and then find it fresh, so only one hears "new".
INSERT INTO webhook_messages (source, message_id, seen_at) VALUES ($1, $2, $3)
ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at
 WHERE webhook_messages.seen_at <= $3 - $4
RETURNING 1

-- name: purge_messages
DELETE FROM webhook_messages WHERE seen_at <= $1

-- name: background
-- For the store's own bookkeeping (routing, claims, outcomes), not for acknowledgements: its
-- commit does not wait for the WAL flush. A server crash may lose the last few of them, which
-- the queue already survives (a claim lost: claimed again; an outcome lost: sent again, as
-- after a crash before it was recorded; a routing lost: routed again, the event being still
-- unrouted in the same lost transaction).
SET LOCAL synchronous_commit TO OFF

-- name: analyze
-- The planner's statistics, refreshed by an instance that has routed many deliveries since it
-- started (ANALYZE_AT); a role that does not own the tables only gets a WARNING.
ANALYZE events, deliveries

-- name: rate_take
SELECT crm_bridge_rate_take($1, $2, $3, $4)
