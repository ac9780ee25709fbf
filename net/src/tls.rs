//! HTTPS for the primary and edges: PEM certificates (wildcards welcome),
//! reloaded when the files change, or a self-signed CA and certificate for
//! local trials. Both daemons take the same `--tls-*` flags ([`TlsArgs`]),
//! resolved into a [`TlsMode`] before anything binds and turned into a
//! rustls config by [`https`]. The accept loop that serves them is
//! [`crate::http`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// The `--tls-*` flags of every daemon that serves HTTPS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain to serve HTTPS with (wildcards welcome); reloaded when it changes.
    #[arg(long, env = "DEVMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DEVMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate from a private CA kept in --tls-dir,
    /// for the access URL's host and the wildcards (for trying devmesh out;
    /// use real certificates in production). Prints the CA's path for
    /// `curl --cacert`.
    #[arg(long, env = "DEVMESH_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,
    /// Where --tls-self-signed keeps its CA and certificate [default: the
    /// primary's `<data-dir>/tls`, so a primary and edges on one machine
    /// share one CA].
    #[arg(long, env = "DEVMESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
}

/// How a daemon serves HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP (behind a TLS-terminating proxy, or local use).
    Off,
    /// The operator's certificate and key, reloaded when they change.
    Files {
        /// The PEM certificate chain, leaf first (`--tls-cert`).
        cert: PathBuf,
        /// The PEM private key of the leaf (`--tls-key`).
        key: PathBuf,
    },
    /// A certificate from a private CA in `dir`.
    SelfSigned {
        /// The TLS directory (`--tls-dir`): `ca.pem`, the CA's key, and one
        /// certificate and key per set of names, created on first use.
        dir: PathBuf,
    },
}

impl TlsMode {
    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        match self {
            TlsMode::Off => "http",
            _ => "https",
        }
    }
}

impl TlsArgs {
    /// The flags over a settings file's `tls-*` keys (`file`), checked.
    /// `default_dir` is where a self-signed CA lives without --tls-dir.
    pub fn resolve(
        self,
        file: TlsArgs,
        default_dir: impl FnOnce() -> Result<PathBuf, ConfigError>,
    ) -> Result<TlsMode, ConfigError> {
        let self_signed = self.tls_self_signed || file.tls_self_signed;
        match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
        ) {
            (Some(_), Some(_)) if self_signed => Err(ConfigError(
                "--tls-self-signed and --tls-cert exclude each other".into(),
            )),
            (Some(cert), Some(key)) => Ok(TlsMode::Files { cert, key }),
            (None, None) if self_signed => Ok(TlsMode::SelfSigned {
                dir: match self.tls_dir.or(file.tls_dir) {
                    Some(dir) => dir,
                    None => default_dir()?,
                },
            }),
            (None, None) => Ok(TlsMode::Off),
            _ => Err(ConfigError("--tls-cert and --tls-key go together".into())),
        }
    }
}

/// The rustls config `mode` asks for, if any. A self-signed certificate
/// names `access_url`'s host, `localhost`, `127.0.0.1` and each wildcard
/// (`*.apps.example.com`, a port after it ignored); where its CA is, is
/// logged for `curl --cacert`.
pub fn https(
    mode: &TlsMode,
    access_url: &str,
    wildcards: &[String],
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (cert, key) = match mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Files { cert, key } => (cert.clone(), key.clone()),
        TlsMode::SelfSigned { dir } => {
            let mut names = Vec::new();
            if let Some(host) = reqwest::Url::parse(access_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
            {
                names.push(host);
            }
            names.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
            names.extend(
                wildcards
                    .iter()
                    .map(|w| w.split(':').next().unwrap_or(w).to_owned()),
            );
            let mut seen = std::collections::HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
            let (ca, cert, key) = self_signed(dir, &names)?;
            tracing::info!(ca = %ca.display(), "serving HTTPS with a self-signed certificate; trust it with: curl --cacert {}", ca.display());
            (cert, key)
        }
    };
    server_config(cert, key, shutdown).map(Some)
}

/// How often certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Serves the current certificate; swapped in place on reload.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One certificate carries every name (access host and wildcards), so
        // any SNI gets it; clients check the name themselves.
        Some(self.current.read().clone())
    }
}

/// Loads a PEM certificate chain and key.
pub fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .context("unsupported private key type")?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// A rustls server config over a reloading resolver, plus the task that
/// watches the files.
pub fn server_config(
    cert: PathBuf,
    key: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let resolver = Arc::new(Resolver {
        current: RwLock::new(load_pair(&cert, &key)?),
    });
    let watched = resolver.clone();
    tokio::spawn(async move {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last: (Option<SystemTime>, Option<SystemTime>) = (mtime(&cert), mtime(&key));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let now = (mtime(&cert), mtime(&key));
            if now == last {
                continue;
            }
            last = now;
            match load_pair(&cert, &key) {
                Ok(pair) => {
                    *watched.current.write() = pair;
                    tracing::info!(cert = %cert.display(), "reloaded the TLS certificate");
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "keeping the old TLS certificate: the new one does not load")
                }
            }
        }
    });
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A private CA kept in `dir` (created on first use, shared by every
/// process that uses the same directory: a primary and the edges on one
/// machine trust one CA), and a certificate it signs for `names`. Returns
/// `(ca, cert, key)` paths; the certificate file carries the CA too.
pub fn self_signed(dir: &Path, names: &[String]) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir)?;
    let ca_path = dir.join("ca.pem");
    let bundle_path = dir.join("ca-key.pem");
    // The CA and its key in one file, created atomically: of two processes
    // starting together, one wins and both use its CA.
    if !bundle_path.exists() {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "devmesh local CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca.self_signed(&ca_key)?;
        let tmp = dir.join(format!("ca-key.pem.{}", std::process::id()));
        write_secret(&tmp, &format!("{}{}", ca.pem(), ca_key.serialize_pem()))?;
        let _ = std::fs::hard_link(&tmp, &bundle_path);
        let _ = std::fs::remove_file(&tmp);
    }
    let bundle = std::fs::read_to_string(&bundle_path)?;
    let end = "-----END CERTIFICATE-----\n";
    let (ca_pem, key_pem) = match bundle.find(end) {
        Some(at) => bundle.split_at(at + end.len()),
        None => anyhow::bail!("{} holds no CA certificate", bundle_path.display()),
    };
    let ca_pem = ca_pem.to_owned();
    let ca_key = KeyPair::from_pem(key_pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", bundle_path.display()))?;
    // rcgen signs with a certificate object: rebuilt from the stored CA's
    // parameters and key (same subject, same key), as the mesh CA does.
    let issuer = CertificateParams::from_ca_cert_pem(&ca_pem)
        .and_then(|p| p.self_signed(&ca_key))
        .map_err(|e| anyhow::anyhow!("{}: {e}", bundle_path.display()))?;
    if std::fs::read_to_string(&ca_path).ok().as_deref() != Some(ca_pem.as_str()) {
        std::fs::write(&ca_path, &ca_pem)?;
    }

    let tag = &devmesh_shared::secret::sha256(names.join("\n").as_bytes());
    let tag = hex::encode(&tag[..6]);
    let (cert_path, key_path) = (
        dir.join(format!("cert-{tag}.pem")),
        dir.join(format!("key-{tag}.pem")),
    );
    if cert_path.exists() && key_path.exists() {
        return Ok((ca_path, cert_path, key_path));
    }
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("devmesh"),
    );
    let leaf = leaf.signed_by(&key, &issuer, &ca_key)?;
    write_secret(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, format!("{}{}", leaf.pem(), ca_pem))?;
    Ok((ca_path, cert_path, key_path))
}

fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_sharing_a_directory_share_one_ca() {
        let dir = tempfile_dir();
        let (ca1, cert1, _) = self_signed(&dir, &["eu.localhost".into()]).unwrap();
        let (ca2, cert2, key2) = self_signed(&dir, &["ap.localhost".into()]).unwrap();
        assert_eq!(ca1, ca2);
        assert_ne!(cert1, cert2);
        // Both leaves chain to the one CA.
        let ca = std::fs::read_to_string(&ca1).unwrap();
        for cert in [&cert1, &cert2] {
            assert!(std::fs::read_to_string(cert).unwrap().ends_with(&ca));
        }
        // Asking again for the same names reuses the files.
        assert_eq!(
            self_signed(&dir, &["ap.localhost".into()]).unwrap(),
            (ca2, cert2, key2)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "devmesh-tls-test-{}-{}",
            std::process::id(),
            devmesh_shared::secret::random_alphanumeric(8)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
