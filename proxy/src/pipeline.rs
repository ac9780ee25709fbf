//! The app proxy, written once: the primary and every edge run this
//! pipeline and differ only in where decisions come from (a [`Decider`]:
//! the primary's database, or an edge's caches in front of the primary).
//!
//! Phases, top to bottom ([`route`], then [`serve`]):
//! 1. **host**: the request's host, matched against the proxy's app
//!    wildcards and parsed into an app address; other hosts are the
//!    proxy's own pages.
//! 2. **grant**: a browser back from signing in brings a sealed one-time
//!    grant for this host; redeemed for an app token cookie, then the same
//!    URL without it.
//! 3. **credentials**: an app token cookie for this host and target
//!    (verified locally, checked against revocations), else a devmesh key
//!    in a header, else nothing.
//! 4. **decide**: the decider answers with where the request goes, and
//!    possibly a new token cookie (first sign-in, renewal); "sign in"
//!    becomes the redirect to the primary for browsers.
//! 5. **forward**: down the agent's tunnel or across the mesh
//!    ([`forward`]: credentials stripped, upgrades spliced,
//!    cookies filtered).
//! 6. **record**: requests and time to the response head, by kind.

use std::future::Future;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use devmesh_shared::apphost::{AppHost, AppTarget, parse_label, wildcard_label};
use devmesh_shared::signing::AppToken;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::app::{
    AppError, GRANT_PARAM, STATE_COOKIE, Target, app_may_set_cookie, cookie, cookie_allowed,
    header_key, protect_page, query_param, request_host, sign_in, signed_in_redirect,
    strip_devmesh_cookies, strip_devmesh_headers, token_cookie_header, token_cookie_name,
    wants_html,
};
use crate::relay::{OpenError, Relay};
use crate::upstream::{Key, Pool, SendError};

/// What a decision needs to know about the request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The app host, lower-cased, with its port if not the default.
    pub host: &'a str,
    /// The parsed app address.
    pub app: &'a AppHost,
    /// The client's IP address (rate limits), or empty.
    pub client: &'a str,
}

/// Where a decided request goes, and the app token cookie to set, if any.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The app inside the workspace.
    pub target: Target,
    /// A signed app token to set as this host's cookie (a first decision,
    /// a renewal).
    pub set_token: Option<String>,
}

/// Where a proxy's decisions come from. Errors are the refusals users see;
/// [`AppError::Unauthenticated`] sends browsers to sign in.
pub trait Decider: Send + Sync {
    /// The primary's access URL, where browsers sign in.
    fn sign_in_url(&self) -> &str;

    /// The claims of a signed app token, if a current signing key signed it
    /// and it has not expired.
    fn verify_token(&self, signed: &str) -> Option<AppToken>;

    /// Whether a revocation voids `token`.
    fn revoked(&self, token: &AppToken) -> bool;

    /// Redeems a sealed one-time sign-in grant brought to `ask.host` by the
    /// browser holding `state`: the signed app token.
    fn redeem(
        &self,
        ask: Ask<'_>,
        sealed: &str,
        state: Option<&str>,
    ) -> impl Future<Output = Result<String, AppError>> + Send;

    /// The decision for the holder of a valid, unrevoked app token for this
    /// host and target (`signed` is the token as presented).
    fn with_token(
        &self,
        ask: Ask<'_>,
        token: &AppToken,
        signed: &str,
    ) -> impl Future<Output = Result<Decided, AppError>> + Send;

    /// The decision for the holder of `key`, or for anyone. `credentialed`:
    /// the request carried a token that was valid but revoked (the decider
    /// may then tell its holder why, say, a stopped workspace).
    fn with_key(
        &self,
        ask: Ask<'_>,
        key: Option<&str>,
        credentialed: bool,
    ) -> impl Future<Output = Result<Decided, AppError>> + Send;
}

/// What forwarding needs, whoever decides.
#[derive(Debug, Clone, Copy)]
pub struct Plumbing<'a> {
    /// The relay the proxy sends streams through.
    pub relay: &'a Relay,
    /// Pooled connections to apps.
    pub upstreams: &'a Arc<Pool>,
    /// `http` or `https`: how clients reach this proxy.
    pub scheme: &'a str,
}

/// Labels of a proxied request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `app` or `dev_url`.
    pub kind: &'static str,
    /// The status of the answer the client got, the proxy's own error
    /// pages included.
    pub status: u16,
}

/// Labels of a kind of request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// As in [`RequestLabels`].
    pub kind: &'static str,
}

type Histograms = Family<KindLabels, Histogram, fn() -> Histogram>;

/// The proxy's metrics, the same on the primary and on edges.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
}

impl ProxyMetrics {
    /// Creates the metrics and registers them in `registry` (as
    /// `requests` and `request_duration_seconds`, under its prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "App requests served, by kind and status",
            requests.clone(),
        );
        let duration: Histograms =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0002, 2.0, 18)));
        registry.register(
            "request_duration_seconds",
            "Time to the response head of app requests, by kind",
            duration.clone(),
        );
        Self { requests, duration }
    }

    fn record(&self, kind: &'static str, status: u16, start: Instant) {
        self.duration
            .get_or_create(&KindLabels { kind })
            .observe(start.elapsed().as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels { kind, status })
            .inc();
    }
}

/// The app host a request is for: `Ok(None)` when its host is under none
/// of `wildcards` (one of the proxy's own pages), else the host, the
/// wildcard it matched and the label under it.
pub fn app_host<'w>(
    req: &Request,
    wildcards: &'w [String],
) -> Result<Option<(String, &'w str, String)>, AppError> {
    let host = request_host(req)?;
    Ok(wildcards.iter().find_map(|w| {
        let label = wildcard_label(&host, w)?.to_owned();
        Some((host.clone(), w.as_str(), label))
    }))
}

/// Middleware body: requests for `wildcards` go through the pipeline; the
/// rest reach `next` (the proxy's own pages, which are never framed).
pub async fn route<D: Decider>(
    decider: &D,
    plumbing: Plumbing<'_>,
    metrics: &ProxyMetrics,
    wildcards: &[String],
    req: Request,
    next: Next,
) -> Response {
    let https = plumbing.scheme == "https";
    let (host, wildcard, label) = match app_host(&req, wildcards) {
        Ok(Some(found)) => found,
        Ok(None) => {
            let mut resp = next.run(req).await;
            protect_page(&mut resp, https);
            return resp;
        }
        Err(e) => return e.respond(wants_html(req.headers())),
    };
    let start = Instant::now();
    let html = wants_html(req.headers());
    let Some(app) = parse_label(&label) else {
        let resp = AppError::NotFound(format!("{label:?} is not an app address.")).respond(html);
        metrics.record("app", resp.status().as_u16(), start);
        return resp;
    };
    let kind = match app.target {
        AppTarget::Slug(_) => "app",
        AppTarget::Port { .. } => "dev_url",
    };
    let resp = match serve(decider, plumbing, &host, wildcard, &app, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(app.host = %host, error = ?e, "app request refused");
            e.respond(html)
        }
    };
    metrics.record(kind, resp.status().as_u16(), start);
    resp
}

/// Phases 2 to 5 for one request to `host` (under `wildcard`).
pub async fn serve<D: Decider>(
    decider: &D,
    plumbing: Plumbing<'_>,
    host: &str,
    wildcard: &str,
    app: &AppHost,
    req: Request,
) -> Result<Response, AppError> {
    let token_cookie = token_cookie_name(wildcard);
    let secure = plumbing.scheme == "https";
    let (head, body) = req.into_parts();
    let client = head
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let ask = Ask {
        host,
        app,
        client: &client,
    };

    // Phase: back from signing in with a sealed one-time grant.
    if let Some(sealed) = query_param(&head.uri, GRANT_PARAM) {
        let state = cookie(&head.headers, STATE_COOKIE);
        let signed = decider.redeem(ask, &sealed, state).await?;
        return Ok(signed_in_redirect(
            &head.uri,
            plumbing.scheme,
            host,
            &token_cookie,
            &signed,
        ));
    }

    // Phase: credentials. A token cookie counts only for navigations and
    // same-origin requests, for this host and target.
    let presented = cookie(&head.headers, &token_cookie)
        .filter(|_| cookie_allowed(&head, host))
        .and_then(|signed| Some((signed, decider.verify_token(signed)?)))
        .filter(|(_, t)| t.host == host && t.target == app.target);
    let credentialed = presented.is_some();
    let live = presented.filter(|(_, t)| !decider.revoked(t));

    // Phase: decide.
    let decided = match live {
        Some((signed, token)) => decider.with_token(ask, &token, signed).await,
        // A header that is not a devmesh key belongs to the app (its own
        // bearer tokens).
        None => {
            let key = header_key(&head.headers);
            decider.with_key(ask, key.as_deref(), credentialed).await
        }
    };
    let decided = match decided {
        Ok(d) => d,
        Err(AppError::Unauthenticated) => {
            return sign_in(decider.sign_in_url(), plumbing.scheme, host, &head);
        }
        Err(e) => return Err(e),
    };

    // Phase: forward.
    let mut resp = forward(
        plumbing,
        &decided.target,
        host,
        None,
        Request::from_parts(head, body),
    )
    .await?;
    if let Some(t) = decided.set_token {
        resp.headers_mut().append(
            header::SET_COOKIE,
            token_cookie_header(&token_cookie, &t, secure),
        );
    }
    Ok(resp)
}

// === Forwarding: build the upstream request, send it, filter the answer ===

/// Sends the request to the target app down a tunnel stream (or over the
/// mesh) and streams the response back. `prefix`: the path an app is
/// mounted under on the dashboard origin (path apps), for
/// `X-Forwarded-Prefix`.
pub async fn forward(
    plumbing: Plumbing<'_>,
    target: &Target,
    host: &str,
    prefix: Option<&str>,
    mut req: Request,
) -> Result<Response, AppError> {
    upstream_request(&mut req, target, host, plumbing.scheme, prefix)?;
    let upgrade = req.headers().get(header::UPGRADE).is_some();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let key = Key {
        agent: target.agent_id,
        port: target.port,
        https: target.https,
    };
    let mut resp = plumbing
        .upstreams
        .send(plumbing.relay, key, target.grant.as_deref(), req, upgrade)
        .await
        .map_err(|e| match e {
            SendError::Open(OpenError::NotConnected) => AppError::AgentNotConnected,
            SendError::Open(OpenError::Refused) => AppError::Refused,
            SendError::Open(other) => AppError::BadGateway(other.to_string()),
            SendError::App(why) => AppError::BadGateway(why),
        })?;
    if resp.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        splice_upgrade(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    filter_response(&mut resp);
    Ok(resp.map(axum::body::Body::new))
}

/// Makes the client's request the app's: no devmesh cookie (on any of its
/// domains) and no devmesh credential header, forwarding headers set by
/// devmesh alone, the app's base path in front of the request's, HTTP/1.1.
fn upstream_request(
    req: &mut Request,
    target: &Target,
    host: &str,
    scheme: &str,
    prefix: Option<&str>,
) -> Result<(), AppError> {
    use axum::http::{HeaderValue, Uri};
    let client_ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let headers = req.headers_mut();
    strip_devmesh_cookies(headers);
    strip_devmesh_headers(headers);
    // Forwarding headers are devmesh's to set, never the client's.
    for h in [
        "forwarded",
        "x-forwarded-prefix",
        "x-forwarded-port",
        "x-real-ip",
    ] {
        headers.remove(h);
    }
    if let Some(v) = prefix.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert("x-forwarded-prefix", v);
    }
    // HTTP/2 clients carry the host in the URI, which is cut to the path below.
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, v.clone());
        headers.insert("x-forwarded-host", v);
    }
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
    if target.base_path != "/" && !target.base_path.is_empty() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let joined = format!("{}{}", target.base_path.trim_end_matches('/'), pq);
        *req.uri_mut() = joined
            .parse()
            .map_err(|_| AppError::BadRequest("bad path".into()))?;
    } else if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = axum::http::Version::HTTP_11;
    Ok(())
}

/// Splices an upgraded connection (WebSocket and the like) between the
/// client and the app once both sides have switched.
fn splice_upgrade(client: hyper::upgrade::OnUpgrade, app: hyper::upgrade::OnUpgrade) {
    use hyper_util::rt::TokioIo;
    tokio::spawn(async move {
        let (Ok(client), Ok(app)) = (client.await, app.await) else {
            return;
        };
        let (client, app) = (TokioIo::new(client), TokioIo::new(app));
        // Buffers that follow the traffic: most upgraded connections are
        // idle WebSockets, thousands of them per edge.
        if let Err(e) = devmesh_net::splice::bidirectional_adaptive(client, app).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// An app must not plant devmesh cookies (say, its owner's token) in the
/// user's browser, nor cookies browsers would read another way.
fn filter_response<B>(resp: &mut hyper::Response<B>) {
    let kept: Vec<_> = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| app_may_set_cookie(v.as_bytes()))
        .cloned()
        .collect();
    resp.headers_mut().remove(header::SET_COOKIE);
    for v in kept {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Where an app token's holder goes inside the workspace.
pub fn target_of(token: &AppToken, grant: Option<String>) -> Target {
    Target {
        agent_id: token.agent_id,
        port: token.port,
        https: token.https,
        base_path: if token.base_path.is_empty() {
            "/".into()
        } else {
            token.base_path.clone()
        },
        grant,
    }
}
