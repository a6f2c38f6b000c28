-- Grants across replicas: a replica that decides a grant for a gateway connected to another
-- replica offers it through `cluster_events`, and the gateway's replica answers the same way.
--
-- New `kind`s (migrations/sqlite/0013_cluster_events.sql says how the table is read):
--   `grant-offered`: a grant (`detail`: the signed grant, the session it was made for and the
--   replica the store named as the gateway's) for gateway `subject`; the replica holding the
--   gateway's connection sends it there and answers with `grant-answered`.
--   `grant-answered`: the gateway's answer to grant `subject` (`detail`: the gateway and the
--   outcome), for the replica waiting on it.
--   `grants-withdrawn`: grants taken out of force (`detail`: each one's id, client, gateway and
--   why), for the replicas holding the connections the writer does not: they tell those agents.
--   `candidates`: ICE candidates (`detail`) for agent `subject`, from its peer on another replica.
-- SQLite changes a CHECK only by making the table again; ids are kept.
CREATE TABLE cluster_events_with_grants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('client-connected', 'memberships-changed',
        'gateway-connected', 'grant-offered', 'grant-answered', 'grants-withdrawn', 'candidates')),
    subject TEXT NOT NULL,
    detail TEXT,
    origin TEXT NOT NULL,
    time INTEGER NOT NULL
) STRICT;

INSERT INTO cluster_events_with_grants (id, account, kind, subject, detail, origin, time)
    SELECT id, account, kind, subject, detail, origin, time FROM cluster_events;
DROP TABLE cluster_events;
ALTER TABLE cluster_events_with_grants RENAME TO cluster_events;
CREATE INDEX cluster_events_by_time ON cluster_events (time);

-- The replica whose connection a connected gateway is on (`NULL` for one never connected
-- since this column came): where a grant for it is offered, and the only replica that may
-- mark it disconnected.
ALTER TABLE gateways ADD COLUMN replica TEXT;
