//! A provisioner daemon: claims jobs from a [`Coordinator`] and runs
//! Terraform for them with the devmesh provider.
//!
//! The same loop runs inside `devmesh server` (its coordinator is the
//! database, in-process) and as `devmesh provisioner start` (its
//! coordinator is the primary's `/api/v2/provisionerd`). A job comes with
//! everything it needs ([`JobSpec`]); the daemon unpacks the template beside
//! the workspace's last state, runs `terraform init` and `apply` (or
//! `destroy`), streams every output line to the job's log, heartbeats, saves
//! the state whatever the outcome, and reports how it ended. An import
//! plans the version and reports the parameters it declares.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use devmesh_shared::parameters::TemplateParameter;
use devmesh_shared::provisionerd::{
    Beat, Completion, JobKind, JobSpec, LogLine, LogStream, MAX_LOG_BATCH, MAX_LOG_LINE, Outcome,
    TemplateResource, outcome_line,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::terraform::{FindError, RunError, Stream, Terraform, Workdir};

/// Where a daemon gets jobs and reports on them. Every call is about a job
/// this daemon holds; the coordinator refuses the others.
pub trait Coordinator: Send + Sync + 'static {
    /// The next job this daemon may take, waiting a while for one (`None`:
    /// none came; ask again).
    fn acquire(&self) -> impl Future<Output = anyhow::Result<Option<JobSpec>>> + Send;
    /// Says the job is still being worked on; learns of cancellation.
    fn heartbeat(&self, job: Uuid) -> impl Future<Output = anyhow::Result<Beat>> + Send;
    /// Appends lines to the job's log, in order.
    fn append_logs(
        &self,
        job: Uuid,
        lines: Vec<LogLine>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Saves the workspace's Terraform state after a build's run.
    fn save_state(
        &self,
        job: Uuid,
        state: Vec<u8>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Reports how the job ended; false when it was no longer this
    /// daemon's (the result is dropped).
    fn complete(
        &self,
        job: Uuid,
        completion: Completion,
    ) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// What a daemon runs jobs with.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Terraform, when the machine has it (jobs fail saying what to
    /// install when it does not).
    pub terraform: Option<Terraform>,
    /// The devmesh binary, which serves the Terraform provider.
    pub provider: PathBuf,
    /// Scratch directories for runs.
    pub work: PathBuf,
    /// How often a running job heartbeats.
    pub heartbeat_every: Duration,
}

/// Claims and runs jobs until `shutdown`; `name` is for the log.
pub async fn serve<C: Coordinator>(
    coord: Arc<C>,
    runner: Arc<Runner>,
    name: String,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let acquired = tokio::select! {
            () = shutdown.cancelled() => return,
            a = coord.acquire() => a,
        };
        match acquired {
            Ok(Some(job)) => {
                failures = 0;
                run(&coord, &runner, job, &shutdown).await;
            }
            Ok(None) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(500 * 2u64.pow(failures.min(5)));
                tracing::warn!(daemon = %name, error = %format!("{e:#}"), retry_in = ?wait, "cannot ask for provisioner jobs");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Runs one job and reports its outcome.
async fn run<C: Coordinator>(
    coord: &Arc<C>,
    runner: &Runner,
    job: JobSpec,
    shutdown: &CancellationToken,
) {
    tracing::info!(job.id = %job.id, what = %job.what, "running a provisioner job");
    let attempt = Attempt::start(coord, runner.heartbeat_every, job.id, shutdown);
    // A job that runs too long (a hung provider, a stuck script) is
    // interrupted like a cancellation, and fails saying why.
    let timed_out = Arc::new(AtomicBool::new(false));
    let deadline = (job.timeout_secs > 0).then(|| {
        let (cancel, timed_out) = (attempt.cancel.clone(), timed_out.clone());
        let limit = Duration::from_secs(job.timeout_secs);
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            timed_out.store(true, Ordering::Relaxed);
            cancel.cancel();
        })
    });
    let dir = runner.work.join(job.id.to_string());
    let (outcome, parameters, resources) = match job.kind {
        JobKind::Build => match build(&**coord, runner, &job, &dir, &attempt).await {
            Ok(()) => (Outcome::Succeeded, Vec::new(), Vec::new()),
            Err(e) => (outcome_of(e), Vec::new(), Vec::new()),
        },
        JobKind::Import => match import(runner, &job, &dir, &attempt).await {
            Ok((params, resources)) => {
                let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
                attempt.say(format!(
                    "devmesh: parameters: {}",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ));
                attempt.say(format!(
                    "devmesh: resources: {}",
                    if resources.is_empty() {
                        "none".to_owned()
                    } else {
                        resources
                            .iter()
                            .map(|r| {
                                let kind = if r.persistent {
                                    "persistent"
                                } else {
                                    "ephemeral"
                                };
                                format!("{} ({kind})", r.address)
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
                (Outcome::Succeeded, params, resources)
            }
            Err(e) => (outcome_of(e), Vec::new(), Vec::new()),
        },
    };
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(d) = deadline {
        d.abort();
    }
    let outcome = if outcome == Outcome::Canceled && timed_out.load(Ordering::Relaxed) {
        Outcome::Failed {
            error: format!(
                "Terraform did not finish within {} s, so it was interrupted",
                job.timeout_secs
            ),
        }
    } else {
        outcome
    };
    let what = match job.kind {
        JobKind::Build => "build",
        JobKind::Import => "import",
    };
    let recorded = attempt
        .end(
            &**coord,
            job.id,
            what,
            Completion {
                outcome: outcome.clone(),
                parameters,
                resources,
            },
        )
        .await;
    match recorded {
        Some(true) => tracing::info!(job.id = %job.id, outcome = ?outcome, "provisioner job ended"),
        Some(false) | None => {
            tracing::warn!(job.id = %job.id, "the job was no longer this daemon's; its result is dropped")
        }
    }
}

fn outcome_of(e: RunError) -> Outcome {
    match e {
        RunError::Canceled { .. } => Outcome::Canceled,
        e => Outcome::Failed {
            error: e.to_string(),
        },
    }
}

/// The bookkeeping of one job while it runs: its log (shipped in batches
/// by a task of its own) and its heartbeat (which carries cancellation).
struct Attempt {
    log: mpsc::UnboundedSender<LogLine>,
    shipper: tokio::task::JoinHandle<()>,
    beat: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    lost: Arc<AtomicBool>,
}

impl Attempt {
    fn start<C: Coordinator>(
        coord: &Arc<C>,
        every: Duration,
        job: Uuid,
        shutdown: &CancellationToken,
    ) -> Self {
        let (log, lines) = mpsc::unbounded_channel();
        let cancel = shutdown.child_token();
        let lost = Arc::new(AtomicBool::new(false));
        Self {
            log,
            shipper: tokio::spawn(ship_logs(coord.clone(), job, lines)),
            beat: tokio::spawn(heartbeat(
                coord.clone(),
                job,
                every,
                cancel.clone(),
                lost.clone(),
            )),
            cancel,
            lost,
        }
    }

    fn say(&self, line: String) {
        let _ = self.log.send(LogLine {
            stream: LogStream::Provisioner,
            line,
        });
    }

    /// Logs how it ended, flushes the log and reports the outcome; `None`
    /// when the job was lost while it ran (nothing is reported).
    async fn end<C: Coordinator>(
        self,
        coord: &C,
        job: Uuid,
        what: &str,
        completion: Completion,
    ) -> Option<bool> {
        self.beat.abort();
        self.say(outcome_line(what, &completion.outcome));
        drop(self.log);
        let _ = self.shipper.await;
        if self.lost.load(Ordering::Relaxed) {
            return None;
        }
        // The outcome must land: a job left running would fail only at the
        // heartbeat timeout, saying its daemon died when it did not.
        let mut wait = Duration::from_millis(200);
        for _ in 0..6 {
            match coord.complete(job, completion.clone()).await {
                Ok(recorded) => return Some(recorded),
                Err(e) => {
                    tracing::warn!(job.id = %job, error = %format!("{e:#}"), "cannot report a job's outcome; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        None
    }
}

/// Heartbeats until aborted; cancels `cancel` when someone asks to cancel
/// the job or the job is lost (`lost` set).
async fn heartbeat<C: Coordinator>(
    coord: Arc<C>,
    job: Uuid,
    every: Duration,
    cancel: CancellationToken,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(every).await;
        match coord.heartbeat(job).await {
            Ok(Beat::Continue) => {}
            Ok(Beat::Cancel) => cancel.cancel(),
            Ok(Beat::Lost) => {
                lost.store(true, Ordering::Relaxed);
                cancel.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(job.id = %job, error = %format!("{e:#}"), "a provisioner heartbeat failed")
            }
        }
    }
}

/// The most log bytes sent in one call (the primary takes bodies of up
/// to 1 MiB).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Ships log lines in batches until the channel closes; lines longer than
/// [`MAX_LOG_LINE`] are cut.
async fn ship_logs<C: Coordinator>(
    coord: Arc<C>,
    job: Uuid,
    mut lines: mpsc::UnboundedReceiver<LogLine>,
) {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut next = lines.recv().await;
    while let Some(mut line) = next.take() {
        if line.line.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !line.line.is_char_boundary(end) {
                end -= 1;
            }
            line.line.truncate(end);
            line.line.push('…');
        }
        bytes += line.line.len() + 32;
        batch.push(line);
        // Whatever else is already waiting goes in the same call.
        if batch.len() < MAX_LOG_BATCH
            && bytes < MAX_BATCH_BYTES
            && let Ok(l) = lines.try_recv()
        {
            next = Some(l);
            continue;
        }
        let n = batch.len();
        if let Err(e) = coord.append_logs(job, std::mem::take(&mut batch)).await {
            tracing::warn!(job.id = %job, error = %format!("{e:#}"), lines = n, "cannot store build log lines");
        }
        bytes = 0;
        next = lines.recv().await;
    }
}

/// One Terraform run in a prepared working directory: the template
/// unpacked beside the devmesh provider, the job's environment, its log
/// and its cancellation.
struct Run<'a> {
    tf: &'a Terraform,
    workdir: Workdir,
    env: Vec<(String, String)>,
    attempt: &'a Attempt,
}

impl<'a> Run<'a> {
    /// Unpacks the job's archive into `dir` and says what it is about to do.
    fn prepare(
        runner: &'a Runner,
        job: &JobSpec,
        dir: &Path,
        attempt: &'a Attempt,
    ) -> Result<Self, RunError> {
        let failed = |msg: String| {
            attempt.say(format!("devmesh: {msg}"));
            RunError::Spawn(std::io::Error::other(msg))
        };
        let Some(tf) = &runner.terraform else {
            let e = FindError::NotFound("the daemon found none when it started".into());
            return Err(failed(e.to_string()));
        };
        let workdir = Workdir::prepare(dir, &runner.provider, devmesh_shared::VERSION)
            .map_err(|e| failed(format!("cannot prepare {}: {e}", dir.display())))?;
        crate::archive::unpack(&job.archive, &workdir.template())
            .map_err(|e| failed(e.to_string()))?;
        let run = Self {
            tf,
            workdir,
            env: job
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            attempt,
        };
        attempt.say(format!(
            "devmesh: {} with Terraform {}",
            job.what,
            tf.version()
        ));
        Ok(run)
    }

    /// Sets (or replaces) one variable of the run's environment.
    fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// `terraform <args>`, announced, its output into the log.
    async fn terraform(&self, args: &[&str]) -> Result<(), RunError> {
        self.attempt.say(format!("devmesh: terraform {}", args[0]));
        let log = &self.attempt.log;
        self.tf
            .run(
                &self.workdir,
                args,
                &self.env,
                &self.attempt.cancel,
                |s, l| {
                    let stream = match s {
                        Stream::Stdout => LogStream::Stdout,
                        Stream::Stderr => LogStream::Stderr,
                    };
                    let _ = log.send(LogLine {
                        stream,
                        line: l.to_owned(),
                    });
                },
            )
            .await
    }

    /// `terraform <args>`'s standard output (its errors into the log).
    async fn output(&self, args: &[&str]) -> Result<String, RunError> {
        let mut out = String::new();
        let log = &self.attempt.log;
        self.tf
            .run(
                &self.workdir,
                args,
                &self.env,
                &self.attempt.cancel,
                |s, l| match s {
                    Stream::Stdout => out.push_str(l),
                    Stream::Stderr => {
                        let _ = log.send(LogLine {
                            stream: LogStream::Stderr,
                            line: l.to_owned(),
                        });
                    }
                },
            )
            .await?;
        Ok(out)
    }
}

/// Runs Terraform for a build; saves the state whatever happens.
async fn build<C: Coordinator>(
    coord: &C,
    runner: &Runner,
    job: &JobSpec,
    dir: &Path,
    attempt: &Attempt,
) -> Result<(), RunError> {
    let run = Run::prepare(runner, job, dir, attempt)?;
    let state_file = run.workdir.template().join("terraform.tfstate");
    if let Some(state) = &job.state {
        std::fs::write(&state_file, state).map_err(RunError::Spawn)?;
    }
    run.terraform(&["init", "-no-color", "-input=false"])
        .await?;
    let verb = if job.destroy { "destroy" } else { "apply" };
    // Terraform writes the state as each resource is done: saving it as it
    // changes means a daemon killed mid-apply loses nothing it created.
    let done = CancellationToken::new();
    let apply = async {
        let ran = run
            .terraform(&[verb, "-auto-approve", "-no-color", "-input=false"])
            .await;
        done.cancel();
        ran
    };
    let (ran, ()) = tokio::join!(apply, save_as_it_changes(coord, job, &state_file, &done));
    // The state is kept whatever the outcome: a failed apply may have
    // created things the next build must know about.
    match std::fs::read(&state_file) {
        Ok(state) => {
            if let Err(e) = coord.save_state(job.id, state).await {
                let msg = format!("cannot save the Terraform state: {e:#}");
                attempt.say(format!("devmesh: {msg}"));
                return Err(RunError::Spawn(std::io::Error::other(msg)));
            }
        }
        Err(e) if job.state.is_some() || ran.is_ok() => {
            attempt.say(format!("devmesh: Terraform left no state: {e}"));
        }
        Err(_) => {}
    }
    ran
}

/// How often a running build's state file is checked for changes.
const STATE_POLL: Duration = Duration::from_secs(1);

/// Saves `file` each time it changes until `done`.
async fn save_as_it_changes<C: Coordinator>(
    coord: &C,
    job: &JobSpec,
    file: &Path,
    done: &CancellationToken,
) {
    let mut last = job.state.clone();
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(STATE_POLL) => {}
        }
        let Ok(now) = tokio::fs::read(file).await else {
            continue;
        };
        // Terraform replaces the file whole; a half-written one would not
        // parse, and is left for the next look.
        if last.as_ref() == Some(&now) || serde_json::from_slice::<Value>(&now).is_err() {
            continue;
        }
        match coord.save_state(job.id, now.clone()).await {
            Ok(()) => {
                tracing::info!(job.id = %job.id, bytes = now.len(), "saved the running build's Terraform state");
                last = Some(now);
            }
            Err(e) => {
                tracing::warn!(job.id = %job.id, error = %format!("{e:#}"), "cannot save a running build's state")
            }
        }
    }
}

/// Plans a template version as a start build of a stand-in workspace, and
/// as a stop build; returns the parameters it declares and its resources
/// (those the stop plan keeps are persistent).
async fn import(
    runner: &Runner,
    job: &JobSpec,
    dir: &Path,
    attempt: &Attempt,
) -> Result<(Vec<TemplateParameter>, Vec<TemplateResource>), RunError> {
    let mut run = Run::prepare(runner, job, dir, attempt)?;
    run.terraform(&["init", "-no-color", "-input=false"])
        .await?;
    let failed = |msg: String| {
        attempt.say(format!("devmesh: {msg}"));
        RunError::Spawn(std::io::Error::other(msg))
    };
    let mut plans = Vec::new();
    for transition in ["start", "stop"] {
        run.set_env("DEVMESH_WORKSPACE_TRANSITION", transition);
        let file = format!("-out={transition}.tfplan");
        run.terraform(&["plan", "-refresh=false", "-no-color", "-input=false", &file])
            .await?;
        let json = run
            .output(&["show", "-json", &format!("{transition}.tfplan")])
            .await?;
        let plan: Value = serde_json::from_str(&json)
            .map_err(|e| failed(format!("terraform show printed no plan: {e}")))?;
        plans.push(plan);
    }
    let params = parameters_in(&plans[0]).map_err(failed)?;
    Ok((params, resources_in(&plans[0], &plans[1])))
}

/// The managed resources a start plan creates (devmesh's own bookkeeping
/// resources aside), persistent when the stop plan keeps them.
pub fn resources_in(start: &Value, stop: &Value) -> Vec<TemplateResource> {
    fn walk(module: &Value, out: &mut Vec<(String, String)>) {
        for r in module["resources"].as_array().into_iter().flatten() {
            let kind = r["type"].as_str().unwrap_or_default();
            if r["mode"] == "managed" && !kind.starts_with("devmesh_") {
                let address = r["address"].as_str().unwrap_or_default();
                let bare = match address.strip_suffix(']') {
                    Some(a) => a.rsplit_once('[').map_or(address, |(a, _)| a),
                    None => address,
                };
                out.push((bare.to_owned(), kind.to_owned()));
            }
        }
        for child in module["child_modules"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    let mut started = Vec::new();
    walk(&start["planned_values"]["root_module"], &mut started);
    let mut kept = Vec::new();
    walk(&stop["planned_values"]["root_module"], &mut kept);
    let mut out: Vec<TemplateResource> = Vec::new();
    for (address, kind) in started {
        if out.iter().any(|r| r.address == address) {
            continue;
        }
        let persistent = kept.iter().any(|(a, _)| *a == address);
        out.push(TemplateResource {
            address,
            kind,
            persistent,
        });
    }
    out
}

/// The parameters a plan read (its `devmesh_parameter` data sources, in
/// every module), checked.
pub fn parameters_in(plan: &Value) -> Result<Vec<TemplateParameter>, String> {
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
    let mut params: Vec<TemplateParameter> = found
        .into_iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().map(str::to_owned);
            TemplateParameter {
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
            }
        })
        .collect();
    devmesh_shared::parameters::check_definitions(&params)?;
    params.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_the_stop_plan_keeps_are_persistent() {
        let start = serde_json::json!({"planned_values": {"root_module": {
            "resources": [
                {"address": "devmesh_agent.main", "mode": "managed", "type": "devmesh_agent"},
                {"address": "terraform_data.home", "mode": "managed", "type": "terraform_data"},
                {"address": "terraform_data.agent[0]", "mode": "managed", "type": "terraform_data"},
                {"address": "data.devmesh_workspace.me", "mode": "data", "type": "devmesh_workspace"}
            ],
            "child_modules": [{"resources": [
                {"address": "module.disk.docker_volume.v[\"a\"]", "mode": "managed", "type": "docker_volume"},
                {"address": "module.disk.docker_volume.v[\"b\"]", "mode": "managed", "type": "docker_volume"}
            ]}]
        }}});
        let stop = serde_json::json!({"planned_values": {"root_module": {
            "resources": [
                {"address": "terraform_data.home", "mode": "managed", "type": "terraform_data"}
            ],
            "child_modules": [{"resources": [
                {"address": "module.disk.docker_volume.v[\"a\"]", "mode": "managed", "type": "docker_volume"}
            ]}]
        }}});
        let got = resources_in(&start, &stop);
        let summary: Vec<_> = got
            .iter()
            .map(|r| (r.address.as_str(), r.persistent))
            .collect();
        assert_eq!(
            summary,
            [
                ("terraform_data.home", true),
                ("terraform_data.agent", false),
                ("module.disk.docker_volume.v", true),
            ]
        );
    }
}
