-- Tokens became `nonce ‖ fragment` (portal/src/credential.rs): the fragment is MAC'd with the
-- portal's token key, and the store keeps SHA-256 over the nonce, the fragment and this
-- per-token random salt (hex) in `secret_hash`. A token of the old form (`fzt_` and a
-- secret, hashed without salt) cannot be presented any more: each is revoked here, so
-- `token list` says what happened to it, and README.md tells admins to make new ones.
ALTER TABLE tokens ADD COLUMN salt TEXT CHECK (salt IS NULL OR length(salt) = 32);
UPDATE tokens SET revoked_at = coalesce(revoked_at, unixepoch()) WHERE salt IS NULL;

-- Who made the token: an admin (`fz-portal token create`: gateways, and client tokens for
-- service accounts) or a person's own sign-in (`sign-in`), which alone proves the identity.
ALTER TABLE tokens ADD COLUMN made_by TEXT NOT NULL DEFAULT 'admin' CHECK (made_by IN ('admin', 'sign-in'));
