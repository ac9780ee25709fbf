//! The QUIC settings of the tunnel's two ends, in one place: the agent's
//! client, the relay's server (agents and mesh peers) and its mesh client.
//! All speak TLS 1.3 only, trust only the mesh CA, and share one set of
//! flow-control windows and liveness timers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use devmesh_shared::tunnel;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Streams a peer carrying user connections may have open at once, one
/// per connection: a relay towards its agent, and a listed mesh peer
/// towards a relay. Reached through [`StreamCredit`], never granted at once.
pub const MAX_STREAMS: u32 = 100_000;
/// Streams such a peer may open at first. Quinn keeps a slot for every
/// stream the peer may open (about 60 bytes each), so granting
/// [`MAX_STREAMS`] up front cost every agent and every mesh link about
/// 6 MiB whether or not it was ever used; [`StreamCredit`] doubles the
/// grant as streams are used instead.
pub const INITIAL_STREAMS: u32 = 256;
/// Flow-control window of one stream, in bytes.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Flow-control window of a whole connection, both directions, in bytes.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// What a relay lets a peer that has not authenticated yet have in
/// flight, in bytes: enough for an attach ticket, not for a flood.
pub const UNAUTHENTICATED_WINDOW: u32 = 64 * 1024;
/// QUIC keep-alives, so both ends notice a dead path within [`IDLE_TIMEOUT`].
/// Half a second: when a relay dies (an edge killed, its machine gone),
/// its agents must notice in time to serve again through another relay
/// within about three seconds, and the other relays must stop sending over
/// their mesh links to it. The cost is one small packet each way per link
/// every half second.
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// A silent peer (killed, unplugged) is gone after this: four keep-alives
/// unanswered in a row. The smaller of the two ends' values applies.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a trust root or TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuicConfigError(String);

fn error(e: impl std::fmt::Display) -> QuicConfigError {
    QuicConfigError(e.to_string())
}

/// The transport settings: `peer_streams` streams the other side may open
/// at once, `window` bytes it may have in flight to us.
pub fn transport(peer_streams: u32, window: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_streams.into())
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(window.into())
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t
}

/// The certificates of a PEM bundle (the mesh CA) as the only trust roots.
pub fn mesh_roots(mesh_ca_pem: &str) -> Result<Arc<RootCertStore>, QuicConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(mesh_ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| error(format!("invalid PEM: {e}")))?)
            .map_err(error)?;
    }
    if roots.is_empty() {
        return Err(error("the PEM holds no certificate"));
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An agent's client: trusts only `mesh_ca_pem`, no client certificate,
/// ALPN [`tunnel::ALPN`]; accepts as many relay-opened streams as users
/// open.
pub fn agent_client(mesh_ca_pem: &str) -> Result<quinn::ClientConfig, QuicConfigError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(error)?
        .with_root_certificates(mesh_roots(mesh_ca_pem)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    let mut config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).map_err(error)?));
    config.transport_config(Arc::new(transport(INITIAL_STREAMS, CONNECTION_WINDOW)));
    Ok(config)
}

/// A relay's server side (agents without a certificate, mesh peers with
/// one signed by `roots`, told apart by ALPN) and its mesh client side,
/// both on the relay's mesh certificate. The server starts every
/// connection at one stream and [`UNAUTHENTICATED_WINDOW`]; the relay
/// raises both once the peer authenticates.
pub fn relay(
    roots: &Arc<RootCertStore>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), QuicConfigError> {
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(error)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(error)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(cert_chain.clone(), key.clone_key())
        .map_err(error)?;
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec(), tunnel::MESH_ALPN.to_vec()];
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).map_err(error)?));
    server.transport_config(Arc::new(transport(1, UNAUTHENTICATED_WINDOW)));

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(error)?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(cert_chain, key)
        .map_err(error)?;
    client_tls.alpn_protocols = vec![tunnel::MESH_ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).map_err(error)?,
    ));
    // The home relay never opens streams on a link we dialed.
    client.transport_config(Arc::new(transport(0, CONNECTION_WINDOW)));
    Ok((server, client))
}

/// The streams a peer may open on one connection, raised as it uses them:
/// from [`INITIAL_STREAMS`], doubled whenever three quarters are open, up
/// to [`MAX_STREAMS`]. Memory follows the connection's real peak instead of
/// its ceiling; a burst waits at most one round trip for the next grant.
#[derive(Debug)]
pub struct StreamCredit {
    conn: quinn::Connection,
    open: AtomicU32,
    granted: AtomicU32,
}

/// One open peer stream, counted by its [`StreamCredit`] until dropped.
#[derive(Debug)]
pub struct OpenStream(Arc<StreamCredit>);

impl StreamCredit {
    /// Grants `conn`'s peer [`INITIAL_STREAMS`].
    pub fn new(conn: quinn::Connection) -> Arc<Self> {
        conn.set_max_concurrent_bi_streams(INITIAL_STREAMS.into());
        Arc::new(Self {
            conn,
            open: AtomicU32::new(0),
            granted: AtomicU32::new(INITIAL_STREAMS),
        })
    }

    /// Counts a stream the peer opened, raising the grant when it is
    /// three quarters used.
    pub fn opened(self: &Arc<Self>) -> OpenStream {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let granted = self.granted.load(Ordering::Relaxed);
        if u64::from(open) * 4 >= u64::from(granted) * 3 && granted < MAX_STREAMS {
            let raised = granted.saturating_mul(2).min(MAX_STREAMS);
            if self
                .granted
                .compare_exchange(granted, raised, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.conn.set_max_concurrent_bi_streams(raised.into());
            }
        }
        OpenStream(self.clone())
    }

    /// Streams granted now.
    pub fn granted(&self) -> u32 {
        self.granted.load(Ordering::Relaxed)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
