-- An edge's domains and addresses are the owner's to set; a registration
-- must match them. Edges created earlier keep what they last registered.
ALTER TABLE edges ADD COLUMN global_wildcard_hostname TEXT;
ALTER TABLE edges ADD COLUMN relay_hosts TEXT[] NOT NULL DEFAULT '{}';
UPDATE edges e SET global_wildcard_hostname = (
    SELECT r.global_wildcard_hostname FROM relay_replicas r
    WHERE r.edge_id = e.id ORDER BY r.last_heartbeat_at DESC LIMIT 1);
