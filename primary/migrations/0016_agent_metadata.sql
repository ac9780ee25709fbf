-- What an agent measures (each item a command run periodically) and the
-- values it last reported, by key.
ALTER TABLE workspace_agents ADD COLUMN metadata_specs jsonb NOT NULL DEFAULT '[]';
ALTER TABLE workspace_agents ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
