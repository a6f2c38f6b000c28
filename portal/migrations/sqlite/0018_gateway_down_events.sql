-- A new `kind` of cluster event (migrations/sqlite/0013_cluster_events.sql says how the table
-- is read):
--   `gateway-down`: gateway `subject`'s connection to replica `origin` ended, written in the
--   transaction that marks it disconnected; the replicas whose clients hold its grants tell
--   them, unless the gateway is connected again when they read it.
-- SQLite changes a CHECK only by making the table again; ids are kept.
CREATE TABLE cluster_events_with_gateway_down (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('client-connected', 'memberships-changed',
        'gateway-connected', 'grant-offered', 'grant-answered', 'grants-withdrawn', 'candidates',
        'gateway-down')),
    subject TEXT NOT NULL,
    detail TEXT,
    origin TEXT NOT NULL,
    time INTEGER NOT NULL
) STRICT;

INSERT INTO cluster_events_with_gateway_down (id, account, kind, subject, detail, origin, time)
    SELECT id, account, kind, subject, detail, origin, time FROM cluster_events;
DROP TABLE cluster_events;
ALTER TABLE cluster_events_with_gateway_down RENAME TO cluster_events;
CREATE INDEX cluster_events_by_time ON cluster_events (time);
