//! `devmesh agent`'s settings: flags and environment over an optional TOML
//! file, resolved and checked into an [`AgentConfig`] before the agent
//! contacts anything, like the primary's and the edges'.

use std::path::PathBuf;

use devmesh_net::config::{ConfigError, read_toml, validate_url};
use devmesh_shared::secret::Secret;
use serde::Deserialize;

/// Command-line and environment settings of `devmesh agent`.
#[derive(Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// TOML file with any of the settings below (kebab-case keys); flags
    /// and environment win over it.
    #[arg(long, env = "DEVMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// URL of the primary (`https://devmesh.example.com`).
    #[arg(long, env = "DEVMESH_URL")]
    pub url: Option<String>,
    /// The agent token the workspace build returned.
    #[arg(long, env = "DEVMESH_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra PEM bundle trusted for the primary's HTTPS API, on top of the
    /// system roots.
    #[arg(long, env = "DEVMESH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Prefer this region's relays to the nearest whenever they answer
    /// (failing over to the nearest other when they do not), for
    /// workspaces that should stay in one region.
    #[arg(long, env = "DEVMESH_RELAY_REGION")]
    pub relay_region: Option<String>,
    /// How long a terminal whose client went away waits for it to
    /// reconnect before it is ended, in seconds [default: 300].
    #[arg(long, env = "DEVMESH_TERMINAL_GRACE_SECS")]
    pub terminal_grace_secs: Option<u64>,
}

// Written by hand so the token never reaches a log through `{:?}`.
impl std::fmt::Debug for AgentArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentArgs")
            .field("config", &self.config)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| Secret::new("")))
            .field("ca_cert", &self.ca_cert)
            .field("relay_region", &self.relay_region)
            .field("terminal_grace_secs", &self.terminal_grace_secs)
            .finish()
    }
}

/// The same settings as a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
    relay_region: Option<String>,
    terminal_grace_secs: Option<u64>,
}

/// Checked settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The primary's URL, without a trailing slash.
    pub url: String,
    /// The agent token.
    pub token: Secret,
    /// Extra trust roots for the primary's HTTPS, a file holding at least
    /// one PEM certificate.
    pub ca_cert: Option<PathBuf>,
    /// The region whose relays the agent prefers.
    pub relay_region: Option<String>,
    /// How long a disconnected terminal waits for its client.
    pub terminal_grace: std::time::Duration,
}

impl AgentArgs {
    /// Merges flags, file and defaults, and checks the result.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let file: FileConfig = match &self.config {
            Some(path) => read_toml(path)?,
            None => FileConfig::default(),
        };
        let url = self
            .url
            .or(file.url)
            .ok_or_else(|| ConfigError("--url (or DEVMESH_URL) is required".into()))?;
        let url = validate_url("--url", &url)?;
        let token = self
            .token
            .or(file.token)
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| ConfigError("--token (or DEVMESH_AGENT_TOKEN) is required".into()))?;
        let ca_cert = self.ca_cert.or(file.ca_cert);
        if let Some(path) = &ca_cert {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("--ca-cert {}: {e}", path.display())))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(ConfigError(format!(
                    "--ca-cert {}: no PEM certificate in it",
                    path.display()
                )));
            }
        }
        let relay_region = self.relay_region.or(file.relay_region);
        if let Some(region) = &relay_region {
            devmesh_shared::names::validate_name(region)
                .map_err(|e| ConfigError(format!("--relay-region {region:?}: {e}")))?;
        }
        let grace = self
            .terminal_grace_secs
            .or(file.terminal_grace_secs)
            .unwrap_or(300);
        if !(1..=86_400).contains(&grace) {
            return Err(ConfigError(format!(
                "--terminal-grace-secs {grace}: give 1 to 86400 seconds"
            )));
        }
        Ok(AgentConfig {
            url,
            token: Secret::new(token),
            ca_cert,
            relay_region,
            terminal_grace: std::time::Duration::from_secs(grace),
        })
    }
}
