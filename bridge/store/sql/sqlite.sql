-- name: schema
CREATE TABLE IF NOT EXISTS events (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    type            TEXT NOT NULL,
    email           TEXT,
    received_at     REAL NOT NULL,
    body            TEXT NOT NULL,
    notes           TEXT NOT NULL DEFAULT '[]'
);
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
    lease_until     REAL,
    last_error      TEXT,
    result          TEXT,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (connector, status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_contact ON deliveries (connector, contact_key, status);
CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (event_id);

-- name: insert_event
INSERT INTO events (id, source, idempotency_key, type, email, received_at, body, notes)
VALUES (:id, :source, :idempotency_key, :type, :email, :received_at, :body, :notes)
ON CONFLICT (idempotency_key) DO NOTHING

-- name: event_by_key
SELECT id FROM events WHERE idempotency_key = :idempotency_key

-- name: insert_delivery
INSERT INTO deliveries (event_id, rule, connector, action, contact_key, operation,
                        created_at, next_attempt_at, updated_at)
VALUES (:event_id, :rule, :connector, :action, :contact_key, :operation, :now, :now, :now)

-- name: release_claims
-- One process owns a SQLite store (a lock file sees to it), so whatever was in flight when it
-- stopped was interrupted: send it again.
UPDATE deliveries SET status = 'pending', lease_until = NULL WHERE status = 'in_flight'

-- name: claim
UPDATE deliveries
   SET status = 'in_flight', attempts = attempts + 1, lease_until = :lease_until, updated_at = :now
 WHERE id IN (
    SELECT d.id FROM deliveries d
     WHERE d.connector = :connector
       AND (d.status = 'pending' AND d.next_attempt_at <= :now
            OR d.status = 'in_flight' AND d.lease_until < :now)
       AND NOT EXISTS (
            SELECT 1 FROM deliveries e
             WHERE e.connector = d.connector AND e.contact_key = d.contact_key
               AND e.status IN ('pending', 'in_flight') AND e.id < d.id)
     ORDER BY d.next_attempt_at, d.id
     LIMIT :limit)
RETURNING *

-- name: complete
UPDATE deliveries
   SET status = :status, result = :result, last_error = NULL, lease_until = NULL, updated_at = :now
 WHERE id = :id

-- name: retry_later
UPDATE deliveries
   SET status = 'pending', next_attempt_at = :next_attempt_at, last_error = :error,
       lease_until = NULL, updated_at = :now
 WHERE id = :id

-- name: dead_letter
UPDATE deliveries
   SET status = 'dead', last_error = :error, lease_until = NULL, updated_at = :now
 WHERE id = :id

-- name: event
SELECT * FROM events WHERE id = :id

-- name: deliveries_of_event
SELECT * FROM deliveries WHERE event_id = :id ORDER BY id

-- name: counts
SELECT connector, status, count(*) AS n FROM deliveries GROUP BY connector, status
