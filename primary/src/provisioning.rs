//! The primary's side of provisioning: it turns queued jobs ([`crate::jobs`])
//! into the [`JobSpec`]s daemons run, records what they report (logs,
//! Terraform states, outcomes, an import's parameters), and runs the
//! daemons built into `devmesh server`.
//!
//! Built-in daemons call these functions in-process ([`Local`]); external
//! ones call the same functions through `/api/v2/provisionerd`. Either way
//! a daemon acts only on the jobs it holds, and the primary alone touches
//! the database. A daemon controls what it builds (the agents and apps come
//! from the Terraform state it saved); what it reports about an import is
//! checked again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use devmesh_provisioner::daemon::{Coordinator, Runner};
use devmesh_shared::api::{
    AgentSpec, AppSpec, HealthcheckSpec, ScriptSpec, ScriptTrigger, WorkspaceResource,
};
use devmesh_shared::provisionerd::{
    Completion, JobKind, JobSpec, LogLine, Outcome, TemplateResource,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::api::AppState;
use crate::jobs::{self, Beat, Daemon, Job, Tags};
use crate::vault::Vault;

/// The vault purpose of stored Terraform states.
const STATE_PURPOSE: &str = "terraform state";

/// How often a waiting daemon looks for work queued by another replica
/// (this one's API wakes it at once).
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Starts `count` built-in daemons on `tracker` until `shutdown`.
pub fn spawn(
    state: AppState,
    runner: Runner,
    count: usize,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let runner = Arc::new(runner);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "primary".into());
    for i in 0..count {
        let daemon = Daemon {
            id: Uuid::new_v4(),
            name: format!("{host}-built-in-{i}"),
            tags: Tags::new(),
        };
        let state = state.clone();
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) =
                jobs::register_daemon(&state.db, &daemon, devmesh_shared::VERSION, None).await
            {
                tracing::warn!(error = %e, daemon = %daemon.name, "cannot register a built-in provisioner daemon");
            }
            let name = daemon.name.clone();
            let local = Arc::new(Local { state, daemon });
            devmesh_provisioner::daemon::serve(local, runner, name, shutdown).await;
        });
    }
}

/// A built-in daemon's coordinator: this primary, in-process.
struct Local {
    state: AppState,
    daemon: Daemon,
}

impl Coordinator for Local {
    async fn acquire(&self) -> anyhow::Result<Option<JobSpec>> {
        Ok(acquire(&self.state, &self.daemon, Duration::from_secs(20)).await?)
    }

    async fn heartbeat(&self, job: Uuid) -> anyhow::Result<Beat> {
        Ok(jobs::heartbeat(&self.state.db, job, self.daemon.id).await?)
    }

    async fn append_logs(&self, job: Uuid, lines: Vec<LogLine>) -> anyhow::Result<()> {
        Ok(append_logs(&self.state, job, self.daemon.id, &lines).await?)
    }

    async fn save_state(&self, job: Uuid, state: Vec<u8>) -> anyhow::Result<()> {
        Ok(save_state(&self.state, job, self.daemon.id, &state).await?)
    }

    async fn complete(&self, job: Uuid, completion: Completion) -> anyhow::Result<bool> {
        Ok(complete(&self.state, job, self.daemon.id, completion).await?)
    }
}

/// Why the primary refused a daemon's report.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The job is not running on this daemon (it ended, timed out, or was
    /// never its).
    #[error("the job is not running on this daemon")]
    NotHeld,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The next job `daemon` may take, waiting up to `wait` for one to be
/// queued. A job that cannot be run (its build or version is gone, its
/// state cannot be decrypted) fails here, saying why, and the next is
/// tried.
pub async fn acquire(
    state: &AppState,
    daemon: &Daemon,
    wait: Duration,
) -> sqlx::Result<Option<JobSpec>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Listening before looking, so a job queued in between still wakes us.
        let wake = state.provisioner_wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        if let Some(job) = jobs::acquire(&state.db, daemon).await? {
            match spec(state, &job).await? {
                Ok(spec) => return Ok(Some(spec)),
                Err(why) => {
                    tracing::warn!(job.id = %job.id, error = %why, "a provisioner job cannot run");
                    complete(state, job.id, daemon.id, Completion::failed(why)).await?;
                    continue;
                }
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(POLL_EVERY.min(deadline - now)) => {}
            () = wake => {}
        }
    }
}

/// A build as the database has it.
#[derive(sqlx::FromRow)]
struct BuildRow {
    id: Uuid,
    workspace_id: Uuid,
    transition: String,
    workspace_name: String,
    owner_name: String,
    owner_email: String,
    archive: Option<Vec<u8>>,
    state: Option<Vec<u8>>,
    parameters: sqlx::types::Json<BTreeMap<String, String>>,
}

/// A template version to import.
#[derive(sqlx::FromRow)]
struct ImportRow {
    number: i32,
    archive: Option<Vec<u8>>,
}

/// What a daemon needs to run `job`, or why it cannot run.
async fn spec(state: &AppState, job: &Job) -> sqlx::Result<Result<JobSpec, String>> {
    let id_in = |key: &str| {
        job.input[key]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
    };
    let mut env = BTreeMap::from([(
        "DEVMESH_ACCESS_URL".to_owned(),
        state.config.access_url.clone(),
    )]);
    match job.kind {
        JobKind::Import => {
            let Some(version) = id_in("version_id") else {
                return Ok(Err("the job names no template version".into()));
            };
            let row: Option<ImportRow> =
                sqlx::query_as("SELECT number, archive FROM template_versions WHERE id = $1")
                    .bind(version)
                    .fetch_optional(&state.db)
                    .await?;
            let Some(ImportRow {
                number,
                archive: Some(archive),
            }) = row
            else {
                return Ok(Err("the template version has no Terraform code".into()));
            };
            env.extend([
                ("DEVMESH_BUILD_ID".to_owned(), job.id.to_string()),
                ("DEVMESH_WORKSPACE_NAME".to_owned(), "import".to_owned()),
                (
                    "DEVMESH_WORKSPACE_TRANSITION".to_owned(),
                    "start".to_owned(),
                ),
                ("DEVMESH_WORKSPACE_OWNER".to_owned(), "import".to_owned()),
            ]);
            Ok(Ok(JobSpec {
                id: job.id,
                kind: JobKind::Import,
                what: format!("importing version {number}"),
                archive,
                env,
                state: None,
                destroy: false,
                timeout_secs: state.config.provisioner_job_timeout.as_secs(),
            }))
        }
        JobKind::Build => {
            let Some(build_id) = id_in("build_id") else {
                return Ok(Err("the job names no build".into()));
            };
            let build: Option<BuildRow> = sqlx::query_as(
                "SELECT b.id, b.workspace_id, b.transition, w.name AS workspace_name,
                        u.username AS owner_name, u.email AS owner_email, v.archive, s.state,
                        b.parameters
                 FROM workspace_builds b
                 JOIN workspaces w ON w.id = b.workspace_id
                 JOIN users u ON u.id = w.owner_id
                 JOIN template_versions v ON v.id = b.template_version_id
                 LEFT JOIN workspace_terraform_states s ON s.workspace_id = b.workspace_id
                 WHERE b.id = $1",
            )
            .bind(build_id)
            .fetch_optional(&state.db)
            .await?;
            let Some(build) = build else {
                return Ok(Err("the job's build no longer exists".into()));
            };
            let Some(archive) = build.archive else {
                return Ok(Err("the template version has no Terraform code".into()));
            };
            // A state that cannot be read must not become "no state":
            // Terraform would create everything again beside what exists.
            let tf_state = match build.state.as_deref().map(|s| open_state(&state.vault, s)) {
                Some(Err(e)) => return Ok(Err(e)),
                Some(Ok(s)) => Some(s),
                None => None,
            };
            sqlx::query("UPDATE workspace_builds SET status = 'running' WHERE id = $1")
                .bind(build.id)
                .execute(&state.db)
                .await?;
            env.extend([
                ("DEVMESH_BUILD_ID".to_owned(), build.id.to_string()),
                (
                    "DEVMESH_WORKSPACE_ID".to_owned(),
                    build.workspace_id.to_string(),
                ),
                (
                    "DEVMESH_WORKSPACE_NAME".to_owned(),
                    build.workspace_name.clone(),
                ),
                (
                    "DEVMESH_WORKSPACE_TRANSITION".to_owned(),
                    build.transition.clone(),
                ),
                ("DEVMESH_WORKSPACE_OWNER".to_owned(), build.owner_name),
                (
                    "DEVMESH_WORKSPACE_OWNER_EMAIL".to_owned(),
                    build.owner_email,
                ),
                (
                    "DEVMESH_PARAMETERS".to_owned(),
                    serde_json::to_string(&build.parameters.0).unwrap_or_default(),
                ),
            ]);
            Ok(Ok(JobSpec {
                id: job.id,
                kind: JobKind::Build,
                what: format!("{} {}", build.transition, build.workspace_name),
                archive,
                env,
                state: tf_state,
                destroy: build.transition == "delete",
                timeout_secs: state.config.provisioner_job_timeout.as_secs(),
            }))
        }
    }
}

/// Whether `daemon` runs `job` now.
pub(crate) async fn holds(state: &AppState, job: Uuid, daemon: Uuid) -> Result<(), HostError> {
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM provisioner_jobs
                        WHERE id = $1 AND daemon_id = $2 AND status IN ('running', 'canceling'))",
    )
    .bind(job)
    .bind(daemon)
    .fetch_one(&state.db)
    .await?;
    if held {
        Ok(())
    } else {
        Err(HostError::NotHeld)
    }
}

/// Appends a daemon's log lines to a job it holds.
pub async fn append_logs(
    state: &AppState,
    job: Uuid,
    daemon: Uuid,
    lines: &[LogLine],
) -> Result<(), HostError> {
    holds(state, job, daemon).await?;
    let lines: Vec<_> = lines.iter().map(|l| (l.stream, l.line.clone())).collect();
    jobs::append_logs(&state.db, job, &lines).await?;
    Ok(())
}

/// Saves the Terraform state a daemon's build left, encrypted.
pub async fn save_state(
    state: &AppState,
    job: Uuid,
    daemon: Uuid,
    tf_state: &[u8],
) -> Result<(), HostError> {
    // One statement: the check that the daemon still holds the job and
    // the write cannot be split by the job timing out in between.
    let saved = sqlx::query(
        "INSERT INTO workspace_terraform_states (workspace_id, state)
         SELECT b.workspace_id, $3 FROM provisioner_jobs j JOIN workspace_builds b ON b.job_id = j.id
         WHERE j.id = $1 AND j.daemon_id = $2 AND j.status IN ('running', 'canceling')
         ON CONFLICT (workspace_id) DO UPDATE SET state = $3, updated_at = now()",
    )
    .bind(job)
    .bind(daemon)
    .bind(state.vault.wrap(STATE_PURPOSE, tf_state))
    .execute(&state.db)
    .await?;
    if saved.rows_affected() == 0 {
        return Err(HostError::NotHeld);
    }
    Ok(())
}

/// Records how a job `daemon` holds ended, with what it implies (a start
/// build's agents, a delete build's workspace gone, an import's
/// parameters), all in one transaction. False when the job was no longer
/// the daemon's: nothing is recorded.
pub async fn complete(
    state: &AppState,
    job: Uuid,
    daemon: Uuid,
    completion: Completion,
) -> sqlx::Result<bool> {
    match record(state, job, daemon, &completion).await {
        Err(e) if completion.outcome == Outcome::Succeeded => {
            tracing::warn!(job.id = %job, error = %e, "cannot record a job's result");
            let failed = Completion::failed(format!("recording the result failed: {e}"));
            record(state, job, daemon, &failed).await
        }
        other => other,
    }
}

async fn record(
    state: &AppState,
    job: Uuid,
    daemon: Uuid,
    completion: &Completion,
) -> sqlx::Result<bool> {
    let mut tx = state.db.begin().await?;
    let held: Option<(String, Value)> = sqlx::query_as(
        "SELECT kind, input FROM provisioner_jobs
         WHERE id = $1 AND daemon_id = $2 AND status IN ('running', 'canceling')
         FOR UPDATE",
    )
    .bind(job)
    .bind(daemon)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((kind, input)) = held else {
        return Ok(false);
    };
    let mut outcome = completion.outcome.clone();
    let mut changed_workspace = None;
    if kind == "import" {
        let version = input["version_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok());
        if let (Outcome::Succeeded, Some(version)) = (&outcome, version) {
            let checked = devmesh_shared::parameters::check_definitions(&completion.parameters)
                .and_then(|()| check_resources(&completion.resources));
            match checked {
                Ok(()) => {
                    record_import(
                        &mut tx,
                        version,
                        &completion.parameters,
                        &completion.resources,
                    )
                    .await?
                }
                Err(error) => outcome = Outcome::Failed { error },
            }
        }
    } else if let Some(build) = input["build_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
    {
        let row: Option<(Uuid, String)> =
            sqlx::query_as("SELECT workspace_id, transition FROM workspace_builds WHERE id = $1")
                .bind(build)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((workspace, transition)) = row {
            if outcome == Outcome::Succeeded {
                finish(&state.vault, &mut tx, build, workspace, &transition).await?;
            }
            let status = match outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Failed { .. } => "failed",
                Outcome::Canceled => "canceled",
            };
            sqlx::query(
                "UPDATE workspace_builds SET status = $2, completed_at = now() WHERE id = $1",
            )
            .bind(build)
            .bind(status)
            .execute(&mut *tx)
            .await?;
            changed_workspace = Some(workspace);
        }
    }
    let done = jobs::complete(&mut *tx, job, daemon, &outcome).await?;
    tx.commit().await?;
    if let Some(workspace) = changed_workspace {
        state.workspace_changed(workspace).await;
    }
    Ok(done)
}

/// Checks the resources a daemon says an import found.
fn check_resources(resources: &[TemplateResource]) -> Result<(), String> {
    if resources.len() > devmesh_shared::provisionerd::MAX_TEMPLATE_RESOURCES {
        return Err(format!("{} resources: too many", resources.len()));
    }
    match resources
        .iter()
        .find(|r| r.address.is_empty() || r.address.len() > 512 || r.kind.len() > 128)
    {
        Some(r) => Err(format!("resource {:?}: not a resource address", r.address)),
        None => Ok(()),
    }
}

/// Records an imported version's parameters and resources; a version that
/// imports becomes its template's active one unless a newer one already is.
async fn record_import(
    tx: &mut sqlx::PgConnection,
    version: Uuid,
    params: &[devmesh_shared::parameters::TemplateParameter],
    resources: &[TemplateResource],
) -> sqlx::Result<()> {
    sqlx::query("UPDATE template_versions SET parameters = $2, resources = $3 WHERE id = $1")
        .bind(version)
        .bind(sqlx::types::Json(params))
        .bind(sqlx::types::Json(resources))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE templates t SET active_version_id = v.id, updated_at = now()
         FROM template_versions v
         WHERE v.id = $1 AND t.id = v.template_id AND NOT v.archived
           AND (SELECT number FROM template_versions WHERE id = t.active_version_id) <= v.number",
    )
    .bind(version)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records what a successful build did: the resources its state holds, a
/// start build's agents and apps (from the state the primary stored), a
/// delete build's workspace gone.
async fn finish(
    vault: &Vault,
    tx: &mut sqlx::PgConnection,
    build: Uuid,
    workspace: Uuid,
    transition: &str,
) -> sqlx::Result<()> {
    if transition == "delete" {
        sqlx::query("UPDATE workspaces SET deleted = true, updated_at = now() WHERE id = $1")
            .bind(workspace)
            .execute(&mut *tx)
            .await?;
        return Ok(());
    }
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT state FROM workspace_terraform_states WHERE workspace_id = $1")
            .bind(workspace)
            .fetch_optional(&mut *tx)
            .await?;
    let tf_state: Value = stored
        .and_then(|s| open_state(vault, &s).ok())
        .and_then(|s| serde_json::from_slice(&s).ok())
        .unwrap_or_default();
    let declared: sqlx::types::Json<Vec<TemplateResource>> = sqlx::query_scalar(
        "SELECT v.resources FROM workspace_builds b
         JOIN template_versions v ON v.id = b.template_version_id WHERE b.id = $1",
    )
    .bind(build)
    .fetch_one(&mut *tx)
    .await?;
    let resources = resources_in(&tf_state, &declared.0);
    sqlx::query("UPDATE workspace_builds SET resources = $2 WHERE id = $1")
        .bind(build)
        .bind(sqlx::types::Json(&resources))
        .execute(&mut *tx)
        .await?;
    if transition == "start" {
        let agents = agents_in(&tf_state);
        crate::api::workspaces::insert_agents(tx, workspace, build, &agents).await?;
    }
    Ok(())
}

/// The resources a Terraform state holds (devmesh's own bookkeeping
/// resources aside): persistent as the version's import found, with the
/// agents each depends on (it runs them) and the metadata attached to it.
fn resources_in(state: &Value, declared: &[TemplateResource]) -> Vec<WorkspaceResource> {
    let managed = || {
        state["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["mode"] == "managed")
    };
    let address_of = |r: &Value| {
        let base = format!(
            "{}.{}",
            r["type"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default()
        );
        match r["module"].as_str() {
            Some(m) => format!("{m}.{base}"),
            None => base,
        }
    };
    // Metadata by the id of the resource it describes.
    let mut metadata: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for r in managed().filter(|r| r["type"] == "devmesh_metadata") {
        for i in r["instances"].as_array().into_iter().flatten() {
            let a = &i["attributes"];
            if let Some(id) = a["resource_id"].as_str() {
                let items = a["items"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())));
                metadata.entry(id.to_owned()).or_default().extend(items);
            }
        }
    }
    let mut out = Vec::new();
    for r in managed() {
        let kind = r["type"].as_str().unwrap_or_default();
        if kind.starts_with("devmesh_") {
            continue;
        }
        let bare = address_of(r);
        let persistent = declared
            .iter()
            .find(|d| d.address == bare)
            .map(|d| d.persistent);
        for i in r["instances"].as_array().into_iter().flatten() {
            let address = match &i["index_key"] {
                Value::Number(n) => format!("{bare}[{n}]"),
                Value::String(k) => format!("{bare}[{k:?}]"),
                _ => bare.clone(),
            };
            let agents = i["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str()?.rsplit_once("devmesh_agent.").map(|(_, n)| n))
                .map(|n| n.replace('_', "-"))
                .collect();
            let metadata = i["attributes"]["id"]
                .as_str()
                .and_then(|id| metadata.get(id).cloned())
                .unwrap_or_default();
            out.push(WorkspaceResource {
                address,
                kind: kind.to_owned(),
                persistent,
                agents,
                metadata,
            });
        }
    }
    out
}

/// A stored state, decrypted.
fn open_state(vault: &Vault, stored: &[u8]) -> Result<Vec<u8>, String> {
    vault
        .unwrap(STATE_PURPOSE, stored, |_| false)
        .map(|s| s.plain().to_vec())
        .map_err(|e| {
            tracing::error!(error = %e, "cannot decrypt a workspace's Terraform state");
            format!("{e:#}")
        })
}

/// The agents (with their tokens) and apps a Terraform state declares.
fn agents_in(state: &Value) -> Vec<(AgentSpec, String)> {
    let instances = |ty: &str| -> Vec<(String, Value)> {
        state["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["type"] == ty && r["mode"] == "managed")
            .flat_map(|r| {
                let name = r["name"].as_str().unwrap_or("agent").replace('_', "-");
                let many = r["instances"].as_array().map_or(0, Vec::len) > 1;
                r["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |i| {
                        let n = match (&i["index_key"], many) {
                            (Value::Number(k), true) => format!("{name}-{k}"),
                            (Value::String(k), true) => format!("{name}-{k}"),
                            _ => name.clone(),
                        };
                        (n, i["attributes"].clone())
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let apps = instances("devmesh_app");
    instances("devmesh_agent")
        .into_iter()
        .filter_map(|(name, a)| {
            let token = a["token"].as_str()?.to_owned();
            let id = a["id"].as_str().unwrap_or_default();
            let str_map = |v: &Value| -> std::collections::BTreeMap<String, String> {
                v.as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            };
            let scripts = a["startup_script"]
                .as_str()
                .filter(|s| !s.trim().is_empty())
                .map(|s| ScriptSpec {
                    name: "startup".into(),
                    script: s.to_owned(),
                    run_on: ScriptTrigger::Start,
                    timeout_seconds: 300,
                })
                .into_iter()
                .collect();
            let apps = apps
                .iter()
                .filter(|(_, app)| app["agent_id"] == id)
                .map(|(_, app)| AppSpec {
                    slug: app["slug"].as_str().unwrap_or_default().to_owned(),
                    display_name: app["display_name"].as_str().map(str::to_owned),
                    port: app["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
                    url: app["url"].as_str().map(str::to_owned),
                    subdomain: app["subdomain"].as_bool().unwrap_or(true),
                    sharing_level: devmesh_shared::api::SharingLevel::from_stored(
                        app["share"].as_str().unwrap_or("owner"),
                    ),
                    healthcheck: app["healthcheck_url"].as_str().map(|url| HealthcheckSpec {
                        url: url.to_owned(),
                        interval_seconds: 5,
                        threshold: 3,
                    }),
                })
                .collect();
            let interval = a["metadata_interval"]
                .as_u64()
                .map_or(10, |i| i.clamp(1, 86_400) as u32);
            let metadata = str_map(&a["metadata"])
                .into_iter()
                .take(devmesh_shared::api::MAX_AGENT_METADATA)
                .map(|(key, script)| devmesh_shared::api::MetadataSpec {
                    key,
                    script,
                    interval_seconds: interval,
                    timeout_seconds: interval.min(10),
                })
                .collect();
            Some((
                AgentSpec {
                    name,
                    directory: a["dir"].as_str().map(str::to_owned),
                    env: str_map(&a["env"]),
                    apps,
                    scripts,
                    metadata,
                },
                token,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_names_its_resources_with_their_agents_and_metadata() {
        let state = serde_json::json!({"resources": [
            {"mode": "managed", "type": "devmesh_agent", "name": "main", "instances": [
                {"attributes": {"id": "a1", "token": "t1"}}]},
            {"mode": "managed", "type": "terraform_data", "name": "home", "instances": [
                {"attributes": {"id": "h1"}}]},
            {"mode": "managed", "type": "terraform_data", "name": "agent", "instances": [
                {"index_key": 0, "attributes": {"id": "p1"},
                 "dependencies": ["devmesh_agent.main", "terraform_data.home"]}]},
            {"mode": "managed", "module": "module.disk", "type": "docker_volume", "name": "v",
             "instances": [{"attributes": {"id": "v1"}}]},
            {"mode": "managed", "type": "devmesh_metadata", "name": "m", "instances": [
                {"attributes": {"resource_id": "h1", "items": {"size": "10 GiB"}}}]},
            {"mode": "data", "type": "devmesh_workspace", "name": "me", "instances": []}
        ]});
        let declared = [
            TemplateResource {
                address: "terraform_data.home".into(),
                kind: "terraform_data".into(),
                persistent: true,
            },
            TemplateResource {
                address: "terraform_data.agent".into(),
                kind: "terraform_data".into(),
                persistent: false,
            },
        ];
        let got = resources_in(&state, &declared);
        let addresses: Vec<_> = got.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(
            addresses,
            [
                "terraform_data.home",
                "terraform_data.agent[0]",
                "module.disk.docker_volume.v"
            ]
        );
        assert_eq!(got[0].persistent, Some(true));
        assert_eq!(got[0].metadata["size"], "10 GiB");
        assert!(got[0].agents.is_empty(), "peripheral");
        assert_eq!(got[1].persistent, Some(false));
        assert_eq!(got[1].agents, ["main"], "computational");
        assert_eq!(got[2].persistent, None, "the import did not say");
    }

    #[test]
    fn a_state_names_its_agents_tokens_and_apps() {
        let state = serde_json::json!({"resources": [
            {"mode": "managed", "type": "devmesh_agent", "name": "main", "instances": [
                {"attributes": {"id": "a1", "token": "t1", "dir": "/home/dev",
                                "env": {"K": "v"}, "startup_script": "echo hi",
                                "metadata": {"disk": "df -h /"}, "metadata_interval": 30}}]},
            {"mode": "managed", "type": "devmesh_agent", "name": "gpu_box", "instances": [
                {"index_key": 0, "attributes": {"id": "a2", "token": "t2"}},
                {"index_key": 1, "attributes": {"id": "a3", "token": "t3"}}]},
            {"mode": "managed", "type": "devmesh_app", "name": "web", "instances": [
                {"attributes": {"agent_id": "a1", "slug": "web", "port": 8080, "share": "public"}}]},
            {"mode": "data", "type": "devmesh_agent", "name": "ignored", "instances": []}
        ]});
        let agents = agents_in(&state);
        let names: Vec<_> = agents.iter().map(|(a, _)| a.name.as_str()).collect();
        assert_eq!(names, ["main", "gpu-box-0", "gpu-box-1"]);
        let (main, token) = &agents[0];
        assert_eq!(token, "t1");
        assert_eq!(main.directory.as_deref(), Some("/home/dev"));
        assert_eq!(main.env["K"], "v");
        assert_eq!(main.scripts[0].script, "echo hi");
        assert_eq!(main.metadata[0].key, "disk");
        assert_eq!(main.metadata[0].script, "df -h /");
        assert_eq!(main.metadata[0].interval_seconds, 30);
        assert_eq!(main.apps[0].port, Some(8080));
        assert_eq!(
            main.apps[0].sharing_level,
            devmesh_shared::api::SharingLevel::Public
        );
        assert!(agents[1].0.apps.is_empty());
    }
}
