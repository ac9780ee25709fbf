//! Terraform templates end to end, with the real binary, real Terraform and
//! the `local-process` starter template: push, create, the agent starts by
//! itself and an app answers through the primary; stop (agent gone, home
//! kept), start (same home), delete (all gone); failed builds keep their
//! logs.

use std::path::Path;

use base64::Engine as _;
use devmesh_tests::upstream::Upstream;
use devmesh_tests::{Api, fresh_database};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ServerProcess, app_client, eventually};

/// The local-process starter template, as a base64 archive.
pub(crate) fn local_process() -> String {
    archive_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/templates/local-process"))
}

/// A template whose start build runs `command` (stop and delete builds do
/// nothing), as a base64 archive.
pub(crate) fn step_template(command: &str) -> String {
    let tpl = tempfile::tempdir().unwrap();
    std::fs::write(
        tpl.path().join("main.tf"),
        format!(
            "data \"devmesh_workspace\" \"me\" {{}}\n\
             terraform {{\n  required_providers {{\n    devmesh = {{ source = \"devmesh/devmesh\" }}\n  }}\n}}\n\
             resource \"terraform_data\" \"step\" {{\n  count = data.devmesh_workspace.me.transition == \"start\" ? 1 : 0\n  \
             provisioner \"local-exec\" {{\n    command = \"{command}\"\n  }}\n}}\n"
        ),
    )
    .unwrap();
    archive_of(tpl.path())
}

/// A template whose start build runs a `secs`-second step after printing
/// `slow start`, as a base64 archive.
pub(crate) fn slow_template(secs: u32) -> String {
    step_template(&format!("echo slow start; sleep {secs}"))
}

/// Creates workspace `name` from `template` (checking the request was
/// taken); returns its id and its first build's job.
pub(crate) async fn create_workspace(api: &Api, name: &str, template: &str) -> (String, String) {
    let (status, body) = api
        .post("/workspaces", json!({"name": name, "template": template}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["workspace"]["id"].as_str().unwrap().to_owned();
    let job = body["workspace"]["latest_build"]["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, job)
}

/// Waits until `url` (an app, signed in with `token`) answers 200; returns
/// the answer's JSON.
pub(crate) async fn app_answers(what: &str, url: &str, token: &str) -> Value {
    let client = app_client(false);
    let r = eventually(60, what, || async {
        let r = client
            .get(url)
            .header("Devmesh-Session-Token", token)
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    r.json().await.unwrap()
}

/// Pushes [`slow_template`] as `slow` and creates workspace `name` from it;
/// returns the workspace's id and its build's job once the slow step runs.
async fn slow_build(owner: &Api, name: &str, secs: u32) -> (String, String) {
    push(owner, "slow", slow_template(secs)).await;
    let (id, job) = create_workspace(owner, name, "slow").await;
    eventually(60, "the slow step to start", || async {
        let (_, logs) = owner.get(&format!("/jobs/{job}/logs")).await;
        logs.to_string().contains("slow start").then_some(())
    })
    .await;
    (id, job)
}

pub(crate) fn archive_of(dir: &Path) -> String {
    let tar = devmesh_provisioner::archive::pack(dir).unwrap();
    base64::engine::general_purpose::STANDARD.encode(tar)
}

async fn primary(dir: &Path) -> (ServerProcess, Api) {
    let (server, owner, _db) = primary_on_db(dir).await;
    (server, owner)
}

pub(crate) async fn primary_on_db(dir: &Path) -> (ServerProcess, Api, devmesh_tests::TestDb) {
    primary_with(dir, &[]).await
}

/// A primary on a fresh database with `args` on top, and its first owner.
pub(crate) async fn primary_with(
    dir: &Path,
    args: &[&str],
) -> (ServerProcess, Api, devmesh_tests::TestDb) {
    let db = fresh_database().await;
    let url = db.url();
    let mut all = vec!["--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let server = ServerProcess::start(&all, &[("DEVMESH_POSTGRES_URL", url.expose())], dir).await;
    let anon = Api::new(&server.url, None);
    anon.post(
        "/users/first",
        json!({"email": "owner@example.com", "username": "owner", "password": "owner-password"}),
    )
    .await;
    let owner = anon.login("owner", "owner-password").await;
    (server, owner, db)
}

/// Pushes a Terraform template through the API and waits for its import.
pub(crate) async fn push(api: &Api, name: &str, archive: String) -> Value {
    let (status, body) = api
        .post(
            "/templates",
            json!({"name": name, "kind": "terraform", "archive": archive}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    eventually(120, "the template's import", || async {
        let (_, t) = api.get(&format!("/templates/{name}")).await;
        let import = &t["active_version"]["import"];
        match import["status"].as_str() {
            Some("succeeded") => Some(t),
            Some("failed") => panic!("the import failed: {import}"),
            _ => None,
        }
    })
    .await
}

/// Waits for the workspace's latest build to end; returns the workspace,
/// failing with the build's log when it did not succeed.
pub(crate) async fn built(api: &Api, ws: &str) -> Value {
    let w = eventually(180, "the build to end", || async {
        let (_, w) = api.get(&format!("/workspaces/{ws}")).await;
        let status = w["latest_build"]["status"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        (!matches!(status.as_str(), "pending" | "running")).then_some(w)
    })
    .await;
    if w["latest_build"]["status"] != "succeeded" {
        let job = w["latest_build"]["job_id"].as_str().unwrap();
        let (_, logs) = api.get(&format!("/jobs/{job}/logs")).await;
        panic!("build failed: {}\n{logs:#}", w["latest_build"]);
    }
    w
}

pub(crate) async fn build(api: &Api, id: &str, transition: &str) {
    let (status, body) = api
        .post(
            &format!("/workspaces/{id}/builds"),
            json!({"transition": transition}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// The pid the local-process template recorded for the workspace's agent.
fn agent_pid(home: &Path) -> i32 {
    std::fs::read_to_string(home.join(".devmesh-agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn a_terraform_workspace_starts_its_agent_and_keeps_its_home_across_stop_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, db) = primary_on_db(dir.path()).await;
    let upstream = Upstream::start().await;
    let template = push(&owner, "local", local_process()).await;
    assert_eq!(template["active_version"]["kind"], "terraform");
    // The import recorded the template's parameters.
    let params = &template["active_version"]["parameters"];
    assert_eq!(params[0]["name"], "home_root", "{params}");
    assert_eq!(params[0]["default"], "/tmp/devmesh-workspaces");
    assert_eq!(params[1]["name"], "web_port", "{params}");
    assert_eq!(params[1]["type"], "number");

    // Parameters are checked before anything is queued.
    let (status, body) = owner
        .post(
            "/workspaces",
            json!({"name": "typo", "template": "local", "parameters": {"home_rot": "/x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("home_rot"), "{body}");

    let name = format!("tf{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let root = dir.path().join("homes");
    let (status, body) = owner
        .post(
            "/workspaces",
            json!({"name": name, "template": "local",
                   "parameters": {"home_root": root.to_str().unwrap(),
                                  "web_port": upstream.port().to_string()}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        body["agent_tokens"].as_array().unwrap().is_empty(),
        "no tokens to paste by hand"
    );
    let id = body["workspace"]["id"].as_str().unwrap().to_owned();
    assert!(matches!(
        body["workspace"]["latest_build"]["status"].as_str(),
        Some("pending" | "running")
    ));
    let w = built(&owner, &id).await;
    let job = w["latest_build"]["job_id"].as_str().unwrap().to_owned();

    // The agent starts by itself and connects; its app answers.
    eventually(60, "the agent to connect", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["agents"][0]["status"] == "connected").then_some(())
    })
    .await;
    // The build ran with the parameter's value.
    let home = root.join("owner").join(&name);
    let pid = agent_pid(&home);
    assert!(alive(pid));
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("http://web--main--{name}--owner.apps.localhost:{port}/echo");
    let token = owner.token.clone().unwrap();
    let app = app_answers("the app through the primary", &url, &token).await;
    assert_eq!(app["path"], "/echo");
    // And through a regional edge, which reaches the agent over the mesh.
    let (edge, _) = crate::support::create_edge(&owner, &server.url, "eu", &[], dir.path()).await;
    let edge_url = format!(
        "http://web--main--{name}--owner.eu.apps.localhost:{}/echo",
        edge.port()
    );
    let via_edge = app_answers("the app through the edge", &edge_url, &token).await;
    assert_eq!(via_edge["path"], "/echo");
    // The startup script ran in the home directory.
    eventually(30, "the startup script", || async {
        home.join("starts.log").exists().then_some(())
    })
    .await;

    // The saved state holds the agent's token: it is encrypted at rest.
    let mut conn = db.connect().await;
    let stored: Vec<u8> = sqlx::query_scalar(
        "SELECT state FROM workspace_terraform_states WHERE workspace_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(serde_json::from_slice::<Value>(&stored).is_err());
    assert!(!String::from_utf8_lossy(&stored).contains("devmesh_agent"));

    // The build's log is there for the owner to read.
    let (status, logs) = owner.get(&format!("/jobs/{job}/logs")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(logs["status"], "succeeded");
    let text: Vec<&str> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert!(
        text.iter().any(|l| l.contains("Apply complete!")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|l| l.contains("devmesh: terraform init")),
        "{text:#?}"
    );

    // Stop: the agent goes, the home stays.
    build(&owner, &id, "stop").await;
    built(&owner, &id).await;
    eventually(15, "the agent process to exit", || async {
        (!alive(pid)).then_some(())
    })
    .await;
    assert!(home.join("starts.log").exists(), "the home survives a stop");

    // Start: a new agent, the same home.
    build(&owner, &id, "start").await;
    built(&owner, &id).await;
    eventually(60, "the agent to connect again", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["agents"][0]["status"] == "connected").then_some(())
    })
    .await;
    eventually(30, "a second start in the same home", || async {
        let log = std::fs::read_to_string(home.join("starts.log")).ok()?;
        (log.lines().count() == 2).then_some(())
    })
    .await;
    let pid2 = agent_pid(&home);

    // Delete: everything goes.
    build(&owner, &id, "delete").await;
    eventually(180, "the workspace to be deleted", || async {
        let (status, _) = owner.get(&format!("/workspaces/{id}")).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    eventually(15, "the agent process to exit", || async {
        (!alive(pid2)).then_some(())
    })
    .await;
    assert!(!home.exists(), "the home is removed with the workspace");
    server.stop().await;
}

#[tokio::test]
async fn a_failing_build_fails_with_its_log_and_bad_archives_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner) = primary(dir.path()).await;

    // Refused before anything is stored or queued.
    for (archive, needle) in [
        ("not base64!".to_owned(), "base64"),
        (
            base64::engine::general_purpose::STANDARD.encode(b"not a tar archive at all"),
            "archive",
        ),
    ] {
        let (status, body) = owner
            .post(
                "/templates",
                json!({"name": "bad", "kind": "terraform", "archive": archive}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.to_string().contains(needle), "{body}");
    }

    let tpl = tempfile::tempdir().unwrap();
    std::fs::write(
        tpl.path().join("main.tf"),
        "resource \"terraform_data\" \"x\" {\n  provisioner \"local-exec\" {\n    command = \"echo going wrong; exit 7\"\n  }\n}\n",
    )
    .unwrap();
    push(&owner, "broken", archive_of(tpl.path())).await;
    let (_, body) = owner
        .post(
            "/workspaces",
            json!({"name": "broken", "template": "broken"}),
        )
        .await;
    let id = body["workspace"]["id"].as_str().unwrap().to_owned();
    let w = eventually(120, "the build to fail", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["latest_build"]["status"] == "failed").then_some(w)
    })
    .await;
    assert!(
        w["latest_build"]["error"]
            .as_str()
            .unwrap()
            .contains("terraform apply failed"),
        "{}",
        w["latest_build"]
    );
    let job = w["latest_build"]["job_id"].as_str().unwrap();
    let (_, logs) = owner.get(&format!("/jobs/{job}/logs")).await;
    let all = logs["logs"].to_string();
    assert!(all.contains("going wrong"), "{all}");
    assert!(all.contains("build failed"), "{all}");
    // Another build may follow a failed one.
    build(&owner, &id, "delete").await;
    eventually(120, "the delete to run", || async {
        let (status, _) = owner.get(&format!("/workspaces/{id}")).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // A stranger cannot read the logs.
    let (_, stranger) = owner
        .post(
            "/users",
            json!({"email": "s@example.com", "username": "stranger", "password": "stranger-password"}),
        )
        .await;
    assert!(stranger["id"].is_string(), "{stranger}");
    let s = Api::new(&server.url, None)
        .login("stranger", "stranger-password")
        .await;
    let (status, _) = s.get(&format!("/jobs/{job}/logs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn the_cli_pushes_a_template_and_follows_each_build_to_its_end() {
    use crate::support::{cli, ok};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path();
    let db = fresh_database().await;
    let url = db.url();
    let server = ServerProcess::start(
        &["--data-dir", cfg.to_str().unwrap()],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        cfg,
    )
    .await;
    ok(&cli(
        cfg,
        &[
            "login",
            &server.url,
            "--username",
            "me",
            "--email",
            "me@example.com",
            "--password",
            "me-password",
        ],
    )
    .await);
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/templates/local-process");
    let push = [
        "templates",
        "push",
        "local",
        "-d",
        template.to_str().unwrap(),
    ];
    let out = ok(&cli(cfg, &push).await);
    assert!(
        out.contains("devmesh: terraform plan"),
        "the import's log, live: {out}"
    );
    assert!(out.contains("Pushed template local (version 1"), "{out}");
    assert!(
        out.contains("parameter home_root (string, default \"/tmp/devmesh-workspaces\")"),
        "{out}"
    );
    let out = ok(&cli(cfg, &push).await);
    assert!(
        out.contains("(version 2"),
        "a second push is a new version: {out}"
    );

    let name = format!("cli{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let root = cfg.join("homes");
    let param = format!("home_root={}", root.display());
    let out = ok(&cli(cfg, &["create", &name, "--template", "local", "-p", &param]).await);
    assert!(
        out.contains("devmesh: terraform apply"),
        "the build's log, live: {out}"
    );
    assert!(out.contains("Apply complete!"), "{out}");
    assert!(out.contains(&format!("Created workspace {name}.")), "{out}");
    let port = server.url.rsplit(':').next().unwrap();
    assert!(
        out.contains(&format!(
            "App web: http://web--main--{name}--me.apps.localhost:{port}/"
        )),
        "{out}"
    );
    let home = root.join("me").join(&name);
    assert!(home.is_dir(), "the parameter's value was used");
    let out = ok(&cli(cfg, &["templates", "versions", "list", "local"]).await);
    assert!(
        out.contains("active") && out.contains("home_root,web_port"),
        "{out}"
    );

    let out = ok(&cli(cfg, &["stop", &name]).await);
    assert!(
        out.contains("Destroy") || out.contains("destroyed"),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with(&format!("Stopped {name}.")),
        "{out}"
    );
    let out = ok(&cli(cfg, &["delete", &name]).await);
    assert!(
        out.trim_end().ends_with(&format!("Deleted {name}.")),
        "{out}"
    );
    assert!(!home.exists());

    // Terraform code that does not plan fails its import, and the push says why.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("main.tf"), "resource \"nope\" {\n").unwrap();
    let out = cli(
        cfg,
        &[
            "templates",
            "push",
            "broken",
            "-d",
            broken.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the import failed"), "{err}");

    // A directory without Terraform code is refused before any upload.
    let empty = tempfile::tempdir().unwrap();
    let out = cli(
        cfg,
        &[
            "templates",
            "push",
            "nothing",
            "-d",
            empty.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no .tf file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}

#[tokio::test]
async fn canceling_a_running_build_interrupts_terraform_and_the_next_build_can_run() {
    use crate::support::{cli, ok};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path();
    let (server, owner) = primary(cfg).await;
    let (id, job) = slow_build(&owner, "slow", 120).await;
    // Another build must wait for this one.
    let (status, _) = owner
        .post(
            &format!("/workspaces/{id}/builds"),
            json!({"transition": "stop"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Cancel from the CLI, signed in with the owner's key.
    ok(&cli(
        cfg,
        &[
            "login",
            &server.url,
            "--token",
            owner.token.as_deref().unwrap(),
        ],
    )
    .await);
    let out = ok(&cli(cfg, &["cancel", "slow"]).await);
    assert!(out.contains("Canceling the build of slow"), "{out}");
    let at = tokio::time::Instant::now();
    eventually(60, "the build to be canceled", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["latest_build"]["status"] == "canceled").then_some(())
    })
    .await;
    assert!(at.elapsed().as_secs() < 40, "{:?}", at.elapsed());
    let (_, logs) = owner.get(&format!("/jobs/{job}/logs")).await;
    assert_eq!(logs["status"], "canceled");
    let text = logs["logs"].to_string();
    assert!(
        text.contains("Interrupt received"),
        "Terraform was interrupted: {text}"
    );
    assert!(text.contains("build canceled"), "{text}");
    // Nothing runs now: canceling again is a conflict, and a build may follow.
    let (status, _) = owner
        .post(&format!("/workspaces/{id}/builds/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    build(&owner, &id, "delete").await;
    eventually(120, "the delete", || async {
        let (status, _) = owner.get(&format!("/workspaces/{id}")).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_build_whose_primary_dies_mid_apply_fails_after_a_restart_and_the_workspace_builds_again()
{
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let url = db.url();
    let start = |data: &'static str| {
        let data_dir = dir.path().join(data);
        let url = url.clone();
        let log_dir = dir.path().to_owned();
        async move {
            ServerProcess::start(
                &[
                    "--data-dir",
                    data_dir.to_str().unwrap(),
                    "--provisioner-timeout",
                    "6",
                ],
                &[("DEVMESH_POSTGRES_URL", url.expose())],
                &log_dir,
            )
            .await
        }
    };
    let first = start("a").await;
    let anon = Api::new(&first.url, None);
    anon.post(
        "/users/first",
        json!({"email": "owner@example.com", "username": "owner", "password": "owner-password"}),
    )
    .await;
    let owner = anon.login("owner", "owner-password").await;
    let (id, job) = slow_build(&owner, "doomed", 15).await;

    // The primary, and its built-in daemons, die mid-apply.
    first.crash().await;
    let second = start("a").await;
    let owner = Api::new(&second.url, owner.token.clone());
    let w = eventually(60, "the orphaned build to fail", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["latest_build"]["status"] == "failed").then_some(w)
    })
    .await;
    assert!(
        w["latest_build"]["error"]
            .as_str()
            .unwrap()
            .contains("stopped responding"),
        "{}",
        w["latest_build"]
    );
    // Its log up to the crash is kept.
    let (_, logs) = owner.get(&format!("/jobs/{job}/logs")).await;
    assert!(logs.to_string().contains("slow start"));
    // The workspace is not stuck: the next build runs.
    build(&owner, &id, "delete").await;
    eventually(120, "the delete", || async {
        let (status, _) = owner.get(&format!("/workspaces/{id}")).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    second.stop().await;
}

#[tokio::test]
async fn members_cannot_push_code_for_the_server_to_run_nor_touch_others_builds() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner) = primary(dir.path()).await;
    let (status, body) = owner
        .post(
            "/users",
            json!({"email": "m@example.com", "username": "mallory", "password": "mallory-password"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mallory = Api::new(&server.url, None)
        .login("mallory", "mallory-password")
        .await;
    let tpl = tempfile::tempdir().unwrap();
    std::fs::write(
        tpl.path().join("main.tf"),
        "resource \"terraform_data\" \"x\" {\n  provisioner \"local-exec\" {\n    command = \"echo ran as the provisioner\"\n  }\n}\n",
    )
    .unwrap();
    // A Terraform template runs code on the provisioner: members may not push one.
    let (status, _) = mallory
        .post(
            "/templates",
            json!({"name": "evil", "kind": "terraform", "archive": archive_of(tpl.path())}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let template = push(&owner, "ok", archive_of(tpl.path())).await;
    let (status, _) = mallory
        .post(
            "/templates/ok/versions",
            json!({"kind": "terraform", "archive": archive_of(tpl.path())}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Nor read a template's import log.
    let import = template["active_version"]["import"]["job_id"]
        .as_str()
        .unwrap();
    let (status, _) = mallory.get(&format!("/jobs/{import}/logs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Nor see or cancel the owner's builds.
    let (id, job) = create_workspace(&owner, "mine", "ok").await;
    let (status, _) = mallory
        .post(&format!("/workspaces/{id}/builds/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = mallory.get(&format!("/jobs/{job}/logs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    built(&owner, &id).await;
    server.stop().await;
}
