//! `devmesh ssh`: the real OpenSSH client, through the primary's HTTPS
//! endpoint, into the agent's SSH server over its tunnel.

use reqwest::StatusCode;
use serde_json::json;

use crate::provisioning::primary_with;
use crate::support::{AgentProcess, CliAs, eventually};

#[tokio::test]
async fn ssh_runs_a_command_in_the_workspace_with_its_output_input_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (status, body) = owner
        .post(
            "/templates",
            json!({"name": "byo", "definition": {"agents": [{
                "name": "main",
                "directory": home.to_str().unwrap(),
                "env": {"GREETING": "hello"}
            }]}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, created) = owner
        .post("/workspaces", json!({"name": "box", "template": "byo"}))
        .await;
    let id = created["workspace"]["id"].as_str().unwrap().to_owned();
    let token = created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_id = created["agent_tokens"][0]["agent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _agent = AgentProcess::start(&server.url, &token, dir.path());
    eventually(60, "the agent to connect", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["agents"][0]["status"] == "connected").then_some(())
    })
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
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v2/workspaceagents/{agent_id}/ssh",
            server.url
        ))
        .header(
            "Cookie",
            // The session cookie (`devmesh_session_token` over plain HTTP).
            format!("devmesh_session_token={}", owner.token.clone().unwrap()),
        )
        .header("Origin", &server.url)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let why = resp.text().await.unwrap();
    assert!(why.contains("Devmesh-Session-Token header"), "{why}");
}

#[tokio::test]
async fn an_interactive_ssh_session_gets_a_terminal_of_the_clients_size() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (status, body) = owner
        .post(
            "/templates",
            json!({"name": "byo", "definition": {"agents": [{"name": "main"}]}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, created) = owner
        .post("/workspaces", json!({"name": "tty", "template": "byo"}))
        .await;
    let id = created["workspace"]["id"].as_str().unwrap().to_owned();
    let token = created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let _agent = AgentProcess::start(&server.url, &token, dir.path());
    eventually(60, "the agent to connect", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["agents"][0]["status"] == "connected").then_some(())
    })
    .await;

    // `script` gives the CLI (and so OpenSSH) a terminal, of 100×30.
    let command = format!("stty cols 100 rows 30; '{}' ssh tty", crate::support::BIN);
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("DEVMESH_CONFIG_DIR", dir.path().join("cli"))
        .env("DEVMESH_URL", &server.url)
        .env("DEVMESH_SESSION_TOKEN", owner.token.clone().unwrap())
        .env("TERM", "xterm-256color")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"echo \"tty=$(tty) size=$(stty size) term=$TERM\"; exit 7\n")
            .await
            .unwrap();
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            let mut text = String::new();
            let mut stdout = child.stdout.take().unwrap();
            tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text)
                .await
                .unwrap();
            text
        })
        .await
        .expect("the session ended");
        drop(stdin);
        assert!(out.contains("tty=/dev/pts/"), "a terminal: {out}");
        assert!(out.contains("size=30 100"), "the client's size: {out}");
        assert!(
            out.contains("term=xterm-256color"),
            "the client's TERM: {out}"
        );
    }
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(7), "the shell's exit status");
}
