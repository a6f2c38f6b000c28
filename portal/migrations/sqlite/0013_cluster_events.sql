-- What one portal replica tells the others, through the database they share (on SQLite, the
-- portal and the admin commands are the only writers, and the table is read the same way).
-- Each replica reads the rows after the last it read, in `id` order: rows are written only in
-- write transactions, which take turns, so ids grow in commit order and a reader that saw
-- `id` has seen every row before it. Delivery is at least once; what a row asks is idempotent.
--
-- `kind`:
--   `client-connected`: client `subject` said hello to replica `origin`; any other replica
--   holding an older connection of it closes that one (one live session per device).
--   `memberships-changed`: identity provider `detail` named user `subject`'s groups anew (a
--   sign-in); every other replica decides that user's grants again.
--   `gateway-connected`: gateway `subject` said hello to replica `origin`; any other replica
--   still holding an older connection of it drops that one.
-- Rows older than a day are deleted: a replica that was away longer starts from the newest.
CREATE TABLE cluster_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('client-connected', 'memberships-changed', 'gateway-connected')),
    subject TEXT NOT NULL,
    -- What more the kind needs (`memberships-changed`: the identity provider).
    detail TEXT,
    origin TEXT NOT NULL,
    time INTEGER NOT NULL
) STRICT;

CREATE INDEX cluster_events_by_time ON cluster_events (time);
