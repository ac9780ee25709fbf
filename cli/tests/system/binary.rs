//! The real `devmesh` binary: configuration errors, the embedded database
//! across restarts and crashes, and the CLI a new user follows.

use std::process::Stdio;
use std::time::Duration;

use devmesh_tests::{fresh_database, shared_tempdir};
use tokio::process::Command;

use crate::support::{BIN, ServerProcess, cli, ok, stderr};

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
        (
            vec!["agent", "--url", "ftp://devmesh.example.com"],
            vec![("DEVMESH_AGENT_TOKEN", "t")],
            "--url",
        ),
        (
            vec!["agent", "--url", "http://127.0.0.1:9"],
            vec![],
            "--token",
        ),
        (vec!["agent", "--config", bad_toml], vec![], "unknown field"),
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
    let out = crate::support::first_login(cfg, &url).await;
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
    // The primary runs as a role that owns devmesh's tables and nothing
    // more; the keys in them are encrypted under a key file of its own.
    let superuser = sqlx::postgres::PgConnectOptions::new()
        .socket(data.join("run"))
        .port(5432)
        .username("devmesh")
        .password(
            std::fs::read_to_string(data.join("postgres.password"))
                .unwrap()
                .trim(),
        )
        .database("postgres");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect_with(&superuser)
        .await
        .unwrap();
    let sessions: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.usename::text, r.rolsuper FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
         WHERE a.application_name = 'devmesh-primary'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!sessions.is_empty());
    assert!(
        sessions.iter().all(|(u, sup)| u == "devmesh_app" && !sup),
        "{sessions:?}"
    );
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT tableowner::text FROM pg_tables WHERE schemaname = 'public'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(owners, ["devmesh_app"]);
    assert_eq!(
        std::fs::metadata(data.join("secrets.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
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

    // Path apps are off unless enabled.
    let resp = reqwest::get(format!("{url}/@root/dev/apps/web/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(text.contains("disabled"), "{text}");

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
    let out = refused_start(&data).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach") && err.contains("/var/lib/devmesh"),
        "{err}"
    );
}

#[tokio::test]
async fn the_bring_your_own_workspace_workflow_from_the_cli() {
    let db = fresh_database().await;
    let config = tempfile::tempdir().unwrap();
    let cfg = config.path();
    let url_secret = db.url();
    let server = ServerProcess::start(
        &["--relay-address", "127.0.0.1:0"],
        &[("DEVMESH_POSTGRES_URL", url_secret.expose())],
        cfg,
    )
    .await;
    let url = server.url.clone();
    ok(&cli(
        cfg,
        &[
            "login",
            &url,
            "--username",
            "me",
            "--email",
            "me@example.com",
            "--password",
            "me-password",
        ],
    )
    .await);

    let file = cfg.join("byo.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "main", "apps": [{"slug": "web", "port": 9}],
            "scripts": [{"name": "hello", "script": "echo line one; echo line two"}]}]}"#,
    )
    .unwrap();
    let out = ok(&cli(
        cfg,
        &[
            "templates",
            "create",
            "byo",
            "--file",
            file.to_str().unwrap(),
        ],
    )
    .await);
    assert!(out.contains("Created template byo"), "{out}");
    let bad = cfg.join("bad.json");
    std::fs::write(&bad, r#"{"agents": [{"name": "Main"}]}"#).unwrap();
    let out = cli(
        cfg,
        &[
            "templates",
            "create",
            "bad",
            "--file",
            bad.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        stderr(&out).contains("definition.agents[0].name"),
        "{}",
        stderr(&out)
    );

    let out = ok(&cli(cfg, &["create", "dev", "--template", "byo"]).await);
    let command = out
        .lines()
        .find(|l| l.contains("devmesh agent"))
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .to_owned();
    assert!(
        command.starts_with(&format!("DEVMESH_URL={url} DEVMESH_AGENT_TOKEN=")),
        "{command}"
    );
    let token = command
        .split("DEVMESH_AGENT_TOKEN=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();

    // The printed command, run as printed.
    let agent = crate::support::AgentProcess::start(&url, &token, cfg);
    let logs = crate::support::eventually(30, "script output via devmesh logs", || async {
        let out = ok(&cli(cfg, &["logs", "dev"]).await);
        out.contains("[hello] line two").then_some(out)
    })
    .await;
    assert!(
        logs.contains("[hello] line one\n[hello] line two"),
        "{logs}"
    );
    let list = crate::support::eventually(30, "agent ready in devmesh list", || async {
        let out = ok(&cli(cfg, &["list"]).await);
        out.contains("main (connected via primary, ready)")
            .then_some(out)
    })
    .await;
    assert!(
        list.contains("me/dev") && list.contains("started"),
        "{list}"
    );

    assert!(ok(&cli(cfg, &["stop", "dev"]).await).contains("Stopped dev"));
    let list = ok(&cli(cfg, &["list"]).await);
    assert!(list.contains("stopped"), "{list}");
    let out = ok(&cli(cfg, &["start", "dev"]).await);
    assert!(
        out.contains("DEVMESH_AGENT_TOKEN=") && !out.contains(&token),
        "a start prints a new token: {out}"
    );
    assert!(ok(&cli(cfg, &["delete", "dev"]).await).contains("Deleted dev"));
    let out = cli(cfg, &["logs", "dev"]).await;
    assert!(!out.status.success());
    agent.kill().await;
    server.stop().await;
}

#[tokio::test]
async fn a_long_data_dir_gets_a_private_socket_directory_that_nobody_can_prepare() {
    let base = shared_tempdir("devmesh-long-");
    let data = base.join("d".repeat(100));
    let hashed = std::env::temp_dir().join(format!(
        "devmesh-pg-{}",
        &hex::encode(devmesh_shared::secret::sha256(
            data.as_os_str().as_encoded_bytes()
        ))[..12]
    ));
    let _ = std::fs::remove_dir_all(&hashed);
    // Someone else prepared the predictable directory: refused, clearly.
    std::fs::create_dir_all(&hashed).unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        std::os::unix::fs::chown(&hashed, Some(nobody.uid.as_raw()), None).unwrap();
    } else {
        std::fs::remove_dir(&hashed).unwrap();
        std::os::unix::fs::symlink("/", &hashed).unwrap();
    }
    let out = refused_start(&data).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not ours"), "{}", stderr(&out));
    let _ = std::fs::remove_file(&hashed);
    let _ = std::fs::remove_dir_all(&hashed);

    // Without the squatter the server starts on the private directory.
    let server = ServerProcess::start(&["--data-dir", data.to_str().unwrap()], &[], &base).await;
    assert!(hashed.join(".s.PGSQL.5432").exists());
    server.stop().await;
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&hashed);
}

/// Runs `devmesh server` on `data`, expecting it to refuse to start, and
/// returns its output.
async fn refused_start(data: &std::path::Path) -> std::process::Output {
    let run = Command::new(BIN)
        .args([
            "server",
            "--http-address",
            "127.0.0.1:0",
            "--relay-address",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("refuses promptly")
        .unwrap()
}

#[tokio::test]
async fn each_long_running_process_lists_only_its_own_flags() {
    let dir = tempfile::tempdir().unwrap();
    // A flag only the client commands take.
    let client_only = ["-o, --output"];
    for (process, own, foreign) in [
        (
            "server",
            "--data-dir",
            &["--token <TOKEN>", "--url <URL>"][..],
        ),
        (
            "edge",
            "--edge-token",
            &["--token <TOKEN>", "--url <URL>"][..],
        ),
        ("agent", "--token", &[][..]),
    ] {
        let help = ok(&cli(dir.path(), &[process, "--help"]).await);
        assert!(help.contains(own), "{process}: {help}");
        for flag in client_only.iter().chain(foreign) {
            assert!(!help.contains(flag), "{process} lists {flag:?}: {help}");
        }
    }
    // The client commands keep theirs, before or after the command.
    let help = ok(&cli(dir.path(), &["whoami", "--help"]).await);
    assert!(
        help.contains("-o, --output") && help.contains("--url <URL>"),
        "{help}"
    );
    let out = cli(
        dir.path(),
        &["-o", "json", "regions", "--url", "http://127.0.0.1:9"],
    )
    .await;
    // Parsed (not a usage error, exit 64); it just has no session.
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not signed in"), "{}", stderr(&out));
}
