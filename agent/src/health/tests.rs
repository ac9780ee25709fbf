//! The health state machine, and checks against a real HTTP app whose
//! status flips.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use super::*;
use crate::testutil::{AbortOnDrop, Behaviour, FakePrimary, closed_port, empty_manifest};

use AppHealth::{Healthy, Initializing, Unhealthy};

#[test]
fn starts_initializing_and_the_first_pass_is_healthy() {
    let mut t = Tracker::new(3);
    assert_eq!(t.state(), Initializing);
    assert_eq!(t.observe(true), Some(Healthy));
    assert_eq!(t.observe(true), None);
}

#[test]
fn unhealthy_only_after_threshold_consecutive_failures() {
    let mut t = Tracker::new(3);
    t.observe(true);
    assert_eq!(t.observe(false), None);
    assert_eq!(t.observe(false), None);
    // A pass in between starts the count over.
    assert_eq!(t.observe(true), None);
    assert_eq!(t.observe(false), None);
    assert_eq!(t.observe(false), None);
    assert_eq!(t.observe(false), Some(Unhealthy));
    assert_eq!(t.observe(false), None);
    assert_eq!(t.observe(true), Some(Healthy));
}

#[test]
fn failures_from_the_start_go_straight_to_unhealthy() {
    let mut t = Tracker::new(2);
    assert_eq!(t.observe(false), None);
    assert_eq!(t.state(), Initializing);
    assert_eq!(t.observe(false), Some(Unhealthy));
}

#[test]
fn a_zero_threshold_means_one() {
    let mut t = Tracker::new(0);
    assert_eq!(t.observe(false), Some(Unhealthy));
}

#[test]
fn manifest_checks_get_bounded_timeouts() {
    let app = |interval_seconds| ManifestApp {
        slug: "web".into(),
        url: "http://127.0.0.1:1".into(),
        healthcheck: Some(devmesh_shared::api::HealthcheckSpec {
            url: "http://127.0.0.1:1/healthz".into(),
            interval_seconds,
            threshold: 3,
        }),
    };
    let c = Check::from_manifest(&app(5)).unwrap();
    assert_eq!(
        (c.interval, c.timeout),
        (Duration::from_secs(5), Duration::from_secs(5))
    );
    let c = Check::from_manifest(&app(60)).unwrap();
    assert_eq!(c.timeout, MAX_CHECK_TIMEOUT);
    let c = Check::from_manifest(&app(0)).unwrap();
    assert_eq!(c.interval, Duration::from_secs(1));
    let none = ManifestApp {
        healthcheck: None,
        ..app(1)
    };
    assert!(Check::from_manifest(&none).is_none());
}

/// An app whose `/flip` answers with a settable status and whose `/moved`
/// always redirects.
async fn flipping_app(status: Arc<AtomicU16>) -> (String, AbortOnDrop<()>) {
    async fn flip(State(s): State<Arc<AtomicU16>>) -> StatusCode {
        StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap()
    }
    async fn moved() -> impl IntoResponse {
        (StatusCode::FOUND, [(header::LOCATION, "/nowhere")])
    }
    let app = axum::Router::new()
        .route("/flip", get(flip))
        .route("/moved", get(moved))
        .with_state(status);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, AbortOnDrop(task))
}

fn check(slug: &str, url: String, threshold: u32) -> Check {
    Check {
        slug: slug.into(),
        url,
        interval: Duration::from_millis(20),
        timeout: Duration::from_secs(1),
        threshold,
    }
}

/// Every (slug, health) the primary received, in order.
fn history(reports: &[BTreeMap<String, AppHealth>], slug: &str) -> Vec<AppHealth> {
    reports
        .iter()
        .filter_map(|r| r.get(slug).copied())
        .collect()
}

#[tokio::test]
async fn a_flipping_app_reports_only_its_changes() {
    let status = Arc::new(AtomicU16::new(200));
    let (base, _app) = flipping_app(status.clone()).await;
    let primary = FakePrimary::start(Behaviour::new(empty_manifest())).await;
    let dead_port = closed_port().await;
    let checks = vec![
        check("flip", format!("{base}/flip"), 3),
        check("moved", format!("{base}/moved"), 3),
        check("down", format!("http://127.0.0.1:{dead_port}/"), 2),
    ];
    let cancel = CancellationToken::new();
    let mut tasks = spawn(primary.client(), checks, cancel.clone()).unwrap();

    let last = |r: &crate::testutil::Recorded, slug: &str| history(&r.health, slug).last().copied();
    primary
        .wait_for("first results", |r| {
            last(r, "flip") == Some(Healthy)
                && last(r, "moved") == Some(Healthy)
                && last(r, "down") == Some(Unhealthy)
        })
        .await;
    let settled = primary.recorded(|r| r.health.len());

    status.store(500, Ordering::SeqCst);
    primary
        .wait_for("flip to fail", |r| last(r, "flip") == Some(Unhealthy))
        .await;
    status.store(200, Ordering::SeqCst);
    primary
        .wait_for("flip to recover", |r| {
            history(&r.health, "flip") == [Healthy, Unhealthy, Healthy]
        })
        .await;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    primary.recorded(|r| {
        assert_eq!(history(&r.health, "flip"), [Healthy, Unhealthy, Healthy]);
        assert_eq!(
            history(&r.health, "moved"),
            [Healthy],
            "3xx passes, reported once"
        );
        assert_eq!(history(&r.health, "down"), [Unhealthy]);
        // After the first results, only `flip` changed, so only `flip` is
        // in the later reports.
        for report in &r.health[settled..] {
            assert_eq!(report.keys().collect::<Vec<_>>(), ["flip"], "{report:?}");
        }
        assert!(
            r.health
                .iter()
                .all(|m| m.values().all(|h| *h != Initializing))
        );
    });
}
