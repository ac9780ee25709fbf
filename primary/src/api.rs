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
pub mod openapi;
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
use axum::routing::get;
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
    /// Counts pooled connections closed for being left inside a
    /// transaction ([`crate::db::connect`]); exported with the metrics.
    pub stale_transactions: prometheus_client::metrics::counter::Counter,
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
        metrics.count_stale_transactions(parts.stale_transactions.clone());
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
    let api = api_routes().finish().0.fallback(api_not_found);

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

/// Every `/api/v2` route with its description: the router and the OpenAPI
/// document (`GET /api/v2/openapi.json`, `docs/openapi.json`) both come
/// from here.
pub fn api_routes() -> openapi::ApiRoutes {
    use devmesh_shared::api as a;
    use devmesh_shared::provisionerd as p;
    openapi::ApiRoutes::new()
        // Meta
        .get("/buildinfo", "The server's version", meta::buildinfo)
        .returns::<a::BuildInfo>(200, "The version.")
        .get(
            "/buildinfo/agent/{os}/{arch}",
            "The agent binary for an OS and architecture",
            meta::agent_binary,
        )
        .raw(200, "application/octet-stream", "The binary.")
        .get(
            "/regions",
            "Regions and their latency-check URLs",
            edges::regions,
        )
        .returns::<a::RegionsResponse>(200, "The regions.")
        .get(
            "/audit",
            "The audit log, newest first (owners)",
            meta::audit,
        )
        .returns::<a::AuditResponse>(200, "A page of entries.")
        // Users and sessions
        .get(
            "/users/first",
            "Whether the first user exists",
            users::has_first_user,
        )
        .returns::<a::FirstUserStatus>(200, "Whether set-up is done.")
        .post(
            "/users/first",
            "Creates the first user, an owner",
            users::create_first_user,
        )
        .returns::<a::User>(201, "The user.")
        .post("/users/login", "Signs in with a password", users::login)
        .returns::<a::LoginResponse>(201, "A session token (also set as a cookie).")
        .post("/users/logout", "Ends the caller's session", users::logout)
        .returns::<a::Message>(200, "Signed out.")
        .get("/users/me", "The signed-in user", users::me)
        .returns::<a::User>(200, "The user.")
        .get(
            "/users/me/preferences",
            "The caller's preferences",
            users::preferences,
        )
        .returns::<a::Preferences>(200, "The preferences.")
        .put(
            "/users/me/preferences",
            "Sets the caller's preferences",
            users::set_preferences,
        )
        .returns::<a::Preferences>(200, "The preferences now.")
        .get("/users/me/keys", "The caller's API keys", users::list_keys)
        .returns::<a::KeysResponse>(200, "The keys (never their secrets).")
        .post("/users/me/keys", "Creates an API key", users::create_key)
        .returns::<a::CreateKeyResponse>(201, "The key, with its secret shown once.")
        .get(
            "/users/me/keys/{id}",
            "One of the caller's API keys",
            users::get_key,
        )
        .returns::<a::ApiKey>(200, "The key.")
        .delete(
            "/users/me/keys/{id}",
            "Deletes one of the caller's API keys",
            users::delete_key,
        )
        .empty(204, "Deleted.")
        .get("/users", "All users (owners)", users::list_users)
        .returns::<a::UsersResponse>(200, "The users.")
        .post("/users", "Creates a user (owners)", users::create_user)
        .returns::<a::User>(201, "The user.")
        .get(
            "/users/{user}",
            "A user, by id or username",
            users::get_user,
        )
        .returns::<a::User>(200, "The user.")
        .delete(
            "/users/{user}",
            "Deletes a user (owners)",
            users::delete_user,
        )
        .empty(204, "Deleted.")
        .put(
            "/users/{user}/status/{status}",
            "Suspends or reactivates a user (owners)",
            users::set_status,
        )
        .returns::<a::User>(200, "The user now.")
        .put(
            "/users/{user}/roles",
            "Sets a user's roles (owners)",
            users::set_roles,
        )
        .returns::<a::User>(200, "The user now.")
        .get(
            "/users/{user}/workspaces/{name}",
            "A workspace by its owner and name",
            workspaces::get_by_name,
        )
        .returns::<a::Workspace>(200, "The workspace.")
        // Templates
        .get("/templates", "All templates", templates::list)
        .returns::<a::TemplatesResponse>(200, "The templates.")
        .post(
            "/templates",
            "Creates a template (owners)",
            templates::create,
        )
        .returns::<a::Template>(201, "The template.")
        .get(
            "/templates/{template}",
            "A template, by id or name",
            templates::get,
        )
        .returns::<a::Template>(200, "The template.")
        .delete(
            "/templates/{template}",
            "Deletes a template (owners)",
            templates::delete,
        )
        .empty(204, "Deleted.")
        .get(
            "/templates/{template}/versions",
            "A template's versions",
            templates::versions,
        )
        .returns::<a::TemplateVersionsResponse>(200, "The versions.")
        .post(
            "/templates/{template}/versions",
            "Adds a version to a template (owners)",
            templates::create_version,
        )
        .returns::<a::Template>(201, "The template, with the version.")
        .post(
            "/templates/{template}/versions/{number}/promote",
            "Makes a version the active one (owners)",
            templates::promote,
        )
        .returns::<a::Template>(200, "The template now.")
        .post(
            "/templates/{template}/versions/{number}/archive",
            "Archives a version (owners)",
            templates::archive,
        )
        .returns::<a::TemplateVersion>(200, "The version now.")
        .post(
            "/templates/{template}/versions/{number}/unarchive",
            "Brings an archived version back (owners)",
            templates::unarchive,
        )
        .returns::<a::TemplateVersion>(200, "The version now.")
        .get(
            "/templates/{template}/versions/{number}/files",
            "A version's Terraform files, as a tar archive (owners)",
            templates::files,
        )
        .raw(200, "application/x-tar", "The archive.")
        // Workspaces
        .get(
            "/workspaces",
            "Workspaces (the caller's, or an owner's pick)",
            workspaces::list,
        )
        .returns::<a::WorkspacesResponse>(200, "The workspaces.")
        .post(
            "/workspaces",
            "Creates a workspace and starts its first build",
            workspaces::create,
        )
        .returns::<a::WorkspaceBuildResponse>(201, "The workspace.")
        .get(
            "/workspaces/watch",
            "Changes to the caller's workspaces, as server-sent events",
            workspaces::watch,
        )
        .raw(200, "text/event-stream", "One event per change.")
        .get("/workspaces/{id}", "A workspace", workspaces::get)
        .returns::<a::Workspace>(200, "The workspace.")
        .get(
            "/jobs/{id}/logs",
            "A provisioner job's status and log",
            workspaces::job_logs,
        )
        .returns::<a::JobLogsResponse>(200, "The job's log since `after`.")
        .get(
            "/workspaces/{id}/builds",
            "A workspace's builds, newest first",
            workspaces::builds,
        )
        .returns::<Vec<a::WorkspaceBuild>>(200, "The builds.")
        .post(
            "/workspaces/{id}/builds",
            "Starts, stops or deletes a workspace",
            workspaces::build,
        )
        .returns::<a::WorkspaceBuildResponse>(201, "The workspace, with the build queued.")
        .post(
            "/workspaces/{id}/builds/cancel",
            "Cancels a workspace's running build",
            workspaces::cancel_build,
        )
        .returns::<a::Workspace>(200, "The workspace now.")
        .get(
            "/workspaces/{id}/port-shares",
            "A workspace's shared ports",
            workspaces::list_port_shares,
        )
        .returns::<a::PortSharesResponse>(200, "The shares.")
        .post(
            "/workspaces/{id}/port-shares",
            "Shares a port of a workspace, or changes its share",
            workspaces::set_port_share,
        )
        .returns::<a::PortShare>(200, "The share now.")
        // Provisioners
        .get(
            "/provisioner-keys",
            "Provisioner keys (owners)",
            provisioners::list_keys,
        )
        .returns::<p::ProvisionerKeysResponse>(200, "The keys.")
        .post(
            "/provisioner-keys",
            "Creates a provisioner key (owners)",
            provisioners::create_key,
        )
        .returns::<p::CreateProvisionerKeyResponse>(201, "The key, with its secret shown once.")
        .delete(
            "/provisioner-keys/{name}",
            "Deletes a provisioner key (owners)",
            provisioners::delete_key,
        )
        .empty(204, "Deleted.")
        .get(
            "/provisioner-daemons",
            "Connected provisioner daemons (owners)",
            provisioners::list_daemons,
        )
        .returns::<p::ProvisionerDaemonsResponse>(200, "The daemons.")
        .post(
            "/provisionerd/register",
            "Registers a provisioner daemon",
            provisioners::register,
        )
        .returns::<p::RegisterDaemonResponse>(200, "The daemon's id.")
        .post(
            "/provisionerd/daemons/{daemon}/acquire",
            "Waits for a job for the daemon",
            provisioners::acquire,
        )
        .returns::<p::JobSpec>(200, "A job.")
        .empty(204, "No job came in time; ask again.")
        .post(
            "/provisionerd/daemons/{daemon}/jobs/{job}/heartbeat",
            "Says a job still runs",
            provisioners::heartbeat,
        )
        .returns::<p::HeartbeatResponse>(200, "Whether to go on.")
        .post(
            "/provisionerd/daemons/{daemon}/jobs/{job}/logs",
            "Appends to a job's log",
            provisioners::append_logs,
        )
        .empty(204, "Appended.")
        .put(
            "/provisionerd/daemons/{daemon}/jobs/{job}/state",
            "Saves a build's Terraform state",
            provisioners::save_state,
        )
        .json_document_body("The workspace's Terraform state, as Terraform writes it.")
        .empty(204, "Saved.")
        .post(
            "/provisionerd/daemons/{daemon}/jobs/{job}/complete",
            "Finishes a job",
            provisioners::complete,
        )
        .returns::<p::CompleteResponse>(200, "Recorded.")
        // Edges
        .get("/edges", "Edges (owners)", edges::list)
        .returns::<a::EdgesResponse>(200, "The edges.")
        .post("/edges", "Creates an edge (owners)", edges::create)
        .returns::<a::CreateEdgeResponse>(201, "The edge, with its token shown once.")
        .get(
            "/edges/{edge}",
            "An edge, by id or name (owners)",
            edges::get,
        )
        .returns::<a::Edge>(200, "The edge.")
        .patch("/edges/{edge}", "Changes an edge (owners)", edges::update)
        .returns::<a::Edge>(200, "The edge now.")
        .delete("/edges/{edge}", "Deletes an edge (owners)", edges::delete)
        .empty(204, "Deleted.")
        .post(
            "/edges/{edge}/token",
            "Replaces an edge's token (owners)",
            edges::regenerate_token,
        )
        .returns::<a::CreateEdgeResponse>(200, "The edge, with its new token shown once.")
        .post(
            "/edges/me/register",
            "An edge registers its relay and hosts",
            edges::register,
        )
        .returns::<a::EdgeRegisterResponse>(200, "What the edge needs to serve.")
        .post("/edges/me/deregister", "An edge leaves", edges::deregister)
        .empty(204, "Gone.")
        .get(
            "/edges/me/events",
            "Events for an edge, as JSON lines",
            edges::events,
        )
        .raw(200, "application/x-ndjson", "One event per line.")
        .post(
            "/edges/me/app-access",
            "An edge asks who may open an app",
            apps::edge_app_access,
        )
        .returns::<a::EdgeAppAccess>(200, "The route and an app token.")
        .post(
            "/edges/me/app-connect",
            "An edge redeems a sign-in grant",
            apps::edge_app_connect,
        )
        .returns::<a::EdgeAppAccess>(200, "The route and an app token.")
        .post(
            "/edges/me/shell-access",
            "An edge asks to open a shell",
            ssh::edge_shell_access,
        )
        .returns::<a::EdgeShellAccess>(200, "Where to open it.")
        .post(
            "/edges/me/shell-ended",
            "An edge reports a shell's end",
            ssh::edge_shell_ended,
        )
        .empty(204, "Recorded.")
        // Agents
        .get(
            "/workspaceagents/me/manifest",
            "The agent's manifest",
            agents::manifest,
        )
        .returns::<a::AgentManifest>(200, "What the agent runs and where it attaches.")
        .post(
            "/workspaceagents/me/attach-ticket",
            "A ticket to attach to a relay",
            agents::attach_ticket,
        )
        .returns::<a::AttachTicketResponse>(200, "The ticket.")
        .post(
            "/workspaceagents/me/lifecycle",
            "The agent's lifecycle state",
            agents::lifecycle,
        )
        .empty(204, "Recorded.")
        .post(
            "/workspaceagents/me/logs",
            "Appends startup script output",
            agents::post_logs,
        )
        .returns::<a::AgentLogsAccepted>(200, "How much was kept.")
        .post(
            "/workspaceagents/me/app-health",
            "Apps' health",
            agents::app_health,
        )
        .empty(204, "Recorded.")
        .post(
            "/workspaceagents/me/metadata",
            "Metadata values",
            agents::metadata,
        )
        .empty(204, "Recorded.")
        .get(
            "/workspaceagents/{id}/logs",
            "An agent's startup script output",
            agents::get_logs,
        )
        .returns::<a::AgentLogsResponse>(200, "The log since `after`.")
        .post(
            "/workspaceagents/{id}/ssh",
            "Opens an SSH stream to the agent (full duplex body)",
            ssh::ssh,
        )
        .raw(
            200,
            "application/octet-stream",
            "The agent's side of the stream.",
        )
        .returns::<a::Error>(502, "The agent is not connected, or refused the stream.")
        .get(
            "/workspaceagents/{id}/pty",
            "A terminal, over a WebSocket",
            ssh::terminal,
        )
        .empty(101, "Switching to the WebSocket.")
        .returns::<a::Error>(502, "The agent is not connected, or refused the stream.")
        .post(
            "/workspaceagents/{id}/probe",
            "Opens a stream to a port on the agent's machine (full duplex body)",
            ssh::probe,
        )
        .raw(
            200,
            "application/octet-stream",
            "The port's side of the stream.",
        )
        .returns::<a::Error>(502, "The agent is not connected, or refused the stream.")
        .post(
            "/workspaceagents/{id}/udp",
            "Relays UDP datagrams to a port on the agent's machine (full duplex body)",
            ssh::udp,
        )
        .raw(200, "application/octet-stream", "The datagrams, framed.")
        .returns::<a::Error>(502, "The agent is not connected, or refused the stream.")
        .get(
            "/applications/auth-redirect",
            "Signs a browser in to an app host and sends it back",
            apps::auth_redirect,
        )
        .empty(303, "To the app host with a one-time grant, or to sign in first.")
        .credential(openapi::Credential::UserOptional)
        .raw(403, "text/html", "This user may not open that app (a page for the browser).")
        .raw(404, "text/html", "No such app (a page for the browser).")
        .raw(503, "text/html", "The app's workspace is stopped, or access cannot be decided now (a page for the browser).")
        .get("/openapi.json", "This document", meta::openapi)
        .returns::<serde_json::Value>(200, "The OpenAPI document of /api/v2.")
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
        let action = self.action;
        if let Err(e) = self.insert(db).await {
            tracing::warn!(error = %e, action, "could not write the audit log");
        }
    }

    /// Writes the record inside the transaction of the action it records,
    /// failing with it: a failed insert aborts the transaction, and
    /// PostgreSQL would answer the later `COMMIT` with a silent rollback,
    /// so the action would be acknowledged and lost.
    pub async fn write_in(self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        self.insert(tx).await
    }

    async fn insert<'e, E: sqlx::PgExecutor<'e>>(self, db: E) -> Result<(), sqlx::Error> {
        sqlx::query(
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
        .await
        .map(|_| ())
    }
}

pub(crate) use devmesh_proxy::app::SetCookie;

/// Parses a path segment as a UUID, or `None`.
fn parse_uuid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s).ok()
}
