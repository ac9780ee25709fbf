//! A Terraform workspace through its life with the CLI: the resources its
//! template declares (persistent or ephemeral, the agents they run, their
//! metadata) in `devmesh show`, `restart` keeping the workspace's version,
//! `update` moving to the template's active one and changing mutable
//! parameters, immutable ones refused.

use std::path::Path;

use crate::provisioning::primary_with;
use crate::support::{CliAs, cli, ok, stderr};

/// A small template: a persistent `home` sized by the immutable `size`,
/// with metadata; an ephemeral `session` that runs agent `main` and prints
/// the mutable `greeting`; `extra` adds a persistent resource.
fn write_template(dir: &Path, extra: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tf = String::from(
        r#"terraform {
  required_providers {
    devmesh = { source = "devmesh/devmesh" }
  }
}
data "devmesh_workspace" "me" {}
data "devmesh_parameter" "size" {
  name    = "size"
  type    = "number"
  default = "1"
}
data "devmesh_parameter" "greeting" {
  name    = "greeting"
  default = "hello"
  mutable = true
}
resource "devmesh_agent" "main" {
  os                = "linux"
  arch              = "amd64"
  metadata          = { load = "cat /proc/loadavg" }
  metadata_interval = 5
}
resource "terraform_data" "home" {
  input = data.devmesh_parameter.size.value
}
resource "devmesh_metadata" "home" {
  resource_id = terraform_data.home.id
  items       = { size = "${data.devmesh_parameter.size.value} GiB" }
}
resource "terraform_data" "session" {
  count            = data.devmesh_workspace.me.start_count
  triggers_replace = [devmesh_agent.main.token, data.devmesh_parameter.greeting.value]
  provisioner "local-exec" {
    command = "echo greeting=${data.devmesh_parameter.greeting.value}"
  }
}
"#,
    );
    if extra {
        tf.push_str("resource \"terraform_data\" \"extra\" {}\n");
    }
    std::fs::write(dir.join("main.tf"), tf).unwrap();
}

#[tokio::test]
async fn show_restart_and_update_a_terraform_workspace_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let cfg = dir.path().join("cli");
    let token = owner.token.clone().unwrap();
    let me = CliAs {
        config: cfg.clone(),
        url: server.url.clone(),
        token: token.clone(),
    };
    let tpl = dir.path().join("tiny");
    write_template(&tpl, false);
    let out = ok(&me
        .run(&["templates", "push", "tiny", "-d", tpl.to_str().unwrap()])
        .await);
    assert!(
        out.contains("terraform_data.home (persistent)")
            && out.contains("terraform_data.session (ephemeral)"),
        "the import planned a start and a stop: {out}"
    );
    ok(&me
        .run(&["create", "box", "--template", "tiny", "-p", "size=2"])
        .await);

    // `show`: resources with their lifetime, agents and metadata.
    let shown = ok(&me.run(&["show", "box"]).await);
    let line = |needle: &str| {
        shown
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{shown}"))
            .to_owned()
    };
    assert!(
        line("terraform_data.home ").contains("persistent"),
        "{shown}"
    );
    assert!(
        line("terraform_data.home ").contains("size=2 GiB"),
        "{shown}"
    );
    let session = line("terraform_data.session[0]");
    assert!(
        session.contains("ephemeral") && session.contains("main"),
        "{shown}"
    );
    assert!(shown.contains("Build #1: start succeeded"), "{shown}");
    assert!(line("main ").contains("connecting"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("main") && l.contains("load")),
        "the agent's metadata item: {shown}"
    );

    // A new active version does not change the workspace until it is
    // updated: `restart` keeps its version.
    write_template(&tpl, true);
    ok(&me
        .run(&["templates", "push", "tiny", "-d", tpl.to_str().unwrap()])
        .await);
    let out = ok(&me.run(&["restart", "box"]).await);
    assert!(
        out.contains("Stopped box.") && out.contains("Started box."),
        "{out}"
    );
    let (_, w) = owner.get("/workspaces?owner=all").await;
    let w = &w["workspaces"][0];
    assert_eq!(w["latest_build"]["build_number"], 3);
    assert!(!w.to_string().contains("terraform_data.extra"), "{w}");
    // Starting a started workspace says what to do instead.
    let out = me.run(&["start", "box"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("devmesh update"), "{}", stderr(&out));

    // Immutable parameters stay; mutable ones change with `update`, which
    // also moves to the active version while the workspace runs.
    let out = me.run(&["update", "box", "-p", "size=3"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not mutable"), "{}", stderr(&out));
    let out = ok(&me.run(&["update", "box", "-p", "greeting=hi"]).await);
    assert!(out.contains("greeting=hi"), "the build's log, live: {out}");
    assert!(out.contains("Updated box."), "{out}");
    let shown = ok(&me.run(&["show", "box"]).await);
    assert!(shown.contains("terraform_data.extra"), "{shown}");
    assert!(shown.contains("size=2 GiB"), "{shown}");

    // Stopped: only the persistent resources remain.
    ok(&me.run(&["stop", "box"]).await);
    let shown = ok(&me.run(&["show", "box"]).await);
    assert!(shown.contains("terraform_data.home"), "{shown}");
    assert!(!shown.contains("terraform_data.session"), "{shown}");
    ok(&me.run(&["delete", "box"]).await);
}

#[tokio::test]
async fn templates_are_initialised_from_starters_pulled_promoted_and_archived() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/templates");
    // The starters are valid, formatted Terraform (`terraform fmt` needs no
    // provider; docker and kubernetes cannot be applied on this machine).
    let fmt = std::process::Command::new("terraform")
        .args(["fmt", "-check", "-recursive"])
        .arg(&examples)
        .output()
        .unwrap();
    assert!(
        fmt.status.success(),
        "{}",
        String::from_utf8_lossy(&fmt.stdout)
    );

    // `init` needs no deployment: the starters are in the binary.
    let cfg = dir.path().join("cli");
    let first = dir.path().join("lp");
    ok(&cli(&cfg, &["templates", "init", first.to_str().unwrap()]).await);
    let original = std::fs::read_to_string(first.join("main.tf")).unwrap();
    assert_eq!(
        original,
        std::fs::read_to_string(examples.join("local-process/main.tf")).unwrap()
    );
    let again = cli(&cfg, &["templates", "init", first.to_str().unwrap()]).await;
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not empty"), "{}", stderr(&again));
    let docker = dir.path().join("docker");
    let out = ok(&cli(
        &cfg,
        &[
            "templates",
            "init",
            "--starter",
            "docker",
            docker.to_str().unwrap(),
        ],
    )
    .await);
    assert!(out.contains("devmesh templates push docker"), "{out}");
    assert!(
        std::fs::read_to_string(docker.join("main.tf"))
            .unwrap()
            .contains("docker_volume")
    );

    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let me = CliAs {
        config: cfg.clone(),
        url: server.url.clone(),
        token: owner.token.clone().unwrap(),
    };
    ok(&me
        .run(&["templates", "push", "lp", "-d", first.to_str().unwrap()])
        .await);
    let changed = format!("{original}\n# version two\n");
    std::fs::write(first.join("main.tf"), &changed).unwrap();
    ok(&me
        .run(&["templates", "push", "lp", "-d", first.to_str().unwrap()])
        .await);

    // `pull` gives back exactly what was pushed, by version.
    let p1 = dir.path().join("p1");
    ok(&me
        .run(&[
            "templates",
            "pull",
            "lp",
            "--version",
            "1",
            "-d",
            p1.to_str().unwrap(),
        ])
        .await);
    assert_eq!(
        std::fs::read_to_string(p1.join("main.tf")).unwrap(),
        original
    );
    let p2 = dir.path().join("p2");
    ok(&me
        .run(&["templates", "pull", "lp", "-d", p2.to_str().unwrap()])
        .await);
    assert_eq!(
        std::fs::read_to_string(p2.join("main.tf")).unwrap(),
        changed
    );
    // Members choose templates; they do not read their code.
    let (status, _) = owner
        .post(
            "/users",
            serde_json::json!({"email": "m@example.com", "username": "member", "password": "member-password"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED);
    let member = devmesh_tests::Api::new(&server.url, None)
        .login("member", "member-password")
        .await;
    assert_eq!(
        member.get("/templates/lp/versions/1/files").await.0,
        reqwest::StatusCode::FORBIDDEN
    );

    // Promote back to 1; the active version cannot be archived; an
    // archived one cannot be promoted until unarchived.
    let out = ok(&me
        .run(&["templates", "versions", "promote", "lp", "1"])
        .await);
    assert!(out.contains("Version 1 of lp is active"), "{out}");
    let out = me
        .run(&["templates", "versions", "archive", "lp", "1"])
        .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("active version"), "{}", stderr(&out));
    ok(&me
        .run(&["templates", "versions", "archive", "lp", "2"])
        .await);
    let list = ok(&me.run(&["templates", "versions", "list", "lp"]).await);
    let row = |n: &str| {
        list.lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("no version {n} in\n{list}"))
            .to_owned()
    };
    assert!(row("1 ").contains("active"), "{list}");
    assert!(row("2 ").contains("archived"), "{list}");
    let out = me
        .run(&["templates", "versions", "promote", "lp", "2"])
        .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("archived"), "{}", stderr(&out));
    ok(&me
        .run(&["templates", "versions", "unarchive", "lp", "2"])
        .await);
    ok(&me
        .run(&["templates", "versions", "promote", "lp", "2"])
        .await);
}

#[tokio::test]
async fn create_asks_at_a_terminal_for_required_parameters_until_they_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let token = owner.token.clone().unwrap();
    let tpl = dir.path().join("req");
    std::fs::create_dir_all(&tpl).unwrap();
    std::fs::write(
        tpl.join("main.tf"),
        r#"terraform {
  required_providers {
    devmesh = { source = "devmesh/devmesh" }
  }
}
data "devmesh_parameter" "replicas" {
  name           = "replicas"
  type           = "number"
  description    = "How many."
  validation_min = 1
  validation_max = 9
}
resource "terraform_data" "echo" {
  provisioner "local-exec" {
    command = "echo replicas=${data.devmesh_parameter.replicas.value}"
  }
}
"#,
    )
    .unwrap();
    let cfg = dir.path().join("cli");
    let base = ["--url", server.url.as_str(), "--token", token.as_str()];
    let mut push = base.to_vec();
    push.extend(["templates", "push", "req", "-d", tpl.to_str().unwrap()]);
    ok(&cli(&cfg, &push).await);

    // Not at a terminal: nothing is asked, and the server names what is
    // missing before anything is queued.
    let mut create = base.to_vec();
    create.extend(["create", "quiet", "--template", "req"]);
    let out = cli(&cfg, &create).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("replicas"), "{}", stderr(&out));

    // At a terminal (`script` gives the CLI one): asked, a bad answer
    // refused with the reason, a good one used.
    let command = format!(
        "'{}' --url '{}' --token '{}' create asked --template req",
        crate::support::BIN,
        server.url,
        token
    );
    let cfg_dir = cfg.to_str().unwrap().to_owned();
    let (out, status) = crate::support::at_terminal(
        &command,
        &[("DEVMESH_CONFIG_DIR", cfg_dir.as_str())],
        b"12\n3\n",
    )
    .await;
    assert!(out.contains("replicas: How many."), "{out}");
    assert!(out.contains("must be at most 9"), "{out}");
    assert!(
        out.contains("replicas=3"),
        "the build used the answer: {out}"
    );
    assert!(out.contains("Created workspace asked."), "{out}");
    assert!(status.success());
}

#[tokio::test]
async fn an_agent_measures_its_metadata_and_reports_only_what_its_template_declares() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &[]).await;
    let (status, body) = owner
        .post(
            "/templates",
            serde_json::json!({"name": "byo", "definition": {"agents": [{
                "name": "main",
                "env": {"SIX": "6"},
                "metadata": [
                    {"key": "answer", "script": "echo answer=$((SIX * 7))", "interval_seconds": 1, "timeout_seconds": 1},
                    {"key": "broken", "script": "echo nope >&2; exit 2", "interval_seconds": 1, "timeout_seconds": 1}
                ]
            }]}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    // Bad declarations are refused, naming the field.
    let (status, body) = owner
        .post(
            "/templates",
            serde_json::json!({"name": "bad", "definition": {"agents": [{
                "name": "main",
                "metadata": [{"key": "x", "script": "true", "interval_seconds": 5, "timeout_seconds": 9}]
            }]}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("timeout_seconds"), "{body}");

    let (_, created) = owner
        .post(
            "/workspaces",
            serde_json::json!({"name": "m", "template": "byo"}),
        )
        .await;
    let id = created["workspace"]["id"].as_str().unwrap().to_owned();
    let token = created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let _agent = crate::support::AgentProcess::start(&server.url, &token, dir.path());
    let agent = crate::support::eventually(60, "the metadata to be reported", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        let agent = w["agents"][0].clone();
        (agent["metadata"][0]["value"] == "answer=42"
            && agent["metadata"][1]["error"].as_str().is_some())
        .then_some(agent)
    })
    .await;
    assert!(
        agent["metadata"][1]["error"]
            .as_str()
            .unwrap()
            .contains("nope"),
        "{agent}"
    );
    assert!(agent["metadata"][0]["collected_at"].is_string(), "{agent}");
    // An agent (or whoever holds its token) cannot add keys its template
    // does not declare.
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v2/workspaceagents/me/metadata", server.url))
        .header("Devmesh-Agent-Token", &token)
        .json(&serde_json::json!({"metadata": [{"key": "injected", "value": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
    assert!(!w.to_string().contains("injected"), "{w}");
}
