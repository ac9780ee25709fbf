//! Shell sessions (SSH) through the edge: `POST
//! /api/v2/workspaceagents/{id}/ssh` on the edge's own host, the same call
//! the primary serves, so the CLI reaches an agent through whichever region
//! is nearest.
//!
//! The edge asks the primary whether the key may open a shell to the
//! agent (`shell-access`: one call per session, which is also what records
//! it in the audit log), opens an `Ssh` stream to the agent (down its
//! tunnel if attached here, else over the mesh with the primary's grant),
//! splices it to the request ([`devmesh_proxy::shell`]), ends it within a
//! second of a revocation the primary pushes, and reports its end.

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use devmesh_proxy::shell::{Holder, Session};
use devmesh_shared::api::{
    AgentLocation, EdgeShellAccess, EdgeShellAccessRequest, EdgeShellEnded, ProbeQuery, ShellKind,
    TerminalQuery, UdpQuery,
};
use devmesh_shared::tunnel::StreamHeader;
use uuid::Uuid;

use crate::Edge;
use crate::metrics::ShellLabels;
use crate::primary::ShellRefusal;

/// An error in the API's shape, so the CLI reads it as it reads the
/// primary's.
fn error(status: StatusCode, message: impl Into<String>, detail: impl Into<String>) -> Response {
    let body = devmesh_shared::api::Error {
        message: message.into(),
        detail: detail.into(),
        validations: Vec::new(),
        denial: None,
    };
    (status, Json(body)).into_response()
}

/// A session the primary allowed, with its stream to the agent open.
struct Opened {
    access: EdgeShellAccess,
    stream: devmesh_proxy::shell::Stream,
    /// How long opening the stream took, through every hop.
    opened_in: std::time::Duration,
    kind: ShellKind,
    agent: Uuid,
}

/// Asks the primary whether the caller may open `header` to `agent`, and
/// opens it: the stream, or the response that refuses.
async fn open(
    edge: &Arc<Edge>,
    agent: &str,
    headers: &HeaderMap,
    client: String,
    header: StreamHeader,
) -> Result<Opened, Response> {
    let count = |result: &'static str| {
        edge.metrics
            .shell_sessions
            .get_or_create(&ShellLabels { result })
            .inc();
    };
    let Ok(agent) = Uuid::parse_str(agent) else {
        count("refused");
        return Err(error(StatusCode::NOT_FOUND, "No such agent.", ""));
    };
    // A key in a header only: a cookie could be another site's doing.
    let Some(key) = devmesh_proxy::app::header_key(headers) else {
        count("refused");
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "Send your key in the Devmesh-Session-Token header to open a shell.",
            "a session cookie cannot open one: other sites could use it",
        ));
    };
    let Some(relay) = edge.relay.get() else {
        count("unavailable");
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "This region is starting: it has not registered with the primary yet.",
            "try again in a moment, or another region",
        ));
    };
    if let Err(wait) = edge.primary_calls.check(&client) {
        count("rate_limited");
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests from your address.",
            format!("try again in {} s", wait.as_secs().max(1)),
        ));
    }
    edge.metrics.primary_requests.inc();
    let request = EdgeShellAccessRequest {
        agent_id: agent,
        key,
        client_ip: client.clone(),
        kind: ShellKind::of(&header),
    };
    let access = match edge.primary.shell_access(&request).await {
        Ok(a) => a,
        Err(ShellRefusal::Refused(status, e)) => {
            count("refused");
            return Err((status, Json(e)).into_response());
        }
        Err(ShellRefusal::Unreachable(why)) => {
            count("unavailable");
            tracing::warn!(error = %why, "no shell access decision from the primary");
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "This region cannot reach the primary to authorise the session.",
                "try another region: `devmesh ssh --region`",
            ));
        }
    };
    if let Some(home) = access.location.clone() {
        edge.locations.set(AgentLocation {
            agent_id: agent,
            relay: Some(home),
        });
    }
    let opening = tokio::time::Instant::now();
    match relay.open(agent, &header, Some(&access.grant)).await {
        Ok(stream) => {
            count("opened");
            tracing::info!(%agent, client.ip = %client, session = %access.session_id, "shell session began");
            Ok(Opened {
                access,
                stream,
                opened_in: opening.elapsed(),
                kind: request.kind,
                agent,
            })
        }
        Err(e) => {
            count("agent_unreachable");
            tracing::info!(%agent, error = %e, "cannot open a shell stream");
            if request.kind.action().is_some() {
                ended(edge, access.session_id, (0, 0));
            }
            Err(error(
                StatusCode::BAD_GATEWAY,
                format!("The agent cannot take the connection now: {e}."),
                "is the workspace started and its agent connected? `devmesh show` says",
            ))
        }
    }
}

fn client_ip(req: &axum::http::Extensions) -> String {
    req.get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip().to_string())
        .unwrap_or_default()
}

/// A session's policing and its end's report, once it runs.
fn begin(edge: &Arc<Edge>, opened: &Opened) -> (Holder, Arc<Session>) {
    let session = Session::new(&edge.shutdown);
    let holder = Holder {
        subjects: opened.access.subjects.clone(),
        began_ms: opened.access.began_ms,
    };
    edge.metrics.shells_open.inc();
    let audited = opened.kind.action().is_some();
    let (edge, id, watched) = (edge.clone(), opened.access.session_id, session.clone());
    tokio::spawn(async move {
        watched.ended.cancelled().await;
        edge.metrics.shells_open.dec();
        if audited {
            ended(&edge, id, watched.bytes());
        }
    });
    (holder, session)
}

/// `POST /api/v2/workspaceagents/{agent}/ssh` on the edge.
pub(crate) async fn ssh(
    State(edge): State<Arc<Edge>>,
    Path(agent): Path<String>,
    req: Request,
) -> Response {
    stream(&edge, &agent, req, StreamHeader::Ssh).await
}

/// `POST /api/v2/workspaceagents/{agent}/probe` on the edge.
pub(crate) async fn probe(
    State(edge): State<Arc<Edge>>,
    Path(agent): Path<String>,
    Query(q): Query<ProbeQuery>,
    req: Request,
) -> Response {
    match q.header() {
        Ok(header) => stream(&edge, &agent, req, header).await,
        Err(why) => error(StatusCode::BAD_REQUEST, why, ""),
    }
}

/// `POST /api/v2/workspaceagents/{agent}/udp` on the edge.
pub(crate) async fn udp(
    State(edge): State<Arc<Edge>>,
    Path(agent): Path<String>,
    Query(q): Query<UdpQuery>,
    req: Request,
) -> Response {
    match q.header() {
        Ok(header) => stream(&edge, &agent, req, header).await,
        Err(why) => error(StatusCode::BAD_REQUEST, why, ""),
    }
}

/// A stream session through the edge: the request body up, the response
/// body down.
async fn stream(edge: &Arc<Edge>, agent: &str, req: Request, header: StreamHeader) -> Response {
    let client = client_ip(req.extensions());
    let opened = match open(edge, agent, req.headers(), client, header).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    let (holder, session) = begin(edge, &opened);
    let route = edge
        .relay
        .get()
        .map_or(devmesh_proxy::relay::Route::Unknown, |r| {
            r.route(opened.agent)
        });
    let mut resp = devmesh_proxy::shell::splice(
        opened.stream,
        req.into_body(),
        holder,
        edge.revocations.clone(),
        &session,
    );
    devmesh_proxy::shell::route_headers(&mut resp, &edge.region(), &route, opened.opened_in);
    resp
}

/// `GET /api/v2/workspaceagents/{agent}/pty` on the edge: a reconnecting
/// terminal over a WebSocket, the key in a header.
pub(crate) async fn terminal(
    State(edge): State<Arc<Edge>>,
    Path(agent): Path<String>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Query(query): Query<TerminalQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let header = match query.header() {
        Ok(h) => h,
        Err(why) => return error(StatusCode::BAD_REQUEST, why, ""),
    };
    let opened = match open(&edge, &agent, &headers, peer.ip().to_string(), header).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    let (holder, session) = begin(&edge, &opened);
    devmesh_proxy::shell::upgrade_terminal(
        ws,
        opened.stream,
        holder,
        edge.revocations.clone(),
        session,
    )
}

/// Tells the primary a session ended, for its audit log.
fn ended(edge: &Arc<Edge>, session_id: Uuid, (bytes_up, bytes_down): (u64, u64)) {
    let edge = edge.clone();
    tokio::spawn(async move {
        let report = EdgeShellEnded {
            session_id,
            bytes_up,
            bytes_down,
        };
        // The primary may be briefly away: try a few times (it records an
        // end once, however often it hears of it).
        let mut delay = std::time::Duration::from_secs(1);
        for attempt in 1..=5 {
            match edge.primary.shell_ended(&report).await {
                Ok(()) => return,
                Err(crate::primary::CallError::Unreachable(e)) if attempt < 5 => {
                    tracing::debug!(session = %session_id, error = %e, "retrying the end of a shell session");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::warn!(session = %session_id, error = %e, "could not report the end of a shell session");
                    return;
                }
            }
        }
    });
}
