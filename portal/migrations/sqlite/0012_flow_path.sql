-- How the connection a grant opened travels (NAT traversal): `direct` from the client's socket
-- to the gateway's, or `relayed` through the TURN relay at `relay` (an IP address). The
-- gateway says each time ICE picks a path for a client, and the portal writes it on the allow
-- rows of the grants in force between them; NULL until the gateway says, and for denials.
ALTER TABLE flows ADD COLUMN path TEXT CHECK (path IS NULL OR path IN ('direct', 'relayed'));
ALTER TABLE flows ADD COLUMN relay TEXT CHECK (relay IS NULL OR length(relay) <= 45);
