//! HTTPS for the primary: PEM certificates (wildcards welcome) picked by SNI,
//! reloaded when the files change, or a self-signed CA and certificate for
//! local trials. HTTP/1.1 and HTTP/2 are offered through ALPN.

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

/// Creates (once) a private CA and a certificate for `names` under
/// `<data-dir>/tls`, returning `(ca, cert, key)` paths.
pub fn self_signed(dir: &Path, names: &[String]) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir)?;
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    let names_path = dir.join("names");
    let wanted = names.join("\n");
    if cert_path.exists() && std::fs::read_to_string(&names_path).is_ok_and(|n| n == wanted) {
        return Ok((ca_path, cert_path, key_path));
    }
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
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("devmesh"),
    );
    let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, format!("{}{}", leaf.pem(), ca.pem()))?;
    write_secret(&key_path, &key.serialize_pem())?;
    std::fs::write(&names_path, wanted)?;
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
