-- The codes sent to each address in the last few minutes, counted in the store so that the
-- limit (three in five minutes, whether or not the account knows the address) holds across
-- replicas. Rows of addresses the account does not know are kept alike: the count must not
-- tell them apart. `Store::count_code_send` deletes an address's rows older than the window as
-- it counts, and refuses once the table holds its most; the sweeper deletes old rows of every
-- address each minute.
CREATE TABLE email_code_sends (
    account TEXT NOT NULL REFERENCES accounts (slug) ON DELETE CASCADE,
    email TEXT NOT NULL,
    sent_at INTEGER NOT NULL
) STRICT;

CREATE INDEX email_code_sends_by_address ON email_code_sends (account, email, sent_at);
