//! A load-test run interrupted halfway (Ctrl-C) leaves no process behind:
//! every process the run started (the primary and its PostgreSQL, edges,
//! agents, nginx master and workers, rathole, h2load) is recorded while it
//! runs, and none may remain once it has ended.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

/// A process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Proc {
    parent: u32,
    /// Clock ticks after boot: with the pid, names one process for good.
    started: u64,
    zombie: bool,
    cmdline: String,
}

fn read(pid: u32) -> Option<Proc> {
    let dir = Path::new("/proc").join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // After the command name: state, parent, … starttime is field 22.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
    Some(Proc {
        zombie: rest.first() == Some(&"Z"),
        parent: rest.get(1)?.parse().ok()?,
        started: rest.get(19)?.parse().ok()?,
        cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
    })
}

/// Every live process descending from `root`.
fn descendants(root: u32) -> BTreeMap<u32, Proc> {
    let all: BTreeMap<u32, Proc> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(|pid| Some((pid, read(pid)?)))
        .collect();
    let mut found = BTreeMap::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, proc) in &all {
            if proc.parent == p && !found.contains_key(pid) {
                found.insert(*pid, proc.clone());
                frontier.push(*pid);
            }
        }
    }
    found
}

/// Calls `step` every `every` until it returns `Some`, failing with `what`
/// (and what `step` last saw) after `within`.
fn poll<T>(
    within: Duration,
    every: Duration,
    what: &str,
    mut step: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = step() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(every);
    }
}

#[test]
fn a_quick_run_interrupted_halfway_leaves_no_process_behind() {
    let devmesh = devmesh_tests::process::devmesh_bin();
    assert!(
        devmesh.is_file(),
        "{} is missing: build the workspace first (cargo test --workspace does)",
        devmesh.display()
    );
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/full.toml");
    let out = tempfile::tempdir().unwrap();
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_devmesh-loadtest"))
        .arg("run")
        .arg(&scenario)
        .args(["--quick", "--devmesh"])
        .arg(&devmesh)
        .arg("--out")
        .arg(out.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(out.path().join("run.log")).unwrap())
        .stderr(std::fs::File::create(out.path().join("run.err")).unwrap())
        .spawn()
        .unwrap();

    // Halfway: the deployment and the baselines are up and the scenarios
    // have begun (the primary, its database, edges and agents run; so does
    // nginx where it is installed). Everything seen meanwhile is recorded.
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .any(|p| Path::new(p).exists());
    let mut seen: BTreeMap<u32, Proc> = BTreeMap::new();
    let mut up_since = None;
    poll(
        Duration::from_secs(300),
        Duration::from_millis(100),
        "the run to get going",
        || {
            seen.extend(descendants(run.id()));
            let count = |what: &str| seen.values().filter(|p| p.cmdline.contains(what)).count();
            let up = count("devmesh") >= 3
                && count("postgres") >= 1
                && (!nginx || count("nginx: worker") >= 1);
            if up && up_since.is_none() {
                up_since = Some(Instant::now());
            }
            if let Some(status) = run.try_wait().unwrap() {
                panic!(
                    "the run ended before it was interrupted ({status}):\n{}",
                    std::fs::read_to_string(out.path().join("run.err")).unwrap_or_default()
                );
            }
            up_since
                .is_some_and(|t| t.elapsed() > Duration::from_secs(3))
                .then_some(())
        },
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = poll(
        Duration::from_secs(90),
        Duration::from_millis(50),
        "the run to stop after Ctrl-C",
        || {
            let done = run.try_wait().unwrap();
            if done.is_none() {
                seen.extend(descendants(run.id()));
            }
            done
        },
    );
    assert_eq!(status.code(), Some(130), "Ctrl-C ends the run with 130");

    // None of them remains (orphans would now belong to init; the pid and
    // start time together tell a leftover from a newcomer reusing the pid).
    let alive =
        |pid: &u32, p: &Proc| read(*pid).is_some_and(|now| now.started == p.started && !now.zombie);
    // Up to 15 s to end; then whatever is left is named below.
    let give_up = Instant::now() + Duration::from_secs(15);
    poll(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "every process the run started to end",
        || (seen.iter().all(|(pid, p)| !alive(pid, p)) || Instant::now() > give_up).then_some(()),
    );
    let left: Vec<_> = seen.iter().filter(|(pid, p)| alive(pid, p)).collect();
    assert!(
        left.is_empty(),
        "left behind after the run ended: {left:#?}"
    );
    assert!(
        seen.len() >= 5,
        "the run had started its processes before the interrupt: {seen:#?}"
    );
}
