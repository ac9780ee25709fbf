//! `devmesh edge` configuration, like the primary's: flags with
//! `DEVMESH_*` environment twins, an optional TOML file under them
//! (`--config`, kebab-case keys), resolved and checked into an
//! [`EdgeConfig`] before anything binds. Precedence: flag or environment,
//! then file, then default.

use std::net::SocketAddr;
use std::path::PathBuf;

use devmesh_net::config::{ConfigError, read_toml, validate_url, validate_wildcard};
use devmesh_net::tls::{TlsArgs, TlsMode};
use devmesh_shared::secret::Secret;
use serde::Deserialize;

/// Flags of `devmesh edge`.
#[derive(Clone, Default, clap::Args)]
pub struct EdgeArgs {
    /// TOML file with any of the settings below (kebab-case keys).
    #[arg(long, env = "DEVMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The primary's URL.
    #[arg(long, env = "DEVMESH_PRIMARY_URL")]
    pub primary_url: Option<String>,
    /// This region's edge token (`<edge-id>:<secret>`, from `devmesh edges create`).
    #[arg(long, env = "DEVMESH_EDGE_TOKEN", hide_env_values = true)]
    pub edge_token: Option<String>,
    /// The region's base URL as users reach it (as its owner set it).
    #[arg(long, env = "DEVMESH_ACCESS_URL")]
    pub access_url: Option<String>,
    /// The region's app wildcard, like `*.eu.apps.example.com`.
    #[arg(long, env = "DEVMESH_WILDCARD_ACCESS_URL")]
    pub wildcard_access_url: Option<String>,
    /// A global app wildcard every edge serves behind GeoDNS, like `*.apps.example.com`.
    #[arg(long, env = "DEVMESH_GLOBAL_WILDCARD_ACCESS_URL")]
    pub global_wildcard_access_url: Option<String>,
    /// UDP address of this edge's relay, as agents should dial it
    /// [default: 127.0.0.1:4001].
    #[arg(long, env = "DEVMESH_RELAY_ADDRESS")]
    pub relay_address: Option<String>,
    /// Where the relay binds, when agents and other relays reach it through
    /// a different address (a NAT, a UDP load balancer) [default: --relay-address].
    #[arg(long, env = "DEVMESH_RELAY_BIND")]
    pub relay_bind: Option<String>,
    /// Where the edge's HTTP endpoints listen [default: 127.0.0.1:4000].
    #[arg(long, env = "DEVMESH_LISTEN")]
    pub listen: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub tls: TlsArgs,
    /// Extra PEM CA bundle to trust for the primary's HTTPS.
    #[arg(long, env = "DEVMESH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Access checks one client IP may make the edge ask the primary a
    /// minute (a browser needs one per app it opens, a script one per key;
    /// a scanner trying made-up hosts or keys is cut off); 0 for no limit
    /// [default: 120].
    #[arg(long, env = "DEVMESH_ACCESS_CHECKS_PER_MINUTE")]
    pub access_checks_per_minute: Option<u32>,
    /// HTTP connections, and QUIC connections to the relay, one client IP
    /// may hold open at once; 0 for no limit [default: 1024].
    #[arg(long, env = "DEVMESH_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
}

impl std::fmt::Debug for EdgeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeArgs")
            .field("primary_url", &self.primary_url)
            .field("edge_token", &"****")
            .field("access_url", &self.access_url)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The same settings as a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    primary_url: Option<String>,
    edge_token: Option<String>,
    access_url: Option<String>,
    wildcard_access_url: Option<String>,
    global_wildcard_access_url: Option<String>,
    relay_address: Option<String>,
    relay_bind: Option<String>,
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_self_signed: Option<bool>,
    tls_dir: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    access_checks_per_minute: Option<u32>,
    max_connections_per_ip: Option<usize>,
}

/// A checked edge configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The primary's URL, without a trailing slash.
    pub primary_url: String,
    /// `<edge-id>:<secret>`, its shape checked here; the primary checks
    /// the secret on every call.
    pub edge_token: Secret,
    /// The region's base URL, without a trailing slash.
    pub access_url: String,
    /// The regional app wildcard, lower-cased.
    pub wildcard_access_url: Option<String>,
    /// The global app wildcard, lower-cased.
    pub global_wildcard_access_url: Option<String>,
    /// The relay's advertised address (`host:port`; port 0 picks one).
    pub relay_address: String,
    /// Where the relay binds, if not at its advertised address.
    pub relay_bind: Option<SocketAddr>,
    /// Where HTTP listens.
    pub listen: SocketAddr,
    /// Whether the listener serves plain HTTP, the operator's certificate
    /// or a self-signed one.
    pub tls: TlsMode,
    /// Extra CA to trust for the primary.
    pub ca_cert: Option<PathBuf>,
    /// Access checks per client IP a minute (`u32::MAX`: unlimited).
    pub access_checks_per_minute: u32,
    /// Connections per client IP (0: unlimited).
    pub max_connections_per_ip: usize,
}

impl EdgeConfig {
    /// The regional and global wildcards.
    pub fn wildcards(&self) -> Vec<String> {
        [&self.wildcard_access_url, &self.global_wildcard_access_url]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

impl EdgeArgs {
    /// Merges flags over the file over defaults and checks every value.
    pub fn resolve(self) -> Result<EdgeConfig, ConfigError> {
        let file: FileConfig = match &self.config {
            Some(path) => read_toml(path)?,
            None => FileConfig::default(),
        };
        let required = |v: Option<String>, flag: &str| {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| ConfigError(format!("{flag} is required")))
        };
        let primary_url = validate_url(
            "--primary-url",
            &required(self.primary_url.or(file.primary_url), "--primary-url")?,
        )?;
        let edge_token = required(self.edge_token.or(file.edge_token), "--edge-token")?;
        if devmesh_shared::token::parse_id_token(edge_token.trim()).is_none() {
            return Err(ConfigError(
                "--edge-token is not an edge token (`<edge-id>:<secret>`, from `devmesh edges create`)"
                    .into(),
            ));
        }
        let access_url = validate_url(
            "--access-url",
            &required(self.access_url.or(file.access_url), "--access-url")?,
        )?;
        let wildcard = |flag: &str, w: Option<String>| {
            w.filter(|w| !w.is_empty())
                .map(|w| validate_wildcard(flag, &w))
                .transpose()
        };
        let wildcard_access_url = wildcard(
            "--wildcard-access-url",
            self.wildcard_access_url.or(file.wildcard_access_url),
        )?;
        let global_wildcard_access_url = wildcard(
            "--global-wildcard-access-url",
            self.global_wildcard_access_url
                .or(file.global_wildcard_access_url),
        )?;
        let relay_address = self
            .relay_address
            .or(file.relay_address)
            .unwrap_or_else(|| "127.0.0.1:4001".into());
        if !relay_address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(ConfigError(format!(
                "--relay-address {relay_address:?} must be host:port"
            )));
        }
        let address = |flag: &str, v: String| {
            v.parse::<SocketAddr>().map_err(|_| {
                ConfigError(format!(
                    "{flag} {v:?} is not an address like 127.0.0.1:4000"
                ))
            })
        };
        let relay_bind = self
            .relay_bind
            .or(file.relay_bind)
            .map(|b| address("--relay-bind", b))
            .transpose()?;
        let listen = address(
            "--listen",
            self.listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:4000".into()),
        )?;
        let file_tls = TlsArgs {
            tls_cert: file.tls_cert,
            tls_key: file.tls_key,
            tls_self_signed: file.tls_self_signed == Some(true),
            tls_dir: file.tls_dir,
        };
        // By default the primary's CA on this machine, so one CA covers both.
        let tls = self.tls.resolve(file_tls, || {
            Ok(devmesh_net::config::default_data_dir("--tls-dir")?.join("tls"))
        })?;
        let access_checks_per_minute = match self
            .access_checks_per_minute
            .or(file.access_checks_per_minute)
            .unwrap_or(120)
        {
            0 => u32::MAX,
            n => n,
        };
        Ok(EdgeConfig {
            primary_url,
            edge_token: Secret::new(edge_token.trim().to_owned()),
            access_url,
            wildcard_access_url,
            global_wildcard_access_url,
            relay_address,
            relay_bind,
            listen,
            tls,
            ca_cert: self.ca_cert.or(file.ca_cert),
            access_checks_per_minute,
            max_connections_per_ip: self
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(1024),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0a1b2c3d-0000-4000-8000-000000000000:abcdefghijklmnopqrstuvwxyz012345";

    fn args() -> EdgeArgs {
        EdgeArgs {
            primary_url: Some("https://devmesh.example.com/".into()),
            edge_token: Some(TOKEN.into()),
            access_url: Some("https://eu.example.com".into()),
            wildcard_access_url: Some("*.EU.apps.example.com".into()),
            ..Default::default()
        }
    }

    #[test]
    fn flags_are_checked_and_defaults_filled_in() {
        let c = args().resolve().unwrap();
        assert_eq!(c.primary_url, "https://devmesh.example.com");
        assert_eq!(c.wildcards(), ["*.eu.apps.example.com"]);
        assert_eq!(c.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(c.relay_address, "127.0.0.1:4001");
        assert_eq!(c.tls, TlsMode::Off);
        assert_eq!(c.access_checks_per_minute, 120);
        for (broken, needle) in [
            (
                EdgeArgs {
                    primary_url: None,
                    ..args()
                },
                "--primary-url is required",
            ),
            (
                EdgeArgs {
                    edge_token: Some("x".into()),
                    ..args()
                },
                "--edge-token",
            ),
            (
                EdgeArgs {
                    access_url: Some("eu.example.com".into()),
                    ..args()
                },
                "--access-url",
            ),
            (
                EdgeArgs {
                    wildcard_access_url: Some("eu.example.com".into()),
                    ..args()
                },
                "--wildcard-access-url",
            ),
            (
                EdgeArgs {
                    relay_address: Some("nowhere".into()),
                    ..args()
                },
                "--relay-address",
            ),
            (
                EdgeArgs {
                    listen: Some("4000".into()),
                    ..args()
                },
                "--listen",
            ),
            (
                EdgeArgs {
                    tls: TlsArgs {
                        tls_cert: Some("c.pem".into()),
                        ..Default::default()
                    },
                    ..args()
                },
                "go together",
            ),
        ] {
            let err = broken.resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn a_file_fills_what_flags_leave_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(
            &path,
            format!(
                "primary-url = \"https://p.example.com\"\nedge-token = \"{TOKEN}\"\n\
                 access-url = \"https://ap.example.com\"\nlisten = \"127.0.0.1:5000\"\n\
                 tls-self-signed = true\naccess-checks-per-minute = 0\n"
            ),
        )
        .unwrap();
        let c = EdgeArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:6000".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.primary_url, "https://p.example.com");
        assert_eq!(c.listen, "127.0.0.1:6000".parse().unwrap(), "a flag wins");
        assert!(
            matches!(&c.tls, TlsMode::SelfSigned { dir } if dir.ends_with("devmesh/tls")),
            "{:?}",
            c.tls
        );
        assert_eq!(c.access_checks_per_minute, u32::MAX);
        std::fs::write(&path, "primary-urll = \"x\"\n").unwrap();
        let err = EdgeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("primary-urll"), "{err}");
    }
}
