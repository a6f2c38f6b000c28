-- One-time sign-in codes sent by email. At most one waits per (account, address): a new code
-- replaces the one before, so an older code stops working the moment a newer one is sent.
-- Only the code's argon2id hash (a PHC string) is kept. Every try spends an attempt in the
-- same statement that reads the hash, so concurrent tries cannot spend more than there are;
-- the code that matches is deleted by the statement that accepts it, so it works once.
-- Rows exist only for addresses the account knows, and the sweeper deletes expired ones.
CREATE TABLE email_codes (
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    email TEXT NOT NULL CHECK (length(email) > 0 AND email = lower(email)),
    code_hash TEXT NOT NULL CHECK (length(code_hash) > 0),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    attempts_left INTEGER NOT NULL CHECK (attempts_left >= 0),
    PRIMARY KEY (account, email)
) STRICT;
