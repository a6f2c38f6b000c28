-- A user an admin disabled (`fz-portal disable`): their client tokens were revoked then, and
-- no sign-in gives them another until they are enabled again. NULL: enabled.
ALTER TABLE users ADD COLUMN disabled_at INTEGER;
