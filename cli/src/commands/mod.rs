//! One module per command group.

pub(crate) mod auth;
pub(crate) mod diag;
pub(crate) mod edges;
pub(crate) mod keys;
pub(crate) mod processes;
pub(crate) mod provisioner;
pub(crate) mod server;
pub(crate) mod ssh;
pub(crate) mod users;
pub(crate) mod workspaces;

use anyhow::Context;

use crate::client::Client;
use crate::output::Format;
use crate::session;

/// Flags every client command accepts.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Global {
    /// Deployment URL (overrides the stored session's).
    #[arg(long, global = true, env = "DEVMESH_URL")]
    pub(crate) url: Option<String>,
    /// Session token or API key (overrides the stored session's).
    #[arg(
        long,
        global = true,
        env = "DEVMESH_SESSION_TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
    /// Extra PEM CA bundle to trust for the deployment's HTTPS (on top of the system roots).
    #[arg(long, global = true, env = "DEVMESH_CA_CERT")]
    pub(crate) ca_cert: Option<std::path::PathBuf>,
    /// The region to go through (ssh, port-forward, app URLs): a region's
    /// name; by default the nearest healthy one.
    #[arg(long, global = true, env = "DEVMESH_REGION")]
    pub(crate) region: Option<String>,
    /// Output format of list commands.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t)]
    pub(crate) output: Format,
}

impl Global {
    /// A signed-in client, from flags or the stored session.
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let stored = session::load()?;
        let url = self
            .url
            .clone()
            .or_else(|| stored.as_ref().map(|s| s.url.clone()))
            .context("not signed in: run `devmesh login <url>` first")?;
        let token = self
            .token
            .clone()
            .or_else(|| stored.map(|s| s.token))
            .context("not signed in: run `devmesh login <url>` first")?;
        Client::new(&url, Some(token), self.ca_cert.as_deref())
    }
}
