//! Apps and dev URLs on the edge's app domains.
//!
//! The same flow as the primary's, with the edge as the proxy:
//! 1. a browser back from signing in brings a sealed one-time key, which
//!    the primary opens (`app-connect`) and which becomes a cookie on the
//!    app domain;
//! 2. an app-token cookie for this host is verified locally with the
//!    primary's public keys and checked against pushed revocations: no
//!    call to anyone;
//! 3. otherwise the key (header or cookie) selects a cached decision; a
//!    miss asks the primary once (`app-access`), and decisions are
//!    refreshed in the background before their token expires, so in steady
//!    state no request waits on the primary;
//! 4. the request goes down the agent's tunnel, or over the mesh to the
//!    agent's home relay.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use devmesh_proxy::app::{
    AppError, KEY_PARAM, SESSION_COOKIE, STATE_COOKIE, Target, cookie, cookie_allowed,
    cookie_names, header_key, query_param, sign_in, signed_in_redirect, token_cookie_header,
    wants_html,
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
    let host = devmesh_proxy::app::request_host(&req);
    let Some((wildcard, label)) = edge
        .wildcards
        .iter()
        .find_map(|w| Some((w.clone(), wildcard_label(&host, w)?.to_owned())))
    else {
        return next.run(req).await;
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
    let (key_cookie, token_cookie) = cookie_names(wildcard);
    let secure = edge.scheme == "https";
    let (head, body) = req.into_parts();

    // Phase: back from signing in with a sealed one-time key.
    if let Some(sealed) = query_param(&head.uri, KEY_PARAM) {
        let state = cookie(&head.headers, STATE_COOKIE).unwrap_or_default();
        let key = edge.app_connect(&sealed, state).await?;
        return Ok(signed_in_redirect(
            &head.uri,
            wildcard,
            &key_cookie,
            &key,
            secure,
        ));
    }

    // Phase: authenticate and authorise. A token cookie for this host is
    // verified here; otherwise a decision for the key, cached or fresh.
    let ambient_ok = cookie_allowed(&head, host);
    let now = chrono::Utc::now().timestamp();
    let from_cookie = cookie(&head.headers, &token_cookie)
        .filter(|_| ambient_ok)
        .and_then(|t| edge.keys.verify::<AppToken>(t, now).ok())
        .filter(|t| t.host == host && t.target == app.target && !edge.revoked(t));
    let (claims, new_cookie) = match from_cookie {
        Some(t) => {
            count(edge, "token");
            (t, None)
        }
        None => {
            let key = header_key(&head.headers).or_else(|| {
                ambient_ok
                    .then(|| cookie(&head.headers, &key_cookie).map(str::to_owned))
                    .flatten()
            });
            match decision(edge, host, key.as_deref()).await {
                Ok(d) => (d.claims.clone(), Some(d.token.clone())),
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
        &[key_cookie.as_str(), token_cookie.as_str(), SESSION_COOKIE],
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
    key: Option<&str>,
) -> Result<Arc<Decision>, AppError> {
    let cache_key = (
        host.to_owned(),
        key.map(|k| devmesh_shared::secret::sha256(k.as_bytes()))
            .unwrap_or_default(),
    );
    let now = chrono::Utc::now().timestamp();
    if let Some(d) = edge.decisions.get(&cache_key).await
        && d.claims.exp > now
        && !edge.revoked(&d.claims)
    {
        count(edge, "hit");
        if d.claims.exp - now < REFRESH_BEFORE_SECS && !d.refreshing.swap(true, Ordering::AcqRel) {
            let (edge, key, stale) = (edge.clone(), key.map(str::to_owned), d.clone());
            tokio::spawn(async move {
                count(&edge, "refresh");
                match edge.ask_primary(&cache_key.0, key.as_deref()).await {
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
    count(edge, "miss");
    match edge.ask_primary(host, key).await {
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
