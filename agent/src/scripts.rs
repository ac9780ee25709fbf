//! Startup and stop scripts: `sh -c` in the manifest's directory and
//! environment, each in its own process group so a timeout kills everything
//! it started, with stdout and stderr streamed line by line to the logs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use devmesh_shared::api::{ScriptSpec, ScriptTrigger};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::logs::{Level, LogSender};

/// A single line longer than this is split into several entries.
pub(crate) const MAX_LINE: usize = 16 * 1024;

/// How long to wait for a script's output after it exits. Longer only if it
/// left a background process holding stdout or stderr; that output keeps
/// streaming, but the script counts as finished.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Set for every script, so scripts can tell they run under the agent.
pub(crate) const AGENT_ENV: &str = "DEVMESH_AGENT";

/// Never handed to scripts: the agent token is the agent's secret, not the
/// workspace's.
pub(crate) const TOKEN_ENV: &str = "DEVMESH_AGENT_TOKEN";

/// Where and with what environment scripts run.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScriptEnv {
    /// Working directory; the agent's own if `None`. Never created.
    pub(crate) directory: Option<PathBuf>,
    /// Added to the agent's environment.
    pub(crate) env: BTreeMap<String, String>,
}

impl ScriptEnv {
    /// `sh -c script` in this environment, its output piped, no input,
    /// leading a process group of its own so a timeout can kill everything
    /// it started and not just `sh`; killed if dropped.
    pub(crate) fn sh(&self, script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        self.apply(&mut cmd);
        cmd
    }

    /// Gives `cmd` this environment and directory, and the marker that it
    /// runs under the agent; never the agent's token.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        cmd.env_remove(TOKEN_ENV)
            .envs(&self.env)
            .env(AGENT_ENV, "1");
        if let Some(dir) = &self.directory {
            cmd.current_dir(dir);
        }
    }
}

/// How one script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exit status 0.
    Success,
    /// A non-zero exit, death by signal, or it could not be started.
    Failed,
    /// It ran past its timeout and its process group was killed.
    TimedOut,
}

/// Whether a failing script stops the ones after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// Later scripts likely depend on earlier ones (startup).
    Stop,
    /// Every script gets its chance to clean up (shutdown).
    Continue,
}

/// Runs the scripts for `trigger` one after another in manifest order. The
/// result is the first failure's kind, or [`Outcome::Success`].
pub(crate) async fn run_all(
    scripts: &[ScriptSpec],
    trigger: ScriptTrigger,
    env: &ScriptEnv,
    logs: &LogSender,
    on_failure: OnFailure,
) -> Outcome {
    let mut result = Outcome::Success;
    for spec in scripts.iter().filter(|s| s.run_on == trigger) {
        let outcome = run_one(spec, env, logs).await;
        if outcome != Outcome::Success {
            if result == Outcome::Success {
                result = outcome;
            }
            if on_failure == OnFailure::Stop {
                break;
            }
        }
    }
    result
}

/// Runs one script to completion or its timeout (`timeout_seconds` 0 means
/// none). Dropping the future kills the script's process group.
pub(crate) async fn run_one(spec: &ScriptSpec, env: &ScriptEnv, logs: &LogSender) -> Outcome {
    let name = spec.name.as_str();
    let mut child = match env.sh(&spec.script).spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(script = name, error = %e, "cannot start script");
            logs.send(name, Level::Error, format!("cannot start script: {e}"));
            return Outcome::Failed;
        }
    };
    let mut group = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()));
    tracing::info!(script = name, pid = ?group.0, "script started");

    let mut readers = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(forward_lines(
            out,
            name.to_owned(),
            Level::Info,
            logs.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(forward_lines(
            err,
            name.to_owned(),
            Level::Error,
            logs.clone(),
        ));
    }

    let timeout =
        (spec.timeout_seconds > 0).then(|| Duration::from_secs(spec.timeout_seconds.into()));
    let waited = match timeout {
        Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
        None => Some(child.wait().await),
    };
    let outcome = match waited {
        Some(Ok(status)) if status.success() => Outcome::Success,
        Some(Ok(status)) => {
            tracing::warn!(script = name, %status, "script failed");
            logs.send(name, Level::Error, format!("script {status}"));
            Outcome::Failed
        }
        Some(Err(e)) => {
            tracing::warn!(script = name, error = %e, "cannot wait for script");
            group.kill();
            Outcome::Failed
        }
        None => {
            let secs = spec.timeout_seconds;
            tracing::warn!(
                script = name,
                timeout_seconds = secs,
                "script timed out; killing it"
            );
            logs.send(
                name,
                Level::Error,
                format!("timed out after {secs}s; killed"),
            );
            group.kill();
            // Reap `sh`; the rest of the group is reaped by init.
            let _ = child.wait().await;
            Outcome::TimedOut
        }
    };
    // From here the group belongs to whatever the script left running on
    // purpose (a dev server started with `&`).
    group.disarm();

    let drained = tokio::time::timeout(OUTPUT_GRACE, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            script = name,
            "a background process keeps the script's output open; it keeps streaming"
        );
        readers.detach_all();
    }
    outcome
}

/// Kills a script's process group when dropped while armed, so a cancelled
/// script never outlives the agent's interest in it.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (already gone) is fine.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `r` line by line (lines split at [`MAX_LINE`] bytes) and sends
/// each to the logs. Invalid UTF-8 is replaced, not dropped.
pub(crate) async fn forward_lines<R: AsyncRead + Unpin>(
    r: R,
    source: String,
    level: Level,
    logs: LogSender,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE, r);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::debug!(script = %source, error = %e, "script output read failed");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE - line.len();
        let avail = &buf[..buf.len().min(room)];
        if let Some(pos) = avail.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&avail[..pos]);
            reader.consume(pos + 1);
            emit(&mut line, &source, level, &logs);
        } else {
            let n = avail.len();
            line.extend_from_slice(avail);
            reader.consume(n);
            if line.len() >= MAX_LINE {
                // Split at a character boundary: an incomplete UTF-8
                // sequence at the cut starts the next piece.
                let carry = match std::str::from_utf8(&line) {
                    Err(e) if e.error_len().is_none() => line.split_off(e.valid_up_to()),
                    _ => Vec::new(),
                };
                emit(&mut line, &source, level, &logs);
                line = carry;
            }
        }
    }
    if !line.is_empty() {
        emit(&mut line, &source, level, &logs);
    }
}

fn emit(line: &mut Vec<u8>, source: &str, level: Level, logs: &LogSender) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    logs.send(source, level, String::from_utf8_lossy(line).into_owned());
    line.clear();
}

#[cfg(test)]
mod tests;
