//! Real components for the agent's tests: a fake primary (axum) that
//! records what the agent reports, a QUIC relay with a test mesh CA (quinn
//! and rcgen), a UDP forwarder that makes a relay look far away, and small
//! TCP servers. Everything binds `127.0.0.1:0` and stops when dropped.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use devmesh_shared::api::{
    self, AGENT_TOKEN_HEADER, AgentLogEntry, AgentLogsAccepted, AgentLogsRequest, AgentManifest,
    AppHealth, AppHealthRequest, AttachTicketRequest, AttachTicketResponse, LifecycleRequest,
    LifecycleState, RelayInfo,
};
use devmesh_shared::secret::Secret;
use devmesh_shared::tunnel::io as wire;
use devmesh_shared::tunnel::session::{Outbox, RelayEvent, RelaySession};
use parking_lot::Mutex;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::client::ApiClient;

/// The agent token the fake primary accepts.
pub(crate) const TOKEN: &str = "test-token";

/// Upper bound for anything a test waits for: generous, since only a
/// failing test waits that long, and CI machines run the suite in parallel.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `fut`, failing the test after [`DEADLINE`].
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === Fake primary ===

/// Everything the agent sent to the fake primary, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    pub(crate) manifest_calls: u32,
    pub(crate) tickets_issued: u32,
    /// The relay each ticket was asked for, in order.
    pub(crate) ticket_relays: Vec<String>,
    pub(crate) lifecycle: Vec<LifecycleState>,
    /// Log posts that arrived (including ones still held by the gate).
    pub(crate) log_posts: u32,
    /// Batches answered with success, in order.
    pub(crate) log_batches: Vec<Vec<AgentLogEntry>>,
    pub(crate) health: Vec<BTreeMap<String, AppHealth>>,
}

/// How the fake primary behaves.
#[derive(Debug)]
pub(crate) struct Behaviour {
    pub(crate) manifest: AgentManifest,
    /// The first this-many manifest calls get a 401.
    pub(crate) unauthorized_manifests: u32,
    /// The first this-many log posts get a 500.
    pub(crate) failing_log_posts: u32,
    /// The first this-many log posts get a 413.
    pub(crate) rejected_log_posts: u32,
    /// From this many stored batches on, answers say `overflowed`.
    pub(crate) overflow_after: Option<usize>,
    /// If set, each log post waits for a permit before it is answered.
    pub(crate) log_gate: Option<Arc<Semaphore>>,
}

impl Behaviour {
    pub(crate) fn new(manifest: AgentManifest) -> Self {
        Self {
            manifest,
            unauthorized_manifests: 0,
            failing_log_posts: 0,
            rejected_log_posts: 0,
            overflow_after: None,
            log_gate: None,
        }
    }
}

/// A manifest with nothing in it.
pub(crate) fn empty_manifest() -> AgentManifest {
    AgentManifest {
        agent_id: uuid_from(1),
        agent_name: "main".into(),
        workspace_id: uuid_from(2),
        workspace_name: "ws".into(),
        owner_name: "alice".into(),
        directory: None,
        env: BTreeMap::new(),
        apps: Vec::new(),
        scripts: Vec::new(),
        metadata: Vec::new(),
        relays: Vec::new(),
        mesh_ca_pem: String::new(),
    }
}

fn uuid_from(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(n)
}

struct PrimaryState {
    recorded: Mutex<Recorded>,
    behaviour: Mutex<Behaviour>,
}

/// An in-process primary serving the agent API on `127.0.0.1:0`.
pub(crate) struct FakePrimary {
    pub(crate) url: String,
    state: Arc<PrimaryState>,
    _server: AbortOnDrop<()>,
}

impl FakePrimary {
    pub(crate) async fn start(behaviour: Behaviour) -> Self {
        let state = Arc::new(PrimaryState {
            recorded: Mutex::default(),
            behaviour: Mutex::new(behaviour),
        });
        let app = axum::Router::new()
            .route("/api/v2/workspaceagents/me/manifest", get(manifest))
            .route("/api/v2/workspaceagents/me/attach-ticket", post(ticket))
            .route("/api/v2/workspaceagents/me/lifecycle", post(lifecycle))
            .route("/api/v2/workspaceagents/me/logs", post(logs))
            .route("/api/v2/workspaceagents/me/app-health", post(app_health))
            .with_state(state.clone());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            state,
            _server: AbortOnDrop(server),
        }
    }

    pub(crate) fn client(&self) -> ApiClient {
        ApiClient::new(&self.url, Secret::new(TOKEN), None).unwrap()
    }

    pub(crate) fn recorded<T>(&self, f: impl FnOnce(&Recorded) -> T) -> T {
        f(&self.state.recorded.lock())
    }

    /// Serves `manifest` from now on.
    pub(crate) fn set_manifest(&self, manifest: AgentManifest) {
        self.state.behaviour.lock().manifest = manifest;
    }

    /// Waits until the recording satisfies `cond`.
    pub(crate) async fn wait_for(&self, what: &str, cond: impl Fn(&Recorded) -> bool) {
        eventually(what, || cond(&self.state.recorded.lock())).await;
    }
}

fn api_error(status: StatusCode, message: &str) -> Response {
    let body = api::Error {
        message: message.into(),
        detail: String::new(),
        validations: Vec::new(),
        denial: None,
    };
    (status, Json(body)).into_response()
}

/// The 401 answer if the request lacks the right token.
fn unauthorized(headers: &HeaderMap) -> Option<Response> {
    match headers.get(AGENT_TOKEN_HEADER) {
        Some(v) if v.as_bytes() == TOKEN.as_bytes() => None,
        _ => Some(api_error(StatusCode::UNAUTHORIZED, "invalid agent token")),
    }
}

async fn manifest(State(s): State<Arc<PrimaryState>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    let calls = {
        let mut rec = s.recorded.lock();
        rec.manifest_calls += 1;
        rec.manifest_calls
    };
    let b = s.behaviour.lock();
    if calls <= b.unauthorized_manifests {
        return api_error(StatusCode::UNAUTHORIZED, "workspace is stopped");
    }
    Json(b.manifest.clone()).into_response()
}

async fn ticket(
    State(s): State<Arc<PrimaryState>>,
    headers: HeaderMap,
    Json(req): Json<AttachTicketRequest>,
) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    let n = {
        let mut rec = s.recorded.lock();
        rec.ticket_relays.push(req.relay);
        rec.tickets_issued += 1;
        rec.tickets_issued
    };
    Json(AttachTicketResponse {
        ticket: format!("ticket-{n}"),
        expires_at: chrono::Utc::now() + chrono::TimeDelta::minutes(5),
    })
    .into_response()
}

async fn lifecycle(
    State(s): State<Arc<PrimaryState>>,
    headers: HeaderMap,
    Json(req): Json<LifecycleRequest>,
) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    s.recorded.lock().lifecycle.push(req.state);
    StatusCode::NO_CONTENT.into_response()
}

async fn logs(
    State(s): State<Arc<PrimaryState>>,
    headers: HeaderMap,
    Json(req): Json<AgentLogsRequest>,
) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    let post_no = {
        let mut rec = s.recorded.lock();
        rec.log_posts += 1;
        rec.log_posts
    };
    let gate = s.behaviour.lock().log_gate.clone();
    if let Some(gate) = gate {
        gate.acquire().await.unwrap().forget();
    }
    let (failing, rejected, overflow_after) = {
        let b = s.behaviour.lock();
        (b.failing_log_posts, b.rejected_log_posts, b.overflow_after)
    };
    if post_no <= failing {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, "database is down");
    }
    if post_no <= rejected {
        return api_error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let mut rec = s.recorded.lock();
    let accepted = req.logs.len();
    rec.log_batches.push(req.logs);
    let overflowed = overflow_after.is_some_and(|n| rec.log_batches.len() >= n);
    Json(AgentLogsAccepted {
        accepted,
        overflowed,
    })
    .into_response()
}

async fn app_health(
    State(s): State<Arc<PrimaryState>>,
    headers: HeaderMap,
    Json(req): Json<AppHealthRequest>,
) -> Response {
    if let Some(r) = unauthorized(&headers) {
        return r;
    }
    s.recorded.lock().health.push(req.health);
    StatusCode::NO_CONTENT.into_response()
}

// === Mesh CA and relay ===

/// A throwaway certificate authority.
pub(crate) struct TestCa {
    pub(crate) pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// A leaf certificate for `dns_name`, signed by this CA.
    pub(crate) fn leaf(
        &self,
        dns_name: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }
}

/// The relay's TLS server name in tests.
pub(crate) const RELAY_NAME: &str = "relay.test";

/// How the test relay treats agents.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayOptions {
    /// Refuse this many attaches before accepting.
    pub(crate) refuse_first: usize,
    /// Answer the agent's pings.
    pub(crate) answer_pings: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            refuse_first: 0,
            answer_pings: true,
        }
    }
}

/// An attached agent, as the relay sees it.
pub(crate) struct RelayConn {
    pub(crate) conn: Connection,
    pub(crate) ticket: String,
    /// When the relay answered `Attached`.
    pub(crate) attached_at: Instant,
    /// RTT probes the relay had seen when this agent attached.
    pub(crate) probes_before: usize,
    _control: AbortOnDrop<()>,
}

/// A QUIC relay speaking the tunnel protocol on `127.0.0.1:0`.
pub(crate) struct TestRelay {
    pub(crate) ca: Arc<TestCa>,
    pub(crate) addr: SocketAddr,
    endpoint: Endpoint,
    attached: mpsc::UnboundedReceiver<RelayConn>,
    tickets: Arc<Mutex<Vec<String>>>,
    probes: Arc<AtomicUsize>,
    _accept: AbortOnDrop<()>,
}

impl TestRelay {
    /// A relay with a mesh CA of its own.
    pub(crate) async fn start(options: RelayOptions) -> Self {
        Self::start_in(Arc::new(TestCa::new("test mesh CA")), options).await
    }

    /// A relay whose certificate `ca` signs, so several relays can share
    /// one manifest.
    pub(crate) async fn start_in(ca: Arc<TestCa>, options: RelayOptions) -> Self {
        let (chain, key) = ca.leaf(RELAY_NAME);
        // The real relay's settings, so the agent is tested against them.
        let roots = devmesh_net::quic::mesh_roots(&ca.pem).unwrap();
        let (config, _) = devmesh_net::quic::relay(&roots, chain, key).unwrap();
        let endpoint = Endpoint::server(config, (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, attached) = mpsc::unbounded_channel();
        let tickets = Arc::new(Mutex::new(Vec::new()));
        let probes = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            options,
            tx,
            tickets.clone(),
            probes.clone(),
        ));
        Self {
            ca,
            addr,
            endpoint,
            attached,
            tickets,
            probes,
            _accept: AbortOnDrop(accept),
        }
    }

    /// The relay as a manifest lists it.
    pub(crate) fn info(&self) -> RelayInfo {
        RelayInfo {
            region: "test".into(),
            address: self.addr.to_string(),
            server_name: RELAY_NAME.into(),
        }
    }

    /// A manifest pointing at this relay.
    pub(crate) fn manifest(&self) -> AgentManifest {
        AgentManifest {
            relays: vec![self.info()],
            mesh_ca_pem: self.ca.pem.clone(),
            ..empty_manifest()
        }
    }

    /// The next agent that attaches.
    pub(crate) async fn next_attached(&mut self) -> RelayConn {
        within("an agent to attach", self.attached.recv())
            .await
            .expect("relay stopped")
    }

    /// Every ticket presented so far, refused or not.
    pub(crate) fn tickets(&self) -> Vec<String> {
        self.tickets.lock().clone()
    }

    /// Connections that ended as RTT probes should: closed by the agent
    /// with the probe code, without opening a stream.
    pub(crate) fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.endpoint
            .close(devmesh_shared::tunnel::close::SHUTDOWN.into(), b"test over");
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    options: RelayOptions,
    attached: mpsc::UnboundedSender<RelayConn>,
    tickets: Arc<Mutex<Vec<String>>>,
    probes: Arc<AtomicUsize>,
) {
    let mut refused = 0;
    while let Some(incoming) = endpoint.accept().await {
        let Ok(conn) = incoming.await else { continue };
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(ConnectionError::ApplicationClosed(c))
                if c.error_code == crate::tunnel::close::PROBE =>
            {
                probes.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            Err(_) => continue,
        };
        let mut session = RelaySession::new();
        let first = wire::read_control(&mut recv).await;
        let Ok(RelayEvent::Ticket(ticket)) =
            session.receive(first.ok().flatten(), tokio::time::Instant::now())
        else {
            conn.close(
                devmesh_shared::tunnel::close::EXPECTED_ATTACH.into(),
                b"expected attach",
            );
            continue;
        };
        tickets.lock().push(ticket.clone());
        if refused < options.refuse_first {
            refused += 1;
            session.refuse("ticket expired".into());
            let _ = wire::flush(&mut send, &mut session).await;
            let _ = send.finish();
            // The agent closes after reading the refusal; close ourselves
            // only if it does not, so the frame is not lost.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(DEADLINE, conn.closed()).await;
                conn.close(devmesh_shared::tunnel::close::REFUSED.into(), b"refused");
            });
            continue;
        }
        let attached_at = Instant::now();
        // As the real relay does once an agent authenticates.
        conn.set_receive_window(devmesh_net::quic::CONNECTION_WINDOW.into());
        session.accept("test-relay".into(), tokio::time::Instant::now());
        let _ = wire::flush(&mut send, &mut session).await;
        let control = tokio::spawn(answer_pings(session, send, recv, options.answer_pings));
        let _ = attached.send(RelayConn {
            conn,
            ticket,
            attached_at,
            probes_before: probes.load(Ordering::SeqCst),
            _control: AbortOnDrop(control),
        });
    }
}

/// Keeps the relay's end of the session going; a relay told not to answer
/// pings reads them and stays silent, like a dead path would.
async fn answer_pings(
    mut session: RelaySession,
    mut send: SendStream,
    mut recv: RecvStream,
    answer: bool,
) {
    while let Ok(message) = wire::read_control(&mut recv).await {
        if session
            .receive(message, tokio::time::Instant::now())
            .is_err()
        {
            return;
        }
        if !answer {
            while session.transmit().is_some() {}
        } else if wire::flush(&mut send, &mut session).await.is_err() {
            return;
        }
    }
}

/// Opens a relay→agent stream and writes `prefix` (usually a header).
pub(crate) async fn open_stream(conn: &Connection, prefix: &[u8]) -> (SendStream, RecvStream) {
    let (mut send, recv) = within("a stream to open", conn.open_bi()).await.unwrap();
    send.write_all(prefix).await.unwrap();
    (send, recv)
}

/// Proves the tunnel serves: an echo through a relay-opened stream.
pub(crate) async fn echo_through(rc: &RelayConn) {
    let mut echo = echo_server().await;
    let header = header_bytes(&devmesh_shared::tunnel::StreamHeader::Tcp { port: echo.port });
    let (mut send, mut recv) = open_stream(&rc.conn, &header).await;
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    let got = within("the echo", recv.read_to_end(1024)).await.unwrap();
    assert_eq!(
        got,
        [&[devmesh_shared::tunnel::status::OK][..], b"ping"].concat()
    );
    within("echo EOF", echo.eofs.recv()).await.unwrap();
}

/// The bytes of a stream header.
pub(crate) fn header_bytes(h: &devmesh_shared::tunnel::StreamHeader) -> Vec<u8> {
    let mut out = Vec::new();
    h.encode(&mut out);
    out
}

// === A far-away path ===

/// A UDP forwarder in front of `target` that holds every datagram, in both
/// directions, for an adjustable delay: a relay behind it looks that far
/// away (the round trip grows by twice the delay). Each client address gets
/// its own upstream socket, as behind a NAT. A cut path drops every
/// datagram: the relay behind it looks dead.
pub(crate) struct DelayForwarder {
    /// Where clients send to.
    pub(crate) addr: SocketAddr,
    /// `None` while the path is cut.
    delay: Arc<Mutex<Option<Duration>>>,
    _task: AbortOnDrop<()>,
}

/// A datagram waiting out its delay: when it is due, and where it goes.
type Delayed = (Instant, Vec<u8>, SocketAddr);

impl DelayForwarder {
    pub(crate) async fn start(target: SocketAddr, delay: Duration) -> Self {
        let front = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
        let addr = front.local_addr().unwrap();
        let delay = Arc::new(Mutex::new(Some(delay)));
        let task = tokio::spawn(forward(front, target, delay.clone()));
        Self {
            addr,
            delay,
            _task: AbortOnDrop(task),
        }
    }

    /// Delays datagrams that arrive from now on by `delay`, each way.
    /// (This also mends a cut path.)
    pub(crate) fn set_delay(&self, delay: Duration) {
        *self.delay.lock() = Some(delay);
    }

    /// Drops every datagram from now on, both ways, until `set_delay`.
    pub(crate) fn cut(&self) {
        *self.delay.lock() = None;
    }
}

/// Reads from clients on `front`; each client's datagrams go to `target`
/// from its own upstream socket, and the answers come back through `front`.
/// Every task lives in one `JoinSet`, so aborting this task stops them all.
async fn forward(front: Arc<UdpSocket>, target: SocketAddr, delay: Arc<Mutex<Option<Duration>>>) {
    let mut tasks = JoinSet::new();
    let (back_tx, back_rx) = mpsc::unbounded_channel();
    tasks.spawn(deliver(front.clone(), back_rx));
    let mut upstreams: HashMap<SocketAddr, mpsc::UnboundedSender<Delayed>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        // Errors here are ICMP echoes of earlier sends; keep going.
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let Some(held) = *delay.lock() else { continue };
        let due = Instant::now() + held;
        let upstream = match upstreams.entry(client) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
                let (tx, rx) = mpsc::unbounded_channel();
                tasks.spawn(deliver(socket.clone(), rx));
                tasks.spawn(answers(socket, client, delay.clone(), back_tx.clone()));
                e.insert(tx)
            }
        };
        let _ = upstream.send((due, buf[..n].to_vec(), target));
    }
}

/// Relays `upstream`'s answers back towards `client`, delayed.
async fn answers(
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    delay: Arc<Mutex<Option<Duration>>>,
    back: mpsc::UnboundedSender<Delayed>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, _)) = upstream.recv_from(&mut buf).await else {
            continue;
        };
        let Some(held) = *delay.lock() else { continue };
        let due = Instant::now() + held;
        if back.send((due, buf[..n].to_vec(), client)).is_err() {
            return;
        }
    }
}

/// Sends each datagram from `socket` when it is due, in arrival order.
async fn deliver(socket: Arc<UdpSocket>, mut queue: mpsc::UnboundedReceiver<Delayed>) {
    while let Some((due, datagram, to)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        let _ = socket.send_to(&datagram, to).await;
    }
}

// === Local TCP servers ===

/// An echo server; each connection echoes until EOF, reports the EOF, then
/// half-closes its side.
pub(crate) struct Echo {
    pub(crate) port: u16,
    pub(crate) eofs: mpsc::UnboundedReceiver<()>,
    _task: AbortOnDrop<()>,
}

pub(crate) async fn echo_server() -> Echo {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, eofs) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tx.send(());
                let _ = w.shutdown().await;
            });
        }
    });
    Echo {
        port,
        eofs,
        _task: AbortOnDrop(task),
    }
}

/// A server that sends `banner`, half-closes, then reads until EOF and
/// reports what it read.
pub(crate) struct Banner {
    pub(crate) port: u16,
    pub(crate) received: mpsc::UnboundedReceiver<Vec<u8>>,
    _task: AbortOnDrop<()>,
}

pub(crate) async fn banner_server(banner: &'static [u8]) -> Banner {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, received) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                stream.write_all(banner).await.unwrap();
                stream.shutdown().await.unwrap();
                let mut got = Vec::new();
                let _ = stream.read_to_end(&mut got).await;
                let _ = tx.send(got);
            });
        }
    });
    Banner {
        port,
        received,
        _task: AbortOnDrop(task),
    }
}

/// A port nothing listens on (bound, then released).
pub(crate) async fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}
