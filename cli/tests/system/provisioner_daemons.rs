//! External provisioner daemons (`devmesh provisioner start`), with the real
//! binary, real Terraform and a primary with no built-in daemons: keys,
//! tags, many daemons sharing a queue, a daemon's death, and what a key
//! can and cannot do.

use std::path::Path;
use std::time::Duration;

use devmesh_tests::Api;
use devmesh_tests::process::Process;
use devmesh_tests::upstream::Upstream;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::provisioning::{
    app_answers, archive_of, build, built, create_workspace, local_process, primary_with, push,
    step_template,
};
use crate::support::{BIN, CliAs, eventually, ok};

/// `devmesh provisioner start` against `url` with `key` (in the
/// environment, as the docs advise) and `tags`, working in `dir/NAME-work`
/// and logging to a file in `dir`.
fn start_daemon(url: &str, key: &str, name: &str, tags: &[&str], dir: &Path) -> Process {
    let mut cmd = tokio::process::Command::new(BIN);
    let work = dir.join(format!("{name}-work"));
    cmd.args(["provisioner", "start", "--url", url, "--name", name])
        .arg("--work-dir")
        .arg(&work);
    for t in tags {
        cmd.args(["--tag", t]);
    }
    cmd.env("DEVMESH_PROVISIONER_KEY", key)
        .env("DEVMESH_CONFIG_DIR", dir.join(format!("{name}-config")))
        .env("DEVMESH_LOG", "info")
        .env_remove("DEVMESH_URL");
    Process::spawn(cmd, dir.join(format!("{name}.log"))).unwrap()
}

/// Creates a provisioner key through the API; returns its secret.
async fn create_key(owner: &Api, name: &str, tags: Value) -> String {
    let (status, body) = owner
        .post("/provisioner-keys", json!({"name": name, "tags": tags}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["secret"].as_str().unwrap().to_owned()
}

/// Pushes a template without waiting for its import; returns its import
/// job.
async fn push_queued(owner: &Api, name: &str, archive: String, tags: Value) -> String {
    let (status, body) = owner
        .post(
            "/templates",
            json!({"name": name, "kind": "terraform", "archive": archive, "provisioner_tags": tags}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["active_version"]["import"]["job_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn job_status(owner: &Api, job: &str) -> Value {
    let (status, logs) = owner.get(&format!("/jobs/{job}/logs")).await;
    assert_eq!(status, StatusCode::OK, "{logs}");
    logs
}

/// Waits for `job` to end with `status`, returning its logs.
async fn job_ends(owner: &Api, job: &str, status: &str) -> Value {
    let logs = eventually(120, "the job to end", || async {
        let logs = job_status(owner, job).await;
        (!matches!(
            logs["status"].as_str(),
            Some("pending" | "running" | "canceling")
        ))
        .then_some(logs)
    })
    .await;
    assert_eq!(logs["status"], status, "{logs:#}");
    logs
}

#[tokio::test]
async fn an_external_daemon_builds_only_the_jobs_its_tags_cover_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(dir.path(), &["--provisioner-daemons", "0"]).await;
    let token = owner.token.clone().unwrap();
    let me = CliAs {
        config: dir.path().join("cli"),
        url: server.url.clone(),
        token: token.clone(),
    };

    // An owner creates a key for Sydney's daemons with the CLI.
    let out = me
        .run(&[
            "provisioner",
            "keys",
            "create",
            "sydney",
            "--tag",
            "region=sydney",
        ])
        .await;
    let printed = ok(&out);
    let sydney_key = printed
        .lines()
        .find_map(|l| l.strip_prefix("Key (shown once): "))
        .unwrap_or_else(|| panic!("no key in {printed}"))
        .trim()
        .to_owned();
    let anywhere_key = create_key(&owner, "anywhere", json!({})).await;

    // A Sydney template waits, saying why, while no daemon serves Sydney.
    let sydney_import = push_queued(
        &owner,
        "sydney-dev",
        local_process(),
        json!({"region": "sydney"}),
    )
    .await;
    let logs = job_status(&owner, &sydney_import).await;
    assert_eq!(logs["status"], "pending");
    assert!(
        logs["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("region=sydney")),
        "{logs}"
    );

    // A daemon without tags takes untagged work, never Sydney's.
    let mut anywhere = start_daemon(&server.url, &anywhere_key, "anywhere", &[], dir.path());
    let plain_import = push_queued(&owner, "plain", step_template("echo plain"), json!({})).await;
    job_ends(&owner, &plain_import, "succeeded").await;
    assert_eq!(
        job_status(&owner, &sydney_import).await["status"],
        "pending"
    );

    // A key with tags decides them: a daemon claiming another region is
    // refused, saying so, and exits.
    let mut wrong = start_daemon(
        &server.url,
        &sydney_key,
        "wrong",
        &["region=virginia"],
        dir.path(),
    );
    let status = wrong.wait(Duration::from_secs(30)).await.unwrap();
    assert!(!status.success());
    assert!(
        wrong.log_text().contains("serves tags region=sydney"),
        "{}",
        wrong.log_text()
    );

    // Sydney's daemon takes the Sydney import, then builds a real
    // workspace whose agent starts by itself.
    let mut sydney = start_daemon(&server.url, &sydney_key, "syd-1", &[], dir.path());
    job_ends(&owner, &sydney_import, "succeeded").await;
    let upstream = Upstream::start().await;
    let root = dir.path().join("homes");
    let (status, body) = owner
        .post(
            "/workspaces",
            json!({"name": "syd", "template": "sydney-dev",
                   "parameters": {"home_root": root.to_str().unwrap(),
                                  "web_port": upstream.port().to_string()}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["workspace"]["id"].as_str().unwrap().to_owned();
    let w = built(&owner, &id).await;
    let job = w["latest_build"]["job_id"].as_str().unwrap().to_owned();
    let text = job_status(&owner, &job).await["logs"].to_string();
    assert!(text.contains("terraform apply"), "{text}");
    eventually(60, "the agent to connect", || async {
        let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
        (w["agents"][0]["status"] == "connected").then_some(())
    })
    .await;
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("http://web--main--syd--owner.apps.localhost:{port}/echo");
    let app = app_answers("the app through the primary", &url, &token).await;
    assert_eq!(app["path"], "/echo");
    assert!(sydney.log_text().contains("running a provisioner job"));
    assert!(
        !anywhere.log_text().contains("start syd"),
        "the untagged daemon ran Sydney's build"
    );

    // Owners see the daemons, their tags and keys.
    let out = me.run(&["provisioner", "list"]).await;
    let list = ok(&out);
    let row = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{list}"))
            .to_owned()
    };
    assert!(row("syd-1").contains("region=sydney"), "{list}");
    assert!(row("syd-1").contains("external (key sydney)"), "{list}");
    assert!(row("anywhere").contains("(none)"), "{list}");
    assert!(row("anywhere").contains("idle"), "{list}");

    // The workspace goes away through the same daemon.
    build(&owner, &id, "delete").await;
    eventually(120, "the delete to run", || async {
        let (status, _) = owner.get(&format!("/workspaces/{id}")).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // SIGTERM stops a daemon cleanly; the work directory it was given
    // (its runs' states, so its user's alone) stays.
    sydney.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        sydney
            .wait(Duration::from_secs(30))
            .await
            .unwrap()
            .success()
    );
    let work = std::fs::metadata(dir.path().join("syd-1-work")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&work.permissions()) & 0o777,
        0o700
    );
    anywhere.kill().await;
}

#[tokio::test]
async fn ten_workspaces_build_at_once_over_three_daemons_and_a_killed_daemon_fails_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(
        dir.path(),
        &["--provisioner-daemons", "0", "--provisioner-timeout", "3"],
    )
    .await;
    let key = create_key(&owner, "pool", json!({})).await;
    let mut daemons: Vec<Process> = (0..3)
        .map(|i| start_daemon(&server.url, &key, &format!("pool-{i}"), &[], dir.path()))
        .collect();
    push(&owner, "quick", step_template("sleep 1")).await;

    let created = futures_util::future::join_all((0..10).map(|i| {
        let owner = &owner;
        async move {
            let (status, body) = owner
                .post(
                    "/workspaces",
                    json!({"name": format!("w{i}"), "template": "quick"}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["workspace"]["id"].as_str().unwrap().to_owned()
        }
    }))
    .await;
    for id in &created {
        built(&owner, id).await;
    }
    let ran: Vec<usize> = daemons
        .iter()
        .map(|d| d.log_text().matches("running a provisioner job").count())
        .collect();
    assert_eq!(
        ran.iter().sum::<usize>(),
        11,
        "one import and ten builds: {ran:?}"
    );
    assert!(
        ran.iter().filter(|n| **n > 0).count() >= 2,
        "the builds were shared: {ran:?}"
    );

    // A daemon killed mid-build: its job fails within the heartbeat
    // timeout, saying why; what the build had created by then is in the
    // stored state, so the next build (on another daemon) destroys it.
    let tpl = tempfile::tempdir().unwrap();
    std::fs::write(
        tpl.path().join("main.tf"),
        "data \"devmesh_workspace\" \"me\" {}\n\
         terraform {\n  required_providers {\n    devmesh = { source = \"devmesh/devmesh\" }\n  }\n}\n\
         resource \"terraform_data\" \"first\" {\n  \
           provisioner \"local-exec\" {\n    when    = destroy\n    command = \"echo destroying first\"\n  }\n}\n\
         resource \"terraform_data\" \"slow\" {\n  \
           count      = data.devmesh_workspace.me.transition == \"start\" ? 1 : 0\n  \
           depends_on = [terraform_data.first]\n  \
           provisioner \"local-exec\" {\n    command = \"echo slow start; sleep 20\"\n  }\n}\n",
    )
    .unwrap();
    push(&owner, "slow", archive_of(tpl.path())).await;
    let (id, job) = create_workspace(&owner, "slow", "slow").await;
    eventually(60, "the slow step to start", || async {
        job_status(&owner, &job)
            .await
            .to_string()
            .contains("slow start")
            .then_some(())
    })
    .await;
    let (_, list) = owner.get("/provisioner-daemons").await;
    let holder = list["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["current_job"] == job.as_str())
        .unwrap_or_else(|| panic!("no daemon holds {job}: {list}"))["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let i: usize = holder.strip_prefix("pool-").unwrap().parse().unwrap();
    eventually(30, "the daemon to save the state as it runs", || async {
        daemons[i]
            .log_text()
            .lines()
            .any(|l| l.contains("saved the running build's Terraform state") && l.contains(&job))
            .then_some(())
    })
    .await;
    let at = tokio::time::Instant::now();
    daemons[i].kill().await;
    let logs = job_ends(&owner, &job, "failed").await;
    assert!(
        logs["error"]
            .as_str()
            .unwrap()
            .contains("stopped responding"),
        "{logs}"
    );
    assert!(at.elapsed() < Duration::from_secs(30), "{:?}", at.elapsed());
    let (status, body) = owner
        .post(
            &format!("/workspaces/{id}/builds"),
            json!({"transition": "delete"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let delete = body["workspace"]["latest_build"]["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let logs = job_ends(&owner, &delete, "succeeded").await;
    assert!(
        logs["logs"].to_string().contains("destroying first"),
        "the killed build's resource was in the saved state: {logs:#}"
    );
}

/// POSTs `body` to `/api/v2/provisionerd{path}` with a provisioner key.
async fn daemon_post(base: &str, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/v2/provisionerd{path}"))
        .header("Devmesh-Provisioner-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn register(base: &str, key: &str, name: &str, tags: Value) -> (StatusCode, Value) {
    daemon_post(
        base,
        key,
        "/register",
        json!({"name": name, "tags": tags, "version": devmesh_shared::VERSION}),
    )
    .await
}

#[tokio::test]
async fn a_provisioner_key_opens_only_the_daemon_api_and_a_daemon_only_its_own_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_with(
        dir.path(),
        &["--provisioner-daemons", "0", "--provisioner-timeout", "3"],
    )
    .await;
    let base = server.url.as_str();

    // Members manage neither keys nor daemons.
    let (status, _) = owner
        .post(
            "/users",
            json!({"email": "m@example.com", "username": "member", "password": "member-password"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let member = Api::new(base, None)
        .login("member", "member-password")
        .await;
    let (status, _) = member
        .post("/provisioner-keys", json!({"name": "mine"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        member.get("/provisioner-daemons").await.0,
        StatusCode::FORBIDDEN
    );

    let k1 = create_key(&owner, "one", json!({})).await;
    let k2 = create_key(&owner, "two", json!({"region": "sydney"})).await;
    // Bad tags are refused.
    let (status, _) = owner
        .post(
            "/provisioner-keys",
            json!({"name": "bad", "tags": {"Region": "x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A key is not a session, and a session is not a key; garbage is
    // refused.
    assert_eq!(
        owner.with_token(&k1).get("/workspaces").await.0,
        StatusCode::UNAUTHORIZED
    );
    let user_key = owner.token.clone().unwrap();
    for bad in [user_key.as_str(), "garbage", ""] {
        let (status, _) = register(base, bad, "x", json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "key {bad:?}");
    }
    // A key with tags cannot be used to serve other tags.
    let (status, body) = register(base, &k2, "d2", json!({"region": "virginia"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, d2) = register(base, &k2, "d2", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{d2}");
    assert_eq!(d2["tags"], json!({"region": "sydney"}));
    let d2 = d2["id"].as_str().unwrap().to_owned();
    let (_, d1) = register(base, &k1, "d1", json!({})).await;
    let d1 = d1["id"].as_str().unwrap().to_owned();
    // A daemon id is usable only with its own key.
    let (status, _) = daemon_post(base, &k2, &format!("/daemons/{d1}/acquire"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // d1 takes an import job and gets what it needs to run it.
    let job = push_queued(&owner, "t", step_template("true"), json!({})).await;
    let (status, spec) = daemon_post(base, &k1, &format!("/daemons/{d1}/acquire"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{spec}");
    assert_eq!(spec["id"], job.as_str());
    assert_eq!(spec["kind"], "import");
    assert!(!spec["archive"].as_str().unwrap().is_empty());

    // Another daemon can neither log to it, nor save state for it, nor
    // end it.
    let on = |d: &str, what: &str| format!("/daemons/{d}/jobs/{job}/{what}");
    let (status, _) = daemon_post(
        base,
        &k2,
        &on(&d2, "logs"),
        json!({"lines": [{"stream": "stdout", "line": "forged"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = daemon_post(
        base,
        &k2,
        &on(&d2, "complete"),
        json!({"outcome": {"status": "failed", "error": "forged"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["recorded"], false, "{body}");
    assert_eq!(job_status(&owner, &job).await["status"], "running");
    assert!(
        !job_status(&owner, &job)
            .await
            .to_string()
            .contains("forged")
    );
    // State goes only to builds.
    let req = reqwest::Client::new()
        .put(format!("{base}/api/v2/provisionerd{}", on(&d1, "state")))
        .header("Devmesh-Provisioner-Key", &k1)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(req.status(), StatusCode::CONFLICT);

    // The primary checks what a daemon reports: parameters that cannot be
    // valid fail the import.
    let (status, body) = daemon_post(base, &k1, &on(&d1, "complete"), json!({"outcome": {"status": "succeeded"},
                    "parameters": [{"name": "a", "type": "string"}, {"name": "a", "type": "string"}]}))
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["recorded"], true);
    let logs = job_status(&owner, &job).await;
    assert_eq!(logs["status"], "failed");
    assert!(logs["error"].as_str().unwrap().contains("two"), "{logs}");

    // Deleting a key refuses its daemons from then on; their running jobs
    // fail once the heartbeat timeout passes (the daemon may still be
    // interrupting Terraform until then).
    let (status, body) = owner
        .post(
            "/templates/t/versions",
            json!({"kind": "terraform", "archive": step_template("true")}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, spec) = daemon_post(base, &k1, &format!("/daemons/{d1}/acquire"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{spec}");
    let second = spec["id"].as_str().unwrap().to_owned();
    assert_eq!(
        owner.delete("/provisioner-keys/one").await.0,
        StatusCode::NO_CONTENT
    );
    let (status, _) = daemon_post(
        base,
        &k1,
        &format!("/daemons/{d1}/jobs/{second}/heartbeat"),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let logs = job_ends(&owner, &second, "failed").await;
    assert!(
        logs["error"]
            .as_str()
            .unwrap()
            .contains("stopped responding"),
        "{logs}"
    );

    // A key whose daemons register without end (a crash loop) is cut off
    // before it fills the database: 200 registrations an hour.
    let k3 = create_key(&owner, "looping", json!({})).await;
    let mut refused_at = None;
    for i in 0..205 {
        let (status, _) = register(base, &k3, &format!("loop-{i}"), json!({})).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused_at = Some(i);
            break;
        }
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(refused_at, Some(200), "the 201st registration is refused");
    // Other keys are not affected.
    let (status, _) = register(base, &k2, "d2-again", json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // Every refusal was counted.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("devmesh_provisioner_refusals_total{result=\"key\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("devmesh_provisioner_refusals_total{result=\"job\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_build_that_runs_past_the_job_timeout_is_interrupted_and_fails_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, owner, _db) = primary_with(dir.path(), &["--provisioner-job-timeout", "4"]).await;
    push(&owner, "hangs", step_template("echo hanging; sleep 60")).await;
    let (id, job) = create_workspace(&owner, "hung", "hangs").await;
    let logs = job_ends(&owner, &job, "failed").await;
    assert!(
        logs["error"]
            .as_str()
            .unwrap()
            .contains("did not finish within 4 s"),
        "{logs}"
    );
    assert!(
        logs["logs"].to_string().contains("Interrupt received"),
        "Terraform was interrupted gracefully: {logs:#}"
    );
    let (_, w) = owner.get(&format!("/workspaces/{id}")).await;
    assert_eq!(w["latest_build"]["status"], "failed", "{w}");
    build(&owner, &id, "delete").await;
    eventually(60, "the delete to run", || async {
        let (status, _) = owner.get(&format!("/workspaces/{id}")).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
}
