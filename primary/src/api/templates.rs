//! Templates and their versions. Owners create them; everyone signed in
//! may read them. The `external` kind declares agents and apps in JSON;
//! the `terraform` kind is a directory of Terraform code, uploaded as a tar
//! archive that is checked (size, paths, entry types) before it is stored.

use std::collections::HashSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use devmesh_shared::api::{
    CreateTemplateRequest, CreateTemplateVersionRequest, ExternalDefinition, Template,
    TemplateKind, TemplateVersion, TemplateVersionsResponse, TemplatesResponse,
};
use devmesh_shared::names::validate_name;
use devmesh_shared::parameters::TemplateParameter;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, Validator};
use super::extract::{ApiJson, ApiPath, Authed, ClientIp};
use super::{AppState, Audit, parse_uuid};

/// What a version stores: its kind, its declaration (external) and its
/// archive (terraform), checked.
pub(super) struct VersionContent {
    kind: TemplateKind,
    definition: ExternalDefinition,
    archive: Option<Vec<u8>>,
    /// The tags a provisioner daemon needs to run its jobs.
    tags: devmesh_shared::provisionerd::Tags,
}

/// Checks what a create request gives for its kind.
fn content(
    kind: TemplateKind,
    definition: ExternalDefinition,
    archive: Option<String>,
    tags: devmesh_shared::provisionerd::Tags,
) -> ApiResult<VersionContent> {
    use base64::Engine as _;
    let mut v = Validator::default();
    v.check(
        "provisioner_tags",
        devmesh_shared::provisionerd::check_tags(&tags),
    );
    if kind != TemplateKind::Terraform && !tags.is_empty() {
        v.add(
            "provisioner_tags",
            "only terraform templates run on provisioners",
        );
    }
    let archive = match (kind, archive) {
        (TemplateKind::External, None) => {
            validate_definition(&mut v, "definition", &definition);
            None
        }
        (TemplateKind::External, Some(_)) => {
            v.add("archive", "only terraform templates take an archive");
            None
        }
        (TemplateKind::Terraform, None) => {
            v.add(
                "archive",
                "a terraform template needs its directory as an archive",
            );
            None
        }
        (TemplateKind::Terraform, Some(encoded)) => {
            if !definition.agents.is_empty() {
                v.add(
                    "definition",
                    "terraform templates declare agents in Terraform code",
                );
            }
            match base64::engine::general_purpose::STANDARD.decode(encoded.trim()) {
                Err(_) => {
                    v.add("archive", "must be base64");
                    None
                }
                Ok(bytes) if bytes.len() > devmesh_shared::api::MAX_TEMPLATE_ARCHIVE => {
                    v.add(
                        "archive",
                        format!(
                            "at most {} KiB",
                            devmesh_shared::api::MAX_TEMPLATE_ARCHIVE / 1024
                        ),
                    );
                    None
                }
                Ok(bytes) => match devmesh_provisioner::archive::check(&bytes) {
                    Ok(_) => Some(bytes),
                    Err(e) => {
                        v.add("archive", e.to_string());
                        None
                    }
                },
            }
        }
    };
    v.finish()?;
    Ok(VersionContent {
        kind,
        definition,
        archive,
        tags,
    })
}

/// Queues the import of a Terraform version: a provisioner plans it and
/// records its parameters before workspaces may use it.
async fn queue_import(
    tx: &mut sqlx::PgConnection,
    version: Uuid,
    content: &VersionContent,
) -> ApiResult<()> {
    if content.kind != TemplateKind::Terraform {
        return Ok(());
    }
    let job = crate::jobs::enqueue(
        &mut *tx,
        crate::jobs::JobKind::Import,
        &content.tags,
        &serde_json::json!({ "version_id": version }),
    )
    .await?;
    sqlx::query("UPDATE template_versions SET import_job_id = $2 WHERE id = $1")
        .bind(version)
        .bind(job)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn kind_name(kind: TemplateKind) -> &'static str {
    match kind {
        TemplateKind::External => "external",
        TemplateKind::Terraform => "terraform",
    }
}

/// Checks an external definition, recording problems under `prefix`.
pub(super) fn validate_definition(v: &mut Validator, prefix: &str, def: &ExternalDefinition) {
    if def.agents.is_empty() {
        v.add(format!("{prefix}.agents"), "declare at least one agent");
    }
    if def.agents.len() > 16 {
        v.add(format!("{prefix}.agents"), "at most 16 agents");
    }
    let mut agent_names = HashSet::new();
    for (i, agent) in def.agents.iter().enumerate() {
        let at = format!("{prefix}.agents[{i}]");
        v.check(format!("{at}.name"), validate_name(&agent.name));
        if !agent_names.insert(&agent.name) {
            v.add(format!("{at}.name"), "agent names must be unique");
        }
        for key in agent.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                v.add(
                    format!("{at}.env"),
                    format!("{key:?} is not a valid variable name"),
                );
            }
        }
        let mut slugs = HashSet::new();
        for (j, app) in agent.apps.iter().enumerate() {
            let at = format!("{at}.apps[{j}]");
            v.check(format!("{at}.slug"), validate_name(&app.slug));
            if devmesh_shared::apphost::looks_like_port(&app.slug) {
                v.add(
                    format!("{at}.slug"),
                    "must not look like a port number (those are dev URLs)",
                );
            }
            if !slugs.insert(&app.slug) {
                v.add(format!("{at}.slug"), "app slugs must be unique per agent");
            }
            match (&app.port, &app.url) {
                (Some(_), Some(_)) => v.add(&at, "give either port or url, not both"),
                (None, None) => v.add(&at, "give the app's port or url"),
                (Some(0), None) => v.add(format!("{at}.port"), "must be 1-65535"),
                (None, Some(url)) if !is_http_url(url) => {
                    v.add(format!("{at}.url"), "must be an http:// or https:// URL")
                }
                (None, Some(url)) if upstream(url).is_none() => v.add(
                    format!("{at}.url"),
                    "must point at the agent's own machine (localhost, 127.0.0.1 or [::1])",
                ),
                _ => {}
            }
            if app
                .display_name
                .as_ref()
                .is_some_and(|d| d.chars().count() > 64)
            {
                v.add(
                    format!("{at}.display_name"),
                    "must be at most 64 characters",
                );
            }
            if let Some(hc) = &app.healthcheck {
                if !is_http_url(&hc.url) {
                    v.add(
                        format!("{at}.healthcheck.url"),
                        "must be an http:// or https:// URL",
                    );
                }
                if hc.interval_seconds == 0 || hc.interval_seconds > 3600 {
                    v.add(
                        format!("{at}.healthcheck.interval_seconds"),
                        "must be 1-3600",
                    );
                }
                if hc.threshold == 0 || hc.threshold > 100 {
                    v.add(format!("{at}.healthcheck.threshold"), "must be 1-100");
                }
            }
        }
        for (j, script) in agent.scripts.iter().enumerate() {
            let at = format!("{at}.scripts[{j}]");
            if script.name.is_empty() || script.name.chars().count() > 64 {
                v.add(format!("{at}.name"), "must be 1-64 characters");
            }
            if script.script.len() > 64 * 1024 {
                v.add(format!("{at}.script"), "must be at most 64 KiB");
            }
            if script.timeout_seconds == 0 || script.timeout_seconds > 86_400 {
                v.add(format!("{at}.timeout_seconds"), "must be 1-86400");
            }
        }
        if agent.metadata.len() > devmesh_shared::api::MAX_AGENT_METADATA {
            v.add(
                format!("{at}.metadata"),
                format!("at most {} items", devmesh_shared::api::MAX_AGENT_METADATA),
            );
        }
        let mut keys = HashSet::new();
        for (j, m) in agent.metadata.iter().enumerate() {
            let at = format!("{at}.metadata[{j}]");
            if m.key.is_empty() || m.key.chars().count() > 64 || m.key.chars().any(char::is_control)
            {
                v.add(format!("{at}.key"), "must be 1-64 printable characters");
            }
            if !keys.insert(&m.key) {
                v.add(format!("{at}.key"), "is used twice");
            }
            if m.script.is_empty() || m.script.len() > 8 * 1024 {
                v.add(format!("{at}.script"), "must be 1 byte to 8 KiB");
            }
            if m.interval_seconds == 0 || m.interval_seconds > 86_400 {
                v.add(format!("{at}.interval_seconds"), "must be 1-86400");
            }
            if m.timeout_seconds == 0 || m.timeout_seconds > m.interval_seconds {
                v.add(format!("{at}.timeout_seconds"), "must be 1 to the interval");
            }
        }
    }
}

/// Where an app URL points inside the workspace: `(port, https, path)`.
/// Agents only connect to their own loopback interface.
pub(crate) fn upstream(url: &str) -> Option<(u16, bool, String)> {
    let u = url::Url::parse(url).ok()?;
    let https = match u.scheme() {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    let local = match u.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    local.then(|| {
        (
            u.port_or_known_default().unwrap_or(80),
            https,
            u.path().to_owned(),
        )
    })
}

fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

// === Rows ===

#[derive(sqlx::FromRow)]
pub(super) struct VersionRow {
    pub(super) id: Uuid,
    number: i32,
    pub(super) kind: String,
    pub(super) definition: sqlx::types::Json<ExternalDefinition>,
    message: String,
    created_at: DateTime<Utc>,
    pub(super) parameters: sqlx::types::Json<Vec<TemplateParameter>>,
    pub(super) import_job_id: Option<Uuid>,
    provisioner_tags: sqlx::types::Json<devmesh_shared::provisionerd::Tags>,
    resources: sqlx::types::Json<Vec<devmesh_shared::provisionerd::TemplateResource>>,
    archived: bool,
    pub(super) import_status: Option<String>,
    pub(super) import_error: Option<String>,
}

impl VersionRow {
    /// Why workspaces cannot use this version yet, if they cannot: a
    /// Terraform version must have been imported.
    pub(super) fn unusable(&self) -> Option<String> {
        match (self.import_job_id, self.import_status.as_deref()) {
            (None, _) | (Some(_), Some("succeeded")) => None,
            (Some(_), Some("failed" | "canceled")) => Some(format!(
                "Version {} of this template failed to import ({}); push a fixed one.",
                self.number,
                self.import_error.as_deref().unwrap_or("canceled")
            )),
            (Some(_), _) => Some(format!(
                "Version {} of this template is still being imported; try again in a moment.",
                self.number
            )),
        }
    }
}

impl From<VersionRow> for TemplateVersion {
    fn from(r: VersionRow) -> Self {
        TemplateVersion {
            id: r.id,
            number: r.number,
            kind: if r.kind == "terraform" {
                TemplateKind::Terraform
            } else {
                TemplateKind::External
            },
            definition: r.definition.0,
            message: r.message,
            created_at: r.created_at,
            parameters: r.parameters.0,
            provisioner_tags: r.provisioner_tags.0,
            resources: r.resources.0,
            archived: r.archived,
            import: r
                .import_job_id
                .map(|job_id| devmesh_shared::api::VersionImport {
                    job_id,
                    status: r.import_status.unwrap_or_default(),
                    error: r.import_error,
                }),
        }
    }
}

const VERSION_COLUMNS: &str =
    "v.id, v.number, v.kind, v.definition, v.message, v.created_at, v.parameters,
    v.import_job_id, v.provisioner_tags, v.resources, v.archived, j.status AS import_status, j.error AS import_error";
const VERSION_FROM: &str =
    "template_versions v LEFT JOIN provisioner_jobs j ON j.id = v.import_job_id";

#[derive(sqlx::FromRow)]
pub(super) struct TemplateRow {
    pub(super) id: Uuid,
    pub(super) name: String,
    description: String,
    pub(super) active_version_id: Uuid,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const TEMPLATE_COLUMNS: &str = "id, name, description, active_version_id, created_at, updated_at";

/// Finds a live template by id or name, on `db` (the pool, or a
/// transaction reading back what it wrote).
pub(super) async fn find_template<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    template: &str,
) -> ApiResult<TemplateRow> {
    let sql = format!(
        "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE NOT deleted AND (id = $1 OR name = $2)"
    );
    let row: Option<TemplateRow> = sqlx::query_as(&sql)
        .bind(parse_uuid(template).unwrap_or_default())
        .bind(template)
        .fetch_optional(db)
        .await?;
    row.ok_or_else(|| ApiError::not_found(format!("No template {template:?}.")))
}

/// Loads a version by id.
pub(super) async fn load_version<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    id: Uuid,
) -> ApiResult<VersionRow> {
    Ok(sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE v.id = $1"
    ))
    .bind(id)
    .fetch_one(db)
    .await?)
}

async fn to_api<'e, E: sqlx::PgExecutor<'e>>(db: E, row: TemplateRow) -> ApiResult<Template> {
    let version = load_version(db, row.active_version_id).await?;
    Ok(Template {
        id: row.id,
        name: row.name,
        description: row.description,
        active_version: version.into(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

// === Handlers ===

pub(super) async fn create(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateTemplateRequest>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    auth.require_owner()?;
    let mut v = Validator::default();
    v.check("name", validate_name(&req.name));
    if req.description.chars().count() > 1024 {
        v.add("description", "must be at most 1024 characters");
    }
    v.finish()?;
    let content = content(req.kind, req.definition, req.archive, req.provisioner_tags)?;
    let (id, version_id) = (Uuid::new_v4(), Uuid::new_v4());
    let mut tx = state.db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO templates (id, name, description, created_by, active_version_id) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(&req.name)
    .bind(&req.description)
    .bind(auth.0.user_id)
    .bind(version_id)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(e) if crate::db::is_unique_violation(&e) => {
            return Err(ApiError::conflict(format!(
                "A template named {:?} already exists.",
                req.name
            )));
        }
        other => {
            other?;
        }
    }
    sqlx::query(
        "INSERT INTO template_versions (id, template_id, number, kind, definition, archive, created_by, provisioner_tags)
         VALUES ($1, $2, 1, $3, $4, $5, $6, $7)",
    )
    .bind(version_id)
    .bind(id)
    .bind(kind_name(content.kind))
    .bind(sqlx::types::Json(&content.definition))
    .bind(&content.archive)
    .bind(auth.0.user_id)
    .bind(sqlx::types::Json(&content.tags))
    .execute(&mut *tx)
    .await?;
    queue_import(&mut tx, version_id, &content).await?;
    Audit::new("create", "template")
        .resource(id, &req.name)
        .by(&auth.0)
        .ip(&ip)
        .write_in(&mut tx)
        .await?;
    // Read back before the commit: once committed, nothing may answer
    // that the template was not created.
    let row = find_template(&mut *tx, &id.to_string()).await?;
    let template = to_api(&mut *tx, row).await?;
    tx.commit().await?;
    state.provisioner_wake.notify_waiters();
    Ok((StatusCode::CREATED, Json(template)))
}

pub(super) async fn list(
    State(state): State<AppState>,
    _auth: Authed,
) -> ApiResult<Json<TemplatesResponse>> {
    let rows: Vec<TemplateRow> = sqlx::query_as(&format!(
        "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE NOT deleted ORDER BY name"
    ))
    .fetch_all(&state.db)
    .await?;
    let mut templates = Vec::with_capacity(rows.len());
    for row in rows {
        templates.push(to_api(&state.db, row).await?);
    }
    Ok(Json(TemplatesResponse { templates }))
}

pub(super) async fn get(
    State(state): State<AppState>,
    _auth: Authed,
    ApiPath(template): ApiPath<String>,
) -> ApiResult<Json<Template>> {
    let row = find_template(&state.db, &template).await?;
    Ok(Json(to_api(&state.db, row).await?))
}

pub(super) async fn versions(
    State(state): State<AppState>,
    _auth: Authed,
    ApiPath(template): ApiPath<String>,
) -> ApiResult<Json<TemplateVersionsResponse>> {
    let row = find_template(&state.db, &template).await?;
    let versions: Vec<VersionRow> = sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE v.template_id = $1 ORDER BY v.number DESC"
    ))
    .bind(row.id)
    .fetch_all(&state.db)
    .await?;
    Ok(Json(TemplateVersionsResponse {
        versions: versions.into_iter().map(Into::into).collect(),
    }))
}

pub(super) async fn create_version(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(template): ApiPath<String>,
    ApiJson(req): ApiJson<CreateTemplateVersionRequest>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    auth.require_owner()?;
    let content = content(req.kind, req.definition, req.archive, req.provisioner_tags)?;
    let row = find_template(&state.db, &template).await?;
    let mut tx = state.db.begin().await?;
    // Lock the template so concurrent versions get distinct numbers.
    sqlx::query("SELECT 1 FROM templates WHERE id = $1 FOR UPDATE")
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    let version_id = Uuid::new_v4();
    let number: i32 = sqlx::query_scalar(
        "INSERT INTO template_versions (id, template_id, number, kind, definition, archive, message, created_by, provisioner_tags)
         SELECT $1, $2, coalesce(max(number), 0) + 1, $3, $4, $5, $6, $7, $8 FROM template_versions WHERE template_id = $2
         RETURNING number",
    )
    .bind(version_id)
    .bind(row.id)
    .bind(kind_name(content.kind))
    .bind(sqlx::types::Json(&content.definition))
    .bind(&content.archive)
    .bind(&req.message)
    .bind(auth.0.user_id)
    .bind(sqlx::types::Json(&content.tags))
    .fetch_one(&mut *tx)
    .await?;
    queue_import(&mut tx, version_id, &content).await?;
    // A Terraform version becomes active once its import succeeded (its
    // provisioner promotes it); until then workspaces keep the current one.
    if content.kind != TemplateKind::Terraform {
        sqlx::query(
            "UPDATE templates SET active_version_id = $2, updated_at = now() WHERE id = $1",
        )
        .bind(row.id)
        .bind(version_id)
        .execute(&mut *tx)
        .await?;
    }
    Audit::new("create", "template_version")
        .resource(version_id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"number": number}))
        .write_in(&mut tx)
        .await?;
    let row = find_template(&mut *tx, &row.id.to_string()).await?;
    let template = to_api(&mut *tx, row).await?;
    tx.commit().await?;
    state.provisioner_wake.notify_waiters();
    Ok((StatusCode::CREATED, Json(template)))
}

pub(super) async fn delete(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(template): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require_owner()?;
    let row = find_template(&state.db, &template).await?;
    let in_use: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workspaces WHERE template_id = $1 AND NOT deleted",
    )
    .bind(row.id)
    .fetch_one(&state.db)
    .await?;
    if in_use > 0 {
        return Err(ApiError::conflict(format!(
            "{in_use} workspace(s) still use template {:?}.",
            row.name
        )));
    }
    sqlx::query("UPDATE templates SET deleted = true, updated_at = now() WHERE id = $1")
        .bind(row.id)
        .execute(&state.db)
        .await?;
    Audit::new("delete", "template")
        .resource(row.id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// A version of `template` by number.
async fn find_version(
    state: &AppState,
    template: &TemplateRow,
    number: i32,
) -> ApiResult<VersionRow> {
    let row: Option<VersionRow> = sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE v.template_id = $1 AND v.number = $2"
    ))
    .bind(template.id)
    .bind(number)
    .fetch_optional(&state.db)
    .await?;
    row.ok_or_else(|| {
        ApiError::not_found(format!(
            "Template {} has no version {number}.",
            template.name
        ))
    })
}

/// `POST /templates/{template}/versions/{number}/promote`: makes an
/// imported, unarchived version the active one (new workspaces and
/// `update` use it).
pub(super) async fn promote(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath((template, number)): ApiPath<(String, i32)>,
) -> ApiResult<Json<Template>> {
    auth.require_owner()?;
    let row = find_template(&state.db, &template).await?;
    let version = find_version(&state, &row, number).await?;
    if version.archived {
        return Err(ApiError::conflict(format!(
            "Version {number} is archived; unarchive it first."
        )));
    }
    if let Some(why) = version.unusable() {
        return Err(ApiError::conflict(why));
    }
    // Checked again in the update itself: an archive in between wins.
    let promoted = sqlx::query(
        "UPDATE templates t SET active_version_id = v.id, updated_at = now()
         FROM template_versions v WHERE t.id = $1 AND v.id = $2 AND NOT v.archived",
    )
    .bind(row.id)
    .bind(version.id)
    .execute(&state.db)
    .await?;
    if promoted.rows_affected() == 0 {
        return Err(ApiError::conflict(format!(
            "Version {number} is archived; unarchive it first."
        )));
    }
    Audit::new("promote", "template")
        .resource(row.id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({ "version": number }))
        .write(&state.db)
        .await;
    let row = find_template(&state.db, &template).await?;
    Ok(Json(to_api(&state.db, row).await?))
}

/// `POST /templates/{template}/versions/{number}/archive`.
pub(super) async fn archive(
    state: State<AppState>,
    auth: Authed,
    ip: ClientIp,
    path: ApiPath<(String, i32)>,
) -> ApiResult<Json<TemplateVersion>> {
    set_archived(state, auth, ip, path, true).await
}

/// `POST /templates/{template}/versions/{number}/unarchive`.
pub(super) async fn unarchive(
    state: State<AppState>,
    auth: Authed,
    ip: ClientIp,
    path: ApiPath<(String, i32)>,
) -> ApiResult<Json<TemplateVersion>> {
    set_archived(state, auth, ip, path, false).await
}

async fn set_archived(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath((template, number)): ApiPath<(String, i32)>,
    archived: bool,
) -> ApiResult<Json<TemplateVersion>> {
    auth.require_owner()?;
    let row = find_template(&state.db, &template).await?;
    let version = find_version(&state, &row, number).await?;
    // One conditional update: a promotion in between cannot leave the
    // active version archived.
    let changed = sqlx::query(
        "UPDATE template_versions v SET archived = $2 WHERE v.id = $1
         AND NOT ($2 AND EXISTS (SELECT 1 FROM templates t WHERE t.active_version_id = v.id))",
    )
    .bind(version.id)
    .bind(archived)
    .execute(&state.db)
    .await?;
    if changed.rows_affected() == 0 {
        return Err(ApiError::conflict(format!(
            "Version {number} is the active version; promote another one first."
        )));
    }
    Audit::new(if archived { "archive" } else { "unarchive" }, "template")
        .resource(row.id, &row.name)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({ "version": number }))
        .write(&state.db)
        .await;
    Ok(Json(find_version(&state, &row, number).await?.into()))
}

/// `GET /templates/{template}/versions/{number}/files`: a Terraform
/// version's directory as the tar archive it was pushed as (owners: the
/// code may hold what members should not read).
pub(super) async fn files(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath((template, number)): ApiPath<(String, i32)>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    auth.require_owner()?;
    let row = find_template(&state.db, &template).await?;
    let version = find_version(&state, &row, number).await?;
    let archive: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT archive FROM template_versions WHERE id = $1")
            .bind(version.id)
            .fetch_one(&state.db)
            .await?;
    let archive = archive.ok_or_else(|| {
        ApiError::not_found(format!(
            "Version {number} is an external template: it has no files."
        ))
    })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-tar")],
        archive,
    )
        .into_response())
}
