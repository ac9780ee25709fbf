//! Request extractors: JSON bodies whose rejections are API errors, the
//! authenticated caller, and the client address.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use devmesh_shared::api::KeyScope;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::auth::{KeyError, Principal};

pub use devmesh_proxy::app::{SESSION_HEADER, bearer, same_origin_request};

/// A JSON request body; malformed, oversized or mistyped bodies become
/// JSON API errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Send the body as JSON (Content-Type: application/json).",
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The request body is too large.",
                )
                .detail(r.body_text()));
            }
            Err(r) => {
                return Err(ApiError::bad_request("The request body could not be read.")
                    .detail(r.body_text()));
            }
        };
        // Every body is an object: serde would also take a struct from an
        // array of its fields in order (`[null, null]`), which no client
        // means to send.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request("The request body is not valid.")
                .detail("expected a JSON object"));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Self(v)),
            // Syntax, types, missing or unknown fields (the content type
            // and size were checked above).
            Err(rejection) => Err(ApiError::bad_request("The request body is not valid.")
                .detail(rejection.body_text())),
        }
    }
}

/// Whether the request says its body is JSON (`application/json`, or a
/// `+json` type), as axum's own `Json` requires.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}

/// Where a request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Devmesh-Session-Token` or `Authorization: Bearer`: set by a script, never ambient.
    Header,
    /// A cookie: sent by the browser on its own, so cross-site requests carry it too.
    Cookie,
}

/// The token a request carries, from the session header, a bearer
/// `Authorization`, or the session cookie (`__Host-` over HTTPS), in that
/// order.
pub fn request_token(parts: &Parts, https: bool) -> Option<String> {
    request_token_with_source(parts, https).map(|(t, _)| t)
}

/// Like [`request_token`], saying where the token came from.
pub fn request_token_with_source(parts: &Parts, https: bool) -> Option<(String, TokenSource)> {
    let cookie_name = devmesh_proxy::app::session_cookie_name(https);
    let headers = &parts.headers;
    if let Some(v) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        return Some((v.trim().to_owned(), TokenSource::Header));
    }
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
    {
        return Some((t.to_owned(), TokenSource::Header));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(cookie_name)?
                .strip_prefix('=')
                .map(str::to_owned)
        })
        .map(|t| (t, TokenSource::Cookie))
}

/// The authenticated caller, with a key of scope `all` sent the way a
/// program sends one: the session header or `Authorization: Bearer`, never
/// the session cookie. Routes that open raw streams to a workspace take it,
/// so another site cannot ride a signed-in browser into a shell or a port.
#[derive(Debug, Clone)]
pub struct KeyAuthed(pub Principal);

impl FromRequestParts<AppState> for KeyAuthed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let from_header = matches!(
            request_token_with_source(parts, state.config.secure_cookies()),
            Some((_, TokenSource::Header))
        );
        if !from_header {
            return Err(ApiError::unauthorized(
                "Send your key in the Devmesh-Session-Token header to open a shell.",
            )
            .detail("a session cookie cannot open one: other sites could use it"));
        }
        // A header key is what `Authed` reads first, so the cookie (if any
        // rides along) plays no part.
        Authed::from_request_parts(parts, state)
            .await
            .map(|Authed(p)| Self(p))
    }
}

/// Whether the request carries a key the way a program sends one: the
/// session header, or `Authorization: Bearer`. (Any other `Authorization`,
/// such as a browser's cached `Basic` credentials for a proxy in front,
/// does not count: the cookie is then what authenticates.)
///
/// It reads the headers exactly as [`Authed`] does: a session header that
/// is present but not readable text does not count, since `Authed` would
/// then fall back to the cookie.
pub fn program_key(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(SESSION_HEADER)
        .is_some_and(|v| v.to_str().is_ok())
        || headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .is_some()
}

/// The authenticated caller, with a key of scope `all`.
#[derive(Debug, Clone)]
pub struct Authed(pub Principal);

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some((token, source)) = request_token_with_source(parts, state.config.secure_cookies())
        else {
            return Err(ApiError::unauthorized("You must be signed in.").detail(
                "send a key in the Devmesh-Session-Token header, as a Bearer token, or sign in",
            ));
        };
        let principal = match state.keys.validate(&token).await? {
            Ok(p) => p,
            Err(e @ (KeyError::Invalid | KeyError::Expired | KeyError::Suspended)) => {
                return Err(ApiError::unauthorized(capitalise(&e.to_string())));
            }
        };
        if principal.scope != KeyScope::All {
            return Err(ApiError::forbidden(
                "This key may only open workspace apps.",
            ));
        }
        // Cookie-authenticated changes must come from the dashboard's own
        // pages: other sites (and workspace apps) ride along with the cookie.
        let safe = matches!(
            parts.method,
            axum::http::Method::GET | axum::http::Method::HEAD
        );
        if source == TokenSource::Cookie && !safe {
            let own_host = state
                .config
                .access_url
                .split("://")
                .nth(1)
                .unwrap_or_default();
            let own_host = own_host.split('/').next().unwrap_or_default();
            if !same_origin_request(&parts.headers, own_host) {
                return Err(ApiError::forbidden(
                    "Cross-site requests cannot use the session cookie.",
                )
                .detail("send the Devmesh-Session-Token header instead"));
            }
        }
        Ok(Self(principal))
    }
}

impl Authed {
    /// Refuses callers that are not owners.
    pub fn require_owner(&self) -> Result<(), ApiError> {
        if self.0.is_owner() {
            Ok(())
        } else {
            Err(ApiError::forbidden("Only owners may do this."))
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect::<String>() + ".")
        .unwrap_or_default()
}

/// The client's address (the TCP peer).
#[derive(Debug, Clone)]
pub struct ClientIp(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(a)| a.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        Ok(Self(ip))
    }
}

/// Path parameters; malformed ones (invalid UTF-8, say) become JSON errors.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(r) => {
                Err(ApiError::bad_request("The URL path is not valid.").detail(r.body_text()))
            }
        }
    }
}

/// Query parameters; malformed ones become JSON errors.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(r) => {
                Err(ApiError::bad_request("The query string is not valid.").detail(r.body_text()))
            }
        }
    }
}

/// A WebSocket upgrade; a request that is not one gets a JSON error, like
/// every other refusal of the API.
#[derive(Debug)]
pub struct ApiWebSocket(pub axum::extract::WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for ApiWebSocket {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::WebSocketUpgrade::from_request_parts(parts, state).await {
            Ok(ws) => Ok(Self(ws)),
            Err(r) => {
                Err(ApiError::new(r.status(), "Open this as a WebSocket.").detail(r.body_text()))
            }
        }
    }
}
