//! Users, sessions and API keys.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Duration, Utc};
use devmesh_shared::api::{
    ApiKey, CreateFirstUserRequest, CreateKeyRequest, CreateKeyResponse, CreateUserRequest,
    FirstUserStatus, KeyScope, KeysResponse, LoginRequest, LoginResponse, Role, User, UserStatus,
    UsersResponse,
};
use devmesh_shared::names::validate_name;
use devmesh_shared::token::new_api_key;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, Validator};
use super::extract::{ApiJson, ApiPath, Authed, ClientIp};
use super::{AppState, Audit, parse_uuid};
use crate::auth::{hash_password, parse_roles, verify_password};
use crate::metrics::Metrics;

/// How long a password login lasts.
const SESSION_LIFETIME: Duration = Duration::days(7);
/// Default lifetime of a created key.
const DEFAULT_KEY_LIFETIME: Duration = Duration::days(30);
/// Longest lifetime of a created key.
const MAX_KEY_LIFETIME: Duration = Duration::days(365);

// === Rows ===

#[derive(sqlx::FromRow)]
pub(super) struct UserRow {
    pub(super) id: Uuid,
    pub(super) email: String,
    pub(super) username: String,
    roles: Vec<String>,
    status: String,
    created_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> Self {
        User {
            id: r.id,
            username: r.username,
            email: r.email,
            roles: parse_roles(&r.roles),
            status: if r.status == "suspended" {
                UserStatus::Suspended
            } else {
                UserStatus::Active
            },
            created_at: r.created_at,
        }
    }
}

const USER_COLUMNS: &str = "id, email, username, roles, status, created_at";

/// Finds a live user by id or username.
pub(super) async fn find_user(state: &AppState, user: &str) -> ApiResult<UserRow> {
    let row: Option<UserRow> = match parse_uuid(user) {
        Some(id) => {
            sqlx::query_as(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE id = $1 AND NOT deleted"
            ))
            .bind(id)
            .fetch_optional(&state.db)
            .await?
        }
        None => {
            sqlx::query_as(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE username = $1 AND NOT deleted"
            ))
            .bind(user)
            .fetch_optional(&state.db)
            .await?
        }
    };
    row.ok_or_else(|| ApiError::not_found(format!("No user {user:?}.")))
}

// === Validation ===

fn validate_new_user(v: &mut Validator, email: &str, username: &str, password: &str) {
    v.check("username", validate_name(username));
    if email.len() > 254
        || !email.contains('@')
        || email.starts_with('@')
        || email.ends_with('@')
        || email.contains(char::is_whitespace)
    {
        v.add("email", "must be an email address");
    }
    if password.chars().count() < 8 {
        v.add("password", "must be at least 8 characters");
    } else if password.len() > 256 {
        v.add("password", "must be at most 256 bytes");
    }
}

async fn insert_user(
    tx: &mut sqlx::PgConnection,
    email: &str,
    username: &str,
    password: &str,
    roles: &[Role],
) -> ApiResult<UserRow> {
    let hash = hash_password(password.to_owned()).await?;
    let stored: Vec<&str> = roles
        .iter()
        .filter(|r| **r == Role::Owner)
        .map(|r| r.as_str())
        .collect();
    let result: Result<UserRow, sqlx::Error> = sqlx::query_as(&format!(
        "INSERT INTO users (id, email, username, hashed_password, roles) VALUES ($1, $2, $3, $4, $5)
         RETURNING {USER_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(email)
    .bind(username)
    .bind(hash)
    .bind(&stored)
    .fetch_one(&mut *tx)
    .await;
    match result {
        Ok(row) => Ok(row),
        Err(e) if crate::db::is_unique_violation(&e) => Err(ApiError::conflict(
            "A user with that username or email already exists.",
        )),
        Err(e) => Err(e.into()),
    }
}

// === First user, login, logout ===

pub(super) async fn has_first_user(
    State(state): State<AppState>,
) -> ApiResult<Json<FirstUserStatus>> {
    let has: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
        .fetch_one(&state.db)
        .await?;
    Ok(Json(FirstUserStatus {
        has_first_user: has,
    }))
}

pub(super) async fn create_first_user(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateFirstUserRequest>,
) -> ApiResult<(StatusCode, Json<User>)> {
    let mut v = Validator::default();
    validate_new_user(&mut v, &req.email, &req.username, &req.password);
    v.finish()?;
    let mut tx = state.db.begin().await?;
    // Serialise concurrent first-user requests: exactly one may win.
    sqlx::query("SELECT pg_advisory_xact_lock(7001)")
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        return Err(
            ApiError::conflict("The first user has already been created.")
                .detail("sign in with `devmesh login` instead"),
        );
    }
    let row = insert_user(
        &mut tx,
        &req.email,
        &req.username,
        &req.password,
        &[Role::Owner],
    )
    .await?;
    Audit::new("create", "user")
        .resource(row.id, &row.username)
        .by_user(row.id, &row.username)
        .ip(&ip)
        .details(serde_json::json!({"first_user": true}))
        .write_in(&mut tx)
        .await?;
    tx.commit().await?;
    tracing::info!(user = %row.username, "first user created");
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[derive(sqlx::FromRow)]
struct LoginRow {
    id: Uuid,
    username: String,
    hashed_password: String,
    status: String,
}

pub(super) async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<impl IntoResponse> {
    let (token, cookie) = password_login(&state, &ip, &req.email, req.password).await?;
    Ok((
        StatusCode::CREATED,
        [(header::SET_COOKIE, cookie)],
        Json(LoginResponse {
            session_token: token,
        }),
    ))
}

/// Longest email or username a login takes.
const MAX_LOGIN_IDENT: usize = 254;
/// Longest password a login takes (argon2 reads all of it).
const MAX_PASSWORD: usize = 1024;

/// Checks a password login (rate limits, audit, suspension) and creates a
/// session; returns the token and the `Set-Cookie` value for it.
pub(super) async fn password_login(
    state: &AppState,
    ip: &str,
    email: &str,
    password: String,
) -> ApiResult<(String, HeaderValue)> {
    // Bounded before anything is stored (the rate limiter's keys, the audit
    // log) or hashed: an email is at most 254 bytes, a username less.
    if email.len() > MAX_LOGIN_IDENT || email.chars().any(char::is_control) {
        Metrics::count(&state.metrics.logins, "malformed");
        return Err(
            ApiError::bad_request("The email or username is not valid.").detail(format!(
                "at most {MAX_LOGIN_IDENT} bytes, no control characters"
            )),
        );
    }
    if password.len() > MAX_PASSWORD || password.contains('\0') {
        Metrics::count(&state.metrics.logins, "malformed");
        return Err(ApiError::bad_request("The password is not valid.")
            .detail(format!("at most {MAX_PASSWORD} bytes, no NUL bytes")));
    }
    let ident = email.trim().to_lowercase();
    let limited = state
        .login_per_ip
        .check(ip)
        .and_then(|()| state.login_per_user.check(&ident));
    if let Err(wait) = limited {
        Metrics::count(&state.metrics.logins, "rate_limited");
        tracing::warn!(client.ip = %ip, "login rate limited");
        return Err(ApiError::too_many_requests(wait.as_secs().max(1)));
    }
    let row: Option<LoginRow> = sqlx::query_as(
        "SELECT id, username, hashed_password, status FROM users
         WHERE NOT deleted AND (lower(email) = $1 OR username = $1)",
    )
    .bind(&ident)
    .fetch_optional(&state.db)
    .await?;
    let ok = verify_password(password, row.as_ref().map(|r| r.hashed_password.clone())).await;
    let Some(user) = row.filter(|_| ok) else {
        Metrics::count(&state.metrics.logins, "failure");
        Audit::new("login_failed", "user")
            .resource("", &ident)
            .ip(ip)
            .write(&state.db)
            .await;
        return Err(ApiError::unauthorized("Incorrect email or password."));
    };
    if user.status == "suspended" {
        Metrics::count(&state.metrics.logins, "failure");
        return Err(ApiError::unauthorized("The account is suspended."));
    }
    let key = crate::auth::issue_key(
        &state.db,
        user.id,
        "session",
        "password",
        KeyScope::All,
        Utc::now() + SESSION_LIFETIME,
    )
    .await?;
    Metrics::count(&state.metrics.logins, "success");
    Audit::new("login", "user")
        .resource(user.id, &user.username)
        .by_user(user.id, &user.username)
        .ip(ip)
        .write(&state.db)
        .await;
    let token = key.token.expose().to_owned();
    let cookie = session_cookie(
        &token,
        SESSION_LIFETIME.num_seconds(),
        state.config.secure_cookies(),
    );
    Ok((token, cookie))
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    super::SetCookie {
        name: devmesh_proxy::app::session_cookie_name(secure),
        value,
        path: "/",
        domain: None,
        max_age,
        same_site: "Lax",
        secure,
    }
    .header()
}

pub(super) async fn logout(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
) -> ApiResult<impl IntoResponse> {
    sqlx::query("DELETE FROM api_keys WHERE id = $1")
        .bind(&auth.0.key_id)
        .execute(&state.db)
        .await?;
    state.keys.forget_key(&auth.0.key_id).await;
    // Signing out also signs the user out of apps, in every browser: their
    // application_connect keys go, and app tokens minted so far stop working.
    let app_keys: Vec<String> = sqlx::query_scalar(
        "DELETE FROM api_keys WHERE user_id = $1 AND scope = 'application_connect' RETURNING id",
    )
    .bind(auth.0.user_id)
    .fetch_all(&state.db)
    .await?;
    for id in app_keys {
        state.keys.forget_key(&id).await;
    }
    state.revoke_app_tokens(auth.0.user_id).await;
    Audit::new("logout", "user")
        .resource(auth.0.user_id, &auth.0.username)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::SET_COOKIE,
        session_cookie("", 0, state.config.secure_cookies()),
    );
    Ok((
        headers,
        Json(devmesh_shared::api::Message {
            message: "Signed out.".into(),
        }),
    ))
}

// === Users ===

pub(super) async fn me(State(state): State<AppState>, auth: Authed) -> ApiResult<Json<User>> {
    Ok(Json(
        find_user(&state, &auth.0.user_id.to_string()).await?.into(),
    ))
}

pub(super) async fn list_users(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<UsersResponse>> {
    auth.require_owner()?;
    let rows: Vec<UserRow> = sqlx::query_as(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE NOT deleted ORDER BY username"
    ))
    .fetch_all(&state.db)
    .await?;
    Ok(Json(UsersResponse {
        users: rows.into_iter().map(User::from).collect(),
    }))
}

pub(super) async fn create_user(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateUserRequest>,
) -> ApiResult<(StatusCode, Json<User>)> {
    auth.require_owner()?;
    let mut v = Validator::default();
    validate_new_user(&mut v, &req.email, &req.username, &req.password);
    v.finish()?;
    let mut conn = state.db.acquire().await?;
    let row = insert_user(
        &mut conn,
        &req.email,
        &req.username,
        &req.password,
        &req.roles,
    )
    .await?;
    Audit::new("create", "user")
        .resource(row.id, &row.username)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"roles": req.roles}))
        .write(&mut *conn)
        .await;
    Ok((StatusCode::CREATED, Json(row.into())))
}

pub(super) async fn get_user(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<Json<User>> {
    let row = find_user(&state, &user).await?;
    if row.id != auth.0.user_id {
        auth.require_owner()?;
    }
    Ok(Json(row.into()))
}

pub(super) async fn set_status(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath((user, status)): ApiPath<(String, String)>,
) -> ApiResult<Json<User>> {
    auth.require_owner()?;
    let (new_status, action) = match status.as_str() {
        "suspend" => ("suspended", "suspend"),
        "activate" => ("active", "activate"),
        _ => {
            return Err(ApiError::not_found(
                "Use /status/suspend or /status/activate.",
            ));
        }
    };
    let row = find_user(&state, &user).await?;
    if row.id == auth.0.user_id {
        return Err(ApiError::bad_request("You cannot change your own status."));
    }
    let row: UserRow = sqlx::query_as(&format!(
        "UPDATE users SET status = $2, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(row.id)
    .bind(new_status)
    .fetch_one(&state.db)
    .await?;
    state.keys.forget_all();
    state.access_changed();
    state.revoke_app_tokens(row.id).await;
    Audit::new(action, "user")
        .resource(row.id, &row.username)
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok(Json(row.into()))
}

/// `PUT /api/v2/users/{user}/roles`: owners set another user's roles
/// (`member` is implied). Nobody changes their own, so a deployment always
/// keeps the owner who is doing it.
pub(super) async fn set_roles(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(user): ApiPath<String>,
    ApiJson(req): ApiJson<devmesh_shared::api::SetRolesRequest>,
) -> ApiResult<Json<User>> {
    auth.require_owner()?;
    let before = find_user(&state, &user).await?;
    if before.id == auth.0.user_id {
        return Err(ApiError::bad_request("You cannot change your own roles."));
    }
    let mut stored: Vec<&str> = req
        .roles
        .iter()
        .filter(|r| **r != Role::Member)
        .map(|r| r.as_str())
        .collect();
    stored.sort_unstable();
    stored.dedup();
    let row: UserRow = sqlx::query_as(&format!(
        "UPDATE users SET roles = $2, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(before.id)
    .bind(&stored)
    .fetch_one(&state.db)
    .await?;
    // Cached keys carry roles: forget them so the change applies at once.
    state.keys.forget_all();
    state.access_changed();
    // A demoted owner keeps nothing of it: their sessions, shells and
    // streams (begun with the owner's reach) end, as on suspension.
    if parse_roles(&before.roles).contains(&Role::Owner) && !stored.contains(&"owner") {
        state.revoke_app_tokens(row.id).await;
    }
    Audit::new("set_roles", "user")
        .resource(row.id, &row.username)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"roles": stored}))
        .write(&state.db)
        .await;
    Ok(Json(row.into()))
}

pub(super) async fn delete_user(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require_owner()?;
    let row = find_user(&state, &user).await?;
    if row.id == auth.0.user_id {
        return Err(ApiError::bad_request("You cannot delete yourself."));
    }
    let mut tx = state.db.begin().await?;
    let workspaces: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workspaces WHERE owner_id = $1 AND NOT deleted")
            .bind(row.id)
            .fetch_one(&mut *tx)
            .await?;
    if workspaces > 0 {
        return Err(ApiError::conflict(format!(
            "{} still owns {workspaces} workspace(s); delete them first.",
            row.username
        )));
    }
    sqlx::query("UPDATE users SET deleted = true, updated_at = now() WHERE id = $1")
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM api_keys WHERE user_id = $1")
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    Audit::new("delete", "user")
        .resource(row.id, &row.username)
        .by(&auth.0)
        .ip(&ip)
        .write_in(&mut tx)
        .await?;
    tx.commit().await?;
    state.keys.forget_all();
    state.access_changed();
    state.revoke_app_tokens(row.id).await;
    Ok(StatusCode::NO_CONTENT)
}

// === API keys ===

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    name: String,
    login_type: String,
    scope: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    last_used_at: DateTime<Utc>,
}

impl From<KeyRow> for ApiKey {
    fn from(r: KeyRow) -> Self {
        ApiKey {
            id: r.id,
            name: r.name,
            login_type: r.login_type,
            scope: if r.scope == "application_connect" {
                KeyScope::ApplicationConnect
            } else {
                KeyScope::All
            },
            created_at: r.created_at,
            expires_at: r.expires_at,
            last_used_at: r.last_used_at,
        }
    }
}

const KEY_COLUMNS: &str = "id, name, login_type, scope, created_at, expires_at, last_used_at";

pub(super) async fn create_key(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreateKeyResponse>)> {
    let mut v = Validator::default();
    let name = req.name.unwrap_or_default();
    if name.chars().count() > 64 {
        v.add("name", "must be at most 64 characters");
    }
    let lifetime = match req.lifetime_seconds {
        None => DEFAULT_KEY_LIFETIME,
        Some(s) if s <= 0 => {
            v.add("lifetime_seconds", "must be positive");
            DEFAULT_KEY_LIFETIME
        }
        Some(s) if s > MAX_KEY_LIFETIME.num_seconds() => {
            v.add(
                "lifetime_seconds",
                format!(
                    "must be at most {} (365 days)",
                    MAX_KEY_LIFETIME.num_seconds()
                ),
            );
            DEFAULT_KEY_LIFETIME
        }
        Some(s) => Duration::seconds(s),
    };
    v.finish()?;
    let scope = req.scope.unwrap_or_default();
    let key = new_api_key();
    let row: KeyRow = sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, hashed_secret, user_id, name, login_type, scope, expires_at)
         VALUES ($1, $2, $3, $4, 'token', $5, $6) RETURNING {KEY_COLUMNS}"
    ))
    .bind(&key.id)
    .bind(key.hashed_secret.as_slice())
    .bind(auth.0.user_id)
    .bind(&name)
    .bind(scope.as_str())
    .bind(Utc::now() + lifetime)
    .fetch_one(&state.db)
    .await?;
    Audit::new("create", "api_key")
        .resource(&key.id, &name)
        .by(&auth.0)
        .ip(&ip)
        .details(serde_json::json!({"scope": scope}))
        .write(&state.db)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreateKeyResponse {
            key: key.token.expose().to_owned(),
            info: row.into(),
        }),
    ))
}

pub(super) async fn list_keys(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<KeysResponse>> {
    let rows: Vec<KeyRow> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY created_at"
    ))
    .bind(auth.0.user_id)
    .fetch_all(&state.db)
    .await?;
    Ok(Json(KeysResponse {
        keys: rows.into_iter().map(ApiKey::from).collect(),
    }))
}

pub(super) async fn get_key(
    State(state): State<AppState>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ApiKey>> {
    let row: Option<KeyRow> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND user_id = $2"
    ))
    .bind(&id)
    .bind(auth.0.user_id)
    .fetch_optional(&state.db)
    .await?;
    row.map(|r| Json(r.into()))
        .ok_or_else(|| ApiError::not_found(format!("No key {id:?}.")))
}

pub(super) async fn delete_key(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let deleted = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND user_id = $2")
        .bind(&id)
        .bind(auth.0.user_id)
        .execute(&state.db)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(ApiError::not_found(format!("No key {id:?}.")));
    }
    state.revoke_key(&id).await;
    Audit::new("delete", "api_key")
        .resource(&id, "")
        .by(&auth.0)
        .ip(&ip)
        .write(&state.db)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v2/users/me/preferences`.
pub(super) async fn preferences(
    State(state): State<AppState>,
    auth: Authed,
) -> ApiResult<Json<devmesh_shared::api::Preferences>> {
    let region: Option<String> =
        sqlx::query_scalar("SELECT preferred_region FROM users WHERE id = $1")
            .bind(auth.0.user_id)
            .fetch_one(&state.db)
            .await?;
    Ok(Json(devmesh_shared::api::Preferences { region }))
}

/// `PUT /api/v2/users/me/preferences`: a region must be one there is.
pub(super) async fn set_preferences(
    State(state): State<AppState>,
    auth: Authed,
    ApiJson(prefs): ApiJson<devmesh_shared::api::Preferences>,
) -> ApiResult<Json<devmesh_shared::api::Preferences>> {
    if let Some(region) = &prefs.region {
        let known = region == "primary"
            || sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM edges WHERE name = $1)")
                .bind(region)
                .fetch_one(&state.db)
                .await?;
        if !known {
            return Err(ApiError::bad_request(format!(
                "There is no region {region:?}."
            )));
        }
    }
    sqlx::query("UPDATE users SET preferred_region = $2 WHERE id = $1")
        .bind(auth.0.user_id)
        .bind(&prefs.region)
        .execute(&state.db)
        .await?;
    Ok(Json(prefs))
}
