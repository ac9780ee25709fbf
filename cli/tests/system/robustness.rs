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
        "limit:",
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

/// A Unix-socket proxy in front of the test cluster's socket that can
/// freeze: connections stay open and nothing moves, as with a database
/// whose host stopped (SIGSTOP, a hung disk, a partition).
struct FreezingProxy {
    dir: tempfile::TempDir,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl FreezingProxy {
    /// Listens where `url`'s socket is, in a directory of its own; the URL
    /// to give the primary instead.
    async fn start(url: &str) -> (Self, String) {
        let (head, host) = url.split_once("?host=").expect("a Unix-socket URL");
        let real_dir = host.replace("%2F", "/").replace("%2f", "/");
        let port = head.rsplit(':').next().unwrap().split('/').next().unwrap();
        let socket_name = format!(".s.PGSQL.{port}");
        let real = std::path::Path::new(&real_dir).join(&socket_name);
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.path().join(&socket_name)).unwrap();
        let frozen = tokio::sync::watch::Sender::new(false);
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (real, f) = (real.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::UnixStream::connect(&real).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pump =
                        |mut from: tokio::net::unix::OwnedReadHalf,
                         mut to: tokio::net::unix::OwnedWriteHalf,
                         f: tokio::sync::watch::Sender<bool>| async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = [0u8; 8192];
                            loop {
                                let Ok(n) = from.read(&mut buf).await else {
                                    return;
                                };
                                if n == 0 {
                                    return;
                                }
                                // Frozen: hold what came until thawed.
                                if f.subscribe().wait_for(|frozen| !frozen).await.is_err() {
                                    return;
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                    let up = pump(cr, sw, f.clone());
                    let down = pump(sr, cw, f);
                    tokio::join!(up, down);
                });
            }
        });
        let proxied = format!(
            "{head}?host={}",
            dir.path().to_str().unwrap().replace('/', "%2F")
        );
        (Self { dir, frozen }, proxied)
    }
}

#[tokio::test]
async fn health_checks_answer_within_about_a_second_whatever_the_database_does() {
    let db = devmesh_tests::fresh_database().await;
    let (proxy, url) = FreezingProxy::start(db.url().expose()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = crate::support::ServerProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[("DEVMESH_POSTGRES_URL", url.as_str())],
        dir.path(),
    )
    .await;
    let get = |path: &'static str| {
        let url = format!("{}{path}", server.url);
        async move {
            let started = tokio::time::Instant::now();
            let resp = reqwest::Client::new()
                .get(url)
                .timeout(std::time::Duration::from_secs(10))
                .send()
                .await
                .expect("an answer, not a hang");
            let status = resp.status();
            (status, resp.text().await.unwrap(), started.elapsed())
        }
    };
    for path in ["/healthz", "/readyz", "/livez"] {
        let (status, body, _) = get(path).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{path}: {body}");
    }
    // The database hangs: readiness says so within about a second, with
    // the reason; liveness still says the process is fine.
    proxy.frozen.send_replace(true);
    for path in ["/healthz", "/readyz"] {
        let (status, body, took) = get(path).await;
        assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(
            body.contains("did not answer") || body.contains("unavailable"),
            "{body}"
        );
        assert!(
            took < std::time::Duration::from_secs(3),
            "{path} took {took:?}"
        );
    }
    let (status, _, took) = get("/livez").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    // It answers again once the database does.
    proxy.frozen.send_replace(false);
    crate::support::eventually(30, "ready again", || async {
        (get("/readyz").await.0 == reqwest::StatusCode::OK).then_some(())
    })
    .await;
    drop(proxy.dir);
}

/// The embedded cluster's postmaster PID, from its `postmaster.pid`.
fn postmaster_pid(data: &std::path::Path) -> i32 {
    let pid_file = std::fs::read_to_string(data.join("postgres/postmaster.pid")).unwrap();
    pid_file.lines().next().unwrap().trim().parse().unwrap()
}

/// A primary on a fresh embedded cluster with its owner signed in.
async fn embedded_primary(
    data: &std::path::Path,
    cfg: &std::path::Path,
) -> crate::support::ServerProcess {
    use crate::support::{ServerProcess, first_login};
    let server = ServerProcess::start(&["--data-dir", data.to_str().unwrap()], &[], cfg).await;
    first_login(cfg, &server.url).await;
    server
}

#[tokio::test]
async fn a_killed_embedded_database_is_started_again_with_every_committed_write() {
    use crate::support::{cli, eventually, metric, ok};
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let data = devmesh_tests::shared_tempdir("devmesh-data-");
    let config = tempfile::tempdir().unwrap();
    let cfg = config.path();
    let server = embedded_primary(&data, cfg).await;
    ok(&cli(cfg, &["keys", "create", "--name", "before-the-crash"]).await);

    let killed = postmaster_pid(&data);
    kill(Pid::from_raw(killed), Signal::SIGKILL).unwrap();

    // The API answers again by itself, with what was committed before.
    let keys = eventually(
        60,
        "the API to answer after the database's crash",
        || async {
            let out = cli(cfg, &["keys", "list"]).await;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    assert!(keys.contains("before-the-crash"), "{keys}");
    ok(&cli(cfg, &["keys", "create", "--name", "after-the-crash"]).await);
    assert_ne!(postmaster_pid(&data), killed, "a new postmaster runs");
    assert_eq!(
        metric(&server.url, "devmesh_embedded_postgres_restarts_total").await,
        1
    );
    assert_eq!(metric(&server.url, "devmesh_embedded_postgres_up").await, 1);
    let log = std::fs::read_to_string(server.log()).unwrap();
    assert!(
        log.contains("the embedded PostgreSQL died; starting it again")
            && log.contains("the embedded PostgreSQL is back"),
        "{log}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_primary_whose_embedded_database_cannot_come_back_exits_non_zero_saying_why() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let data = devmesh_tests::shared_tempdir("devmesh-data-");
    let config = tempfile::tempdir().unwrap();
    let mut server = embedded_primary(&data, config.path()).await;
    // A setting PostgreSQL refuses at start-up, as a botched edit would be.
    let conf = data.join("postgres/postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nshared_buffers = 'plenty'\n");
    std::fs::write(&conf, text).unwrap();

    kill(Pid::from_raw(postmaster_pid(&data)), Signal::SIGKILL).unwrap();
    let status = server
        .process
        .wait(std::time::Duration::from_secs(60))
        .await
        .expect("the primary exits once its database cannot come back");
    assert!(!status.success(), "{status}");
    let log = std::fs::read_to_string(server.log()).unwrap();
    assert!(
        log.contains("could not be started again") && log.contains("shared_buffers"),
        "{log}"
    );
}

/// A request whose client goes away while its transaction's `BEGIN` is in
/// flight is cancelled there. sqlx (0.8 and 0.9) then hands the connection
/// back to the pool still inside that transaction, and every later write
/// on it is acknowledged and never committed. The primary's pool must not
/// lend such a connection again.
#[tokio::test]
async fn a_request_cancelled_during_begin_does_not_swallow_later_writes() {
    use futures_util::FutureExt;
    let db = fresh_database().await;
    let counter = prometheus_client::metrics::counter::Counter::default();
    let pool = devmesh_primary::db::connect(db.options(), counter.clone())
        .await
        .unwrap();
    sqlx::query("CREATE TABLE acked (n int)")
        .execute(&pool)
        .await
        .unwrap();
    // Connections that finished their work are lent again, not replaced.
    let mut sessions = std::collections::HashSet::new();
    for _ in 0..20 {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
        sessions.insert(pid);
        while pool.num_idle() < pool.size() as usize {
            tokio::task::yield_now().await;
        }
    }
    // (The pool keeps one connection open besides the one in use.)
    assert!(
        sessions.len() <= 2,
        "clean connections were closed: {sessions:?}"
    );
    assert_eq!(counter.get(), 0);
    let (mut inserted, mut cancelled) = (0i64, 0u64);
    while cancelled < 5 && inserted < 100 {
        // Poll the BEGIN once: it is sent, its answer (usually) not yet
        // read; then drop it, as hyper drops a handler whose client
        // disconnected. (When the answer was already there, the BEGIN
        // completed and its transaction rolls back as it should.)
        let conn = pool.acquire().await.unwrap();
        if sqlx::Transaction::begin(conn, None)
            .now_or_never()
            .is_none()
        {
            cancelled += 1;
        }
        // Wait for the connection to be back (or closed) before writing.
        while pool.num_idle() < pool.size() as usize {
            tokio::task::yield_now().await;
        }
        sqlx::query("INSERT INTO acked VALUES ($1)")
            .bind(inserted)
            .execute(&pool)
            .await
            .unwrap();
        inserted += 1;
    }
    assert_eq!(cancelled, 5, "BEGINs cancelled in flight");
    // Another session sees only what was committed.
    let mut other = db.connect().await;
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM acked")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(
        committed, inserted,
        "acknowledged inserts were never committed"
    );
    assert_eq!(
        counter.get(),
        cancelled,
        "each stale transaction counted once"
    );
}
