//! The `/api/v2` HTTP API: routing, shared state, middleware and the audit
//! log helper. Handlers live in one submodule per resource.

mod agents;
pub(crate) mod apps;
mod dashboard;
mod edges;
pub mod error;
pub mod extract;
mod login;
mod meta;
pub(crate) mod provisioners;
mod ssh;
mod templates;
mod users;
pub(crate) mod workspaces;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use sqlx::PgPool;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::auth::{KeyValidator, Principal};
use crate::config::ServerConfig;
use crate::keys::{Sealer, Signer};
use crate::mesh::MeshCa;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};
use crate::ratelimit::RateLimiter;
use devmesh_proxy::relay::Relay;
use error::{ApiError, DbUnavailable};

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Everything handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The connection pool to PostgreSQL (embedded or `--postgres-url`).
    pub db: PgPool,
    /// Validated configuration.
    pub config: Arc<ServerConfig>,
    /// API key validation and cache.
    pub keys: KeyValidator,
    /// What `/metrics` serves; the middleware and handlers count into it.
    pub metrics: Arc<Metrics>,
    /// Login attempts per client IP.
    pub login_per_ip: Arc<RateLimiter>,
    /// Login attempts per email or username.
    pub login_per_user: Arc<RateLimiter>,
    /// Signs attach tickets and app tokens.
    pub signer: Signer,
    /// Seals the one-time sign-in grants of the auth redirect.
    pub sealer: Sealer,
    /// The mesh CA: signs edges' relay certificates when they register;
    /// its PEM goes into agents' manifests as their only trust root.
    pub ca: Arc<MeshCa>,
    /// The primary's relay.
    pub relay: Relay,
    /// The relay's address as agents should dial it.
    pub relay_address: String,
    /// Events to other replicas and edges.
    pub bus: crate::events::Bus,
    /// Where agents attached to other relays are.
    pub locations: devmesh_proxy::relay::Locations,
    /// The relays the primary's relay may exchange mesh traffic with.
    pub mesh_peers: devmesh_proxy::relay::MeshPeers,
    /// Wakes this server's idle provisioner daemons when a job is queued
    /// here (jobs queued by other replicas are found by polling).
    pub provisioner_wake: Arc<tokio::sync::Notify>,
    /// Encrypts secrets at rest (workspaces' Terraform states among them).
    pub vault: Arc<crate::vault::Vault>,
    /// Fires when the server shuts down (ends long-lived streams).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Resolved app routes (short-lived; emptied on changes).
    pub(crate) routes: moka::future::Cache<String, apps::Route>,
    /// Pooled connections to apps.
    pub upstreams: Arc<devmesh_proxy::upstream::Pool>,
    /// Users, workspaces and keys whose app tokens minted before a given
    /// time are void.
    pub(crate) revocations: Arc<devmesh_proxy::revocations::Revocations>,
    /// Edges whose last `/healthz-report` call failed, and why (`None`: it
    /// answered well).
    pub(crate) edge_probes:
        Arc<parking_lot::RwLock<std::collections::HashMap<Uuid, Option<String>>>>,
}

impl AppState {
    /// After a change to who may open a workspace's apps (a build, a port
    /// share): forgets cached routes here and revokes the workspace's app
    /// tokens minted until now, on every replica and edge.
    pub async fn workspace_changed(&self, workspace: Uuid) {
        self.routes.invalidate_all();
        self.bus
            .revoke(devmesh_shared::api::RevokedSubject::Workspace { id: workspace })
            .await;
    }

    /// Forgets cached routes after a change that affects many workspaces
    /// (a user's status).
    pub fn access_changed(&self) {
        self.routes.invalidate_all();
    }

    /// Makes every app token of `user` minted until now worthless (logout,
    /// suspension, deletion), here at once and on every replica and edge
    /// through the event bus.
    pub async fn revoke_app_tokens(&self, user: Uuid) {
        let now = chrono::Utc::now().timestamp_millis();
        self.revocations
            .revoke(devmesh_shared::api::RevokedSubject::User { id: user }, now);
        self.bus
            .revoke(devmesh_shared::api::RevokedSubject::User { id: user })
            .await;
    }

    /// Revokes app tokens minted from API key `id` (the key was deleted).
    pub async fn revoke_key(&self, id: &str) {
        self.keys.forget_key(id).await;
        self.bus
            .revoke(devmesh_shared::api::RevokedSubject::Key { id: id.to_owned() })
            .await;
    }
}

/// The primary's keys and relay, created at start.
#[derive(Debug)]
pub struct Parts {
    /// Signs attach tickets, app tokens and stream grants.
    pub signer: Signer,
    /// Seals sign-in grants.
    pub sealer: Sealer,
    /// The mesh CA, loaded (or created on a new deployment) at start.
    pub ca: Arc<MeshCa>,
    /// The primary's relay, already serving.
    pub relay: Relay,
    /// The relay's address as agents and other relays dial it.
    pub relay_address: String,
    /// LISTEN/NOTIFY between replicas; the source of edges' event streams.
    pub bus: crate::events::Bus,
    /// Agent locations, kept current from the bus.
    pub locations: devmesh_proxy::relay::Locations,
    /// The relay's mesh peers, kept current from the bus.
    pub mesh_peers: devmesh_proxy::relay::MeshPeers,
    /// Revocations, shared with the relay.
    pub revocations: Arc<devmesh_proxy::revocations::Revocations>,
    /// Fires when the server shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Encrypts secrets at rest (workspaces' Terraform states among them).
    pub vault: Arc<crate::vault::Vault>,
}

impl AppState {
    /// State over a connected, migrated database.
    pub fn new(db: PgPool, config: ServerConfig, parts: Parts) -> Self {
        let mut metrics = Metrics::new();
        if config.postgres_url.is_none() {
            metrics.watch_embedded_postgres();
        }
        let metrics = Arc::new(metrics);
        Self {
            keys: KeyValidator::new(db.clone(), metrics.clone()),
            db,
            config: Arc::new(config),
            metrics,
            login_per_ip: Arc::new(RateLimiter::new(30, Duration::from_secs(60))),
            login_per_user: Arc::new(RateLimiter::new(10, Duration::from_secs(60))),
            signer: parts.signer,
            sealer: parts.sealer,
            ca: parts.ca,
            relay: parts.relay,
            relay_address: parts.relay_address,
            bus: parts.bus,
            locations: parts.locations,
            mesh_peers: parts.mesh_peers,
            shutdown: parts.shutdown,
            routes: apps::route_cache(),
            upstreams: Arc::default(),
            revocations: parts.revocations,
            edge_probes: Arc::default(),
            provisioner_wake: Arc::default(),
            vault: parts.vault,
        }
    }
}

/// Checks the edges' health reports until shutdown.
pub async fn probe_edges(state: AppState) {
    edges::probe_edges(state).await;
}

/// Applies events from every replica to this one's caches and agent
/// locations, until shutdown.
pub async fn apply_events(state: AppState) {
    use devmesh_shared::api::{EdgeEvent, RevokedSubject};
    let mut rx = state.bus.subscribe();
    loop {
        let message = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            m = rx.recv() => m,
        };
        match message {
            Ok(crate::events::BusMessage::Event(EdgeEvent::AgentMoved(location))) => {
                state.locations.set(location);
            }
            Ok(crate::events::BusMessage::Event(EdgeEvent::Revoked(r))) => {
                state.revocations.revoke(r.subject.clone(), r.at_ms);
                match r.subject {
                    RevokedSubject::User { .. } => {
                        state.keys.forget_all();
                        state.routes.invalidate_all();
                    }
                    RevokedSubject::Workspace { .. } => state.routes.invalidate_all(),
                    RevokedSubject::Key { id } => state.keys.forget_key(&id).await,
                }
            }
            Ok(crate::events::BusMessage::Event(EdgeEvent::MeshPeers { peers })) => {
                state.mesh_peers.set(peers);
            }
            Ok(crate::events::BusMessage::Event(_)) => {}
            Ok(crate::events::BusMessage::Gap)
            | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Events were missed: reload locations, drop caches.
                state.routes.invalidate_all();
                state.keys.forget_all();
                if let Ok(all) = crate::events::agent_locations(&state.db).await {
                    state.locations.replace(all);
                }
                if let Ok(peers) = crate::relay::mesh_peers(&state.db).await {
                    state.mesh_peers.set(peers);
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let api = Router::new()
        .route("/buildinfo", get(meta::buildinfo))
        .route("/buildinfo/agent/{os}/{arch}", get(meta::agent_binary))
        .route("/regions", get(edges::regions))
        .route("/audit", get(meta::audit))
        .route(
            "/users/first",
            get(users::has_first_user).post(users::create_first_user),
        )
        .route("/users/login", post(users::login))
        .route("/users/logout", post(users::logout))
        .route("/users/me", get(users::me))
        .route(
            "/users/me/preferences",
            get(users::preferences).put(users::set_preferences),
        )
        .route(
            "/users/me/keys",
            get(users::list_keys).post(users::create_key),
        )
        .route(
            "/users/me/keys/{id}",
            get(users::get_key).delete(users::delete_key),
        )
        .route("/users", get(users::list_users).post(users::create_user))
        .route(
            "/users/{user}",
            get(users::get_user).delete(users::delete_user),
        )
        .route("/users/{user}/status/{status}", put(users::set_status))
        .route("/users/{user}/roles", put(users::set_roles))
        .route(
            "/users/{user}/workspaces/{name}",
            get(workspaces::get_by_name),
        )
        .route("/templates", get(templates::list).post(templates::create))
        .route(
            "/templates/{template}",
            get(templates::get).delete(templates::delete),
        )
        .route(
            "/templates/{template}/versions",
            get(templates::versions).post(templates::create_version),
        )
        .route(
            "/templates/{template}/versions/{number}/promote",
            post(templates::promote),
        )
        .route(
            "/templates/{template}/versions/{number}/archive",
            post(templates::archive),
        )
        .route(
            "/templates/{template}/versions/{number}/unarchive",
            post(templates::unarchive),
        )
        .route(
            "/templates/{template}/versions/{number}/files",
            get(templates::files),
        )
        .route(
            "/workspaces",
            get(workspaces::list).post(workspaces::create),
        )
        .route("/workspaces/watch", get(workspaces::watch))
        .route("/workspaces/{id}", get(workspaces::get))
        .route("/jobs/{id}/logs", get(workspaces::job_logs))
        .route(
            "/workspaces/{id}/builds",
            get(workspaces::builds).post(workspaces::build),
        )
        .route(
            "/workspaces/{id}/builds/cancel",
            post(workspaces::cancel_build),
        )
        .route(
            "/provisioner-keys",
            get(provisioners::list_keys).post(provisioners::create_key),
        )
        .route(
            "/provisioner-keys/{name}",
            axum::routing::delete(provisioners::delete_key),
        )
        .route("/provisioner-daemons", get(provisioners::list_daemons))
        .route("/provisionerd/register", post(provisioners::register))
        .route(
            "/provisionerd/daemons/{daemon}/acquire",
            post(provisioners::acquire),
        )
        .route(
            "/provisionerd/daemons/{daemon}/jobs/{job}/heartbeat",
            post(provisioners::heartbeat),
        )
        .route(
            "/provisionerd/daemons/{daemon}/jobs/{job}/logs",
            post(provisioners::append_logs),
        )
        .route(
            "/provisionerd/daemons/{daemon}/jobs/{job}/state",
            put(provisioners::save_state),
        )
        .route(
            "/provisionerd/daemons/{daemon}/jobs/{job}/complete",
            post(provisioners::complete),
        )
        .route("/edges", get(edges::list).post(edges::create))
        .route(
            "/edges/{edge}",
            get(edges::get).patch(edges::update).delete(edges::delete),
        )
        .route("/edges/{edge}/token", post(edges::regenerate_token))
        .route("/edges/me/register", post(edges::register))
        .route("/edges/me/deregister", post(edges::deregister))
        .route("/edges/me/events", get(edges::events))
        .route("/edges/me/app-access", post(apps::edge_app_access))
        .route("/edges/me/app-connect", post(apps::edge_app_connect))
        .route("/edges/me/shell-access", post(ssh::edge_shell_access))
        .route("/edges/me/shell-ended", post(ssh::edge_shell_ended))
        .route("/workspaceagents/me/manifest", get(agents::manifest))
        .route(
            "/workspaceagents/me/attach-ticket",
            post(agents::attach_ticket),
        )
        .route("/workspaceagents/me/lifecycle", post(agents::lifecycle))
        .route("/workspaceagents/me/logs", post(agents::post_logs))
        .route("/workspaceagents/me/app-health", post(agents::app_health))
        .route("/workspaceagents/me/metadata", post(agents::metadata))
        .route("/workspaceagents/{id}/logs", get(agents::get_logs))
        .route("/workspaceagents/{id}/ssh", post(ssh::ssh))
        .route("/workspaceagents/{id}/pty", get(ssh::terminal))
        .route("/workspaceagents/{id}/probe", post(ssh::probe))
        .route("/workspaceagents/{id}/udp", post(ssh::udp))
        .route(
            "/workspaces/{id}/port-shares",
            get(workspaces::list_port_shares).post(workspaces::set_port_share),
        )
        .route("/applications/auth-redirect", get(apps::auth_redirect))
        .fallback(api_not_found);

    Router::new()
        .nest("/api/v2", api)
        .route("/healthz", get(meta::healthz))
        .route("/readyz", get(meta::healthz))
        .route("/livez", get(meta::livez))
        .route("/latency-check", get(devmesh_proxy::app::latency_check))
        .route("/metrics", get(meta::metrics))
        .route("/", get(dashboard::shell))
        .route("/workspaces", get(dashboard::shell))
        .route("/workspaces/{*page}", get(dashboard::shell))
        .route("/templates", get(dashboard::shell))
        .route("/regions", get(dashboard::shell))
        .route("/account", get(dashboard::shell))
        .route("/users", get(dashboard::shell))
        .route("/audit", get(dashboard::shell))
        .route("/edges", get(dashboard::shell))
        .route("/setup", get(dashboard::setup))
        .route("/assets/{*path}", get(dashboard::asset))
        .route("/login", get(login::login_form).post(login::login_submit))

        .fallback(api_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), apps::route_apps))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(x_request_id.clone(), MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("http", request.id = %id, http.method = %req.method(), http.path = %req.uri().path())
                }))
                .layer(PropagateRequestIdLayer::new(x_request_id))
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::internal("handler panicked").into_response()
                }))
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .with_state(state)
}

async fn api_not_found() -> ApiError {
    ApiError::not_found("No such route.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "This route does not accept that method.",
    )
}

async fn record_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = tokio::time::Instant::now();
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.http_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: resp.status().as_u16().to_string(),
        })
        .inc();
    if resp.extensions().get::<DbUnavailable>().is_some() {
        m.db_unavailable.inc();
    }
    resp
}

// === Audit log ===

/// One audit record being written.
#[derive(Debug)]
pub struct Audit {
    action: &'static str,
    resource_type: &'static str,
    resource_id: String,
    resource_name: String,
    user: Option<(Uuid, String)>,
    ip: Option<String>,
    details: serde_json::Value,
}

impl Audit {
    /// `action` done to a `resource_type`.
    pub fn new(action: &'static str, resource_type: &'static str) -> Self {
        Self {
            action,
            resource_type,
            resource_id: String::new(),
            resource_name: String::new(),
            user: None,
            ip: None,
            details: serde_json::json!({}),
        }
    }

    /// The resource acted on: its id and its name now, so the record stays
    /// readable after the resource is gone.
    pub fn resource(mut self, id: impl ToString, name: impl Into<String>) -> Self {
        self.resource_id = id.to_string();
        self.resource_name = name.into();
        self
    }

    /// Who did it.
    pub fn by(mut self, p: &Principal) -> Self {
        self.user = Some((p.user_id, p.username.clone()));
        self
    }

    /// Who did it, by id and name.
    pub fn by_user(mut self, id: Uuid, name: &str) -> Self {
        self.user = Some((id, name.to_owned()));
        self
    }

    /// The client's address, as the HTTP listener saw the TCP peer.
    pub fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.to_owned());
        self
    }

    /// Anything else.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    /// Writes the record. Failures are logged, not returned: the action
    /// itself already happened.
    pub async fn write<'e, E: sqlx::PgExecutor<'e>>(self, db: E) {
        let result = sqlx::query(
            "INSERT INTO audit_log (user_id, username, ip, action, resource_type, resource_id, resource_name, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(self.user.as_ref().map(|u| u.0))
        .bind(self.user.as_ref().map(|u| u.1.clone()))
        .bind(&self.ip)
        .bind(self.action)
        .bind(self.resource_type)
        .bind(&self.resource_id)
        .bind(&self.resource_name)
        .bind(&self.details)
        .execute(db)
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, action = self.action, "could not write the audit log");
        }
    }
}

pub(crate) use devmesh_proxy::app::SetCookie;

/// Parses a path segment as a UUID, or `None`.
fn parse_uuid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s).ok()
}
