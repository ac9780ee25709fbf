-- A Terraform template version is imported by a provisioner job that plans
-- it and records its parameters; builds record the parameter values they
-- ran with (the next build starts from them).
ALTER TABLE template_versions ADD COLUMN import_job_id uuid REFERENCES provisioner_jobs (id);
ALTER TABLE template_versions ADD COLUMN parameters jsonb NOT NULL DEFAULT '[]';
ALTER TABLE workspace_builds ADD COLUMN parameters jsonb NOT NULL DEFAULT '{}';
