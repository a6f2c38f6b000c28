-- A new kind of cluster event, `gateway-down` (migrations/sqlite/0018_gateway_down_events.sql
-- says what it means).
ALTER TABLE cluster_events DROP CONSTRAINT cluster_events_kind_check;
ALTER TABLE cluster_events ADD CONSTRAINT cluster_events_kind_check CHECK (kind IN (
    'client-connected', 'memberships-changed', 'gateway-connected', 'grant-offered',
    'grant-answered', 'grants-withdrawn', 'candidates', 'gateway-down'));
