-- External provisioner daemons authenticate with provisioner keys that
-- owners create and revoke (only the secret's hash is kept); a key may fix
-- the tags its daemons serve. Template versions carry the tags their jobs
-- require, so a version pushed with `region=sydney` builds only on
-- daemons that serve Sydney.
CREATE TABLE provisioner_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    secret_hash bytea NOT NULL,
    tags        jsonb NOT NULL DEFAULT '{}',
    created_by  uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Deleting a key removes its daemons: their next call is refused.
ALTER TABLE provisioner_daemons
    ADD COLUMN key_id uuid REFERENCES provisioner_keys (id) ON DELETE CASCADE;

ALTER TABLE template_versions ADD COLUMN provisioner_tags jsonb NOT NULL DEFAULT '{}';
