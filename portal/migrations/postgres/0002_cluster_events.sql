-- What one portal replica tells the others (migrations/sqlite/0013_cluster_events.sql says
-- how it is read). Rows are written under the store's write lock, so identities are taken in
-- commit order; each write also `NOTIFY fz_cluster_events`, a hint that wakes the readers.
CREATE TABLE cluster_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('client-connected', 'memberships-changed', 'gateway-connected')),
    subject TEXT NOT NULL,
    -- What more the kind needs (`memberships-changed`: the identity provider).
    detail TEXT,
    origin TEXT NOT NULL,
    time BIGINT NOT NULL
);

CREATE INDEX cluster_events_by_time ON cluster_events (time);
