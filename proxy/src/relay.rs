//! A relay: the QUIC endpoint agents attach to (ALPN `devmesh-tunnel/1`),
//! and this relay's side of the mesh between relays (ALPN `devmesh-mesh/1`,
//! mutual TLS on mesh-CA certificates). The primary runs one, every edge
//! replica runs one.
//!
//! An agent opens one control stream and presents an attach ticket signed
//! by the primary; the relay verifies it locally (no round trip), reports
//! the attachment as an [`AttachEvent`], and answers pings. For each user
//! connection the relay opens a bidirectional stream to the agent, writes a
//! [`StreamHeader`], reads the agent's one-byte status, and hands the stream
//! over as plain bytes.
//!
//! A stream for an agent attached elsewhere goes over the mesh: the relay
//! looks the agent's home relay up in [`Locations`] (kept current by the
//! primary's events), opens a stream on a (cached) mesh connection to it
//! and writes a [`MeshHeader`]; the home relay opens the stream to the agent
//! and splices the two. A home relay never forwards a mesh stream again, so
//! stale locations cannot make loops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use devmesh_net::quic;
use devmesh_shared::api::{AgentLocation, MeshPeer, RelayInfo};
use devmesh_shared::signing::{
    AppToken, AttachTicket, Claims, GrantedStream, PublicKey, StreamGrant, TokenError, Verifier,
};
use devmesh_shared::tunnel::session::{RelayEvent, RelaySession, SessionError};
use devmesh_shared::tunnel::{self, MeshHeader, StreamHeader, close, io as tio, stream_code};
use parking_lot::{Mutex, RwLock};
use quinn::{Connection, RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// How long an agent has to present its ticket, and a mesh peer its header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialing another relay may take.
const MESH_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a relay found dead is not dialed again.
const DEAD_FOR: Duration = Duration::from_secs(3);
/// How long opening a stream waits for an agent whose relay died (or that
/// left this relay) to be located again: re-attaching elsewhere takes an
/// agent about three seconds, and a request held that long beats a 502.
const REROUTE_WAIT: Duration = Duration::from_secs(5);
/// Agents remembered as waited for in vain (see [`Relay::open`]); past
/// this many, the memory starts over.
const STALLED_KEPT: usize = 4096;
/// How many verified mesh grants a relay remembers.
const GRANTS_KEPT: usize = 16_384;

/// A mesh grant whose signature was verified.
#[derive(Debug, Clone)]
struct VerifiedGrant {
    agent: Uuid,
    stream: GrantedStream,
    /// Expiry, unix seconds.
    exp: i64,
    /// The app token it is, checked against revocations on every use.
    token: Option<Arc<AppToken>>,
}

/// How many spent ticket nonces a relay keeps before dropping expired ones.
const SPENT_PRUNE_AT: usize = 4096;

/// Why a relay refused an attach ticket.
#[derive(Debug, thiserror::Error)]
enum AdmitError {
    #[error(transparent)]
    Invalid(#[from] TokenError),
    #[error("the ticket is for another relay")]
    OtherRelay,
    #[error("the ticket was already used")]
    Replayed,
}

/// Why a stream to an agent could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The agent has no tunnel to this relay or to any relay we know of.
    #[error("the workspace agent is not connected")]
    NotConnected,
    /// The tunnel (or the mesh link) broke while opening the stream.
    #[error("the connection to the workspace agent was lost")]
    Lost,
    /// Nothing listens on the port in the workspace.
    #[error("the app refused the connection")]
    Refused,
    /// The agent does not serve this kind of stream.
    #[error("the workspace agent does not support this kind of connection")]
    Unsupported,
    /// The agent's home relay did not accept the stream's grant.
    #[error("the workspace's relay refused the connection's authorisation")]
    Denied,
}

/// How a relay reaches an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Down the agent's tunnel to this relay.
    Here {
        /// The tunnel's round trip, as QUIC estimates it.
        rtt: Duration,
    },
    /// Across the mesh to the relay the agent is attached to.
    Mesh {
        /// That relay's region.
        region: String,
        /// The mesh link's round trip, if a link is up.
        rtt: Option<Duration>,
    },
    /// Not attached anywhere this relay knows of.
    Unknown,
}

/// Signs a grant for a stream this relay sends over the mesh when the
/// caller has none (the primary's relay, which holds the signing key).
pub type GrantSigner = Arc<dyn Fn(&StreamGrant) -> String + Send + Sync>;

/// How long a grant the relay signs itself lasts: it only has to reach
/// the home relay.
const SELF_GRANT_SECS: i64 = 60;

/// An agent's tunnel came or went; the owner of the relay records it (the
/// primary in its database, an edge by telling the primary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    /// The agent attached (or re-attached, replacing an older tunnel).
    Attached {
        /// The agent, as its attach ticket names it.
        agent: Uuid,
        /// The agent's workspace, from the same ticket.
        workspace: Uuid,
        /// When its ticket was issued, unix milliseconds.
        issued_at_ms: i64,
    },
    /// The agent pinged; sent at most every 30 s per agent.
    Alive {
        /// The agent that pinged.
        agent: Uuid,
    },
    /// The agent's tunnel ended and no newer one replaced it.
    Detached {
        /// The agent whose tunnel ended.
        agent: Uuid,
    },
}

/// The keys that verify attach tickets (and app tokens); replaced when the
/// primary rotates them.
#[derive(Debug, Clone)]
pub struct Keys(Arc<RwLock<Arc<Verifier>>>);

impl Keys {
    /// Keys from the primary's public keys.
    pub fn new(keys: &[PublicKey]) -> Result<Self, TokenError> {
        Ok(Self(Arc::new(RwLock::new(Arc::new(Verifier::new(keys)?)))))
    }

    /// Replaces the keys after the primary rotates them: tickets and
    /// tokens signed with a key no longer listed stop verifying.
    pub fn set(&self, keys: &[PublicKey]) -> Result<(), TokenError> {
        *self.0.write() = Arc::new(Verifier::new(keys)?);
        Ok(())
    }

    /// Verifies a token with the current keys.
    pub fn verify<C: Claims>(&self, token: &str, now_unix: i64) -> Result<C, TokenError> {
        let verifier = self.0.read().clone();
        verifier.verify(token, now_unix)
    }
}

/// The relays this one may exchange mesh traffic with, as the primary last
/// said: their TLS names and the oldest certificate still honoured for
/// each. A change closes mesh connections to peers no longer allowed.
#[derive(Debug, Clone)]
pub struct MeshPeers(Arc<tokio::sync::watch::Sender<HashMap<String, i64>>>);

impl Default for MeshPeers {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(HashMap::new())))
    }
}

impl MeshPeers {
    /// Replaces the list.
    pub fn set(&self, peers: Vec<MeshPeer>) {
        self.0.send_replace(
            peers
                .into_iter()
                .map(|p| (p.server_name, p.certs_valid_from))
                .collect(),
        );
    }

    /// Whether a certificate naming `names`, issued at `issued` (unix
    /// seconds), belongs to a listed peer.
    fn allows(&self, names: &[String], issued: i64) -> bool {
        let peers = self.0.borrow();
        names
            .iter()
            .any(|n| peers.get(n).is_some_and(|from| issued >= *from))
    }
}

/// The DNS names and issue time (`notBefore`, unix seconds) of a peer's
/// leaf certificate, or `None` if it presented none or it cannot be read.
fn peer_certificate(conn: &Connection) -> Option<(Vec<String>, i64)> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((names, cert.validity().not_before.timestamp()))
}

/// Where agents attached to other relays are, as the primary last said.
#[derive(Debug, Clone)]
pub struct Locations {
    map: Arc<RwLock<HashMap<Uuid, Located>>>,
    /// Numbers each change of an agent's location, so that a relay can
    /// tell "moved" (even back to the same address) from "told again".
    seq: Arc<AtomicU64>,
    /// Ticks on every change (and on every attach or detach at the relay
    /// that owns this), for requests waiting for an agent to move.
    moved: Arc<tokio::sync::watch::Sender<()>>,
}

/// One agent's home relay and the number of that location.
#[derive(Debug, Clone)]
struct Located {
    relay: RelayInfo,
    seq: u64,
}

impl Default for Locations {
    fn default() -> Self {
        Self {
            map: Arc::default(),
            seq: Arc::default(),
            moved: Arc::new(tokio::sync::watch::Sender::new(())),
        }
    }
}

impl Locations {
    /// Records where `agent` is now (`None`: nowhere). Being told what is
    /// already known (an edge repeats the primary's answer with every
    /// decision) changes nothing.
    pub fn set(&self, location: AgentLocation) {
        let mut map = self.map.write();
        let changed = match location.relay {
            Some(relay) => {
                if map
                    .get(&location.agent_id)
                    .is_some_and(|l| l.relay == relay)
                {
                    false
                } else {
                    let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                    map.insert(location.agent_id, Located { relay, seq });
                    true
                }
            }
            None => map.remove(&location.agent_id).is_some(),
        };
        drop(map);
        if changed {
            self.touch();
        }
    }

    /// Replaces everything (a snapshot after a reconnect); an agent whose
    /// relay is unchanged keeps its number.
    pub fn replace(&self, all: Vec<AgentLocation>) {
        let mut map = self.map.write();
        let fresh = all
            .into_iter()
            .filter_map(|l| {
                let relay = l.relay?;
                let seq = match map.get(&l.agent_id) {
                    Some(old) if old.relay == relay => old.seq,
                    _ => self.seq.fetch_add(1, Ordering::Relaxed),
                };
                Some((l.agent_id, Located { relay, seq }))
            })
            .collect();
        *map = fresh;
        drop(map);
        self.touch();
    }

    /// The home relay of `agent`, if known.
    pub fn get(&self, agent: Uuid) -> Option<RelayInfo> {
        self.map.read().get(&agent).map(|l| l.relay.clone())
    }

    /// `agent`'s home relay and the number of that location, if known.
    fn located(&self, agent: Uuid) -> Option<(RelayInfo, u64)> {
        self.map
            .read()
            .get(&agent)
            .map(|l| (l.relay.clone(), l.seq))
    }

    /// The number of `agent`'s current location, if it has one.
    fn seq(&self, agent: Uuid) -> Option<u64> {
        self.map.read().get(&agent).map(|l| l.seq)
    }

    /// How many agents are located.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Whether no agent is located.
    pub fn is_empty(&self) -> bool {
        self.map.read().is_empty()
    }

    /// Wakes whoever waits in [`Locations::watch`].
    fn touch(&self) {
        self.moved.send_modify(|()| ());
    }

    /// A receiver that sees every change after this call.
    fn watch(&self) -> tokio::sync::watch::Receiver<()> {
        self.moved.subscribe()
    }
}

/// Where a relay would send a stream for an agent; it changes whenever the
/// agent attaches anywhere anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whereabouts {
    /// Attached here, over the connection with this id.
    Here(usize),
    /// At another relay, by the location with this number.
    There(u64),
    Nowhere,
}

/// Counters a relay keeps; the owner exports them with its metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Streams opened to agents attached here (including for mesh peers).
    pub streams_local: AtomicU64,
    /// Streams sent over the mesh to another relay.
    pub mesh_streams_out: AtomicU64,
    /// Mesh streams received from other relays.
    pub mesh_streams_in: AtomicU64,
    /// Bytes spliced between mesh streams and agent streams, both ways.
    pub mesh_bytes: AtomicU64,
    /// Attach tickets refused.
    pub attach_refused: AtomicU64,
    /// Mesh streams refused for want of a valid grant.
    pub mesh_denied: AtomicU64,
    /// Malformed input ended: an agent connection whose control stream did
    /// not open with an attach ticket (garbage, a truncated frame, silence),
    /// or a mesh stream whose header did not parse or arrive in time.
    pub malformed: AtomicU64,
    /// Mesh connections refused or closed: the peer is not (or no longer)
    /// a listed relay.
    pub mesh_peers_refused: AtomicU64,
    /// Connections refused because their IP had too many open.
    pub refused_per_ip: AtomicU64,
    /// Opens that waited for their agent to move and tried again.
    pub rerouted: AtomicU64,
    /// Streams an agent attached here reset because it could not read
    /// their header (it logs them; this is where they are counted).
    pub agent_refused_headers: AtomicU64,
    /// Pauses of bulk app transfers so interactive requests to the same
    /// app went first ([`crate::pace`]).
    pub bulk_pauses: AtomicU64,
    /// Agents attached right now.
    pub attached: AtomicI64,
}

impl RelayStats {
    /// The counters in the OpenMetrics text format, each name starting
    /// with `prefix` (`devmesh_edge`, `devmesh_relay`), for the owner to
    /// append to its own exposition (before its `# EOF`).
    pub fn openmetrics(&self, prefix: &str) -> String {
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        format!(
            "# HELP {prefix}_agents_attached Agents attached to this relay.\n\
             # TYPE {prefix}_agents_attached gauge\n\
             {prefix}_agents_attached {}\n\
             # HELP {prefix}_streams Streams opened, by path: to a local agent, over the mesh out, from the mesh in.\n\
             # TYPE {prefix}_streams counter\n\
             {prefix}_streams_total{{path=\"local\"}} {}\n\
             {prefix}_streams_total{{path=\"mesh_out\"}} {}\n\
             {prefix}_streams_total{{path=\"mesh_in\"}} {}\n\
             # HELP {prefix}_mesh_bytes Bytes spliced for mesh peers.\n\
             # TYPE {prefix}_mesh_bytes counter\n\
             {prefix}_mesh_bytes_total {}\n\
             # HELP {prefix}_attach_refused Attach tickets refused.\n\
             # TYPE {prefix}_attach_refused counter\n\
             {prefix}_attach_refused_total {}\n\
             # HELP {prefix}_mesh_denied Mesh streams refused for want of a valid grant.\n\
             # TYPE {prefix}_mesh_denied counter\n\
             {prefix}_mesh_denied_total {}\n\
             # HELP {prefix}_malformed Connections and streams ended for malformed input (a control stream without an attach ticket, a mesh stream header that does not parse).\n\
             # TYPE {prefix}_malformed counter\n\
             {prefix}_malformed_total {}\n\
             # HELP {prefix}_rerouted Opens that waited for their agent to be located again (its relay died or it left this one) and tried there.\n\
             # TYPE {prefix}_rerouted counter\n\
             {prefix}_rerouted_total {}\n\
             # HELP {prefix}_agent_refused_headers Streams an agent reset because it could not read their header.\n\
             # TYPE {prefix}_agent_refused_headers counter\n\
             {prefix}_agent_refused_headers_total {}\n\
             # HELP {prefix}_bulk_pauses Pauses of bulk app transfers so interactive requests to the same app went first.\n\
             # TYPE {prefix}_bulk_pauses counter\n\
             {prefix}_bulk_pauses_total {}\n",
            self.attached.load(Ordering::Relaxed),
            load(&self.streams_local),
            load(&self.mesh_streams_out),
            load(&self.mesh_streams_in),
            load(&self.mesh_bytes),
            load(&self.attach_refused),
            load(&self.mesh_denied),
            load(&self.malformed),
            load(&self.rerouted),
            load(&self.agent_refused_headers),
            load(&self.bulk_pauses),
        )
    }
}

/// Everything a relay is started with.
pub struct RelayConfig {
    /// The UDP socket to serve on (see `devmesh_net::sockets::udp_socket`).
    pub socket: std::net::UdpSocket,
    /// How other relays and agents reach this one: its region, dial address
    /// and TLS name. A location naming this address means "here".
    pub advertised: RelayInfo,
    /// This relay's mesh certificate chain (server and client auth).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key of `cert_chain`'s leaf.
    pub key: PrivateKeyDer<'static>,
    /// The mesh CA, the only root trusted for mesh peers.
    pub mesh_ca_pem: String,
    /// Verifies attach tickets.
    pub keys: Keys,
    /// Where attach and detach events go.
    pub events: mpsc::UnboundedSender<AttachEvent>,
    /// Where other relays' agents are.
    pub locations: Locations,
    /// Signs grants for mesh streams opened without one (the primary).
    pub grant_signer: Option<GrantSigner>,
    /// The relays mesh traffic may go to and come from.
    pub peers: MeshPeers,
    /// QUIC connections one IP may have open (agents, probes and mesh
    /// peers alike); `0`: no limit.
    pub max_connections_per_ip: usize,
    /// Revocations: an app token carried as a mesh grant must not be
    /// revoked (its key deleted, its user signed out or suspended).
    pub revocations: Arc<crate::revocations::Revocations>,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("socket", &self.socket.local_addr().ok())
            .field("advertised", &self.advertised)
            .finish_non_exhaustive()
    }
}

/// An attached agent's tunnel, with the ticket it attached with (the proof
/// an edge shows the primary that the agent chose this relay).
struct AgentTunnel {
    conn: Connection,
    ticket: Arc<str>,
}

struct Inner {
    agents: Mutex<HashMap<Uuid, AgentTunnel>>,
    /// Nonces of the tickets accepted here, until they expire (unix s).
    spent: Mutex<HashMap<String, i64>>,
    /// Mesh grants verified here, by their signed form.
    grants: Mutex<HashMap<String, VerifiedGrant>>,
    /// Mesh links this relay dialed, by address, with when the peer's
    /// certificate was issued.
    links: Mutex<HashMap<String, (Connection, i64)>>,
    /// Relays found dead (a link that went silent, a dial that failed), by
    /// address, with when: streams for their agents fail at once for
    /// [`DEAD_FOR`] instead of each waiting out a dial, while the agents
    /// re-attach elsewhere and the primary says where.
    dead: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Agents whose last wait for a move ended with them where they were:
    /// opens for them fail at once until they are somewhere else.
    stalled: Mutex<HashMap<Uuid, Whereabouts>>,
    endpoint: quinn::Endpoint,
    mesh_client: RwLock<quinn::ClientConfig>,
    roots: Arc<rustls::RootCertStore>,
    advertised: RelayInfo,
    keys: Keys,
    events: mpsc::UnboundedSender<AttachEvent>,
    locations: Locations,
    grant_signer: Option<GrantSigner>,
    mesh_peers: MeshPeers,
    per_ip: Arc<devmesh_net::http::PerIp>,
    max_per_ip: usize,
    revocations: Arc<crate::revocations::Revocations>,
    stats: Arc<RelayStats>,
}

/// A running relay. Clones share one endpoint; it serves until the
/// `shutdown` token given to [`Relay::start`] fires.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
    /// The bound UDP address.
    pub local_addr: SocketAddr,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("local_addr", &self.local_addr)
            .field("region", &self.inner.advertised.region)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the relay and serves agents and mesh peers until `shutdown`.
    pub fn start(
        config: RelayConfig,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let roots = quic::mesh_roots(&config.mesh_ca_pem)?;
        let (server, mesh_client) = quic::relay(&roots, config.cert_chain, config.key)?;

        let socket = config.socket;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let relay = Self {
            inner: Arc::new(Inner {
                agents: Mutex::default(),
                spent: Mutex::default(),
                grants: Mutex::default(),
                links: Mutex::default(),
                dead: Mutex::default(),
                stalled: Mutex::default(),
                endpoint: endpoint.clone(),
                mesh_client: RwLock::new(mesh_client),
                roots,
                advertised: config.advertised,
                keys: config.keys,
                events: config.events,
                locations: config.locations,
                grant_signer: config.grant_signer,
                mesh_peers: config.peers,
                per_ip: Arc::default(),
                max_per_ip: config.max_connections_per_ip,
                revocations: config.revocations,
                stats: Arc::default(),
            }),
            local_addr,
        };
        let this = relay.clone();
        let tasks = tracker.clone();
        tracker.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    i = endpoint.accept() => match i { Some(i) => i, None => break },
                };
                let remote = incoming.remote_address();
                let Some(slot) = this.inner.per_ip.take(remote.ip(), this.inner.max_per_ip) else {
                    this.inner.stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client.addr = %remote, limit = this.inner.max_per_ip, "per-IP QUIC connection limit reached; refusing a connection");
                    incoming.refuse();
                    continue;
                };
                let this = this.clone();
                let inner_tasks = tasks.clone();
                tasks.spawn(async move {
                    let _slot = slot;
                    if let Err(e) = this.serve_connection(incoming, &inner_tasks).await {
                        tracing::debug!(client.addr = %remote, error = %e, "relay connection ended");
                    }
                });
            }
            endpoint.close(close::SHUTDOWN.into(), b"shutdown");
            endpoint.wait_idle().await;
        });
        tracing::info!(relay.address = %local_addr, relay.region = %relay.inner.advertised.region, "relay listening (QUIC)");
        Ok(relay)
    }

    /// Replaces the relay's mesh certificate (renewal): new agent and mesh
    /// connections use it; open ones keep theirs.
    pub fn set_certificate(
        &self,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<()> {
        let (server, client) = quic::relay(&self.inner.roots, cert_chain, key)?;
        self.inner.endpoint.set_server_config(Some(server));
        *self.inner.mesh_client.write() = client;
        Ok(())
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.inner.stats.clone()
    }

    /// How this relay is reached.
    pub fn advertised(&self) -> &RelayInfo {
        &self.inner.advertised
    }

    /// Whether `agent` is attached here.
    pub fn is_attached(&self, agent: Uuid) -> bool {
        self.inner.agents.lock().contains_key(&agent)
    }

    /// How this relay reaches `agent`, with QUIC's current round-trip
    /// estimates (for `devmesh ping`).
    pub fn route(&self, agent: Uuid) -> Route {
        if let Some(a) = self.inner.agents.lock().get(&agent) {
            return Route::Here { rtt: a.conn.rtt() };
        }
        match self.inner.locations.get(agent) {
            Some(home) => Route::Mesh {
                rtt: self
                    .inner
                    .links
                    .lock()
                    .get(&home.address)
                    .filter(|(c, _)| c.close_reason().is_none())
                    .map(|(c, _)| c.rtt()),
                region: home.region,
            },
            None => Route::Unknown,
        }
    }

    /// The agents attached here.
    pub fn attached_agents(&self) -> Vec<Uuid> {
        self.inner.agents.lock().keys().copied().collect()
    }

    /// The tickets the agents attached here presented: the primary's own
    /// signed proof that each agent chose this relay.
    pub fn attachment_proofs(&self) -> Vec<String> {
        self.inner
            .agents
            .lock()
            .values()
            .map(|a| a.ticket.to_string())
            .collect()
    }

    /// Opens a stream to `agent`: down its tunnel when it is attached here,
    /// otherwise over the mesh to its home relay, which opens it only with
    /// `grant` (an app token or a stream grant for this agent and stream;
    /// without one, this relay signs a grant if it can).
    ///
    /// An agent whose relay just died (or that just left this one) is
    /// re-attaching elsewhere: rather than fail at once, the open waits up
    /// to [`REROUTE_WAIT`] for the agent to attach anywhere anew and tries
    /// once more there. An agent with no location at all fails at once, and
    /// so does one already waited for in vain at the same place (a stopped
    /// workspace whose dead relay's record still stands).
    pub async fn open(
        &self,
        agent: Uuid,
        header: &StreamHeader,
        grant: Option<&str>,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        let (from, first) = self.open_once(agent, header, grant).await;
        let Err(OpenError::Lost | OpenError::NotConnected) = &first else {
            return first;
        };
        // Nowhere known, or already waited for at this same place in vain
        // (an agent that will not come back while its dead relay's record
        // stands): fail at once.
        if from == Whereabouts::Nowhere || self.inner.stalled.lock().get(&agent) == Some(&from) {
            return first;
        }
        // Subscribed before the check below, so no change is missed.
        let mut moves = self.inner.locations.watch();
        let deadline = tokio::time::Instant::now() + REROUTE_WAIT;
        while self.whereabouts(agent) == from {
            match tokio::time::timeout_at(deadline, moves.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let mut stalled = self.inner.stalled.lock();
                    if stalled.len() >= STALLED_KEPT {
                        stalled.clear();
                    }
                    stalled.insert(agent, from);
                    return first;
                }
            }
        }
        self.inner.stats.rerouted.fetch_add(1, Ordering::Relaxed);
        self.open_once(agent, header, grant).await.1
    }

    /// Where a stream for `agent` would go now.
    fn whereabouts(&self, agent: Uuid) -> Whereabouts {
        if let Some(a) = self.inner.agents.lock().get(&agent) {
            return Whereabouts::Here(a.conn.stable_id());
        }
        self.inner
            .locations
            .seq(agent)
            .map_or(Whereabouts::Nowhere, Whereabouts::There)
    }

    /// One try: where it went (taken from the same lookups, so a move
    /// during the try is seen as one) and what came of it.
    async fn open_once(
        &self,
        agent: Uuid,
        header: &StreamHeader,
        grant: Option<&str>,
    ) -> (Whereabouts, Result<(SendStream, RecvStream), OpenError>) {
        let local = self
            .inner
            .agents
            .lock()
            .get(&agent)
            .map(|a| (a.conn.clone(), a.conn.stable_id()));
        if let Some((conn, id)) = local {
            self.inner
                .stats
                .streams_local
                .fetch_add(1, Ordering::Relaxed);
            let opened = open_on(&conn, header, &self.inner.stats).await;
            return (Whereabouts::Here(id), opened);
        }
        let Some((home, seq)) = self.inner.locations.located(agent) else {
            return (Whereabouts::Nowhere, Err(OpenError::NotConnected));
        };
        let at = Whereabouts::There(seq);
        if home.address == self.inner.advertised.address {
            // The location is stale: the agent left this relay.
            return (at, Err(OpenError::NotConnected));
        }
        let grant = match (grant, &self.inner.grant_signer) {
            (Some(g), _) => g.to_owned(),
            (None, Some(sign)) => sign(&StreamGrant {
                agent_id: agent,
                stream: granted(header),
                exp: chrono::Utc::now().timestamp() + SELF_GRANT_SECS,
            }),
            (None, None) => String::new(),
        };
        let mesh = MeshHeader {
            agent_id: agent,
            grant,
            inner: header.clone(),
        };
        (at, self.open_mesh(&home, &mesh).await)
    }

    async fn open_mesh(
        &self,
        home: &RelayInfo,
        mesh: &MeshHeader,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        // A cached link may have died while idle: one retry on a fresh one.
        for attempt in 0..2 {
            let conn = self.peer(home, attempt > 0).await?;
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                continue;
            };
            if tio::write_mesh_header(&mut send, mesh).await.is_err() {
                continue;
            }
            let mut status = [0u8; 1];
            if recv.read_exact(&mut status).await.is_err() {
                return Err(OpenError::Lost);
            }
            self.inner
                .stats
                .mesh_streams_out
                .fetch_add(1, Ordering::Relaxed);
            return status_result(status[0]).map(|()| (send, recv));
        }
        Err(OpenError::Lost)
    }

    /// Whether a mesh stream's grant, signed by the primary and not expired,
    /// names its agent and what it opens. A grant's signature is checked
    /// once and remembered until it expires: an edge carries the same app
    /// token for every stream of a session, and verifying Ed25519 per
    /// stream costs more than the rest of opening one.
    fn authorised(&self, header: &MeshHeader) -> bool {
        let now = chrono::Utc::now().timestamp();
        let wanted = granted(&header.inner);
        let known = self.inner.grants.lock().get(&header.grant).cloned();
        let grant = match known {
            Some(g) if g.exp > now => g,
            _ => match self.verify_grant(&header.grant, now) {
                Some(g) => {
                    let mut grants = self.inner.grants.lock();
                    if grants.len() >= GRANTS_KEPT {
                        grants.retain(|_, g| g.exp > now);
                        if grants.len() >= GRANTS_KEPT {
                            grants.clear();
                        }
                    }
                    grants.insert(header.grant.clone(), g.clone());
                    g
                }
                None => return false,
            },
        };
        grant.agent == header.agent_id
            && grant.stream == wanted
            && grant
                .token
                .as_deref()
                .is_none_or(|t| !self.inner.revocations.revokes(t))
    }

    /// The grant a signed stream grant or app token makes.
    fn verify_grant(&self, signed: &str, now: i64) -> Option<VerifiedGrant> {
        if let Ok(g) = self.inner.keys.verify::<StreamGrant>(signed, now) {
            return Some(VerifiedGrant {
                agent: g.agent_id,
                stream: g.stream,
                exp: g.exp,
                token: None,
            });
        }
        let t = self.inner.keys.verify::<AppToken>(signed, now).ok()?;
        Some(VerifiedGrant {
            agent: t.agent_id,
            stream: GrantedStream::Port(t.port),
            exp: t.exp,
            token: Some(Arc::new(t)),
        })
    }

    /// A mesh connection to `home`, dialed if there is none (or `fresh`).
    async fn peer(&self, home: &RelayInfo, fresh: bool) -> Result<Connection, OpenError> {
        let now = tokio::time::Instant::now();
        if let Some(at) = self.inner.dead.lock().get(&home.address)
            && now.duration_since(*at) < DEAD_FOR
        {
            return Err(OpenError::Lost);
        }
        // A link that went silent means its relay is gone: say so at once.
        let silent = {
            let mut links = self.inner.links.lock();
            let silent = links.get(&home.address).is_some_and(|(c, _)| {
                matches!(c.close_reason(), Some(quinn::ConnectionError::TimedOut))
            });
            if silent {
                links.remove(&home.address);
            }
            silent
        };
        if silent {
            self.mark_dead(&home.address);
            return Err(OpenError::Lost);
        }
        if !fresh
            && let Some((c, issued)) = self.inner.links.lock().get(&home.address)
            && c.close_reason().is_none()
            && self
                .inner
                .mesh_peers
                .allows(std::slice::from_ref(&home.server_name), *issued)
        {
            return Ok(c.clone());
        }
        let dial = async {
            let addrs = devmesh_net::sockets::resolve(&home.address)
                .await
                .map_err(|_| OpenError::NotConnected)?;
            let mut last = OpenError::NotConnected;
            for addr in addrs {
                let connecting = self
                    .inner
                    .endpoint
                    .connect_with(
                        self.inner.mesh_client.read().clone(),
                        addr,
                        &home.server_name,
                    )
                    .map_err(|_| OpenError::NotConnected)?;
                match connecting.await {
                    Ok(c) if self.listed(&c) => {
                        let issued = peer_certificate(&c).map_or(0, |(_, i)| i);
                        return Ok((c, issued));
                    }
                    Ok(c) => {
                        c.close(close::NOT_A_MESH_PEER.into(), b"not a mesh peer");
                        tracing::warn!(relay.peer = %home.address, "a relay that is not a listed mesh peer answered; not sending to it");
                        return Err(OpenError::NotConnected);
                    }
                    Err(e) => {
                        tracing::warn!(relay.peer = %home.address, error = %e, "cannot reach a mesh peer");
                        last = OpenError::Lost;
                    }
                }
            }
            Err(last)
        };
        let dialed = match tokio::time::timeout(MESH_DIAL_TIMEOUT, dial).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(OpenError::Lost)) | Err(_) => Err(OpenError::Lost),
            Ok(Err(e)) => Err(e),
        };
        let (conn, issued) = match dialed {
            Ok(d) => d,
            Err(OpenError::Lost) => {
                self.mark_dead(&home.address);
                return Err(OpenError::Lost);
            }
            Err(e) => return Err(e),
        };
        self.inner.dead.lock().remove(&home.address);
        tracing::debug!(relay.peer = %home.address, relay.peer_region = %home.region, "mesh link up");
        self.inner
            .links
            .lock()
            .insert(home.address.clone(), (conn.clone(), issued));
        Ok(conn)
    }

    fn mark_dead(&self, address: &str) {
        let mut dead = self.inner.dead.lock();
        let now = tokio::time::Instant::now();
        dead.retain(|_, at| now.duration_since(*at) < DEAD_FOR);
        dead.insert(address.to_owned(), now);
        tracing::info!(relay.peer = %address, "a mesh peer is gone; not dialing it for a while");
    }

    async fn serve_connection(
        &self,
        incoming: quinn::Incoming,
        tasks: &TaskTracker,
    ) -> anyhow::Result<()> {
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await??;
        let alpn = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        if alpn.as_deref() == Some(tunnel::MESH_ALPN) {
            // rustls verified any certificate presented; a mesh peer must present one.
            if conn.peer_identity().is_none() {
                conn.close(
                    close::NO_MESH_CERTIFICATE.into(),
                    b"mesh peers must present a mesh certificate",
                );
                anyhow::bail!("a mesh connection without a client certificate");
            }
            if !self.listed(&conn) {
                conn.close(close::NOT_A_MESH_PEER.into(), b"not a mesh peer");
                anyhow::bail!("a mesh certificate of a relay that is not (or no longer) a peer");
            }
            // A listed peer carries every user connection between us
            // (its stream grant grows with use, in `serve_mesh`).
            conn.set_receive_window(quic::CONNECTION_WINDOW.into());
            self.serve_mesh(conn, tasks).await
        } else {
            self.serve_agent(conn).await
        }
    }

    /// Whether `conn`'s peer presented the certificate of a listed mesh
    /// peer (counted when not).
    fn listed(&self, conn: &Connection) -> bool {
        let ok = peer_certificate(conn)
            .is_some_and(|(names, issued)| self.inner.mesh_peers.allows(&names, issued));
        if !ok {
            self.inner
                .stats
                .mesh_peers_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    async fn serve_mesh(&self, conn: Connection, tasks: &TaskTracker) -> anyhow::Result<()> {
        tracing::debug!(relay.peer = %conn.remote_address(), "mesh peer connected");
        let mut peers = self.inner.mesh_peers.0.subscribe();
        let credit = quic::StreamCredit::new(conn.clone());
        loop {
            let (send, recv) = tokio::select! {
                s = conn.accept_bi() => s?,
                changed = peers.changed() => {
                    if changed.is_ok() && !self.listed(&conn) {
                        conn.close(close::NOT_A_MESH_PEER.into(), b"no longer a mesh peer");
                        tracing::info!(relay.peer = %conn.remote_address(), "closed the mesh link of a relay that is no longer a peer");
                        return Ok(());
                    }
                    continue;
                }
            };
            let this = self.clone();
            let open = credit.opened();
            tasks.spawn(async move {
                let _open = open;
                if let Err(e) = this.serve_mesh_stream(send, recv).await {
                    tracing::debug!(error = %e, "mesh stream ended");
                }
            });
        }
    }

    async fn serve_mesh_stream(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> anyhow::Result<()> {
        let header = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tio::read_mesh_header(&mut recv))
            .await
        {
            Ok(Ok(header)) => header,
            Ok(Err(e)) if !is_malformed(&e) => {
                // The peer reset the stream or the link went: not its input.
                tracing::debug!(error = %e, "a mesh stream ended before its header");
                return Ok(());
            }
            failed => {
                self.inner.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "none arrived in time".to_owned(),
                };
                tracing::warn!(stream.id = %send.id(), error = %why, "reset a mesh stream with a malformed header");
                let code = quinn::VarInt::from_u32(tunnel::stream_code::BAD_HEADER);
                let _ = send.reset(code);
                let _ = recv.stop(code);
                return Ok(());
            }
        };
        self.inner
            .stats
            .mesh_streams_in
            .fetch_add(1, Ordering::Relaxed);
        if !self.authorised(&header) {
            self.inner.stats.mesh_denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(agent.id = %header.agent_id, "refused a mesh stream without a valid grant");
            let _ = send.write_all(&[tunnel::status::DENIED]).await;
            let _ = send.finish();
            return Ok(());
        }
        // Only agents attached here: a mesh stream is never forwarded again.
        let local = self
            .inner
            .agents
            .lock()
            .get(&header.agent_id)
            .map(|a| a.conn.clone());
        let opened = match local {
            Some(agent) => open_on(&agent, &header.inner, &self.inner.stats).await,
            None => Err(OpenError::NotConnected),
        };
        let (agent_send, agent_recv) = match opened {
            Ok(s) => s,
            Err(e) => {
                let _ = send.write_all(&[error_status(e)]).await;
                let _ = send.finish();
                return Ok(());
            }
        };
        send.write_all(&[tunnel::status::OK]).await?;
        let bytes = splice((send, recv), (agent_send, agent_recv)).await;
        self.inner
            .stats
            .mesh_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Accepts a ticket signed by the primary, addressed to this relay, not
    /// expired and not presented here before.
    fn admit(&self, ticket: &str, now: i64) -> Result<AttachTicket, AdmitError> {
        let ticket: AttachTicket = self.inner.keys.verify(ticket, now)?;
        if ticket.relay != self.inner.advertised.address {
            return Err(AdmitError::OtherRelay);
        }
        let mut spent = self.inner.spent.lock();
        if spent.len() >= SPENT_PRUNE_AT {
            spent.retain(|_, exp| *exp > now);
        }
        if spent.insert(ticket.nonce.clone(), ticket.exp).is_some() {
            return Err(AdmitError::Replayed);
        }
        Ok(ticket)
    }

    async fn serve_agent(&self, conn: Connection) -> anyhow::Result<()> {
        let (mut send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await??;
        let mut control = tio::ControlReader::new(recv);
        let mut session = RelaySession::new();
        let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, control.next()).await {
            Ok(Ok(first)) => session.receive(first, tokio::time::Instant::now()),
            Ok(Err(e)) if !is_malformed(&e) => {
                // The agent went away mid-handshake (a restart, a flap):
                // not malformed input.
                anyhow::bail!("the connection ended before its attach: {e}");
            }
            Ok(Err(e)) => Err(SessionError::from(e)),
            Err(_) => Err(SessionError::Protocol("no attach ticket in time".into())),
        };
        let ticket_text = match first {
            Ok(RelayEvent::Ticket(ticket)) => ticket,
            other => {
                // Garbage, a truncated frame, or nothing in time: counted,
                // logged, and only this connection ends.
                self.inner.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client.addr = %conn.remote_address(), outcome = ?other, "closed a relay connection that did not open with an attach ticket");
                conn.close(close::EXPECTED_ATTACH.into(), b"expected attach");
                return Ok(());
            }
        };
        let ticket: AttachTicket = match self.admit(&ticket_text, chrono::Utc::now().timestamp()) {
            Ok(t) => t,
            Err(e) => {
                self.inner
                    .stats
                    .attach_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client.addr = %conn.remote_address(), error = %e, "refused an agent's attach ticket");
                session.refuse(format!("attach ticket: {e}"));
                let _ = tio::flush(&mut send, &mut session).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.closed()).await;
                conn.close(close::REFUSED.into(), b"refused");
                return Ok(());
            }
        };
        let agent = ticket.agent_id;
        // An agent's data arrives on the streams the relay opens; it never
        // needs a second stream of its own.
        conn.set_receive_window(quic::CONNECTION_WINDOW.into());
        // Answer first: an agent that cannot hear it never enters the registry.
        session.accept(
            self.inner.advertised.region.clone(),
            tokio::time::Instant::now(),
        );
        tio::flush(&mut send, &mut session).await?;
        let replaced = self.inner.agents.lock().insert(
            agent,
            AgentTunnel {
                conn: conn.clone(),
                ticket: ticket_text.into(),
            },
        );
        match replaced {
            Some(old) => old
                .conn
                .close(close::REPLACED.into(), b"replaced by a newer connection"),
            None => {
                self.inner.stats.attached.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.locations.touch();
        let _ = self.inner.events.send(AttachEvent::Attached {
            agent,
            workspace: ticket.workspace_id,
            issued_at_ms: ticket.issued_at_ms,
        });
        tracing::info!(agent.id = %agent, workspace.id = %ticket.workspace_id, client.addr = %conn.remote_address(), "agent attached");

        let result = async {
            loop {
                tokio::select! {
                    message = control.next() => match session.receive(message?, tokio::time::Instant::now()) {
                        Ok(RelayEvent::Alive) => {
                            let _ = self.inner.events.send(AttachEvent::Alive { agent });
                        }
                        Ok(_) => {}
                        Err(SessionError::Closed) => break,
                        Err(e) => return Err(e.into()),
                    },
                    _ = conn.closed() => break,
                }
                tio::flush(&mut send, &mut session).await?;
            }
            anyhow::Ok(())
        }
        .await;

        let removed = {
            let mut agents = self.inner.agents.lock();
            match agents.get(&agent) {
                Some(a) if a.conn.stable_id() == conn.stable_id() => {
                    agents.remove(&agent).is_some()
                }
                _ => false,
            }
        };
        if removed {
            self.inner.locations.touch();
            self.inner.stats.attached.fetch_sub(1, Ordering::Relaxed);
            let _ = self.inner.events.send(AttachEvent::Detached { agent });
            tracing::info!(agent.id = %agent, "agent detached");
        }
        result
    }
}

/// Whether a failed read of a header or control frame was the peer's
/// input (garbage, or a stream finished mid-frame) rather than the stream
/// or connection going away.
fn is_malformed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
    )
}

/// Opens a stream on an agent's tunnel and reads its status byte.
async fn open_on(
    conn: &Connection,
    header: &StreamHeader,
    stats: &RelayStats,
) -> Result<(SendStream, RecvStream), OpenError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|_| OpenError::Lost)?;
    tio::write_header(&mut send, header)
        .await
        .map_err(|_| OpenError::Lost)?;
    let mut status = [0u8; 1];
    match recv.read_exact(&mut status).await {
        Ok(()) => status_result(status[0]).map(|()| (send, recv)),
        // The agent could not read the header (or it did not arrive within
        // the agent's header timeout): a relay and an agent of versions
        // that do not agree, a relay sending garbage, or a path slow beyond
        // reason. Nothing to wait for; counted where operators look, as the
        // agent has no metrics of its own.
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)))
            if code == quinn::VarInt::from_u32(stream_code::BAD_HEADER) =>
        {
            stats.agent_refused_headers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                agent.conn = %conn.remote_address(),
                "the agent refused a stream header as malformed or late; are the relay and the agent of compatible versions?"
            );
            Err(OpenError::Unsupported)
        }
        Err(_) => Err(OpenError::Lost),
    }
}

fn status_result(status: u8) -> Result<(), OpenError> {
    match status {
        tunnel::status::OK => Ok(()),
        tunnel::status::REFUSED => Err(OpenError::Refused),
        tunnel::status::NOT_CONNECTED => Err(OpenError::NotConnected),
        tunnel::status::DENIED => Err(OpenError::Denied),
        _ => Err(OpenError::Unsupported),
    }
}

fn error_status(e: OpenError) -> u8 {
    match e {
        OpenError::NotConnected | OpenError::Lost => tunnel::status::NOT_CONNECTED,
        OpenError::Refused => tunnel::status::REFUSED,
        OpenError::Unsupported => tunnel::status::UNSUPPORTED,
        OpenError::Denied => tunnel::status::DENIED,
    }
}

/// What a stream header asks to open, as a grant names it.
fn granted(header: &StreamHeader) -> GrantedStream {
    match header {
        StreamHeader::Tcp { port } => GrantedStream::Port(*port),
        // Owner-only, each its own kind: a grant for an unaudited probe
        // opens no shell.
        StreamHeader::Ssh | StreamHeader::Pty { .. } => GrantedStream::Shell,
        StreamHeader::Probe { .. } => GrantedStream::Probe,
        StreamHeader::Udp { .. } => GrantedStream::Udp,
    }
}

/// Copies both ways until both directions end; a failure of one direction
/// resets that direction on both sides. Returns the bytes copied.
async fn splice(a: (SendStream, RecvStream), b: (SendStream, RecvStream)) -> u64 {
    async fn one_way(mut from: RecvStream, mut to: SendStream) -> u64 {
        match devmesh_net::splice::quic_to_quic(&mut from, &mut to).await {
            Ok(n) => n,
            Err(_) => {
                let _ = to.reset(stream_code::FAILED.into());
                let _ = from.stop(stream_code::FAILED.into());
                0
            }
        }
    }
    let ((a_send, a_recv), (b_send, b_recv)) = (a, b);
    let (x, y) = tokio::join!(one_way(a_recv, b_send), one_way(b_recv, a_send));
    x + y
}

#[cfg(test)]
mod tests;
