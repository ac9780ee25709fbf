//! `devmesh ssh`: the real OpenSSH client, through the primary's HTTPS
//! endpoint, into the agent's SSH server over its tunnel.

use reqwest::StatusCode;
use serde_json::json;

use crate::provisioning::primary_with;
use crate::support::{AgentProcess, CliAs, eventually};

/// Workspace `name` of a new bring-your-own template whose one agent is
/// `agent` (JSON), with that agent running and connected; returns the
/// workspace's id, the agent's id and the agent process.
pub(crate) async fn running_workspace(
    server: &crate::support::ServerProcess,
    owner: &devmesh_tests::Api,
    dir: &std::path::Path,
    name: &str,
    agent: serde_json::Value,
) -> (String, String, AgentProcess) {
    running_workspace_with(server, owner, dir, name, agent, &[]).await
}

/// [`running_workspace`] with extra environment for the agent.
pub(crate) async fn running_workspace_with(
    server: &crate::support::ServerProcess,
    owner: &devmesh_tests::Api,
    dir: &std::path::Path,
    name: &str,
    agent: serde_json::Value,
    agent_env: &[(&str, &str)],
) -> (String, String, AgentProcess) {
    let template = format!("byo-{name}");
    let (status, body) = owner
        .post(
            "/templates",
            json!({"name": template, "definition": {"agents": [agent]}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, created) = owner
        .post("/workspaces", json!({"name": name, "template": template}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["workspace"]["id"].as_str().unwrap().to_owned();
    let token = created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_id = created["agent_tokens"][0]["agent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let process = AgentProcess::start_with(&server.url, &token, dir, agent_env);
    eventually(60, "the agent to connect", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["agents"][0]["status"] == "connected").then_some(())
    })
    .await;
    (id, agent_id, process)
}

/// An OpenSSH config file in `dir` with `Host devmesh.NAME` reaching
/// workspace `name` through `devmesh ssh --stdio`.
fn ssh_config(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let cfg = dir.join(format!("ssh_config_{name}"));
    std::fs::write(
        &cfg,
        format!(
            "Host devmesh.{name}\n    ProxyCommand '{}' ssh --stdio {name}\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n",
            crate::support::BIN
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test]
async fn ssh_runs_a_command_in_the_workspace_with_its_output_input_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (_id, agent_id, _agent) = running_workspace(
        &server,
        &owner,
        dir.path(),
        "box",
        json!({
            "name": "main",
            "directory": home.to_str().unwrap(),
            "env": {"GREETING": "hello"}
        }),
    )
    .await;

    let me = CliAs {
        config: dir.path().join("cli"),
        url: server.url.clone(),
        token: owner.token.clone().unwrap(),
    };
    // A command: its output, its errors, its directory and environment,
    // and its exit status, through OpenSSH.
    let out = me
        .run(&[
            "ssh",
            "box",
            "--",
            "echo \"$GREETING from $(pwd)\"; echo oops >&2; exit 3",
        ])
        .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("hello from {}", home.display())),
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oops"),
        "{out:?}"
    );
    // The agent's token is not in the session's environment.
    let out = me
        .run(&[
            "ssh",
            "box.main",
            "--",
            "echo token=${DEVMESH_AGENT_TOKEN:-none}",
        ])
        .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("token=none"),
        "{out:?}"
    );

    // Files: scp (sftp underneath, since OpenSSH 9) both ways, and sftp.
    let cfg = ssh_config(dir.path(), "box");
    let openssh = |program: &str| {
        let mut c = tokio::process::Command::new(program);
        c.arg("-F")
            .arg(&cfg)
            .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
            .env("DEVMESH_URL", &server.url)
            .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
            .stdin(std::process::Stdio::null());
        c
    };
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let local = dir.path().join("local.bin");
    std::fs::write(&local, &payload).unwrap();
    let out = openssh("scp")
        .arg(&local)
        .arg("devmesh.box:copied.bin")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(home.join("copied.bin")).unwrap(), payload);
    let back = dir.path().join("back.bin");
    let out = openssh("scp")
        .arg("devmesh.box:copied.bin")
        .arg(&back)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&back).unwrap(), payload);
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        "mkdir made\nrename copied.bin made/moved.bin\nls made\n",
    )
    .unwrap();
    let out = openssh("sftp")
        .arg("-b")
        .arg(&batch)
        .arg("devmesh.box")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("moved.bin"),
        "{out:?}"
    );
    assert!(home.join("made/moved.bin").is_file());

    // Every session is audited.
    let (_, audit) = owner.get("/audit").await;
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "ssh" && e["resource_name"] == "owner/box"),
        "{audit}"
    );

    // Others cannot: a member gets no such agent; a request without a key
    // header (a browser's cookie) is refused.
    let (status, _) = owner
        .post(
            "/users",
            json!({"email": "m@example.com", "username": "member", "password": "member-password"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let member = devmesh_tests::Api::new(&server.url, None)
        .login("member", "member-password")
        .await;
    let (status, _) = member
        .post(&format!("/workspaceagents/{agent_id}/ssh"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A stranger, with no key or a forged one, gets nothing.
    for api in [
        devmesh_tests::Api::new(&server.url, None),
        devmesh_tests::Api::new(
            &server.url,
            Some("abcdefghij-forgedsecretforgedsecret00".into()),
        ),
    ] {
        let (status, _) = api
            .post(&format!("/workspaceagents/{agent_id}/ssh"), json!({}))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // The session cookie opens none of the raw-stream routes, even from the
    // dashboard's own origin: the key must come in a header.
    // The session cookie (`devmesh_session_token` over plain HTTP) from the
    // dashboard's own origin.
    let with_cookie = |route: &str| {
        reqwest::Client::new()
            .post(format!(
                "{}/api/v2/workspaceagents/{agent_id}/{route}",
                server.url
            ))
            .header(
                "Cookie",
                format!("devmesh_session_token={}", owner.token.clone().unwrap()),
            )
            .header("Origin", &server.url)
    };
    for route in ["ssh", "probe?download=1", "udp?port=53"] {
        let resp = with_cookie(route).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{route}");
        let why = resp.text().await.unwrap();
        assert!(
            why.contains("Devmesh-Session-Token header"),
            "{route}: {why}"
        );
        // Nor with a session header that is not text beside it (read as
        // no header, it would leave the cookie to authenticate).
        let resp = with_cookie(route)
            .header(
                "Devmesh-Session-Token",
                reqwest::header::HeaderValue::from_bytes(b"\xe9").unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{route}");
    }
}

#[tokio::test]
async fn an_interactive_ssh_session_gets_a_terminal_of_the_clients_size() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (_id, _agent_id, _agent) =
        running_workspace(&server, &owner, dir.path(), "tty", json!({"name": "main"})).await;

    // `script` gives the CLI (and so OpenSSH) a terminal, of 100×30.
    let command = format!("stty cols 100 rows 30; '{}' ssh tty", crate::support::BIN);
    let token = owner.token.clone().unwrap();
    let cfg = dir.path().join("cli");
    let (out, status) = crate::support::at_terminal(
        &command,
        &[
            ("DEVMESH_CONFIG_DIR", cfg.to_str().unwrap()),
            ("DEVMESH_URL", server.url.as_str()),
            ("DEVMESH_SESSION_TOKEN", token.as_str()),
            ("TERM", "xterm-256color"),
        ],
        b"echo \"tty=$(tty) size=$(stty size) term=$TERM\"; exit 7\n",
    )
    .await;
    assert!(out.contains("tty=/dev/pts/"), "a terminal: {out}");
    assert!(out.contains("size=30 100"), "the client's size: {out}");
    assert!(
        out.contains("term=xterm-256color"),
        "the client's TERM: {out}"
    );
    assert_eq!(status.code(), Some(7), "the shell's exit status");
}

#[tokio::test]
async fn port_forward_carries_local_connections_to_a_port_in_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let upstream = devmesh_tests::upstream::Upstream::start().await;
    let (_id, _agent_id, _agent) =
        running_workspace(&server, &owner, dir.path(), "fw", json!({"name": "main"})).await;

    let port = || crate::support::free_port().unwrap();
    let (local, closed, refused) = (port(), port(), port());
    // A UDP echo server in the workspace.
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let mut answer = b"echo ".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&answer, from).await;
        }
    });
    let udp_local = port();
    let mut forward = tokio::process::Command::new(crate::support::BIN)
        .args(["port-forward", "fw", "--tcp"])
        .arg(format!("{local}:{}", upstream.port()))
        .arg("--tcp")
        .arg(format!("{closed}:{refused}"))
        .arg("--udp")
        .arg(format!("{udp_local}:{echo_port}"))
        .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
        .env("DEVMESH_URL", &server.url)
        .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("forward.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Many connections at once, each its own channel.
    let client = reqwest::Client::new();
    eventually(30, "the forward to listen", || async {
        client
            .get(format!("http://127.0.0.1:{local}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    let answers = futures_util::future::join_all((0..20).map(|i| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://127.0.0.1:{local}/echo?n={i}"))
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        }
    }))
    .await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["path"], "/echo", "{body}");
    }
    // A remote port nobody listens on: the local connection is closed, and
    // OpenSSH says why.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", closed))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut conn, &mut buf),
    )
    .await
    .expect("closed, not hanging")
    .unwrap_or(0);
    assert_eq!(n, 0);
    let said = eventually(10, "OpenSSH to say why", || async {
        let err = std::fs::read_to_string(dir.path().join("forward.err")).unwrap_or_default();
        err.contains("open failed").then_some(err)
    })
    .await;
    assert!(said.contains("connect failed"), "{said}");

    // UDP: datagrams from two clients each come back to their sender.
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for (i, c) in clients.iter().enumerate() {
        c.connect(("127.0.0.1", udp_local)).await.unwrap();
        for j in 0..3 {
            let sent = format!("client {i} datagram {j}");
            // UDP may drop: ask again until the answer comes.
            let got = eventually(20, "a UDP answer", || async {
                let mut buf = [0u8; 2048];
                c.send(sent.as_bytes()).await.ok()?;
                let n =
                    tokio::time::timeout(std::time::Duration::from_millis(500), c.recv(&mut buf))
                        .await
                        .ok()?
                        .ok()?;
                Some(String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .await;
            assert_eq!(got, format!("echo {sent}"));
        }
    }
    forward.kill().await.unwrap();

    // UDP to a port nobody listens on: the forward says so and stops.
    let (udp_local, nobody) = (port(), port());
    let mut refusing = tokio::process::Command::new(crate::support::BIN)
        .args(["port-forward", "fw", "--udp"])
        .arg(format!("{udp_local}:{nobody}"))
        .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
        .env("DEVMESH_URL", &server.url)
        .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let _ = c.send_to(b"anyone?", ("127.0.0.1", udp_local)).await;
        if let Ok(done) =
            tokio::time::timeout(std::time::Duration::from_millis(300), refusing.wait()).await
        {
            break done.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the forward never gave up"
        );
    };
    assert!(!status.success());
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(refusing.stderr.as_mut().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(
        err.contains(&format!("port {nobody} in the workspace refused UDP")),
        "{err}"
    );

    // Remote forwarding (`ssh -R`): a port in the workspace whose
    // connections come back to the client's side; it closes with the
    // session.
    let remote = port();
    let mut reverse = tokio::process::Command::new("ssh")
        .arg("-F")
        .arg(ssh_config(dir.path(), "fw"))
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("127.0.0.1:{remote}:127.0.0.1:{}", upstream.port()))
        .arg("devmesh.fw")
        .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
        .env("DEVMESH_URL", &server.url)
        .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let answer = eventually(30, "the remote forward to answer", || async {
        client
            .get(format!("http://127.0.0.1:{remote}/echo"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap()["path"],
        "/echo"
    );
    reverse.kill().await.unwrap();
    eventually(
        15,
        "the remote forward to close with the session",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", remote))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn config_ssh_keeps_a_managed_block_that_plain_ssh_uses() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (id, _agent_id, _agent) =
        running_workspace(&server, &owner, dir.path(), "box", json!({"name": "main"})).await;
    let me = CliAs {
        config: dir.path().join("cli"),
        url: server.url.clone(),
        token: owner.token.clone().unwrap(),
    };
    let file = dir.path().join("ssh_config");
    let mine = "Host other\n    User someone\n";
    std::fs::write(&file, mine).unwrap();
    let f = file.to_str().unwrap();

    // Shown first; not written without --yes when nobody can be asked.
    let out = me.run(&["config-ssh", "--file", f, "--dry-run"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("+ Host devmesh.box"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), mine);
    let out = me.run(&["config-ssh", "--file", f]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--yes"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), mine);

    // Written beside the user's own lines, which stay as they were.
    let out = me.run(&["config-ssh", "--file", f, "--yes"]).await;
    assert!(out.status.success(), "{out:?}");
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.starts_with(mine), "{written}");
    assert!(written.contains("Host devmesh.box"), "{written}");
    // Again: nothing to do.
    let out = me.run(&["config-ssh", "--file", f, "--yes"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("up to date"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);

    // Plain OpenSSH with that file reaches the workspace.
    let out = tokio::process::Command::new("ssh")
        .args(["-F", f, "devmesh.box", "echo via-config"])
        .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
        .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("via-config"),
        "{out:?}"
    );

    // A workspace that is gone leaves the block; a new one joins it.
    let (status, _) = owner
        .post("/workspaces", json!({"name": "two", "template": "byo-box"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = owner
        .post(
            &format!("/workspaces/{id}/builds"),
            json!({"transition": "delete"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let out = me.run(&["config-ssh", "--file", f, "--yes"]).await;
    assert!(out.status.success(), "{out:?}");
    let now = std::fs::read_to_string(&file).unwrap();
    assert!(now.starts_with(mine), "{now}");
    assert!(
        now.contains("Host devmesh.two") && !now.contains("Host devmesh.box"),
        "{now}"
    );
    assert_eq!(now.matches("START-DEVMESH").count(), 1, "{now}");
}

#[tokio::test]
async fn deleting_the_key_signing_out_or_stopping_the_workspace_ends_ssh_sessions_within_a_second()
{
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (id, _agent_id, _agent) =
        running_workspace(&server, &owner, dir.path(), "long", json!({"name": "main"})).await;

    // A session opened with an API key, running a long command.
    let (status, key) = owner
        .post("/users/me/keys", json!({"name": "laptop"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let cli = dir.path().join("cli");
    let session = |token: String| {
        let cli = cli.clone();
        let url = server.url.clone();
        async move {
            crate::support::started_session(
                &["ssh", "long", "--", "echo started; sleep 60"],
                &cli,
                &url,
                &token,
            )
            .await
        }
    };
    // Each way of cutting the holder off ends a running session within a
    // second or so (3 s allowed on this shared machine).
    let ends = |started: crate::support::StartedSession, at: tokio::time::Instant| async move {
        let (ended, _) = started.ended(std::time::Duration::from_secs(10)).await;
        assert!(!ended.success());
        assert!(
            at.elapsed() < std::time::Duration::from_secs(3),
            "{:?}",
            at.elapsed()
        );
    };

    // Deleting the key.
    let with_key = session(key["key"].as_str().unwrap().to_owned()).await;
    let key_id = key["id"].as_str().unwrap();
    let at = tokio::time::Instant::now();
    assert_eq!(
        owner.delete(&format!("/users/me/keys/{key_id}")).await.0,
        StatusCode::NO_CONTENT
    );
    ends(with_key, at).await;

    // Signing out.
    let signed_in = devmesh_tests::Api::new(&server.url, None)
        .login("owner", "owner-password")
        .await;
    let with_session = session(signed_in.token.clone().unwrap()).await;
    let at = tokio::time::Instant::now();
    let (status, _) = signed_in.post("/users/logout", json!({})).await;
    assert!(status.is_success(), "{status}");
    ends(with_session, at).await;

    // Stopping the workspace (the agent of a bring-your-own workspace may
    // well run on).
    let with_key = session(owner.token.clone().unwrap()).await;
    let at = tokio::time::Instant::now();
    let (status, body) = owner
        .post(
            &format!("/workspaces/{id}/builds"),
            json!({"transition": "stop"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    ends(with_key, at).await;
}

/// A program at a terminal this test holds: what it showed, and its keys.
struct AtTerminal {
    pty: pty_process::Pty,
    seen: String,
}

impl AtTerminal {
    async fn type_(&mut self, keys: &[u8]) {
        tokio::io::AsyncWriteExt::write_all(&mut self.pty, keys)
            .await
            .unwrap();
    }

    /// Whether the terminal shows `needle` (from now on) within `wait`.
    async fn shows_within(&mut self, needle: &str, wait: std::time::Duration) -> bool {
        let from = self.seen.len();
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while !self.seen[from..].contains(needle) {
            match tokio::time::timeout_at(
                deadline,
                tokio::io::AsyncReadExt::read(&mut self.pty, &mut buf),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => return false,
            }
        }
        true
    }

    /// Reads until the terminal has shown `needle`, from now on.
    async fn shows(&mut self, needle: &str) {
        let from = self.seen.len();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while !self.seen[from..].contains(needle) {
            let n = tokio::time::timeout_at(
                deadline,
                tokio::io::AsyncReadExt::read(&mut self.pty, &mut buf),
            )
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", &self.seen[from..]))
            .unwrap_or(0);
            assert!(
                n > 0,
                "the terminal closed without {needle:?}: {}",
                self.seen
            );
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

#[tokio::test]
async fn plain_ssh_at_a_terminal_follows_resizes_passes_ctrl_c_and_returns_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (_id, _agent_id, _agent) =
        running_workspace(&server, &owner, dir.path(), "tty2", json!({"name": "main"})).await;
    let cfg = ssh_config(dir.path(), "tty2");

    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(24, 80)).unwrap();
    let mut ssh = pty_process::Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .arg("devmesh.tty2")
        .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
        .env("DEVMESH_URL", &server.url)
        .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
        .env("TERM", "xterm")
        .kill_on_drop(true)
        .spawn(pts)
        .unwrap();
    let mut term = AtTerminal {
        pty,
        seen: String::new(),
    };
    // The quotes keep the typed line (echoed back) from matching.
    term.type_(b"echo \"size\"=$(stty size)\n").await;
    term.shows("size=24 80").await;

    // The window grows (the kernel tells ssh, the terminal's foreground,
    // with SIGWINCH): the shell in the workspace sees it.
    term.pty.resize(pty_process::Size::new(40, 120)).unwrap();
    // The resize travels as its own message; ask until it has arrived.
    let mut resized = false;
    for _ in 0..20 {
        term.type_(b"echo \"size\"=$(stty size)\n").await;
        if term
            .shows_within("size=", std::time::Duration::from_secs(2))
            .await
            && term.seen.contains("size=40 120")
        {
            resized = true;
            break;
        }
    }
    assert!(resized, "{}", term.seen);

    // Ctrl-C interrupts the command running in the workspace, not ssh.
    // A subshell: whether Ctrl-C finds it still a shell or already
    // `sleep`, it dies of SIGINT (130).
    term.type_(b"(echo \"st\"arted; exec sleep 30)\n").await;
    term.shows("started").await;
    term.type_(b"\x03").await;
    term.type_(b"echo \"rc\"=$?\n").await;
    term.shows("rc=130").await;

    // The session's exit status is the shell's.
    term.type_(b"exit 3\n").await;
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), ssh.wait())
        .await
        .expect("ssh exits")
        .unwrap();
    assert_eq!(status.code(), Some(3), "{}", term.seen);
}

#[tokio::test]
async fn ssh_a_forwards_the_users_agent_into_the_workspace_for_the_session_only() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (_id, _agent_id, _agent) =
        running_workspace(&server, &owner, dir.path(), "fwd", json!({"name": "main"})).await;
    let cfg = ssh_config(dir.path(), "fwd");

    // The user's own ssh-agent, holding one key.
    let sock = dir.path().join("agent.sock");
    let mut agent = tokio::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let key = dir.path().join("id_ed25519");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "laptop-key", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    eventually(10, "ssh-agent to listen", || async {
        sock.exists().then_some(())
    })
    .await;
    let out = std::process::Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let ssh = |forward: bool| {
        let mut c = tokio::process::Command::new("ssh");
        c.arg("-F").arg(&cfg);
        if forward {
            c.arg("-A");
        }
        c.arg("devmesh.fwd")
            .arg("echo \"sock=$SSH_AUTH_SOCK\"; ssh-add -l")
            .env("SSH_AUTH_SOCK", &sock)
            .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
            .env("DEVMESH_URL", &server.url)
            .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
            .stdin(std::process::Stdio::null());
        c
    };
    // With -A, the workspace's ssh-add sees the laptop's key.
    let out = ssh(true).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("laptop-key"), "{out:?}");
    let inside = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sock="))
        .unwrap()
        .to_owned();
    assert!(
        inside.ends_with("agent.sock") && inside.contains("devmesh-ssh-"),
        "{inside}"
    );
    // The socket goes with the session.
    eventually(10, "the forwarded socket to go", || async {
        (!std::path::Path::new(&inside).exists()).then_some(())
    })
    .await;
    // Without -A, no agent is offered.
    let out = ssh(false).output().await.unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("laptop-key"),
        "{out:?}"
    );
    agent.kill().await.unwrap();
}
