//! Workspace apps and dev URLs on the primary's wildcard domain.
//!
//! A request to `<slug|port>--[agent--]<workspace>--<user>.<apps domain>`
//! goes through named phases: parse the host → exchange a one-time key from
//! the auth redirect → resolve the route in the database → authenticate
//! (app token cookie, session header or bearer key, app-domain key cookie,
//! or anonymous for public apps) → authorise against the sharing level →
//! open a stream to the agent → forward.
//!
//! The apps domain never sees the dashboard's session cookie. Browsers
//! without credentials are sent to `/api/v2/applications/auth-redirect` on
//! the primary, which (after login) returns them with a short-lived, sealed,
//! single-use `application_connect` key; it becomes a cookie on the apps
//! domain, and each app host then gets its own Ed25519 app token cookie that
//! later requests verify locally.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::Utc;
use devmesh_shared::api::SharingLevel;
use devmesh_shared::apphost::{AppHost, AppTarget, parse_label, wildcard_label};
use devmesh_shared::secret::{constant_time_eq, random_alphanumeric};
use devmesh_shared::signing::AppToken;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiResult;
use super::extract::{
    ApiQuery, SESSION_COOKIE, TokenSource, request_token, request_token_with_source,
    same_origin_request,
};
use super::{AppState, SetCookie};
use crate::relay::OpenError;
use crate::upstream::SendError;

/// Query parameter carrying the sealed one-time key back to the app host.
const KEY_PARAM: &str = "devmesh_app_key";
/// How long the sealed key in the redirect is accepted.
const SEALED_LIFETIME_SECS: i64 = 60;
/// Lifetime of the `application_connect` key behind the apps-domain cookie.
const APP_KEY_LIFETIME: chrono::Duration = chrono::Duration::hours(24);
/// Lifetime of an app token.
const APP_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::minutes(30);

// === Errors ===

/// Why an app request failed; each maps to a status, a page and a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppError {
    /// The hostname names no app, workspace or user.
    NotFound(String),
    /// The workspace is stopped.
    Stopped,
    /// The agent has no tunnel.
    AgentNotConnected,
    /// The app refused the connection.
    Refused,
    /// The tunnel or the app failed mid-request.
    BadGateway(String),
    /// No credentials (non-browser clients).
    Unauthenticated,
    /// Credentials, but not allowed to open this app.
    Forbidden,
    /// A malformed request.
    BadRequest(String),
}

impl AppError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::NotFound(what) => (StatusCode::NOT_FOUND, "App not found", what.clone()),
            Self::Stopped => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Workspace stopped",
                "The workspace is stopped. Start it and try again.".into(),
            ),
            Self::AgentNotConnected => (
                StatusCode::BAD_GATEWAY,
                "Agent not connected",
                "The workspace's agent is not connected. It may still be starting, or the machine may be offline.".into(),
            ),
            Self::Refused => (
                StatusCode::BAD_GATEWAY,
                "App refused the connection",
                "Nothing is listening on the app's port inside the workspace.".into(),
            ),
            Self::BadGateway(why) => (StatusCode::BAD_GATEWAY, "Connection to the app failed", why.clone()),
            Self::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "Sign in, or send a key in the Devmesh-Session-Token header.".into(),
            ),
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                "Not authorized",
                "You are not allowed to open this app. Ask its owner to share it.".into(),
            ),
            Self::BadRequest(why) => (StatusCode::BAD_REQUEST, "Bad request", why.clone()),
        }
    }

    fn respond(&self, wants_html: bool) -> Response {
        let (status, title, detail) = self.parts();
        if wants_html {
            let page = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · devmesh</title>\
                 <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;color:#222}}\
                 h1{{font-size:1.4rem}}</style></head><body><h1>{title}</h1><p>{}</p><p><small>devmesh · {}</small></p></body></html>",
                html_escape(&detail),
                status.as_u16()
            );
            (status, Html(page)).into_response()
        } else {
            let body = devmesh_shared::api::Error {
                message: format!("{title}."),
                detail,
                validations: vec![],
            };
            (status, axum::Json(body)).into_response()
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

// === Entry point ===

/// Middleware: requests for the apps domain are proxied; everything else
/// goes on to the API router.
pub(crate) async fn route_apps(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // Path apps live on the dashboard origin under /@user/...; the router
    // cannot match a parameter that shares a segment with "@".
    let on_apps_domain = state
        .config
        .wildcard_access_url
        .as_deref()
        .is_some_and(|w| {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            wildcard_label(&host.to_ascii_lowercase(), w).is_some()
        });
    if !on_apps_domain && req.uri().path().starts_with("/@") {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = req.into_parts();
        let auth = super::extract::Authed::from_request_parts(&mut parts, &state).await;
        return path_app(State(state), auth, Request::from_parts(parts, body)).await;
    }
    let Some(wildcard) = state.config.wildcard_access_url.clone() else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let Some(label) = wildcard_label(&host, &wildcard) else {
        return next.run(req).await;
    };
    let html = wants_html(req.headers());
    let Some(app) = parse_label(label) else {
        return AppError::NotFound(format!("{label:?} is not an app address.")).respond(html);
    };
    match serve(&state, &host, app, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(app.host = %host, error = ?e, "app request refused");
            e.respond(html)
        }
    }
}

/// Names of the apps-domain cookies; unique per domain so nested wildcards
/// (`*.apps.example.com` and `*.eu.apps.example.com`) never collide.
pub(crate) fn cookie_names(wildcard: &str) -> (String, String) {
    let h = &hex::encode(devmesh_shared::secret::sha256(wildcard.as_bytes()))[..8];
    (
        format!("devmesh_app_key_{h}"),
        format!("devmesh_app_token_{h}"),
    )
}

/// Cookies authenticate an app request only when the browser sent it for
/// this app itself, or for a top-level navigation to it: every app host
/// shares one site, so another app's page (a script, a form, a WebSocket)
/// must not ride on the user's cookies.
fn cookie_allowed(parts: &axum::http::request::Parts, host: &str) -> bool {
    let navigation = parts.method == Method::GET
        && parts
            .headers
            .get("sec-fetch-mode")
            .and_then(|v| v.to_str().ok())
            == Some("navigate")
        && parts.headers.get(header::UPGRADE).is_none();
    navigation || same_origin_request(&parts.headers, host)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

// === Route resolution ===

#[derive(Debug, Clone)]
pub(crate) struct Route {
    workspace_id: Uuid,
    owner_id: Uuid,
    agent_id: Uuid,
    port: u16,
    https: bool,
    base_path: String,
    level: SharingLevel,
}

#[derive(sqlx::FromRow)]
struct RouteRow {
    workspace_id: Uuid,
    owner_id: Uuid,
    transition: String,
    agent_id: Option<Uuid>,
    agents: i64,
}

/// Resolves a route, from a cache that lives a second and is emptied
/// whenever a workspace, a port share or a user changes on this primary.
async fn resolve(state: &AppState, app: &AppHost, path_app: bool) -> Result<Route, AppError> {
    let key = format!(
        "{:?}|{:?}|{}|{}|{path_app}",
        app.target, app.agent, app.workspace, app.user
    );
    if let Some(route) = state.routes.get(&key).await {
        return Ok(route);
    }
    let route = resolve_uncached(state, app, path_app).await?;
    state.routes.insert(key, route.clone()).await;
    Ok(route)
}

async fn resolve_uncached(
    state: &AppState,
    app: &AppHost,
    path_app: bool,
) -> Result<Route, AppError> {
    let not_found = || AppError::NotFound("No such app, workspace or user.".into());
    let db_err = |e: sqlx::Error| AppError::BadGateway(format!("database: {e}"));
    let row: Option<RouteRow> = sqlx::query_as(
        "SELECT w.id AS workspace_id, w.owner_id, lb.transition, g.id AS agent_id,
                (SELECT count(*) FROM workspace_agents c WHERE c.build_id = lb.id) AS agents
         FROM users u
         JOIN workspaces w ON w.owner_id = u.id AND w.name = $2 AND NOT w.deleted
         JOIN LATERAL (SELECT id, transition FROM workspace_builds b WHERE b.workspace_id = w.id
                       ORDER BY build_number DESC LIMIT 1) lb ON true
         LEFT JOIN workspace_agents g ON g.build_id = lb.id AND ($3::text IS NULL OR g.name = $3)
         WHERE u.username = $1 AND NOT u.deleted
         ORDER BY g.name LIMIT 1",
    )
    .bind(&app.user)
    .bind(&app.workspace)
    .bind(&app.agent)
    .fetch_optional(&state.db)
    .await
    .map_err(db_err)?;
    let row = row.ok_or_else(not_found)?;
    if row.transition != "start" {
        return Err(AppError::Stopped);
    }
    if app.agent.is_none() && row.agents > 1 {
        return Err(AppError::NotFound(
            "The workspace has several agents: name one in the address.".into(),
        ));
    }
    let agent_id = row.agent_id.ok_or_else(not_found)?;
    let (port, https, base_path, level) = match &app.target {
        AppTarget::Slug(slug) => {
            let app_row: Option<(String, String)> = sqlx::query_as(
                "SELECT url, sharing_level FROM workspace_apps WHERE agent_id = $1 AND slug = $2 AND subdomain = $3",
            )
            .bind(agent_id)
            .bind(slug)
            .bind(!path_app)
            .fetch_optional(&state.db)
            .await
            .map_err(db_err)?;
            let (url, level) = app_row.ok_or_else(not_found)?;
            let (port, https, path) = super::templates::upstream(&url).ok_or_else(not_found)?;
            (port, https, path, SharingLevel::from_stored(&level))
        }
        AppTarget::Port { port, https } => {
            let level: Option<String> = sqlx::query_scalar(
                "SELECT p.sharing_level FROM port_shares p JOIN workspace_agents g ON g.workspace_id = p.workspace_id
                 AND g.name = p.agent_name WHERE g.id = $1 AND p.port = $2",
            )
            .bind(agent_id)
            .bind(i32::from(*port))
            .fetch_optional(&state.db)
            .await
            .map_err(db_err)?;
            (
                *port,
                *https,
                "/".to_owned(),
                level
                    .map(|l| SharingLevel::from_stored(&l))
                    .unwrap_or_default(),
            )
        }
    };
    Ok(Route {
        workspace_id: row.workspace_id,
        owner_id: row.owner_id,
        agent_id,
        port,
        https,
        base_path,
        level,
    })
}

// === Serving ===

#[derive(Serialize, Deserialize)]
struct SealedKey {
    key: String,
    exp: i64,
    nonce: String,
    /// The state the app host gave the browser that started the sign-in;
    /// the sealed key is only accepted by that browser.
    #[serde(default)]
    state: String,
}

/// Name of the host-only cookie that binds a sign-in to the browser that
/// started it.
const STATE_COOKIE: &str = "devmesh_app_state";

async fn serve(
    state: &AppState,
    host: &str,
    app: AppHost,
    mut req: Request,
) -> Result<Response, AppError> {
    let wildcard = state
        .config
        .wildcard_access_url
        .as_deref()
        .unwrap_or_default();
    let (key_cookie, token_cookie) = cookie_names(wildcard);
    let scheme = if state.config.secure_cookies() {
        "https"
    } else {
        "http"
    };

    // Phase: the browser comes back from the auth redirect with a sealed key.
    if let Some(sealed) = query_param(req.uri(), KEY_PARAM) {
        let opened = state
            .sealer
            .open(&sealed)
            .and_then(|p| serde_json::from_slice::<SealedKey>(&p).ok());
        let Some(k) = opened.filter(|k| k.exp >= Utc::now().timestamp()) else {
            return Err(AppError::BadRequest(
                "The sign-in link is invalid or has expired; open the app again.".into(),
            ));
        };
        // Someone else's sign-in link (a "login CSRF") is refused: this
        // browser must hold the state it was given when it was sent away.
        let started_here = cookie(req.headers(), STATE_COOKIE).is_some_and(|c| {
            !k.state.is_empty() && constant_time_eq(c.as_bytes(), k.state.as_bytes())
        });
        if !started_here {
            return Err(AppError::BadRequest(
                "This sign-in link was started in another browser; open the app again.".into(),
            ));
        }
        // Atomic check-and-record: of two concurrent uses, one wins.
        if !state
            .used_nonces
            .entry(k.nonce)
            .or_insert(())
            .await
            .is_fresh()
        {
            return Err(AppError::BadRequest(
                "The sign-in link was already used; open the app again.".into(),
            ));
        }
        let domain = wildcard
            .trim_start_matches("*.")
            .split(':')
            .next()
            .unwrap_or_default();
        let set = SetCookie {
            name: &key_cookie,
            value: &k.key,
            path: "/",
            domain: Some(domain),
            max_age: APP_KEY_LIFETIME.num_seconds(),
            same_site: "Lax",
            secure: scheme == "https",
        };
        let clean = strip_query_param(req.uri(), KEY_PARAM);
        let mut resp = Redirect::to(&clean).into_response();
        resp.headers_mut().append(header::SET_COOKIE, set.header());
        let spent = SetCookie {
            name: STATE_COOKIE,
            value: "",
            path: "/",
            domain: None,
            max_age: 0,
            same_site: "Lax",
            secure: scheme == "https",
        };
        resp.headers_mut()
            .append(header::SET_COOKIE, spent.header());
        return Ok(resp);
    }

    // Callers without any credentials learn nothing about which users,
    // workspaces and apps exist, or whether they run: a failed lookup looks
    // like any app that needs signing in.
    let credentialed = {
        let (parts, body) = req.into_parts();
        let has = request_token_with_source(&parts).is_some()
            || cookie(&parts.headers, &key_cookie).is_some()
            || cookie(&parts.headers, &token_cookie).is_some();
        req = Request::from_parts(parts, body);
        has
    };
    let route = match resolve(state, &app, false).await {
        Ok(route) => route,
        Err(AppError::NotFound(_) | AppError::Stopped | AppError::AgentNotConnected)
            if !credentialed =>
        {
            return sign_in(state, scheme, host, &req);
        }
        Err(e) => return Err(e),
    };
    let now = Utc::now().timestamp();

    // Phase: authenticate. An app token for this host and route is enough.
    let mut new_token = None;
    let (head, body) = req.into_parts();
    let ambient_ok = cookie_allowed(&head, host);
    req = Request::from_parts(head, body);
    let token_ok = cookie(req.headers(), &token_cookie)
        .filter(|_| ambient_ok)
        .and_then(|t| state.signer.verifier().verify::<AppToken>(t, now).ok())
        .filter(|t| {
            t.host == host
                && t.agent_id == route.agent_id
                && t.target == app.target
                && t.sharing_level == route.level
        });
    let token_ok = match token_ok {
        Some(t) => match t.user_id {
            Some(u) => {
                let minted = t.exp - APP_TOKEN_LIFETIME.num_seconds();
                let revoked = state
                    .revoked_app_users
                    .get(&u)
                    .await
                    .is_some_and(|at| minted <= at);
                (!revoked).then_some(t)
            }
            None => Some(t),
        },
        None => None,
    };
    let user: Option<Uuid> = match token_ok {
        Some(t) => t.user_id,
        None => {
            let parts_token = {
                let (parts, body) = req.into_parts();
                // A header that is not a devmesh key belongs to the app
                // (its own bearer tokens): fall back to the key cookie.
                let header = request_token_with_source(&parts)
                    .filter(|(t, src)| {
                        *src == TokenSource::Header
                            && devmesh_shared::token::parse_api_key(t).is_some()
                    })
                    .map(|(t, _)| t);
                let t = header.or_else(|| {
                    cookie_allowed(&parts, host)
                        .then(|| cookie(&parts.headers, &key_cookie).map(str::to_owned))
                        .flatten()
                });
                req = Request::from_parts(parts, body);
                t
            };
            let user = match parts_token {
                Some(token) => match state.keys.validate(&token).await {
                    Ok(Ok(p)) => Some(p.user_id),
                    Ok(Err(_)) => None,
                    Err(e) => return Err(AppError::BadGateway(format!("database: {e}"))),
                },
                None => None,
            };
            if user.is_none() && route.level != SharingLevel::Public {
                return sign_in(state, scheme, host, &req);
            }
            new_token = Some(AppToken {
                user_id: user,
                workspace_id: route.workspace_id,
                agent_id: route.agent_id,
                target: app.target.clone(),
                host: host.to_owned(),
                sharing_level: route.level,
                exp: now + APP_TOKEN_LIFETIME.num_seconds(),
            });
            user
        }
    };

    // Phase: authorise.
    let allowed = match route.level {
        SharingLevel::Public => true,
        SharingLevel::Authenticated => user.is_some(),
        SharingLevel::Owner => user == Some(route.owner_id),
    };
    if !allowed {
        return Err(if user.is_none() {
            AppError::Unauthenticated
        } else {
            AppError::Forbidden
        });
    }

    // Phase: forward.
    let mut resp = forward(
        state,
        &route,
        host,
        scheme,
        req,
        &[key_cookie.as_str(), token_cookie.as_str(), SESSION_COOKIE],
    )
    .await?;
    if let Some(t) = new_token {
        let signed = state.signer.sign(&t);
        let set = SetCookie {
            name: &token_cookie,
            value: &signed,
            path: "/",
            domain: None,
            max_age: APP_TOKEN_LIFETIME.num_seconds(),
            same_site: "Lax",
            secure: scheme == "https",
        };
        resp.headers_mut().append(header::SET_COOKIE, set.header());
    }
    Ok(resp)
}

/// Sends a browser to sign in (binding the flow to it with a state
/// cookie); other clients get a 401.
fn sign_in(
    state: &AppState,
    scheme: &str,
    host: &str,
    req: &Request,
) -> Result<Response, AppError> {
    if !(wants_html(req.headers()) && req.method() == Method::GET) {
        return Err(AppError::Unauthenticated);
    }
    let back = format!(
        "{scheme}://{host}{}",
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut target = url::Url::parse(&format!(
        "{}/api/v2/applications/auth-redirect",
        state.config.access_url
    ))
    .map_err(|e| AppError::BadGateway(e.to_string()))?;
    let flow = random_alphanumeric(24);
    target
        .query_pairs_mut()
        .append_pair("redirect_uri", &back)
        .append_pair("state", &flow);
    let mut resp = Redirect::to(target.as_str()).into_response();
    let set = SetCookie {
        name: STATE_COOKIE,
        value: &flow,
        path: "/",
        domain: None,
        max_age: 600,
        same_site: "Lax",
        secure: scheme == "https",
    };
    resp.headers_mut().append(header::SET_COOKIE, set.header());
    Ok(resp)
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn strip_query_param(uri: &Uri, name: &str) -> String {
    let kept: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .filter(|(k, _)| k != name)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let mut out = uri.path().to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(kept)
                .finish(),
        );
    }
    out
}

/// Sends the request down a tunnel stream and streams the response back.
/// devmesh cookies and credentials never reach the app.
async fn forward(
    state: &AppState,
    route: &Route,
    host: &str,
    scheme: &str,
    req: Request,
    strip_cookies: &[&str],
) -> Result<Response, AppError> {
    forward_with_prefix(state, route, host, scheme, req, strip_cookies, None).await
}

async fn forward_with_prefix(
    state: &AppState,
    route: &Route,
    host: &str,
    scheme: &str,
    mut req: Request,
    strip_cookies: &[&str],
    prefix: Option<&str>,
) -> Result<Response, AppError> {
    let client_ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let headers = req.headers_mut();
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && !strip_cookies
                    .iter()
                    .any(|n| c.starts_with(&format!("{n}=")))
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
    headers.remove(super::extract::SESSION_HEADER);
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(super::extract::bearer)
        .is_some_and(|t| devmesh_shared::token::parse_api_key(t).is_some())
    {
        headers.remove(header::AUTHORIZATION);
    }
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
        headers.insert(header::HOST, v);
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
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v);
    }
    // Upstream path: the app's base path, then the request's.
    if route.base_path != "/" && !route.base_path.is_empty() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let joined = format!("{}{}", route.base_path.trim_end_matches('/'), pq);
        *req.uri_mut() = joined
            .parse()
            .map_err(|_| AppError::BadRequest("bad path".into()))?;
    } else if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = axum::http::Version::HTTP_11;

    let upgrade = req.headers().get(header::UPGRADE).is_some();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let key = crate::upstream::Key {
        agent: route.agent_id,
        port: route.port,
        https: route.https,
    };
    let mut resp = state
        .upstreams
        .send(&state.relay, key, req, upgrade)
        .await
        .map_err(|e| match e {
            SendError::Open(OpenError::NotConnected) => AppError::AgentNotConnected,
            SendError::Open(OpenError::Refused) => AppError::Refused,
            SendError::Open(other) => AppError::BadGateway(other.to_string()),
            SendError::App(why) => AppError::BadGateway(why),
        })?;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream.await) else {
                return;
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        });
    }
    // An app must not plant devmesh cookies (say, its owner's key) in the
    // user's browser for the whole apps domain.
    let kept: Vec<HeaderValue> = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            !v.to_str()
                .unwrap_or_default()
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("devmesh")
        })
        .cloned()
        .collect();
    resp.headers_mut().remove(header::SET_COOKIE);
    for v in kept {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(resp.map(Body::new))
}

// === Path-based apps (dashboard origin; off unless enabled) ===

/// `/@{user}/{workspace}[.{agent}]/apps/{slug}/...`: apps declared with
/// `"subdomain": false`. They share the dashboard's origin, so they are off
/// unless `--enable-path-apps` is set, and only the workspace owner may open
/// them, whatever their sharing level.
pub(super) async fn path_app(
    State(state): State<AppState>,
    auth: Result<super::extract::Authed, super::error::ApiError>,
    req: Request,
) -> Response {
    let html = wants_html(req.headers());
    if !state.config.enable_path_apps {
        return AppError::NotFound("Path-based apps are disabled on this deployment.".into())
            .respond(html);
    }
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches("/@").splitn(5, '/');
    let (Some(user), Some(ws_agent), Some("apps"), Some(slug)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return AppError::NotFound("Not an app path.".into()).respond(html);
    };
    let rest = parts.next();
    let prefix = format!("/@{user}/{ws_agent}/apps/{slug}");
    if rest.is_none() {
        let q = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        return Redirect::permanent(&format!("{prefix}/{q}")).into_response();
    }
    let (workspace, agent) = match ws_agent.split_once('.') {
        Some((w, a)) => (w, Some(a.to_owned())),
        None => (ws_agent, None),
    };
    let app = AppHost {
        target: AppTarget::Slug(slug.to_owned()),
        agent,
        workspace: workspace.to_owned(),
        user: user.to_owned(),
    };
    if devmesh_shared::names::validate_name(slug).is_err()
        || devmesh_shared::names::validate_name(workspace).is_err()
    {
        return AppError::NotFound("Not an app path.".into()).respond(html);
    }
    let Ok(super::extract::Authed(principal)) = auth else {
        return AppError::Unauthenticated.respond(html);
    };
    let route = match resolve(&state, &app, true).await {
        Ok(r) => r,
        Err(e) => return e.respond(html),
    };
    if route.owner_id != principal.user_id {
        return AppError::Forbidden.respond(html);
    }
    let mut req = req;
    let upstream_path = format!(
        "/{}{}",
        rest.unwrap_or_default(),
        req.uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    match upstream_path.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return AppError::BadRequest("bad path".into()).respond(html),
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let scheme = if state.config.secure_cookies() {
        "https"
    } else {
        "http"
    };
    match forward_with_prefix(
        &state,
        &route,
        &host,
        scheme,
        req,
        &[SESSION_COOKIE],
        Some(&prefix),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => e.respond(html),
    }
}

// === Auth redirect and login page (dashboard origin) ===

/// `GET /api/v2/applications/auth-redirect?redirect_uri=...`
pub(super) async fn auth_redirect(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let bad = |m: &str| super::error::ApiError::bad_request(m.to_owned());
    let wildcard = state
        .config
        .wildcard_access_url
        .clone()
        .ok_or_else(|| bad("Apps are not enabled on this deployment."))?;
    let target = q
        .get("redirect_uri")
        .ok_or_else(|| bad("redirect_uri is required"))?;
    let url = url::Url::parse(target).map_err(|_| bad("redirect_uri is not a URL"))?;
    let host = url.host_str().unwrap_or_default();
    let host_port = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    // Only app hosts of this deployment: never an open redirect.
    // Same scheme and port as the deployment: a sealed key never travels in
    // cleartext from an HTTPS deployment, nor to another service's port.
    let own = url::Url::parse(&state.config.access_url).map_err(|_| bad("access URL"))?;
    let label_ok = url.scheme() == own.scheme()
        && url.port_or_known_default() == own.port_or_known_default()
        && wildcard_label(&host_port, &wildcard)
            .and_then(parse_label)
            .is_some();
    if !label_ok {
        return Err(bad("redirect_uri is not an app on this deployment"));
    }
    let session = {
        let (mut parts, _) = Request::new(Body::empty()).into_parts();
        parts.headers = headers;
        request_token(&parts)
    };
    let principal = match session {
        Some(t) => state.keys.validate(&t).await?.ok(),
        None => None,
    };
    let Some(principal) = principal.filter(|p| p.scope == devmesh_shared::api::KeyScope::All)
    else {
        let mut login = url::Url::parse("http://placeholder/login").map_err(|_| bad("url"))?;
        let mut back = url::Url::parse("http://placeholder/api/v2/applications/auth-redirect")
            .map_err(|_| bad("url"))?;
        back.query_pairs_mut().append_pair("redirect_uri", target);
        if let Some(flow) = q.get("state") {
            back.query_pairs_mut().append_pair("state", flow);
        }
        login.query_pairs_mut().append_pair(
            "redirect",
            &format!("{}?{}", back.path(), back.query().unwrap_or_default()),
        );
        return Ok(
            Redirect::to(&format!("/login?{}", login.query().unwrap_or_default())).into_response(),
        );
    };
    let key = crate::auth::issue_key(
        &state.db,
        principal.user_id,
        "app-connect",
        "token",
        devmesh_shared::api::KeyScope::ApplicationConnect,
        Utc::now() + APP_KEY_LIFETIME,
    )
    .await?;
    let sealed = state.sealer.seal(
        &serde_json::to_vec(&SealedKey {
            key: key.token.expose().to_owned(),
            exp: Utc::now().timestamp() + SEALED_LIFETIME_SECS,
            nonce: random_alphanumeric(16),
            state: q.get("state").cloned().unwrap_or_default(),
        })
        .map_err(anyhow::Error::from)?,
    );
    let mut back = url;
    back.query_pairs_mut().append_pair(KEY_PARAM, &sealed);
    Ok(Redirect::to(back.as_str()).into_response())
}

const CSRF_COOKIE: &str = "devmesh_csrf";

/// Only same-origin paths: `/x`, never `//host` or `/\host`.
fn safe_redirect(r: Option<&String>) -> String {
    match r {
        Some(r)
            if r.starts_with('/')
                && !r.starts_with("//")
                && !r.contains('\\')
                && !r.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            r.clone()
        }
        _ => "/".into(),
    }
}

fn login_page(redirect: &str, csrf: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"err\">{}</p>", html_escape(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sign in · devmesh</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:5rem auto}}\
         input{{display:block;width:100%;margin:.3rem 0 1rem;padding:.4rem}}.err{{color:#b00}}</style></head>\
         <body><h1>Sign in to devmesh</h1>{error}<form method=\"post\" action=\"/login\">\
         <label>Email or username<input name=\"email\" autocomplete=\"username\" required autofocus></label>\
         <label>Password<input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"redirect\" value=\"{}\">\
         <button type=\"submit\">Sign in</button></form></body></html>",
        html_escape(csrf),
        html_escape(redirect)
    )
}

fn csrf_cookie(value: &str, secure: bool) -> HeaderValue {
    SetCookie {
        name: CSRF_COOKIE,
        value,
        path: "/login",
        domain: None,
        max_age: 3600,
        same_site: "Strict",
        secure,
    }
    .header()
}

/// `GET /login?redirect=/path`: a minimal sign-in form.
pub(super) async fn login_form(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
) -> Response {
    let csrf = random_alphanumeric(32);
    let mut resp = Html(login_page(&safe_redirect(q.get("redirect")), &csrf, None)).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        csrf_cookie(&csrf, state.config.secure_cookies()),
    );
    resp
}

/// The sign-in form's fields.
#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    email: String,
    password: String,
    csrf: String,
    #[serde(default)]
    redirect: Option<String>,
}

/// `POST /login`: checks the CSRF token, signs in, sets the session cookie
/// and returns to the (same-origin) redirect.
pub(super) async fn login_submit(
    State(state): State<AppState>,
    client: super::extract::ClientIp,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let redirect = safe_redirect(form.redirect.as_ref());
    let csrf_ok = cookie(&headers, CSRF_COOKIE)
        .is_some_and(|c| constant_time_eq(c.as_bytes(), form.csrf.as_bytes()));
    let retry = |status: StatusCode, msg: &str| {
        let csrf = random_alphanumeric(32);
        let mut resp = (status, Html(login_page(&redirect, &csrf, Some(msg)))).into_response();
        resp.headers_mut().insert(
            header::SET_COOKIE,
            csrf_cookie(&csrf, state.config.secure_cookies()),
        );
        resp
    };
    if !csrf_ok {
        return retry(
            StatusCode::FORBIDDEN,
            "The form expired; please sign in again.",
        );
    }
    match super::users::password_login(&state, &client.0, &form.email, form.password).await {
        Ok((_, cookie)) => {
            let mut resp = Redirect::to(&redirect).into_response();
            resp.headers_mut().insert(header::SET_COOKIE, cookie);
            resp
        }
        Err(e) => {
            let status = e.status();
            retry(status, &e.message())
        }
    }
}

/// Revoked users' token cut-off times, kept as long as a token lives.
pub(crate) fn revocation_cache() -> moka::future::Cache<Uuid, i64> {
    moka::future::Cache::builder()
        .time_to_live(
            APP_TOKEN_LIFETIME
                .to_std()
                .unwrap_or(Duration::from_secs(1800))
                + Duration::from_secs(60),
        )
        .max_capacity(1_000_000)
        .build()
}

/// The route cache.
pub(crate) fn route_cache() -> moka::future::Cache<String, Route> {
    moka::future::Cache::builder()
        .time_to_live(Duration::from_secs(1))
        .max_capacity(100_000)
        .build()
}

/// Keeps a short-lived record of one-time keys already exchanged.
pub(crate) fn used_nonce_cache() -> moka::future::Cache<String, ()> {
    moka::future::Cache::builder()
        .time_to_live(Duration::from_secs(2 * SEALED_LIFETIME_SECS as u64))
        .max_capacity(1_000_000)
        .build()
}
