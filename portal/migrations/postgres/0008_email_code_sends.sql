-- The codes sent to each address in the last few minutes, counted across replicas
-- (migrations/sqlite/0019_email_code_sends.sql says why and how).
CREATE TABLE email_code_sends (
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    email TEXT NOT NULL,
    sent_at BIGINT NOT NULL
);

CREATE INDEX email_code_sends_by_address ON email_code_sends (account, email, sent_at);
