-- Terraform templates: a version holds the template directory (a tar
-- archive); builds of it are provisioner jobs; each workspace keeps its
-- Terraform state, saved after every run (failed ones too).
ALTER TABLE template_versions DROP CONSTRAINT template_versions_kind_check;
ALTER TABLE template_versions ADD CONSTRAINT template_versions_kind_check
    CHECK (kind IN ('external', 'terraform'));
ALTER TABLE template_versions ADD COLUMN archive bytea;
ALTER TABLE template_versions ADD CONSTRAINT template_versions_archive_check
    CHECK ((kind = 'terraform') = (archive IS NOT NULL));

ALTER TABLE workspace_builds ADD COLUMN job_id uuid REFERENCES provisioner_jobs (id);

CREATE TABLE workspace_terraform_states (
    workspace_id uuid PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    state        bytea NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
