-- The dashboard's live view: whenever a workspace, its builds, its agents'
-- state or their attachments change, NOTIFY devmesh_workspaces with the
-- workspace's id (every primary replica LISTENs and tells its dashboards).
CREATE FUNCTION devmesh_notify_workspace() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ws uuid;
BEGIN
    IF TG_TABLE_NAME = 'workspaces' THEN
        ws := NEW.id;
    ELSIF TG_TABLE_NAME = 'agent_attachments' THEN
        IF TG_OP = 'DELETE' THEN
            SELECT workspace_id INTO ws FROM workspace_agents WHERE id = OLD.agent_id;
        ELSE
            SELECT workspace_id INTO ws FROM workspace_agents WHERE id = NEW.agent_id;
        END IF;
    ELSE
        ws := NEW.workspace_id;
    END IF;
    IF ws IS NOT NULL THEN
        PERFORM pg_notify('devmesh_workspaces', ws::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER workspaces_notify AFTER INSERT OR UPDATE ON workspaces
    FOR EACH ROW EXECUTE FUNCTION devmesh_notify_workspace();
CREATE TRIGGER workspace_builds_notify AFTER INSERT OR UPDATE ON workspace_builds
    FOR EACH ROW EXECUTE FUNCTION devmesh_notify_workspace();
-- Not on every heartbeat or metadata sample: only what the page shows.
CREATE TRIGGER workspace_agents_notify
    AFTER INSERT OR UPDATE OF lifecycle_state, first_connected_at, disconnected_at ON workspace_agents
    FOR EACH ROW EXECUTE FUNCTION devmesh_notify_workspace();
CREATE TRIGGER agent_attachments_notify AFTER INSERT OR UPDATE OR DELETE ON agent_attachments
    FOR EACH ROW EXECUTE FUNCTION devmesh_notify_workspace();
