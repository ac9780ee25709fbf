//! Running Terraform the way a provisioner does: found on the machine like
//! PostgreSQL's binaries are (an explicit path, else `PATH`) with its
//! version checked; a working directory with the devmesh provider in a
//! local filesystem mirror; and runs whose output is streamed line by line
//! and which a cancellation interrupts gracefully (SIGINT, as Ctrl-C would,
//! then SIGKILL after a grace period).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The oldest Terraform devmesh supports: 1.4 brought `terraform_data`,
/// which templates use to run commands without a registry provider.
pub const MIN_VERSION: (u32, u32) = (1, 4);

/// How long an interrupted Terraform may take to stop before it is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(60);

/// Why Terraform cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// No binary.
    #[error(
        "Terraform is not installed ({why}): install Terraform {major}.{minor} or later from \
         HashiCorp, or OpenTofu, and put it on PATH or pass --terraform-path",
        why = .0,
        major = MIN_VERSION.0,
        minor = MIN_VERSION.1
    )]
    NotFound(String),
    /// A binary that does not say its version.
    #[error("{path} does not look like Terraform: {reason}")]
    Unusable {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Too old.
    #[error(
        "{path} is Terraform {found}; devmesh needs {}.{} or later",
        MIN_VERSION.0,
        MIN_VERSION.1
    )]
    TooOld {
        /// The binary.
        path: PathBuf,
        /// Its version.
        found: String,
    },
}

/// A usable Terraform (or OpenTofu) binary.
#[derive(Debug, Clone)]
pub struct Terraform {
    path: PathBuf,
    version: String,
}

impl Terraform {
    /// `explicit`, else `terraform` then `tofu` on `PATH`; checks that it
    /// runs and is recent enough.
    pub async fn find(explicit: Option<&Path>) -> Result<Self, FindError> {
        let path = match explicit {
            Some(p) if p.is_file() => p.to_owned(),
            Some(p) => return Err(FindError::NotFound(format!("no file at {}", p.display()))),
            None => ["terraform", "tofu"]
                .iter()
                .find_map(|name| on_path(name))
                .ok_or_else(|| {
                    FindError::NotFound("neither terraform nor tofu is on PATH".into())
                })?,
        };
        let unusable = |reason: String| FindError::Unusable {
            path: path.clone(),
            reason,
        };
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(&path)
                .args(["version", "-json"])
                .env("CHECKPOINT_DISABLE", "1")
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| unusable("`version -json` did not answer within 30 s".into()))?
        .map_err(|e| unusable(e.to_string()))?;
        if !out.status.success() {
            return Err(unusable(format!(
                "`version -json` exited with {}",
                out.status
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| unusable(format!("`version -json` printed no JSON: {e}")))?;
        let version = json["terraform_version"]
            .as_str()
            .ok_or_else(|| unusable("`version -json` names no terraform_version".into()))?
            .to_owned();
        if !at_least(&version, MIN_VERSION) {
            return Err(FindError::TooOld {
                path,
                found: version,
            });
        }
        Ok(Self { path, version })
    }

    /// The binary.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its version (`1.11.4`).
    pub fn version(&self) -> &str {
        &self.version
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether `version` (`1.11.4`, `1.6.0-beta1`) is at least `min`.
fn at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

/// Terraform's name for this machine's platform (`linux_amd64`).
pub fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}_{arch}", std::env::consts::OS)
}

/// A directory Terraform runs in: the template's files in `template/`, the
/// devmesh provider in `mirror/`, and a CLI configuration that takes
/// `devmesh/devmesh` from the mirror and every other provider from its
/// registry as usual.
#[derive(Debug, Clone)]
pub struct Workdir {
    root: PathBuf,
}

impl Workdir {
    /// Sets up `root` (created if needed) with `provider` (the devmesh
    /// binary) installed in the mirror under the provider's executable
    /// name, for version `version`.
    pub fn prepare(root: &Path, provider: &Path, version: &str) -> std::io::Result<Self> {
        let platform_dir = root
            .join("mirror/registry.terraform.io/devmesh/devmesh")
            .join(version)
            .join(platform());
        // The run's state holds agent tokens and provider secrets: the
        // directory is the daemon's user's alone.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)?;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::create_dir_all(&platform_dir)?;
        std::fs::create_dir_all(root.join("template"))?;
        let exe = platform_dir.join(format!("{}_v{version}", crate::provider::EXECUTABLE_PREFIX));
        if std::fs::symlink_metadata(&exe).is_ok() {
            std::fs::remove_file(&exe)?;
        }
        std::os::unix::fs::symlink(provider, &exe)?;
        let mirror = root.join("mirror");
        std::fs::write(
            root.join("terraform.rc"),
            format!(
                "provider_installation {{\n  filesystem_mirror {{\n    path    = {mirror:?}\n    \
                 include = [\"registry.terraform.io/devmesh/devmesh\"]\n  }}\n  direct {{\n    \
                 exclude = [\"registry.terraform.io/devmesh/devmesh\"]\n  }}\n}}\n",
                mirror = mirror.display().to_string()
            ),
        )?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Where the template's files go (Terraform's working directory).
    pub fn template(&self) -> PathBuf {
        self.root.join("template")
    }

    /// The CLI configuration to pass as `TF_CLI_CONFIG_FILE`.
    pub fn cli_config(&self) -> PathBuf {
        self.root.join("terraform.rc")
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Why a run did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Terraform could not be started.
    #[error("cannot run terraform: {0}")]
    Spawn(std::io::Error),
    /// Terraform exited with an error.
    #[error("terraform {command} failed ({status})")]
    Failed {
        /// The subcommand.
        command: String,
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// The run was cancelled; Terraform was interrupted (and killed if it
    /// did not stop within [`INTERRUPT_GRACE`]).
    #[error("terraform {command} was canceled")]
    Canceled {
        /// The subcommand.
        command: String,
    },
}

impl Terraform {
    /// Runs `terraform <args>` in `workdir`'s template directory with
    /// `env`, handing every output line to `log` as it comes. A cancelled
    /// `cancel` interrupts it.
    pub async fn run(
        &self,
        workdir: &Workdir,
        args: &[&str],
        env: &[(String, String)],
        cancel: &CancellationToken,
        mut log: impl FnMut(Stream, &str),
    ) -> Result<(), RunError> {
        let command = args.first().copied().unwrap_or_default().to_owned();
        let mut child = Command::new(&self.path)
            .args(args)
            .current_dir(workdir.template())
            .env("TF_CLI_CONFIG_FILE", workdir.cli_config())
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a forced stop reaches the providers and
            // scripts it started too, which would otherwise hold its output
            // open and outlive it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(RunError::Spawn)?;
        let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
        let (mut out_open, mut err_open) = (true, true);
        let mut interrupted = false;
        let mut deadline = None;
        while out_open || err_open {
            let kill_at = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                line = out.next_line(), if out_open => match line {
                    Ok(Some(l)) => log(Stream::Stdout, &l),
                    _ => out_open = false,
                },
                line = err.next_line(), if err_open => match line {
                    Ok(Some(l)) => log(Stream::Stderr, &l),
                    _ => err_open = false,
                },
                () = cancel.cancelled(), if !interrupted => {
                    interrupted = true;
                    deadline = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                    // To the whole group, as Ctrl-C in a terminal does:
                    // a script terraform runs (local-exec) stops with it
                    // instead of holding terraform's output open until it
                    // ends by itself (providers ignore SIGINT and are
                    // stopped by terraform).
                    if let Some(pid) = child.id() {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGINT,
                        );
                    }
                }
                () = kill_at => {
                    log(Stream::Stderr, "terraform did not stop in time after the interrupt; killed with what it started");
                    match child.id() {
                        Some(pid) => {
                            let _ = nix::sys::signal::killpg(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        None => {
                            let _ = child.start_kill();
                        }
                    }
                    deadline = None;
                }
            }
        }
        let status = child.wait().await.map_err(RunError::Spawn)?;
        if interrupted {
            return Err(RunError::Canceled { command });
        }
        if !status.success() {
            return Err(RunError::Failed { command, status });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert!(at_least("1.11.4", (1, 4)));
        assert!(at_least("1.4.0", (1, 4)));
        assert!(at_least("2.0.0-alpha1", (1, 4)));
        assert!(!at_least("1.3.9", (1, 4)));
        assert!(!at_least("0.15.5", (1, 4)));
        assert!(!at_least("garbage", (1, 4)));
    }

    #[tokio::test]
    async fn a_missing_binary_says_what_to_install() {
        let err = Terraform::find(Some(Path::new("/nonexistent/terraform")))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("install Terraform 1.4 or later"), "{err}");
        assert!(err.contains("--terraform-path"), "{err}");
    }

    #[tokio::test]
    async fn a_binary_that_is_not_terraform_is_refused() {
        let err = Terraform::find(Some(Path::new("/bin/true")))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not look like Terraform"), "{err}");
    }

    #[test]
    fn the_mirror_holds_the_provider_under_its_executable_name() {
        let dir = tempfile::tempdir().unwrap();
        let wd = Workdir::prepare(dir.path(), Path::new("/usr/bin/devmesh"), "0.1.0").unwrap();
        let exe = dir.path().join(format!(
            "mirror/registry.terraform.io/devmesh/devmesh/0.1.0/{}/terraform-provider-devmesh_v0.1.0",
            platform()
        ));
        assert_eq!(
            std::fs::read_link(&exe).unwrap(),
            Path::new("/usr/bin/devmesh")
        );
        // Preparing again (a retried build) replaces the link.
        Workdir::prepare(dir.path(), Path::new("/usr/local/bin/devmesh"), "0.1.0").unwrap();
        assert_eq!(
            std::fs::read_link(&exe).unwrap(),
            Path::new("/usr/local/bin/devmesh")
        );
        let rc = std::fs::read_to_string(wd.cli_config()).unwrap();
        assert!(
            rc.contains("filesystem_mirror") && rc.contains("exclude"),
            "{rc}"
        );
        assert!(wd.template().is_dir());
    }
}
