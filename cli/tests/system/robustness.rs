//! Bad input, a database outage, concurrent migrations, health and metrics.

use devmesh_tests::{TestPrimary, assert_error, fresh_database};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn bad_requests_get_json_errors_never_bare_failures() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}/api/v2{path}", p.url);
    let to_pair = |r: reqwest::Response| async move {
        let s = r.status();
        (
            s,
            r.json::<serde_json::Value>()
                .await
                .expect("JSON error body"),
        )
    };

    let big = "x".repeat(2 * 1024 * 1024);
    let r = http
        .post(url("/users/login"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error(
        &to_pair(r).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too large",
    );

    let r = http
        .post(url("/users/login"))
        .header("content-type", "application/json")
        .body("{\"email\":")
        .send()
        .await
        .unwrap();
    assert_error(&to_pair(r).await, StatusCode::BAD_REQUEST, "not valid");

    let r = http
        .post(url("/users/login"))
        .body("email=a")
        .send()
        .await
        .unwrap();
    assert_error(
        &to_pair(r).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "JSON",
    );

    let r = http.get(url("/no/such/route")).send().await.unwrap();
    assert!(
        r.headers().contains_key("x-request-id"),
        "every response carries a request id"
    );
    assert_error(&to_pair(r).await, StatusCode::NOT_FOUND, "No such route");

    let r = http.delete(url("/buildinfo")).send().await.unwrap();
    assert_error(&to_pair(r).await, StatusCode::METHOD_NOT_ALLOWED, "method");

    assert_error(
        &owner
            .post("/users/login", json!({"email": 5, "password": []}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid type",
    );
    assert_error(
        &owner.get("/workspaces/not-a-uuid").await,
        StatusCode::NOT_FOUND,
        "No such workspace",
    );
    assert_error(
        &owner.get("/users/%ff%fe").await,
        StatusCode::BAD_REQUEST,
        "path is not valid",
    );
    assert_error(
        &owner.get("/audit?limit=%ff").await,
        StatusCode::BAD_REQUEST,
        "integer",
    );

    // A request id sent by a proxy is kept.
    let r = http
        .get(url("/buildinfo"))
        .header("x-request-id", "trace-me")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me");
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["version"],
        env!("CARGO_PKG_VERSION")
    );
}

#[tokio::test]
async fn health_and_metrics_report_the_server() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    owner.get("/users/me").await;
    owner.get("/users/me").await;
    let health = reqwest::get(format!("{}/healthz", p.url)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let metrics = reqwest::get(format!("{}/metrics", p.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "devmesh_http_requests_total{method=\"GET\",route=\"/api/v2/users/me\",status=\"200\"} 2",
        "devmesh_logins_total{result=\"success\"} 1",
        "devmesh_api_key_checks_total{result=\"cache_hit\"}",
        "devmesh_http_request_duration_seconds_bucket",
        "devmesh_build_info{version=",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn a_database_outage_is_a_503_and_the_server_recovers_by_itself() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let mut admin = p.db.connect_admin().await;
    // Refuse new connections and kill the pool's existing ones.
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS false",
        p.db.name
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&p.db.name)
        .execute(&mut admin)
        .await
        .unwrap();

    // Cached keys still authenticate; the query behind the request fails cleanly.
    let mut saw_503 = false;
    for _ in 0..3 {
        let got = owner.get("/templates").await;
        assert_ne!(got.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", got.1);
        if got.0 == StatusCode::SERVICE_UNAVAILABLE {
            assert_error(
                &got,
                StatusCode::SERVICE_UNAVAILABLE,
                "database is unavailable",
            );
            saw_503 = true;
            break;
        }
    }
    assert!(saw_503, "the outage was not reported as 503");
    assert_eq!(
        reqwest::get(format!("{}/healthz", p.url))
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let metrics = reqwest::get(format!("{}/metrics", p.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("devmesh_db_unavailable_errors_total"),
        "{metrics}"
    );

    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        p.db.name
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    crate::support::eventually(15, "recovery after the database returns", || {
        let owner = owner.clone();
        async move { (owner.get("/templates").await.0 == StatusCode::OK).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn two_primaries_migrating_the_same_database_at_once_both_start() {
    let db = fresh_database().await;
    let (a, b) = tokio::join!(
        TestPrimary::start_on(db.clone()),
        TestPrimary::start_on(db.clone())
    );
    let owner = a.owner().await;
    // Both serve the same state.
    let other = b.anon().login("owner@example.com", "owner-password").await;
    assert_eq!(other.get("/users/me").await.1["username"], "owner");
    assert_eq!(owner.get("/users/me").await.0, StatusCode::OK);
    let mut conn = db.connect().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        applied as usize,
        devmesh_primary::db::MIGRATOR.iter().count()
    );
    a.stop().await;
    b.stop().await;
}
