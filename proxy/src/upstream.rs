//! HTTP connections to apps inside workspaces, over tunnel streams.
//!
//! Connections are pooled per (agent, port, scheme) and reused across user
//! requests, as a browser's keep-alive connections would be: a request
//! takes an idle connection that is still open, or opens a stream to the
//! agent and handshakes a new one. After a response body has been read to
//! the end, the connection goes back to the pool. Upgraded connections
//! (WebSockets) get a connection of their own and never return.
//!
//! HTTPS upstreams (`8443s--...` dev URLs, `https://` app URLs) run TLS to
//! the app inside the stream. The app's certificate is not verified: the
//! app listens on the workspace's loopback interface, typically with a
//! self-signed certificate, and the hop to it is already authenticated and
//! encrypted by the tunnel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use uuid::Uuid;

use devmesh_shared::tunnel::StreamHeader;

use crate::pace::{Lane, Lanes, Paced};
use crate::relay::{OpenError, Relay};

/// How long opening a stream to the app (and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Idle connections kept per key: as many as a busy app keeps in flight,
/// like nginx's `keepalive 128` in the load tool's baselines. With fewer
/// than the requests in flight, every dip in concurrency closes the excess
/// and the next rise opens them again: at 64 concurrent requests a limit
/// of 32 cost a new stream and app connection every ~60 requests.
const MAX_IDLE_PER_KEY: usize = 128;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Which upstream a connection reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// The workspace agent whose tunnel carries the connection.
    pub agent: Uuid,
    /// The app's port on the agent's loopback interface.
    pub port: u16,
    /// Whether the hop to the app runs TLS inside the tunnel stream (an
    /// `https://` app or an `<port>s--` dev URL); the app's certificate is
    /// not verified.
    pub https: bool,
}

/// Why a request could not be sent to the app.
#[derive(Debug)]
pub enum SendError {
    /// The stream to the agent could not be opened.
    Open(OpenError),
    /// The TLS or HTTP handshake with the app failed, or it did not answer.
    App(String),
}

/// An idle connection and since when.
type Idle = (Instant, SendRequest<Body>);

/// The idle connections of every app.
#[derive(Debug, Default)]
struct IdleConns {
    by_key: HashMap<Key, Vec<Idle>>,
    /// When every app's list was last swept of expired and closed
    /// connections (a full list is also swept when a connection returns
    /// to it).
    swept_at: Option<Instant>,
}

/// Idle HTTP/1.1 connections to apps, by [`Key`]: at most 128 per key, none
/// reused after 60 s idle, and none kept much longer: returning any
/// connection sweeps every app's list once a minute, so an app that went
/// quiet does not hold its connections (streams to its agent, sockets in
/// the workspace) until it closes them itself. One per primary or edge,
/// shared by its requests.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<IdleConns>,
    /// Each app's interactive traffic, which its bulk transfers make
    /// way for.
    lanes: Lanes,
}

impl Pool {
    /// Sends `req` to the app behind `key`, reusing an idle connection when
    /// one is open. `fresh` forces a connection of its own (upgrades).
    pub async fn send(
        self: &Arc<Self>,
        relay: &Relay,
        key: Key,
        grant: Option<&str>,
        mut req: hyper::Request<Body>,
        fresh: bool,
    ) -> Result<hyper::Response<hyper::body::Incoming>, SendError> {
        if !fresh {
            while let Some(mut sender) = self.take(key) {
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.recycle(key, sender);
                        return Ok(resp);
                    }
                    Err(mut e) => match e.take_message() {
                        // Never sent (the connection had died): try the next one.
                        Some(back) => req = back,
                        None => {
                            return Err(SendError::App(format!(
                                "the app did not answer: {}",
                                e.error()
                            )));
                        }
                    },
                }
            }
        }
        let lane = self.lanes.lane(key.agent, key.port);
        let mut sender = connect(relay, key, grant, lane, fresh).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::App(format!("the app did not answer: {e}")))?;
        if !fresh {
            self.recycle(key, sender);
        }
        Ok(resp)
    }

    fn take(&self, key: Key) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock();
        let list = idle.by_key.get_mut(&key)?;
        while let Some((since, sender)) = list.pop() {
            if since.elapsed() < IDLE_TIMEOUT && sender.is_ready() && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Returns the connection to the pool once its response has been read.
    fn recycle(self: &Arc<Self>, key: Key, mut sender: SendRequest<Body>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            if let Some(pool) = pool.upgrade() {
                pool.put_back(key, sender);
            }
        });
    }

    fn put_back(&self, key: Key, sender: SendRequest<Body>) {
        let now = Instant::now();
        let alive = |(since, s): &Idle| now.duration_since(*since) < IDLE_TIMEOUT && !s.is_closed();
        let mut idle = self.idle.lock();
        if idle
            .swept_at
            .is_none_or(|at| now.duration_since(at) >= IDLE_TIMEOUT)
        {
            idle.by_key.retain(|_, list| {
                list.retain(alive);
                !list.is_empty()
            });
            idle.swept_at = Some(now);
        }
        // Every request returns a connection here, under the pool's one
        // lock: the list is swept only when full (`take` skips expired and
        // closed connections, and the sweep above clears them within a
        // minute), not scanned on every return.
        let list = idle.by_key.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_KEY {
            list.retain(alive);
        }
        if list.len() < MAX_IDLE_PER_KEY {
            list.push((now, sender));
        }
    }

    /// Idle connections right now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().by_key.values().map(Vec::len).sum()
    }
}

async fn connect(
    relay: &Relay,
    key: Key,
    grant: Option<&str>,
    lane: Arc<Lane>,
    upgrades: bool,
) -> Result<SendRequest<Body>, SendError> {
    // A stuck agent must not hang the request: opening includes its answer.
    let opened = tokio::time::timeout(
        CONNECT_TIMEOUT,
        relay.open(key.agent, &StreamHeader::Tcp { port: key.port }, grant),
    )
    .await
    .map_err(|_| SendError::App("the workspace agent did not answer in time".into()))?;
    let (send, recv) = opened.map_err(SendError::Open)?;
    let stream = Paced::new(tokio::io::join(recv, send), lane, relay.stats());
    if key.https {
        let tls = tokio_rustls::TlsConnector::from(insecure_tls())
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("valid name"),
                stream,
            )
            .await
            .map_err(|e| SendError::App(format!("TLS handshake with the app: {e}")))?;
        handshake(tls, upgrades).await
    } else {
        handshake(stream, upgrades).await
    }
}

async fn handshake<IO>(io: IO, upgrades: bool) -> Result<SendRequest<Body>, SendError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| SendError::App(format!("handshake with the app: {e}")))?;
    tokio::spawn(async move {
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "app connection ended");
        }
    });
    Ok(sender)
}

fn insecure_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LoopbackApp(provider)))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// Accepts the app's certificate without checking it (see the module docs),
/// while still checking that the handshake is signed by that certificate.
#[derive(Debug)]
struct LoopbackApp(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for LoopbackApp {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
