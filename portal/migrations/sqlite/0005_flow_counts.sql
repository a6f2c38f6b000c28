-- The flow log stays bounded (issue 14): one row can stand for many occurrences, and rows
-- carry the grant they made.
--
-- `count` occurrences of the flow from `time` to `last_time`. Identical denials (same client,
-- resource, name, reason, rule and policy) within a minute of the first are one row: the
-- portal adds to its count instead of writing another. A grant handed out again (a request a
-- grant in force already covers) counts on the allow row that made it. Rows written before
-- this migration are one occurrence each.
ALTER TABLE flows ADD COLUMN count INTEGER NOT NULL DEFAULT 1 CHECK (count >= 1);
ALTER TABLE flows ADD COLUMN last_time INTEGER NOT NULL DEFAULT 0;
UPDATE flows SET last_time = time;

-- The grant an allow row made (NULL for denials and for rows written before this migration):
-- what a reused grant's occurrences are counted on, and what an audit follows from a flow to
-- a grant. Found through `flows_by_account_time` (a grant's row is at its issue time), so no
-- index of its own.
ALTER TABLE flows ADD COLUMN grant_id TEXT;
