-- outbox-sync schema, version 2. Applied by `outbox-sync init` inside one transaction; every
-- statement is idempotent, so running init again changes nothing. The triggers of every mapping
-- are made from the mapping (outbox_sync/mapping.py); the built-in mapping's are below, exactly
-- as the generator writes them (a test holds them to it). A mapped table with a unique
-- constraint besides its key gets two more, made from it, that note the rows a REPLACE removes.

-- The built-in mapping's table. Created only when absent, and only when the built-in mapping is
-- in use: an application may already own it, with looser column types; outbox-sync validates
-- every value before it is indexed.
CREATE TABLE IF NOT EXISTS sequences (
    id              INTEGER PRIMARY KEY,
    element_type    TEXT    NOT NULL,
    element_id      INTEGER NOT NULL,
    sequence_number INTEGER NOT NULL,
    comment         TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- One row per change: "record `record_key` of mapping `mapping` changed". AUTOINCREMENT so an
-- id is never reused after the highest row is deleted: the daemon relies on ids growing in
-- commit order. `op` is what the trigger saw; the daemon applies the record's state at apply
-- time.
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    mapping     TEXT NOT NULL,
    record_key,                 -- no type: the key is stored exactly as the application wrote it
    op          TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    enqueued_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);

-- Records given up on, for a human. Rows are closed (resolved_at); only `errors prune` deletes
-- closed ones.
CREATE TABLE IF NOT EXISTS sync_errors (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id   INTEGER NOT NULL,
    mapping     TEXT    NOT NULL,
    record_key,
    op          TEXT    NOT NULL,
    document    TEXT,               -- the JSON document sent (or the row, when it failed validation)
    http_status INTEGER,            -- NULL when the error is ours (validation), not Typesense's
    error       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   TEXT    NOT NULL,
    resolved_at TEXT,
    resolution  TEXT,               -- 'superseded' (a later sync succeeded), 'resolved', 'retried'
    note        TEXT
);

CREATE INDEX IF NOT EXISTS sync_errors_open_records ON sync_errors (mapping, record_key)
    WHERE resolved_at IS NULL;

-- Per-minute statistics of the daemon (applied, retried, failed, Typesense latency histograms,
-- outages) for `outbox-sync report`. One small row a minute; rows past the retention are pruned.
CREATE TABLE IF NOT EXISTS sync_stats (
    bucket INTEGER PRIMARY KEY,  -- Unix time of the minute
    data   TEXT NOT NULL         -- JSON
);

CREATE TABLE IF NOT EXISTS outbox_sync_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TRIGGER IF NOT EXISTS sequences_outbox_insert AFTER INSERT ON `sequences`
BEGIN
    INSERT INTO outbox (mapping, record_key, op) SELECT 'sequences', NEW.`id`, 'upsert';
END;

-- A change of id is a delete of the old document and an upsert of the new one.
CREATE TRIGGER IF NOT EXISTS sequences_outbox_update AFTER UPDATE ON `sequences`
BEGIN
    INSERT INTO outbox (mapping, record_key, op) SELECT 'sequences', OLD.`id`, 'delete' WHERE OLD.`id` IS NOT NEW.`id` COLLATE BINARY;
    INSERT INTO outbox (mapping, record_key, op) SELECT 'sequences', NEW.`id`, 'upsert';
END;

CREATE TRIGGER IF NOT EXISTS sequences_outbox_delete AFTER DELETE ON `sequences`
BEGIN
    INSERT INTO outbox (mapping, record_key, op) SELECT 'sequences', OLD.`id`, 'delete';
END;
