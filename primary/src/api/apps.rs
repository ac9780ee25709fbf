//! Workspace apps and dev URLs on the primary's wildcard domain.
//!
//! A request to `<slug|port>--[agent--]<workspace>--<user>.<apps domain>`
//! goes through the app proxy pipeline every edge runs too
//! ([`devmesh_proxy::pipeline`]); this module is its source of decisions
//! (the database and the sharing level, [`Decider`] for [`AppState`]), the
//! edges' decision endpoints, path apps, the auth redirect and login page.
//!
//! The apps domain never sees a devmesh key. Browsers without a token for
//! the host are sent to `/api/v2/applications/auth-redirect` on the
//! primary, which (after login, and only if the user may open that app)
//! returns them with a short-lived, sealed, single-use grant bound to that
//! one host and to the state cookie the host set; the host redeems it for
//! an Ed25519 app token cookie valid on that host alone.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use devmesh_shared::api::SharingLevel;
use devmesh_shared::apphost::{AppHost, AppTarget, parse_label, wildcard_label};
use devmesh_shared::secret::{constant_time_eq, random_alphanumeric};
use devmesh_shared::signing::AppToken;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use devmesh_proxy::app::{APP_TOKEN_RENEW_SECS, AppError, GRANT_PARAM, Target, wants_html};
use devmesh_proxy::pipeline::{Ask, Decided, Decider, Plumbing};

use super::AppState;
use super::error::ApiResult;
use super::extract::{ApiQuery, request_token};
use crate::auth::Principal;

/// How long the sealed grant in the redirect is accepted.
const SEALED_LIFETIME_SECS: i64 = 60;
/// [`devmesh_proxy::app::APP_TOKEN_LIFETIME_SECS`] as a duration, for
/// token expiries.
const APP_TOKEN_LIFETIME: chrono::Duration =
    chrono::Duration::seconds(devmesh_proxy::app::APP_TOKEN_LIFETIME_SECS);

// === Entry point ===

/// Middleware: requests for the apps domain go through the app proxy
/// pipeline (with this primary's database deciding); path apps and
/// everything else go on to the API router.
pub(crate) async fn route_apps(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let wildcards = state.config.wildcard_access_url.as_slice();
    // Path apps live on the dashboard origin under /@user/...; the router
    // cannot match a parameter that shares a segment with "@".
    if req.uri().path().starts_with("/@")
        && matches!(devmesh_proxy::pipeline::app_host(&req, wildcards), Ok(None))
    {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = req.into_parts();
        let auth = super::extract::Authed::from_request_parts(&mut parts, &state).await;
        return path_app(State(state), auth, Request::from_parts(parts, body)).await;
    }
    let plumbing = Plumbing {
        relay: &state.relay,
        upstreams: &state.upstreams,
        scheme: scheme(&state),
    };
    devmesh_proxy::pipeline::route(&state, plumbing, &state.metrics.apps, wildcards, req, next)
        .await
}

fn scheme(state: &AppState) -> &'static str {
    if state.config.secure_cookies() {
        "https"
    } else {
        "http"
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
    .map_err(db_unavailable)?;
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
            .map_err(db_unavailable)?;
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
            .map_err(db_unavailable)?;
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

/// A database failure while deciding: logged here, never shown.
fn db_unavailable(e: sqlx::Error) -> AppError {
    tracing::warn!(error = %e, "cannot decide an app request: database error");
    AppError::Unavailable
}

// === Serving ===

/// What the auth redirect seals into the URL back to an app host: who
/// signed in (and with which dashboard key, so the grant dies with it),
/// for which one host, for which browser (the state its host-only cookie
/// holds), once.
#[derive(Serialize, Deserialize)]
struct SealedGrant {
    user_id: Uuid,
    key_id: String,
    host: String,
    state: String,
    nonce: String,
    exp: i64,
}

/// Redeems a sealed grant brought back to `host` by the browser holding
/// `state_cookie`: each grant works once, on its own host, in its own
/// browser, while its key is valid and its user may still open the app.
/// Returns the app token for that host, signed.
async fn redeem_grant(
    state: &AppState,
    sealed: &str,
    state_cookie: Option<&str>,
    host: &str,
    app: &AppHost,
) -> Result<(Route, AppToken, String), AppError> {
    let bad = |why: &str| AppError::BadRequest(format!("{why} Open the app again."));
    let opened = state
        .sealer
        .open(sealed)
        .and_then(|p| serde_json::from_slice::<SealedGrant>(&p).ok());
    let Some(g) = opened.filter(|g| g.exp >= Utc::now().timestamp()) else {
        return Err(bad("The sign-in link is invalid or has expired."));
    };
    if !g.host.eq_ignore_ascii_case(host) {
        return Err(bad("The sign-in link was made for another app."));
    }
    // Someone else's sign-in link (a "login CSRF") is refused: this
    // browser must hold the state it was given when it was sent away.
    let started_here = state_cookie
        .is_some_and(|c| !g.state.is_empty() && constant_time_eq(c.as_bytes(), g.state.as_bytes()));
    if !started_here {
        return Err(bad("This sign-in link was started in another browser."));
    }
    // Spent once across every replica: of two concurrent uses, one wins.
    let fresh = sqlx::query(
        "WITH old AS (DELETE FROM app_grant_uses WHERE expires_at < now())
         INSERT INTO app_grant_uses (nonce, expires_at) VALUES ($1, to_timestamp($2))
         ON CONFLICT (nonce) DO NOTHING",
    )
    .bind(&g.nonce)
    .bind(g.exp as f64 + 60.0)
    .execute(&state.db)
    .await
    .map_err(db_unavailable)?
    .rows_affected()
        == 1;
    if !fresh {
        return Err(bad("The sign-in link was already used."));
    }
    let principal = match state.keys.validate_id(&g.key_id).await {
        Ok(Ok(p)) if p.user_id == g.user_id => p,
        Ok(_) => return Err(AppError::Unauthenticated),
        Err(e) => return Err(db_unavailable(e)),
    };
    let (route, claims) = decide(state, host, app, Some(&principal), true).await?;
    let signed = state.signer.sign(&claims);
    Ok((route, claims, signed))
}

/// Whether an app token was revoked after it was minted (its user signed
/// out or was suspended, its workspace stopped or re-shared, its key deleted).
fn token_revoked(state: &AppState, t: &AppToken) -> bool {
    state.revocations.revokes(t)
}

/// The principal behind a key; an invalid, expired or suspended key counts
/// as no credentials at all, so refusals tell nothing about keys.
async fn principal_for_key(state: &AppState, key: &str) -> Result<Option<Principal>, AppError> {
    match state.keys.validate(key).await {
        Ok(Ok(p)) => Ok(Some(p)),
        Ok(Err(_)) => Ok(None),
        Err(e) => Err(db_unavailable(e)),
    }
}

/// The decision for `principal` (or anyone) on an app host: the route,
/// and a fresh app token when access is allowed. `credentialed` callers
/// (who hold a token or a valid key for the host) learn why they are
/// refused; others only that they must sign in.
async fn decide(
    state: &AppState,
    host: &str,
    app: &AppHost,
    principal: Option<&Principal>,
    credentialed: bool,
) -> Result<(Route, AppToken), AppError> {
    // Callers without any credentials learn nothing about which users,
    // workspaces and apps exist, or whether they run: a failed lookup looks
    // like any app that needs signing in.
    let route = match resolve(state, app, false).await {
        Ok(route) => route,
        Err(AppError::NotFound(_) | AppError::Stopped | AppError::AgentNotConnected)
            if principal.is_none() && !credentialed =>
        {
            return Err(AppError::Unauthenticated);
        }
        Err(e) => return Err(e),
    };
    let user = principal.map(|p| p.user_id);
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
        key_id: principal.map(|p| p.key_id.clone()),
        port: route.port,
        https: route.https,
        base_path: route.base_path.clone(),
        issued_at_ms: now.timestamp_millis(),
        exp: now.timestamp() + APP_TOKEN_LIFETIME.num_seconds(),
    };
    Ok((route, token))
}

/// A fresh token for the holder of `old` (valid and unrevoked), as long as
/// the key it came from still works and the app is still theirs to open.
async fn renew(
    state: &AppState,
    host: &str,
    app: &AppHost,
    old: &AppToken,
) -> Result<(Route, AppToken), AppError> {
    let principal = match &old.key_id {
        Some(id) => match state.keys.validate_id(id).await {
            Ok(Ok(p)) if Some(p.user_id) == old.user_id => Some(p),
            Ok(_) => return Err(AppError::Unauthenticated),
            Err(e) => return Err(db_unavailable(e)),
        },
        None => None,
    };
    decide(state, host, app, principal.as_ref(), true).await
}

/// The app token cookie's claims, if it is valid for this host and target
/// and the request may use cookies at all.
/// The primary's decisions: against its database (routes cached for a
/// second, keys for 30 s).
impl Decider for AppState {
    fn sign_in_url(&self) -> &str {
        &self.config.access_url
    }

    fn verify_token(&self, signed: &str) -> Option<AppToken> {
        let now = Utc::now().timestamp();
        self.signer.verifier().verify::<AppToken>(signed, now).ok()
    }

    fn revoked(&self, token: &AppToken) -> bool {
        token_revoked(self, token)
    }

    async fn redeem(
        &self,
        ask: Ask<'_>,
        sealed: &str,
        state: Option<&str>,
    ) -> Result<String, AppError> {
        let (_, _, signed) = redeem_grant(self, sealed, state, ask.host, ask.app).await?;
        Ok(signed)
    }

    async fn with_token(
        &self,
        ask: Ask<'_>,
        token: &AppToken,
        _signed: &str,
    ) -> Result<Decided, AppError> {
        // The token proves who; the route (checked every second) proves
        // the workspace still runs with the same agent and sharing.
        let route = resolve(self, ask.app, false).await?;
        if route.agent_id != token.agent_id || route.level != token.sharing_level {
            return Err(AppError::Unauthenticated);
        }
        let renewed = if token.exp - Utc::now().timestamp() < APP_TOKEN_RENEW_SECS {
            renew(self, ask.host, ask.app, token)
                .await
                .ok()
                .map(|(_, t)| self.signer.sign(&t))
        } else {
            None
        };
        Ok(Decided {
            target: target(self, &route).await,
            set_token: renewed,
        })
    }

    async fn with_key(
        &self,
        ask: Ask<'_>,
        key: Option<&str>,
        credentialed: bool,
    ) -> Result<Decided, AppError> {
        let principal = match key {
            Some(k) => principal_for_key(self, k).await?,
            None => None,
        };
        let (route, token) =
            decide(self, ask.host, ask.app, principal.as_ref(), credentialed).await?;
        Ok(Decided {
            target: target(self, &route).await,
            set_token: Some(self.signer.sign(&token)),
        })
    }
}

// === For edges (`/api/v2/edges/me/app-*`) ===

/// The app host of one of `edge`'s domains, parsed.
async fn edge_app_host(
    state: &AppState,
    edge: &super::edges::EdgeAuth,
    host: &str,
) -> Result<AppHost, Response> {
    let wildcards = super::edges::edge_wildcards(state, edge.id)
        .await
        .map_err(IntoResponse::into_response)?;
    wildcards
        .iter()
        .find_map(|w| wildcard_label(host, w))
        .and_then(parse_label)
        .ok_or_else(|| {
            AppError::NotFound("The host is not an app address of this edge.".into()).respond(false)
        })
}

/// An edge's decision as JSON: the signed token and where the agent is.
async fn edge_access_response(state: &AppState, route: &Route, claims: AppToken) -> Response {
    // Events may trail the database by a moment: ask it when the agent is
    // not located yet.
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

/// `POST /api/v2/edges/me/app-access`: the edge asks whether the holder of
/// a key (or anyone) may open an app on one of its hosts, or renews an app
/// token near its expiry, and gets a signed app token to verify locally
/// from then on.
pub(super) async fn edge_app_access(
    State(state): State<AppState>,
    edge: super::edges::EdgeAuth,
    super::extract::ApiJson(req): super::extract::ApiJson<
        devmesh_shared::api::EdgeAppAccessRequest,
    >,
) -> Response {
    let host = req.host.to_ascii_lowercase();
    let app = match edge_app_host(&state, &edge, &host).await {
        Ok(app) => app,
        Err(resp) => return resp,
    };
    let decided = if let Some(old) = &req.token {
        let now = Utc::now().timestamp();
        match state.signer.verifier().verify::<AppToken>(old, now) {
            Ok(t) if t.host == host && t.target == app.target && !token_revoked(&state, &t) => {
                renew(&state, &host, &app, &t).await
            }
            _ => Err(AppError::Unauthenticated),
        }
    } else {
        let principal = match &req.key {
            Some(k) => principal_for_key(&state, k).await,
            None => Ok(None),
        };
        match principal {
            Ok(p) => decide(&state, &host, &app, p.as_ref(), false).await,
            Err(e) => Err(e),
        }
    };
    match decided {
        Ok((route, claims)) => edge_access_response(&state, &route, claims).await,
        Err(e) => e.respond(false),
    }
}

/// `POST /api/v2/edges/me/app-connect`: redeems the sealed one-time grant
/// a browser brought back to one of the edge's app hosts, for an app token
/// on that host.
pub(super) async fn edge_app_connect(
    State(state): State<AppState>,
    edge: super::edges::EdgeAuth,
    super::extract::ApiJson(req): super::extract::ApiJson<
        devmesh_shared::api::EdgeAppConnectRequest,
    >,
) -> Response {
    let host = req.host.to_ascii_lowercase();
    let app = match edge_app_host(&state, &edge, &host).await {
        Ok(app) => app,
        Err(resp) => return resp,
    };
    match redeem_grant(&state, &req.sealed, Some(&req.state), &host, &app).await {
        Ok((route, claims, _)) => edge_access_response(&state, &route, claims).await,
        Err(e) => e.respond(false),
    }
}

/// Where the route's app is, with its agent located: events may trail the
/// database by a moment, so an agent that is neither here nor known
/// elsewhere yet is looked up. The relay signs its own mesh grants.
async fn target(state: &AppState, route: &Route) -> Target {
    if !state.relay.is_attached(route.agent_id)
        && state.locations.get(route.agent_id).is_none()
        && let Ok(Some(relay)) = crate::events::agent_location(&state.db, route.agent_id).await
    {
        state.locations.set(devmesh_shared::api::AgentLocation {
            agent_id: route.agent_id,
            relay: Some(relay),
        });
    }
    Target {
        agent_id: route.agent_id,
        port: route.port,
        https: route.https,
        base_path: route.base_path.clone(),
        grant: None,
    }
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
    let target = target(&state, &route).await;
    let plumbing = Plumbing {
        relay: &state.relay,
        upstreams: &state.upstreams,
        scheme: scheme(&state),
    };
    let sent = devmesh_proxy::pipeline::forward(plumbing, &target, &host, Some(&prefix), req).await;
    sent.unwrap_or_else(|e| e.respond(html))
}

// === Auth redirect (dashboard origin) ===

/// `GET /api/v2/applications/auth-redirect?redirect_uri=...`
pub(super) async fn auth_redirect(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<devmesh_shared::api::AuthRedirectQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let bad = |m: &str| super::error::ApiError::bad_request(m.to_owned());
    let target = &q.redirect_uri;
    let flow = Some(&q.state)
        .filter(|s| (16..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| bad("state is required: open the app again"))?;
    let url = url::Url::parse(target).map_err(|_| bad("redirect_uri is not a URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("redirect_uri is not an app on this deployment"));
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let host_port = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    // Only app hosts of this deployment (the primary's apps domain or an
    // edge's): never an open redirect. Same scheme and port as the one
    // serving that domain: a grant never travels in cleartext from an
    // HTTPS deployment, nor to another service's port.
    let mut domains: Vec<(String, String)> = state
        .config
        .wildcard_access_url
        .iter()
        .map(|w| (w.clone(), state.config.access_url.clone()))
        .collect();
    let edge_domains: Vec<(Option<String>, Option<String>, String)> = sqlx::query_as(
        // What the owner set, for edges that are up.
        "SELECT wildcard_hostname, global_wildcard_hostname, access_url FROM edges
         WHERE access_url IS NOT NULL AND last_heartbeat_at > now() - interval '30 seconds'",
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
    let app = domains.iter().find_map(|(wildcard, access)| {
        let same_origin_kind = url::Url::parse(access).is_ok_and(|own| {
            url.scheme() == own.scheme()
                && url.port_or_known_default() == own.port_or_known_default()
        });
        same_origin_kind
            .then(|| wildcard_label(&host_port, wildcard).and_then(parse_label))
            .flatten()
    });
    let Some(app) = app else {
        return Err(bad("redirect_uri is not an app on this deployment"));
    };
    let session = {
        let (mut parts, _) = Request::new(Body::empty()).into_parts();
        parts.headers = headers;
        request_token(&parts, state.config.secure_cookies())
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
        back.query_pairs_mut()
            .append_pair("redirect_uri", target)
            .append_pair("state", flow);
        login.query_pairs_mut().append_pair(
            "redirect",
            &format!("{}?{}", back.path(), back.query().unwrap_or_default()),
        );
        return Ok(
            Redirect::to(&format!("/login?{}", login.query().unwrap_or_default())).into_response(),
        );
    };
    // A grant only for an app this user may open: no page can collect
    // grants for hosts its user has no business with.
    if let Err(e) = decide(&state, &host_port, &app, Some(&principal), true).await {
        return Ok(e.respond(true));
    }
    let sealed = state.sealer.seal(
        &serde_json::to_vec(&SealedGrant {
            user_id: principal.user_id,
            key_id: principal.key_id.clone(),
            host: host_port,
            state: flow.clone(),
            nonce: random_alphanumeric(24),
            exp: Utc::now().timestamp() + SEALED_LIFETIME_SECS,
        })
        .map_err(anyhow::Error::from)?,
    );
    let mut back = url;
    back.query_pairs_mut().append_pair(GRANT_PARAM, &sealed);
    Ok(Redirect::to(back.as_str()).into_response())
}

/// An empty cache of resolved routes: entries live 1 s, and a change to
/// who may open what empties it at once ([`AppState::workspace_changed`],
/// [`AppState::access_changed`]).
pub(crate) fn route_cache() -> moka::future::Cache<String, Route> {
    moka::future::Cache::builder()
        .time_to_live(Duration::from_secs(1))
        .max_capacity(100_000)
        .build()
}
