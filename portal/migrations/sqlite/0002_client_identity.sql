-- Who a client token speaks for, and where each client sits in the tunnel network.
--
-- A client token is minted for one user as one identity provider signed them in, so a
-- connection request knows the user (their groups, static and synced) and the `provider`
-- context without asking again. Gateway tokens have neither.
ALTER TABLE tokens ADD COLUMN user_email TEXT CHECK (user_email IS NULL OR user_email = lower(user_email));
-- NULL: the token was minted by an admin, not through a sign-in.
ALTER TABLE tokens ADD COLUMN provider TEXT CHECK (provider IS NULL OR length(provider) > 0);

-- The client's place in the account's tunnel network: its tunnel addresses are derived from
-- it (100.64.0.0/11 and fd00:2021:1111::/107, offset by the index), so they are stable across
-- reconnects and never shared within an account.
ALTER TABLE clients ADD COLUMN tunnel_index INTEGER CHECK (tunnel_index IS NULL OR tunnel_index > 0);
CREATE UNIQUE INDEX clients_by_tunnel_index ON clients (account, tunnel_index);

-- What the portal needs to decide a grant again after a restart and to send it again to a
-- gateway that reconnects: the signed grant and the session it was decided for, as JSON the
-- store does not read. NULL for grants written before this column existed.
-- (Not checked with json_valid: the portal writes it, and the check cost a percent of a busy
-- portal's CPU for nothing.)
ALTER TABLE grants ADD COLUMN detail TEXT;

-- `grants_by_expiry` serves every query by expiry; a second index per account only made every
-- grant insert update one more B-tree.
DROP INDEX grants_by_account_expiry;

-- Every change of a verified mark takes the next number, so a running portal can ask which
-- devices changed since it last looked, however fast an admin flips a mark.
ALTER TABLE clients ADD COLUMN verified_seq INTEGER NOT NULL DEFAULT 0;
