//! `devmesh server` configuration: flags with `DEVMESH_*` environment twins,
//! an optional TOML file under them, and a `validate()` step that runs before
//! anything binds. Precedence: flag or environment, then file, then default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use devmesh_net::runtime::LogFormat;
use devmesh_net::tls::{TlsArgs, TlsMode};
use devmesh_shared::secret::Secret;
use serde::Deserialize;

pub use devmesh_net::config::ConfigError;
use devmesh_net::config::{validate_url, validate_wildcard};

/// Flags of `devmesh server`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// TOML file with any of the settings below (kebab-case keys).
    #[arg(long, env = "DEVMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the HTTP API listens on [default: 127.0.0.1:3000].
    #[arg(long, env = "DEVMESH_HTTP_ADDRESS")]
    pub http_address: Option<String>,
    /// URL users and agents reach this server at [default: http://<http-address>].
    #[arg(long, env = "DEVMESH_ACCESS_URL")]
    pub access_url: Option<String>,
    /// Wildcard hostname for apps and dev URLs, like `*.apps.example.com`
    /// [default on a loopback access URL: *.apps.localhost].
    #[arg(long, env = "DEVMESH_WILDCARD_ACCESS_URL")]
    pub wildcard_access_url: Option<String>,
    /// Where devmesh keeps its state, including the embedded database
    /// [default: $XDG_DATA_HOME/devmesh, or /var/lib/devmesh as root].
    #[arg(long, env = "DEVMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// External PostgreSQL (13+) URL; without it devmesh runs an embedded one.
    #[arg(long, env = "DEVMESH_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// The key that encrypts devmesh's signing, CA and sealing keys in the
    /// database; created on first start. Every primary replica needs the
    /// same file; back it up [default: <data-dir>/secrets.key].
    #[arg(long, env = "DEVMESH_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "DEVMESH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// UDP address of the relay agents attach to over QUIC [default: 127.0.0.1:3001].
    #[arg(long, env = "DEVMESH_RELAY_ADDRESS")]
    pub relay_address: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub tls: TlsArgs,
    /// Serve apps declared with "subdomain": false under /@user/workspace.agent/apps/slug/
    /// on the dashboard's origin (owner-only). Off by default: such apps share the
    /// dashboard's origin.
    #[arg(long, env = "DEVMESH_ENABLE_PATH_APPS")]
    pub enable_path_apps: bool,
    /// HTTP connections, and QUIC connections to the relay, one client IP
    /// may hold open at once; 0 for no limit (behind a proxy that hides
    /// client addresses) [default: 1024].
    #[arg(long, env = "DEVMESH_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// The Terraform (or OpenTofu) binary that runs workspace builds
    /// [default: terraform, then tofu, on PATH].
    #[arg(long, env = "DEVMESH_TERRAFORM_PATH")]
    pub terraform_path: Option<PathBuf>,
    /// Provisioner daemons this server runs for Terraform builds; 0 leaves
    /// them to external daemons [default: 2].
    #[arg(long, env = "DEVMESH_PROVISIONER_DAEMONS")]
    pub provisioner_daemons: Option<usize>,
    /// Seconds a running build's daemon may go silent before the build
    /// fails, saying its daemon stopped responding [default: 60].
    #[arg(long, env = "DEVMESH_PROVISIONER_TIMEOUT")]
    pub provisioner_timeout: Option<u64>,
    /// Seconds a build or import may run before its daemon interrupts
    /// Terraform and fails it (a hung provider, a stuck script)
    /// [default: 3600].
    #[arg(long, env = "DEVMESH_PROVISIONER_JOB_TIMEOUT")]
    pub provisioner_job_timeout: Option<u64>,
}

/// The same settings as a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    http_address: Option<String>,
    access_url: Option<String>,
    wildcard_access_url: Option<String>,
    data_dir: Option<PathBuf>,
    postgres_url: Option<String>,
    secrets_key_file: Option<PathBuf>,
    log_format: Option<String>,
    relay_address: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_self_signed: Option<bool>,
    tls_dir: Option<PathBuf>,
    enable_path_apps: Option<bool>,
    max_connections_per_ip: Option<usize>,
    terraform_path: Option<PathBuf>,
    provisioner_daemons: Option<usize>,
    provisioner_timeout: Option<u64>,
    provisioner_job_timeout: Option<u64>,
}

/// Validated configuration of a primary.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the API listens (port 0 picks a free one).
    pub http_address: SocketAddr,
    /// How users reach it, without a trailing slash.
    pub access_url: String,
    /// `*.apps.example.com`, if apps get subdomains.
    pub wildcard_access_url: Option<String>,
    /// The state directory, absolute: the embedded database and, unless
    /// set elsewhere, the secrets key and the self-signed TLS files.
    pub data_dir: PathBuf,
    /// External database, or `None` for the embedded one.
    pub postgres_url: Option<Secret>,
    /// The secrets key (absolute path) that encrypts the signing, CA and
    /// sealing keys stored in the database; created on first start.
    pub secrets_key_file: PathBuf,
    /// Text or JSON lines on stderr (`--log-format`).
    pub log_format: LogFormat,
    /// Where the relay binds (UDP).
    pub relay_address: SocketAddr,
    /// How HTTPS is served, if at all.
    pub tls: TlsMode,
    /// Whether path-based apps are served.
    pub enable_path_apps: bool,
    /// An explicit Terraform binary (`None`: search `PATH`).
    pub terraform_path: Option<PathBuf>,
    /// Built-in provisioner daemons.
    pub provisioner_daemons: usize,
    /// How long a running job's daemon may go without a heartbeat.
    pub provisioner_timeout: std::time::Duration,
    /// How long a job may run before its daemon interrupts it.
    pub provisioner_job_timeout: std::time::Duration,
    /// Connection caps and timeouts of the HTTP listener.
    pub http_limits: devmesh_net::http::Limits,
}

impl ServerArgs {
    /// Merges flags, file and defaults, and validates the result.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let http_address = self
            .http_address
            .or(file.http_address)
            .unwrap_or_else(|| "127.0.0.1:3000".into());
        let http_address: SocketAddr = http_address.parse().map_err(|_| {
            ConfigError(format!(
                "--http-address {http_address:?} is not an address like 127.0.0.1:3000"
            ))
        })?;
        let data_dir = match self.data_dir.or(file.data_dir) {
            Some(d) if d.as_os_str().is_empty() => {
                return Err(ConfigError("--data-dir must not be empty".into()));
            }
            Some(d) => absolute(&d)?,
            None => devmesh_net::config::default_data_dir("--data-dir")?,
        };
        let file_tls = TlsArgs {
            tls_cert: file.tls_cert,
            tls_key: file.tls_key,
            tls_self_signed: file.tls_self_signed == Some(true),
            tls_dir: file.tls_dir,
        };
        let tls = self.tls.resolve(file_tls, || Ok(data_dir.join("tls")))?;
        let scheme = tls.scheme();
        let access_url = match self.access_url.or(file.access_url) {
            Some(u) => validate_url("--access-url", &u)?,
            None => format!("{scheme}://{http_address}"),
        };
        let wildcard_access_url = self
            .wildcard_access_url
            .or(file.wildcard_access_url)
            .map(|w| validate_wildcard("--wildcard-access-url", &w))
            .transpose()?;
        // On a loopback trial, apps work out of the box: browsers resolve
        // every *.localhost name to the loopback address.
        let wildcard_access_url = wildcard_access_url.or_else(|| {
            let host = access_url.split("://").nth(1)?.split(['/', ':']).next()?;
            matches!(host, "127.0.0.1" | "localhost" | "[::1]")
                .then(|| "*.apps.localhost".to_owned())
        });
        let postgres_url = self
            .postgres_url
            .or(file.postgres_url)
            .filter(|u| !u.is_empty());
        if let Some(url) = &postgres_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError(
                "--postgres-url must start with postgres:// or postgresql://".into(),
            ));
        }
        let log_format = self
            .log_format
            .or(file.log_format)
            .map(|f| f.parse().map_err(ConfigError))
            .transpose()?
            .unwrap_or_default();
        let relay_address = self
            .relay_address
            .or(file.relay_address)
            .unwrap_or_else(|| "127.0.0.1:3001".into());
        let relay_address: SocketAddr = relay_address.parse().map_err(|_| {
            ConfigError(format!(
                "--relay-address {relay_address:?} is not an address like 127.0.0.1:3001"
            ))
        })?;
        let secrets_key_file = match self.secrets_key_file.or(file.secrets_key_file) {
            Some(p) if !p.as_os_str().is_empty() => absolute(&p)?,
            _ => data_dir.join("secrets.key"),
        };
        let provisioner_timeout = match self.provisioner_timeout.or(file.provisioner_timeout) {
            Some(s) if !(3..=3600).contains(&s) => {
                return Err(ConfigError(
                    "--provisioner-timeout must be between 3 and 3600 seconds".into(),
                ));
            }
            Some(s) => std::time::Duration::from_secs(s),
            None => crate::jobs::HEARTBEAT_TIMEOUT,
        };
        let provisioner_job_timeout = match self
            .provisioner_job_timeout
            .or(file.provisioner_job_timeout)
        {
            Some(s) if !(3..=7 * 24 * 3600).contains(&s) => {
                return Err(ConfigError(
                    "--provisioner-job-timeout must be between 3 seconds and 7 days".into(),
                ));
            }
            Some(s) => std::time::Duration::from_secs(s),
            None => crate::jobs::JOB_TIMEOUT,
        };
        let mut http_limits = devmesh_net::http::Limits::default();
        if let Some(n) = self.max_connections_per_ip.or(file.max_connections_per_ip) {
            http_limits.max_connections_per_ip = n;
        }
        Ok(ServerConfig {
            terraform_path: self.terraform_path.or(file.terraform_path),
            provisioner_daemons: self
                .provisioner_daemons
                .or(file.provisioner_daemons)
                .unwrap_or(2),
            provisioner_timeout,
            provisioner_job_timeout,
            http_limits,
            enable_path_apps: self.enable_path_apps || file.enable_path_apps == Some(true),
            tls,
            relay_address,
            http_address,
            access_url,
            wildcard_access_url,
            data_dir,
            postgres_url: postgres_url.map(Secret::new),
            secrets_key_file,
            log_format,
        })
    }
}

impl ServerConfig {
    /// A configuration for tests and embedding: loopback on a free port,
    /// the given database.
    pub fn for_tests(postgres_url: Secret, data_dir: PathBuf) -> Self {
        Self {
            http_address: "127.0.0.1:0".parse().expect("valid address"),
            access_url: "http://127.0.0.1".into(),
            wildcard_access_url: None,
            secrets_key_file: data_dir.join("devmesh-tests-secrets.key"),
            data_dir,
            postgres_url: Some(postgres_url),
            log_format: LogFormat::Text,
            relay_address: "127.0.0.1:0".parse().expect("valid address"),
            tls: TlsMode::Off,
            enable_path_apps: false,
            http_limits: devmesh_net::http::Limits::default(),
            terraform_path: None,
            // Tests drive the job queue themselves.
            provisioner_daemons: 0,
            provisioner_timeout: crate::jobs::HEARTBEAT_TIMEOUT,
            provisioner_job_timeout: crate::jobs::JOB_TIMEOUT,
        }
    }

    /// Whether cookies must carry `Secure`.
    pub fn secure_cookies(&self) -> bool {
        self.access_url.starts_with("https://")
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    devmesh_net::config::read_toml(path)
}

fn absolute(p: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(p).map_err(|e| ConfigError(format!("--data-dir {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServerArgs {
        ServerArgs {
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_loopback() {
        let c = args().resolve().unwrap();
        assert_eq!(c.http_address.to_string(), "127.0.0.1:3000");
        assert_eq!(c.access_url, "http://127.0.0.1:3000");
        assert!(c.postgres_url.is_none());
        assert_eq!(
            c.wildcard_access_url.as_deref(),
            Some("*.apps.localhost"),
            "apps work on a loopback trial"
        );
        assert!(!c.secure_cookies());
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let cases = [
            (
                ServerArgs {
                    http_address: Some("nope".into()),
                    ..args()
                },
                "--http-address",
            ),
            (
                ServerArgs {
                    access_url: Some("ftp://x".into()),
                    ..args()
                },
                "--access-url",
            ),
            (
                ServerArgs {
                    wildcard_access_url: Some("apps.example.com".into()),
                    ..args()
                },
                "--wildcard-access-url",
            ),
            (
                ServerArgs {
                    wildcard_access_url: Some("*.a..b".into()),
                    ..args()
                },
                "--wildcard-access-url",
            ),
            (
                ServerArgs {
                    postgres_url: Some("mysql://x".into()),
                    ..args()
                },
                "--postgres-url",
            ),
            (
                ServerArgs {
                    log_format: Some("xml".into()),
                    ..args()
                },
                "log format",
            ),
        ];
        for (a, needle) in cases {
            let err = a.resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn file_settings_apply_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "http-address = \"127.0.0.1:4000\"\naccess-url = \"https://dev.example.com/\"\n",
        )
        .unwrap();
        let c = ServerArgs {
            config: Some(path.clone()),
            ..args()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.http_address.port(), 4000);
        assert_eq!(c.access_url, "https://dev.example.com");
        assert!(c.secure_cookies());
        let c = ServerArgs {
            config: Some(path.clone()),
            http_address: Some("127.0.0.1:5000".into()),
            ..args()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.http_address.port(), 5000);
        std::fs::write(&path, "http-adress = \"x\"\n").unwrap();
        let err = ServerArgs {
            config: Some(path),
            ..args()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
