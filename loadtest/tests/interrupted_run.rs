//! A load-test run interrupted halfway (Ctrl-C) leaves no process behind:
//! the processes a run starts (the primary and its PostgreSQL, edges,
//! agents, nginx master and workers, rathole, h2load) are listed before the
//! run and after it, and nothing new may remain.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

/// The programs a run starts, by their `comm` (at most 15 characters).
const STARTED: &[&str] = &["devmesh", "postgres", "nginx", "rathole", "h2load"];

/// Live processes running one of [`STARTED`]: pid → command line.
fn processes() -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !STARTED.contains(&comm.trim()) {
            continue;
        }
        // Zombies are gone already; only their parent has to reap them.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        found.insert(pid, String::from_utf8_lossy(&cmdline).replace('\0', " "));
    }
    found
}

fn new_since(before: &BTreeMap<u32, String>) -> BTreeMap<u32, String> {
    processes()
        .into_iter()
        .filter(|(pid, _)| !before.contains_key(pid))
        .collect()
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
    let log = out.path().join("run.log");
    let before = processes();
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_devmesh-loadtest"))
        .arg("run")
        .arg(&scenario)
        .args(["--quick", "--devmesh"])
        .arg(&devmesh)
        .arg("--out")
        .arg(out.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(out.path().join("run.err")).unwrap())
        .spawn()
        .unwrap();

    // Halfway: the deployment and the baselines are up and the scenarios
    // have begun (the primary, its database, edges and agents run; so does
    // nginx where it is installed).
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .any(|p| Path::new(p).exists());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let started = new_since(&before);
        let count = |comm: &str| started.values().filter(|c| c.contains(comm)).count();
        let up = count("devmesh") >= 3 && count("postgres") >= 1 && (!nginx || count("nginx") >= 2);
        if up {
            break;
        }
        if let Some(status) = run.try_wait().unwrap() {
            panic!(
                "the run ended before it was interrupted ({status}):\n{}",
                std::fs::read_to_string(out.path().join("run.err")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the run never got going; started: {started:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let during = new_since(&before);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("the run did not stop within 90 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "Ctrl-C ends the run with 130");

    // What it started is gone (give the kernel a moment to reap).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = new_since(&before);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after the run ended: {left:#?}\n(while it ran: {during:#?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        during.len() >= 5,
        "the run had started its processes before the interrupt: {during:#?}"
    );
}
