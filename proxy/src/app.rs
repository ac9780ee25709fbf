//! The app-request plumbing the primary and the edges share: error pages,
//! cookie names and rules, credentials in headers, the sign-in redirect.
//! Forwarding is the pipeline's last phase ([`crate::pipeline::forward`]).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use uuid::Uuid;

/// The header clients send their session token in.
pub const SESSION_HEADER: &str = "devmesh-session-token";
/// The cookie the dashboard keeps its session in, over plain HTTP.
pub const SESSION_COOKIE: &str = "devmesh_session_token";
/// The same over HTTPS: a `__Host-` cookie cannot be set by, or shared
/// with, any other host (a sibling subdomain cannot plant one).
pub const SECURE_SESSION_COOKIE: &str = "__Host-devmesh_session_token";

/// The session cookie's name on a deployment served over HTTPS or not.
pub fn session_cookie_name(https: bool) -> &'static str {
    if https {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    }
}
/// Query parameter carrying the sealed one-time grant back to the app host.
pub const GRANT_PARAM: &str = "devmesh_app_grant";
/// Name of the host-only cookie that binds a sign-in to the browser that
/// started it.
pub const STATE_COOKIE: &str = "devmesh_app_state";

/// How long an app token (and the cookie carrying it) is valid, in
/// seconds; also how long edges cache a decision and keep revocations.
pub const APP_TOKEN_LIFETIME_SECS: i64 = 30 * 60;
/// A token cookie with less than this left is renewed on its next request,
/// so a page open for hours keeps working without a sign-in bounce.
pub const APP_TOKEN_RENEW_SECS: i64 = 10 * 60;

/// Where a request goes inside the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The agent serving the app.
    pub agent_id: Uuid,
    /// The app's port on the agent's loopback interface.
    pub port: u16,
    /// Whether to speak TLS to the app (an `https://` app URL or a
    /// `<port>s--` dev URL).
    pub https: bool,
    /// The path prefix of the app's URL in its declaration, put in front
    /// of the request's path (`/` for most apps).
    pub base_path: String,
    /// What authorises the stream if it crosses the mesh: the app token
    /// the decision was signed as (an edge's); `None` where the relay signs
    /// its own grants (the primary's).
    pub grant: Option<String>,
}

/// The host a request is for, lower-cased: the `Host` header, or the URI's
/// authority (HTTP/2 clients send `:authority`). When a request carries
/// both and they differ (an absolute-form request line naming another
/// host, say), or carries several `Host` headers, it is refused: a proxy
/// and an app must never disagree on which host a request is for.
pub fn request_host(req: &Request) -> Result<String, AppError> {
    let bad = |why: &str| AppError::BadRequest(why.to_owned());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("The request has more than one Host header."));
    }
    let header = header
        .map(|h| h.to_str().map_err(|_| bad("The Host header is not valid.")))
        .transpose()?;
    let authority = req.uri().authority().map(|a| a.as_str());
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(bad("The request's authority carries credentials."));
    }
    let host = match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => {
            return Err(bad(
                "The Host header does not match the request's authority.",
            ));
        }
        (Some(h), _) => h,
        (None, Some(a)) => a,
        (None, None) => "",
    };
    Ok(host.to_ascii_lowercase())
}

/// The bearer token of an `Authorization` header (scheme matched case-insensitively).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A devmesh key sent in `Devmesh-Session-Token` or `Authorization: Bearer`.
/// A bearer token that is not a devmesh key belongs to the app.
pub fn header_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .filter(|t| devmesh_shared::token::parse_api_key(t).is_some())
        .map(str::to_owned)
}

/// Whether a request that authenticates with a cookie was made by a page of
/// the same origin (or typed by the user), not by another site's page: the
/// browser says so in `Sec-Fetch-Site`, or in `Origin`. Requests with
/// neither header are not from a modern browser page and carry no ambient
/// authority worth protecting.
pub fn same_origin_request(headers: &HeaderMap, origin_host: &str) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "same-origin" | "none");
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) => origin
            .split_once("://")
            .is_some_and(|(_, h)| h.eq_ignore_ascii_case(origin_host)),
        None => true,
    }
}

/// A `Set-Cookie` value. Every devmesh cookie is HttpOnly; `Secure` when
/// served over HTTPS; `max_age` 0 deletes it.
#[derive(Debug, Clone, Copy)]
pub struct SetCookie<'a> {
    /// Cookie name; devmesh's all start with `devmesh` (see
    /// [`is_devmesh_cookie`]), which is what keeps them from apps.
    pub name: &'a str,
    /// Cookie value, written as is: it must already be cookie-safe.
    pub value: &'a str,
    /// `Path` attribute, usually `/`.
    pub path: &'a str,
    /// Domain, for cookies shared by every app host.
    pub domain: Option<&'a str>,
    /// Seconds to live.
    pub max_age: i64,
    /// `Lax` or `Strict`.
    pub same_site: &'static str,
    /// HTTPS only.
    pub secure: bool,
}

impl SetCookie<'_> {
    /// The header value; an unrepresentable cookie becomes an empty header.
    pub fn header(&self) -> HeaderValue {
        let domain = self
            .domain
            .map(|d| format!("; Domain={d}"))
            .unwrap_or_default();
        let secure = if self.secure { "; Secure" } else { "" };
        let text = format!(
            "{}={}{domain}; Path={}; Max-Age={}; HttpOnly; SameSite={}{secure}",
            self.name, self.value, self.path, self.max_age, self.same_site
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

// === Errors ===

/// Why an app request failed; each maps to a status, a page and a metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppError {
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
    /// The primary, needed to decide, cannot be reached.
    PrimaryUnavailable,
    /// The side that decides cannot do so right now (its database is
    /// down); the cause is logged there, never shown.
    Unavailable,
    /// This client asked for more decisions than it may in a while.
    TooManyRequests,
}

impl AppError {
    /// Status, page title and detail.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
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
            Self::PrimaryUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in unavailable",
                "The deployment's primary cannot be reached to check your access. Open sessions keep working; try again shortly.".into(),
            ),
            Self::TooManyRequests => (
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests",
                "Too many sign-in checks from your address; wait a minute and try again.".into(),
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Temporarily unavailable",
                "devmesh cannot check your access right now. Open sessions keep working; try again shortly.".into(),
            ),
        }
    }

    /// The refusal's name on the wire between a primary and its edges.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::Stopped => "stopped",
            Self::AgentNotConnected => "agent_not_connected",
            Self::Refused => "refused",
            Self::BadGateway(_) => "bad_gateway",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::BadRequest(_) => "bad_request",
            Self::PrimaryUnavailable => "primary_unavailable",
            Self::Unavailable => "unavailable",
            Self::TooManyRequests => "too_many_requests",
        }
    }

    /// The refusal a primary named with [`AppError::code`]; an unknown name
    /// (a newer primary) is a failed call, not a guess.
    pub fn from_code(code: &str, detail: String) -> Self {
        match code {
            "not_found" => Self::NotFound(detail),
            "stopped" => Self::Stopped,
            "agent_not_connected" => Self::AgentNotConnected,
            "refused" => Self::Refused,
            "unauthenticated" => Self::Unauthenticated,
            "forbidden" => Self::Forbidden,
            "bad_request" => Self::BadRequest(detail),
            "unavailable" | "primary_unavailable" => Self::Unavailable,
            "too_many_requests" => Self::TooManyRequests,
            _ => Self::BadGateway(format!("the primary refused: {code}")),
        }
    }

    /// The error as an HTML page (browsers) or JSON.
    pub fn respond(&self, wants_html: bool) -> Response {
        let (status, title, detail) = self.parts();
        if wants_html {
            let page = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · devmesh</title>\
                 <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;color:#222}}\
                 h1{{font-size:1.4rem}}</style></head><body><h1>{title}</h1><p>{}</p><p><small>devmesh · {}</small></p></body></html>",
                html_escape(&detail),
                status.as_u16()
            );
            let mut resp = (status, Html(page)).into_response();
            protect_page(&mut resp, false);
            resp
        } else {
            let body = devmesh_shared::api::Error {
                message: format!("{title}."),
                detail,
                validations: vec![],
                denial: Some(self.code().to_owned()),
            };
            (status, axum::Json(body)).into_response()
        }
    }
}

/// Escapes text for HTML.
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Whether the client prefers an HTML page.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

// === Cookies ===

pub use devmesh_shared::cookies::{app_may_set_cookie, is_devmesh_cookie, strip_devmesh_cookies};

/// The name of the app-token cookie on hosts of `wildcard`; unique per
/// domain so nested wildcards (`*.apps.example.com` and
/// `*.eu.apps.example.com`) never read each other's.
pub fn token_cookie_name(wildcard: &str) -> String {
    let h = &hex::encode(devmesh_shared::secret::sha256(wildcard.as_bytes()))[..8];
    format!("devmesh_app_token_{h}")
}

/// Cookies authenticate an app request only when the browser sent it for
/// this app itself, or for a top-level navigation to it: every app host
/// shares one site, so another app's page (a script, a form, a WebSocket,
/// an iframe) must not ride on the user's cookies. A navigation counts only
/// when its destination is a document: a frame is not one.
pub fn cookie_allowed(parts: &axum::http::request::Parts, host: &str) -> bool {
    let fetch = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let navigation = parts.method == Method::GET
        && fetch("sec-fetch-mode") == Some("navigate")
        && fetch("sec-fetch-dest").is_none_or(|d| d == "document")
        && parts.headers.get(header::UPGRADE).is_none();
    navigation || same_origin_request(&parts.headers, host)
}

/// Removes the request headers that carry devmesh credentials or identity
/// (`Devmesh-*`) and a bearer `Authorization` holding a devmesh key.
pub fn strip_devmesh_headers(headers: &mut HeaderMap) {
    let names: Vec<header::HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("devmesh-"))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .is_some_and(|t| devmesh_shared::token::parse_api_key(t).is_some())
    {
        headers.remove(header::AUTHORIZATION);
    }
}

/// A cookie's value.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

// === URLs ===

/// A query parameter's value.
pub fn query_param(uri: &Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The path and query without `name`.
pub fn strip_query_param(uri: &Uri, name: &str) -> String {
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

// === Signing in ===

/// Sends a browser to sign in at the primary's auth redirect, binding the
/// flow to it with a state cookie; other clients get a 401.
pub fn sign_in(
    primary_url: &str,
    scheme: &str,
    host: &str,
    head: &axum::http::request::Parts,
) -> Result<Response, AppError> {
    if !(wants_html(&head.headers) && head.method == Method::GET) {
        return Err(AppError::Unauthenticated);
    }
    let back = format!(
        "{scheme}://{host}{}",
        head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let mut target = url::Url::parse(&format!(
        "{}/api/v2/applications/auth-redirect",
        primary_url.trim_end_matches('/')
    ))
    .map_err(|e| AppError::BadGateway(e.to_string()))?;
    let flow = devmesh_shared::secret::random_alphanumeric(24);
    target
        .query_pairs_mut()
        .append_pair("redirect_uri", &back)
        .append_pair("state", &flow);
    let mut resp = axum::response::Redirect::to(target.as_str()).into_response();
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
    protect_page(&mut resp, scheme == "https");
    Ok(resp)
}

/// The path and query of `uri` without the grant, made safe to send a
/// browser to on `host`: one leading slash (`//evil.example/` would be
/// another site), no backslashes before the path proper.
pub fn clean_return_path(uri: &Uri) -> String {
    let pq = strip_query_param(uri, GRANT_PARAM);
    format!("/{}", pq.trim_start_matches(['/', '\\']))
}

/// The answer to a browser back from signing in with its one-time grant:
/// the app token becomes a cookie for this one app host, the sign-in state
/// cookie is spent, and the browser goes on to the same host without the
/// grant in the URL.
pub fn signed_in_redirect(
    uri: &Uri,
    scheme: &str,
    host: &str,
    token_cookie: &str,
    token: &str,
) -> Response {
    let secure = scheme == "https";
    let back = format!("{scheme}://{host}{}", clean_return_path(uri));
    let mut resp = axum::response::Redirect::to(&back).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        token_cookie_header(token_cookie, token, secure),
    );
    let spent = SetCookie {
        name: STATE_COOKIE,
        value: "",
        path: "/",
        domain: None,
        max_age: 0,
        same_site: "Lax",
        secure,
    };
    resp.headers_mut()
        .append(header::SET_COOKIE, spent.header());
    protect_page(&mut resp, secure);
    resp
}

/// The `Set-Cookie` of an app token for one app host.
pub fn token_cookie_header(name: &str, signed: &str, secure: bool) -> HeaderValue {
    SetCookie {
        name,
        value: signed,
        path: "/",
        domain: None,
        max_age: APP_TOKEN_LIFETIME_SECS,
        same_site: "Lax",
        secure,
    }
    .header()
}

/// Headers every page devmesh itself serves carries: never framed (so no
/// app can overlay a devmesh page, or a terminal, with the user's cookies),
/// never sniffed, and HSTS when served over HTTPS.
pub fn protect_page(resp: &mut Response, https: bool) {
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if https {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
}

/// `GET /latency-check` on every region: browsers and the CLI time it to
/// pick the nearest region, from any origin.
pub async fn latency_check() -> Response {
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

#[cfg(test)]
mod tests;
