//! Build info, health, metrics, the audit log and the root page.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use devmesh_shared::api::{AuditEntry, AuditResponse, BuildInfo};
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiQuery, Authed};

pub(super) async fn buildinfo(State(state): State<AppState>) -> Json<BuildInfo> {
    Json(BuildInfo {
        version: devmesh_shared::VERSION.into(),
        access_url: state.config.access_url.clone(),
    })
}

/// The agent binary for `os`/`arch`, which workspaces' init scripts
/// download: the primary's own executable, when it was built for that
/// platform (the one binary is server, CLI and agent). Public: it holds no
/// secret, and a workspace has no credential yet when it fetches it.
pub(super) async fn agent_binary(
    super::extract::ApiPath((os, arch)): super::extract::ApiPath<(String, String)>,
) -> ApiResult<axum::response::Response> {
    let here = devmesh_provisioner::terraform::platform();
    if format!("{os}_{arch}") != here {
        return Err(ApiError::not_found(format!(
            "this primary has the agent for {} only, not {os}/{arch}",
            here.replace('_', "/")
        )));
    }
    // The running executable, even if an upgrade replaced the file since.
    let path = if cfg!(target_os = "linux") {
        std::path::PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().map_err(|e| ApiError::internal(e.to_string()))?
    };
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read the agent binary: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        256 * 1024,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"devmesh\"".to_owned(),
            ),
        ],
        body,
    )
        .into_response())
}

/// 200 while the database answers, 503 otherwise.
/// How long a health check waits for the database: a load balancer or an
/// orchestrator must get an answer, whatever the database is doing.
const HEALTH_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// `GET /healthz` and `GET /readyz`: 200 when this primary can serve (its
/// database answers within [`HEALTH_DB_TIMEOUT`]), else 503 with the
/// reason, always within about that long.
pub(super) async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let check = sqlx::query("SELECT 1").execute(&state.db);
    match tokio::time::timeout(HEALTH_DB_TIMEOUT, check).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
        Err(_) => {
            tracing::warn!("health check: the database did not answer within 1 s");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "database did not answer within 1 s",
            )
        }
    }
}

/// `GET /livez`: 200 while the process serves HTTP at all, whatever its
/// database does (an orchestrator restarts the process only when this
/// fails; `/readyz` takes it out of rotation).
pub(super) async fn livez() -> impl IntoResponse {
    (StatusCode::OK, "alive")
}

pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            // The relay's counters go before the registry's closing `# EOF`.
            let mut text = state.metrics.encode();
            let end = text.rfind("# EOF").unwrap_or(text.len());
            text.insert_str(end, &state.relay.stats().openmetrics("devmesh_relay"));
            text
        },
    )
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    time: DateTime<Utc>,
    user_id: Option<Uuid>,
    username: Option<String>,
    ip: Option<String>,
    action: String,
    resource_type: String,
    resource_id: String,
    resource_name: String,
    details: serde_json::Value,
}

/// `GET /api/v2/openapi.json`: the document describing the API, built
/// from the routing table on first use and served as built.
pub(super) async fn openapi() -> impl IntoResponse {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOCUMENT
        .get_or_init(|| serde_json::to_string(&super::api_routes().finish().1).unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], body.as_str())
}

/// `GET /api/v2/audit?limit=N&before=ID&action=A`: newest first.
pub(super) async fn audit(
    State(state): State<AppState>,
    auth: Authed,
    ApiQuery(q): ApiQuery<devmesh_shared::api::AuditQuery>,
) -> ApiResult<Json<AuditResponse>> {
    auth.require_owner()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let before = q.before.unwrap_or(i64::MAX);
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT id, time, user_id, username, ip, action, resource_type, resource_id, resource_name, details
         FROM audit_log WHERE id < $1 AND ($2::text IS NULL OR action = $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(before)
    .bind(q.action)
    .bind(limit)
    .fetch_all(&state.db)
    .await?;
    let entries = rows
        .into_iter()
        .map(|r| AuditEntry {
            id: r.id,
            time: r.time,
            user_id: r.user_id,
            username: r.username,
            ip: r.ip,
            action: r.action,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            resource_name: r.resource_name,
            details: r.details,
        })
        .collect();
    Ok(Json(AuditResponse { entries }))
}
