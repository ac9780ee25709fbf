//! The devmesh Terraform provider, driven by the real `terraform` binary:
//! installed from a filesystem mirror (no registry), its data sources read
//! the build from the environment, its resources plan, apply, update,
//! replace and destroy as Terraform expects, and it refuses bad templates
//! with errors that point at the attribute.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use tokio::process::Command;

use crate::support::BIN;

/// A Terraform working directory with the devmesh provider in a local
/// mirror, as a provisioner sets one up.
struct Workdir {
    _dir: tempfile::TempDir,
    root: PathBuf,
    template: PathBuf,
}

impl Workdir {
    fn new(main_tf: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let platform = root.join(format!(
            "mirror/registry.terraform.io/devmesh/devmesh/{}/linux_amd64",
            env!("CARGO_PKG_VERSION")
        ));
        std::fs::create_dir_all(&platform).unwrap();
        std::os::unix::fs::symlink(
            BIN,
            platform.join(format!(
                "terraform-provider-devmesh_v{}",
                env!("CARGO_PKG_VERSION")
            )),
        )
        .unwrap();
        std::fs::write(
            root.join("terraform.rc"),
            format!(
                "provider_installation {{\n  filesystem_mirror {{\n    path = \"{}\"\n  }}\n}}\n",
                root.join("mirror").display()
            ),
        )
        .unwrap();
        let template = root.join("template");
        std::fs::create_dir_all(&template).unwrap();
        std::fs::write(template.join("main.tf"), main_tf).unwrap();
        Self {
            _dir: dir,
            root,
            template,
        }
    }

    async fn terraform(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("terraform")
            .args(args)
            .current_dir(&self.template)
            .env("TF_CLI_CONFIG_FILE", self.root.join("terraform.rc"))
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
        serde_json::from_str(
            &std::fs::read_to_string(self.template.join("terraform.tfstate")).unwrap(),
        )
        .unwrap()
    }

    fn set_template(&self, main_tf: &str) {
        std::fs::write(self.template.join("main.tf"), main_tf).unwrap();
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
