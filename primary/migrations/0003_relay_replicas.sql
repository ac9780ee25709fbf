-- Edge replicas: each process of an edge registers (and heartbeats) here.
CREATE TABLE relay_replicas (
    edge_id                  uuid NOT NULL REFERENCES edges (id) ON DELETE CASCADE,
    replica_id               uuid NOT NULL,
    version                  text NOT NULL,
    access_url               text NOT NULL,
    wildcard_hostname        text,
    global_wildcard_hostname text,
    relay_address            text NOT NULL,
    registered_at            timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (edge_id, replica_id)
);
