//! Provisioner keys and daemons for owners, and `/api/v2/provisionerd`,
//! the API external daemons run jobs through (they never reach the
//! database).
//!
//! A daemon authenticates every call with its provisioner key (only the
//! secret's hash is stored, compared in constant time) and acts only on
//! jobs it holds: the primary refuses logs, states and outcomes for any
//! other job. A key that fixes tags makes its daemons serve exactly those
//! tags, whatever they declare.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use devmesh_shared::provisionerd::{
    AppendLogsRequest, CompleteResponse, Completion, CreateProvisionerKeyRequest,
    CreateProvisionerKeyResponse, HeartbeatResponse, MAX_LOG_BATCH, MAX_STATE_BYTES,
    PROVISIONER_KEY_HEADER, ProvisionerDaemon, ProvisionerDaemonsResponse, ProvisionerKey,
    ProvisionerKeysResponse, RegisterDaemonRequest, RegisterDaemonResponse, Tags, check_tags,
};
use uuid::Uuid;

use super::error::{ApiError, ApiResult, Validator};
use super::extract::{ApiJson, ApiPath, Authed, ClientIp};
use super::{AppState, Audit};
use crate::jobs::{self, Daemon};
use crate::provisioning::{self, HostError};

/// Registrations one key may make per hour.
const MAX_REGISTRATIONS_PER_HOUR: i64 = 200;

/// A daemon seen within this long is connected (an idle one asks for work
/// at least every [`devmesh_shared::provisionerd::ACQUIRE_WAIT_SECS`]).
pub(crate) const CONNECTED_WITHIN: Duration = Duration::from_secs(60);

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    name: String,
    tags: sqlx::types::Json<Tags>,
    created_at: DateTime<Utc>,
}

impl From<KeyRow> for ProvisionerKey {
    fn from(r: KeyRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            tags: r.tags.0,
            created_at: r.created_at,
        }
    }
}

// === Owners: keys and daemons ===

pub(super) async fn create_key(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateProvisionerKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreateProvisionerKeyResponse>)> {
    auth.require_owner()?;
    let mut v = Validator::default();
    v.check("name", devmesh_shared::names::validate_name(&req.name));
    v.check("tags", check_tags(&req.tags));
    v.finish()?;
    let id = Uuid::new_v4();
    let token = devmesh_shared::token::new_id_token(id);
    let row: KeyRow = sqlx::query_as(
        "INSERT INTO provisioner_keys (id, name, secret_hash, tags, created_by)
         VALUES ($1, $2, $3, $4, $5) RETURNING id, name, tags, created_at",
    )
    .bind(id)
    .bind(&req.name)
    .bind(token.hashed_secret.as_slice())
    .bind(sqlx::types::Json(&req.tags))
    .bind(auth.0.user_id)
    .fetch_one(&state.db)
    .await
    .map_err(|e| {
        if crate::db::is_unique_violation(&e) {
            ApiError::conflict(format!(
                "A provisioner key named {:?} already exists.",
                req.name
            ))
        } else {
            e.into()
        }
    })?;
    Audit::new("create", "provisioner_key")
        .resource(id, &req.name)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({ "tags": req.tags }))
        .write(&state.db)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreateProvisionerKeyResponse {
            key: row.into(),
            secret: token.token.expose().to_owned(),
        }),
    ))
}

pub(super) async fn list_keys(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<ProvisionerKeysResponse>> {
    auth.require_owner()?;
    let rows: Vec<KeyRow> =
        sqlx::query_as("SELECT id, name, tags, created_at FROM provisioner_keys ORDER BY name")
            .fetch_all(&state.db)
            .await?;
    Ok(Json(ProvisionerKeysResponse {
        keys: rows.into_iter().map(Into::into).collect(),
    }))
}

/// Deletes a key: its daemons are refused from their next call (and stop,
/// interrupting what they run). Their running jobs fail once the heartbeat
/// timeout passes, not at once: until then the daemon may still be
/// interrupting Terraform, and another build of the workspace must not run
/// beside it.
pub(super) async fn delete_key(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require_owner()?;
    let id: Option<Uuid> =
        sqlx::query_scalar("DELETE FROM provisioner_keys WHERE name = $1 RETURNING id")
            .bind(&name)
            .fetch_optional(&state.db)
            .await?;
    let Some(id) = id else {
        return Err(ApiError::not_found(format!(
            "No provisioner key is named {name:?}."
        )));
    };
    Audit::new("delete", "provisioner_key")
        .resource(id, &name)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(sqlx::FromRow)]
struct DaemonRow {
    id: Uuid,
    name: String,
    tags: sqlx::types::Json<Tags>,
    version: String,
    built_in: bool,
    key_name: Option<String>,
    last_seen_at: DateTime<Utc>,
    connected: bool,
    current_job: Option<Uuid>,
}

pub(super) async fn list_daemons(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<ProvisionerDaemonsResponse>> {
    auth.require_owner()?;
    let rows: Vec<DaemonRow> = sqlx::query_as(
        "SELECT d.id, d.name, d.tags, d.version, d.built_in, k.name AS key_name, d.last_seen_at,
                d.last_seen_at > now() - make_interval(secs => $1) AS connected,
                (SELECT j.id FROM provisioner_jobs j
                 WHERE j.daemon_id = d.id AND j.status IN ('running', 'canceling')
                 LIMIT 1) AS current_job
         FROM provisioner_daemons d LEFT JOIN provisioner_keys k ON k.id = d.key_id
         WHERE d.last_seen_at > now() - interval '1 day'
         ORDER BY d.last_seen_at DESC, d.name",
    )
    .bind(CONNECTED_WITHIN.as_secs_f64())
    .fetch_all(&state.db)
    .await?;
    Ok(Json(ProvisionerDaemonsResponse {
        daemons: rows
            .into_iter()
            .map(|r| ProvisionerDaemon {
                id: r.id,
                name: r.name,
                tags: r.tags.0,
                version: r.version,
                built_in: r.built_in,
                key_name: r.key_name,
                last_seen_at: r.last_seen_at,
                connected: r.connected,
                current_job: r.current_job,
            })
            .collect(),
    }))
}

// === Daemons ===

/// The provisioner key a request carries, checked.
#[derive(Debug, Clone)]
pub(super) struct KeyAuth {
    id: Uuid,
    name: String,
    tags: Tags,
}

impl axum::extract::FromRequestParts<AppState> for KeyAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        use devmesh_shared::secret::{constant_time_eq, sha256};
        let refused = || {
            crate::metrics::Metrics::count(&state.metrics.provisioner_refusals, "key");
            ApiError::unauthorized("The provisioner key is not valid.")
                .detail("it may have been deleted; an owner creates one with `devmesh provisioner keys create`")
        };
        let token = parts
            .headers
            .get(PROVISIONER_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(refused)?;
        let (id, secret) =
            devmesh_shared::token::parse_id_token(token.trim()).ok_or_else(refused)?;
        let row: Option<(String, Vec<u8>, sqlx::types::Json<Tags>)> =
            sqlx::query_as("SELECT name, secret_hash, tags FROM provisioner_keys WHERE id = $1")
                .bind(id)
                .fetch_optional(&state.db)
                .await?;
        match row {
            Some((name, hash, tags)) if constant_time_eq(&sha256(secret.as_bytes()), &hash) => {
                Ok(Self {
                    id,
                    name,
                    tags: tags.0,
                })
            }
            _ => Err(refused()),
        }
    }
}

/// A daemon registered under the request's key.
async fn daemon_of(state: &AppState, key: &KeyAuth, daemon: Uuid) -> ApiResult<Daemon> {
    let row: Option<(String, sqlx::types::Json<Tags>)> =
        sqlx::query_as("SELECT name, tags FROM provisioner_daemons WHERE id = $1 AND key_id = $2")
            .bind(daemon)
            .bind(key.id)
            .fetch_optional(&state.db)
            .await?;
    let (name, tags) = row.ok_or_else(|| {
        crate::metrics::Metrics::count(&state.metrics.provisioner_refusals, "daemon");
        ApiError::not_found("No such daemon under this provisioner key.")
            .detail("register again: the daemon may have been removed with its key")
    })?;
    Ok(Daemon {
        id: daemon,
        name,
        tags: tags.0,
    })
}

fn refused(state: &AppState, e: HostError) -> ApiError {
    match e {
        HostError::NotHeld => {
            crate::metrics::Metrics::count(&state.metrics.provisioner_refusals, "job");
            ApiError::conflict("This daemon does not hold that job.")
                .detail("it ended, timed out, or was never this daemon's")
        }
        HostError::Db(e) => e.into(),
    }
}

pub(super) async fn register(
    State(state): State<AppState>,
    key: KeyAuth,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<RegisterDaemonRequest>,
) -> ApiResult<Json<RegisterDaemonResponse>> {
    let mut v = Validator::default();
    if req.name.is_empty() || req.name.len() > 64 || req.name.chars().any(char::is_control) {
        v.add("name", "1 to 64 printable characters");
    }
    if req.version.is_empty() || req.version.len() > 64 || req.version.chars().any(char::is_control)
    {
        v.add("version", "1 to 64 printable characters");
    }
    v.check("tags", check_tags(&req.tags));
    v.finish()?;
    // Each start registers anew; a key whose daemons register endlessly
    // (a crash loop, a script gone wrong) must not fill the database.
    let recent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provisioner_daemons
         WHERE key_id = $1 AND created_at > now() - interval '1 hour'",
    )
    .bind(key.id)
    .fetch_one(&state.db)
    .await?;
    if recent >= MAX_REGISTRATIONS_PER_HOUR {
        crate::metrics::Metrics::count(&state.metrics.provisioner_refusals, "registrations");
        return Err(ApiError::too_many_requests(60).detail(format!(
            "provisioner key {:?} registered {recent} daemons in the last hour",
            key.name
        )));
    }
    // A key with tags decides what its daemons serve; one without lets
    // each daemon declare its own.
    let tags = if key.tags.is_empty() {
        req.tags.clone()
    } else if req.tags.is_empty() || req.tags == key.tags {
        key.tags.clone()
    } else {
        return Err(ApiError::forbidden(format!(
            "Provisioner key {:?} serves tags {}; this daemon declared {}.",
            key.name,
            devmesh_shared::provisionerd::show_tags(&key.tags),
            devmesh_shared::provisionerd::show_tags(&req.tags),
        ))
        .detail("start the daemon without --tag, or with its key's tags"));
    };
    let daemon = Daemon {
        id: Uuid::new_v4(),
        name: req.name.clone(),
        tags,
    };
    jobs::register_daemon(&state.db, &daemon, &req.version, Some(key.id)).await?;
    tracing::info!(daemon = %daemon.name, key = %key.name, version = %req.version, %ip, "an external provisioner daemon registered");
    Ok(Json(RegisterDaemonResponse {
        id: daemon.id,
        tags: daemon.tags,
        heartbeat_every_ms: jobs::heartbeat_every(state.config.provisioner_timeout).as_millis()
            as u64,
    }))
}

/// Long-polls for a job: 200 with its spec, or 204 when none came within
/// [`devmesh_shared::provisionerd::ACQUIRE_WAIT_SECS`].
pub(super) async fn acquire(
    State(state): State<AppState>,
    key: KeyAuth,
    ApiPath(daemon): ApiPath<Uuid>,
) -> ApiResult<Response> {
    let daemon = daemon_of(&state, &key, daemon).await?;
    let wait = Duration::from_secs(devmesh_shared::provisionerd::ACQUIRE_WAIT_SECS);
    match provisioning::acquire(&state, &daemon, wait).await? {
        Some(spec) => Ok(Json(spec).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

pub(super) async fn heartbeat(
    State(state): State<AppState>,
    key: KeyAuth,
    ApiPath((daemon, job)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let daemon = daemon_of(&state, &key, daemon).await?;
    let beat = jobs::heartbeat(&state.db, job, daemon.id).await?;
    Ok(Json(HeartbeatResponse { beat }))
}

pub(super) async fn append_logs(
    State(state): State<AppState>,
    key: KeyAuth,
    ApiPath((daemon, job)): ApiPath<(Uuid, Uuid)>,
    ApiJson(req): ApiJson<AppendLogsRequest>,
) -> ApiResult<StatusCode> {
    let daemon = daemon_of(&state, &key, daemon).await?;
    if req.lines.len() > MAX_LOG_BATCH {
        return Err(ApiError::bad_request(format!(
            "At most {MAX_LOG_BATCH} lines per call."
        )));
    }
    provisioning::append_logs(&state, job, daemon.id, &req.lines)
        .await
        .map_err(|e| refused(&state, e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body is the state file itself (at most
/// [`devmesh_shared::provisionerd::MAX_STATE_BYTES`]), read only once the
/// daemon is known to hold the job.
pub(super) async fn save_state(
    State(state): State<AppState>,
    key: KeyAuth,
    ApiPath((daemon, job)): ApiPath<(Uuid, Uuid)>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    let daemon = daemon_of(&state, &key, daemon).await?;
    provisioning::holds(&state, job, daemon.id)
        .await
        .map_err(|e| refused(&state, e))?;
    let body: Bytes = axum::body::to_bytes(body, MAX_STATE_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "A Terraform state may be at most {} MiB.",
                    MAX_STATE_BYTES / (1024 * 1024)
                ),
            )
        })?;
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return Err(ApiError::bad_request(
            "The body is not a Terraform state (JSON).",
        ));
    }
    provisioning::save_state(&state, job, daemon.id, &body)
        .await
        .map_err(|e| refused(&state, e))?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn complete(
    State(state): State<AppState>,
    key: KeyAuth,
    ApiPath((daemon, job)): ApiPath<(Uuid, Uuid)>,
    ApiJson(req): ApiJson<Completion>,
) -> ApiResult<Json<CompleteResponse>> {
    let daemon = daemon_of(&state, &key, daemon).await?;
    let recorded = provisioning::complete(&state, job, daemon.id, req).await?;
    Ok(Json(CompleteResponse { recorded }))
}
