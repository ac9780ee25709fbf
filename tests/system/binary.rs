//! The real `devmesh` binary: configuration errors, the embedded database
//! across restarts and crashes, and the CLI a new user follows.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use devmesh_tests::{fresh_database, shared_tempdir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_devmesh");

/// A `devmesh server` process, killed on drop.
struct ServerProcess {
    child: Child,
    url: String,
    log: PathBuf,
}

impl ServerProcess {
    async fn start(args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("server-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(BIN);
        cmd.arg("server")
            .args(["--http-address", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn devmesh server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("Started HTTP listener at ") {
                    return Some(url.to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "server did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, url, log }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id().expect("running") as i32), sig).expect("signal server");
    }

    /// SIGTERM and wait for a clean exit.
    async fn stop(mut self) {
        self.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stops in time")
            .unwrap();
        assert!(
            status.success(),
            "exit {status}:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGKILL, as a crash would.
    async fn crash(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// Runs the CLI with its own config directory.
async fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DEVMESH_CONFIG_DIR", config)
        .env_remove("DEVMESH_URL")
        .env_remove("DEVMESH_SESSION_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run devmesh")
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn bad_configuration_exits_64_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "http-adress = \"127.0.0.1:1\"\n").unwrap();
    let bad_toml = bad_toml.to_str().unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["server", "--http-address", "nope"],
            vec![],
            "--http-address",
        ),
        (
            vec!["server", "--access-url", "localhost:3000"],
            vec![],
            "--access-url",
        ),
        (
            vec!["server", "--wildcard-access-url", "apps.example.com"],
            vec![],
            "*.apps.example.com",
        ),
        (
            vec!["server", "--postgres-url", "mysql://db"],
            vec![],
            "--postgres-url",
        ),
        (vec!["server", "--no-such-flag"], vec![], "--no-such-flag"),
        (
            vec!["server", "--config", "/nonexistent/devmesh.toml"],
            vec![],
            "cannot read config file",
        ),
        (
            vec!["server", "--config", bad_toml],
            vec![],
            "unknown field",
        ),
        (
            vec!["server"],
            vec![("DEVMESH_HTTP_ADDRESS", "also-bad")],
            "--http-address",
        ),
    ];
    for (args, env, needle) in cases {
        let out = Command::new(BIN)
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn embedded_database_keeps_everything_across_restarts_and_crashes() {
    let data = shared_tempdir("devmesh-data-");
    let config = tempfile::tempdir().unwrap();
    let cfg = config.path();
    let data_arg = data.to_str().unwrap();

    let server = ServerProcess::start(&["--data-dir", data_arg], &[], cfg).await;
    let url = server.url.clone();
    let out = ok(&cli(
        cfg,
        &[
            "login",
            &url,
            "--username",
            "admin",
            "--email",
            "admin@example.com",
            "--password",
            "admin-password",
        ],
    )
    .await);
    assert!(out.contains("Signed in"), "{out}");
    let session = cfg.join("session.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&session).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key = ok(&cli(cfg, &["keys", "create", "--name", "ci"]).await)
        .trim()
        .to_owned();
    let edge_token = ok(&cli(
        cfg,
        &["edges", "create", "eu-west", "--display-name", "Frankfurt"],
    )
    .await)
    .trim()
    .to_owned();
    assert!(edge_token.contains(':'), "{edge_token}");
    ok(&cli(
        cfg,
        &[
            "users",
            "create",
            "--username",
            "bob",
            "--email",
            "bob@example.com",
            "--password",
            "bob-password",
        ],
    )
    .await);
    // The cluster listens on a private socket only: no TCP port.
    let pid_file = std::fs::read_to_string(data.join("postgres/postmaster.pid")).unwrap();
    assert_eq!(
        pid_file.lines().nth(5).map(str::trim),
        Some(""),
        "listen address must be empty: {pid_file}"
    );
    server.stop().await;
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "PostgreSQL stops with the server"
    );

    // A crash left a stale postmaster.pid behind.
    std::fs::write(data.join("postgres/postmaster.pid"), "999999\n/elsewhere\n").unwrap();
    let server = ServerProcess::start(&["--data-dir", data_arg], &[], cfg).await;
    let check = |url: String| {
        let key = key.clone();
        async move {
            let out = ok(&cli(cfg, &["whoami", "--url", &url]).await);
            assert!(out.starts_with("admin <admin@example.com>"), "{out}");
            let users = ok(&cli(cfg, &["users", "list", "--url", &url]).await);
            assert!(
                users.contains("bob@example.com") && users.contains("admin"),
                "{users}"
            );
            let edges = ok(&cli(cfg, &["edges", "list", "--url", &url, "-o", "json"]).await);
            let edges: serde_json::Value = serde_json::from_str(&edges).unwrap();
            assert_eq!(edges[0]["name"], "eu-west");
            assert_eq!(edges[0]["display_name"], "Frankfurt");
            let resp = reqwest::Client::new()
                .get(format!("{url}/api/v2/users/me"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "the API key survived the restart");
        }
    };
    check(server.url.clone()).await;

    // SIGKILL: the guardian stops PostgreSQL, and the next start takes over.
    server.crash().await;
    let server = ServerProcess::start(&["--data-dir", data_arg], &[], cfg).await;
    check(server.url.clone()).await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn an_external_database_url_and_the_non_interactive_cli() {
    let db = fresh_database().await;
    let config = tempfile::tempdir().unwrap();
    let cfg = config.path();
    let url_secret = db.url();
    let server =
        ServerProcess::start(&[], &[("DEVMESH_POSTGRES_URL", url_secret.expose())], cfg).await;
    let url = server.url.clone();

    let out = cli(cfg, &["whoami"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("devmesh login"), "{}", stderr(&out));

    // Without a terminal, missing answers are errors that name the flag.
    let out = cli(
        cfg,
        &[
            "login",
            &url,
            "--username",
            "root",
            "--email",
            "root@example.com",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--password"), "{}", stderr(&out));

    let out = cli(
        cfg,
        &[
            "login",
            &url,
            "--username",
            "BAD",
            "--email",
            "root@example.com",
            "--password",
            "long-enough",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("username:"),
        "validation errors are shown per field: {}",
        stderr(&out)
    );

    ok(&cli(
        cfg,
        &[
            "login",
            &url,
            "--username",
            "root",
            "--email",
            "root@example.com",
            "--password",
            "long-enough",
        ],
    )
    .await);
    // A second login goes through the normal path.
    let out = ok(&cli(
        cfg,
        &[
            "login",
            &url,
            "--email",
            "root",
            "--password",
            "long-enough",
        ],
    )
    .await);
    assert!(out.contains("as root"), "{out}");
    let out = cli(
        cfg,
        &[
            "login",
            &url,
            "--email",
            "root",
            "--password",
            "wrong-password",
        ],
    )
    .await;
    assert!(
        stderr(&out).contains("Incorrect email or password"),
        "{}",
        stderr(&out)
    );

    let regions = ok(&cli(cfg, &["regions"]).await);
    assert!(regions.contains("primary"), "{regions}");
    ok(&cli(
        cfg,
        &[
            "users",
            "create",
            "--username",
            "amy",
            "--email",
            "amy@example.com",
            "--password",
            "amy-password",
        ],
    )
    .await);
    assert!(ok(&cli(cfg, &["users", "suspend", "amy"]).await).contains("Suspended amy"));
    let list = ok(&cli(cfg, &["users", "list"]).await);
    assert!(
        list.lines()
            .any(|l| l.starts_with("amy") && l.contains("suspended")),
        "{list}"
    );
    let keys = ok(&cli(cfg, &["keys", "list", "-o", "json"]).await);
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2, "two password sessions");

    assert!(ok(&cli(cfg, &["logout"]).await).contains("Signed out"));
    assert!(!cfg.join("session.json").exists());
    let out = cli(cfg, &["whoami", "--url", &url]).await;
    assert!(!out.status.success());
    server.stop().await;
}

#[tokio::test]
async fn as_root_a_data_directory_the_database_user_cannot_enter_is_refused() {
    if !nix::unistd::Uid::effective().is_root() {
        // Without root the cluster runs as the caller, who can reach their own directories.
        return;
    }
    let locked = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(locked.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = locked.path().join("data");
    let run = Command::new(BIN)
        .args([
            "server",
            "--http-address",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("refuses promptly")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach") && err.contains("/var/lib/devmesh"),
        "{err}"
    );
}
