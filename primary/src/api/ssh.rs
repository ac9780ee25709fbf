//! `POST /api/v2/workspaceagents/{id}/ssh`: one SSH connection to the
//! agent, carried by an HTTP request whose body is what the client sends
//! and whose response body is what the agent answers — both streamed, over
//! HTTPS, so it works where UDP does not. The primary opens an `Ssh` tunnel
//! stream to the agent (down its tunnel, or across the mesh to the relay it
//! is attached to) and splices the two.
//!
//! Only the workspace's owner may, or an owner-role user (audited as acting
//! on someone else's workspace). A session cookie cannot: the key must come
//! in a header, so another site cannot ride a signed-in browser into a
//! shell.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use devmesh_shared::api::RevokedSubject;
use devmesh_shared::tunnel::StreamHeader;
use futures_util::StreamExt;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiPath, Authed, ClientIp, SESSION_HEADER};
use super::{AppState, Audit};

pub(super) async fn ssh(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiPath(agent): ApiPath<Uuid>,
    body: Body,
) -> ApiResult<Response> {
    if !headers.contains_key(SESSION_HEADER) && !headers.contains_key(header::AUTHORIZATION) {
        return Err(ApiError::unauthorized(
            "Send your key in the Devmesh-Session-Token header to open a shell.",
        )
        .detail("a session cookie cannot open one: other sites could use it"));
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
    let own = owner_id == auth.0.user_id;
    if !own && !auth.0.is_owner() {
        return Err(not_found());
    }
    let (mut send, recv) = state
        .relay
        .open(agent, &StreamHeader::Ssh, None)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("The agent cannot take an SSH connection now: {e}."),
            )
            .detail("is the workspace started and its agent connected? `devmesh show` says")
        })?;
    Audit::new("ssh", "workspace")
        .resource(workspace, format!("{owner_name}/{ws_name}"))
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({
            "agent": agent_name,
            "region": "primary",
            "others_workspace": !own,
        }))
        .write(&state.db)
        .await;
    // The session ends when the server stops, or within a second of the
    // user signing out (or being suspended) or the key being deleted.
    let ended = state.shutdown.child_token();
    {
        let (ended, revocations) = (ended.clone(), state.revocations.clone());
        let began = chrono::Utc::now().timestamp_millis();
        let subjects = [
            RevokedSubject::User { id: auth.0.user_id },
            RevokedSubject::Key {
                id: auth.0.key_id.clone(),
            },
        ];
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = ended.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
                if subjects.iter().any(|s| revocations.cuts(s, began)) {
                    tracing::info!(agent = %agent, "an ssh session's key or user was revoked; ending it");
                    ended.cancel();
                    return;
                }
            }
        });
    }
    // Client → agent, until the client's body ends.
    let up_ended = ended.clone();
    tokio::spawn(async move {
        let mut up = body.into_data_stream();
        loop {
            let chunk = tokio::select! {
                c = up.next() => c,
                () = up_ended.cancelled() => None,
            };
            match chunk {
                Some(Ok(b)) if send.write_all(&b).await.is_ok() => {}
                _ => break,
            }
        }
        let _ = send.finish();
    });
    // Agent → client, as the response body.
    let down = futures_util::stream::unfold((recv, ended), |(mut recv, ended)| async move {
        let mut buf = vec![0u8; 32 * 1024];
        let read = tokio::select! {
            r = recv.read(&mut buf) => r,
            () = ended.cancelled() => {
                let _ = recv.stop(devmesh_shared::tunnel::stream_code::DONE.into());
                return None;
            }
        };
        match read {
            Ok(Some(n)) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), (recv, ended)))
            }
            _ => {
                ended.cancel();
                None
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(down))
        .map_err(ApiError::internal)
}
