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
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::Utc;
use devmesh_shared::api::SharingLevel;
use devmesh_shared::apphost::{AppHost, AppTarget, parse_label, wildcard_label};
use devmesh_shared::secret::{constant_time_eq, random_alphanumeric};
use devmesh_shared::signing::AppToken;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use devmesh_proxy::app::{
    AppError, KEY_PARAM, SESSION_COOKIE, STATE_COOKIE, Target, cookie, cookie_allowed,
    cookie_names, header_key, html_escape, query_param, signed_in_redirect, token_cookie_header,
    wants_html,
};

use super::error::ApiResult;
use super::extract::{ApiQuery, request_token};
use super::{AppState, SetCookie};

/// How long the sealed key in the redirect is accepted.
const SEALED_LIFETIME_SECS: i64 = 60;
/// Lifetime of the `application_connect` key behind the apps-domain cookie.
const APP_KEY_LIFETIME: chrono::Duration =
    chrono::Duration::seconds(devmesh_proxy::app::APP_KEY_LIFETIME_SECS);
/// Lifetime of an app token.
const APP_TOKEN_LIFETIME: chrono::Duration =
    chrono::Duration::seconds(devmesh_proxy::app::APP_TOKEN_LIFETIME_SECS);

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
    let host = devmesh_proxy::app::request_host(&req);
    let on_apps_domain = state
        .config
        .wildcard_access_url
        .as_deref()
        .is_some_and(|w| wildcard_label(&host, w).is_some());
    if !on_apps_domain && req.uri().path().starts_with("/@") {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = req.into_parts();
        let auth = super::extract::Authed::from_request_parts(&mut parts, &state).await;
        return path_app(State(state), auth, Request::from_parts(parts, body)).await;
    }
    let Some(wildcard) = state.config.wildcard_access_url.clone() else {
        return next.run(req).await;
    };
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

/// Opens a sealed one-time key brought back by the browser holding
/// `state_cookie`, accepting each key once.
async fn open_sealed_key(
    state: &AppState,
    sealed: &str,
    state_cookie: Option<&str>,
) -> Result<String, AppError> {
    let opened = state
        .sealer
        .open(sealed)
        .and_then(|p| serde_json::from_slice::<SealedKey>(&p).ok());
    let Some(k) = opened.filter(|k| k.exp >= Utc::now().timestamp()) else {
        return Err(AppError::BadRequest(
            "The sign-in link is invalid or has expired; open the app again.".into(),
        ));
    };
    // Someone else's sign-in link (a "login CSRF") is refused: this
    // browser must hold the state it was given when it was sent away.
    let started_here = state_cookie
        .is_some_and(|c| !k.state.is_empty() && constant_time_eq(c.as_bytes(), k.state.as_bytes()));
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
    Ok(k.key)
}

/// Whether an app token was revoked after it was minted (its user signed
/// out or was suspended, its workspace stopped or re-shared, its key deleted).
async fn token_revoked(state: &AppState, t: &AppToken) -> bool {
    let cut = |at: Option<i64>| at.is_some_and(|at| t.issued_at_ms <= at);
    if let Some(u) = t.user_id
        && cut(state.revoked_app_users.get(&u).await)
    {
        return true;
    }
    if let Some(k) = &t.key_id
        && cut(state.revoked_keys.get(k).await)
    {
        return true;
    }
    cut(state.revoked_workspaces.get(&t.workspace_id).await)
}

/// The decision for a caller with `key` (or none) on an app host: the
/// route, and a fresh app token when access is allowed.
async fn decide(
    state: &AppState,
    host: &str,
    app: &AppHost,
    key: Option<&str>,
    credentialed: bool,
) -> Result<(Route, AppToken), AppError> {
    // Callers without any credentials learn nothing about which users,
    // workspaces and apps exist, or whether they run: a failed lookup looks
    // like any app that needs signing in.
    let route = match resolve(state, app, false).await {
        Ok(route) => route,
        Err(AppError::NotFound(_) | AppError::Stopped | AppError::AgentNotConnected)
            if key.is_none() && !credentialed =>
        {
            return Err(AppError::Unauthenticated);
        }
        Err(e) => return Err(e),
    };
    let principal = match key {
        Some(token) => match state.keys.validate(token).await {
            Ok(Ok(p)) => Some(p),
            Ok(Err(_)) => None,
            Err(e) => return Err(AppError::BadGateway(format!("database: {e}"))),
        },
        None => None,
    };
    let user = principal.as_ref().map(|p| p.user_id);
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
    let now = Utc::now();
    let token = AppToken {
        user_id: user,
        workspace_id: route.workspace_id,
        agent_id: route.agent_id,
        target: app.target.clone(),
        host: host.to_owned(),
        sharing_level: route.level,
        key_id: principal.map(|p| p.key_id),
        port: route.port,
        https: route.https,
        base_path: route.base_path.clone(),
        issued_at_ms: now.timestamp_millis(),
        exp: now.timestamp() + APP_TOKEN_LIFETIME.num_seconds(),
    };
    Ok((route, token))
}

async fn serve(
    state: &AppState,
    host: &str,
    app: AppHost,
    req: Request,
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
    let (head, body) = req.into_parts();
    let secure = scheme == "https";

    // Phase: the browser comes back from the auth redirect with a sealed key.
    if let Some(sealed) = query_param(&head.uri, KEY_PARAM) {
        let key = open_sealed_key(state, &sealed, cookie(&head.headers, STATE_COOKIE)).await?;
        return Ok(signed_in_redirect(
            &head.uri,
            wildcard,
            &key_cookie,
            &key,
            secure,
        ));
    }

    // Phase: authenticate. An app token for this host and route is enough.
    let ambient_ok = cookie_allowed(&head, host);
    let now = Utc::now().timestamp();
    let verified = cookie(&head.headers, &token_cookie)
        .filter(|_| ambient_ok)
        .and_then(|t| state.signer.verifier().verify::<AppToken>(t, now).ok())
        .filter(|t| t.host == host && t.target == app.target);
    // A revoked token still shows its holder why (say, a stopped workspace).
    let credentialed = verified.is_some();
    let mut token_ok = None;
    if let Some(t) = verified
        && !token_revoked(state, &t).await
    {
        token_ok = Some(t);
    }
    let (route, new_token) = match token_ok {
        Some(t) => {
            // The token proves who; the route (checked every second) proves
            // the workspace still runs with the same agent and sharing.
            let route = resolve(state, &app, false).await?;
            if route.agent_id != t.agent_id || route.level != t.sharing_level {
                return sign_in(state, scheme, host, &head);
            }
            (route, None)
        }
        None => {
            // A header that is not a devmesh key belongs to the app (its
            // own bearer tokens): fall back to the key cookie.
            let key = header_key(&head.headers).or_else(|| {
                ambient_ok
                    .then(|| cookie(&head.headers, &key_cookie).map(str::to_owned))
                    .flatten()
            });
            match decide(state, host, &app, key.as_deref(), credentialed).await {
                Ok((route, token)) => (route, Some(token)),
                Err(AppError::Unauthenticated) => return sign_in(state, scheme, host, &head),
                Err(e) => return Err(e),
            }
        }
    };

    // Phase: forward.
    let mut resp = forward(
        state,
        &route,
        host,
        scheme,
        Request::from_parts(head, body),
        &[key_cookie.as_str(), token_cookie.as_str(), SESSION_COOKIE],
        None,
    )
    .await?;
    if let Some(t) = new_token {
        let signed = state.signer.sign(&t);
        resp.headers_mut().append(
            header::SET_COOKIE,
            token_cookie_header(&token_cookie, &signed, secure),
        );
    }
    Ok(resp)
}

// === For edges (`/api/v2/edges/me/app-*`) ===

/// `POST /api/v2/edges/me/app-access`: the edge asks whether the holder of
/// a key (or anyone) may open an app on one of its hosts, and gets a signed
/// app token to verify locally from then on.
pub(super) async fn edge_app_access(
    State(state): State<AppState>,
    edge: super::edges::EdgeAuth,
    super::extract::ApiJson(req): super::extract::ApiJson<
        devmesh_shared::api::EdgeAppAccessRequest,
    >,
) -> Response {
    let host = req.host.to_ascii_lowercase();
    let wildcards = match super::edges::edge_wildcards(&state, edge.id).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let Some(app) = wildcards
        .iter()
        .find_map(|w| wildcard_label(&host, w))
        .and_then(parse_label)
    else {
        return AppError::NotFound("The host is not an app address of this edge.".into())
            .respond(false);
    };
    match decide(&state, &host, &app, req.key.as_deref(), false).await {
        Ok((route, claims)) => {
            // Events may trail the database by a moment: ask it when the
            // agent is not located yet.
            let location = if state.relay.is_attached(route.agent_id) {
                Some(state.relay.advertised().clone())
            } else if let Some(l) = state.locations.get(route.agent_id) {
                Some(l)
            } else {
                crate::events::agent_location(&state.db, route.agent_id)
                    .await
                    .ok()
                    .flatten()
            };
            axum::Json(devmesh_shared::api::EdgeAppAccess {
                token: state.signer.sign(&claims),
                claims,
                location,
            })
            .into_response()
        }
        Err(e) => e.respond(false),
    }
}

/// `POST /api/v2/edges/me/app-connect`: opens the sealed one-time key a
/// browser brought back to an edge's app host.
pub(super) async fn edge_app_connect(
    State(state): State<AppState>,
    _edge: super::edges::EdgeAuth,
    super::extract::ApiJson(req): super::extract::ApiJson<
        devmesh_shared::api::EdgeAppConnectRequest,
    >,
) -> Response {
    match open_sealed_key(&state, &req.sealed, Some(&req.state)).await {
        Ok(key) => axum::Json(devmesh_shared::api::EdgeAppConnect { key }).into_response(),
        Err(e) => e.respond(false),
    }
}

/// Sends a browser to sign in at the primary; other clients get a 401.
fn sign_in(
    state: &AppState,
    scheme: &str,
    host: &str,
    head: &axum::http::request::Parts,
) -> Result<Response, AppError> {
    devmesh_proxy::app::sign_in(&state.config.access_url, scheme, host, head)
}

/// Sends the request to the route's app through the relay (directly or over
/// the mesh) and streams the response back.
async fn forward(
    state: &AppState,
    route: &Route,
    host: &str,
    scheme: &str,
    req: Request,
    strip_cookies: &[&str],
    prefix: Option<&str>,
) -> Result<Response, AppError> {
    // Events may trail the database by a moment: locate an agent that is
    // neither here nor known elsewhere yet.
    if !state.relay.is_attached(route.agent_id)
        && state.locations.get(route.agent_id).is_none()
        && let Ok(Some(relay)) = crate::events::agent_location(&state.db, route.agent_id).await
    {
        state.locations.set(devmesh_shared::api::AgentLocation {
            agent_id: route.agent_id,
            relay: Some(relay),
        });
    }
    let target = Target {
        agent_id: route.agent_id,
        port: route.port,
        https: route.https,
        base_path: route.base_path.clone(),
    };
    devmesh_proxy::app::forward(
        &state.upstreams,
        &state.relay,
        &target,
        host,
        scheme,
        req,
        strip_cookies,
        prefix,
    )
    .await
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
    match forward(
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
    let target = q
        .get("redirect_uri")
        .ok_or_else(|| bad("redirect_uri is required"))?;
    let url = url::Url::parse(target).map_err(|_| bad("redirect_uri is not a URL"))?;
    let host = url.host_str().unwrap_or_default();
    let host_port = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    // Only app hosts of this deployment (the primary's apps domain or an
    // edge's): never an open redirect. Same scheme and port as the one
    // serving that domain: a sealed key never travels in cleartext from an
    // HTTPS deployment, nor to another service's port.
    let mut domains: Vec<(String, String)> = state
        .config
        .wildcard_access_url
        .iter()
        .map(|w| (w.clone(), state.config.access_url.clone()))
        .collect();
    let edge_domains: Vec<(Option<String>, Option<String>, String)> = sqlx::query_as(
        "SELECT wildcard_hostname, global_wildcard_hostname, access_url FROM relay_replicas
         WHERE last_heartbeat_at > now() - interval '30 seconds'",
    )
    .fetch_all(&state.db)
    .await?;
    for (regional, global, access) in edge_domains {
        domains.extend(
            [regional, global]
                .into_iter()
                .flatten()
                .map(|w| (w, access.clone())),
        );
    }
    let label_ok = domains.iter().any(|(wildcard, access)| {
        url::Url::parse(access).is_ok_and(|own| {
            url.scheme() == own.scheme()
                && url.port_or_known_default() == own.port_or_known_default()
        }) && wildcard_label(&host_port, wildcard)
            .and_then(parse_label)
            .is_some()
    });
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
pub(crate) fn revocation_cache<K>() -> moka::future::Cache<K, i64>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
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
