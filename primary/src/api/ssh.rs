//! Shell sessions (SSH today) to agents, through the primary or an edge.
//!
//! `POST /api/v2/workspaceagents/{id}/ssh` carries one SSH connection in an
//! HTTP request whose body is what the client sends and whose response body
//! is what the agent answers — both streamed, over HTTPS, so it works where
//! UDP does not. The region (the primary here, an edge through
//! `edges/me/shell-access`) opens an `Ssh` tunnel stream to the agent (down
//! its tunnel, or across the mesh to the relay it is attached to) and
//! splices the two ([`devmesh_proxy::shell`]).
//!
//! Only the workspace's owner may, or an owner-role user (audited as acting
//! on someone else's workspace). A session cookie cannot: the key must come
//! in a header, so another site cannot ride a signed-in browser into a
//! shell. Every session is audited twice: `ssh` when it begins, with the
//! region it went through, and `ssh_end` when it ends, with its bytes.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use devmesh_proxy::shell::{Holder, Session};
use devmesh_shared::api::{
    EdgeShellAccess, EdgeShellAccessRequest, EdgeShellEnded, KeyScope, ProbeQuery, RevokedSubject,
    ShellKind, TerminalQuery, UdpQuery,
};
use devmesh_shared::signing::{GrantedStream, StreamGrant};
use devmesh_shared::tunnel::StreamHeader;
use uuid::Uuid;

use super::edges::EdgeAuth;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, Authed, ClientIp, KeyAuthed, program_key};
use super::{AppState, Audit};
use crate::auth::Principal;

/// How long an edge's stream grant lasts: it only has to reach the agent's
/// home relay once.
const GRANT_SECS: i64 = 60;

/// An agent a shell may be opened to, and whose it is.
struct ShellTarget {
    agent: Uuid,
    workspace: Uuid,
    /// `owner/workspace`.
    label: String,
    agent_name: String,
    /// Whether the caller owns the workspace.
    own: bool,
}

/// Whether `principal` may open a shell to `agent`: its workspace's owner
/// may, and owner-role users. Anyone else learns nothing: no such agent.
async fn authorize(state: &AppState, principal: &Principal, agent: Uuid) -> ApiResult<ShellTarget> {
    if principal.scope != KeyScope::All {
        return Err(ApiError::forbidden(
            "This key may only open apps, not shells.",
        ));
    }
    let row: Option<(Uuid, String, Uuid, String, String)> = sqlx::query_as(
        "SELECT w.id, w.name, w.owner_id, u.username, g.name
         FROM workspace_agents g JOIN workspaces w ON w.id = g.workspace_id
         JOIN users u ON u.id = w.owner_id
         WHERE g.id = $1 AND NOT w.deleted",
    )
    .bind(agent)
    .fetch_optional(&state.db)
    .await?;
    let not_found = || ApiError::not_found("No such agent.");
    let (workspace, ws_name, owner_id, owner_name, agent_name) = row.ok_or_else(not_found)?;
    let own = owner_id == principal.user_id;
    if !own && !principal.is_owner() {
        return Err(not_found());
    }
    Ok(ShellTarget {
        agent,
        workspace,
        label: format!("{owner_name}/{ws_name}"),
        agent_name,
        own,
    })
}

/// Records that a session began, through `region`.
async fn record_start(
    state: &AppState,
    (target, principal): (&ShellTarget, &Principal),
    ip: &str,
    region: &str,
    (kind, session): (ShellKind, Uuid),
) {
    let Some(action) = kind.action() else {
        return;
    };
    Audit::new(action, "workspace")
        .resource(target.workspace, target.label.clone())
        .by(principal)
        .ip(ip)
        .details(serde_json::json!({
            "session": session,
            "agent": target.agent_name,
            "region": region,
            "others_workspace": !target.own,
        }))
        .write(&state.db)
        .await;
}

/// Records that the session `session`, begun through `region`, ended: a
/// copy of its start record (`ssh_end` for `ssh`, `terminal_end` for
/// `terminal`) with what it carried. Only the region that began a session
/// can end it, and only once.
async fn record_end(state: &AppState, session: Uuid, region: &str, (up, down): (u64, u64)) -> bool {
    let result = sqlx::query(
        "INSERT INTO audit_log (user_id, username, ip, action, resource_type, resource_id, resource_name, details)
         SELECT user_id, username, ip, action || '_end', resource_type, resource_id, resource_name,
                details || jsonb_build_object('bytes_up', $3::bigint, 'bytes_down', $4::bigint,
                    'seconds', round(extract(epoch FROM now() - time)::numeric, 1))
         FROM audit_log s
         WHERE s.details ? 'session' AND s.details->>'session' = $1
           AND s.action IN ('ssh', 'terminal', 'port_forward_udp') AND s.details->>'region' = $2
         ON CONFLICT ((details->>'session'))
             WHERE action IN ('ssh_end', 'terminal_end', 'port_forward_udp_end') DO NOTHING",
    )
    .bind(session.to_string())
    .bind(region)
    .bind(i64::try_from(up).unwrap_or(i64::MAX))
    .bind(i64::try_from(down).unwrap_or(i64::MAX))
    .execute(&state.db)
    .await;
    match result {
        Ok(r) => r.rows_affected() == 1,
        Err(e) => {
            tracing::warn!(error = %e, %session, "could not record the end of an ssh session");
            false
        }
    }
}

/// What ends a session of `principal` on `target`.
fn subjects(principal: &Principal, target: &ShellTarget) -> Vec<RevokedSubject> {
    vec![
        RevokedSubject::User {
            id: principal.user_id,
        },
        RevokedSubject::Key {
            id: principal.key_id.clone(),
        },
        RevokedSubject::Workspace {
            id: target.workspace,
        },
    ]
}

/// `POST /api/v2/workspaceagents/{id}/ssh` on the primary.
pub(super) async fn ssh(
    State(state): State<AppState>,
    auth: KeyAuthed,
    ClientIp(ip): ClientIp,
    ApiPath(agent): ApiPath<Uuid>,
    body: Body,
) -> ApiResult<Response> {
    let caller = Caller { auth, ip };
    stream(&state, caller, agent, body, StreamHeader::Ssh).await
}

/// `POST /api/v2/workspaceagents/{id}/probe?download=N` on the primary:
/// `devmesh ping` and `speedtest`.
pub(super) async fn probe(
    State(state): State<AppState>,
    auth: KeyAuthed,
    ClientIp(ip): ClientIp,
    ApiPath(agent): ApiPath<Uuid>,
    super::extract::ApiQuery(q): super::extract::ApiQuery<ProbeQuery>,
    body: Body,
) -> ApiResult<Response> {
    let header = q.header().map_err(ApiError::bad_request)?;
    let caller = Caller { auth, ip };
    stream(&state, caller, agent, body, header).await
}

/// `POST /api/v2/workspaceagents/{id}/udp?port=P` on the primary: one UDP
/// flow of `devmesh port-forward --udp`.
pub(super) async fn udp(
    State(state): State<AppState>,
    auth: KeyAuthed,
    ClientIp(ip): ClientIp,
    ApiPath(agent): ApiPath<Uuid>,
    super::extract::ApiQuery(q): super::extract::ApiQuery<UdpQuery>,
    body: Body,
) -> ApiResult<Response> {
    if q.port == 0 {
        return Err(ApiError::bad_request("Port 0 is not a port."));
    }
    let caller = Caller { auth, ip };
    stream(
        &state,
        caller,
        agent,
        body,
        StreamHeader::Udp { port: q.port },
    )
    .await
}

/// Who asks for a stream session, and how.
struct Caller {
    auth: KeyAuthed,
    ip: String,
}

/// A stream session through the primary: the request body up, the
/// response body down.
async fn stream(
    state: &AppState,
    Caller { auth, ip }: Caller,
    agent: Uuid,
    body: Body,
    header: StreamHeader,
) -> ApiResult<Response> {
    let kind = ShellKind::of(&header);
    let target = authorize(state, &auth.0, agent).await?;
    let began_ms = chrono::Utc::now().timestamp_millis();
    let opening = tokio::time::Instant::now();
    let stream = state.relay.open(agent, &header, None).await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("The agent cannot take the connection now: {e}."),
        )
        .detail("is the workspace started and its agent connected? `devmesh show` says")
    })?;
    let opened_in = opening.elapsed();
    let session_id = Uuid::new_v4();
    record_start(
        state,
        (&target, &auth.0),
        &ip,
        "primary",
        (kind, session_id),
    )
    .await;
    let session = Session::new(&state.shutdown);
    let holder = Holder {
        subjects: subjects(&auth.0, &target),
        began_ms,
    };
    let mut resp =
        devmesh_proxy::shell::splice(stream, body, holder, state.revocations.clone(), &session);
    devmesh_proxy::shell::route_headers(&mut resp, "primary", &state.relay.route(agent), opened_in);
    record_end_when_over(state.clone(), session_id, &session);
    Ok(resp)
}

/// Records the session's end when it comes.
fn record_end_when_over(state: AppState, session_id: Uuid, session: &Arc<Session>) {
    let session = session.clone();
    tokio::spawn(async move {
        session.ended.cancelled().await;
        record_end(&state, session_id, "primary", session.bytes()).await;
    });
}

/// Whether a WebSocket request authenticated by a cookie comes from a page
/// on `access_url`'s own origin: a browser always says where a WebSocket
/// comes from, and any other site's page must not reach a shell.
fn websocket_same_origin(headers: &HeaderMap, access_url: &str) -> bool {
    let own = access_url.trim_end_matches('/');
    headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.eq_ignore_ascii_case(own))
}

/// `GET /api/v2/workspaceagents/{id}/pty` on the primary: a reconnecting
/// terminal over a WebSocket. The dashboard's pages may use the session
/// cookie; anyone else sends the key in a header.
pub(super) async fn terminal(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiPath(agent): ApiPath<Uuid>,
    super::extract::ApiQuery(query): super::extract::ApiQuery<TerminalQuery>,
    super::extract::ApiWebSocket(ws): super::extract::ApiWebSocket,
) -> ApiResult<Response> {
    if !program_key(&headers) && !websocket_same_origin(&headers, &state.config.access_url) {
        return Err(ApiError::forbidden(
            "Only the dashboard's own pages may open a terminal with the session cookie.",
        )
        .detail("send your key in the Devmesh-Session-Token header instead"));
    }
    let header = query.header().map_err(ApiError::bad_request)?;
    let target = authorize(&state, &auth.0, agent).await?;
    let began_ms = chrono::Utc::now().timestamp_millis();
    let stream = state.relay.open(agent, &header, None).await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("The agent cannot open a terminal now: {e}."),
        )
        .detail("is the workspace started and its agent connected? `devmesh show` says")
    })?;
    let session_id = Uuid::new_v4();
    record_start(
        &state,
        (&target, &auth.0),
        &ip,
        "primary",
        (ShellKind::Terminal, session_id),
    )
    .await;
    let session = Session::new(&state.shutdown);
    let holder = Holder {
        subjects: subjects(&auth.0, &target),
        began_ms,
    };
    record_end_when_over(state.clone(), session_id, &session);
    Ok(devmesh_proxy::shell::upgrade_terminal(
        ws,
        stream,
        holder,
        state.revocations.clone(),
        session,
    ))
}

/// `POST /api/v2/edges/me/shell-access`: an edge asks whether the holder
/// of a key may open a shell to an agent. A yes is recorded as the start of
/// a session through that edge's region, and carries a stream grant for
/// the agent's home relay.
pub(super) async fn edge_shell_access(
    State(state): State<AppState>,
    edge: EdgeAuth,
    ApiJson(req): ApiJson<EdgeShellAccessRequest>,
) -> ApiResult<Json<EdgeShellAccess>> {
    let principal = match state.keys.validate(&req.key).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return Err(ApiError::unauthorized("The key is not valid.")),
        Err(e) => return Err(e.into()),
    };
    let target = authorize(&state, &principal, req.agent_id).await?;
    let began_ms = chrono::Utc::now().timestamp_millis();
    let grant = state.signer.sign(&StreamGrant {
        agent_id: target.agent,
        // What the edge asked for, and only that: a probe (not audited)
        // cannot be turned into a shell.
        stream: match req.kind {
            ShellKind::Ssh | ShellKind::Terminal => GrantedStream::Shell,
            ShellKind::Probe => GrantedStream::Probe,
            ShellKind::Udp => GrantedStream::Udp,
        },
        exp: began_ms / 1000 + GRANT_SECS,
    });
    let location = crate::events::agent_location(&state.db, target.agent).await?;
    let session_id = Uuid::new_v4();
    let ip: String = req.client_ip.chars().take(64).collect();
    record_start(
        &state,
        (&target, &principal),
        &ip,
        &edge.name,
        (req.kind, session_id),
    )
    .await;
    Ok(Json(EdgeShellAccess {
        session_id,
        grant,
        began_ms,
        subjects: subjects(&principal, &target),
        location,
    }))
}

/// `POST /api/v2/edges/me/shell-ended`: a session an edge carried ended.
pub(super) async fn edge_shell_ended(
    State(state): State<AppState>,
    edge: EdgeAuth,
    ApiJson(req): ApiJson<EdgeShellEnded>,
) -> ApiResult<StatusCode> {
    if record_end(
        &state,
        req.session_id,
        &edge.name,
        (req.bytes_up, req.bytes_down),
    )
    .await
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "No open shell session of this edge has that id.",
        ))
    }
}
