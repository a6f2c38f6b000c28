-- The allow row of a grant, found by the grant (migrations/sqlite/0015_flows_by_grant.sql).
CREATE INDEX flows_by_grant ON flows (account, grant_id, time) WHERE grant_id IS NOT NULL;
