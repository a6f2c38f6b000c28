-- A verified mark belongs to a device, and WireGuard knows a device by its key alone: the mark
-- records the key the client had when an admin gave it (`verified_key`), and a client is
-- verified only while it holds that key. One client row is kept per token, so without this a
-- copied token registered from another machine, with that machine's own key, would have kept
-- the original device's mark; now it starts unverified, and the original device coming back
-- with its original key is verified again.
--
-- Marks given before this migration are taken to be for the key the client has now.
ALTER TABLE clients ADD COLUMN verified_key TEXT CHECK (verified_key IS NULL OR length(verified_key) > 0);
UPDATE clients SET verified_key = public_key WHERE verified = 1;

-- `verified` stays the one column every reader asks, now derived from the key, so that no
-- query can read a mark that belongs to another key.
ALTER TABLE clients DROP COLUMN verified;
ALTER TABLE clients ADD COLUMN verified INTEGER NOT NULL
    GENERATED ALWAYS AS (verified_key IS NOT NULL AND verified_key = public_key) VIRTUAL;
