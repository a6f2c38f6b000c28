-- Sign-ins under way, kept in the store so that any replica can take the next step of one
-- another replica started (migrations/sqlite/0017_sign_ins.sql says what each column is and
-- why nothing in it lets a copy of the store act for a browser).
CREATE TABLE sign_ins (
    id_hash TEXT NOT NULL PRIMARY KEY CHECK (length(id_hash) = 64),
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    nonce TEXT NOT NULL,
    state TEXT NOT NULL,
    callback TEXT NOT NULL,
    device TEXT NOT NULL,
    email TEXT,
    oidc_provider TEXT,
    oidc_attempt BIGINT NOT NULL DEFAULT 0,
    oidc_open BIGINT NOT NULL DEFAULT 0 CHECK (oidc_open IN (0, 1)),
    started_at BIGINT NOT NULL,
    source TEXT
);

CREATE INDEX sign_ins_by_source ON sign_ins (source, started_at);
