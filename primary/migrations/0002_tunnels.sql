-- Agents, tunnels and apps: the signing keys for attach tickets and app
-- tokens, the mesh CA relays' certificates chain to, script logs, port
-- shares and where each agent is attached.

CREATE TABLE signing_keys (
    kid         text PRIMARY KEY,
    pkcs8       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);

-- One row: the mesh certificate authority.
CREATE TABLE mesh_ca (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    cert_pem    text NOT NULL,
    key_pem     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE workspace_agents
    ADD COLUMN logs_length     integer NOT NULL DEFAULT 0,
    ADD COLUMN logs_overflowed boolean NOT NULL DEFAULT false,
    ADD COLUMN started_at      timestamptz,
    ADD COLUMN ready_at        timestamptz;

CREATE TABLE workspace_agent_logs (
    id          bigserial PRIMARY KEY,
    agent_id    uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    source      text NOT NULL,
    level       text NOT NULL DEFAULT 'info',
    created_at  timestamptz NOT NULL DEFAULT now(),
    output      text NOT NULL
);
CREATE INDEX workspace_agent_logs_agent_idx ON workspace_agent_logs (agent_id, id);

CREATE TABLE port_shares (
    workspace_id  uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    agent_name    text NOT NULL,
    port          integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    sharing_level text NOT NULL CHECK (sharing_level IN ('owner', 'authenticated', 'public')),
    PRIMARY KEY (workspace_id, agent_name, port)
);

CREATE TABLE agent_attachments (
    agent_id    uuid PRIMARY KEY REFERENCES workspace_agents (id) ON DELETE CASCADE,
    relay       text NOT NULL,
    attached_at timestamptz NOT NULL DEFAULT now()
);

-- Symmetric keys (AES-256-GCM) that seal the one-time application_connect
-- key handed through the browser from the auth redirect to an app domain.
CREATE TABLE app_encryption_keys (
    kid         text PRIMARY KEY,
    key         bytea NOT NULL CHECK (length(key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
