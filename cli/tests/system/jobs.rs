//! The provisioner job queue on real PostgreSQL: tag matching, one claim
//! per job under concurrent daemons, cancellation, heartbeats that time
//! out into a clear failure, logs in order, and jobs no daemon can take.

use std::time::Duration;

use devmesh_primary::jobs::{self, Beat, Daemon, JobKind, JobStatus, LogStream, Outcome, Tags};
use devmesh_tests::TestPrimary;
use serde_json::json;
use uuid::Uuid;

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn daemon(db: &sqlx::PgPool, name: &str, t: Tags) -> Daemon {
    let d = Daemon {
        id: Uuid::new_v4(),
        name: name.into(),
        tags: t,
    };
    jobs::register_daemon(db, &d, "test", None).await.unwrap();
    d
}

#[tokio::test]
async fn daemons_take_only_jobs_their_tags_cover_and_each_job_once() {
    let primary = TestPrimary::start().await;
    let db = primary.pool().clone();
    let gpu = jobs::enqueue(
        &db,
        JobKind::Build,
        &tags(&[("gpu", "yes")]),
        &json!({"n": "gpu"}),
    )
    .await
    .unwrap();
    let plain = jobs::enqueue(&db, JobKind::Build, &Tags::new(), &json!({"n": "plain"}))
        .await
        .unwrap();
    let cpu = daemon(&db, "cpu", tags(&[("region", "eu")])).await;
    let gpu_daemon = daemon(&db, "gpu", tags(&[("gpu", "yes"), ("region", "eu")])).await;

    // The CPU daemon skips the older GPU job and takes the untagged one.
    let got = jobs::acquire(&db, &cpu).await.unwrap().unwrap();
    assert_eq!(got.id, plain);
    assert_eq!(got.status, JobStatus::Running);
    assert!(jobs::acquire(&db, &cpu).await.unwrap().is_none());
    assert_eq!(
        jobs::acquire(&db, &gpu_daemon).await.unwrap().unwrap().id,
        gpu
    );

    // A job nobody offers the tags for says so.
    let arm = tags(&[("arch", "arm64")]);
    assert!(
        !jobs::takeable(&db, &arm, Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        jobs::takeable(&db, &tags(&[("gpu", "yes")]), Duration::from_secs(60))
            .await
            .unwrap()
    );

    // Ten jobs, three daemons claiming at once: every job exactly once.
    let mut queued = Vec::new();
    for i in 0..10 {
        queued.push(
            jobs::enqueue(&db, JobKind::Build, &Tags::new(), &json!({ "i": i }))
                .await
                .unwrap(),
        );
    }
    let mut claimers = Vec::new();
    for n in 0..3 {
        let (db, d) = (db.clone(), daemon(&db, &format!("d{n}"), Tags::new()).await);
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = jobs::acquire(&db, &d).await.unwrap() {
                mine.push(job.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    claimed.sort();
    queued.sort();
    assert_eq!(claimed, queued);
    primary.stop().await;
}

#[tokio::test]
async fn cancellation_reaches_the_daemon_and_a_silent_daemon_fails_its_job() {
    let primary = TestPrimary::start().await;
    let db = primary.pool().clone();
    let d = daemon(&db, "d", Tags::new()).await;

    // Canceling a pending job cancels it at once.
    let pending = jobs::enqueue(&db, JobKind::Import, &Tags::new(), &json!({}))
        .await
        .unwrap();
    assert_eq!(
        jobs::cancel(&db, pending).await.unwrap(),
        Some(JobStatus::Canceled)
    );
    assert!(jobs::acquire(&db, &d).await.unwrap().is_none());

    // A running one is asked to stop at its next heartbeat.
    let running = jobs::enqueue(&db, JobKind::Build, &Tags::new(), &json!({}))
        .await
        .unwrap();
    jobs::acquire(&db, &d).await.unwrap().unwrap();
    assert_eq!(
        jobs::heartbeat(&db, running, d.id).await.unwrap(),
        Beat::Continue
    );
    assert_eq!(
        jobs::cancel(&db, running).await.unwrap(),
        Some(JobStatus::Canceling)
    );
    assert_eq!(
        jobs::heartbeat(&db, running, d.id).await.unwrap(),
        Beat::Cancel
    );
    assert!(
        jobs::complete(&db, running, d.id, &Outcome::Canceled)
            .await
            .unwrap()
    );
    assert_eq!(
        jobs::get(&db, running).await.unwrap().unwrap().status,
        JobStatus::Canceled
    );

    // A daemon that stops heartbeating loses its job, with a reason.
    let orphan = jobs::enqueue(&db, JobKind::Build, &Tags::new(), &json!({}))
        .await
        .unwrap();
    jobs::acquire(&db, &d).await.unwrap().unwrap();
    assert_eq!(
        jobs::fail_stale(&db, Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    sqlx::query(
        "UPDATE provisioner_jobs SET heartbeat_at = now() - interval '2 minutes' WHERE id = $1",
    )
    .bind(orphan)
    .execute(&db)
    .await
    .unwrap();
    assert_eq!(
        jobs::fail_stale(&db, Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    let failed = jobs::get(&db, orphan).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("stopped responding"),
        "{:?}",
        failed.error
    );
    // The daemon, back, learns it lost the job and cannot overwrite it.
    assert_eq!(
        jobs::heartbeat(&db, orphan, d.id).await.unwrap(),
        Beat::Lost
    );
    assert!(
        !jobs::complete(&db, orphan, d.id, &Outcome::Succeeded)
            .await
            .unwrap()
    );
    assert_eq!(
        jobs::get(&db, orphan).await.unwrap().unwrap().status,
        JobStatus::Failed
    );
    // Another daemon cannot complete someone else's job either.
    let theirs = jobs::enqueue(&db, JobKind::Build, &Tags::new(), &json!({}))
        .await
        .unwrap();
    jobs::acquire(&db, &d).await.unwrap().unwrap();
    assert!(
        !jobs::complete(&db, theirs, Uuid::new_v4(), &Outcome::Succeeded)
            .await
            .unwrap()
    );
    primary.stop().await;
}

#[tokio::test]
async fn a_jobs_log_keeps_its_order_and_pages_by_cursor() {
    let primary = TestPrimary::start().await;
    let db = primary.pool().clone();
    let job = jobs::enqueue(&db, JobKind::Build, &Tags::new(), &json!({}))
        .await
        .unwrap();
    let long = "é".repeat(jobs::MAX_LOG_LINE);
    let mut lines = vec![(LogStream::Provisioner, "init".to_owned())];
    lines.extend((0..100).map(|i| (LogStream::Stdout, format!("line {i}"))));
    lines.push((LogStream::Stderr, long));
    jobs::append_logs(&db, job, &lines).await.unwrap();

    let first = jobs::logs(&db, job, 0, 50).await.unwrap();
    assert_eq!(first.len(), 50);
    assert_eq!(
        (first[0].stream.as_str(), first[0].line.as_str()),
        ("provisioner", "init")
    );
    assert_eq!(first[1].line, "line 0");
    let rest = jobs::logs(&db, job, first[49].id, 1000).await.unwrap();
    assert_eq!(rest.len(), 52);
    assert_eq!(rest[0].line, "line 49");
    let cut = &rest.last().unwrap().line;
    assert!(
        cut.ends_with('…') && cut.len() <= jobs::MAX_LOG_LINE + 3,
        "{}",
        cut.len()
    );
    primary.stop().await;
}
