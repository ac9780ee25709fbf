//! Starting and stopping a primary: database (embedded or external),
//! migrations, the HTTP listener, and graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::config::ServerConfig;
use crate::db::{self, embedded::EmbeddedOptions, embedded::EmbeddedPostgres};

/// How long in-flight requests get to finish on shutdown.
const GRACE_PERIOD: Duration = Duration::from_secs(10);

/// A running primary. `stop()` shuts it down gracefully; dropping it
/// without stopping aborts the server and stops the embedded database.
#[derive(Debug)]
pub struct RunningServer {
    /// Where the HTTP API listens.
    pub local_addr: SocketAddr,
    /// The database pool (tests inspect state through it).
    pub db: PgPool,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    embedded: Option<EmbeddedPostgres>,
}

impl RunningServer {
    /// The base URL of the HTTP API on loopback.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Resolves when the server has been asked to stop.
    pub async fn cancelled(&self) {
        self.shutdown.cancelled().await;
    }

    /// Asks the server to stop (a signal handler calls this).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets requests finish for a grace period, closes the
    /// pool and stops the embedded database.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(GRACE_PERIOD, task).await.is_err() {
                tracing::warn!("requests still running after {GRACE_PERIOD:?}; closing them");
                abort.abort();
            }
        }
        self.db.close().await;
        if let Some(mut pg) = self.embedded.take() {
            let _ = tokio::task::spawn_blocking(move || pg.stop()).await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts a primary: database, migrations, listener.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    // Bind first: a busy port fails fast, before the database starts.
    let listener = TcpListener::bind(config.http_address)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_address))?;
    let local_addr = listener.local_addr()?;

    let (options, embedded) = match &config.postgres_url {
        Some(url) => {
            let opts: PgConnectOptions = url
                .expose()
                .parse()
                .context("--postgres-url is not a valid PostgreSQL URL")?;
            (opts, None)
        }
        None => {
            let opts = EmbeddedOptions {
                data_dir: config.data_dir.clone(),
                ephemeral: false,
                remove_on_exit: false,
            };
            let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&opts)).await??;
            tracing::info!(version = %pg.version, data_dir = %config.data_dir.display(), "embedded PostgreSQL is up");
            (pg.connect_options("postgres"), Some(pg))
        }
    };
    let pool = db::connect(options)
        .await
        .context("cannot connect to PostgreSQL")?;
    db::migrate(&pool)
        .await
        .context("cannot apply database migrations")?;

    let has_users: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
        .fetch_one(&pool)
        .await?;
    let access_url = config.access_url.clone();
    let state = AppState::new(pool.clone(), config);
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(signal.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(version = devmesh_shared::VERSION, http.address = %local_addr, access_url = %access_url, "devmesh primary started");
    if !has_users {
        tracing::info!("no users yet: create the first one with `devmesh login {access_url}`");
    }
    Ok(RunningServer {
        local_addr,
        db: pool,
        shutdown,
        task: Some(task),
        embedded,
    })
}
