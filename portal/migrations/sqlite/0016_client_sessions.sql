-- A client's session (who asked, with which groups, from where, through which key: what a
-- grant is decided again against) stored once, not inside every grant's `detail`. A grant
-- names it by `session_id`, the hash of its `detail`, so that the sessions of a connection's
-- grants are one row however many grants it has, and writing it again is a no-op.
--
-- Each batch that inserts a grant inserts its session first (`ON CONFLICT DO NOTHING`); the
-- sweeper deletes the sessions no grant names any more, in a write transaction of its own, so
-- a grant and its session are written together or the session is written again. There is no
-- foreign key from `grants`: it would need an index on `grants (account, session_id)` to
-- delete a session, where `grants_by_client` serves the sweep. Grants stored before this
-- migration keep their session inside `detail`, and `session_id` stays NULL for them.
CREATE TABLE client_sessions (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (account, id),
    FOREIGN KEY (account, client_id) REFERENCES clients (account, id) ON DELETE CASCADE
) STRICT;

ALTER TABLE grants ADD COLUMN session_id TEXT;
