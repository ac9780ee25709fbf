//! `devmesh provisioner start`: an external provisioner daemon, talking to
//! the primary's API only; `provisioner list` and `provisioner keys`: the
//! owners' view of daemons and the keys they authenticate with.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use devmesh_provisioner::daemon::{Coordinator, Runner};
use devmesh_shared::provisionerd::{
    AppendLogsRequest, Beat, CompleteResponse, Completion, CreateProvisionerKeyRequest,
    CreateProvisionerKeyResponse, HeartbeatResponse, JobSpec, LogLine, ProvisionerDaemonsResponse,
    ProvisionerKeysResponse, RegisterDaemonRequest, RegisterDaemonResponse, Tags, parse_tag,
    show_tags,
};
use parking_lot::Mutex;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Global;
use crate::client::{ApiFailure, Client};
use crate::output::{Format, json, table};

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum ProvisionerCommand {
    /// Run an external provisioner daemon: it runs Terraform for the jobs
    /// whose tags its own cover, talking to the primary's API only.
    Start(StartArgs),
    /// List provisioner daemons: tags, version, last heartbeat (owners).
    List,
    /// Manage the keys external daemons authenticate with (owners).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StartArgs {
    /// The provisioner key (`devmesh provisioner keys create`); prefer the
    /// environment variable, which `ps` does not show.
    #[arg(long, env = "DEVMESH_PROVISIONER_KEY", hide_env_values = true)]
    key: String,
    /// A tag this daemon serves, as KEY=VALUE (repeatable); a key created
    /// with tags decides them instead.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// The daemon's name (defaults to the host name).
    #[arg(long)]
    name: Option<String>,
    /// The Terraform (or OpenTofu) binary (defaults to the one on PATH).
    #[arg(long, env = "DEVMESH_TERRAFORM_PATH")]
    terraform_path: Option<PathBuf>,
    /// Where runs get their scratch directories.
    #[arg(long, env = "DEVMESH_PROVISIONER_WORK_DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; its secret is shown once.
    Create {
        /// Key name.
        name: String,
        /// A tag every daemon using the key serves, as KEY=VALUE
        /// (repeatable; none: daemons declare their own).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// List keys.
    List,
    /// Delete a key: its daemons stop, their running jobs fail.
    Delete {
        /// Key name.
        name: String,
    },
}

pub(crate) async fn run(g: &Global, cmd: ProvisionerCommand) -> anyhow::Result<()> {
    match cmd {
        ProvisionerCommand::Start(args) => start(g, args).await,
        ProvisionerCommand::List => list(g).await,
        ProvisionerCommand::Keys(KeysCommand::Create { name, tags }) => {
            let created: CreateProvisionerKeyResponse = g
                .client()?
                .post(
                    "/provisioner-keys",
                    &CreateProvisionerKeyRequest {
                        name,
                        tags: tags.into_iter().collect(),
                    },
                )
                .await?;
            match g.output {
                Format::Json => json(&created)?,
                Format::Table => {
                    println!(
                        "Created provisioner key {} (tags: {}).",
                        created.key.name,
                        show_tags(&created.key.tags)
                    );
                    println!("Key (shown once): {}", created.secret);
                    println!(
                        "Start a daemon with the key in its environment (not on its command line, where ps shows it):"
                    );
                    println!(
                        "  DEVMESH_PROVISIONER_KEY='<key>' devmesh provisioner start --url {}",
                        g.client()?.base()
                    );
                }
            }
            Ok(())
        }
        ProvisionerCommand::Keys(KeysCommand::List) => {
            let keys: ProvisionerKeysResponse = g.client()?.get("/provisioner-keys").await?;
            match g.output {
                Format::Json => json(&keys.keys),
                Format::Table => {
                    table(
                        &["NAME", "TAGS", "CREATED"],
                        keys.keys
                            .iter()
                            .map(|k| {
                                vec![
                                    k.name.clone(),
                                    show_tags(&k.tags),
                                    k.created_at.format("%Y-%m-%d %H:%M").to_string(),
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
        ProvisionerCommand::Keys(KeysCommand::Delete { name }) => {
            g.client()?
                .delete(&format!("/provisioner-keys/{name}"))
                .await?;
            println!("Deleted provisioner key {name}.");
            Ok(())
        }
    }
}

async fn list(g: &Global) -> anyhow::Result<()> {
    let daemons: ProvisionerDaemonsResponse = g.client()?.get("/provisioner-daemons").await?;
    match g.output {
        Format::Json => json(&daemons.daemons),
        Format::Table => {
            let now = chrono::Utc::now();
            table(
                &[
                    "NAME",
                    "KIND",
                    "TAGS",
                    "VERSION",
                    "STATUS",
                    "LAST SEEN",
                    "JOB",
                ],
                daemons
                    .daemons
                    .iter()
                    .map(|d| {
                        let ago = (now - d.last_seen_at).num_seconds().max(0);
                        vec![
                            d.name.clone(),
                            match &d.key_name {
                                _ if d.built_in => "built-in".to_owned(),
                                Some(k) => format!("external (key {k})"),
                                None => "external".to_owned(),
                            },
                            show_tags(&d.tags),
                            d.version.clone(),
                            if d.connected {
                                if d.current_job.is_some() {
                                    "busy"
                                } else {
                                    "idle"
                                }
                            } else {
                                "offline"
                            }
                            .to_owned(),
                            format!("{ago}s ago"),
                            d.current_job.map(|j| j.to_string()).unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
    }
}

/// The primary's `/api/v2/provisionerd`, as an external daemon's
/// coordinator.
struct Remote {
    client: Client,
    registration: RegisterDaemonRequest,
    /// This daemon's id (a new one after the primary forgets it).
    daemon: Mutex<Uuid>,
    /// Cancelled when the primary refuses the key: the daemon stops.
    refused: CancellationToken,
}

impl Remote {
    async fn register(&self) -> anyhow::Result<RegisterDaemonResponse> {
        let r: RegisterDaemonResponse = self
            .client
            .post("/provisionerd/register", &self.registration)
            .await
            .map_err(|e| self.check(e))?;
        *self.daemon.lock() = r.id;
        Ok(r)
    }

    fn path(&self, rest: &str) -> String {
        let id = *self.daemon.lock();
        format!("/provisionerd/daemons/{id}{rest}")
    }

    /// Passes `e` on, stopping the daemon when the key was refused.
    fn check(&self, e: anyhow::Error) -> anyhow::Error {
        if status_of(&e) == Some(StatusCode::UNAUTHORIZED) {
            self.refused.cancel();
        }
        e
    }
}

fn status_of(e: &anyhow::Error) -> Option<StatusCode> {
    e.downcast_ref::<ApiFailure>().map(|f| f.status)
}

impl Coordinator for Remote {
    async fn acquire(&self) -> anyhow::Result<Option<JobSpec>> {
        match self
            .client
            .post_maybe::<_, JobSpec>(&self.path("/acquire"), &serde_json::json!({}))
            .await
        {
            Ok(job) => Ok(job),
            // The primary forgot this daemon (its database was restored,
            // say): register again.
            Err(e) if status_of(&e) == Some(StatusCode::NOT_FOUND) => {
                let r = self.register().await?;
                tracing::info!(daemon.id = %r.id, "registered again with the primary");
                Ok(None)
            }
            Err(e) => Err(self.check(e)),
        }
    }

    async fn heartbeat(&self, job: Uuid) -> anyhow::Result<Beat> {
        let r: HeartbeatResponse = self
            .client
            .post(
                &self.path(&format!("/jobs/{job}/heartbeat")),
                &serde_json::json!({}),
            )
            .await
            .map_err(|e| self.check(e))?;
        Ok(r.beat)
    }

    async fn append_logs(&self, job: Uuid, lines: Vec<LogLine>) -> anyhow::Result<()> {
        self.client
            .post_unit(
                &self.path(&format!("/jobs/{job}/logs")),
                &AppendLogsRequest { lines },
            )
            .await
            .map_err(|e| self.check(e))
    }

    async fn save_state(&self, job: Uuid, state: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .put_bytes(&self.path(&format!("/jobs/{job}/state")), state)
            .await
            .map_err(|e| self.check(e))
    }

    async fn complete(&self, job: Uuid, completion: Completion) -> anyhow::Result<bool> {
        let r: CompleteResponse = self
            .client
            .post(&self.path(&format!("/jobs/{job}/complete")), &completion)
            .await
            .map_err(|e| self.check(e))?;
        Ok(r.recorded)
    }
}

async fn start(g: &Global, args: StartArgs) -> anyhow::Result<()> {
    devmesh_net::runtime::init_logging(devmesh_net::runtime::LogFormat::Text);
    let url = g
        .url
        .clone()
        .or_else(|| crate::session::load().ok().flatten().map(|s| s.url))
        .context("say which deployment to serve with --url (or DEVMESH_URL)")?;
    let client = Client::provisioner(&url, args.key, g.ca_cert.as_deref())?;
    let name = args.name.unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "provisioner".into())
    });
    let tags: Tags = args.tags.into_iter().collect();
    let remote = Arc::new(Remote {
        client,
        registration: RegisterDaemonRequest {
            name: name.clone(),
            tags,
            version: devmesh_shared::VERSION.to_owned(),
        },
        daemon: Mutex::new(Uuid::nil()),
        refused: CancellationToken::new(),
    });
    let registered = remote
        .register()
        .await
        .with_context(|| format!("cannot register with {url}"))?;
    let terraform = match devmesh_provisioner::terraform::Terraform::find(
        args.terraform_path.as_deref(),
    )
    .await
    {
        Ok(tf) => {
            tracing::info!(terraform.version = tf.version(), terraform.path = %tf.path().display(), "Terraform found");
            Some(tf)
        }
        Err(e) => {
            tracing::warn!("{e}; jobs will fail until it is installed");
            None
        }
    };
    // Runs hold Terraform states (agent tokens, provider secrets): their
    // directory is this user's alone. A directory the daemon made for
    // itself goes when it stops; one it was given stays (each run removes
    // its own subdirectory).
    let (work, owned) = match args.work_dir {
        Some(w) => (w, false),
        None => (
            std::env::temp_dir().join(format!("devmesh-provisioner-{}", registered.id)),
            true,
        ),
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work)
            .with_context(|| format!("creating {}", work.display()))?;
    }
    let runner = Arc::new(Runner {
        terraform,
        provider: std::env::current_exe().context("cannot find this binary (the provider)")?,
        work: work.clone(),
        heartbeat_every: std::time::Duration::from_millis(registered.heartbeat_every_ms.max(500)),
    });
    tracing::info!(daemon = %name, daemon.id = %registered.id, tags = %show_tags(&registered.tags), primary = %url, "provisioner daemon started");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let refused = remote.refused.clone();
    let signalled = super::server::shutdown_signal();
    tokio::spawn(async move {
        tokio::select! {
            () = signalled => {}
            () = refused.cancelled() => {}
        }
        stop.cancel();
    });
    devmesh_provisioner::daemon::serve(remote.clone(), runner, name, shutdown).await;
    if owned {
        let _ = std::fs::remove_dir_all(&work);
    }
    if remote.refused.is_cancelled() {
        anyhow::bail!(
            "the primary refused the provisioner key (deleted?); an owner creates a new one with `devmesh provisioner keys create`"
        );
    }
    tracing::info!("provisioner daemon stopped");
    Ok(())
}
