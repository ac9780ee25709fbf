-- Mesh certificates issued to an edge before this (unix seconds) are
-- refused by every relay: set when the edge's token is regenerated.
ALTER TABLE edges ADD COLUMN certs_valid_from BIGINT NOT NULL DEFAULT 0;
