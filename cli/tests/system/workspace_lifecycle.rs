//! A Terraform workspace through its life with the CLI: the resources its
//! template declares (persistent or ephemeral, the agents they run, their
//! metadata) in `devmesh show`, `restart` keeping the workspace's version,
//! `update` moving to the template's active one and changing mutable
//! parameters, immutable ones refused.

use std::path::Path;

use crate::provisioning::primary_with;
use crate::support::{cli, ok, stderr};

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
  os   = "linux"
  arch = "amd64"
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
    let run = |args: &[&str]| {
        let mut all = vec!["--url", server.url.as_str(), "--token", token.as_str()];
        all.extend_from_slice(args);
        let cfg = cfg.clone();
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            cli(&cfg, &args).await
        }
    };
    let tpl = dir.path().join("tiny");
    write_template(&tpl, false);
    let out = ok(&run(&["templates", "push", "tiny", "-d", tpl.to_str().unwrap()]).await);
    assert!(
        out.contains("terraform_data.home (persistent)")
            && out.contains("terraform_data.session (ephemeral)"),
        "the import planned a start and a stop: {out}"
    );
    ok(&run(&["create", "box", "--template", "tiny", "-p", "size=2"]).await);

    // `show`: resources with their lifetime, agents and metadata.
    let shown = ok(&run(&["show", "box"]).await);
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

    // A new active version does not change the workspace until it is
    // updated: `restart` keeps its version.
    write_template(&tpl, true);
    ok(&run(&["templates", "push", "tiny", "-d", tpl.to_str().unwrap()]).await);
    let out = ok(&run(&["restart", "box"]).await);
    assert!(
        out.contains("Stopped box.") && out.contains("Started box."),
        "{out}"
    );
    let (_, w) = owner.get("/workspaces?owner=all").await;
    let w = &w["workspaces"][0];
    assert_eq!(w["latest_build"]["build_number"], 3);
    assert!(!w.to_string().contains("terraform_data.extra"), "{w}");
    // Starting a started workspace says what to do instead.
    let out = run(&["start", "box"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("devmesh update"), "{}", stderr(&out));

    // Immutable parameters stay; mutable ones change with `update`, which
    // also moves to the active version while the workspace runs.
    let out = run(&["update", "box", "-p", "size=3"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not mutable"), "{}", stderr(&out));
    let out = ok(&run(&["update", "box", "-p", "greeting=hi"]).await);
    assert!(out.contains("greeting=hi"), "the build's log, live: {out}");
    assert!(out.contains("Updated box."), "{out}");
    let shown = ok(&run(&["show", "box"]).await);
    assert!(shown.contains("terraform_data.extra"), "{shown}");
    assert!(shown.contains("size=2 GiB"), "{shown}");

    // Stopped: only the persistent resources remain.
    ok(&run(&["stop", "box"]).await);
    let shown = ok(&run(&["show", "box"]).await);
    assert!(shown.contains("terraform_data.home"), "{shown}");
    assert!(!shown.contains("terraform_data.session"), "{shown}");
    ok(&run(&["delete", "box"]).await);
}
