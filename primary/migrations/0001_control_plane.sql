-- The control plane: users and keys, templates, workspaces with their
-- builds, agents and apps, edges, and the audit log.

CREATE TABLE users (
    id              uuid PRIMARY KEY,
    email           text NOT NULL,
    username        text NOT NULL,
    hashed_password text NOT NULL,
    roles           text[] NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    deleted         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE NOT deleted;
CREATE UNIQUE INDEX users_username_key ON users (username) WHERE NOT deleted;

CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    hashed_secret bytea NOT NULL,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL DEFAULT '',
    login_type    text NOT NULL CHECK (login_type IN ('password', 'token')),
    scope         text NOT NULL CHECK (scope IN ('all', 'application_connect')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    last_used_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);

CREATE TABLE templates (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    description       text NOT NULL DEFAULT '',
    created_by        uuid NOT NULL REFERENCES users (id),
    active_version_id uuid,
    deleted           boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX templates_name_key ON templates (name) WHERE NOT deleted;

CREATE TABLE template_versions (
    id          uuid PRIMARY KEY,
    template_id uuid NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    number      integer NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('external')),
    definition  jsonb NOT NULL,
    message     text NOT NULL DEFAULT '',
    created_by  uuid NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (template_id, number)
);
ALTER TABLE templates
    ADD CONSTRAINT templates_active_version_fk
    FOREIGN KEY (active_version_id) REFERENCES template_versions (id) DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE workspaces (
    id          uuid PRIMARY KEY,
    owner_id    uuid NOT NULL REFERENCES users (id),
    template_id uuid NOT NULL REFERENCES templates (id),
    name        text NOT NULL,
    deleted     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX workspaces_owner_name_key ON workspaces (owner_id, name) WHERE NOT deleted;

CREATE TABLE workspace_builds (
    id                  uuid PRIMARY KEY,
    workspace_id        uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    template_version_id uuid NOT NULL REFERENCES template_versions (id),
    build_number        integer NOT NULL,
    transition          text NOT NULL CHECK (transition IN ('start', 'stop', 'delete')),
    status              text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled')),
    initiator_id        uuid NOT NULL REFERENCES users (id),
    created_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,
    UNIQUE (workspace_id, build_number)
);

CREATE TABLE workspace_agents (
    id                 uuid PRIMARY KEY,
    build_id           uuid NOT NULL REFERENCES workspace_builds (id) ON DELETE CASCADE,
    workspace_id       uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name               text NOT NULL,
    token_hash         bytea NOT NULL UNIQUE,
    directory          text,
    env                jsonb NOT NULL DEFAULT '{}',
    scripts            jsonb NOT NULL DEFAULT '[]',
    lifecycle_state    text NOT NULL DEFAULT 'created' CHECK (lifecycle_state IN (
        'created', 'starting', 'ready', 'start_error', 'start_timeout',
        'shutting_down', 'off', 'shutdown_error', 'shutdown_timeout')),
    first_connected_at timestamptz,
    last_connected_at  timestamptz,
    disconnected_at    timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (build_id, name)
);
CREATE INDEX workspace_agents_workspace_id_idx ON workspace_agents (workspace_id);

CREATE TABLE workspace_apps (
    id                    uuid PRIMARY KEY,
    agent_id              uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    slug                  text NOT NULL,
    display_name          text NOT NULL,
    url                   text NOT NULL,
    subdomain             boolean NOT NULL,
    sharing_level         text NOT NULL CHECK (sharing_level IN ('owner', 'authenticated', 'public')),
    healthcheck_url       text,
    healthcheck_interval  integer,
    healthcheck_threshold integer,
    health                text NOT NULL CHECK (health IN ('disabled', 'initializing', 'healthy', 'unhealthy')),
    UNIQUE (agent_id, slug)
);

CREATE TABLE edges (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    display_name      text NOT NULL,
    token_hash        bytea NOT NULL,
    access_url        text,
    wildcard_hostname text,
    relay_address     text,
    last_heartbeat_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX edges_name_key ON edges (name);

CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    time          timestamptz NOT NULL DEFAULT now(),
    user_id       uuid,
    username      text,
    ip            text,
    action        text NOT NULL,
    resource_type text NOT NULL,
    resource_id   text NOT NULL DEFAULT '',
    resource_name text NOT NULL DEFAULT '',
    details       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_time_idx ON audit_log (time DESC);
