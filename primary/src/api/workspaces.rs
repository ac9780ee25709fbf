//! Workspaces and their builds. For `external` templates a build completes
//! at once: a start build creates the declared agents and apps and returns
//! each agent's token once; stop and delete builds take them down.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use devmesh_shared::api::{
    AgentSpec, AgentStatus, AgentToken, AppHealthState, BuildStatus, CreateBuildRequest,
    CreateWorkspaceRequest, ExternalDefinition, HealthcheckSpec, LifecycleState, PortShare,
    PortSharesResponse, SharingLevel, Transition, Workspace, WorkspaceAgent, WorkspaceApp,
    WorkspaceBuild, WorkspaceBuildResponse, WorkspacesResponse,
};
use devmesh_shared::names::validate_name;
use devmesh_shared::secret::sha256;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, Validator};
use super::extract::{ApiJson, ApiPath, ApiQuery, Authed, ClientIp};
use super::templates::{VersionRow, find_template, load_version};
use super::users::find_user;
use super::{AppState, Audit, parse_uuid};

/// An agent whose last heartbeat is older than this is `timeout`.
const AGENT_TIMEOUT_SECS: i64 = 60;

// === Loading ===

#[derive(sqlx::FromRow)]
struct WorkspaceRow {
    id: Uuid,
    name: String,
    owner_id: Uuid,
    owner_name: String,
    template_id: Uuid,
    template_name: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct BuildRow {
    id: Uuid,
    build_number: i32,
    transition: String,
    status: String,
    template_version_id: Uuid,
    created_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    job_id: Option<Uuid>,
    error: Option<String>,
    parameters: sqlx::types::Json<BTreeMap<String, String>>,
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    id: Uuid,
    name: String,
    lifecycle_state: String,
    first_connected_at: Option<DateTime<Utc>>,
    last_connected_at: Option<DateTime<Utc>>,
    disconnected_at: Option<DateTime<Utc>>,
    relay_region: Option<String>,
    metadata_specs: sqlx::types::Json<Vec<devmesh_shared::api::MetadataSpec>>,
    metadata: sqlx::types::Json<BTreeMap<String, serde_json::Value>>,
}

#[derive(sqlx::FromRow)]
struct AppRow {
    id: Uuid,
    agent_id: Uuid,
    slug: String,
    display_name: String,
    url: String,
    subdomain: bool,
    sharing_level: String,
    healthcheck_url: Option<String>,
    healthcheck_interval: Option<i32>,
    healthcheck_threshold: Option<i32>,
    health: String,
}

fn transition(s: &str) -> Transition {
    match s {
        "stop" => Transition::Stop,
        "delete" => Transition::Delete,
        _ => Transition::Start,
    }
}

/// An agent's connection status, derived from its timestamps.
pub(super) fn agent_status(
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    disconnected: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> AgentStatus {
    match (first, last) {
        (None, _) | (_, None) => AgentStatus::Connecting,
        (Some(_), Some(last)) if disconnected.is_some_and(|d| d >= last) => {
            AgentStatus::Disconnected
        }
        (Some(_), Some(last)) if (now - last).num_seconds() > AGENT_TIMEOUT_SECS => {
            AgentStatus::Timeout
        }
        _ => AgentStatus::Connected,
    }
}

/// A state the database stores by name; an unknown name (a newer
/// version's) is logged and read as `fallback`.
pub(super) fn stored<T: serde::de::DeserializeOwned>(name: &str, fallback: T) -> T {
    devmesh_shared::api::from_stored(name).unwrap_or_else(|| {
        tracing::warn!(stored = %name, "an unknown state in the database");
        fallback
    })
}

const WORKSPACE_SELECT: &str =
    "SELECT w.id, w.name, w.owner_id, u.username AS owner_name, w.template_id,
    t.name AS template_name, w.created_at, w.updated_at
    FROM workspaces w JOIN users u ON u.id = w.owner_id JOIN templates t ON t.id = w.template_id";

/// A workspace's builds, newest first.
const BUILDS_SELECT: &str =
    "SELECT b.id, b.build_number, b.transition, b.status, b.template_version_id, b.created_at,
            b.completed_at, b.job_id, j.error, b.parameters
     FROM workspace_builds b LEFT JOIN provisioner_jobs j ON j.id = b.job_id
     WHERE b.workspace_id = $1 ORDER BY b.build_number DESC";

impl From<BuildRow> for WorkspaceBuild {
    fn from(build: BuildRow) -> Self {
        WorkspaceBuild {
            id: build.id,
            build_number: build.build_number,
            transition: transition(&build.transition),
            status: stored(&build.status, BuildStatus::Failed),
            template_version_id: build.template_version_id,
            created_at: build.created_at,
            completed_at: build.completed_at,
            job_id: build.job_id,
            error: build.error,
            parameters: build.parameters.0,
        }
    }
}

/// The API's view of a workspace.
async fn load(db: &sqlx::PgPool, row: WorkspaceRow) -> ApiResult<Workspace> {
    load_on(&mut *db.acquire().await?, row).await
}

/// [`load`] on one connection: the transaction that just wrote the
/// workspace reads it back before committing, so that a committed write is
/// never answered with an error from reading it afterwards.
async fn load_on(conn: &mut sqlx::PgConnection, row: WorkspaceRow) -> ApiResult<Workspace> {
    let build: BuildRow = sqlx::query_as(&format!("{BUILDS_SELECT} LIMIT 1"))
        .bind(row.id)
        .fetch_one(&mut *conn)
        .await?;
    let mut agents = Vec::new();
    if build.transition == "start" {
        let agent_rows: Vec<AgentRow> = sqlx::query_as(
            "SELECT g.id, g.name, g.lifecycle_state, g.first_connected_at, g.last_connected_at,
                    g.disconnected_at, a.relay AS relay_region, g.metadata_specs, g.metadata
             FROM workspace_agents g LEFT JOIN agent_attachments a ON a.agent_id = g.id
             WHERE g.build_id = $1 ORDER BY g.name",
        )
        .bind(build.id)
        .fetch_all(&mut *conn)
        .await?;
        let app_rows: Vec<AppRow> = sqlx::query_as(
            "SELECT a.id, a.agent_id, a.slug, a.display_name, a.url, a.subdomain, a.sharing_level,
                    a.healthcheck_url, a.healthcheck_interval, a.healthcheck_threshold, a.health
             FROM workspace_apps a JOIN workspace_agents g ON g.id = a.agent_id
             WHERE g.build_id = $1 ORDER BY a.slug",
        )
        .bind(build.id)
        .fetch_all(&mut *conn)
        .await?;
        let mut apps: HashMap<Uuid, Vec<WorkspaceApp>> = HashMap::new();
        for a in app_rows {
            let healthcheck = a.healthcheck_url.map(|url| HealthcheckSpec {
                url,
                interval_seconds: a.healthcheck_interval.unwrap_or(5) as u32,
                threshold: a.healthcheck_threshold.unwrap_or(3) as u32,
            });
            apps.entry(a.agent_id).or_default().push(WorkspaceApp {
                id: a.id,
                slug: a.slug,
                display_name: a.display_name,
                url: a.url,
                subdomain: a.subdomain,
                sharing_level: SharingLevel::from_stored(&a.sharing_level),
                health: stored(&a.health, AppHealthState::Initializing),
                healthcheck,
            });
        }
        let now = Utc::now();
        agents = agent_rows
            .into_iter()
            .map(|g| WorkspaceAgent {
                status: agent_status(
                    g.first_connected_at,
                    g.last_connected_at,
                    g.disconnected_at,
                    now,
                ),
                apps: apps.remove(&g.id).unwrap_or_default(),
                id: g.id,
                name: g.name,
                lifecycle_state: stored(&g.lifecycle_state, LifecycleState::Created),
                first_connected_at: g.first_connected_at,
                last_connected_at: g.last_connected_at,
                disconnected_at: g.disconnected_at,
                relay_region: g.relay_region,
                metadata: g
                    .metadata_specs
                    .0
                    .iter()
                    .map(|spec| {
                        let v = g.metadata.0.get(&spec.key);
                        devmesh_shared::api::AgentMetadata {
                            key: spec.key.clone(),
                            value: v
                                .and_then(|v| v["value"].as_str())
                                .unwrap_or_default()
                                .to_owned(),
                            error: v.and_then(|v| v["error"].as_str()).map(str::to_owned),
                            collected_at: v.and_then(|v| {
                                serde_json::from_value(v["collected_at"].clone()).ok()
                            }),
                        }
                    })
                    .collect(),
            })
            .collect();
    }
    let resources: Option<sqlx::types::Json<Vec<devmesh_shared::api::WorkspaceResource>>> =
        sqlx::query_scalar(
            "SELECT resources FROM workspace_builds WHERE workspace_id = $1 AND status = 'succeeded'
             ORDER BY build_number DESC LIMIT 1",
        )
        .bind(row.id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(Workspace {
        resources: resources.map(|r| r.0).unwrap_or_default(),
        id: row.id,
        name: row.name,
        owner_id: row.owner_id,
        owner_name: row.owner_name,
        template_id: row.template_id,
        template_name: row.template_name,
        latest_build: build.into(),
        agents,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// Finds a workspace the caller may see. Others' workspaces are "not
/// found" to members, so names do not leak.
async fn find_visible(
    db: &sqlx::PgPool,
    auth: &Authed,
    id: Uuid,
    include_deleted: bool,
) -> ApiResult<WorkspaceRow> {
    find_visible_on(&mut *db.acquire().await?, auth, id, include_deleted).await
}

/// [`find_visible`] on one connection (a transaction's, as [`load_on`]).
async fn find_visible_on(
    db: &mut sqlx::PgConnection,
    auth: &Authed,
    id: Uuid,
    include_deleted: bool,
) -> ApiResult<WorkspaceRow> {
    let deleted = if include_deleted {
        ""
    } else {
        "AND NOT w.deleted"
    };
    let row: Option<WorkspaceRow> =
        sqlx::query_as(&format!("{WORKSPACE_SELECT} WHERE w.id = $1 {deleted}"))
            .bind(id)
            .fetch_optional(db)
            .await?;
    match row {
        Some(r) if r.owner_id == auth.0.user_id || auth.0.is_owner() => Ok(r),
        _ => Err(ApiError::not_found("No such workspace.")),
    }
}

// === Building ===

/// Creates the declared agents and apps for a start build; returns tokens.
async fn create_agents(
    tx: &mut sqlx::PgConnection,
    workspace_id: Uuid,
    build_id: Uuid,
    def: &ExternalDefinition,
) -> ApiResult<Vec<AgentToken>> {
    let agents: Vec<(AgentSpec, String)> = def
        .agents
        .iter()
        .map(|a| (a.clone(), devmesh_shared::token::new_agent_token()))
        .collect();
    Ok(insert_agents(tx, workspace_id, build_id, &agents).await?)
}

/// Records a start build's agents with their tokens (stored hashed) and
/// their apps; returns the tokens with the agents' ids.
pub(crate) async fn insert_agents(
    tx: &mut sqlx::PgConnection,
    workspace_id: Uuid,
    build_id: Uuid,
    agents: &[(AgentSpec, String)],
) -> sqlx::Result<Vec<AgentToken>> {
    let mut tokens = Vec::with_capacity(agents.len());
    for (agent, token) in agents {
        let agent_id = Uuid::new_v4();
        let token = token.clone();
        sqlx::query(
            "INSERT INTO workspace_agents (id, build_id, workspace_id, name, token_hash, directory, env, scripts, metadata_specs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(agent_id)
        .bind(build_id)
        .bind(workspace_id)
        .bind(&agent.name)
        .bind(sha256(token.as_bytes()).as_slice())
        .bind(&agent.directory)
        .bind(sqlx::types::Json(&agent.env))
        .bind(sqlx::types::Json(&agent.scripts))
        .bind(sqlx::types::Json(&agent.metadata))
        .execute(&mut *tx)
        .await?;
        for app in &agent.apps {
            let url = app
                .url
                .clone()
                .unwrap_or_else(|| format!("http://127.0.0.1:{}", app.port.unwrap_or(80)));
            let hc = app.healthcheck.as_ref();
            sqlx::query(
                "INSERT INTO workspace_apps (id, agent_id, slug, display_name, url, subdomain, sharing_level,
                     healthcheck_url, healthcheck_interval, healthcheck_threshold, health)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(Uuid::new_v4())
            .bind(agent_id)
            .bind(&app.slug)
            .bind(app.display_name.clone().unwrap_or_else(|| app.slug.clone()))
            .bind(url)
            .bind(app.subdomain)
            .bind(app.sharing_level.as_str())
            .bind(hc.map(|h| h.url.clone()))
            .bind(hc.map(|h| h.interval_seconds as i32))
            .bind(hc.map(|h| h.threshold as i32))
            .bind(if hc.is_some() { "initializing" } else { "disabled" })
            .execute(&mut *tx)
            .await?;
        }
        tokens.push(AgentToken {
            agent_id,
            agent_name: agent.name.clone(),
            token,
        });
    }
    Ok(tokens)
}

/// The parameter values a build of `version` runs with (`given` over
/// `previous` over defaults); each problem goes to `v` under
/// `parameters.<name>`.
fn parameter_values(
    v: &mut Validator,
    version: &VersionRow,
    given: &BTreeMap<String, String>,
    previous: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    devmesh_shared::parameters::resolve(&version.parameters, given, previous).unwrap_or_else(
        |problems| {
            for (name, problem) in problems {
                v.add(format!("parameters.{name}"), problem);
            }
            BTreeMap::new()
        },
    )
}

/// A build about to be recorded.
struct NewBuild<'a> {
    id: Uuid,
    workspace_id: Uuid,
    version_id: Uuid,
    transition: Transition,
    initiator: Uuid,
    /// The provisioner job running it (Terraform templates).
    job: Option<Uuid>,
    parameters: &'a BTreeMap<String, String>,
}

const NO_PARAMETERS: &BTreeMap<String, String> = &BTreeMap::new();

impl NewBuild<'_> {
    /// A build of an external template, complete as it is recorded.
    fn external(
        workspace_id: Uuid,
        version_id: Uuid,
        transition: Transition,
        initiator: Uuid,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            workspace_id,
            version_id,
            transition,
            initiator,
            job: None,
            parameters: NO_PARAMETERS,
        }
    }
}

/// Records a build: complete at once for external templates, or pending
/// with the provisioner `job` that will run it (Terraform templates).
async fn insert_build(tx: &mut sqlx::PgConnection, b: NewBuild<'_>) -> ApiResult<Uuid> {
    let NewBuild {
        id,
        workspace_id,
        version_id,
        transition,
        initiator,
        job,
        parameters,
    } = b;
    sqlx::query(
        "INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number, transition, status, initiator_id, job_id, completed_at, parameters)
         SELECT $1, $2, $3, coalesce(max(build_number), 0) + 1, $4,
                CASE WHEN $6::uuid IS NULL THEN 'succeeded' ELSE 'pending' END, $5, $6,
                CASE WHEN $6::uuid IS NULL THEN now() END, $7
         FROM workspace_builds WHERE workspace_id = $2",
    )
    .bind(id)
    .bind(workspace_id)
    .bind(version_id)
    .bind(transition.as_str())
    .bind(initiator)
    .bind(job)
    .bind(sqlx::types::Json(parameters))
    .execute(&mut *tx)
    .await?;
    Ok(id)
}

/// Records a build of a Terraform template: pending, with the provisioner
/// job that will run it.
async fn queue_build(
    tx: &mut sqlx::PgConnection,
    workspace_id: Uuid,
    version_id: Uuid,
    transition: Transition,
    initiator: Uuid,
    parameters: &BTreeMap<String, String>,
) -> ApiResult<Uuid> {
    let id = Uuid::new_v4();
    let tags: sqlx::types::Json<crate::jobs::Tags> =
        sqlx::query_scalar("SELECT provisioner_tags FROM template_versions WHERE id = $1")
            .bind(version_id)
            .fetch_one(&mut *tx)
            .await?;
    let job = crate::jobs::enqueue(
        &mut *tx,
        crate::jobs::JobKind::Build,
        &tags.0,
        &serde_json::json!({ "build_id": id }),
    )
    .await?;
    let build = NewBuild {
        id,
        workspace_id,
        version_id,
        transition,
        initiator,
        job: Some(job),
        parameters,
    };
    insert_build(tx, build).await
}

/// Refuses workspaces whose app or dev-URL hostnames would not fit in one
/// DNS label.
fn check_hostnames(v: &mut Validator, def: &ExternalDefinition, workspace: &str, owner: &str) {
    for agent in &def.agents {
        let slugs: Vec<Option<&str>> = if agent.apps.is_empty() {
            vec![None]
        } else {
            agent.apps.iter().map(|a| Some(a.slug.as_str())).collect()
        };
        for slug in slugs {
            if let Err(e) = devmesh_shared::apphost::check_fits(slug, &agent.name, workspace, owner)
            {
                v.add("name", e);
                return;
            }
        }
    }
}

// === Handlers ===

pub(super) async fn create(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateWorkspaceRequest>,
) -> ApiResult<(StatusCode, Json<WorkspaceBuildResponse>)> {
    let mut v = Validator::default();
    v.check("name", validate_name(&req.name));
    v.finish()?;
    let (owner_id, owner_name) = match &req.owner {
        Some(o) if o != "me" && o != &auth.0.username && *o != auth.0.user_id.to_string() => {
            auth.require_owner()?;
            let u = find_user(&state, o).await?;
            (u.id, u.username)
        }
        _ => (auth.0.user_id, auth.0.username.clone()),
    };
    let template = find_template(&state.db, &req.template).await?;
    let version = load_version(&state.db, template.active_version_id).await?;
    if let Some(why) = version.unusable() {
        return Err(ApiError::conflict(why));
    }
    let mut v = Validator::default();
    check_hostnames(&mut v, &version.definition, &req.name, &owner_name);
    let parameters = parameter_values(&mut v, &version, &req.parameters, &BTreeMap::new());
    v.finish()?;

    let id = Uuid::new_v4();
    let mut tx = state.db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO workspaces (id, owner_id, template_id, name) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(owner_id)
    .bind(template.id)
    .bind(&req.name)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(e) if crate::db::is_unique_violation(&e) => {
            return Err(ApiError::conflict(format!(
                "{owner_name} already has a workspace named {:?}.",
                req.name
            )));
        }
        other => {
            other?;
        }
    }
    let agent_tokens = if version.kind == "terraform" {
        queue_build(
            &mut tx,
            id,
            version.id,
            Transition::Start,
            auth.0.user_id,
            &parameters,
        )
        .await?;
        Vec::new()
    } else {
        let build_id = insert_build(
            &mut tx,
            NewBuild::external(id, version.id, Transition::Start, auth.0.user_id),
        )
        .await?;
        create_agents(&mut tx, id, build_id, &version.definition).await?
    };
    Audit::new("create", "workspace")
        .resource(id, format!("{owner_name}/{}", req.name))
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"template": template.name}))
        .write_in(&mut tx)
        .await?;
    // Read back before the commit: once committed, nothing may answer
    // that the workspace was not created.
    let row = find_visible_on(&mut tx, &auth, id, false).await?;
    let workspace = load_on(&mut tx, row).await?;
    tx.commit().await?;
    state.provisioner_wake.notify_waiters();
    Ok((
        StatusCode::CREATED,
        Json(WorkspaceBuildResponse {
            workspace,
            agent_tokens,
        }),
    ))
}

pub(super) async fn list(
    State(state): State<AppState>,
    auth: Authed,
    ApiQuery(q): ApiQuery<devmesh_shared::api::WorkspacesQuery>,
) -> ApiResult<Json<WorkspacesResponse>> {
    let owner = q.owner.as_deref().unwrap_or("me");
    let rows: Vec<WorkspaceRow> = match owner {
        "me" => {
            sqlx::query_as(&format!(
                "{WORKSPACE_SELECT} WHERE NOT w.deleted AND w.owner_id = $1 ORDER BY w.name"
            ))
            .bind(auth.0.user_id)
            .fetch_all(&state.db)
            .await?
        }
        "all" => {
            auth.require_owner()?;
            sqlx::query_as(&format!(
                "{WORKSPACE_SELECT} WHERE NOT w.deleted ORDER BY u.username, w.name"
            ))
            .fetch_all(&state.db)
            .await?
        }
        other => {
            let user = find_user(&state, other).await?;
            if user.id != auth.0.user_id {
                auth.require_owner()?;
            }
            sqlx::query_as(&format!(
                "{WORKSPACE_SELECT} WHERE NOT w.deleted AND w.owner_id = $1 ORDER BY w.name"
            ))
            .bind(user.id)
            .fetch_all(&state.db)
            .await?
        }
    };
    let mut workspaces = Vec::with_capacity(rows.len());
    for row in rows {
        workspaces.push(load(&state.db, row).await?);
    }
    Ok(Json(WorkspacesResponse { workspaces }))
}

pub(super) async fn get(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Workspace>> {
    let id = parse_uuid(&id).ok_or_else(|| ApiError::not_found("No such workspace."))?;
    let row = find_visible(&state.db, &auth, id, false).await?;
    Ok(Json(load(&state.db, row).await?))
}

/// `GET /api/v2/workspaces/{id}/builds`: the workspace's builds, newest
/// first (at most 100).
pub(super) async fn builds(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Vec<WorkspaceBuild>>> {
    let id = parse_uuid(&id).ok_or_else(|| ApiError::not_found("No such workspace."))?;
    find_visible(&state.db, &auth, id, false).await?;
    let rows: Vec<BuildRow> = sqlx::query_as(&format!("{BUILDS_SELECT} LIMIT 100"))
        .bind(id)
        .fetch_all(&state.db)
        .await?;
    Ok(Json(rows.into_iter().map(WorkspaceBuild::from).collect()))
}

/// A provisioner job's status and log: a build's to whoever may see its
/// workspace, a template import's to owners.
pub(super) async fn job_logs(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
    super::extract::ApiQuery(q): super::extract::ApiQuery<devmesh_shared::api::AfterQuery>,
) -> ApiResult<Json<devmesh_shared::api::JobLogsResponse>> {
    let not_found = || ApiError::not_found("No such job.");
    let id = parse_uuid(&id).ok_or_else(not_found)?;
    let workspace: Option<Uuid> =
        sqlx::query_scalar("SELECT workspace_id FROM workspace_builds WHERE job_id = $1")
            .bind(id)
            .fetch_optional(&state.db)
            .await?;
    match workspace {
        Some(workspace) => {
            find_visible(&state.db, &auth, workspace, true)
                .await
                .map_err(|_| not_found())?;
        }
        // A template import: owners push templates and read their imports.
        None => {
            let import: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM template_versions WHERE import_job_id = $1)",
            )
            .bind(id)
            .fetch_one(&state.db)
            .await?;
            if !import || !auth.0.is_owner() {
                return Err(not_found());
            }
        }
    }
    let job = crate::jobs::get(&state.db, id)
        .await?
        .ok_or_else(not_found)?;
    let logs = crate::jobs::logs(&state.db, id, q.after, 1000).await?;
    // A job no daemon can take says so instead of waiting silently.
    let waiting = if job.status == crate::jobs::JobStatus::Pending
        && !crate::jobs::takeable(&state.db, &job.tags, super::provisioners::CONNECTED_WITHIN)
            .await?
    {
        Some(format!(
            "No connected provisioner daemon serves tags {}: the job waits until one does (`devmesh provisioner list` shows them; start one with `devmesh provisioner start`).",
            devmesh_shared::provisionerd::show_tags(&job.tags)
        ))
    } else {
        None
    };
    Ok(Json(devmesh_shared::api::JobLogsResponse {
        status: job.status.as_str().to_owned(),
        error: job.error,
        waiting,
        logs: logs
            .into_iter()
            .map(|l| devmesh_shared::api::JobLogLine {
                id: l.id,
                stream: l.stream,
                line: l.line,
                created_at: l.created_at,
            })
            .collect(),
    }))
}

/// Cancels a workspace's running build: a pending one at once, a running
/// one as soon as its daemon hears of it (Terraform is interrupted
/// gracefully). 409 when no build is running.
pub(super) async fn cancel_build(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Workspace>> {
    let id = parse_uuid(&id).ok_or_else(|| ApiError::not_found("No such workspace."))?;
    let row = find_visible(&state.db, &auth, id, false).await?;
    let latest: Option<(Uuid, Option<Uuid>, String)> = sqlx::query_as(
        "SELECT id, job_id, status FROM workspace_builds WHERE workspace_id = $1
         ORDER BY build_number DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&state.db)
    .await?;
    let Some((build, Some(job), status)) =
        latest.filter(|l| matches!(l.2.as_str(), "pending" | "running"))
    else {
        return Err(ApiError::conflict("No build of this workspace is running."));
    };
    if crate::jobs::cancel(&state.db, job).await? == Some(crate::jobs::JobStatus::Canceled) {
        // No daemon had it: nobody else will record the outcome.
        sqlx::query(
            "UPDATE workspace_builds SET status = 'canceled', completed_at = now() WHERE id = $1",
        )
        .bind(build)
        .execute(&state.db)
        .await?;
    }
    let mut tx = state.db.begin().await?;
    Audit::new("cancel", "workspace_build")
        .resource(id, format!("{}/{}", row.owner_name, row.name))
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"status_before": status}))
        .write_in(&mut tx)
        .await?;
    let row = find_visible_on(&mut tx, &auth, id, false).await?;
    let workspace = load_on(&mut tx, row).await?;
    tx.commit().await?;
    state.provisioner_wake.notify_waiters();
    Ok(Json(workspace))
}

pub(super) async fn get_by_name(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath((user, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<Workspace>> {
    let user = if user == "me" {
        auth.0.user_id.to_string()
    } else {
        user
    };
    let owner = find_user(&state, &user).await?;
    let id: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM workspaces WHERE owner_id = $1 AND name = $2 AND NOT deleted",
    )
    .bind(owner.id)
    .bind(&name)
    .fetch_optional(&state.db)
    .await?;
    let id = id.ok_or_else(|| ApiError::not_found("No such workspace."))?;
    let row = find_visible(&state.db, &auth, id, false).await?;
    Ok(Json(load(&state.db, row).await?))
}

pub(super) async fn build(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CreateBuildRequest>,
) -> ApiResult<(StatusCode, Json<WorkspaceBuildResponse>)> {
    let id = parse_uuid(&id).ok_or_else(|| ApiError::not_found("No such workspace."))?;
    let row = find_visible(&state.db, &auth, id, false).await?;
    let mut tx = state.db.begin().await?;
    // One build at a time per workspace.
    sqlx::query("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let (latest, latest_status, latest_version, previous): (
        String,
        String,
        Uuid,
        sqlx::types::Json<BTreeMap<String, String>>,
    ) = sqlx::query_as(
        "SELECT transition, status, template_version_id, parameters FROM workspace_builds
         WHERE workspace_id = $1 ORDER BY build_number DESC LIMIT 1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if matches!(latest_status.as_str(), "pending" | "running") {
        return Err(ApiError::conflict(
            "A build of this workspace is still running; wait for it or cancel it.",
        ));
    }
    let latest_kind: String =
        sqlx::query_scalar("SELECT kind FROM template_versions WHERE id = $1")
            .bind(latest_version)
            .fetch_one(&mut *tx)
            .await?;
    let mut agent_tokens = Vec::new();
    let changes = req.update || !req.parameters.is_empty();
    if changes && req.transition != Transition::Start {
        return Err(ApiError::bad_request(
            "Only start builds update the workspace or change its parameters.",
        ));
    }
    match (transition(&latest), req.transition) {
        (Transition::Start, Transition::Start) if !(changes && latest_kind == "terraform") => {
            return Err(ApiError::conflict("The workspace is already started.")
                .detail("`devmesh update` applies a new version or parameters to a started workspace; `devmesh restart` stops and starts it"));
        }
        (Transition::Stop, Transition::Stop) => {
            return Err(ApiError::conflict("The workspace is already stopped."));
        }
        (_, Transition::Start) => {
            let template = find_template(&state.db, &row.template_id.to_string()).await?;
            // A Terraform workspace keeps its version until it is updated;
            // external templates have nothing to keep (each start declares
            // the agents afresh).
            let version_id = if latest_kind == "terraform" && !req.update {
                latest_version
            } else {
                template.active_version_id
            };
            let version = load_version(&mut *tx, version_id).await?;
            if version.kind == "terraform" {
                if let Some(why) = version.unusable() {
                    return Err(ApiError::conflict(why));
                }
                let mut v = Validator::default();
                for (name, value) in &req.parameters {
                    let fixed = version
                        .parameters
                        .iter()
                        .find(|p| &p.name == name)
                        .is_some_and(|p| !p.mutable);
                    if fixed && previous.0.get(name).is_some_and(|old| old != value) {
                        v.add(
                            format!("parameters.{name}"),
                            "is not mutable: it cannot change once the workspace exists",
                        );
                    }
                }
                let parameters = parameter_values(&mut v, &version, &req.parameters, &previous.0);
                v.finish()?;
                queue_build(
                    &mut tx,
                    id,
                    version.id,
                    Transition::Start,
                    auth.0.user_id,
                    &parameters,
                )
                .await?;
            } else {
                if !req.parameters.is_empty() {
                    return Err(ApiError::bad_request(
                        "This workspace's template has no parameters.",
                    ));
                }
                let build_id = insert_build(
                    &mut tx,
                    NewBuild::external(id, version.id, Transition::Start, auth.0.user_id),
                )
                .await?;
                agent_tokens = create_agents(&mut tx, id, build_id, &version.definition).await?;
            }
        }
        // Terraform stops and deletes run on a provisioner; a delete marks
        // the workspace deleted only once Terraform destroyed it.
        (_, t) if latest_kind == "terraform" => {
            queue_build(&mut tx, id, latest_version, t, auth.0.user_id, &previous.0).await?;
        }
        (_, t) => {
            insert_build(
                &mut tx,
                NewBuild::external(id, latest_version, t, auth.0.user_id),
            )
            .await?;
            if t == Transition::Delete {
                sqlx::query(
                    "UPDATE workspaces SET deleted = true, updated_at = now() WHERE id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    sqlx::query("UPDATE workspaces SET updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Audit::new(req.transition.as_str(), "workspace")
        .resource(id, format!("{}/{}", row.owner_name, row.name))
        .by(&auth.0)
        .ip(&ip)
        .write_in(&mut tx)
        .await?;
    // Read back before the commit, as `create` does.
    let row = find_visible_on(&mut tx, &auth, id, true).await?;
    let workspace = load_on(&mut tx, row).await?;
    tx.commit().await?;
    state.provisioner_wake.notify_waiters();
    state.workspace_changed(id).await;
    Ok((
        StatusCode::CREATED,
        Json(WorkspaceBuildResponse {
            workspace,
            agent_tokens,
        }),
    ))
}

pub(super) async fn list_port_shares(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<PortSharesResponse>> {
    let id = parse_uuid(&id).ok_or_else(|| ApiError::not_found("No such workspace."))?;
    find_visible(&state.db, &auth, id, false).await?;
    let rows: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT agent_name, port, sharing_level FROM port_shares WHERE workspace_id = $1 ORDER BY agent_name, port")
            .bind(id)
            .fetch_all(&state.db)
            .await?;
    let shares = rows
        .into_iter()
        .map(|(agent_name, port, level)| PortShare {
            agent_name,
            port: port as u16,
            sharing_level: SharingLevel::from_stored(&level),
        })
        .collect();
    Ok(Json(PortSharesResponse { shares }))
}

/// Shares a port (`authenticated` or `public`), or unshares it (`owner`).
pub(super) async fn set_port_share(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PortShare>,
) -> ApiResult<Json<PortShare>> {
    let id = parse_uuid(&id).ok_or_else(|| ApiError::not_found("No such workspace."))?;
    let row = find_visible(&state.db, &auth, id, false).await?;
    let mut v = Validator::default();
    v.check("agent_name", validate_name(&req.agent_name));
    if req.port == 0 {
        v.add("port", "must be 1-65535");
    }
    v.finish()?;
    if req.sharing_level == SharingLevel::Owner {
        sqlx::query(
            "DELETE FROM port_shares WHERE workspace_id = $1 AND agent_name = $2 AND port = $3",
        )
        .bind(id)
        .bind(&req.agent_name)
        .bind(i32::from(req.port))
        .execute(&state.db)
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO port_shares (workspace_id, agent_name, port, sharing_level) VALUES ($1, $2, $3, $4)
             ON CONFLICT (workspace_id, agent_name, port) DO UPDATE SET sharing_level = EXCLUDED.sharing_level",
        )
        .bind(id)
        .bind(&req.agent_name)
        .bind(i32::from(req.port))
        .bind(req.sharing_level.as_str())
        .execute(&state.db)
        .await?;
    }
    state.workspace_changed(id).await;
    Audit::new("share_port", "workspace")
        .resource(id, format!("{}/{}", row.owner_name, row.name))
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"agent": req.agent_name, "port": req.port, "sharing_level": req.sharing_level}))
        .write(&state.db)
        .await;
    Ok(Json(req))
}

// === Live view ===

/// How long changes are gathered before they are sent: a build touches a
/// workspace several times in a moment.
const WATCH_COALESCE: std::time::Duration = std::time::Duration::from_millis(150);

/// `GET /api/v2/workspaces/watch`: server-sent events for the dashboard.
/// `workspace` carries a workspace the caller may see, as `GET
/// /workspaces/{id}` would, each time it (its builds, its agents) changes;
/// `deleted` carries `{"id"}` of one that is gone; `resync` says changes
/// may have been missed (reload). Ends when the caller's key or user is
/// revoked, or the server stops.
pub(super) async fn watch(
    State(state): State<AppState>,
    auth: Authed,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use devmesh_shared::api::RevokedSubject;
    use tokio::sync::broadcast::error::RecvError;

    use crate::events::WorkspaceNote;

    let began = Utc::now().timestamp_millis();
    let notes = state.bus.watch_workspaces();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut notes = notes;
        let revoked = |state: &AppState| {
            state
                .revocations
                .cuts(&RevokedSubject::User { id: auth.0.user_id }, began)
                || state.revocations.cuts(
                    &RevokedSubject::Key {
                        id: auth.0.key_id.clone(),
                    },
                    began,
                )
        };
        loop {
            // One change, then whatever else comes within the window.
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                n = notes.recv() => n,
                // Signing out ends the stream within a second, changes or not.
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    if revoked(&state) {
                        return;
                    }
                    continue;
                }
            };
            let mut changed = std::collections::BTreeSet::new();
            let mut gap = false;
            let mut take = |n: Result<WorkspaceNote, RecvError>| match n {
                Ok(WorkspaceNote::Changed(id)) => {
                    changed.insert(id);
                    true
                }
                Ok(WorkspaceNote::Gap) | Err(RecvError::Lagged(_)) => {
                    gap = true;
                    true
                }
                Err(RecvError::Closed) => false,
            };
            if !take(first) {
                return;
            }
            let window = tokio::time::sleep(WATCH_COALESCE);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    () = &mut window => break,
                    n = notes.recv() => if !take(n) { return },
                }
            }
            if revoked(&state) {
                return;
            }
            if gap {
                if tx
                    .send(Event::default().event("resync").data("{}"))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            for id in changed {
                let event = match find_visible(&state.db, &auth, id, true).await {
                    Ok(row) => {
                        let deleted: bool =
                            sqlx::query_scalar("SELECT deleted FROM workspaces WHERE id = $1")
                                .bind(id)
                                .fetch_one(&state.db)
                                .await
                                .unwrap_or(false);
                        if deleted {
                            Event::default()
                                .event("deleted")
                                .data(serde_json::json!({ "id": id }).to_string())
                        } else {
                            match load(&state.db, row).await {
                                Ok(ws) => Event::default()
                                    .event("workspace")
                                    .data(serde_json::to_string(&ws).unwrap_or_default()),
                                Err(_) => continue,
                            }
                        }
                    }
                    // Not this caller's to see.
                    Err(_) => continue,
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn agent_status_follows_heartbeats() {
        let now = Utc::now();
        assert_eq!(agent_status(None, None, None, now), AgentStatus::Connecting);
        assert_eq!(
            agent_status(Some(now), Some(now), None, now),
            AgentStatus::Connected
        );
        let old = now - Duration::seconds(120);
        assert_eq!(
            agent_status(Some(old), Some(old), None, now),
            AgentStatus::Timeout
        );
        assert_eq!(
            agent_status(Some(old), Some(old), Some(now), now),
            AgentStatus::Disconnected
        );
    }
}
