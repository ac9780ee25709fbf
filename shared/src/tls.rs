//! HTTPS for the primary and edges: PEM certificates (wildcards welcome),
//! reloaded when the files change, or a self-signed CA and certificate for
//! local trials; and the TLS accept loop that serves an axum app with
//! HTTP/1.1 and HTTP/2 through ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
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

/// Serves the app over TLS: one task per connection, the handshake under a
/// timeout inside it (never in the accept loop), HTTP/1.1 or HTTP/2 by ALPN,
/// and a graceful drain on shutdown.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Small writes (HTTP/2 frames, WebSocket messages) go out at once:
        // Nagle's algorithm against delayed ACKs costs 40 ms a round trip.
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(client.addr = %remote, "connection limit reached; dropping a connection");
            continue;
        };
        let (acceptor, app, builder, watcher) = (
            acceptor.clone(),
            app.clone(),
            builder.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(client.addr = %remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(client.addr = %remote, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(remote));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(client.addr = %remote, error = %e, "connection ended");
            }
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {grace:?}; closing them");
    }
}

/// Most concurrent HTTPS connections.
const MAX_CONNECTIONS: usize = 50_000;
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
