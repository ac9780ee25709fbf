//! The agent's side of the QUIC tunnel: connect to a relay trusting only the
//! mesh CA, attach with a ticket on the control stream, then serve the
//! streams the relay opens (one per user connection) by splicing them onto
//! local TCP ports, while pinging the relay to notice a dead path.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use devmesh_shared::api::RelayInfo;
use devmesh_shared::tunnel::{self, Control, StreamHeader, io as wire, status};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, EndpointConfig, IdleTimeout, RecvStream, SendStream, VarInt};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

// === Settings ===

/// Relay-opened streams allowed at once: one per user connection.
const MAX_STREAMS: u32 = 10_000;
/// Flow-control window of one stream.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Flow-control window of the whole connection, both directions.
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to connect to a local port.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the close of a connection may take to reach the relay.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// QUIC application close codes the agent uses.
pub(crate) mod close {
    use quinn::VarInt;

    /// The agent shuts down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The relay stopped answering pings or closed the control stream.
    pub(crate) const LOST: VarInt = VarInt::from_u32(1);
    /// The attach did not complete (refused, timed out, protocol error).
    pub(crate) const ATTACH_FAILED: VarInt = VarInt::from_u32(2);
}

/// Stream error codes (RESET_STREAM / STOP_SENDING).
mod stream_code {
    use quinn::VarInt;

    /// Done with the stream, nothing went wrong.
    pub(super) const DONE: VarInt = VarInt::from_u32(0);
    /// The header was invalid or did not arrive in time.
    pub(super) const BAD_HEADER: VarInt = VarInt::from_u32(1);
    /// The splice failed on one side; the other side is torn down.
    pub(super) const FAILED: VarInt = VarInt::from_u32(2);
}

/// Timers of the tunnel; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How often the agent pings the relay on the control stream.
    pub(crate) ping_interval: Duration,
    /// No pong for this long means the connection is dead.
    pub(crate) dead_after: Duration,
    /// Time for the QUIC handshake, and again for the attach exchange.
    pub(crate) handshake_timeout: Duration,
    /// Time for a relay-opened stream to deliver its header.
    pub(crate) header_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Why attaching to a relay failed.
#[derive(Debug, Error)]
pub(crate) enum TunnelError {
    /// The manifest's mesh CA cannot be used as a trust root.
    #[error("unusable mesh CA: {0}")]
    MeshCa(String),
    /// The relay's address does not resolve.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The address as the manifest gives it.
        address: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The relay's address resolves to nothing.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// The local UDP socket or endpoint could not be set up.
    #[error("cannot open a UDP endpoint: {0}")]
    Endpoint(std::io::Error),
    /// quinn refused to start the connection (bad server name, …).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (including TLS failures).
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A step took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The relay refused the ticket.
    #[error("the relay refused the attach: {0}")]
    Refused(String),
    /// The relay broke the control-stream protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reading or writing the control stream failed.
    #[error("control stream: {0}")]
    ControlIo(#[from] std::io::Error),
}

// === Relay choice ===

/// The relays to try, best first. For now the manifest's order; measuring
/// RTT to pick the nearest (with hysteresis) plugs in here.
pub(crate) fn order_candidates(relays: &[RelayInfo]) -> Vec<&RelayInfo> {
    relays.iter().collect()
}

// === Connecting ===

/// The QUIC client configuration: trusts only the certificates in
/// `mesh_ca_pem`, speaks ALPN [`tunnel::ALPN`] over TLS 1.3.
pub(crate) fn client_config(mesh_ca_pem: &str) -> Result<quinn::ClientConfig, TunnelError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(mesh_ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TunnelError::MeshCa(format!("invalid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TunnelError::MeshCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TunnelError::MeshCa("the PEM holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TunnelError::MeshCa(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TunnelError::MeshCa(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(CONNECTION_WINDOW.into())
        .keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s is far below the limit of an idle timeout, so this always holds.
    if let Ok(idle) = IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// A client endpoint on a fresh UDP socket of `remote`'s address family,
/// with buffers as large as the OS allows (see `devmesh_shared::net`).
fn endpoint_for(remote: SocketAddr) -> std::io::Result<Endpoint> {
    let bind: SocketAddr = if remote.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    Endpoint::new(
        EndpointConfig::default(),
        None,
        devmesh_shared::net::udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// An attached tunnel, ready to serve.
#[derive(Debug)]
pub(crate) struct Attached {
    endpoint: Endpoint,
    conn: Connection,
    control_send: SendStream,
    control_recv: RecvStream,
    /// The relay's name, as it introduced itself.
    pub(crate) relay_name: String,
}

/// Connects to `relay` and attaches with `ticket`. Tries each address the
/// relay's name resolves to, in order, until one attaches; a refused ticket
/// ends the attempt at once.
pub(crate) async fn attach(
    relay: &RelayInfo,
    config: &quinn::ClientConfig,
    ticket: &str,
    timing: &Timing,
) -> Result<Attached, TunnelError> {
    let lookup = tokio::net::lookup_host(relay.address.as_str());
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timing.handshake_timeout, lookup)
        .await
        .map_err(|_| TunnelError::Timeout("resolving the relay's address"))?
        .map_err(|source| TunnelError::Resolve {
            address: relay.address.clone(),
            source,
        })?
        .collect();
    let mut last = TunnelError::NoAddress(relay.address.clone());
    for addr in addrs {
        match attach_addr(addr, relay, config, ticket, timing).await {
            Ok(attached) => return Ok(attached),
            Err(e @ TunnelError::Refused(_)) => return Err(e),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "relay address failed");
                last = e;
            }
        }
    }
    Err(last)
}

async fn attach_addr(
    addr: SocketAddr,
    relay: &RelayInfo,
    config: &quinn::ClientConfig,
    ticket: &str,
    timing: &Timing,
) -> Result<Attached, TunnelError> {
    let endpoint = endpoint_for(addr).map_err(TunnelError::Endpoint)?;
    if let Ok(local) = endpoint.local_addr() {
        tracing::debug!(%local, relay = %addr, "connecting to relay");
    }
    let connecting = endpoint.connect_with(config.clone(), addr, &relay.server_name)?;
    let conn = tokio::time::timeout(timing.handshake_timeout, connecting)
        .await
        .map_err(|_| TunnelError::Timeout("connecting to the relay"))??;
    let exchanged = tokio::time::timeout(timing.handshake_timeout, exchange_attach(&conn, ticket))
        .await
        .unwrap_or(Err(TunnelError::Timeout("waiting for the relay to attach")));
    match exchanged {
        Ok((control_send, control_recv, relay_name)) => Ok(Attached {
            endpoint,
            conn,
            control_send,
            control_recv,
            relay_name,
        }),
        Err(e) => {
            conn.close(close::ATTACH_FAILED, b"attach failed");
            // Give the close a moment to leave, so the relay does not wait
            // for an idle timeout.
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
            Err(e)
        }
    }
}

/// Opens the control stream, presents the ticket and reads the answer.
async fn exchange_attach(
    conn: &Connection,
    ticket: &str,
) -> Result<(SendStream, RecvStream, String), TunnelError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    wire::write_control(
        &mut send,
        &Control::Attach {
            ticket: ticket.to_owned(),
        },
    )
    .await?;
    match wire::read_control(&mut recv).await? {
        Some(Control::Attached { relay }) => Ok((send, recv, relay)),
        Some(Control::Refused { reason }) => Err(TunnelError::Refused(reason)),
        Some(other) => Err(TunnelError::Protocol(format!(
            "expected attached or refused, got {}",
            kind(&other)
        ))),
        None => Err(TunnelError::Protocol(
            "the relay closed the control stream without answering".into(),
        )),
    }
}

/// A control message's name, for logs; never its contents (a ticket is a
/// bearer credential).
fn kind(c: &Control) -> &'static str {
    match c {
        Control::Attach { .. } => "attach",
        Control::Attached { .. } => "attached",
        Control::Refused { .. } => "refused",
        Control::Ping { .. } => "ping",
        Control::Pong { .. } => "pong",
    }
}

// === Serving ===

/// Why [`Attached::serve`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Cancelled: the connection was closed with code 0, "shutdown".
    Shutdown,
    /// The connection died or the relay detached us; reconnect.
    Lost(String),
}

impl Attached {
    /// The remote address of the relay.
    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Serves relay-opened streams and keeps the control stream alive until
    /// `cancel` fires or the connection is lost. The connection is closed
    /// either way.
    pub(crate) async fn serve(
        self,
        agent_id: Arc<str>,
        timing: &Timing,
        cancel: &CancellationToken,
    ) -> End {
        let Attached {
            endpoint,
            conn,
            mut control_send,
            control_recv,
            ..
        } = self;
        // `read_control` is not cancel-safe, so it runs in its own task
        // rather than in the select below.
        let (control_tx, mut control_rx) = mpsc::channel(16);
        let reader = tokio::spawn(read_controls(control_recv, control_tx));
        let mut ping =
            tokio::time::interval_at(Instant::now() + timing.ping_interval, timing.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        let dead = tokio::time::sleep(timing.dead_after);
        tokio::pin!(dead);

        let end = loop {
            tokio::select! {
                () = cancel.cancelled() => break End::Shutdown,
                incoming = conn.accept_bi() => match incoming {
                    Ok((send, recv)) => {
                        let span = tracing::info_span!(
                            "stream",
                            agent.id = %agent_id,
                            stream.port = tracing::field::Empty,
                        );
                        let task = handle_stream(send, recv, timing.header_timeout);
                        tokio::spawn(task.instrument(span));
                    }
                    Err(e) => break End::Lost(e.to_string()),
                },
                _ = ping.tick() => {
                    nonce = nonce.wrapping_add(1);
                    let ping = Control::Ping { nonce };
                    if let Err(e) = wire::write_control(&mut control_send, &ping).await {
                        break End::Lost(format!("cannot ping the relay: {e}"));
                    }
                }
                () = &mut dead => {
                    break End::Lost(format!("no pong from the relay for {:?}", timing.dead_after));
                }
                message = control_rx.recv() => match message {
                    Some(Ok(Control::Pong { .. })) => {
                        dead.as_mut().reset(Instant::now() + timing.dead_after);
                    }
                    Some(Ok(Control::Ping { nonce })) => {
                        let pong = Control::Pong { nonce };
                        if let Err(e) = wire::write_control(&mut control_send, &pong).await {
                            break End::Lost(format!("cannot answer the relay's ping: {e}"));
                        }
                    }
                    Some(Ok(other)) => {
                        tracing::debug!(kind = kind(&other), "ignoring a control message");
                    }
                    Some(Err(e)) => break End::Lost(format!("control stream failed: {e}")),
                    None => break End::Lost("the relay closed the control stream".into()),
                },
            }
        };
        reader.abort();
        match &end {
            End::Shutdown => conn.close(close::SHUTDOWN, b"shutdown"),
            End::Lost(reason) => conn.close(close::LOST, reason.as_bytes()),
        }
        // Let the CONNECTION_CLOSE reach the relay, bounded: on a dead path
        // nothing will acknowledge it.
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        end
    }
}

async fn read_controls(mut recv: RecvStream, tx: mpsc::Sender<std::io::Result<Control>>) {
    loop {
        match wire::read_control(&mut recv).await {
            Ok(Some(message)) => {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// Serves one relay-opened stream: header, status byte, then the splice.
/// Never panics on what the relay sends; a bad header resets the stream.
async fn handle_stream(mut send: SendStream, mut recv: RecvStream, header_timeout: Duration) {
    let header = match tokio::time::timeout(header_timeout, wire::read_header(&mut recv)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad stream header; resetting the stream");
            let _ = send.reset(stream_code::BAD_HEADER);
            let _ = recv.stop(stream_code::BAD_HEADER);
            return;
        }
        Err(_) => {
            tracing::debug!("no stream header in time; resetting the stream");
            let _ = send.reset(stream_code::BAD_HEADER);
            let _ = recv.stop(stream_code::BAD_HEADER);
            return;
        }
    };
    match header {
        StreamHeader::Tcp { port } => {
            tracing::Span::current().record("stream.port", port);
            forward_tcp(port, send, recv).await;
        }
        StreamHeader::Ssh | StreamHeader::Pty { .. } => {
            tracing::debug!("stream kind not served yet");
            answer_and_finish(send, recv, status::UNSUPPORTED).await;
        }
    }
}

/// Writes a final status byte and finishes the stream without reading it.
async fn answer_and_finish(mut send: SendStream, mut recv: RecvStream, code: u8) {
    let _ = recv.stop(stream_code::DONE);
    if send.write_all(&[code]).await.is_ok() {
        let _ = send.finish();
    }
}

async fn forward_tcp(port: u16, mut send: SendStream, recv: RecvStream) {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut tcp =
        match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "local port refused");
                return answer_and_finish(send, recv, status::REFUSED).await;
            }
            Err(_) => {
                tracing::debug!("local port did not answer in time");
                return answer_and_finish(send, recv, status::REFUSED).await;
            }
        };
    let _ = tcp.set_nodelay(true);
    if let Err(e) = send.write_all(&[status::OK]).await {
        tracing::debug!(error = %e, "stream closed before the status byte");
        return;
    }
    // Each direction ends with a shutdown of its writer: the QUIC side's is
    // a FIN on the send stream, the TCP side's a half-close, so either
    // peer's end of data travels through.
    let mut quic = tokio::io::join(recv, send);
    match tokio::io::copy_bidirectional(&mut quic, &mut tcp).await {
        Ok((from_relay, to_relay)) => {
            tracing::debug!(from_relay, to_relay, "stream done");
        }
        Err(e) => {
            tracing::debug!(error = %e, "stream failed; tearing down both sides");
            let (mut recv, mut send) = quic.into_inner();
            let _ = send.reset(stream_code::FAILED);
            let _ = recv.stop(stream_code::FAILED);
            // Dropping the TCP stream closes it.
        }
    }
}

#[cfg(test)]
mod tests;
