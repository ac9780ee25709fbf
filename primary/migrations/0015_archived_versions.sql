-- Owners archive template versions nobody should build any more: an
-- archived version cannot be promoted or chosen by an update; workspaces
-- already on it keep starting and stopping.
ALTER TABLE template_versions ADD COLUMN archived boolean NOT NULL DEFAULT false;
