//! The agent's side of the QUIC tunnel: connect to a relay trusting only the
//! mesh CA, attach with a ticket on the control stream, then serve the
//! streams the relay opens (one per user connection) by splicing them onto
//! local TCP ports, while pinging the relay to notice a dead path. Also
//! measures the round-trip time to relays with bare QUIC handshakes, so the
//! agent can pick the nearest.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use devmesh_shared::api::RelayInfo;
use devmesh_shared::tunnel::session::{AgentSession, PingTiming, SessionError};
use devmesh_shared::tunnel::{StreamHeader, io as wire, status};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::nearest::Measurement;

// === Settings ===

/// Time to connect to a local port.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the close of a connection may take to reach the relay.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Handshakes per relay in one measurement; the fastest counts, so one
/// packet delayed by a busy scheduler does not make a relay look far.
pub(crate) const PROBES_PER_RELAY: u32 = 3;

/// The QUIC application close codes the agent uses:
/// [`devmesh_shared::tunnel::close`] as varints.
pub(crate) mod close {
    use devmesh_shared::tunnel::close as code;
    use quinn::VarInt;

    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(code::SHUTDOWN);
    pub(crate) const LOST: VarInt = VarInt::from_u32(code::LOST);
    pub(crate) const ATTACH_FAILED: VarInt = VarInt::from_u32(code::ATTACH_FAILED);
    pub(crate) const PROBE: VarInt = VarInt::from_u32(code::PROBE);
    pub(crate) const MOVED: VarInt = VarInt::from_u32(code::MOVED);
}

/// [`devmesh_shared::tunnel::stream_code`] as QUIC varints.
pub(crate) mod stream_code {
    use devmesh_shared::tunnel::stream_code as code;
    use quinn::VarInt;

    pub(crate) const DONE: VarInt = VarInt::from_u32(code::DONE);
    pub(crate) const BAD_HEADER: VarInt = VarInt::from_u32(code::BAD_HEADER);
    pub(crate) const FAILED: VarInt = VarInt::from_u32(code::FAILED);
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
    /// Time for one RTT probe (a bare QUIC handshake); a relay that takes
    /// longer counts as unreachable in that round.
    pub(crate) probe_timeout: Duration,
    /// How often an attached agent measures every relay again, to move when
    /// another is clearly nearer.
    pub(crate) recheck_interval: Duration,
    /// The first re-check's nominal wait for an agent attached after a
    /// failover or after a nearer relay turned it away; the schedule is
    /// [`crate::nearest::Failback`].
    pub(crate) failback_interval: Duration,
}

impl Timing {
    /// The control stream's timers.
    fn ping(&self) -> PingTiming {
        PingTiming {
            ping_interval: self.ping_interval,
            dead_after: self.dead_after,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(2),
            recheck_interval: Duration::from_secs(3 * 60),
            failback_interval: Duration::from_secs(10),
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
    /// The control-stream exchange failed otherwise.
    #[error("{0}")]
    Session(SessionError),
}

impl From<SessionError> for TunnelError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Refused(reason) => Self::Refused(reason),
            other => Self::Session(other),
        }
    }
}

// === Connecting ===

/// The QUIC client configuration ([`devmesh_net::quic::agent_client`]):
/// trusts only the certificates in `mesh_ca_pem`.
pub(crate) fn client_config(mesh_ca_pem: &str) -> Result<quinn::ClientConfig, TunnelError> {
    devmesh_net::quic::agent_client(mesh_ca_pem).map_err(|e| TunnelError::MeshCa(e.to_string()))
}

/// A client endpoint on a fresh UDP socket of `remote`'s address family,
/// with buffers as large as the OS allows (see `devmesh_net::sockets`).
fn endpoint_for(remote: SocketAddr) -> std::io::Result<Endpoint> {
    let bind: SocketAddr = if remote.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        devmesh_net::sockets::udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Endpoints for RTT probes, one per address family, kept for the agent's
/// life. A quinn endpoint allocates a receive buffer of about 3 MB; once
/// glibc has freed one that large it keeps later ones in the heap (its
/// mmap threshold rises to match), so a fresh endpoint per probe grew an
/// idle agent's RSS by about a megabyte per probe, three probes every
/// re-check, until it settled some 50 MB higher.
#[derive(Debug, Default)]
pub(crate) struct Probes {
    v4: parking_lot::Mutex<Option<Endpoint>>,
    v6: parking_lot::Mutex<Option<Endpoint>>,
}

impl Probes {
    /// The probe endpoint for `remote`'s address family, made on first use.
    fn endpoint(&self, remote: SocketAddr) -> std::io::Result<Endpoint> {
        let mut slot = if remote.is_ipv6() {
            self.v6.lock()
        } else {
            self.v4.lock()
        };
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let e = endpoint_for(remote)?;
        *slot = Some(e.clone());
        Ok(e)
    }
}

/// An attached tunnel, ready to serve.
#[derive(Debug)]
pub(crate) struct Attached {
    endpoint: Endpoint,
    conn: Connection,
    control_send: SendStream,
    control_recv: RecvStream,
    session: AgentSession,
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
    let addrs = resolve(relay, timing.handshake_timeout).await?;
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

/// The addresses `relay`'s address resolves to, in the resolver's order
/// (hickory, honouring TTLs: a relay that moves in DNS is followed).
async fn resolve(relay: &RelayInfo, timeout: Duration) -> Result<Vec<SocketAddr>, TunnelError> {
    let lookup = devmesh_net::sockets::resolve(&relay.address);
    tokio::time::timeout(timeout, lookup)
        .await
        .map_err(|_| TunnelError::Timeout("resolving the relay's address"))?
        .map_err(|source| TunnelError::Resolve {
            address: relay.address.clone(),
            source,
        })
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
    let mut session = AgentSession::new(ticket.to_owned(), timing.ping(), Instant::now());
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let relay = wire::attach(&mut send, &mut recv, &mut session).await?;
        Ok::<_, TunnelError>((send, recv, relay))
    };
    let exchanged = tokio::time::timeout(timing.handshake_timeout, exchange)
        .await
        .unwrap_or(Err(TunnelError::Timeout("waiting for the relay to attach")));
    match exchanged {
        Ok((control_send, control_recv, relay_name)) => Ok(Attached {
            endpoint,
            conn,
            control_send,
            control_recv,
            session,
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

// === Measuring ===

/// Measures the round-trip time to every relay at once, the fastest of
/// `handshakes` each ([`PROBES_PER_RELAY`] unless the caller has a reason
/// to spend less), each bounded by [`Timing::probe_timeout`]. The result
/// is in `relays`' order; a relay that no probe got through to has no RTT.
pub(crate) async fn measure(
    relays: &[RelayInfo],
    config: &quinn::ClientConfig,
    timing: &Timing,
    endpoints: &Arc<Probes>,
    handshakes: u32,
) -> Vec<Measurement> {
    let mut probes = JoinSet::new();
    for (i, relay) in relays.iter().enumerate() {
        let (relay, config, timing, endpoints) =
            (relay.clone(), config.clone(), *timing, endpoints.clone());
        probes.spawn(
            async move {
                let rtt = probe(&relay, &config, &timing, &endpoints, handshakes).await;
                if let Err(e) = &rtt {
                    tracing::debug!(
                        region = %relay.region,
                        address = %relay.address,
                        error = %e,
                        "relay did not answer the RTT probe"
                    );
                }
                (i, rtt.ok())
            }
            .in_current_span(),
        );
    }
    let mut rtts = vec![None; relays.len()];
    while let Some(done) = probes.join_next().await {
        // A probe task only ends by returning; a panic would be a bug in
        // quinn, and then the relay just counts as unreachable.
        if let Ok((i, rtt)) = done {
            rtts[i] = rtt;
        }
    }
    relays
        .iter()
        .cloned()
        .zip(rtts)
        .map(|(relay, rtt)| Measurement { relay, rtt })
        .collect()
}

/// The fastest of `handshakes` QUIC handshakes (at least one) with
/// `relay`'s first address, on the agent's probe endpoint. A handshake is one round trip plus the
/// relay's TLS work, which is what each user connection's first byte pays
/// too. The connections close at once with [`close::PROBE`] and never carry
/// a ticket. Stops at the first failure; errs only if no handshake completed.
pub(crate) async fn probe(
    relay: &RelayInfo,
    config: &quinn::ClientConfig,
    timing: &Timing,
    endpoints: &Probes,
    handshakes: u32,
) -> Result<Duration, TunnelError> {
    let addr = resolve(relay, timing.probe_timeout)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| TunnelError::NoAddress(relay.address.clone()))?;
    let endpoint = endpoints.endpoint(addr).map_err(TunnelError::Endpoint)?;
    let mut best: Option<Duration> = None;
    let mut failure = None;
    for _ in 0..handshakes.max(1) {
        let started = Instant::now();
        let handshake = async {
            let connecting = endpoint.connect_with(config.clone(), addr, &relay.server_name)?;
            Ok::<_, TunnelError>(connecting.await?)
        };
        match tokio::time::timeout(timing.probe_timeout, handshake).await {
            Ok(Ok(conn)) => {
                let took = started.elapsed();
                conn.close(close::PROBE, b"rtt probe");
                best = Some(best.map_or(took, |b| b.min(took)));
            }
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(_) => {
                failure = Some(TunnelError::Timeout("probing the relay"));
                break;
            }
        }
    }
    // Let the closes reach the relay without holding up the measurement.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    });
    match (best, failure) {
        (Some(rtt), _) => Ok(rtt),
        (None, Some(e)) => Err(e),
        // At least one handshake, so a loop without a success has a failure.
        (None, None) => Err(TunnelError::Timeout("probing the relay")),
    }
}

// === Serving ===

/// Why [`Attached::serve`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Cancelled: the connection was closed with code 0, "shutdown".
    Shutdown,
    /// The agent moved to another relay: the connection was closed with
    /// [`close::MOVED`].
    Moved,
    /// The connection died or the relay detached us; reconnect.
    Lost(String),
}

impl Attached {
    /// The remote address of the relay.
    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Serves relay-opened streams and keeps the control stream alive until
    /// `shutdown` or `moved` fires or the connection is lost. The connection
    /// is closed in every case, with a code saying which.
    pub(crate) async fn serve(
        self,
        agent_id: Arc<str>,
        timing: &Timing,
        shutdown: &CancellationToken,
        moved: &CancellationToken,
    ) -> End {
        let Attached {
            endpoint,
            conn,
            mut control_send,
            control_recv,
            mut session,
            ..
        } = self;
        let mut control = wire::ControlReader::new(control_recv);
        let credit = devmesh_net::quic::StreamCredit::new(conn.clone());

        let end = loop {
            tokio::select! {
                () = shutdown.cancelled() => break End::Shutdown,
                () = moved.cancelled() => break End::Moved,
                incoming = conn.accept_bi() => match incoming {
                    Ok((send, recv)) => {
                        let span = tracing::info_span!(
                            "stream",
                            agent.id = %agent_id,
                            stream.port = tracing::field::Empty,
                        );
                        let open = credit.opened();
                        let task = handle_stream(send, recv, timing.header_timeout);
                        tokio::spawn(
                            async move {
                                task.await;
                                drop(open);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => break End::Lost(e.to_string()),
                },
                () = tokio::time::sleep_until(session.deadline()) => {
                    if let Err(e) = session.tick(Instant::now()) {
                        break End::Lost(e.to_string());
                    }
                }
                message = control.next() => {
                    let received = message.map_err(SessionError::from);
                    if let Err(e) = received.and_then(|m| session.receive(m, Instant::now())) {
                        break End::Lost(e.to_string());
                    }
                }
            }
            if let Err(e) = wire::flush(&mut control_send, &mut session).await {
                break End::Lost(format!("cannot write to the relay: {e}"));
            }
        };
        match &end {
            End::Shutdown => conn.close(close::SHUTDOWN, b"shutdown"),
            End::Moved => conn.close(close::MOVED, b"moved to a nearer relay"),
            End::Lost(reason) => conn.close(close::LOST, reason.as_bytes()),
        }
        // Let the CONNECTION_CLOSE reach the relay, bounded: on a dead path
        // nothing will acknowledge it.
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        end
    }
}

/// Serves one relay-opened stream: header, status byte, then the splice.
/// Never panics on what the relay sends; a bad header resets the stream.
async fn handle_stream(mut send: SendStream, mut recv: RecvStream, header_timeout: Duration) {
    let header = match tokio::time::timeout(header_timeout, wire::read_header(&mut recv)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a malformed stream header from the relay; resetting the stream");
            let _ = send.reset(stream_code::BAD_HEADER);
            let _ = recv.stop(stream_code::BAD_HEADER);
            return;
        }
        Err(_) => {
            tracing::warn!("no stream header from the relay in time; resetting the stream");
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
        StreamHeader::Ssh if crate::ssh::ready() => {
            if send.write_all(&[status::OK]).await.is_ok() {
                crate::ssh::spawn_session(tokio::io::join(recv, send));
            }
        }
        StreamHeader::Ssh => {
            tracing::debug!("an ssh stream before the manifest");
            answer_and_finish(send, recv, status::UNSUPPORTED).await;
        }
        StreamHeader::Pty {
            session,
            cols,
            rows,
            command,
        } => crate::pty::serve((session, cols, rows, command), send, recv).await,
        StreamHeader::Probe { download } => crate::probe::probe(download, send, recv).await,
        StreamHeader::Udp { port } => crate::probe::udp(port, send, recv).await,
    }
}

/// Writes a final status byte and finishes the stream without reading it.
pub(crate) async fn answer_and_finish(mut send: SendStream, mut recv: RecvStream, code: u8) {
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
    let mut recv = recv;
    match devmesh_net::splice::quic_and_tcp(&mut send, &mut recv, &mut tcp).await {
        Ok((from_relay, to_relay)) => {
            tracing::debug!(from_relay, to_relay, "stream done");
        }
        Err(e) => {
            tracing::debug!(error = %e, "stream failed; tearing down both sides");
            let _ = send.reset(stream_code::FAILED);
            let _ = recv.stop(stream_code::FAILED);
            // Dropping the TCP stream closes it.
        }
    }
}

#[cfg(test)]
mod tests;
