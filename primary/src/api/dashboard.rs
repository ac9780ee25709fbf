//! The dashboard: a small single-page app (`primary/dashboard/`), compiled
//! into the binary, served on the access URL's own origin (apps live on
//! other hosts), over the same `/api/v2` as the CLI.
//!
//! Every page is the same shell; the script picks the page from the path.
//! Responses carry a content security policy (scripts from this origin
//! only; connections to this origin and the regions' access URLs, for
//! latency checks), refuse framing, and never sniff types. Changes go
//! through `/api/v2`, where a cookie-authenticated request must come from
//! this origin.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::AppState;

const INDEX: &str = include_str!("../../dashboard/index.html");
const APP_JS: &str = include_str!("../../dashboard/app.js");
const APP_CSS: &str = include_str!("../../dashboard/app.css");
const XTERM_JS: &str = include_str!("../../dashboard/vendor/xterm.mjs");
const XTERM_CSS: &str = include_str!("../../dashboard/vendor/xterm.css");

/// The policy for the dashboard's responses, allowing connections to
/// `regions` (origins) as well as this one.
fn csp(regions: &[String]) -> String {
    let mut connect = String::from("'self'");
    for r in regions {
        connect.push(' ');
        connect.push_str(r);
    }
    // xterm.js sets styles from script; no inline scripts anywhere.
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; connect-src {connect}; frame-ancestors 'none'; \
         base-uri 'none'; form-action 'self'; object-src 'none'"
    )
}

/// The origin (`scheme://host[:port]`) of a URL, if it has one that is safe
/// to put in a policy.
fn origin(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let origin = parsed.origin().ascii_serialization();
    (origin != "null" && !origin.contains([' ', ';', ','])).then_some(origin)
}

fn protect(resp: &mut Response, policy: &str) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(policy) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

/// Every page: the shell, under a policy that names the regions.
pub(super) async fn shell(State(state): State<AppState>) -> Response {
    let regions: Vec<String> =
        sqlx::query_scalar("SELECT access_url FROM edges WHERE access_url IS NOT NULL")
            .fetch_all(&state.db)
            .await
            .unwrap_or_default();
    let origins: Vec<String> = regions.iter().filter_map(|u| origin(u)).collect();
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response();
    protect(&mut resp, &csp(&origins));
    resp
}

/// `/setup`: the first user's page, while there is none.
pub(super) async fn setup(state: State<AppState>) -> Response {
    let has: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
        .fetch_one(&state.db)
        .await
        .unwrap_or(true);
    if has {
        return Redirect::to("/login").into_response();
    }
    shell(state).await
}

/// `/assets/*`: the script, styles and the terminal emulator.
pub(super) async fn asset(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    let (body, kind) = match path.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "vendor/xterm.mjs" => (XTERM_JS, "text/javascript; charset=utf-8"),
        "vendor/xterm.css" => (XTERM_CSS, "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut resp = (
        [
            (header::CONTENT_TYPE, kind),
            // Small, and changes with each release: always revalidated.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    protect(&mut resp, &csp(&[]));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_only_clean_origins() {
        assert_eq!(
            origin("https://sydney.example.com:8443/some/path").as_deref(),
            Some("https://sydney.example.com:8443")
        );
        assert_eq!(origin("not a url"), None);
        let p = csp(&["https://eu.example.com".into()]);
        assert!(
            p.contains("connect-src 'self' https://eu.example.com;"),
            "{p}"
        );
        assert!(p.contains("script-src 'self';"), "{p}");
        assert!(p.contains("frame-ancestors 'none'"), "{p}");
    }
}
