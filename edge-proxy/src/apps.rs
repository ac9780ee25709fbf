//! Apps and dev URLs on the edge's app domains.
//!
//! The same flow as the primary's, with the edge as the proxy:
//! 1. a browser back from signing in brings a sealed one-time grant for
//!    this host, which the primary redeems (`app-connect`) for an app token
//!    that becomes a cookie on this host alone;
//! 2. an app-token cookie for this host is verified locally with the
//!    primary's public keys and checked against pushed revocations: no
//!    call to anyone (a token near its expiry is renewed once, and the
//!    renewal cached);
//! 3. otherwise a key in a header selects a cached decision; a miss asks
//!    the primary once (`app-access`), and decisions are refreshed in the
//!    background before their token expires, so in steady state no request
//!    waits on the primary;
//! 4. the request goes down the agent's tunnel, or over the mesh to the
//!    agent's home relay.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use devmesh_proxy::app::{
    APP_TOKEN_RENEW_SECS, AppError, GRANT_PARAM, STATE_COOKIE, Target, cookie, cookie_allowed,
    header_key, protect_page, query_param, request_host, sign_in, signed_in_redirect,
    token_cookie_header, token_cookie_name, wants_html,
};
use devmesh_shared::apphost::{AppHost, AppTarget, parse_label, wildcard_label};
use devmesh_shared::signing::AppToken;
use tokio::time::Instant;

use crate::metrics::{CacheLabels, KindLabels, RequestLabels};
use crate::{Decision, Edge};

/// A cached decision is refreshed in the background once its token has
/// less than this long to live.
const REFRESH_BEFORE_SECS: i64 = 10 * 60;

/// Middleware: requests for the edge's app domains are proxied; the rest
/// reach the edge's own endpoints.
pub(crate) async fn route_apps(
    State(edge): State<Arc<Edge>>,
    req: Request,
    next: Next,
) -> Response {
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(e) => return e.respond(wants_html(req.headers())),
    };
    let Some((wildcard, label)) = edge
        .wildcards
        .iter()
        .find_map(|w| Some((w.clone(), wildcard_label(&host, w)?.to_owned())))
    else {
        // The edge's own endpoints: never framed, HSTS over HTTPS.
        let mut resp = next.run(req).await;
        protect_page(&mut resp, edge.scheme == "https");
        return resp;
    };
    let start = Instant::now();
    let html = wants_html(req.headers());
    let (kind, resp) = match parse_label(&label) {
        None => (
            "app",
            AppError::NotFound(format!("{label:?} is not an app address.")).respond(html),
        ),
        Some(app) => {
            let kind = match app.target {
                AppTarget::Slug(_) => "app",
                AppTarget::Port { .. } => "dev_url",
            };
            match serve(&edge, &host, &wildcard, app, req).await {
                Ok(resp) => (kind, resp),
                Err(e) => {
                    tracing::debug!(app.host = %host, error = ?e, "app request refused");
                    (kind, e.respond(html))
                }
            }
        }
    };
    edge.metrics
        .duration
        .get_or_create(&KindLabels { kind })
        .observe(start.elapsed().as_secs_f64());
    edge.metrics
        .requests
        .get_or_create(&RequestLabels {
            kind,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

async fn serve(
    edge: &Arc<Edge>,
    host: &str,
    wildcard: &str,
    app: AppHost,
    req: Request,
) -> Result<Response, AppError> {
    let token_cookie = token_cookie_name(wildcard);
    let secure = edge.scheme == "https";
    let (head, body) = req.into_parts();
    let client = head
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();

    // Phase: back from signing in with a sealed one-time grant.
    if let Some(sealed) = query_param(&head.uri, GRANT_PARAM) {
        let state = cookie(&head.headers, STATE_COOKIE).unwrap_or_default();
        let d = edge.app_connect(&sealed, state, host).await?;
        return Ok(signed_in_redirect(
            &head.uri,
            edge.scheme,
            host,
            &token_cookie,
            &d.token,
        ));
    }

    // Phase: credentials and decision. A token cookie for this host is
    // verified here; otherwise a decision for the key, cached or fresh.
    let now = chrono::Utc::now().timestamp();
    let from_cookie = cookie(&head.headers, &token_cookie)
        .filter(|_| cookie_allowed(&head, host))
        .and_then(|t| Some((t, edge.keys.verify::<AppToken>(t, now).ok()?)))
        .filter(|(_, t)| t.host == host && t.target == app.target && !edge.revoked(t));
    let (claims, grant, new_cookie) = match from_cookie {
        Some((signed, t)) => {
            count(edge, "token");
            // An aging token is renewed once through the primary (cached,
            // so only one request of a page pays for it); if that fails the
            // old one serves until it expires.
            let renewed = if t.exp - now < APP_TOKEN_RENEW_SECS {
                decision(edge, host, Credential::Token(signed), &client)
                    .await
                    .ok()
            } else {
                None
            };
            (t, signed.to_owned(), renewed.map(|d| d.token.clone()))
        }
        None => {
            let key = header_key(&head.headers);
            let credential = key.as_deref().map_or(Credential::None, Credential::Key);
            match decision(edge, host, credential, &client).await {
                Ok(d) => (d.claims.clone(), d.token.clone(), Some(d.token.clone())),
                Err(AppError::Unauthenticated) => {
                    return sign_in(&edge.primary, edge.scheme, host, &head);
                }
                Err(e) => return Err(e),
            }
        }
    };

    // Phase: forward.
    let target = Target {
        agent_id: claims.agent_id,
        port: claims.port,
        https: claims.https,
        base_path: if claims.base_path.is_empty() {
            "/".into()
        } else {
            claims.base_path.clone()
        },
        // The app token is what the agent's home relay checks when the
        // stream crosses the mesh.
        grant: Some(grant),
    };
    let Some(relay) = edge.relay.get() else {
        return Err(AppError::PrimaryUnavailable);
    };
    let mut resp = devmesh_proxy::app::forward(
        &edge.upstreams,
        relay,
        &target,
        host,
        edge.scheme,
        axum::extract::Request::from_parts(head, body),
        None,
    )
    .await?;
    if let Some(t) = new_cookie {
        resp.headers_mut().append(
            header::SET_COOKIE,
            token_cookie_header(&token_cookie, &t, secure),
        );
    }
    Ok(resp)
}

/// What an app request presents to be decided on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Credential<'a> {
    /// Nothing: public apps only.
    None,
    /// A devmesh key from a header.
    Key(&'a str),
    /// An app token for this host, to renew.
    Token(&'a str),
}

impl Credential<'_> {
    fn secret(&self) -> &[u8] {
        match self {
            Credential::None => b"",
            Credential::Key(s) | Credential::Token(s) => s.as_bytes(),
        }
    }
}

fn count(edge: &Edge, result: &'static str) {
    edge.metrics
        .decisions
        .get_or_create(&CacheLabels { result })
        .inc();
}

/// The decision for `key` (or anyone) on `host`: cached while its token is
/// valid and unrevoked, refreshed in the background before it expires.
async fn decision(
    edge: &Arc<Edge>,
    host: &str,
    credential: Credential<'_>,
    client: &str,
) -> Result<Arc<Decision>, AppError> {
    let cache_key = (
        host.to_owned(),
        match credential {
            Credential::None => [0u8; 32],
            c => devmesh_shared::secret::sha256(c.secret()),
        },
    );
    let now = chrono::Utc::now().timestamp();
    if let Some(d) = edge.decisions.get(&cache_key).await
        && d.claims.exp > now
        && !edge.revoked(&d.claims)
    {
        count(edge, "hit");
        if d.claims.exp - now < REFRESH_BEFORE_SECS && !d.refreshing.swap(true, Ordering::AcqRel) {
            let (edge, owned, stale) = (edge.clone(), OwnedCredential::from(credential), d.clone());
            tokio::spawn(async move {
                count(&edge, "refresh");
                match edge.ask_primary(&cache_key.0, owned.borrow()).await {
                    Ok(fresh) => edge.decisions.insert(cache_key, Arc::new(fresh)).await,
                    // Unreachable: keep serving until the token expires.
                    Err(AppError::PrimaryUnavailable) => {
                        stale.refreshing.store(false, Ordering::Release);
                    }
                    Err(_) => edge.decisions.invalidate(&cache_key).await,
                }
            });
        }
        return Ok(d);
    }
    // Refusals are remembered briefly, so clients without access (or
    // anonymous crawlers) do not turn every request into a primary call.
    if let Some(refused) = edge.refusals.get(&cache_key).await {
        count(edge, "refused");
        return Err(refused);
    }
    // Made-up hosts and random well-formed keys each miss every cache: a
    // client gets only so many primary calls a minute.
    if let Err(wait) = edge.primary_calls.check(client) {
        count(edge, "rate_limited");
        tracing::debug!(client.ip = %client, ?wait, "too many access checks from one client");
        return Err(AppError::TooManyRequests);
    }
    count(edge, "miss");
    match edge.ask_primary(host, credential).await {
        Ok(fresh) => {
            let fresh = Arc::new(fresh);
            edge.decisions.insert(cache_key, fresh.clone()).await;
            Ok(fresh)
        }
        Err(e) => {
            if matches!(
                e,
                AppError::Unauthenticated | AppError::Forbidden | AppError::NotFound(_)
            ) {
                edge.refusals.insert(cache_key, e.clone()).await;
            }
            Err(e)
        }
    }
}

/// A [`Credential`] that outlives its request, for background refreshes.
enum OwnedCredential {
    None,
    Key(String),
    Token(String),
}

impl From<Credential<'_>> for OwnedCredential {
    fn from(c: Credential<'_>) -> Self {
        match c {
            Credential::None => Self::None,
            Credential::Key(k) => Self::Key(k.to_owned()),
            Credential::Token(t) => Self::Token(t.to_owned()),
        }
    }
}

impl OwnedCredential {
    fn borrow(&self) -> Credential<'_> {
        match self {
            Self::None => Credential::None,
            Self::Key(k) => Credential::Key(k),
            Self::Token(t) => Credential::Token(t),
        }
    }
}
