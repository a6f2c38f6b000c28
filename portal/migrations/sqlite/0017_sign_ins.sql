-- Sign-ins under way, kept in the store so that any replica can take the next step of one
-- another replica started (no sticky sessions in front of the replicas). A row lives from the
-- client's first page until the sign-in ends or 15 minutes pass; the sweeper deletes the
-- expired ones.
--
-- Nothing here lets a copy of the store act for a browser: the row is found by the SHA-256 of
-- the browser's cookie (`id_hash`), and what is derived from the cookie (the forms' CSRF
-- token, the OpenID Connect state, nonce and PKCE verifier) is computed from the cookie
-- again at each step, never stored. `oidc_attempt` counts the trips to a provider, so that
-- each trip's derived values differ and an older trip's answer is refused; `oidc_open` is 1
-- from sending the person to a provider until its answer is taken (once: a replay finds 0).
--
-- Bounded by the code that inserts (`Store::start_sign_in`, in a write transaction, so the
-- bounds hold across replicas): 10,000 at once and 64 per source address.
CREATE TABLE sign_ins (
    id_hash TEXT NOT NULL PRIMARY KEY CHECK (length(id_hash) = 64),
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    nonce TEXT NOT NULL,
    state TEXT NOT NULL,
    callback TEXT NOT NULL,
    device TEXT NOT NULL,
    email TEXT,
    oidc_provider TEXT,
    oidc_attempt INTEGER NOT NULL DEFAULT 0,
    oidc_open INTEGER NOT NULL DEFAULT 0 CHECK (oidc_open IN (0, 1)),
    started_at INTEGER NOT NULL,
    source TEXT
) STRICT;

CREATE INDEX sign_ins_by_source ON sign_ins (source, started_at);
