-- When each client last said hello (Unix seconds), for `fz-portal clients`: an admin choosing
-- which device to `verify` or whose token to revoke needs to know which are in use. NULL: not
-- since this column exists.
ALTER TABLE clients ADD COLUMN last_connected_at INTEGER;
