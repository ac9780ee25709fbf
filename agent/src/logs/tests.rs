//! The batcher against a fake primary that records every batch.

use std::time::Duration;

use tokio::sync::Semaphore;

use super::*;
use crate::testutil::{Behaviour, FakePrimary, empty_manifest};

fn outputs(batch: &[AgentLogEntry]) -> Vec<&str> {
    batch.iter().map(|e| e.output.as_str()).collect()
}

#[tokio::test]
async fn full_batches_go_at_once_and_the_rest_after_the_delay() {
    let primary = FakePrimary::start(Behaviour::new(empty_manifest())).await;
    let (logs, _uploader) = spawn(
        primary.client(),
        BatchConfig::default(),
        CancellationToken::new(),
    );
    let start = Instant::now();
    for i in 0..250 {
        logs.send("build", Level::Info, format!("line {i}"));
    }
    primary
        .wait_for("three batches", |r| r.log_batches.len() == 3)
        .await;
    assert!(start.elapsed() >= Duration::from_millis(250));
    primary.recorded(|r| {
        let sizes: Vec<usize> = r.log_batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let all: Vec<&str> = r.log_batches.iter().flat_map(|b| outputs(b)).collect();
        let want: Vec<String> = (0..250).map(|i| format!("line {i}")).collect();
        assert_eq!(all, want);
        assert!(
            r.log_batches[0]
                .iter()
                .all(|e| e.source == "build" && e.level == "info")
        );
    });
}

#[tokio::test]
async fn a_few_lines_are_sent_together_after_the_delay() {
    let primary = FakePrimary::start(Behaviour::new(empty_manifest())).await;
    let (logs, _uploader) = spawn(
        primary.client(),
        BatchConfig::default(),
        CancellationToken::new(),
    );
    let start = Instant::now();
    logs.send("s", Level::Info, "out".into());
    logs.send("s", Level::Error, "err".into());
    logs.send("s", Level::Info, "more".into());
    primary
        .wait_for("a batch", |r| r.log_batches.len() == 1)
        .await;
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");

    logs.send("s", Level::Info, "later".into());
    primary
        .wait_for("a second batch", |r| r.log_batches.len() == 2)
        .await;
    primary.recorded(|r| {
        assert_eq!(outputs(&r.log_batches[0]), ["out", "err", "more"]);
        assert_eq!(r.log_batches[0][1].level, "error");
        assert_eq!(outputs(&r.log_batches[1]), ["later"]);
    });
}

#[tokio::test]
async fn a_failed_upload_is_retried() {
    let mut behaviour = Behaviour::new(empty_manifest());
    behaviour.failing_log_posts = 1;
    let primary = FakePrimary::start(behaviour).await;
    let (logs, uploader) = spawn(
        primary.client(),
        BatchConfig::default(),
        CancellationToken::new(),
    );
    logs.send("s", Level::Info, "keep me".into());
    primary
        .wait_for("a stored batch", |r| r.log_batches.len() == 1)
        .await;
    uploader.finish().await;
    primary.recorded(|r| {
        assert_eq!(r.log_posts, 2);
        assert_eq!(outputs(&r.log_batches[0]), ["keep me"]);
    });
}

#[tokio::test]
async fn overflowed_stops_sending() {
    let mut behaviour = Behaviour::new(empty_manifest());
    behaviour.overflow_after = Some(1);
    let primary = FakePrimary::start(behaviour).await;
    let (logs, uploader) = spawn(
        primary.client(),
        BatchConfig::default(),
        CancellationToken::new(),
    );
    logs.send("s", Level::Info, "fits".into());
    primary
        .wait_for("a batch", |r| r.log_batches.len() == 1)
        .await;
    for i in 0..300 {
        logs.send("s", Level::Info, format!("too much {i}"));
    }
    // Finishing sends everything still queued, if anything is to be sent.
    uploader.finish().await;
    primary.recorded(|r| {
        assert_eq!(r.log_posts, 1);
        assert_eq!(r.log_batches.len(), 1);
    });
}

#[tokio::test]
async fn a_full_queue_drops_lines_and_says_how_many() {
    let gate = Arc::new(Semaphore::new(0));
    let mut behaviour = Behaviour::new(empty_manifest());
    behaviour.log_gate = Some(gate.clone());
    let primary = FakePrimary::start(behaviour).await;
    let config = BatchConfig {
        capacity: 4,
        ..BatchConfig::default()
    };
    let (logs, uploader) = spawn(primary.client(), config, CancellationToken::new());
    logs.send("s", Level::Info, "first".into());
    // The uploader is now stuck in its first post.
    primary
        .wait_for("the first post", |r| r.log_posts == 1)
        .await;
    for i in 0..20 {
        logs.send("s", Level::Info, format!("burst {i}"));
    }
    gate.add_permits(10);
    // `logs` is still alive: finishing must not wait for it.
    uploader.finish().await;
    primary.recorded(|r| {
        assert_eq!(r.log_batches.len(), 2, "{:?}", r.log_batches);
        assert_eq!(outputs(&r.log_batches[0]), ["first"]);
        assert_eq!(
            outputs(&r.log_batches[1]),
            [
                "burst 0",
                "burst 1",
                "burst 2",
                "burst 3",
                "dropped 16 lines"
            ]
        );
        let summary = r.log_batches[1].last().unwrap();
        assert_eq!(
            (summary.source.as_str(), summary.level.as_str()),
            (AGENT_SOURCE, "error")
        );
    });
    drop(logs);
}

#[tokio::test]
async fn batches_are_also_bounded_by_bytes() {
    let primary = FakePrimary::start(Behaviour::new(empty_manifest())).await;
    let config = BatchConfig {
        max_bytes: 100,
        ..BatchConfig::default()
    };
    let (logs, uploader) = spawn(primary.client(), config, CancellationToken::new());
    for i in 0..5 {
        logs.send("s", Level::Info, format!("{i}").repeat(40));
    }
    primary
        .wait_for("two batches", |r| r.log_batches.len() == 2)
        .await;
    uploader.finish().await;
    primary.recorded(|r| {
        let sizes: Vec<usize> = r.log_batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 2]);
    });
}

#[tokio::test]
async fn a_batch_the_primary_refuses_is_dropped_not_retried_forever() {
    let mut behaviour = Behaviour::new(empty_manifest());
    behaviour.rejected_log_posts = 1;
    let primary = FakePrimary::start(behaviour).await;
    let (logs, uploader) = spawn(
        primary.client(),
        BatchConfig::default(),
        CancellationToken::new(),
    );
    logs.send("s", Level::Info, "refused".into());
    primary
        .wait_for("the refused post", |r| r.log_posts == 1)
        .await;
    logs.send("s", Level::Info, "accepted".into());
    primary
        .wait_for("a stored batch", |r| r.log_batches.len() == 1)
        .await;
    uploader.finish().await;
    primary.recorded(|r| {
        assert_eq!(r.log_posts, 2);
        assert_eq!(outputs(&r.log_batches[0]), ["accepted"]);
    });
}
