-- When the ticket of an agent's latest accepted attachment was issued: a
-- relay's claim that the agent is attached there counts only with a ticket
-- at least this recent, so an edge cannot replay an old one to pull the
-- agent's traffic back.
ALTER TABLE workspace_agents ADD COLUMN attach_issued_at_ms BIGINT NOT NULL DEFAULT 0;
