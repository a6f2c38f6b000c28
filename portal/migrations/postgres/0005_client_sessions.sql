-- A client's session stored once, not inside every grant's `detail`
-- (migrations/sqlite/0016_client_sessions.sql says why and how).
CREATE TABLE client_sessions (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (account, id),
    FOREIGN KEY (account, client_id) REFERENCES clients (account, id) ON DELETE CASCADE
);

ALTER TABLE grants ADD COLUMN session_id TEXT;
