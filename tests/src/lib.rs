//! Harness for whole-system tests.
//!
//! * One PostgreSQL cluster per test run, started with the same embedded
//!   launcher `devmesh server` uses; it stops and is removed when the test
//!   process exits.
//! * A fresh database per test ([`fresh_database`]).
//! * Fixtures that start a primary in-process ([`TestPrimary::start`]) and
//!   stop it on drop, and a small JSON client ([`Api`]) that returns status
//!   and body so tests can assert on both.

#![forbid(unsafe_code)]

pub mod process;
pub mod upstream;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use devmesh_primary::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use devmesh_primary::{RunningServer, ServerConfig};
use devmesh_shared::secret::Secret;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

static CLUSTER: OnceLock<EmbeddedPostgres> = OnceLock::new();

/// Installs the process's crypto provider (idempotent).
pub fn install() {
    devmesh_net::runtime::install_crypto_provider();
}

/// A directory other users (the `postgres` user when tests run as root) may
/// enter; the caller removes it or lets the guardian do so.
pub fn shared_tempdir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir")
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}

/// The run's cluster, started on first use. Blocking: call from
/// `spawn_blocking` or through [`fresh_database`].
pub fn cluster() -> &'static EmbeddedPostgres {
    CLUSTER.get_or_init(|| {
        devmesh_net::runtime::install_crypto_provider();
        let opts = EmbeddedOptions {
            data_dir: shared_tempdir("devmesh-test-pg-"),
            ephemeral: true,
            remove_on_exit: true,
        };
        EmbeddedPostgres::start(&opts)
            .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL: {e}"))
    })
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// Its name.
    pub name: String,
}

impl TestDb {
    /// A URL another process can use.
    pub fn url(&self) -> Secret {
        cluster().url(&self.name)
    }

    /// Connection options.
    pub fn options(&self) -> PgConnectOptions {
        cluster().connect_options(&self.name)
    }

    /// A connection to the cluster's maintenance database, for operations
    /// on this database as a whole.
    pub async fn connect_admin(&self) -> PgConnection {
        PgConnection::connect_with(&cluster().connect_options("postgres"))
            .await
            .expect("connect to cluster")
    }

    /// One connection, for inspecting or tampering with state.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect_with(&self.options())
            .await
            .expect("connect to test database")
    }
}

/// Creates an empty database on the shared cluster.
pub async fn fresh_database() -> TestDb {
    let admin = tokio::task::spawn_blocking(|| cluster().connect_options("postgres"))
        .await
        .expect("cluster");
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect_with(&admin)
        .await
        .expect("connect to cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let _ = conn.close().await;
    TestDb { name }
}

/// A primary running in this process on a fresh database.
pub struct TestPrimary {
    /// The server.
    pub server: Option<RunningServer>,
    /// Its database.
    pub db: TestDb,
    /// Its base URL.
    pub url: String,
}

impl TestPrimary {
    /// Starts a primary on a fresh database.
    pub async fn start() -> Self {
        Self::start_on(fresh_database().await).await
    }

    /// Starts a primary on `db`.
    pub async fn start_on(db: TestDb) -> Self {
        devmesh_net::runtime::install_crypto_provider();
        let config = ServerConfig::for_tests(db.url(), std::env::temp_dir());
        let server = devmesh_primary::start(config).await.expect("start primary");
        let url = server.url();
        Self {
            server: Some(server),
            db,
            url,
        }
    }

    /// An anonymous client.
    pub fn anon(&self) -> Api {
        Api::new(&self.url, None)
    }

    /// Creates the first user (an owner) and returns a client signed in as them.
    pub async fn owner(&self) -> Api {
        let anon = self.anon();
        let (status, body) = anon
            .post("/users/first", json!({"email": "owner@example.com", "username": "owner", "password": "owner-password"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        anon.login("owner@example.com", "owner-password").await
    }

    /// As `owner`, creates a member and returns a client signed in as them.
    pub async fn member(&self, owner: &Api, username: &str) -> Api {
        let email = format!("{username}@example.com");
        let (status, body) = owner
            .post(
                "/users",
                json!({"email": email, "username": username, "password": "member-password"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        self.anon().login(&email, "member-password").await
    }

    /// The running server's pool.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.server.as_ref().expect("running").db
    }

    /// Stops the server gracefully.
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }
}

/// A JSON client for `/api/v2` that returns status and body.
#[derive(Debug, Clone)]
pub struct Api {
    /// Base URL.
    pub base: String,
    /// Session token, sent as `Devmesh-Session-Token`.
    pub token: Option<String>,
    /// The underlying client.
    pub http: reqwest::Client,
}

impl Api {
    /// A client for `base`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.to_owned(),
            token,
            http: reqwest::Client::new(),
        }
    }

    /// The same deployment with another token.
    pub fn with_token(&self, token: &str) -> Self {
        Self::new(&self.base, Some(token.to_owned()))
    }

    /// A request to `/api/v2{path}` carrying the token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}/api/v2{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Devmesh-Session-Token", t);
        }
        req
    }

    /// Sends and decodes; a non-JSON body becomes a JSON string.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// GET.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    /// POST JSON.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::POST, path).json(&body))
            .await
    }

    /// PATCH JSON.
    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::PATCH, path).json(&body))
            .await
    }

    /// PUT without a body.
    pub async fn put(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::PUT, path)).await
    }

    /// PUT JSON.
    pub async fn put_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::PUT, path).json(&body))
            .await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    /// Signs in and returns a client carrying the session token.
    pub async fn login(&self, email: &str, password: &str) -> Api {
        let (status, body) = self
            .post(
                "/users/login",
                json!({"email": email, "password": password}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "login failed: {body}");
        self.with_token(body["session_token"].as_str().expect("session_token"))
    }
}

/// Asserts an API error: status, JSON shape, and a message containing `needle`.
#[track_caller]
pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, needle: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an API error: {body}"));
    assert!(
        body["validations"].is_array(),
        "no validations array: {body}"
    );
    let all = format!("{message} {} {}", body["detail"], body["validations"]);
    assert!(all.contains(needle), "{needle:?} not in {body}");
}
