//! The provisioner daemons built into `devmesh server`: each claims build
//! jobs from the queue ([`crate::jobs`]) and runs Terraform for them with
//! the devmesh provider, keeping the workspace's state in the database.
//!
//! A build: the template version's archive is unpacked into a scratch
//! directory beside the workspace's last state; `terraform init` and
//! `apply` (`destroy` for a delete) run with the build in the provider's
//! environment; every output line goes to the job's log; the state is
//! saved whatever the outcome. A successful start build records the agents
//! and apps the state declares, with the tokens the provider minted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devmesh_provisioner::terraform::{RunError, Stream, Terraform, Workdir};
use devmesh_shared::api::{AgentSpec, AppSpec, HealthcheckSpec, ScriptSpec, ScriptTrigger};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::api::AppState;
use crate::vault::Vault;

/// The vault purpose of stored Terraform states.
const STATE_PURPOSE: &str = "terraform state";
use crate::jobs::{self, Beat, Daemon, Job, LogStream, Outcome, Tags};

/// How often an idle daemon looks for work queued by another replica (this
/// one's API wakes it at once).
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What every built-in daemon shares.
struct Shared {
    state: AppState,
    /// Encrypts workspaces' Terraform states at rest: they hold the agent
    /// tokens and whatever secrets templates put in them.
    vault: Arc<Vault>,
    terraform: Option<Terraform>,
    /// The devmesh binary, which serves the Terraform provider.
    provider: PathBuf,
    /// Scratch directories for runs.
    work: PathBuf,
    /// How often a running job heartbeats.
    heartbeat_every: Duration,
}

/// Starts `count` daemons on `tracker` until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    state: AppState,
    vault: Arc<Vault>,
    terraform: Option<Terraform>,
    provider: PathBuf,
    work: PathBuf,
    count: usize,
    timeout: Duration,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        state,
        vault,
        terraform,
        provider,
        work,
        heartbeat_every: jobs::heartbeat_every(timeout),
    });
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "primary".into());
    for i in 0..count {
        let daemon = Daemon {
            id: Uuid::new_v4(),
            name: format!("{host}-built-in-{i}"),
            tags: Tags::new(),
        };
        tracker.spawn(run_daemon(shared.clone(), daemon, shutdown.clone()));
    }
}

async fn run_daemon(shared: Arc<Shared>, me: Daemon, shutdown: CancellationToken) {
    let db = shared.state.db.clone();
    if let Err(e) = jobs::register_daemon(&db, &me, true).await {
        tracing::warn!(error = %e, daemon = %me.name, "cannot register a built-in provisioner daemon");
    }
    loop {
        // Listening before looking, so a job queued in between still wakes us.
        let wake = shared.state.provisioner_wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let wait = match jobs::acquire(&db, &me).await {
            Ok(Some(job)) => {
                match job.kind {
                    jobs::JobKind::Build => run_job(&shared, &me, job, &shutdown).await,
                    jobs::JobKind::Import => run_import(&shared, &me, job, &shutdown).await,
                }
                continue;
            }
            Ok(None) => POLL_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for provisioner jobs");
                POLL_EVERY * 5
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
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
    parameters: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
}

async fn run_job(shared: &Shared, me: &Daemon, job: Job, shutdown: &CancellationToken) {
    let db = &shared.state.db;
    let build_id = job.input["build_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok());
    let build: Option<BuildRow> = match build_id {
        Some(id) => sqlx::query_as(
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
        .bind(id)
        .fetch_optional(db)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot load a build");
            None
        }),
        None => None,
    };
    // A state that cannot be read must not become "no state": Terraform
    // would create everything again beside what exists.
    let build = match build.map(|mut b| match b.state.take() {
        Some(s) => open_state(&shared.vault, &s).map(|s| {
            b.state = Some(s);
            b
        }),
        None => Ok(b),
    }) {
        Some(Err(e)) => {
            let _ = jobs::complete(db, job.id, me.id, &Outcome::Failed(e)).await;
            let _ = sqlx::query(
                "UPDATE workspace_builds SET status = 'failed', completed_at = now() WHERE id = $1",
            )
            .bind(build_id)
            .execute(db)
            .await;
            return;
        }
        Some(Ok(b)) => Some(b),
        None => None,
    };
    let Some(build) = build else {
        let _ = jobs::complete(
            db,
            job.id,
            me.id,
            &Outcome::Failed("the job names no build".into()),
        )
        .await;
        return;
    };
    let _ = sqlx::query("UPDATE workspace_builds SET status = 'running' WHERE id = $1")
        .bind(build.id)
        .execute(db)
        .await;
    tracing::info!(job.id = %job.id, build.id = %build.id, transition = %build.transition, "running a workspace build");

    let attempt = Attempt::start(db, &job, me, shared.heartbeat_every, shutdown);
    let dir = shared.work.join(job.id.to_string());
    let ran = execute(shared, &build, &dir, &attempt.log, &attempt.cancel).await;
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = match ran {
        Ok(()) => match finish(shared, &build).await {
            Ok(()) => Outcome::Succeeded,
            Err(e) => Outcome::Failed(format!("recording the build's result failed: {e}")),
        },
        Err(RunError::Canceled { .. }) => Outcome::Canceled,
        Err(e) => Outcome::Failed(e.to_string()),
    };
    if !attempt.end("build", &outcome).await {
        return;
    }
    let status = match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed(_) => "failed",
        Outcome::Canceled => "canceled",
    };
    let _ =
        sqlx::query("UPDATE workspace_builds SET status = $2, completed_at = now() WHERE id = $1")
            .bind(build.id)
            .bind(status)
            .execute(db)
            .await;
    shared.state.workspace_changed(build.workspace_id).await;
    tracing::info!(job.id = %job.id, build.id = %build.id, status, "workspace build ended");
}

/// A template version to import.
#[derive(sqlx::FromRow)]
struct ImportRow {
    id: Uuid,
    template_id: Uuid,
    number: i32,
    archive: Option<Vec<u8>>,
}

/// Imports a Terraform version: plans it as a start build of a stand-in
/// workspace and records its parameters (the `devmesh_parameter` data
/// sources Terraform read); a version that imports becomes the template's
/// active one unless a newer one already is.
async fn run_import(shared: &Shared, me: &Daemon, job: Job, shutdown: &CancellationToken) {
    let db = &shared.state.db;
    let version = job.input["version_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok());
    let row: Option<ImportRow> = match version {
        Some(id) => sqlx::query_as(
            "SELECT id, template_id, number, archive FROM template_versions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(db)
        .await
        .unwrap_or_default(),
        None => None,
    };
    let Some(row) = row else {
        let failed = Outcome::Failed("the job names no template version".into());
        let _ = jobs::complete(db, job.id, me.id, &failed).await;
        return;
    };
    let attempt = Attempt::start(db, &job, me, shared.heartbeat_every, shutdown);
    let dir = shared.work.join(job.id.to_string());
    let imported = import(shared, &row, job.id, &dir, &attempt.log, &attempt.cancel).await;
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = match imported {
        Ok(params) => match record_import(db, &row, &params).await {
            Ok(()) => {
                let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
                let _ = attempt.log.send((
                    LogStream::Provisioner,
                    format!(
                        "devmesh: parameters: {}",
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
                Outcome::Succeeded
            }
            Err(e) => Outcome::Failed(format!("recording the import failed: {e}")),
        },
        Err(Imported::Canceled) => Outcome::Canceled,
        Err(Imported::Failed(e)) => Outcome::Failed(e),
    };
    attempt.end("import", &outcome).await;
}

/// Why an import did not succeed.
enum Imported {
    Canceled,
    Failed(String),
}

impl From<RunError> for Imported {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Canceled { .. } => Imported::Canceled,
            e => Imported::Failed(e.to_string()),
        }
    }
}

async fn import(
    shared: &Shared,
    row: &ImportRow,
    job: Uuid,
    dir: &Path,
    log: &mpsc::UnboundedSender<(LogStream, String)>,
    cancel: &CancellationToken,
) -> Result<Vec<devmesh_shared::parameters::TemplateParameter>, Imported> {
    let env = [
        ("DEVMESH_BUILD_ID", job.to_string()),
        ("DEVMESH_WORKSPACE_NAME", "import".to_owned()),
        ("DEVMESH_WORKSPACE_TRANSITION", "start".to_owned()),
        ("DEVMESH_WORKSPACE_OWNER", "import".to_owned()),
    ];
    let what = format!("importing version {}", row.number);
    let run = Run::prepare(
        shared,
        row.archive.as_deref(),
        dir,
        &what,
        &env,
        log,
        cancel,
    )?;
    run.terraform(&["init", "-no-color", "-input=false"])
        .await?;
    run.terraform(&[
        "plan",
        "-refresh=false",
        "-no-color",
        "-input=false",
        "-out=devmesh.tfplan",
    ])
    .await?;
    let json = run.output(&["show", "-json", "devmesh.tfplan"]).await?;
    let plan: Value = serde_json::from_str(&json)
        .map_err(|e| Imported::Failed(format!("terraform show printed no plan: {e}")))?;
    parameters_in(&plan).map_err(Imported::Failed)
}

/// The parameters a plan read (its `devmesh_parameter` data sources, in
/// every module), checked: unique names and usable patterns.
fn parameters_in(
    plan: &Value,
) -> Result<Vec<devmesh_shared::parameters::TemplateParameter>, String> {
    fn walk<'a>(module: &'a Value, out: &mut Vec<&'a Value>) {
        for r in module["resources"].as_array().into_iter().flatten() {
            if r["mode"] == "data" && r["type"] == "devmesh_parameter" {
                out.push(&r["values"]);
            }
        }
        for child in module["child_modules"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    let mut found = Vec::new();
    walk(&plan["prior_state"]["values"]["root_module"], &mut found);
    let mut params: Vec<devmesh_shared::parameters::TemplateParameter> = Vec::new();
    for v in found {
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        let p = devmesh_shared::parameters::TemplateParameter {
            name: s("name").unwrap_or_default(),
            kind: s("type").unwrap_or_else(|| "string".into()),
            description: s("description"),
            default: s("default"),
            mutable: v["mutable"].as_bool().unwrap_or(false),
            options: v["options"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o.as_str().map(str::to_owned))
                .collect(),
            validation_min: v["validation_min"].as_f64(),
            validation_max: v["validation_max"].as_f64(),
            validation_regex: s("validation_regex"),
        };
        if params.iter().any(|q| q.name == p.name) {
            return Err(format!(
                "two devmesh_parameter data sources are named {:?}",
                p.name
            ));
        }
        if let Some(d) = &p.default {
            devmesh_shared::parameters::check_value(&p, d)
                .map_err(|e| format!("parameter {:?}: its default {e}", p.name))?;
        }
        params.push(p);
    }
    params.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(params)
}

async fn record_import(
    db: &sqlx::PgPool,
    row: &ImportRow,
    params: &[devmesh_shared::parameters::TemplateParameter],
) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE template_versions SET parameters = $2 WHERE id = $1")
        .bind(row.id)
        .bind(sqlx::types::Json(params))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE templates t SET active_version_id = $2, updated_at = now()
         WHERE t.id = $1 AND (SELECT number FROM template_versions WHERE id = t.active_version_id) <= $3",
    )
    .bind(row.template_id)
    .bind(row.id)
    .bind(row.number)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The bookkeeping of one job while a daemon runs it: its log writer and
/// its heartbeat (which carries cancellation).
struct Attempt {
    job: Uuid,
    daemon: Uuid,
    db: sqlx::PgPool,
    log: mpsc::UnboundedSender<(LogStream, String)>,
    writer: tokio::task::JoinHandle<()>,
    beat: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Attempt {
    fn start(
        db: &sqlx::PgPool,
        job: &Job,
        me: &Daemon,
        every: Duration,
        shutdown: &CancellationToken,
    ) -> Self {
        let (log, lines) = mpsc::unbounded_channel();
        let cancel = shutdown.child_token();
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        Self {
            job: job.id,
            daemon: me.id,
            db: db.clone(),
            log,
            writer: tokio::spawn(write_logs(db.clone(), job.id, lines)),
            beat: tokio::spawn(heartbeat(
                db.clone(),
                job.id,
                me.id,
                every,
                cancel.clone(),
                lost.clone(),
            )),
            cancel,
            lost,
        }
    }

    /// Logs how the `what` ended, flushes the log and records the outcome;
    /// false when the job timed out meanwhile (its result is dropped).
    async fn end(self, what: &str, outcome: &Outcome) -> bool {
        self.beat.abort();
        let line = match outcome {
            Outcome::Succeeded => format!("devmesh: {what} succeeded"),
            Outcome::Failed(e) => format!("devmesh: {what} failed: {e}"),
            Outcome::Canceled => format!("devmesh: {what} canceled"),
        };
        let _ = self.log.send((LogStream::Provisioner, line));
        drop(self.log);
        let _ = self.writer.await;
        if self.lost.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(job.id = %self.job, "the job timed out while it ran; its result is dropped");
            return false;
        }
        if let Err(e) = jobs::complete(&self.db, self.job, self.daemon, outcome).await {
            tracing::warn!(error = %e, "cannot record a job's outcome");
        }
        true
    }
}

/// One Terraform run in a prepared working directory: the template
/// unpacked beside the devmesh provider, the build's environment, its log
/// and its cancellation.
struct Run<'a> {
    tf: &'a Terraform,
    workdir: Workdir,
    env: Vec<(String, String)>,
    log: &'a mpsc::UnboundedSender<(LogStream, String)>,
    cancel: &'a CancellationToken,
}

impl<'a> Run<'a> {
    /// Unpacks `archive` into `dir` and says `what` it is about to do;
    /// `env` comes on top of the access URL.
    fn prepare(
        shared: &'a Shared,
        archive: Option<&[u8]>,
        dir: &Path,
        what: &str,
        env: &[(&str, String)],
        log: &'a mpsc::UnboundedSender<(LogStream, String)>,
        cancel: &'a CancellationToken,
    ) -> Result<Self, RunError> {
        let failed = |msg: String| RunError::Spawn(std::io::Error::other(msg));
        let Some(tf) = &shared.terraform else {
            let e = devmesh_provisioner::terraform::FindError::NotFound(
                "the server found none when it started".into(),
            );
            return Err(failed(e.to_string()));
        };
        let archive =
            archive.ok_or_else(|| failed("the template version has no Terraform code".into()))?;
        let workdir = Workdir::prepare(dir, &shared.provider, devmesh_shared::VERSION)
            .map_err(|e| failed(format!("cannot prepare {}: {e}", dir.display())))?;
        devmesh_provisioner::archive::unpack(archive, &workdir.template())
            .map_err(|e| failed(e.to_string()))?;
        let mut all = vec![(
            "DEVMESH_ACCESS_URL".to_owned(),
            shared.state.config.access_url.clone(),
        )];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let run = Self {
            tf,
            workdir,
            env: all,
            log,
            cancel,
        };
        run.say(format!("devmesh: {what} with Terraform {}", tf.version()));
        Ok(run)
    }

    fn say(&self, line: String) {
        let _ = self.log.send((LogStream::Provisioner, line));
    }

    /// `terraform <args>`, announced, its output into the log.
    async fn terraform(&self, args: &[&str]) -> Result<(), RunError> {
        self.say(format!("devmesh: terraform {}", args[0]));
        let log = self.log;
        self.tf
            .run(&self.workdir, args, &self.env, self.cancel, |s, l| {
                let stream = match s {
                    Stream::Stdout => LogStream::Stdout,
                    Stream::Stderr => LogStream::Stderr,
                };
                let _ = log.send((stream, l.to_owned()));
            })
            .await
    }

    /// `terraform <args>`'s standard output (its errors into the log).
    async fn output(&self, args: &[&str]) -> Result<String, RunError> {
        let mut out = String::new();
        let log = self.log;
        self.tf
            .run(
                &self.workdir,
                args,
                &self.env,
                self.cancel,
                |s, l| match s {
                    Stream::Stdout => out.push_str(l),
                    Stream::Stderr => {
                        let _ = log.send((LogStream::Stderr, l.to_owned()));
                    }
                },
            )
            .await?;
        Ok(out)
    }
}

/// Runs Terraform for `build` in `dir`; saves the state whatever happens.
async fn execute(
    shared: &Shared,
    build: &BuildRow,
    dir: &Path,
    log: &mpsc::UnboundedSender<(LogStream, String)>,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    let env = [
        ("DEVMESH_BUILD_ID", build.id.to_string()),
        ("DEVMESH_WORKSPACE_ID", build.workspace_id.to_string()),
        ("DEVMESH_WORKSPACE_NAME", build.workspace_name.clone()),
        ("DEVMESH_WORKSPACE_TRANSITION", build.transition.clone()),
        ("DEVMESH_WORKSPACE_OWNER", build.owner_name.clone()),
        ("DEVMESH_WORKSPACE_OWNER_EMAIL", build.owner_email.clone()),
        (
            "DEVMESH_PARAMETERS",
            serde_json::to_string(&build.parameters.0).unwrap_or_default(),
        ),
    ];
    let what = format!("{} {}", build.transition, build.workspace_name);
    let run = match Run::prepare(
        shared,
        build.archive.as_deref(),
        dir,
        &what,
        &env,
        log,
        cancel,
    ) {
        Ok(run) => run,
        Err(e) => {
            let _ = log.send((LogStream::Provisioner, format!("devmesh: {e}")));
            return Err(e);
        }
    };
    let state_file = run.workdir.template().join("terraform.tfstate");
    if let Some(state) = &build.state {
        std::fs::write(&state_file, state).map_err(RunError::Spawn)?;
    }
    run.terraform(&["init", "-no-color", "-input=false"])
        .await?;
    let ran = if build.transition == "delete" {
        run.terraform(&["destroy", "-auto-approve", "-no-color", "-input=false"])
            .await
    } else {
        run.terraform(&["apply", "-auto-approve", "-no-color", "-input=false"])
            .await
    };
    // The state is kept whatever the outcome: a failed apply may have
    // created things the next build must know about.
    match std::fs::read(&state_file) {
        Ok(state) => {
            if let Err(e) = sqlx::query(
                "INSERT INTO workspace_terraform_states (workspace_id, state) VALUES ($1, $2)
                 ON CONFLICT (workspace_id) DO UPDATE SET state = $2, updated_at = now()",
            )
            .bind(build.workspace_id)
            .bind(shared.vault.wrap(STATE_PURPOSE, &state))
            .execute(&shared.state.db)
            .await
            {
                let msg = format!("cannot save the Terraform state: {e}");
                run.say(format!("devmesh: {msg}"));
                return Err(RunError::Spawn(std::io::Error::other(msg)));
            }
        }
        Err(e) if build.state.is_some() || ran.is_ok() => {
            run.say(format!("devmesh: Terraform left no state: {e}"));
        }
        Err(_) => {}
    }
    ran
}

/// Records what a successful build did: a start build's agents and apps,
/// a delete build's workspace gone.
async fn finish(shared: &Shared, build: &BuildRow) -> sqlx::Result<()> {
    let db = &shared.state.db;
    let mut tx = db.begin().await?;
    match build.transition.as_str() {
        "start" => {
            let state: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT state FROM workspace_terraform_states WHERE workspace_id = $1",
            )
            .bind(build.workspace_id)
            .fetch_optional(&mut *tx)
            .await?;
            let state: Value = state
                .and_then(|s| open_state(&shared.vault, &s).ok())
                .and_then(|s| serde_json::from_slice(&s).ok())
                .unwrap_or_default();
            let agents = agents_in(&state);
            crate::api::workspaces::insert_agents(&mut tx, build.workspace_id, build.id, &agents)
                .await?;
        }
        "delete" => {
            sqlx::query("UPDATE workspaces SET deleted = true, updated_at = now() WHERE id = $1")
                .bind(build.workspace_id)
                .execute(&mut *tx)
                .await?;
        }
        _ => {}
    }
    tx.commit().await
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
            Some((
                AgentSpec {
                    name,
                    directory: a["dir"].as_str().map(str::to_owned),
                    env: str_map(&a["env"]),
                    apps,
                    scripts,
                },
                token,
            ))
        })
        .collect()
}

/// Heartbeats until aborted; cancels `cancel` when someone asks to cancel
/// the job or the job is lost (`lost` set).
async fn heartbeat(
    db: sqlx::PgPool,
    job: Uuid,
    daemon: Uuid,
    every: Duration,
    cancel: CancellationToken,
    lost: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        tokio::time::sleep(every).await;
        match jobs::heartbeat(&db, job, daemon).await {
            Ok(Beat::Continue) => {}
            Ok(Beat::Cancel) => cancel.cancel(),
            Ok(Beat::Lost) => {
                lost.store(true, std::sync::atomic::Ordering::Relaxed);
                cancel.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "a provisioner heartbeat failed"),
        }
    }
}

/// Writes log lines in batches until the channel closes.
async fn write_logs(
    db: sqlx::PgPool,
    job: Uuid,
    mut lines: mpsc::UnboundedReceiver<(LogStream, String)>,
) {
    let mut batch = Vec::new();
    while let Some(first) = lines.recv().await {
        batch.push(first);
        // Whatever else is already waiting goes in the same insert.
        while batch.len() < 500 {
            match lines.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        if let Err(e) = jobs::append_logs(&db, job, &batch).await {
            tracing::warn!(error = %e, lines = batch.len(), "cannot store build log lines");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_names_its_agents_tokens_and_apps() {
        let state = serde_json::json!({"resources": [
            {"mode": "managed", "type": "devmesh_agent", "name": "main", "instances": [
                {"attributes": {"id": "a1", "token": "t1", "dir": "/home/dev",
                                "env": {"K": "v"}, "startup_script": "echo hi"}}]},
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
        assert_eq!(main.apps[0].port, Some(8080));
        assert_eq!(
            main.apps[0].sharing_level,
            devmesh_shared::api::SharingLevel::Public
        );
        assert!(agents[1].0.apps.is_empty());
    }
}
