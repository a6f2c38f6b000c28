-- The flow log names what a DNS resource's flow was for: a grant for `*.corp.example` opens
-- one name, and an audit must say which. NULL for IP and CIDR resources (and for flows
-- recorded before this column existed). The portal cuts a name at 253 characters, as DNS
-- does, and marks the cut with one more character.
ALTER TABLE flows ADD COLUMN name TEXT CHECK (name IS NULL OR length(name) <= 254);
