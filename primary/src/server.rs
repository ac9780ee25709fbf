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

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use tokio_util::task::TaskTracker;

use crate::api::{AppState, Parts, router};
use crate::config::ServerConfig;
use crate::db::{self, embedded::EmbeddedOptions, embedded::EmbeddedPostgres};
use crate::keys::{Sealer, Signer};
use crate::mesh::MeshCa;
use devmesh_net::tls;

/// How long in-flight requests get to finish on shutdown.
const GRACE_PERIOD: Duration = Duration::from_secs(10);

/// A running primary. `stop()` shuts it down gracefully; dropping it
/// without stopping aborts the server and stops the embedded database.
#[derive(Debug)]
pub struct RunningServer {
    /// Where the HTTP API listens.
    pub local_addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The database pool (tests inspect state through it).
    pub db: PgPool,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    embedded: Option<Arc<Mutex<EmbeddedPostgres>>>,
    /// Why the server stopped on its own, if it did (the embedded
    /// PostgreSQL could not be brought back).
    failure: Arc<OnceLock<String>>,
}

impl RunningServer {
    /// The base URL of the HTTP API on loopback.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }

    /// Resolves when the server has been asked to stop.
    pub async fn cancelled(&self) {
        self.shutdown.cancelled().await;
    }

    /// Asks the server to stop (a signal handler calls this).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Why the server stopped by itself, when it did: it cannot serve
    /// (the embedded PostgreSQL died and would not start again), and the
    /// process should exit non-zero so its supervisor notices.
    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
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
        if let Some(pg) = self.embedded.take() {
            let _ = tokio::task::spawn_blocking(move || pg.lock().stop()).await;
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
pub async fn start(mut config: ServerConfig) -> anyhow::Result<RunningServer> {
    // Bind first: a busy port fails fast, before the database starts.
    let listener = TcpListener::bind(config.http_address)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_address))?;
    let local_addr = listener.local_addr()?;
    // A defaulted access URL on port 0 names the port actually bound.
    if config.http_address.port() == 0 && config.access_url.ends_with(":0") {
        config.access_url = format!(
            "{}{}",
            config.access_url.trim_end_matches('0'),
            local_addr.port()
        );
    }

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
            let opts = pg
                .app_options("postgres")
                .await
                .context("cannot set up devmesh's database role")?;
            (opts, Some(pg))
        }
    };
    let stale_transactions = prometheus_client::metrics::counter::Counter::default();
    let pool = db::connect(options, stale_transactions.clone())
        .await
        .context("cannot connect to PostgreSQL")?;
    db::migrate(&pool)
        .await
        .context("cannot apply database migrations")?;
    if sqlx::query_scalar::<_, bool>("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&pool)
        .await
        .unwrap_or(false)
    {
        tracing::warn!(
            "connected to PostgreSQL as a superuser: give devmesh a role that only owns its database (see docs/deployment.md)"
        );
    }

    let has_users: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users)")
        .fetch_one(&pool)
        .await?;
    let access_url = config.access_url.clone();
    let tls_mode = config.tls.clone();
    let wildcard = config.wildcard_access_url.clone();
    let terraform_path = config.terraform_path.clone();
    let provisioner_daemons = config.provisioner_daemons;
    let provisioner_timeout = config.provisioner_timeout;
    let provisioner_work = config.data_dir.join("provisioner");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let vault = Arc::new(crate::vault::Vault::load_or_create(
        &config.secrets_key_file,
    )?);
    let ca = Arc::new(
        MeshCa::load_or_create(&pool, &vault)
            .await
            .context("loading the mesh CA")?,
    );
    let signer = Signer::load_or_create(&pool, &vault)
        .await
        .context("loading the signing keys")?;
    let sealer = Sealer::load_or_create(&pool, &vault)
        .await
        .context("loading the app encryption key")?;
    let bus = crate::events::Bus::new(pool.clone());
    tracker.spawn(bus.clone().listen(shutdown.clone()));
    let revocations = Arc::new(devmesh_proxy::revocations::Revocations::default());
    let (relay, locations, mesh_peers) = crate::relay::start(
        config.relay_address,
        &config.access_url,
        &pool,
        &signer,
        &ca,
        &bus,
        config.http_limits.max_connections_per_ip,
        revocations.clone(),
        shutdown.clone(),
        &tracker,
    )
    .await
    .with_context(|| format!("cannot start the relay on {}", config.relay_address))?;
    let relay_address = relay.advertised().address.clone();
    let parts = Parts {
        signer,
        sealer,
        ca,
        relay,
        relay_address,
        bus,
        locations,
        mesh_peers,
        revocations,
        shutdown: shutdown.clone(),
        vault: vault.clone(),
        stale_transactions,
    };
    let state = AppState::new(pool.clone(), config, parts);
    let failure = Arc::new(OnceLock::new());
    let embedded = embedded.map(|pg| {
        let pg = Arc::new(Mutex::new(pg));
        supervise_embedded(
            Arc::downgrade(&pg),
            state.metrics.clone(),
            shutdown.clone(),
            failure.clone(),
        );
        pg
    });
    let wildcards: Vec<String> = wildcard.iter().cloned().collect();
    let tls_config = tls::https(&tls_mode, &access_url, &wildcards, shutdown.clone())?;
    let scheme = if tls_config.is_some() {
        "https"
    } else {
        "http"
    };
    tracker.spawn(crate::api::apply_events(state.clone()));
    tracker.spawn(crate::api::probe_edges(state.clone()));
    tracker.spawn(crate::jobs::reap_stale(
        pool.clone(),
        provisioner_timeout,
        shutdown.clone(),
    ));
    let provisioning_state = state.clone();
    let limits = devmesh_net::http::Limits {
        grace: GRACE_PERIOD,
        ..state.config.http_limits
    };
    let app = router(state);
    let task = tokio::spawn(devmesh_net::http::serve(
        listener,
        app,
        tls_config,
        shutdown.clone(),
        limits,
    ));
    tracing::info!(version = devmesh_shared::VERSION, http.address = %local_addr, access_url = %access_url, "devmesh primary started");
    if !has_users {
        tracing::info!("no users yet: create the first one with `devmesh login {access_url}`");
    }
    let terraform = match devmesh_provisioner::terraform::Terraform::find(terraform_path.as_deref())
        .await
    {
        Ok(tf) => {
            tracing::info!(terraform.version = tf.version(), terraform.path = %tf.path().display(), "Terraform found for workspace builds");
            Some(tf)
        }
        Err(e) => {
            tracing::warn!("{e}; builds of Terraform templates will fail until it is");
            None
        }
    };
    if provisioner_daemons > 0 {
        match std::env::current_exe() {
            Ok(provider) => crate::provisioning::spawn(
                provisioning_state,
                devmesh_provisioner::daemon::Runner {
                    terraform,
                    provider,
                    work: provisioner_work,
                    heartbeat_every: crate::jobs::heartbeat_every(provisioner_timeout),
                },
                provisioner_daemons,
                &tracker,
                shutdown.clone(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot find this binary to serve the Terraform provider; no built-in provisioner daemons")
            }
        }
    }
    Ok(RunningServer {
        local_addr,
        scheme,
        db: pool,
        shutdown,
        task: Some(task),
        embedded,
        failure,
    })
}

/// Attempts to start a dead embedded PostgreSQL before giving up.
const RESTART_ATTEMPTS: u32 = 5;
/// The wait before the second attempt, doubled before each later one
/// (0.5, 1, 2, 4 s: about 8 s in all, plus each attempt's own time).
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// How often the supervisor looks at the postmaster.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);

/// Watches the embedded PostgreSQL from a thread of its own: when the
/// postmaster dies (killed, crashed, out of memory) it is started again on
/// the same cluster, with crash recovery, after a backoff between failed
/// attempts; the pool's next connections reach it again by themselves.
/// Each event is logged and counted (`devmesh_embedded_postgres_up`,
/// `devmesh_embedded_postgres_restarts_total`). When it cannot come back,
/// the reason goes to `failure` and the server shuts down, so the process
/// exits non-zero rather than serving without a database. Holds the
/// cluster weakly: stopping or dropping the server ends the watch.
fn supervise_embedded(
    pg: Weak<Mutex<EmbeddedPostgres>>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
    failure: Arc<OnceLock<String>>,
) {
    let watch = move || {
        loop {
            std::thread::sleep(SUPERVISE_EVERY);
            // Gone once the server is stopped or dropped.
            let Some(pg) = pg.upgrade() else { return };
            if shutdown.is_cancelled() {
                return;
            }
            let Some(status) = pg.lock().exited() else {
                continue;
            };
            metrics.embedded_postgres_up.set(0);
            let died = tokio::time::Instant::now();
            tracing::error!(%status, log = %pg.lock().log_tail(), "the embedded PostgreSQL died; starting it again");
            let mut backoff = FIRST_RESTART_BACKOFF;
            let mut attempt = 1;
            loop {
                let tried = {
                    let mut pg = pg.lock();
                    if shutdown.is_cancelled() {
                        return;
                    }
                    pg.restart()
                };
                match tried {
                    Ok(()) => {
                        metrics.embedded_postgres_restarts.inc();
                        metrics.embedded_postgres_up.set(1);
                        tracing::warn!(
                            attempts = attempt,
                            down_ms = died.elapsed().as_millis() as u64,
                            "the embedded PostgreSQL is back (crash recovery done)"
                        );
                        break;
                    }
                    Err(e) if attempt >= RESTART_ATTEMPTS => {
                        let reason = format!(
                            "the embedded PostgreSQL died and could not be started again ({attempt} attempts): {e}"
                        );
                        tracing::error!("{reason}; shutting down");
                        let _ = failure.set(reason);
                        shutdown.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, retry_in_ms = backoff.as_millis() as u64, "the embedded PostgreSQL did not start again");
                        std::thread::sleep(backoff);
                        backoff *= 2;
                        attempt += 1;
                    }
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("postgres-supervisor".into())
        .spawn(watch)
    {
        tracing::error!(error = %e, "cannot start the embedded PostgreSQL's supervisor; a crash of it will not be repaired");
    }
}
