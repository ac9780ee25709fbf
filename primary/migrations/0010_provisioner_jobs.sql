-- The provisioner job queue: template imports and workspace builds that
-- provisioner daemons (built into the primary, or external) claim with
-- FOR UPDATE SKIP LOCKED when the job's tags are a subset of theirs.
CREATE TABLE provisioner_daemons (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    tags         jsonb NOT NULL DEFAULT '{}',
    version      text NOT NULL,
    built_in     boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE provisioner_jobs (
    id           uuid PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('import', 'build')),
    status       text NOT NULL CHECK (status IN (
        'pending', 'running', 'succeeded', 'failed', 'canceling', 'canceled')),
    tags         jsonb NOT NULL DEFAULT '{}',
    input        jsonb NOT NULL,
    daemon_id    uuid REFERENCES provisioner_daemons (id) ON DELETE SET NULL,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    heartbeat_at timestamptz,
    completed_at timestamptz
);
CREATE INDEX provisioner_jobs_pending_idx ON provisioner_jobs (created_at) WHERE status = 'pending';
CREATE INDEX provisioner_jobs_active_idx ON provisioner_jobs (heartbeat_at)
    WHERE status IN ('running', 'canceling');

CREATE TABLE provisioner_job_logs (
    id         bigserial PRIMARY KEY,
    job_id     uuid NOT NULL REFERENCES provisioner_jobs (id) ON DELETE CASCADE,
    stream     text NOT NULL CHECK (stream IN ('provisioner', 'stdout', 'stderr')),
    line       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provisioner_job_logs_job_idx ON provisioner_job_logs (job_id, id);
