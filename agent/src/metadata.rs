//! Agent metadata: one task per item runs its command every interval
//! (`sh -c` in the agent's directory and environment, in its own process
//! group so a timeout kills everything it started); the first line of its
//! output is the value. One reporter posts only the values that changed.

use std::collections::BTreeMap;
use std::time::Duration;

use devmesh_shared::api::{AgentMetadata, MAX_METADATA_VALUE, MetadataSpec};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiClient, log_api_error};
use crate::scripts::ScriptEnv;
use devmesh_net::backoff::Backoff;

/// Starts one task per item plus the reporter; all end when `cancel` fires.
pub(crate) fn spawn(
    client: ApiClient,
    specs: &[MetadataSpec],
    env: &ScriptEnv,
    cancel: CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    if specs.is_empty() {
        return tasks;
    }
    let (tx, rx) = mpsc::channel(specs.len() * 4);
    for spec in specs {
        tasks.spawn(measure(
            spec.clone(),
            env.clone(),
            tx.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(report(client, rx, cancel));
    tasks
}

async fn measure(
    spec: MetadataSpec,
    env: ScriptEnv,
    values: mpsc::Sender<AgentMetadata>,
    cancel: CancellationToken,
) {
    let every = Duration::from_secs(u64::from(spec.interval_seconds.max(1)));
    let timeout = Duration::from_secs(u64::from(
        spec.timeout_seconds.clamp(1, spec.interval_seconds.max(1)),
    ));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let (value, error) = run(&spec.script, &env, timeout).await;
        let m = AgentMetadata {
            key: spec.key.clone(),
            value,
            error,
            collected_at: None,
        };
        if values.send(m).await.is_err() {
            return;
        }
    }
}

/// Runs `script` once: its first line of output, and why it failed.
pub(crate) async fn run(
    script: &str,
    env: &ScriptEnv,
    timeout: Duration,
) -> (String, Option<String>) {
    let mut child = match env.sh(script).spawn() {
        Ok(c) => c,
        Err(e) => return (String::new(), Some(format!("cannot run sh: {e}"))),
    };
    let pid = child.id();
    // Only the start of the output matters: a command that prints without
    // end (`yes`) must not fill the agent's memory. Past the limit the
    // pipes close and the command gets SIGPIPE.
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let ran = tokio::time::timeout(timeout, async {
        let out = head(stdout, OUTPUT_LIMIT);
        let err = head(stderr, 4 * 1024);
        let (out, err) = tokio::join!(out, err);
        (child.wait().await, out, err)
    })
    .await;
    let first = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        cut(text.lines().next().unwrap_or_default().trim().to_owned())
    };
    match ran {
        Ok((Ok(status), out, err)) => {
            let value = first(&out);
            if status.success() {
                (value, None)
            } else {
                let why = first(&err);
                (
                    value,
                    Some(if why.is_empty() {
                        format!("{status}")
                    } else {
                        format!("{status}: {why}")
                    }),
                )
            }
        }
        Ok((Err(e), _, _)) => (String::new(), Some(format!("cannot wait for it: {e}"))),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            (
                String::new(),
                Some(format!("timed out after {} s", timeout.as_secs())),
            )
        }
    }
}

/// How much of a command's output is read.
const OUTPUT_LIMIT: u64 = 64 * 1024;

/// At most `limit` bytes of `pipe`; the pipe is closed after.
async fn head<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>, limit: u64) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.take(limit).read_to_end(&mut buf).await;
    }
    buf
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_METADATA_VALUE {
        let mut end = MAX_METADATA_VALUE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Posts values that changed (the measuring time aside), merging those
/// that arrive while a post is retried.
async fn report(
    client: ApiClient,
    mut values: mpsc::Receiver<AgentMetadata>,
    cancel: CancellationToken,
) {
    let mut reported: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    let mut pending: BTreeMap<String, AgentMetadata> = BTreeMap::new();
    let mut backoff = Backoff::default();
    loop {
        if pending.is_empty() {
            tokio::select! {
                v = values.recv() => match v {
                    Some(m) => { pending.insert(m.key.clone(), m); }
                    None => return,
                },
                () = cancel.cancelled() => return,
            }
        }
        while let Ok(m) = values.try_recv() {
            pending.insert(m.key.clone(), m);
        }
        pending.retain(|k, m| reported.get(k) != Some(&(m.value.clone(), m.error.clone())));
        if pending.is_empty() {
            continue;
        }
        let batch: Vec<AgentMetadata> = pending.values().cloned().collect();
        let result = tokio::select! {
            r = client.metadata(batch) => r,
            () = cancel.cancelled() => return,
        };
        match result {
            Ok(()) => {
                for (k, m) in std::mem::take(&mut pending) {
                    reported.insert(k, (m.value, m.error));
                }
                backoff.reset();
            }
            Err(e) => {
                log_api_error("reporting metadata", &e);
                if !backoff.wait(&cancel).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_gives_its_first_line_or_why_it_failed() {
        let env = ScriptEnv::default();
        let second = Duration::from_secs(5);
        assert_eq!(
            run("echo one; echo two", &env, second).await,
            ("one".into(), None)
        );
        let (value, error) = run("echo half; echo oops >&2; exit 3", &env, second).await;
        assert_eq!(value, "half");
        let error = error.unwrap();
        assert!(error.contains('3') && error.contains("oops"), "{error}");
        let (_, error) = run("sleep 30", &env, Duration::from_millis(300)).await;
        assert!(error.unwrap().contains("timed out"));
        let (value, _) = run("head -c 5000 /dev/zero | tr '\\0' x", &env, second).await;
        assert_eq!(value.len(), MAX_METADATA_VALUE);
        // Endless output is cut, not buffered.
        let (value, _) = run("yes", &env, second).await;
        assert_eq!(value, "y");
    }

    #[tokio::test]
    async fn the_agent_token_is_not_in_a_commands_environment() {
        let env = ScriptEnv::default();
        let (value, _) = run(
            "echo ${DEVMESH_AGENT_TOKEN:-none}",
            &env,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(value, "none");
    }
}
