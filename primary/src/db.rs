//! The database: connecting (external URL or the embedded cluster) and
//! applying the embedded migrations under an advisory lock, so primaries
//! that start together never race on the schema.

pub mod embedded;

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// The embedded schema migrations (`primary/migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Advisory lock key held while migrating ("devmesh" in ASCII).
const MIGRATION_LOCK: i64 = 0x0064_6576_6d65_7368;

/// Opens a pool. The pool reconnects by itself, so a database restart
/// costs the requests in flight, not the server. `stale` counts the
/// connections closed on their way back to the pool because they were
/// still inside a transaction (see [`leaves_no_transaction`]).
pub async fn connect(options: PgConnectOptions, stale: Counter) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .after_release(move |conn, _| {
            let stale = stale.clone();
            Box::pin(async move {
                let clean = leaves_no_transaction(conn).await?;
                if !clean {
                    stale.inc();
                }
                Ok(clean)
            })
        })
        .connect_with(options.application_name("devmesh-primary"))
        .await
}

/// Whether a connection coming back to the pool is outside any
/// transaction, so it may be lent again.
///
/// sqlx (0.8.6, and 0.9.0 too: transact-rs/sqlx#4393) raises its
/// transaction depth only after `BEGIN` is answered. A task cancelled in
/// between (hyper drops a handler whose client went away; a timeout fires)
/// leaves the session inside a transaction that sqlx does not know of, and
/// the pool lends it again: the next borrower's writes run inside it, are
/// acknowledged, and are never committed. Such a connection is closed
/// instead, which makes the server roll the transaction back.
///
/// Inside a transaction begun earlier, the transaction's start time is
/// older than this statement's; outside one they are the same instant.
/// That holds for a statement sent alone by the simple query protocol
/// only: by the extended protocol (a prepared query), the implicit
/// transaction starts at the Parse message and the statement's time is
/// taken again at Bind and Execute.
async fn leaves_no_transaction(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Row;
    let answer = sqlx::Executor::fetch_one(
        conn,
        sqlx::raw_sql("SELECT transaction_timestamp() = statement_timestamp()"),
    )
    .await
    .and_then(|row| row.try_get::<bool, _>(0));
    let stale = match answer {
        Ok(clean) => !clean,
        // 25P02: inside a transaction that has already failed.
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("25P02") => true,
        Err(e) => return Err(e),
    };
    if stale {
        tracing::warn!(
            "a database connection came back inside a transaction its task never finished (cancelled during BEGIN); closing it so no later write lands in it"
        );
    }
    Ok(!stale)
}

/// Applies pending migrations while holding a session advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = MIGRATOR.run(&mut *conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    if unlock.is_err() {
        // A connection that may still hold the lock must not go back to the pool.
        let _ = conn.detach().close().await;
    }
    result
}

/// Whether an error means "the database is unavailable" rather than "the
/// query was wrong": those become 503s. Connection-level failures are I/O
/// errors, pool timeouts, and server errors of severity FATAL (the server
/// refused or dropped the session: shutdown, restart, connections not
/// allowed) or of classes 08 (connection), 53 (resources) and 57P (operator
/// intervention).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    use sqlx::postgres::{PgDatabaseError, PgSeverity};
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(d) => {
            let fatal = d
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic));
            fatal
                || d.code().is_some_and(|c| {
                    c.starts_with("08") || c.starts_with("53") || c.starts_with("57P")
                })
        }
        _ => false,
    }
}

/// Whether an error is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}
