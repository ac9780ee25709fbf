//! The regional edge proxy (`devmesh edge`).
//!
//! This first slice makes an edge a member of the deployment: it generates
//! its mesh key, registers with the primary (receiving a mesh certificate
//! signed from its CSR, the app-token keys and its sibling relays),
//! heartbeats by registering again, deregisters on a graceful shutdown, and
//! exits with a clear message when its token is revoked. It serves
//! `/healthz`, `/healthz-report` and `/latency-check`. TLS termination, app
//! authentication and relaying arrive next; see docs/architecture.md.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use devmesh_shared::api::{
    EDGE_TOKEN_HEADER, EdgeDeregisterRequest, EdgeHealthReport, EdgeRegisterRequest,
    EdgeRegisterResponse,
};
use devmesh_shared::backoff::Backoff;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Flags of `devmesh edge`.
#[derive(Clone, clap::Args)]
pub struct EdgeArgs {
    /// The primary's URL.
    #[arg(long, env = "DEVMESH_PRIMARY_URL")]
    pub primary_url: String,
    /// This region's edge token (`<edge-id>:<secret>`, from `devmesh edges create`).
    #[arg(long, env = "DEVMESH_EDGE_TOKEN", hide_env_values = true)]
    pub edge_token: String,
    /// The region's base URL as users reach it.
    #[arg(long, env = "DEVMESH_ACCESS_URL")]
    pub access_url: String,
    /// The region's app wildcard, like `*.eu.apps.example.com`.
    #[arg(long, env = "DEVMESH_WILDCARD_ACCESS_URL")]
    pub wildcard_access_url: Option<String>,
    /// A global app wildcard every edge serves behind GeoDNS, like `*.apps.example.com`.
    #[arg(long, env = "DEVMESH_GLOBAL_WILDCARD_ACCESS_URL")]
    pub global_wildcard_access_url: Option<String>,
    /// UDP address of this edge's relay, as agents should dial it.
    #[arg(long, env = "DEVMESH_RELAY_ADDRESS", default_value = "127.0.0.1:4001")]
    pub relay_address: String,
    /// Where the edge's HTTP endpoints listen.
    #[arg(long, env = "DEVMESH_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
    /// PEM certificate chain the edge serves HTTPS with (the region's wildcard); reloaded on change.
    #[arg(long, env = "DEVMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DEVMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra PEM CA bundle to trust for the primary's HTTPS.
    #[arg(long, env = "DEVMESH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl std::fmt::Debug for EdgeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeArgs")
            .field("primary_url", &self.primary_url)
            .field("edge_token", &"****")
            .field("access_url", &self.access_url)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// What the edge knows about itself, shared with its HTTP handlers.
#[derive(Debug)]
struct Status {
    replica_id: Uuid,
    registration: Option<EdgeRegisterResponse>,
    last_registered_at: Option<chrono::DateTime<Utc>>,
    last_error: Option<String>,
}

type Shared = Arc<RwLock<Status>>;

/// Runs the edge until `shutdown`, then deregisters. Returns an error when
/// the primary refuses the edge's token (revoked or wrong), with a message
/// that says so.
pub async fn run(args: EdgeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = devmesh_shared::net::http_client(
        concat!("devmesh-edge/", env!("CARGO_PKG_VERSION")),
        Duration::from_secs(15),
        args.ca_cert.as_deref(),
    )?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let status: Shared = Arc::new(RwLock::new(Status {
        replica_id: Uuid::new_v4(),
        registration: None,
        last_registered_at: None,
        last_error: None,
    }));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/healthz-report", get(report))
        .route("/latency-check", get(latency_check))
        .with_state(status.clone());
    let serve_shutdown = shutdown.clone();
    let (server, scheme) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls =
                devmesh_shared::tls::server_config(cert.clone(), key.clone(), shutdown.clone())?;
            let grace = Duration::from_secs(10);
            (
                tokio::spawn(devmesh_shared::tls::serve(
                    listener,
                    app,
                    tls,
                    serve_shutdown,
                    grace,
                )),
                "https",
            )
        }
        _ => (
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(serve_shutdown.cancelled_owned())
                    .await;
            }),
            "http",
        ),
    };
    println!("Started edge listener at {scheme}://{local}");

    let request = EdgeRegisterRequest {
        replica_id: status.read().replica_id,
        version: devmesh_shared::VERSION.into(),
        access_url: args.access_url.trim_end_matches('/').to_owned(),
        wildcard_hostname: args.wildcard_access_url.clone(),
        global_wildcard_hostname: args.global_wildcard_access_url.clone(),
        relay_address: args.relay_address.clone(),
        csr_pem: csr,
    };
    let base = args.primary_url.trim_end_matches('/').to_owned();
    let mut backoff = Backoff::default();
    let result = loop {
        let outcome = http
            .post(format!("{base}/api/v2/edges/me/register"))
            .header(EDGE_TOKEN_HEADER, &args.edge_token)
            .json(&request)
            .send()
            .await;
        let next = match outcome {
            Ok(resp) if resp.status().is_success() => {
                match resp.json::<EdgeRegisterResponse>().await {
                    Ok(reg) => {
                        let interval =
                            Duration::from_secs(reg.heartbeat_interval_seconds.clamp(1, 60));
                        let mut s = status.write();
                        if s.registration.is_none() {
                            tracing::info!(edge = %reg.edge_name, primary = %base, "registered with the primary");
                        }
                        s.registration = Some(reg);
                        s.last_registered_at = Some(Utc::now());
                        s.last_error = None;
                        backoff.reset();
                        interval
                    }
                    Err(e) => failure(&status, format!("unreadable answer: {e}"), &mut backoff),
                }
            }
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                break Err(anyhow::anyhow!(
                    "the primary refused this edge's token: it was revoked (regenerated) or the edge was deleted; \
                     get a new token with `devmesh edges regenerate-token`"
                ));
            }
            Ok(resp) if resp.status() == StatusCode::CONFLICT => {
                let text = resp.text().await.unwrap_or_default();
                break Err(anyhow::anyhow!("the primary refused this edge: {text}"));
            }
            Ok(resp) => {
                let code = resp.status();
                let text = resp.text().await.unwrap_or_default();
                failure(&status, format!("{code}: {text}"), &mut backoff)
            }
            Err(e) => failure(
                &status,
                format!("cannot reach the primary: {e}"),
                &mut backoff,
            ),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(next) => {}
        }
    };

    shutdown.cancel();
    if result.is_ok() {
        let replica_id = status.read().replica_id;
        let done = http
            .post(format!("{base}/api/v2/edges/me/deregister"))
            .header(EDGE_TOKEN_HEADER, &args.edge_token)
            .json(&EdgeDeregisterRequest { replica_id })
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match done {
            Ok(r) if r.status().is_success() => tracing::info!("deregistered from the primary"),
            Ok(r) => {
                tracing::warn!(status = %r.status(), "the primary did not accept the deregistration")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the primary will mark this replica unreachable")
            }
        }
    }
    let _ = server.await;
    result
}

/// Records a failed registration; returns how long to wait before the next try.
fn failure(status: &Shared, error: String, backoff: &mut Backoff) -> Duration {
    tracing::warn!(error = %error, "registration with the primary failed; retrying");
    status.write().last_error = Some(error);
    backoff.next_delay()
}

async fn report(State(status): State<Shared>) -> Json<EdgeHealthReport> {
    let s = status.read();
    let fresh = s
        .last_registered_at
        .is_some_and(|t| (Utc::now() - t).num_seconds() < 30);
    Json(EdgeHealthReport {
        edge_name: s.registration.as_ref().map(|r| r.edge_name.clone()),
        replica_id: s.replica_id,
        version: devmesh_shared::VERSION.into(),
        primary_reachable: fresh && s.last_error.is_none(),
        last_registered_at: s.last_registered_at,
        last_error: s.last_error.clone(),
    })
}

/// Browsers time this from the dashboard's page to pick the nearest region.
async fn latency_check() -> impl IntoResponse {
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert("timing-allow-origin", HeaderValue::from_static("*"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
