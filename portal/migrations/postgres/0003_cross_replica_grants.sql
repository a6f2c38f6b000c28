-- Grants across replicas (migrations/sqlite/0014_cross_replica_grants.sql says what the new
-- event kinds and the gateway's replica mean).
ALTER TABLE cluster_events DROP CONSTRAINT cluster_events_kind_check;
ALTER TABLE cluster_events ADD CONSTRAINT cluster_events_kind_check CHECK (kind IN (
    'client-connected', 'memberships-changed', 'gateway-connected', 'grant-offered',
    'grant-answered', 'grants-withdrawn', 'candidates'));

ALTER TABLE gateways ADD COLUMN replica TEXT;
