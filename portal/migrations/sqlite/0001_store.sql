-- The portal's state: accounts and everything that belongs to one.
--
-- INVARIANT: every row belongs to an account, and every reference from one row to another
-- carries the account too (composite foreign keys onto `UNIQUE (account, id)`), so the schema
-- itself refuses a client registered with another account's token or a grant that joins a
-- client and a gateway of different accounts.
--
-- Times are Unix seconds (INTEGER). Tables are STRICT so a wrong type is an error, not a
-- silent conversion.

CREATE TABLE accounts (
    slug TEXT NOT NULL PRIMARY KEY CHECK (length(slug) > 0)
) STRICT;

-- People known to an account, by email (stored lowercase).
CREATE TABLE users (
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    email TEXT NOT NULL CHECK (length(email) > 0 AND email = lower(email)),
    PRIMARY KEY (account, email)
) STRICT;

-- Group memberships synced from identity providers: replaced per (user, provider).
CREATE TABLE group_memberships (
    account TEXT NOT NULL,
    email TEXT NOT NULL,
    provider TEXT NOT NULL CHECK (length(provider) > 0),
    group_name TEXT NOT NULL CHECK (length(group_name) > 0),
    PRIMARY KEY (account, email, provider, group_name),
    FOREIGN KEY (account, email) REFERENCES users (account, email) ON DELETE CASCADE
) STRICT;

-- Bearer tokens. Only the SHA-256 of the secret is kept (lowercase hex).
CREATE TABLE tokens (
    id TEXT NOT NULL PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('client', 'gateway')),
    name TEXT NOT NULL,
    -- The site a gateway token is bound to; NULL exactly for client tokens.
    site TEXT,
    secret_hash TEXT NOT NULL UNIQUE CHECK (length(secret_hash) = 64),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    CHECK ((kind = 'gateway') = (site IS NOT NULL)),
    UNIQUE (account, id)
) STRICT;

-- Client devices: one per client token.
CREATE TABLE clients (
    id TEXT NOT NULL PRIMARY KEY,
    account TEXT NOT NULL,
    token_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    -- WireGuard public key, base64 as `wg` writes it.
    public_key TEXT NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0 CHECK (verified IN (0, 1)),
    created_at INTEGER NOT NULL,
    UNIQUE (account, id),
    -- WireGuard tells peers apart by key alone.
    UNIQUE (account, public_key),
    FOREIGN KEY (account, token_id) REFERENCES tokens (account, id) ON DELETE CASCADE
) STRICT;

-- Gateways: one per gateway token, in the token's site.
CREATE TABLE gateways (
    id TEXT NOT NULL PRIMARY KEY,
    account TEXT NOT NULL,
    site TEXT NOT NULL,
    token_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    -- JSON array of socket addresses the gateway reported.
    endpoints TEXT NOT NULL CHECK (json_valid(endpoints) AND json_type(endpoints) = 'array'),
    created_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    connected INTEGER NOT NULL DEFAULT 0 CHECK (connected IN (0, 1)),
    UNIQUE (account, id),
    UNIQUE (account, public_key),
    FOREIGN KEY (account, token_id) REFERENCES tokens (account, id) ON DELETE CASCADE
) STRICT;

CREATE INDEX gateways_by_account_site ON gateways (account, site);

-- Grants the portal has signed and not yet withdrawn.
CREATE TABLE grants (
    id TEXT NOT NULL PRIMARY KEY,
    account TEXT NOT NULL,
    client_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    bundle_hash TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL CHECK (expires_at >= issued_at),
    FOREIGN KEY (account, client_id) REFERENCES clients (account, id) ON DELETE CASCADE,
    FOREIGN KEY (account, gateway_id) REFERENCES gateways (account, id) ON DELETE CASCADE
) STRICT;

CREATE INDEX grants_by_account_expiry ON grants (account, expires_at);
CREATE INDEX grants_by_expiry ON grants (expires_at);
CREATE INDEX grants_by_client ON grants (account, client_id);
CREATE INDEX grants_by_gateway ON grants (account, gateway_id);

-- The flow log: every allow and deny. Client and resource ids are kept as text, not foreign
-- keys, so the log outlives what it names.
CREATE TABLE flows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    time INTEGER NOT NULL,
    user_email TEXT NOT NULL,
    client_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('allow', 'deny')),
    rule_id TEXT,
    bundle_hash TEXT NOT NULL,
    reason TEXT NOT NULL
) STRICT;

CREATE INDEX flows_by_account_time ON flows (account, time, id);
