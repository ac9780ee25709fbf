//! The provisioner job queue in PostgreSQL: template imports and workspace
//! builds, claimed by provisioner daemons whose tags cover the job's.
//!
//! A job goes `pending → running → succeeded | failed`, or through
//! `canceling → canceled` when someone cancels it while it runs (a pending
//! job is canceled at once). A running job's daemon heartbeats; a job whose
//! heartbeat is older than the timeout fails with a message saying so, so a
//! daemon that died never leaves a build hanging. Everything a job logs is
//! stored with it, so a restarted primary loses neither jobs nor logs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

pub use devmesh_shared::provisionerd::{Beat, JobKind, LogStream, MAX_LOG_LINE, Outcome, Tags};

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Import => "import",
        JobKind::Build => "build",
    }
}

fn stored_kind(s: &str) -> JobKind {
    match s {
        "import" => JobKind::Import,
        _ => JobKind::Build,
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting for a daemon.
    Pending,
    /// A daemon runs it.
    Running,
    /// Done.
    Succeeded,
    /// Ended with an error (the job's `error` says which).
    Failed,
    /// Cancellation asked; its daemon is interrupting it.
    Canceling,
    /// Canceled.
    Canceled,
}

impl JobStatus {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceling => "canceling",
            JobStatus::Canceled => "canceled",
        }
    }

    /// Parses a stored status (unknown ones read as failed).
    pub fn from_stored(s: &str) -> Self {
        match s {
            "pending" => JobStatus::Pending,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "canceling" => JobStatus::Canceling,
            "canceled" => JobStatus::Canceled,
            _ => JobStatus::Failed,
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id.
    pub id: Uuid,
    /// Import or build.
    pub kind: JobKind,
    /// Where it is.
    pub status: JobStatus,
    /// Tags a daemon needs to take it.
    pub tags: Tags,
    /// What to do (kind-specific JSON).
    pub input: Value,
    /// The daemon running or last running it.
    pub daemon_id: Option<Uuid>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    kind: String,
    status: String,
    tags: sqlx::types::Json<Tags>,
    input: Value,
    daemon_id: Option<Uuid>,
    error: Option<String>,
    created_at: DateTime<Utc>,
}

impl From<JobRow> for Job {
    fn from(r: JobRow) -> Self {
        Self {
            id: r.id,
            kind: stored_kind(&r.kind),
            status: JobStatus::from_stored(&r.status),
            tags: r.tags.0,
            input: r.input,
            daemon_id: r.daemon_id,
            error: r.error,
            created_at: r.created_at,
        }
    }
}

const COLUMNS: &str = "id, kind, status, tags, input, daemon_id, error, created_at";

/// Queues a job; it runs once a daemon with `tags` (at least) claims it.
pub async fn enqueue<'e>(
    db: impl sqlx::PgExecutor<'e>,
    kind: JobKind,
    tags: &Tags,
    input: &Value,
) -> sqlx::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO provisioner_jobs (id, kind, status, tags, input) VALUES ($1, $2, 'pending', $3, $4)",
    )
    .bind(id)
    .bind(kind_name(kind))
    .bind(sqlx::types::Json(tags))
    .bind(input)
    .execute(db)
    .await?;
    Ok(id)
}

/// A daemon's registration: who it is and which jobs it may take.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Its id.
    pub id: Uuid,
    /// Its name, for people.
    pub name: String,
    /// The tags it offers.
    pub tags: Tags,
}

/// Records (or refreshes) a daemon: built into this primary (`key`
/// `None`) or external, authenticated by provisioner key `key`.
pub async fn register_daemon(
    db: &PgPool,
    daemon: &Daemon,
    version: &str,
    key: Option<Uuid>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO provisioner_daemons (id, name, tags, version, built_in, key_id)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET name = $2, tags = $3, version = $4, last_seen_at = now()",
    )
    .bind(daemon.id)
    .bind(&daemon.name)
    .bind(sqlx::types::Json(&daemon.tags))
    .bind(version)
    .bind(key.is_none())
    .bind(key)
    .execute(db)
    .await?;
    Ok(())
}

/// Claims the oldest pending job whose tags `daemon` covers, if any, and
/// marks it running with a fresh heartbeat. Concurrent daemons never claim
/// the same job.
pub async fn acquire(db: &PgPool, daemon: &Daemon) -> sqlx::Result<Option<Job>> {
    sqlx::query("UPDATE provisioner_daemons SET last_seen_at = now() WHERE id = $1")
        .bind(daemon.id)
        .execute(db)
        .await?;
    let row: Option<JobRow> = sqlx::query_as(&format!(
        "UPDATE provisioner_jobs
         SET status = 'running', daemon_id = $1, started_at = now(), heartbeat_at = now()
         WHERE id = (
             SELECT id FROM provisioner_jobs
             WHERE status = 'pending' AND tags <@ $2
             ORDER BY created_at
             FOR UPDATE SKIP LOCKED
             LIMIT 1
         )
         RETURNING {COLUMNS}"
    ))
    .bind(daemon.id)
    .bind(sqlx::types::Json(&daemon.tags))
    .fetch_optional(db)
    .await?;
    Ok(row.map(Job::from))
}

/// Refreshes the heartbeat of `job`, which `daemon` runs.
pub async fn heartbeat(db: &PgPool, job: Uuid, daemon: Uuid) -> sqlx::Result<Beat> {
    sqlx::query("UPDATE provisioner_daemons SET last_seen_at = now() WHERE id = $1")
        .bind(daemon)
        .execute(db)
        .await?;
    let status: Option<String> = sqlx::query_scalar(
        "UPDATE provisioner_jobs SET heartbeat_at = now()
         WHERE id = $1 AND daemon_id = $2 AND status IN ('running', 'canceling')
         RETURNING status",
    )
    .bind(job)
    .bind(daemon)
    .fetch_optional(db)
    .await?;
    Ok(match status.as_deref() {
        Some("canceling") => Beat::Cancel,
        Some(_) => Beat::Continue,
        None => Beat::Lost,
    })
}

/// Appends lines to `job`'s log, in order.
pub async fn append_logs(
    db: &PgPool,
    job: Uuid,
    lines: &[(LogStream, String)],
) -> sqlx::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let streams: Vec<&str> = lines.iter().map(|(s, _)| s.as_str()).collect();
    let texts: Vec<String> = lines
        .iter()
        .map(|(_, l)| {
            if l.len() <= MAX_LOG_LINE {
                l.clone()
            } else {
                let mut end = MAX_LOG_LINE;
                while !l.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}…", &l[..end])
            }
        })
        .collect();
    sqlx::query(
        "INSERT INTO provisioner_job_logs (job_id, stream, line)
         SELECT $1, s, l FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(s, l, n) ORDER BY n",
    )
    .bind(job)
    .bind(&streams)
    .bind(&texts)
    .execute(db)
    .await?;
    Ok(())
}

/// One stored log line.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogLine {
    /// Increasing within the job: ask for lines after the last one seen.
    pub id: i64,
    /// `provisioner`, `stdout` or `stderr`.
    pub stream: String,
    /// The text.
    pub line: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// `job`'s log lines after `after` (0: from the start), at most `limit`.
pub async fn logs(db: &PgPool, job: Uuid, after: i64, limit: i64) -> sqlx::Result<Vec<LogLine>> {
    sqlx::query_as(
        "SELECT id, stream, line, created_at FROM provisioner_job_logs
         WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(job)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Records how `job` ended. Only the daemon running it may (a job that
/// timed out and failed meanwhile stays failed); returns whether it did.
pub async fn complete<'e>(
    db: impl sqlx::PgExecutor<'e>,
    job: Uuid,
    daemon: Uuid,
    outcome: &Outcome,
) -> sqlx::Result<bool> {
    let (status, error) = match outcome {
        Outcome::Succeeded => ("succeeded", None),
        Outcome::Failed { error } => ("failed", Some(error.as_str())),
        Outcome::Canceled => ("canceled", None),
    };
    let done = sqlx::query(
        "UPDATE provisioner_jobs SET status = $3, error = $4, completed_at = now()
         WHERE id = $1 AND daemon_id = $2 AND status IN ('running', 'canceling')",
    )
    .bind(job)
    .bind(daemon)
    .bind(status)
    .bind(error)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Asks to cancel `job`: a pending job is canceled at once, a running one
/// moves to `canceling` for its daemon to interrupt. Returns the status it
/// is in afterwards (`None`: no such job).
pub async fn cancel(db: &PgPool, job: Uuid) -> sqlx::Result<Option<JobStatus>> {
    let status: Option<String> = sqlx::query_scalar(
        "UPDATE provisioner_jobs SET
             status = CASE status WHEN 'pending' THEN 'canceled'
                                  WHEN 'running' THEN 'canceling'
                                  ELSE status END,
             completed_at = CASE status WHEN 'pending' THEN now() ELSE completed_at END
         WHERE id = $1
         RETURNING status",
    )
    .bind(job)
    .fetch_optional(db)
    .await?;
    Ok(status.as_deref().map(JobStatus::from_stored))
}

/// Fails every running job whose daemon has not heartbeat for `timeout`,
/// saying so, and the workspace build it ran; returns how many jobs. Run
/// periodically by every primary.
pub async fn fail_stale(db: &PgPool, timeout: Duration) -> sqlx::Result<u64> {
    let secs = timeout.as_secs_f64();
    let failed: i64 = sqlx::query_scalar(
        "WITH failed AS (
             UPDATE provisioner_jobs SET status = 'failed', completed_at = now(),
                 error = format('its provisioner daemon stopped responding (no heartbeat for %s s)', $1::float8::int)
             WHERE status IN ('running', 'canceling')
               AND heartbeat_at < now() - make_interval(secs => $1)
             RETURNING id
         ), builds AS (
             UPDATE workspace_builds SET status = 'failed', completed_at = now()
             WHERE job_id IN (SELECT id FROM failed) AND status IN ('pending', 'running')
         )
         SELECT count(*) FROM failed",
    )
    .bind(secs)
    .fetch_one(db)
    .await?;
    Ok(failed as u64)
}

/// How long a running job's daemon may go without a heartbeat, unless the
/// server says otherwise (`--provisioner-timeout`).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a job may run before its daemon interrupts Terraform and fails
/// it, unless the server says otherwise (`--provisioner-job-timeout`).
pub const JOB_TIMEOUT: Duration = Duration::from_secs(3600);

/// How often a daemon heartbeats when jobs time out after `timeout`:
/// three beats fit in it.
pub fn heartbeat_every(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_secs(1))
}

/// Fails jobs silent for `timeout` until `shutdown` (every primary runs
/// this; the update is idempotent across replicas).
pub async fn reap_stale(
    db: PgPool,
    timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(heartbeat_every(timeout)) => {}
        }
        // Daemons gone for a week (each start registers a new one) are
        // forgotten; their old jobs keep their history.
        if let Err(e) = sqlx::query(
            "DELETE FROM provisioner_daemons d WHERE last_seen_at < now() - interval '7 days'
             AND NOT EXISTS (SELECT 1 FROM provisioner_jobs j
                             WHERE j.daemon_id = d.id AND j.status IN ('running', 'canceling'))",
        )
        .execute(&db)
        .await
        {
            tracing::warn!(error = %e, "cannot forget old provisioner daemons");
        }
        match fail_stale(&db, timeout).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                jobs = n,
                "failed provisioner jobs whose daemon stopped responding"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot check for stale provisioner jobs"),
        }
    }
}

/// A job.
pub async fn get(db: &PgPool, job: Uuid) -> sqlx::Result<Option<Job>> {
    let row: Option<JobRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM provisioner_jobs WHERE id = $1"
    ))
    .bind(job)
    .fetch_optional(db)
    .await?;
    Ok(row.map(Job::from))
}

/// Whether some daemon seen within `recent` could take a job with `tags`:
/// a job no daemon can take says so instead of waiting silently.
pub async fn takeable(db: &PgPool, tags: &Tags, recent: Duration) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM provisioner_daemons
             WHERE $1 <@ tags AND last_seen_at > now() - make_interval(secs => $2)
         )",
    )
    .bind(sqlx::types::Json(tags))
    .bind(recent.as_secs_f64())
    .fetch_one(db)
    .await
}
