//! The devmesh Terraform provider, driven by the real `terraform` binary:
//! installed from a filesystem mirror (no registry), its data sources read
//! the build from the environment, its resources plan, apply, update,
//! replace and destroy as Terraform expects, and it refuses bad templates
//! with errors that point at the attribute.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use devmesh_provisioner::terraform::{self, RunError, Stream, Terraform};
use serde_json::Value;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::support::BIN;

/// A Terraform working directory set up the way a provisioner sets it up
/// ([`devmesh_provisioner::terraform::Workdir`]), with the test binary as
/// the provider.
struct Workdir {
    _dir: tempfile::TempDir,
    wd: terraform::Workdir,
}

impl Workdir {
    fn new(main_tf: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let wd = terraform::Workdir::prepare(dir.path(), Path::new(BIN), env!("CARGO_PKG_VERSION"))
            .unwrap();
        std::fs::write(wd.template().join("main.tf"), main_tf).unwrap();
        Self { _dir: dir, wd }
    }

    async fn terraform(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("terraform")
            .args(args)
            .current_dir(self.wd.template())
            .env("TF_CLI_CONFIG_FILE", self.wd.cli_config())
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .output()
            .await
            .expect("terraform is installed (see the README's requirements)")
    }

    async fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.terraform(args, env).await;
        assert!(
            out.status.success(),
            "terraform {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.wd.template().join("terraform.tfstate")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn set_template(&self, main_tf: &str) {
        std::fs::write(self.wd.template().join("main.tf"), main_tf).unwrap();
    }
}

/// The attributes of the resource `address` (`type.name`) in `state`.
fn resource<'a>(state: &'a Value, address: &str) -> &'a Value {
    let (ty, name) = address.split_once('.').unwrap();
    state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == ty && r["name"] == name)
        .map(|r| &r["instances"][0]["attributes"])
        .unwrap_or_else(|| panic!("no {address} in {state}"))
}

fn template(arch: &str, startup: &str, port: u32) -> String {
    format!(
        r#"
terraform {{
  required_providers {{
    devmesh = {{ source = "devmesh/devmesh" }}
  }}
}}
data "devmesh_workspace" "me" {{}}
data "devmesh_workspace_owner" "me" {{}}
data "devmesh_parameter" "size" {{
  name    = "size"
  default = "10"
}}
data "devmesh_parameter" "region" {{
  name    = "region"
  default = "eu"
}}
resource "devmesh_agent" "main" {{
  os             = "linux"
  arch           = "{arch}"
  startup_script = "{startup}"
  env            = {{ SIZE = data.devmesh_parameter.size.value }}
}}
resource "devmesh_app" "web" {{
  agent_id = devmesh_agent.main.id
  slug     = "web"
  port     = {port}
}}
resource "devmesh_metadata" "main" {{
  resource_id = devmesh_agent.main.id
  items       = {{ size = data.devmesh_parameter.size.value }}
}}
output "workspace" {{ value = data.devmesh_workspace.me.name }}
output "start_count" {{ value = data.devmesh_workspace.me.start_count }}
output "owner" {{ value = data.devmesh_workspace_owner.me.email }}
output "size" {{ value = data.devmesh_parameter.size.value }}
output "region" {{ value = data.devmesh_parameter.region.value }}
"#
    )
}

const BUILD: &[(&str, &str)] = &[
    ("DEVMESH_WORKSPACE_NAME", "dev"),
    ("DEVMESH_WORKSPACE_TRANSITION", "start"),
    ("DEVMESH_WORKSPACE_OWNER_EMAIL", "alice@example.com"),
    ("DEVMESH_ACCESS_URL", "https://devmesh.example.com"),
    ("DEVMESH_PARAMETERS", r#"{"size":"20"}"#),
];

#[tokio::test]
async fn terraform_runs_templates_against_the_devmesh_provider_from_a_local_mirror() {
    let wd = Workdir::new(&template("amd64", "echo one", 8080));
    wd.ok(&["init", "-input=false"], &[]).await;
    wd.ok(&["apply", "-auto-approve", "-input=false"], BUILD)
        .await;
    let state = wd.state();
    let outputs = &state["outputs"];
    assert_eq!(outputs["workspace"]["value"], "dev");
    assert_eq!(outputs["start_count"]["value"], 1);
    assert_eq!(outputs["owner"]["value"], "alice@example.com");
    assert_eq!(outputs["size"]["value"], "20", "the build's value wins");
    assert_eq!(outputs["region"]["value"], "eu", "else the default");

    let agent = resource(&state, "devmesh_agent.main");
    let token = agent["token"].as_str().unwrap().to_owned();
    assert!(
        devmesh_shared::token::looks_like_agent_token(&token),
        "{token}"
    );
    let init = agent["init_script"].as_str().unwrap();
    assert!(
        init.contains("https://devmesh.example.com/api/v2/buildinfo/agent/linux/amd64"),
        "{init}"
    );
    assert!(!init.contains(&token), "the token stays out of the script");
    assert_eq!(agent["env"]["SIZE"], "20");
    let app = resource(&state, "devmesh_app.web");
    assert_eq!(app["agent_id"], agent["id"]);
    assert_eq!(
        resource(&state, "devmesh_metadata.main")["items"]["size"],
        "20"
    );

    // Nothing changed: nothing to do.
    let out = wd
        .terraform(&["plan", "-input=false", "-detailed-exitcode"], BUILD)
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A new startup script updates the agent in place: same id and token.
    wd.set_template(&template("amd64", "echo two", 8080));
    wd.ok(&["apply", "-auto-approve", "-input=false"], BUILD)
        .await;
    let state = wd.state();
    let updated = resource(&state, "devmesh_agent.main");
    assert_eq!(updated["startup_script"], "echo two");
    assert_eq!(updated["token"].as_str(), Some(token.as_str()));

    // Another architecture replaces it: a new token, and its app follows.
    wd.set_template(&template("arm64", "echo two", 8080));
    wd.ok(&["apply", "-auto-approve", "-input=false"], BUILD)
        .await;
    let state = wd.state();
    let replaced = resource(&state, "devmesh_agent.main");
    assert_ne!(replaced["token"].as_str(), Some(token.as_str()));
    assert!(
        replaced["init_script"]
            .as_str()
            .unwrap()
            .contains("/agent/linux/arm64")
    );
    assert_eq!(
        resource(&state, "devmesh_app.web")["agent_id"],
        replaced["id"]
    );

    // Each devmesh build gives the same agent a new token, kept for the
    // whole build.
    let with_build = |id| {
        let mut env = BUILD.to_vec();
        env.push(("DEVMESH_BUILD_ID", id));
        env
    };
    let before = resource(&wd.state(), "devmesh_agent.main").clone();
    wd.ok(
        &["apply", "-auto-approve", "-input=false"],
        &with_build("b1"),
    )
    .await;
    let b1 = resource(&wd.state(), "devmesh_agent.main").clone();
    assert_ne!(b1["token"], before["token"]);
    assert_eq!(b1["id"], before["id"]);
    let out = wd
        .terraform(
            &["plan", "-input=false", "-detailed-exitcode"],
            &with_build("b1"),
        )
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wd.ok(
        &["apply", "-auto-approve", "-input=false"],
        &with_build("b2"),
    )
    .await;
    assert_ne!(
        resource(&wd.state(), "devmesh_agent.main")["token"],
        b1["token"]
    );

    // A stop build counts ephemeral resources out.
    let mut stop = BUILD.to_vec();
    stop[1] = ("DEVMESH_WORKSPACE_TRANSITION", "stop");
    wd.ok(&["apply", "-auto-approve", "-input=false"], &stop)
        .await;
    assert_eq!(wd.state()["outputs"]["start_count"]["value"], 0);

    wd.ok(&["destroy", "-auto-approve", "-input=false"], BUILD)
        .await;
    assert_eq!(wd.state()["resources"], serde_json::json!([]));
}

#[tokio::test]
async fn bad_templates_fail_validation_naming_the_attribute() {
    let wd = Workdir::new(&template("sparc", "", 8080));
    wd.ok(&["init", "-input=false"], &[]).await;
    for (main_tf, error, resource) in [
        (
            template("sparc", "", 8080),
            "arch must be amd64 or arm64",
            "devmesh_agent.main",
        ),
        (
            template("amd64", "", 70000),
            "port must be between 1 and 65535",
            "devmesh_app.web",
        ),
    ] {
        wd.set_template(&main_tf);
        let out = wd.terraform(&["validate", "-no-color"], &[]).await;
        assert!(!out.status.success());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(error), "{text}");
        assert!(text.contains(resource), "{text}");
    }
}

#[tokio::test]
async fn the_provider_refuses_to_run_outside_terraform() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("terraform-provider-devmesh_v0.0.0");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let out = Command::new(&link).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Terraform starts it"), "{err}");
    assert!(out.stdout.is_empty(), "no handshake line");
}

/// A template whose apply runs `command` (with `terraform_data`, built
/// into Terraform: no registry needed).
fn running(command: &str) -> String {
    format!(
        r#"
resource "terraform_data" "step" {{
  triggers_replace = "{command}"
  provisioner "local-exec" {{
    command = "{command}"
  }}
}}
"#
    )
}

#[tokio::test]
async fn a_provisioner_run_streams_terraform_output_and_reports_failure() {
    let tf = Terraform::find(None).await.expect("terraform on PATH");
    assert!(
        tf.version().starts_with(|c: char| c.is_ascii_digit()),
        "{}",
        tf.version()
    );
    let wd = Workdir::new(&running("echo built-by-devmesh; echo to-stderr >&2"));
    let never = CancellationToken::new();
    let mut lines = Vec::new();
    tf.run(&wd.wd, &["init", "-no-color"], &[], &never, |_, l| {
        lines.push(l.to_owned())
    })
    .await
    .unwrap();
    tf.run(
        &wd.wd,
        &["apply", "-auto-approve", "-no-color"],
        &[],
        &never,
        |s, l| lines.push(format!("{s:?} {l}")),
    )
    .await
    .unwrap();
    assert!(
        lines.iter().any(|l| l.contains("built-by-devmesh")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("Apply complete!")),
        "{lines:#?}"
    );

    wd.set_template(&running("echo about to fail; exit 3"));
    let mut lines = Vec::new();
    let err = tf
        .run(
            &wd.wd,
            &["apply", "-auto-approve", "-no-color"],
            &[],
            &never,
            |s, l| lines.push((s, l.to_owned())),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunError::Failed { ref command, .. } if command == "apply"),
        "{err}"
    );
    assert!(
        lines
            .iter()
            .any(|(s, l)| *s == Stream::Stderr && l.contains("exit status 3")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn canceling_a_run_interrupts_terraform_gracefully() {
    let tf = Terraform::find(None).await.expect("terraform on PATH");
    let wd = Workdir::new(&running("echo started; sleep 60"));
    let never = CancellationToken::new();
    tf.run(&wd.wd, &["init", "-no-color"], &[], &never, |_, _| {})
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let (c, s) = (cancel.clone(), started.clone());
    tokio::spawn(async move {
        s.notified().await;
        c.cancel();
    });
    let at = tokio::time::Instant::now();
    let mut lines = Vec::new();
    let err = tf
        .run(
            &wd.wd,
            &["apply", "-auto-approve", "-no-color"],
            &[],
            &cancel,
            |_, l| {
                if l.contains("started") {
                    started.notify_one();
                }
                lines.push(l.to_owned());
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RunError::Canceled { .. }), "{err}");
    assert!(
        at.elapsed() < Duration::from_secs(30),
        "the 60 s command was interrupted, not waited for ({:?})",
        at.elapsed()
    );
    assert!(
        lines.iter().any(|l| l.contains("Interrupt received")),
        "Terraform saw an interrupt, not a kill: {lines:#?}"
    );
}

#[tokio::test]
async fn the_server_says_in_one_line_whether_it_can_run_terraform() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, needle) in [
        (None, "Terraform found for workspace builds"),
        (
            Some("/nonexistent/terraform"),
            "install Terraform 1.4 or later",
        ),
    ] {
        let db = devmesh_tests::fresh_database().await;
        let url = db.url();
        let mut args = vec!["--data-dir", dir.path().to_str().unwrap()];
        args.extend(flag.map(|f| ["--terraform-path", f]).into_iter().flatten());
        let server = crate::support::ServerProcess::start(
            &args,
            &[("DEVMESH_POSTGRES_URL", url.expose())],
            dir.path(),
        )
        .await;
        let log = crate::support::eventually(10, needle, || async {
            let text = std::fs::read_to_string(server.log()).unwrap_or_default();
            text.contains(needle).then_some(text)
        })
        .await;
        assert_eq!(
            log.lines().filter(|l| l.contains(needle)).count(),
            1,
            "{log}"
        );
        // The server runs either way.
        let health = reqwest::get(format!("{}/healthz", server.url))
            .await
            .unwrap();
        assert!(health.status().is_success());
        server.stop().await;
    }
}

#[tokio::test]
async fn an_init_script_downloads_the_agent_from_the_primary_and_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = devmesh_tests::fresh_database().await;
    let url = db.url();
    let server = crate::support::ServerProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        dir.path(),
    )
    .await;

    // The primary serves its own binary for its own platform only.
    let platform = terraform::platform().replace('_', "/");
    let resp = reqwest::get(format!("{}/api/v2/buildinfo/agent/{platform}", server.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let served = resp.bytes().await.unwrap();
    assert!(
        served == std::fs::read(BIN).unwrap(),
        "the served binary is the running one"
    );
    let other = reqwest::get(format!("{}/api/v2/buildinfo/agent/plan9/mips", server.url))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    assert!(
        other
            .text()
            .await
            .unwrap()
            .contains(&format!("agent for {platform} only"))
    );

    // The provider's init script, as a template gets it.
    let (os, arch) = platform.split_once('/').unwrap();
    let wd = Workdir::new(&format!(
        r#"
terraform {{
  required_providers {{
    devmesh = {{ source = "devmesh/devmesh" }}
  }}
}}
resource "devmesh_agent" "main" {{
  os   = "{os}"
  arch = "{arch}"
}}
"#
    ));
    wd.ok(&["init", "-input=false"], &[]).await;
    wd.ok(
        &["apply", "-auto-approve", "-input=false"],
        &[("DEVMESH_ACCESS_URL", &server.url)],
    )
    .await;
    let state = wd.state();
    let script = resource(&state, "devmesh_agent.main")["init_script"]
        .as_str()
        .unwrap()
        .to_owned();

    // Run it with a token the primary does not know: the downloaded agent
    // starts and asks the primary, which refuses it.
    let agent_dir = dir.path().join("agent");
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env("DEVMESH_AGENT_TOKEN", "not-a-real-token")
        .env("DEVMESH_AGENT_DIR", &agent_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("rejected the agent token") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        refused,
        Ok(true),
        "the downloaded agent ran and asked the primary"
    );
    assert_eq!(
        std::fs::read(agent_dir.join("devmesh")).unwrap(),
        std::fs::read(BIN).unwrap()
    );
    child.kill().await.unwrap();
    server.stop().await;
}
