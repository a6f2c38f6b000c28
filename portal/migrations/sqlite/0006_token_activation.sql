-- A token is usable only once it is activated. `fz-portal token create` stores a token
-- inactive, prints its secret, and only then activates it: a command killed before the secret
-- was shown leaves a token nobody can use (`token list` shows it `inactive`), never a live one
-- that nobody holds. NULL: never activated.
ALTER TABLE tokens ADD COLUMN activated_at INTEGER;
-- Tokens made before this column existed were live from their creation, and stay so.
UPDATE tokens SET activated_at = created_at;
