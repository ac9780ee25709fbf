-- What a template declares and what a workspace has: an import plans a
-- version as a start and as a stop build, and a resource still planned when
-- stopped is persistent; every successful build records the resources its
-- state holds (with the agents they run and their metadata).
ALTER TABLE template_versions ADD COLUMN resources jsonb NOT NULL DEFAULT '[]';
ALTER TABLE workspace_builds ADD COLUMN resources jsonb NOT NULL DEFAULT '[]';
