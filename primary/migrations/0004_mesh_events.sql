-- The relay mesh: where each agent is attached (address and TLS name of its
-- home relay, so any relay can reach it), and recent revocations, replayed
-- to edges that (re)connect to the event stream.
ALTER TABLE agent_attachments ADD COLUMN relay_address text NOT NULL DEFAULT '',
                              ADD COLUMN relay_server_name text NOT NULL DEFAULT '';

CREATE TABLE revocations (
    id      bigserial PRIMARY KEY,
    subject jsonb NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX revocations_at ON revocations (at);
