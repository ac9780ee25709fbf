//! Real `sh` scripts: output, exit codes, timeouts and process groups.

use std::path::Path;

use devmesh_shared::api::AgentLogEntry;

use super::*;
use crate::logs::LogReceiver;
use crate::testutil::{eventually, within};

fn spec(name: &str, script: &str, run_on: ScriptTrigger, timeout_seconds: u32) -> ScriptSpec {
    ScriptSpec {
        name: name.into(),
        script: script.into(),
        run_on,
        timeout_seconds,
    }
}

/// Everything queued so far.
fn drain(rx: &mut LogReceiver) -> Vec<AgentLogEntry> {
    std::iter::from_fn(|| rx.try_recv()).collect()
}

fn lines(entries: &[AgentLogEntry], level: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.level == level)
        .map(|e| e.output.clone())
        .collect()
}

/// True once no live (non-zombie) process is left in group `pgid`. Zombies
/// count as gone: whether they are reaped depends on the container's init.
fn group_gone(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ..."; comm may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|p| p.parse::<i32>().ok()) == Some(pgid)
            && fields.first() != Some(&"Z")
        {
            return false;
        }
    }
    true
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test]
async fn stdout_and_stderr_lines_arrive_with_their_levels() {
    let (logs, mut rx) = LogSender::channel(1024);
    let s = spec(
        "setup",
        "echo one; echo two >&2; printf 'three\\r\\nfour'; echo five >&2",
        ScriptTrigger::Start,
        10,
    );
    let outcome = run_one(&s, &ScriptEnv::default(), &logs).await;
    assert_eq!(outcome, Outcome::Success);
    let got = drain(&mut rx);
    assert!(got.iter().all(|e| e.source == "setup"), "{got:?}");
    assert_eq!(lines(&got, "info"), ["one", "three", "four"]);
    assert_eq!(lines(&got, "error"), ["two", "five"]);
}

#[tokio::test]
async fn scripts_get_the_manifest_env_and_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (logs, mut rx) = LogSender::channel(1024);
    let env = ScriptEnv {
        directory: Some(dir.path().to_owned()),
        env: [("GREETING".to_owned(), "hi there".to_owned())].into(),
    };
    let s = spec(
        "env",
        "echo \"$GREETING\"; echo \"$DEVMESH_AGENT\"; pwd",
        ScriptTrigger::Start,
        10,
    );
    assert_eq!(run_one(&s, &env, &logs).await, Outcome::Success);
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(
        lines(&drain(&mut rx), "info"),
        ["hi there", "1", cwd.to_str().unwrap()]
    );
}

#[tokio::test]
async fn a_non_zero_exit_fails_and_stops_later_start_scripts() {
    let (logs, mut rx) = LogSender::channel(1024);
    let scripts = [
        spec("ok", "echo fine", ScriptTrigger::Start, 10),
        spec("bad", "echo broken >&2; exit 3", ScriptTrigger::Start, 10),
        spec("never", "echo must not run", ScriptTrigger::Start, 10),
        spec("stop", "echo stop script", ScriptTrigger::Stop, 10),
    ];
    let outcome = run_all(
        &scripts,
        ScriptTrigger::Start,
        &ScriptEnv::default(),
        &logs,
        OnFailure::Stop,
    )
    .await;
    assert_eq!(outcome, Outcome::Failed);
    let got = drain(&mut rx);
    let sources: Vec<&str> = got.iter().map(|e| e.source.as_str()).collect();
    assert!(
        !sources.contains(&"never") && !sources.contains(&"stop"),
        "{got:?}"
    );
    assert!(
        got.iter().any(|e| e.source == "bad"
            && e.level == "error"
            && e.output.contains("exit status: 3")),
        "{got:?}"
    );
}

#[tokio::test]
async fn stop_scripts_all_run_and_report_the_first_failure() {
    let (logs, mut rx) = LogSender::channel(1024);
    let scripts = [
        spec("first", "exit 1", ScriptTrigger::Stop, 10),
        spec("second", "echo cleaned up", ScriptTrigger::Stop, 10),
    ];
    let outcome = run_all(
        &scripts,
        ScriptTrigger::Stop,
        &ScriptEnv::default(),
        &logs,
        OnFailure::Continue,
    )
    .await;
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        drain(&mut rx)
            .iter()
            .any(|e| e.source == "second" && e.output == "cleaned up")
    );
}

#[tokio::test]
async fn a_missing_directory_fails_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let (logs, _rx) = LogSender::channel(16);
    let env = ScriptEnv {
        directory: Some(missing.clone()),
        env: BTreeMap::new(),
    };
    let s = spec("x", "true", ScriptTrigger::Start, 10);
    assert_eq!(run_one(&s, &env, &logs).await, Outcome::Failed);
    assert!(!missing.exists());
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let (logs, mut rx) = LogSender::channel(1024);
    // A background sleep as well, so the group has more than `sh` in it.
    let s = spec(
        "slow",
        &format!("echo $$ > {}; sleep 30 & sleep 30", pidfile.display()),
        ScriptTrigger::Start,
        1,
    );
    let start = tokio::time::Instant::now();
    assert_eq!(
        run_one(&s, &ScriptEnv::default(), &logs).await,
        Outcome::TimedOut
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    let pgid = read_pid(&pidfile).expect("the script wrote its pid");
    eventually("the process group to be gone", || group_gone(pgid)).await;
    assert!(
        drain(&mut rx)
            .iter()
            .any(|e| e.level == "error" && e.output.contains("timed out"))
    );
}

#[tokio::test]
async fn dropping_a_running_script_kills_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let (logs, _rx) = LogSender::channel(1024);
    let s = spec(
        "cancelled",
        &format!("echo $$ > {}; sleep 30 & sleep 30", pidfile.display()),
        ScriptTrigger::Start,
        0,
    );
    let task = tokio::spawn(async move { run_one(&s, &ScriptEnv::default(), &logs).await });
    eventually("the script to start", || read_pid(&pidfile).is_some()).await;
    let pgid = read_pid(&pidfile).unwrap();
    assert!(!group_gone(pgid));
    task.abort();
    let _ = task.await;
    eventually("the process group to be gone", || group_gone(pgid)).await;
}

#[tokio::test]
async fn a_background_process_holding_output_does_not_block_the_script() {
    let (logs, mut rx) = LogSender::channel(1024);
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let s = spec(
        "daemon",
        &format!(
            "echo $$ > {}; (sleep 0.2; echo from the daemon; sleep 30) & echo started",
            pidfile.display()
        ),
        ScriptTrigger::Start,
        10,
    );
    let outcome = within("the script", run_one(&s, &ScriptEnv::default(), &logs)).await;
    assert_eq!(outcome, Outcome::Success);
    // The daemon's later output still streams.
    let mut got = Vec::new();
    while !got
        .iter()
        .any(|e: &AgentLogEntry| e.output == "from the daemon")
    {
        got.push(within("daemon output", rx.recv()).await.unwrap());
    }
    assert_eq!(got[0].output, "started");
    // Clean up the daemon.
    let pgid = read_pid(&pidfile).unwrap();
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

#[tokio::test]
async fn long_lines_are_split_at_16_kib_on_character_boundaries() {
    let (logs, mut rx) = LogSender::channel(1024);
    let (mut w, r) = tokio::io::duplex(4096);
    let reader = tokio::spawn(forward_lines(r, "big".into(), Level::Info, logs));
    // 16383 ASCII bytes then a 2-byte character straddling the cut.
    let mut line = vec![b'a'; MAX_LINE - 1];
    line.extend_from_slice("é".as_bytes());
    line.extend_from_slice(&vec![b'b'; MAX_LINE + 10]);
    line.extend_from_slice(b"\nshort\nno newline at end");
    tokio::io::AsyncWriteExt::write_all(&mut w, &line)
        .await
        .unwrap();
    drop(w);
    reader.await.unwrap();
    let got: Vec<String> = drain(&mut rx).into_iter().map(|e| e.output).collect();
    assert_eq!(
        got.len(),
        5,
        "{:?}",
        got.iter().map(String::len).collect::<Vec<_>>()
    );
    assert_eq!(got[0], "a".repeat(MAX_LINE - 1));
    assert!(got[1].starts_with('é') && got[1].len() == MAX_LINE);
    assert!(got.iter().all(|l| l.len() <= MAX_LINE));
    let joined: String = got[..3].concat();
    assert_eq!(
        joined.as_bytes(),
        &line[..line.iter().position(|&b| b == b'\n').unwrap()]
    );
    assert_eq!(got[3], "short");
    assert_eq!(got[4], "no newline at end");
}
