//! The regional edge proxy (`devmesh edge`): serves a region's apps and relays its agents.
//!
//! An edge generates its mesh key and registers with the primary, receiving
//! a mesh certificate signed from its CSR, the app-token keys and its
//! sibling relays; it registers again every few seconds (the heartbeat,
//! which also reports the agents attached to its relay), deregisters on a
//! graceful shutdown, and exits with a clear message when its token is
//! revoked.
//!
//! Once registered it runs a relay agents attach to, follows the primary's
//! event stream ([`events`]), and serves its region's app domains
//! ([`apps`]): app requests are authorised with app tokens verified locally
//! and decisions cached from the primary, then relayed to the agent down its
//! tunnel or over the mesh to the agent's home relay. It also serves
//! `/healthz`, `/healthz-report`, `/latency-check` and `/metrics`.

#![forbid(unsafe_code)]

mod apps;
mod config;
mod events;
mod metrics;
mod primary;
mod shell;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use devmesh_net::backoff::Backoff;
use devmesh_proxy::relay::{AttachEvent, Keys, Locations, MeshPeers, Relay, RelayConfig};
use devmesh_proxy::upstream::Pool;
use devmesh_shared::api::{
    EdgeAppAccess, EdgeAppAccessRequest, EdgeAppConnectRequest, EdgeEvent, EdgeHealthReport,
    EdgeRegisterRequest, EdgeRegisterResponse, RelayInfo,
};
use devmesh_shared::signing::AppToken;
use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use crate::config::{EdgeArgs, EdgeConfig};
use crate::metrics::Metrics;

/// What the edge knows about its registration, for `/healthz-report`.
#[derive(Debug)]
struct Status {
    registration: Option<EdgeRegisterResponse>,
    last_registered_at: Option<chrono::DateTime<Utc>>,
    last_error: Option<String>,
}

/// A cached access decision from the primary for one (app host, key).
#[derive(Debug)]
pub(crate) struct Decision {
    /// The signed app token: the mesh grant, and the browser's cookie.
    pub(crate) token: String,
    /// `token`'s claims: its target, expiry and what revocations apply.
    pub(crate) claims: AppToken,
    /// Set while a background refresh runs, so only one does.
    refreshing: std::sync::atomic::AtomicBool,
}

/// The edge, shared by its tasks and handlers.
pub(crate) struct Edge {
    pub(crate) config: EdgeConfig,
    /// The primary's edge API.
    pub(crate) primary: primary::PrimaryClient,
    replica_id: Uuid,
    status: RwLock<Status>,
    /// Verifies attach tickets and app tokens (replaced when keys rotate).
    pub(crate) keys: Keys,
    pub(crate) locations: Locations,
    /// The relays this edge's relay may exchange mesh traffic with.
    mesh_peers: MeshPeers,
    pub(crate) relay: OnceLock<Relay>,
    pub(crate) upstreams: Arc<Pool>,
    /// (app host, sha256 of the key or "") → decision.
    pub(crate) decisions: moka::future::Cache<(String, [u8; 32]), Arc<Decision>>,
    /// Recent refusals from the primary, same keys, kept a few seconds.
    pub(crate) refusals: moka::future::Cache<(String, [u8; 32]), devmesh_proxy::app::AppError>,
    /// Revoked users, workspaces and keys.
    revocations: Arc<devmesh_proxy::revocations::Revocations>,
    /// Calls to the primary each client IP may cause.
    pub(crate) primary_calls: devmesh_proxy::ratelimit::RateLimiter,
    pub(crate) metrics: Metrics,
    /// Regional and global app wildcards.
    pub(crate) wildcards: Vec<String>,
    /// `https` when the edge terminates TLS.
    pub(crate) scheme: &'static str,
    /// Wakes the registration loop to report attachments at once.
    attachments_changed: Notify,
    /// The relay's address as agents and other relays dial it.
    relay_address: String,
    /// Cancelled when the edge shuts down: ends shell sessions.
    pub(crate) shutdown: CancellationToken,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("replica_id", &self.replica_id)
            .field("primary", &self.primary.url())
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// Applies an event from the primary.
    pub(crate) fn apply(&self, event: EdgeEvent) {
        match event {
            EdgeEvent::Snapshot {
                agents,
                revocations,
                app_token_keys,
                mesh_peers,
            } => {
                self.locations.replace(agents);
                self.mesh_peers.set(mesh_peers);
                for rev in revocations {
                    self.revocations.revoke(rev.subject, rev.at_ms);
                }
                if let Err(e) = self.keys.set(&app_token_keys) {
                    tracing::warn!(error = %e, "unusable app token keys from the primary");
                }
                // Events may have been missed: decide afresh.
                self.decisions.invalidate_all();
                tracing::info!(
                    agents = self.locations.len(),
                    "synchronised with the primary"
                );
            }
            EdgeEvent::AgentMoved(location) => self.locations.set(location),
            EdgeEvent::Revoked(rev) => {
                let subject = rev.subject.clone();
                self.revocations.revoke(rev.subject.clone(), rev.at_ms);
                let _ = self
                    .decisions
                    .invalidate_entries_if(move |_, d| rev.revokes(&d.claims));
                tracing::debug!(?subject, "revocation applied");
            }
            EdgeEvent::Keys { app_token_keys } => {
                if let Err(e) = self.keys.set(&app_token_keys) {
                    tracing::warn!(error = %e, "unusable app token keys from the primary");
                }
            }
            EdgeEvent::MeshPeers { peers } => self.mesh_peers.set(peers),
            EdgeEvent::Ping => {}
        }
    }

    /// This edge's region, once registered.
    pub(crate) fn region(&self) -> String {
        self.status
            .read()
            .registration
            .as_ref()
            .map(|r| r.edge_name.clone())
            .unwrap_or_default()
    }

    /// Whether a revocation cuts `token` off.
    pub(crate) fn revoked(&self, token: &AppToken) -> bool {
        self.revocations.revokes(token)
    }

    /// Asks the primary whether the holder of `credential` (or anyone) may
    /// open `host`.
    pub(crate) async fn ask_primary(
        &self,
        host: &str,
        credential: apps::Credential<'_>,
    ) -> Result<Decision, devmesh_proxy::app::AppError> {
        let (key, token) = match credential {
            apps::Credential::None => (None, None),
            apps::Credential::Key(k) => (Some(k.to_owned()), None),
            apps::Credential::Token(t) => (None, Some(t.to_owned())),
        };
        let request = EdgeAppAccessRequest {
            host: host.to_owned(),
            key,
            token,
        };
        let answer = self.primary.app_access(&request).await;
        self.decided(answer)
    }

    /// Redeems a sealed one-time grant through the primary, for an app
    /// token on `host`.
    pub(crate) async fn app_connect(
        &self,
        sealed: &str,
        state: &str,
        host: &str,
    ) -> Result<Decision, devmesh_proxy::app::AppError> {
        let request = EdgeAppConnectRequest {
            sealed: sealed.to_owned(),
            state: state.to_owned(),
            host: host.to_owned(),
        };
        let answer = self.primary.app_connect(&request).await;
        self.decided(answer)
    }

    /// Records what an access call to the primary says: whether the
    /// primary answered, and where the agent is.
    fn decided(
        &self,
        answer: Result<EdgeAppAccess, primary::DecisionError>,
    ) -> Result<Decision, devmesh_proxy::app::AppError> {
        self.metrics.primary_requests.inc();
        let access = match answer {
            Ok(access) => access,
            Err(primary::DecisionError::Denied(e)) => {
                self.metrics.primary_reachable.set(1);
                return Err(e);
            }
            Err(primary::DecisionError::Unreachable(why)) => {
                tracing::warn!(error = %why, "no access decision from the primary");
                self.metrics.primary_reachable.set(0);
                return Err(devmesh_proxy::app::AppError::PrimaryUnavailable);
            }
        };
        self.metrics.primary_reachable.set(1);
        if let Some(relay) = access.location {
            self.locations.set(devmesh_shared::api::AgentLocation {
                agent_id: access.claims.agent_id,
                relay: Some(relay),
            });
        }
        Ok(Decision {
            token: access.token,
            claims: access.claims,
            refreshing: false.into(),
        })
    }
}

/// Runs the edge until `shutdown`, then deregisters. Returns an error when
/// the primary refuses the edge's token (revoked or wrong), with a message
/// that says so.
pub async fn run(args: EdgeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Every setting is checked before anything binds.
    let config = args.resolve()?;
    let http = devmesh_net::sockets::http_client(
        concat!("devmesh-edge/", env!("CARGO_PKG_VERSION")),
        Duration::from_secs(15),
        config.ca_cert.as_deref(),
    )?;
    let mesh_key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&mesh_key)?
        .pem()?;
    let wildcards = config.wildcards();
    let tls = devmesh_net::tls::https(
        &config.tls,
        &config.access_url,
        &wildcards,
        shutdown.clone(),
    )?;
    // Bound now, so a `:0` port is known before registering.
    let (relay_socket, relay_address) = match config.relay_bind {
        Some(bind) => (
            devmesh_net::sockets::udp_socket(bind)
                .with_context(|| format!("cannot bind the relay to {bind}"))?,
            config.relay_address.clone(),
        ),
        None => bind_relay(&config.relay_address)?,
    };
    let edge = Arc::new(Edge {
        primary: primary::PrimaryClient::new(http, &config.primary_url, config.edge_token.expose()),
        replica_id: Uuid::new_v4(),
        status: RwLock::new(Status {
            registration: None,
            last_registered_at: None,
            last_error: None,
        }),
        keys: Keys::new(&[]).map_err(|e| anyhow::anyhow!("{e}"))?,
        locations: Locations::default(),
        mesh_peers: MeshPeers::default(),
        relay: OnceLock::new(),
        upstreams: Arc::default(),
        decisions: moka::future::Cache::builder()
            .max_capacity(1_000_000)
            .time_to_live(Duration::from_secs(
                devmesh_proxy::app::APP_TOKEN_LIFETIME_SECS as u64,
            ))
            .support_invalidation_closures()
            .build(),
        refusals: moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(3))
            .build(),
        revocations: Default::default(),
        primary_calls: devmesh_proxy::ratelimit::RateLimiter::new(
            config.access_checks_per_minute,
            Duration::from_secs(60),
        ),
        metrics: Metrics::new(),
        wildcards,
        scheme: if tls.is_some() { "https" } else { "http" },
        attachments_changed: Notify::new(),
        relay_address,
        shutdown: shutdown.clone(),
        config,
    });

    let listener = tokio::net::TcpListener::bind(edge.config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", edge.config.listen))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/healthz-report", get(report))
        .route("/latency-check", get(devmesh_proxy::app::latency_check))
        .route("/metrics", get(metrics))
        .route(
            "/api/v2/workspaceagents/{agent}/ssh",
            axum::routing::post(shell::ssh),
        )
        .route("/api/v2/workspaceagents/{agent}/pty", get(shell::terminal))
        .route(
            "/api/v2/workspaceagents/{agent}/probe",
            axum::routing::post(shell::probe),
        )
        .route(
            "/api/v2/workspaceagents/{agent}/udp",
            axum::routing::post(shell::udp),
        )
        .layer(axum::middleware::from_fn_with_state(
            edge.clone(),
            apps::route_apps,
        ))
        .with_state(edge.clone());
    let serve_shutdown = shutdown.clone();
    let scheme = edge.scheme;
    let limits = devmesh_net::http::Limits {
        max_connections_per_ip: edge.config.max_connections_per_ip,
        ..devmesh_net::http::Limits::default()
    };
    let server = tokio::spawn(devmesh_net::http::serve(
        listener,
        app,
        tls,
        serve_shutdown,
        limits,
    ));
    println!("Started edge listener at {scheme}://{local}");

    let tracker = TaskTracker::new();
    let result = register_loop(&edge, &csr, (mesh_key, relay_socket), &shutdown, &tracker).await;
    shutdown.cancel();
    if result.is_ok() {
        deregister(&edge).await;
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    let _ = server.await;
    result
}

/// Registers, then heartbeats (registering again) until shutdown; starts
/// the relay and the event stream after the first registration.
async fn register_loop(
    edge: &Arc<Edge>,
    csr: &str,
    relay_parts: (rcgen::KeyPair, std::net::UdpSocket),
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let mut relay_parts = Some(relay_parts);
    // The mesh key (to renew the certificate with) and when the relay's
    // certificate was last loaded.
    let mut mesh_key_der: Vec<u8> = Vec::new();
    let mut cert_loaded = tokio::time::Instant::now();
    // The edge name the certificate carries.
    let mut cert_name: Option<String> = None;
    let mut backoff = Backoff::default();
    loop {
        let request = EdgeRegisterRequest {
            replica_id: edge.replica_id,
            version: devmesh_shared::VERSION.into(),
            access_url: edge.config.access_url.clone(),
            wildcard_hostname: edge.config.wildcard_access_url.clone(),
            global_wildcard_hostname: edge.config.global_wildcard_access_url.clone(),
            relay_address: edge.relay_address.clone(),
            csr_pem: csr.to_owned(),
            attachments: edge
                .relay
                .get()
                .map(Relay::attachment_proofs)
                .unwrap_or_default(),
        };
        let next = match edge.primary.register(&request).await {
            Ok(reg) => {
                // Known before the relay starts, and again on every
                // heartbeat in case an event was missed.
                edge.mesh_peers.set(reg.mesh_peers.clone());
                let interval = Duration::from_secs(reg.heartbeat_interval_seconds.clamp(1, 60));
                if let Some((key, socket)) = relay_parts.take() {
                    mesh_key_der = key.serialize_der();
                    cert_name = Some(reg.edge_name.clone());
                    if let Err(e) = edge.keys.set(&reg.app_token_keys) {
                        tracing::warn!(error = %e, "unusable app token keys");
                    }
                    start_relay(edge, &reg, key, socket, shutdown, tracker)?;
                    tracker.spawn(events::follow(edge.clone(), shutdown.clone()));
                    tracing::info!(edge = %reg.edge_name, primary = %edge.primary.url(), "registered with the primary");
                } else if (cert_loaded.elapsed() >= CERT_RENEW_AFTER
                    || cert_name.as_deref() != Some(reg.edge_name.as_str()))
                    && let Some(relay) = edge.relay.get()
                {
                    // Every registration brings a fresh certificate
                    // (valid an hour); take one every few minutes,
                    // and at once when the edge was renamed.
                    match renew(relay, &reg.mesh_cert_pem, &mesh_key_der) {
                        Ok(()) => {
                            cert_loaded = tokio::time::Instant::now();
                            cert_name = Some(reg.edge_name.clone());
                            tracing::info!("renewed the relay's mesh certificate");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not renew the relay's mesh certificate")
                        }
                    }
                }
                edge.metrics.primary_reachable.set(1);
                let mut s = edge.status.write();
                s.registration = Some(reg);
                s.last_registered_at = Some(Utc::now());
                s.last_error = None;
                backoff.reset();
                interval
            }
            Err(e @ (primary::CallError::TokenRefused | primary::CallError::Refused(_))) => {
                return Err(e.into());
            }
            Err(e) => failure(edge, e.to_string(), &mut backoff),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(next) => {}
            // Attachments changed: report them now (after a moment, so a
            // burst of attaches becomes one report).
            _ = edge.attachments_changed.notified(), if relay_parts.is_none() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long the relay keeps a mesh certificate (valid an hour) before taking
/// the fresh one its next registration brings.
const CERT_RENEW_AFTER: Duration = Duration::from_secs(10 * 60);

/// Loads a renewed mesh certificate into the relay.
fn renew(relay: &Relay, cert_pem: &str, key_der: &[u8]) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.to_vec().into());
    relay.set_certificate(chain, key)
}

/// Starts the edge's relay with the mesh certificate from the registration.
fn start_relay(
    edge: &Arc<Edge>,
    reg: &EdgeRegisterResponse,
    key: rcgen::KeyPair,
    socket: std::net::UdpSocket,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(reg.mesh_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the mesh certificate from the primary")?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let (events, mut attach_events) = tokio::sync::mpsc::unbounded_channel();
    let relay = Relay::start(
        RelayConfig {
            socket,
            advertised: RelayInfo {
                region: reg.edge_name.clone(),
                address: edge.relay_address.clone(),
                server_name: devmesh_shared::names::relay_server_name(&reg.edge_name),
            },
            cert_chain: chain,
            key,
            mesh_ca_pem: reg.mesh_ca_pem.clone(),
            keys: edge.keys.clone(),
            events,
            locations: edge.locations.clone(),
            grant_signer: None,
            peers: edge.mesh_peers.clone(),
            max_connections_per_ip: edge.config.max_connections_per_ip,
            revocations: edge.revocations.clone(),
        },
        shutdown.clone(),
        tracker,
    )?;
    let _ = edge.relay.set(relay);
    let e = edge.clone();
    tracker.spawn(async move {
        while let Some(event) = attach_events.recv().await {
            if !matches!(event, AttachEvent::Alive { .. }) {
                e.attachments_changed.notify_one();
            }
        }
    });
    Ok(())
}

/// Binds the relay's UDP socket for `--relay-address` and returns it with
/// the address to advertise: the flag itself, with a `:0` port replaced by
/// the one bound. A name binds every interface at its port.
fn bind_relay(address: &str) -> anyhow::Result<(std::net::UdpSocket, String)> {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .context("--relay-address must be host:port")?;
    let bind: SocketAddr = match address.parse() {
        Ok(a) => a,
        Err(_) => SocketAddr::from(([0, 0, 0, 0], port)),
    };
    let socket = devmesh_net::sockets::udp_socket(bind)
        .with_context(|| format!("cannot bind the relay to {bind}"))?;
    let bound = socket.local_addr()?.port();
    Ok((socket, format!("{host}:{bound}")))
}

async fn deregister(edge: &Edge) {
    match edge.primary.deregister(edge.replica_id).await {
        Ok(()) => tracing::info!("deregistered from the primary"),
        Err(e) => {
            tracing::warn!(error = %e, "could not deregister; the primary will mark this replica unreachable")
        }
    }
}

/// Records a failed registration; returns how long to wait before the next try.
fn failure(edge: &Edge, error: String, backoff: &mut Backoff) -> Duration {
    tracing::warn!(error = %error, "registration with the primary failed; retrying");
    edge.metrics.primary_reachable.set(0);
    edge.status.write().last_error = Some(error);
    backoff.next_delay()
}

async fn report(State(edge): State<Arc<Edge>>) -> Json<EdgeHealthReport> {
    let s = edge.status.read();
    let fresh = s
        .last_registered_at
        .is_some_and(|t| (Utc::now() - t).num_seconds() < 30);
    Json(EdgeHealthReport {
        edge_name: s.registration.as_ref().map(|r| r.edge_name.clone()),
        replica_id: edge.replica_id,
        version: devmesh_shared::VERSION.into(),
        primary_reachable: fresh && s.last_error.is_none(),
        last_registered_at: s.last_registered_at,
        last_error: s.last_error.clone(),
    })
}

async fn metrics(State(edge): State<Arc<Edge>>) -> impl IntoResponse {
    let stats = edge.relay.get().map(Relay::stats);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        edge.metrics.encode(stats.as_deref()),
    )
}
