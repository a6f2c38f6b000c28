-- The allow row of a grant, found by the grant (a reused grant's count, its connection's path)
-- instead of through `flows_by_account_time`: at thousands of grants a second, the rows of one
-- second are thousands, and each such update scanned them all (the load bench's reused grants
-- spent most of the writer's time there). Three equality columns, so that it is preferred to
-- the two of `flows_by_account_time`; only allow rows name a grant.
CREATE INDEX flows_by_grant ON flows (account, grant_id, time) WHERE grant_id IS NOT NULL;
