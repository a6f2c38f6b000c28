-- People as OpenID Connect providers know them. A provider's stable key for a person is
-- (issuer, subject); the policy knows people by address. One row binds the two, per account:
-- the first subject to sign in with a verified address holds it, another subject of the same
-- issuer claiming it is refused (an address a provider let someone else take is no proof), and
-- the same subject coming back with a new verified address moves the binding.
CREATE TABLE identities (
    account TEXT NOT NULL,
    provider TEXT NOT NULL CHECK (length(provider) > 0),
    issuer TEXT NOT NULL CHECK (length(issuer) > 0),
    subject TEXT NOT NULL CHECK (length(subject) > 0),
    email TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (account, issuer, subject),
    UNIQUE (account, issuer, email),
    FOREIGN KEY (account, email) REFERENCES users (account, email) ON DELETE CASCADE
) STRICT;

-- Who a token made at an OpenID Connect sign-in speaks for, as the provider names them; NULL
-- for tokens made otherwise (an email code, an admin).
ALTER TABLE tokens ADD COLUMN issuer TEXT;
ALTER TABLE tokens ADD COLUMN subject TEXT;
