//! The minimal sign-in page on the dashboard origin (`/login`), which the
//! auth redirect sends browsers to when they have no session: a
//! CSRF-protected (double-submit cookie) password form that sets the
//! session cookie and returns to a same-origin path.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use devmesh_proxy::app::{cookie, html_escape};
use devmesh_shared::secret::{constant_time_eq, random_alphanumeric};
use serde::Deserialize;

use super::extract::ApiQuery;
use super::{AppState, SetCookie};

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
    // A new deployment has nobody to sign in yet: set up its owner first.
    let has_users: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
        .fetch_one(&state.db)
        .await
        .unwrap_or(true);
    if !has_users {
        return Redirect::to("/setup").into_response();
    }
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
