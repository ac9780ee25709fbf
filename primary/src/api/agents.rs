//! The agent-facing API (`/api/v2/workspaceagents/me/...`, authenticated by
//! the agent token) and the user-facing agent log reader.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use chrono::{Duration, Utc};
use devmesh_shared::api::{
    AGENT_TOKEN_HEADER, AgentLog, AgentLogsAccepted, AgentLogsRequest, AgentLogsResponse,
    AgentManifest, AppHealthRequest, AttachTicketRequest, AttachTicketResponse, LifecycleRequest,
    ManifestApp,
};
use devmesh_shared::secret::sha256;
use devmesh_shared::signing::AttachTicket;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, ApiQuery, Authed};

/// Stored script output per agent before later output is dropped.
pub(super) const MAX_LOG_BYTES: i64 = 1024 * 1024;
/// How long an attach ticket is accepted.
const TICKET_LIFETIME: Duration = Duration::minutes(5);

/// An authenticated agent: its token matches an agent of its workspace's
/// latest start build, and the workspace is not deleted.
#[derive(Debug, Clone)]
pub(super) struct AgentAuth {
    agent_id: Uuid,
    workspace_id: Uuid,
}

impl FromRequestParts<AppState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(AGENT_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::unauthorized("Missing the agent token.")
                    .detail(format!("send it in {AGENT_TOKEN_HEADER}"))
            })?;
        let row: Option<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT g.id, g.workspace_id FROM workspace_agents g
             JOIN workspaces w ON w.id = g.workspace_id AND NOT w.deleted
             WHERE g.token_hash = $1
               AND g.build_id = (SELECT b.id FROM workspace_builds b WHERE b.workspace_id = g.workspace_id
                                 ORDER BY b.build_number DESC LIMIT 1)",
        )
        .bind(sha256(token.trim().as_bytes()).as_slice())
        .fetch_optional(&state.db)
        .await?;
        let (agent_id, workspace_id) = row.ok_or_else(|| {
            ApiError::unauthorized("The agent token is not valid.").detail(
                "the workspace may be stopped or deleted, or the token belongs to an older build",
            )
        })?;
        Ok(Self {
            agent_id,
            workspace_id,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ManifestRow {
    agent_name: String,
    directory: Option<String>,
    env: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    scripts: sqlx::types::Json<Vec<devmesh_shared::api::ScriptSpec>>,
    metadata_specs: sqlx::types::Json<Vec<devmesh_shared::api::MetadataSpec>>,
    workspace_name: String,
    owner_name: String,
}

pub(super) async fn manifest(
    State(state): State<AppState>,
    agent: AgentAuth,
) -> ApiResult<Json<AgentManifest>> {
    let row: ManifestRow = sqlx::query_as(
        "SELECT g.name AS agent_name, g.directory, g.env, g.scripts, g.metadata_specs, w.name AS workspace_name, u.username AS owner_name
         FROM workspace_agents g JOIN workspaces w ON w.id = g.workspace_id JOIN users u ON u.id = w.owner_id
         WHERE g.id = $1",
    )
    .bind(agent.agent_id)
    .fetch_one(&state.db)
    .await?;
    type AppRow = (String, String, Option<String>, Option<i32>, Option<i32>);
    let apps: Vec<AppRow> = sqlx::query_as(
        "SELECT slug, url, healthcheck_url, healthcheck_interval, healthcheck_threshold FROM workspace_apps WHERE agent_id = $1 ORDER BY slug",
    )
    .bind(agent.agent_id)
    .fetch_all(&state.db)
    .await?;
    let apps = apps
        .into_iter()
        .map(|(slug, url, hc_url, interval, threshold)| ManifestApp {
            slug,
            url,
            healthcheck: hc_url.map(|url| devmesh_shared::api::HealthcheckSpec {
                url,
                interval_seconds: interval.unwrap_or(5) as u32,
                threshold: threshold.unwrap_or(3) as u32,
            }),
        })
        .collect();
    Ok(Json(AgentManifest {
        agent_id: agent.agent_id,
        agent_name: row.agent_name,
        workspace_id: agent.workspace_id,
        workspace_name: row.workspace_name,
        owner_name: row.owner_name,
        directory: row.directory,
        env: row.env.0,
        apps,
        scripts: row.scripts.0,
        metadata: row.metadata_specs.0,
        relays: super::edges::healthy_relays(&state.db, &state).await?,
        mesh_ca_pem: state.ca.cert_pem().to_owned(),
    }))
}

/// A ticket for one attach to the relay the agent names: the primary's own
/// or a registered edge replica's (a ticket is only ever useful there).
pub(super) async fn attach_ticket(
    State(state): State<AppState>,
    agent: AgentAuth,
    ApiJson(req): ApiJson<AttachTicketRequest>,
) -> ApiResult<Json<AttachTicketResponse>> {
    let known = req.relay == state.relay.advertised().address
        || sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM relay_replicas WHERE relay_address = $1)",
        )
        .bind(&req.relay)
        .fetch_one(&state.db)
        .await?;
    if !known {
        return Err(
            ApiError::bad_request(format!("No relay is registered at {:?}.", req.relay))
                .detail("ask for a ticket for a relay from the manifest's list"),
        );
    }
    let now = Utc::now();
    let expires_at = now + TICKET_LIFETIME;
    let ticket = state.signer.sign(&AttachTicket {
        agent_id: agent.agent_id,
        workspace_id: agent.workspace_id,
        relay: req.relay,
        nonce: devmesh_shared::secret::random_alphanumeric(22),
        issued_at_ms: now.timestamp_millis(),
        exp: expires_at.timestamp(),
    });
    Ok(Json(AttachTicketResponse { ticket, expires_at }))
}

pub(super) async fn lifecycle(
    State(state): State<AppState>,
    agent: AgentAuth,
    ApiJson(req): ApiJson<LifecycleRequest>,
) -> ApiResult<StatusCode> {
    use devmesh_shared::api::LifecycleState as L;
    let (started, ready) = match req.state {
        L::Starting => ("now()", "ready_at"),
        L::Ready | L::StartError | L::StartTimeout => ("started_at", "now()"),
        _ => ("started_at", "ready_at"),
    };
    sqlx::query(&format!(
        "UPDATE workspace_agents SET lifecycle_state = $2, started_at = {started}, ready_at = {ready} WHERE id = $1"
    ))
    .bind(agent.agent_id)
    .bind(req.state.as_str())
    .execute(&state.db)
    .await?;
    tracing::info!(agent.id = %agent.agent_id, state = req.state.as_str(), "agent lifecycle");
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn post_logs(
    State(state): State<AppState>,
    agent: AgentAuth,
    ApiJson(req): ApiJson<AgentLogsRequest>,
) -> ApiResult<Json<AgentLogsAccepted>> {
    let mut tx = state.db.begin().await?;
    let (length, overflowed): (i32, bool) = sqlx::query_as(
        "SELECT logs_length, logs_overflowed FROM workspace_agents WHERE id = $1 FOR UPDATE",
    )
    .bind(agent.agent_id)
    .fetch_one(&mut *tx)
    .await?;
    if overflowed {
        return Ok(Json(AgentLogsAccepted {
            accepted: 0,
            overflowed: true,
        }));
    }
    let mut budget = MAX_LOG_BYTES - i64::from(length);
    let mut accepted = Vec::new();
    let mut now_overflowed = false;
    for entry in req.logs {
        // Rows cost more than their text: count the source and a fixed overhead.
        let size = (entry.output.len() + entry.source.len() + 64) as i64;
        if size > budget {
            now_overflowed = true;
            break;
        }
        budget -= size;
        accepted.push(entry);
    }
    let used = MAX_LOG_BYTES - budget;
    for e in &accepted {
        let level = if e.level == "error" { "error" } else { "info" };
        sqlx::query("INSERT INTO workspace_agent_logs (agent_id, source, level, output) VALUES ($1, $2, $3, $4)")
            .bind(agent.agent_id)
            .bind(e.source.chars().take(64).collect::<String>())
            .bind(level)
            .bind(e.output.replace('\0', "\u{FFFD}"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE workspace_agents SET logs_length = $2, logs_overflowed = $3 WHERE id = $1")
        .bind(agent.agent_id)
        .bind(used as i32)
        .bind(now_overflowed)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Json(AgentLogsAccepted {
        accepted: accepted.len(),
        overflowed: now_overflowed,
    }))
}

pub(super) async fn app_health(
    State(state): State<AppState>,
    agent: AgentAuth,
    ApiJson(req): ApiJson<AppHealthRequest>,
) -> ApiResult<StatusCode> {
    for (slug, health) in req.health {
        let health = serde_json::to_value(health)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        sqlx::query("UPDATE workspace_apps SET health = $3 WHERE agent_id = $1 AND slug = $2 AND health <> 'disabled'")
            .bind(agent.agent_id)
            .bind(slug)
            .bind(health)
            .execute(&state.db)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v2/workspaceagents/me/metadata`: values the agent measured,
/// timed on arrival. Only keys its template declares are kept; long values
/// are cut.
pub(super) async fn metadata(
    State(state): State<AppState>,
    agent: AgentAuth,
    ApiJson(req): ApiJson<devmesh_shared::api::AgentMetadataRequest>,
) -> ApiResult<StatusCode> {
    use devmesh_shared::api::{MAX_AGENT_METADATA, MAX_METADATA_VALUE, MetadataSpec};
    if req.metadata.len() > MAX_AGENT_METADATA {
        return Err(ApiError::bad_request(format!(
            "At most {MAX_AGENT_METADATA} values per call."
        )));
    }
    let specs: sqlx::types::Json<Vec<MetadataSpec>> =
        sqlx::query_scalar("SELECT metadata_specs FROM workspace_agents WHERE id = $1")
            .bind(agent.agent_id)
            .fetch_one(&state.db)
            .await?;
    let cut = |s: &str| {
        let mut end = s.len().min(MAX_METADATA_VALUE);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    };
    let mut changed = serde_json::Map::new();
    for m in req.metadata {
        if !specs.0.iter().any(|s| s.key == m.key) {
            return Err(ApiError::bad_request(format!(
                "The template declares no metadata {:?} for this agent.",
                m.key
            )));
        }
        changed.insert(
            m.key,
            serde_json::json!({
                "value": cut(&m.value),
                "error": m.error.as_deref().map(cut),
                // The primary's clock: agents' clocks may be anywhere.
                "collected_at": chrono::Utc::now(),
            }),
        );
    }
    sqlx::query("UPDATE workspace_agents SET metadata = metadata || $2 WHERE id = $1")
        .bind(agent.agent_id)
        .bind(serde_json::Value::Object(changed))
        .execute(&state.db)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v2/workspaceagents/{id}/logs?after=N`: the workspace owner (or
/// an owner) reads script output, also while scripts still run.
pub(super) async fn get_logs(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<devmesh_shared::api::AfterQuery>,
) -> ApiResult<Json<AgentLogsResponse>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("No such agent."))?;
    let after = q.after;
    let row: Option<(Uuid, bool, String)> = sqlx::query_as(
        "SELECT w.owner_id, g.logs_overflowed, g.lifecycle_state FROM workspace_agents g JOIN workspaces w ON w.id = g.workspace_id WHERE g.id = $1",
    )
    .bind(id)
    .fetch_optional(&state.db)
    .await?;
    let (overflowed, lifecycle_state) = match row {
        Some((owner, overflowed, state)) if owner == auth.0.user_id || auth.0.is_owner() => (
            overflowed,
            super::workspaces::stored(&state, devmesh_shared::api::LifecycleState::Created),
        ),
        _ => return Err(ApiError::not_found("No such agent.")),
    };
    let rows: Vec<(i64, String, String, String, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, source, level, output, created_at FROM workspace_agent_logs WHERE agent_id = $1 AND id > $2 ORDER BY id LIMIT 5000",
    )
    .bind(id)
    .bind(after)
    .fetch_all(&state.db)
    .await?;
    let logs = rows
        .into_iter()
        .map(|(id, source, level, output, created_at)| AgentLog {
            id,
            source,
            level,
            output,
            created_at,
        })
        .collect();
    Ok(Json(AgentLogsResponse {
        logs,
        overflowed,
        lifecycle_state,
    }))
}
