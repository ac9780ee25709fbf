//! Regional edges carrying app traffic: a primary and two edges (`eu`,
//! `ap`) on loopback, an agent attached to each edge's relay, and requests
//! through either edge, straight down a tunnel or across the QUIC mesh.

use std::time::Duration;

use devmesh_shared::signing::{AppTarget, AppToken, SigningKey};
use devmesh_tests::upstream::Upstream;
use devmesh_tests::{Api, fresh_database};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{
    AgentProcess, EdgeProcess, ServerProcess, app_client, create_edge, eventually,
};

/// A primary, edges `eu` and `ap` (both also serving `*.global.localhost`),
/// and alice's workspaces `weu` (agent pinned to `eu`) and `wap` (pinned to
/// `ap`), each with an owner-only `echo` app and a public `pub` app.
pub(crate) struct Mesh {
    pub(crate) dir: tempfile::TempDir,
    db_url: String,
    pub(crate) primary: Option<ServerProcess>,
    pub(crate) primary_port: u16,
    pub(crate) owner: Api,
    pub(crate) alice: Api,
    _upstream: Upstream,
    pub(crate) eu: EdgeProcess,
    ap: Option<EdgeProcess>,
    workspaces: Vec<Value>,
    _agents: Vec<AgentProcess>,
}

impl Mesh {
    pub(crate) async fn start() -> Self {
        let db = fresh_database().await;
        let dir = tempfile::tempdir().unwrap();
        let db_url = db.url().expose().to_owned();
        let primary = ServerProcess::start(
            &["--wildcard-access-url", "*.apps.localhost"],
            &[("DEVMESH_POSTGRES_URL", &db_url)],
            dir.path(),
        )
        .await;
        let primary_port: u16 = primary.url.rsplit(':').next().unwrap().parse().unwrap();
        let anon = Api::new(&primary.url, None);
        anon.post(
            "/users/first",
            json!({"email": "o@example.com", "username": "owner", "password": "owner-password"}),
        )
        .await;
        let owner = anon.login("owner", "owner-password").await;
        for u in ["alice", "bob"] {
            let (s, _) = owner
                .post("/users", json!({"email": format!("{u}@example.com"), "username": u, "password": format!("{u}-password")}))
                .await;
            assert_eq!(s, StatusCode::CREATED);
        }
        let alice = anon.login("alice", "alice-password").await;
        let upstream = Upstream::start().await;
        let up = upstream.port();
        let (s, t) = owner
            .post(
                "/templates",
                json!({"name": "byo", "definition": {"agents": [{"name": "main", "apps": [
                    {"slug": "echo", "port": up},
                    {"slug": "pub", "port": up, "sharing_level": "public"}
                ]}]}}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");

        let global = ["--global-wildcard-access-url", "*.global.localhost"];
        let mut edges = Vec::new();
        for region in ["eu", "ap"] {
            let (edge, _) = create_edge(&owner, &primary.url, region, &global, dir.path()).await;
            edges.push(edge);
        }
        for region in ["eu", "ap"] {
            eventually(30, &format!("region {region} healthy"), || {
                let owner = owner.clone();
                async move {
                    let (_, r) = owner.get("/regions").await;
                    r["regions"]
                        .as_array()?
                        .iter()
                        .any(|r| r["name"] == region && r["healthy"] == true)
                        .then_some(())
                }
            })
            .await;
        }
        // The region turns healthy when the primary records a registration;
        // the edge starts its relay a moment later, when it reads the answer.
        // An agent that probed it in between would settle elsewhere.
        for edge in &edges {
            eventually(30, "the edge's relay to start", || async {
                let r: Value = reqwest::get(format!("{}/healthz-report", edge.url))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                r["edge_name"].is_string().then_some(())
            })
            .await;
        }
        let mut workspaces = Vec::new();
        let mut agents = Vec::new();
        for (name, region) in [("weu", "eu"), ("wap", "ap")] {
            let (s, created) = alice
                .post("/workspaces", json!({"name": name, "template": "byo"}))
                .await;
            assert_eq!(s, StatusCode::CREATED, "{created}");
            let token = created["agent_tokens"][0]["token"].as_str().unwrap();
            agents.push(AgentProcess::start_with(
                &primary.url,
                token,
                dir.path(),
                &[("DEVMESH_RELAY_REGION", region)],
            ));
            workspaces.push(created["workspace"].clone());
        }
        let ap = edges.pop();
        let eu = edges.pop().unwrap();
        let mesh = Self {
            dir,
            db_url,
            primary: Some(primary),
            primary_port,
            owner,
            alice,
            _upstream: upstream,
            eu,
            ap,
            workspaces,
            _agents: agents,
        };
        for (ws, region) in [("weu", "eu"), ("wap", "ap")] {
            mesh.wait_attached(ws, region).await;
        }
        mesh
    }

    fn ap(&self) -> &EdgeProcess {
        self.ap.as_ref().expect("the ap edge runs")
    }

    /// The name of the primary's database.
    pub(crate) fn db_name(&self) -> String {
        let without_query = self.db_url.split('?').next().unwrap();
        without_query.rsplit('/').next().unwrap().to_owned()
    }

    /// Where the primary says the workspace's agent is attached (its relay's region).
    pub(crate) async fn attached_region(&self, workspace: &str) -> Option<String> {
        let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&self.db_url)
            .await
            .ok()?;
        sqlx::query_scalar(
            "SELECT a.relay FROM agent_attachments a JOIN workspace_agents g ON g.id = a.agent_id
             JOIN workspaces w ON w.id = g.workspace_id WHERE w.name = $1",
        )
        .bind(workspace)
        .fetch_optional(&mut db)
        .await
        .ok()?
    }

    /// Waits until the primary says the workspace's agent is attached in `region`.
    async fn wait_attached(&self, workspace: &str, region: &str) {
        let edge = if region == "eu" { &self.eu } else { self.ap() };
        let log = edge.process.log.clone();
        eventually(
            30,
            &format!("{workspace}'s agent attached in {region} ({log:?})"),
            || async {
                (self.attached_region(workspace).await.as_deref() == Some(region)).then_some(())
            },
        )
        .await;
    }

    /// The URL of `label` on `edge`'s regional wildcard.
    pub(crate) fn url(edge: &EdgeProcess, region: &str, label: &str, path: &str) -> String {
        format!(
            "http://{label}.{region}.apps.localhost:{}{path}",
            edge.port()
        )
    }

    pub(crate) async fn get(&self, url: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = app_client(false).get(url);
        if let Some(k) = key {
            req = req.header("Devmesh-Session-Token", k);
        }
        req.send().await.unwrap()
    }

    pub(crate) fn alice_key(&self) -> String {
        self.alice.token.clone().unwrap()
    }

    /// Requests the primary served, except edges' heartbeats and event
    /// streams and the metrics scrape itself.
    async fn primary_requests(&self) -> u64 {
        let base = format!("http://127.0.0.1:{}", self.primary_port);
        crate::support::metric_where(&base, |l| {
            l.starts_with("devmesh_http_requests_total{")
                && ![
                    "/api/v2/edges/me/register",
                    "/api/v2/edges/me/events",
                    "/metrics",
                ]
                .iter()
                .any(|r| l.contains(&format!("route=\"{r}\"")))
        })
        .await
    }
}

/// A metric's value from an edge (summing its label sets).
async fn edge_metric(edge: &EdgeProcess, name_and_labels: &str) -> u64 {
    crate::support::metric(&edge.url, name_and_labels).await
}

#[tokio::test]
async fn apps_open_through_either_edge_down_a_tunnel_or_across_the_mesh() {
    let m = Mesh::start().await;
    let key = m.alice_key();
    // Users see where each agent is attached.
    for (i, region) in [(0, "eu"), (1, "ap")] {
        let id = m.workspaces[i]["id"].as_str().unwrap();
        let (_, ws) = m.alice.get(&format!("/workspaces/{id}")).await;
        assert_eq!(ws["agents"][0]["relay_region"], region, "{ws}");
    }
    // Every edge reaches every agent: its own directly, the other's over the mesh.
    for (edge, region) in [(&m.eu, "eu"), (m.ap(), "ap")] {
        for ws in ["weu", "wap"] {
            let resp = m
                .get(
                    &Mesh::url(
                        edge,
                        region,
                        &format!("echo--{ws}--alice"),
                        "/echo?from=edge",
                    ),
                    Some(&key),
                )
                .await;
            assert_eq!(resp.status(), StatusCode::OK, "{ws} via {region}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["query"], "from=edge");
            assert!(body["headers"].get("devmesh-session-token").is_none());
            assert_eq!(
                body["headers"]["x-forwarded-host"],
                format!("echo--{ws}--alice.{region}.apps.localhost:{}", edge.port())
            );
        }
    }
    assert!(edge_metric(&m.eu, "devmesh_edge_streams_total{path=\"local\"}").await > 0);
    assert!(edge_metric(&m.eu, "devmesh_edge_streams_total{path=\"mesh_out\"}").await > 0);
    assert!(edge_metric(m.ap(), "devmesh_edge_streams_total{path=\"mesh_in\"}").await > 0);

    // The global wildcard works on both edges, and a public app needs no key.
    for edge in [&m.eu, m.ap()] {
        let url = format!(
            "http://pub--wap--alice.global.localhost:{}/echo",
            edge.port()
        );
        assert_eq!(m.get(&url, None).await.status(), StatusCode::OK);
        let url = format!(
            "http://echo--weu--alice.global.localhost:{}/echo",
            edge.port()
        );
        assert_eq!(m.get(&url, Some(&key)).await.status(), StatusCode::OK);
        assert_eq!(m.get(&url, None).await.status(), StatusCode::UNAUTHORIZED);
    }

    // A WebSocket across the mesh (eu edge → ap agent).
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", m.eu.port()))
        .await
        .unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://echo--wap--alice.eu.apps.localhost:{}/ws", m.eu.port()),
    )
    .unwrap();
    req.headers_mut()
        .insert("Devmesh-Session-Token", key.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("websocket upgrade across the mesh");
    for i in 0..3 {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(format!(
                "hi {i}"
            )))
            .await
            .unwrap();
        let msg = socket.next().await.unwrap().unwrap();
        assert_eq!(msg.into_text().unwrap().as_str(), format!("hi {i}"));
    }
    socket.close(None).await.unwrap();

    // Steady state: after the first authorisation, requests through the eu
    // edge for the eu agent never reach the primary.
    let url = Mesh::url(&m.eu, "eu", "echo--weu--alice", "/echo");
    assert_eq!(m.get(&url, Some(&key)).await.status(), StatusCode::OK);
    let before = m.primary_requests().await;
    let client = app_client(false);
    for _ in 0..300 {
        let resp = client
            .get(&url)
            .header("Devmesh-Session-Token", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.bytes().await.unwrap();
    }
    assert_eq!(
        m.primary_requests().await,
        before,
        "the primary served none of them"
    );

    // Refused at the edge: a forged token, a token for another app host,
    // a hostname naming the wrong owner, another user's key.
    let (_, alice_me) = m.alice.get("/users/me").await;
    let ws = &m.workspaces[0];
    let token_cookie = format!(
        "devmesh_app_token_{}",
        &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            b"*.eu.apps.localhost"
        ))[..8]
    );
    let now = chrono::Utc::now().timestamp();
    let claims = |host: String| AppToken {
        user_id: Some(alice_me["id"].as_str().unwrap().parse().unwrap()),
        workspace_id: ws["id"].as_str().unwrap().parse().unwrap(),
        agent_id: ws["agents"][0]["id"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .unwrap_or_default(),
        target: AppTarget::Slug("echo".into()),
        host,
        sharing_level: devmesh_shared::api::SharingLevel::Owner,
        key_id: None,
        port: 1,
        https: false,
        base_path: "/".into(),
        issued_at_ms: now * 1000,
        exp: now + 600,
    };
    let host = format!("echo--weu--alice.eu.apps.localhost:{}", m.eu.port());
    let forged = SigningKey::generate("attacker").sign(&claims(host.clone()));
    let with_cookie = |cookie: String| {
        app_client(false)
            .get(&url)
            .header("Cookie", format!("{token_cookie}={cookie}"))
            .send()
    };
    assert_eq!(
        with_cookie(forged).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    // A genuine token, minted for another host, from a real response.
    let other = m
        .get(
            &Mesh::url(&m.eu, "eu", "pub--weu--alice", "/echo"),
            Some(&key),
        )
        .await;
    let minted = other
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|v| {
            v.to_str()
                .ok()?
                .strip_prefix(&format!("{token_cookie}="))?
                .split(';')
                .next()
                .map(str::to_owned)
        })
        .expect("an app token cookie");
    assert_eq!(
        with_cookie(minted).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let wrong_owner = Mesh::url(&m.eu, "eu", "echo--weu--bob", "/echo");
    assert_eq!(
        m.get(&wrong_owner, Some(&key)).await.status(),
        StatusCode::NOT_FOUND
    );
    let bob = Api::new(&m.alice.base, None)
        .login("bob", "bob-password")
        .await;
    assert_eq!(
        m.get(&url, bob.token.as_deref()).await.status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn revocations_reach_every_edge_within_a_second() {
    let m = Mesh::start().await;
    let key = m.alice_key();
    let urls = [
        Mesh::url(&m.eu, "eu", "echo--wap--alice", "/echo"),
        Mesh::url(m.ap(), "ap", "echo--wap--alice", "/echo"),
        Mesh::url(&m.eu, "eu", "echo--weu--alice", "/echo"),
        Mesh::url(m.ap(), "ap", "echo--weu--alice", "/echo"),
    ];
    // Warm every edge's decisions, and keep the token cookies a browser would.
    let mut cookies = Vec::new();
    for url in &urls {
        let resp = m.get(url, Some(&key)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        let cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .find_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
            .expect("a token cookie");
        cookies.push(cookie);
    }
    let with_cookie = |url: &str, cookie: &str| {
        app_client(false)
            .get(url)
            .header("Cookie", cookie.to_owned())
            .send()
    };
    for (url, cookie) in urls.iter().zip(&cookies) {
        assert_eq!(
            with_cookie(url, cookie).await.unwrap().status(),
            StatusCode::OK
        );
    }

    // Stopping `wap` cuts its token cookies and cached decisions on both edges.
    let wap = m.workspaces[1]["id"].as_str().unwrap();
    let (s, _) = m
        .alice
        .post(
            &format!("/workspaces/{wap}/builds"),
            json!({"transition": "stop"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    refused_within_a_second(
        &m,
        urls[..2].iter().zip(&cookies[..2]),
        &key,
        (StatusCode::UNAUTHORIZED, StatusCode::SERVICE_UNAVAILABLE),
        "the stop",
    )
    .await;
    // The other workspace is untouched.
    assert_eq!(m.get(&urls[2], Some(&key)).await.status(), StatusCode::OK);

    // Deleting an API key cuts it off on every edge, and the app tokens
    // minted from it, while the user's other keys keep working.
    let (s, created) = m
        .alice
        .post("/users/me/keys", json!({"name": "script"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let script_key = created["key"].as_str().unwrap().to_owned();
    let mut script_cookies = Vec::new();
    for url in &urls[2..] {
        let resp = m.get(url, Some(&script_key)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        script_cookies.push(
            resp.headers()
                .get_all("set-cookie")
                .iter()
                .find_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
                .expect("a token cookie"),
        );
    }
    let (s, _) = m
        .alice
        .delete(&format!(
            "/users/me/keys/{}",
            created["id"].as_str().unwrap()
        ))
        .await;
    assert!(s.is_success(), "{s}");
    refused_within_a_second(
        &m,
        urls[2..].iter().zip(&script_cookies),
        &script_key,
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED),
        "the key was deleted",
    )
    .await;
    for url in &urls[2..] {
        assert_eq!(m.get(url, Some(&key)).await.status(), StatusCode::OK);
    }

    // Signing out revokes every app token of the user on every edge.
    let (s, _) = m.alice.post("/users/logout", json!({})).await;
    assert!(s.is_success(), "{s}");
    refused_within_a_second(
        &m,
        urls[2..].iter().zip(&cookies[2..]),
        &key,
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED),
        "sign-out",
    )
    .await;
}

#[tokio::test]
async fn edges_keep_serving_open_sessions_while_the_primary_is_down() {
    let mut m = Mesh::start().await;
    let key = m.alice_key();
    let urls = [
        Mesh::url(&m.eu, "eu", "echo--weu--alice", "/echo"),
        Mesh::url(&m.eu, "eu", "echo--wap--alice", "/echo"),
        Mesh::url(m.ap(), "ap", "echo--wap--alice", "/echo"),
        Mesh::url(m.ap(), "ap", "echo--weu--alice", "/echo"),
    ];
    for url in &urls {
        assert_eq!(
            m.get(url, Some(&key)).await.status(),
            StatusCode::OK,
            "{url}"
        );
    }
    let bob = Api::new(&m.alice.base, None)
        .login("bob", "bob-password")
        .await;

    m.primary.take().unwrap().crash().await;
    for url in &urls {
        assert_eq!(
            m.get(url, Some(&key)).await.status(),
            StatusCode::OK,
            "{url} with the primary down"
        );
    }
    // A key the edge has never seen needs the primary: a clear 503.
    let resp = m.get(&urls[0], bob.token.as_deref()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    primary_reachable_says(&m.eu, false).await;
    assert_eq!(
        edge_metric(&m.eu, "devmesh_edge_primary_reachable").await,
        0
    );

    // The primary comes back on its address; the edges recover by themselves.
    let primary = ServerProcess::start(
        &[
            "--wildcard-access-url",
            "*.apps.localhost",
            "--http-address",
            &format!("127.0.0.1:{}", m.primary_port),
        ],
        &[("DEVMESH_POSTGRES_URL", &m.db_url)],
        m.dir.path(),
    )
    .await;
    m.primary = Some(primary);
    primary_reachable_says(&m.eu, true).await;
    let resp = m.get(&urls[0], bob.token.as_deref()).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "bob is decided again");
    let _ = &m.owner;
}

/// Waits until the edge's `/healthz-report` says the primary is (or is
/// not) reachable.
async fn primary_reachable_says(edge: &EdgeProcess, reachable: bool) {
    eventually(30, &format!("primary_reachable = {reachable}"), || async {
        let r: Value = reqwest::get(format!("{}/healthz-report", edge.url))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (r["primary_reachable"] == reachable).then_some(())
    })
    .await;
}

#[tokio::test]
async fn agents_of_a_dead_edge_re_attach_elsewhere_and_apps_work_again() {
    let mut m = Mesh::start().await;
    let key = m.alice_key();
    let url = Mesh::url(&m.eu, "eu", "echo--wap--alice", "/echo");
    assert_eq!(m.get(&url, Some(&key)).await.status(), StatusCode::OK);

    m.ap.take().unwrap().kill().await;
    let killed = Instant::now();
    let back = eventually(60, "the app answers again through eu", || async {
        (m.get(&url, Some(&key)).await.status() == StatusCode::OK).then(|| killed.elapsed())
    })
    .await;
    println!("re-attached and serving {back:?} after the ap edge was killed");
    assert!(back < Duration::from_secs(30), "took {back:?}");
}

/// Polls each (url, token cookie) pair until the cookie gets `expected.0`
/// and `key` gets `expected.1`, failing if that takes a second or more
/// from now.
async fn refused_within_a_second<'a>(
    m: &Mesh,
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
    key: &str,
    expected: (StatusCode, StatusCode),
    what: &str,
) {
    let since = Instant::now();
    for (url, cookie) in pairs {
        loop {
            let by_cookie = app_client(false)
                .get(url)
                .header("Cookie", cookie.as_str())
                .send()
                .await
                .unwrap()
                .status();
            let by_key = m.get(url, Some(key)).await.status();
            if (by_cookie, by_key) == expected {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(1),
                "{url} still answers {by_cookie}/{by_key} a second after {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the eu edge answers a JSON client asking for `label` with `key`:
/// status, denial and message.
async fn refusal(m: &Mesh, label: &str, key: Option<String>) -> (StatusCode, String, String) {
    let r = m
        .get(&Mesh::url(&m.eu, "eu", label, "/"), key.as_deref())
        .await;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or_default();
    let field = |f: &str| body[f].as_str().unwrap_or("").to_owned();
    (status, field("denial"), field("message"))
}

#[tokio::test]
async fn an_edge_shows_each_refusal_the_primary_names_even_with_its_database_down() {
    let m = Mesh::start().await;
    let anon = Api::new(&format!("http://127.0.0.1:{}", m.primary_port), None);
    let bob = anon.login("bob", "bob-password").await;
    let (s, ws) = m
        .alice
        .post("/workspaces", json!({"name": "woff", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ws}");
    let woff = ws["workspace"]["id"].as_str().unwrap().to_owned();
    let alice = m.alice_key();
    let expect =
        |got: (StatusCode, String, String), status: StatusCode, denial: &str, title: &str| {
            assert_eq!((got.0, got.1.as_str()), (status, denial), "{}", got.2);
            assert!(got.2.starts_with(title), "{}", got.2);
        };
    expect(
        refusal(&m, "echo--nosuch--alice", Some(alice.clone())).await,
        StatusCode::NOT_FOUND,
        "not_found",
        "App not found",
    );
    expect(
        refusal(&m, "echo--weu--alice", bob.token.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        "Not authorized",
    );
    expect(
        refusal(&m, "echo--weu--alice", None).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Not signed in",
    );
    expect(
        refusal(&m, "echo--woff--alice", Some(alice.clone())).await,
        StatusCode::BAD_GATEWAY,
        "agent_not_connected",
        "Agent not connected",
    );
    let (s, b) = m
        .alice
        .post(
            &format!("/workspaces/{woff}/builds"),
            json!({"transition": "stop"}),
        )
        .await;
    assert!(s.is_success(), "{b}");
    // Decisions are cached at the edge; the stop revokes them.
    eventually(10, "the stop to reach the edge", || async {
        let got = refusal(&m, "pub--woff--alice", Some(alice.clone())).await;
        (got.1 == "stopped").then_some(())
    })
    .await;
    expect(
        refusal(&m, "pub--woff--alice", Some(alice.clone())).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "stopped",
        "Workspace stopped",
    );

    // The primary's database goes away: a fresh decision is "unavailable",
    // never "stopped" or "not connected".
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect_with(
        &devmesh_tests::cluster().connect_options("postgres"),
    )
    .await
    .unwrap();
    let db = m.db_name();
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&mut admin)
        .await
        .unwrap();
    let owner_key = m.owner.token.clone();
    expect(
        refusal(&m, "pub--wap--alice", owner_key).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Temporarily unavailable",
    );
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Streams an edge sent across the mesh.
const MESH_OUT: &str = "devmesh_edge_streams_total{path=\"mesh_out\"}";

/// The audit records of `action` for sessions through `region`.
async fn audited(owner: &Api, action: &str, region: &str) -> Vec<Value> {
    let (_, log) = owner.get(&format!("/audit?action={action}")).await;
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["details"]["region"] == region)
        .cloned()
        .collect()
}

#[tokio::test]
async fn ssh_goes_through_the_nearest_or_the_pinned_region_across_the_mesh_and_fails_over() {
    let mut m = Mesh::start().await;
    let alice = crate::support::CliAs {
        config: m.dir.path().join("alice-cli"),
        url: m.primary.as_ref().unwrap().url.clone(),
        token: m.alice_key(),
    };
    // Pinned to eu: weu's agent is attached there, wap's across the mesh
    // in ap; both answer with their exit status.
    let before = edge_metric(&m.eu, MESH_OUT).await;
    for ws in ["weu", "wap"] {
        let out = alice
            .run(&[
                "ssh",
                "--region",
                "eu",
                ws,
                "--",
                &format!("echo in {ws}; exit 5"),
            ])
            .await;
        assert_eq!(out.status.code(), Some(5), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("in {ws}")
        );
    }
    assert_eq!(
        edge_metric(&m.eu, MESH_OUT).await,
        before + 1,
        "only wap's session crossed the mesh"
    );
    // Each session is audited as going through eu, and its end with what it carried.
    let ended = eventually(10, "both ends recorded", || async {
        let ends = audited(&m.owner, "ssh_end", "eu").await;
        (ends.len() == 2).then_some(ends)
    })
    .await;
    assert_eq!(audited(&m.owner, "ssh", "eu").await.len(), 2);
    for end in &ended {
        assert_eq!(end["username"], "alice", "{end}");
        assert!(
            end["details"]["bytes_down"].as_u64().unwrap() > 1000,
            "{end}"
        );
    }
    // Another edge cannot end eu's sessions (nor forge their records), nor
    // open a shell with a made-up key.
    let (status, rogue) = m
        .owner
        .post(
            "/edges",
            json!({"name": "rogue", "access_url": "http://127.0.0.1:9",
                   "wildcard_hostname": "*.rogue.apps.localhost"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rogue}");
    let as_rogue = |endpoint: &str, body: Value| {
        reqwest::Client::new()
            .post(format!("{}/api/v2/edges/me/{endpoint}", alice.url))
            .header(
                devmesh_shared::api::EDGE_TOKEN_HEADER,
                rogue["edge_token"].as_str().unwrap(),
            )
            .json(&body)
            .send()
    };
    let theirs = &ended[0]["details"]["session"];
    let resp = as_rogue(
        "shell-ended",
        json!({"session_id": theirs, "bytes_up": 0, "bytes_down": 0}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = as_rogue(
        "shell-access",
        json!({"agent_id": m.workspaces[0]["agents"][0]["id"], "key": "abcdefghij-forged", "client_ip": "1.2.3.4"}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(audited(&m.owner, "ssh_end", "rogue").await.len(), 0);
    assert_eq!(audited(&m.owner, "ssh", "rogue").await.len(), 0);

    // An unknown region is refused, naming the ones there are.
    let out = alice
        .run(&["ssh", "--region", "mars", "weu", "--", "true"])
        .await;
    assert!(!out.status.success());
    assert!(
        crate::support::stderr(&out).contains("primary, ap, eu"),
        "{out:?}"
    );

    // Unpinned: every healthy region is measured and the nearest kept.
    let out = alice.run(&["ssh", "wap", "--", "echo nearest"]).await;
    assert_eq!(crate::support::ok(&out).trim(), "nearest");
    let cache = alice.config.join("regions.json");
    let mut measured: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let names: Vec<&str> = measured["ranked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["rtt_ms"].as_f64().unwrap() > 0.0, "{r}");
            r["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names.len(), 3, "{measured}");

    // Say ap was nearest, then it dies: the next session goes through the
    // next region, and the choice is measured afresh.
    let ranked = measured["ranked"].as_array_mut().unwrap();
    ranked.sort_by_key(|r| r["name"] != "ap");
    std::fs::write(&cache, serde_json::to_vec(&measured).unwrap()).unwrap();
    m.ap.take().unwrap().kill().await;
    let out = alice.run(&["ssh", "weu", "--", "echo survived"]).await;
    assert_eq!(crate::support::ok(&out).trim(), "survived");
    assert!(
        crate::support::stderr(&out).contains("region ap failed"),
        "{out:?}"
    );
    assert!(!cache.exists() || !std::fs::read_to_string(&cache).unwrap().contains("\"ap\""));

    // Signing out ends a session through an edge within a second.
    let signed_in = Api::new(&alice.url, None)
        .login("alice", "alice-password")
        .await;
    let token = signed_in.token.clone().unwrap();
    let started = crate::support::started_session(
        &[
            "ssh",
            "--region",
            "eu",
            "weu",
            "--",
            "echo started; sleep 60",
        ],
        &alice.config,
        &alice.url,
        &token,
    )
    .await;
    let at = Instant::now();
    let (status, _) = signed_in.post("/users/logout", json!({})).await;
    assert!(status.is_success(), "{status}");
    started.ended(Duration::from_secs(10)).await;
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());
}

#[tokio::test]
async fn a_terminal_opened_through_one_region_resumes_through_another() {
    use crate::terminal::Term;
    let m = Mesh::start().await;
    let key = m.alice_key();
    let agent = m.workspaces[1]["agents"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let session = uuid::Uuid::new_v4();
    // Through eu, across the mesh to wap's agent in ap.
    let mut term = Term::open(&m.eu.url, &agent, session, &key).await;
    term.line("cd /tmp && export MARK=mesh; echo \"at $MARK\"")
        .await;
    term.shows("at mesh").await;
    drop(term);
    // Back through ap, where the agent is attached: the same shell.
    let mut term = Term::open(&m.ap().url, &agent, session, &key).await;
    term.shows("at mesh").await;
    term.line("echo \"$MARK in $(pwd)\"").await;
    term.shows("mesh in /tmp").await;
    // Both sessions are audited with the region each went through.
    let ends = eventually(10, "the first session's end", || async {
        let ends = audited(&m.owner, "terminal_end", "eu").await;
        (!ends.is_empty()).then_some(ends)
    })
    .await;
    assert_eq!(ends[0]["username"], "alice", "{ends:?}");
    assert_eq!(audited(&m.owner, "terminal", "ap").await.len(), 1);
    // Bob, a member, cannot reach alice's terminal through an edge.
    let bob = Api::new(&m.primary.as_ref().unwrap().url, None)
        .login("bob", "bob-password")
        .await;
    let refused = Term::open_with(
        &m.eu.url,
        &agent,
        session,
        &[("Devmesh-Session-Token", bob.token.as_deref().unwrap())],
    )
    .await;
    assert_eq!(refused.err().map(|r| r.0), Some(StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn ping_speedtest_and_netcheck_measure_each_hop_and_region() {
    let m = Mesh::start().await;
    let alice = crate::support::CliAs {
        config: m.dir.path().join("alice-cli"),
        url: m.primary.as_ref().unwrap().url.clone(),
        token: m.alice_key(),
    };
    let json = |out: &std::process::Output| -> Value {
        serde_json::from_str(&crate::support::ok(out)).unwrap()
    };
    // Through eu to wap, whose agent is in ap: three hops, each timed.
    let ping = json(
        &alice
            .run(&["ping", "--region", "eu", "wap", "-c", "2", "-o", "json"])
            .await,
    );
    let hops = ping["hops"].as_array().unwrap();
    let path: Vec<(&str, &str)> = hops
        .iter()
        .map(|h| (h["from"].as_str().unwrap(), h["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        path,
        [("you", "eu"), ("eu", "ap (mesh)"), ("ap", "agent")],
        "{ping}"
    );
    let whole = ping["round_trip_ms"]["min"].as_f64().unwrap();
    assert!(whole > 0.0, "{ping}");
    for h in hops.iter().skip(1) {
        let rtt = h["rtt_ms"].as_f64().unwrap_or_else(|| panic!("{ping}"));
        assert!(
            rtt >= 0.0 && rtt < whole,
            "a hop is part of the whole: {ping}"
        );
    }
    // Through eu to weu, attached there: two hops.
    let ping = json(
        &alice
            .run(&["ping", "--region", "eu", "weu", "-c", "1", "-o", "json"])
            .await,
    );
    assert_eq!(ping["hops"].as_array().unwrap().len(), 2, "{ping}");

    // Both ways, through the mesh.
    let speed = json(
        &alice
            .run(&[
                "speedtest",
                "--region",
                "eu",
                "wap",
                "--megabytes",
                "8",
                "-o",
                "json",
            ])
            .await,
    );
    assert_eq!(speed["bytes"], 8 << 20);
    for way in ["download_mbit_s", "upload_mbit_s"] {
        assert!(speed[way].as_f64().unwrap() > 1.0, "{speed}");
    }

    // Every region answers HTTPS, and UDP reaches every relay.
    let check = json(&alice.run(&["netcheck", "-o", "json"]).await);
    let regions = check.as_array().unwrap();
    assert_eq!(regions.len(), 3, "{check}");
    for r in regions {
        assert!(r["https_rtt_ms"].as_f64().is_some(), "{r}");
        assert_eq!(r["udp"], true, "{r}");
    }
    // App URLs on the chosen region's domain, and they answer.
    let out = alice.run(&["open", "--region", "eu", "wap", "echo"]).await;
    let url = crate::support::ok(&out).trim().to_owned();
    assert_eq!(url, Mesh::url(&m.eu, "eu", "echo--main--wap--alice", "/"));
    assert_eq!(
        m.get(&format!("{url}echo"), Some(&m.alice_key()))
            .await
            .status(),
        StatusCode::OK
    );
    let out = alice.run(&["show", "--region", "ap", "wap"]).await;
    let shown = crate::support::ok(&out);
    assert!(
        shown.contains(&format!(
            "App echo: {}",
            Mesh::url(m.ap(), "ap", "echo--main--wap--alice", "/")
        )),
        "{shown}"
    );
    let out = alice.run(&["open", "wap", "nope"]).await;
    assert!(
        crate::support::stderr(&out).contains("has no app \"nope\": it has echo, pub"),
        "{out:?}"
    );

    // Probes are not sessions: nothing for the audit log.
    let (_, log) = m.owner.get("/audit?action=ssh").await;
    assert!(log["entries"].as_array().unwrap().is_empty(), "{log}");
}

/// An OpenSSH config in `dir` whose `Host devmesh.WS` goes through
/// `region`, for each of `workspaces`.
fn ssh_config_through(
    dir: &std::path::Path,
    region: &str,
    workspaces: &[&str],
) -> std::path::PathBuf {
    let cfg = dir.join(format!("ssh_config_{region}"));
    let mut text = String::new();
    for ws in workspaces {
        text.push_str(&format!(
            "Host devmesh.{ws}\n    ProxyCommand '{}' --region {region} ssh --stdio {ws}\n    \
             StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n",
            crate::support::BIN
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `n` bytes that do not compress.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn big_files_cross_by_scp_sftp_and_rsync_through_an_edge_and_across_the_mesh() {
    let m = Mesh::start().await;
    let cfg = ssh_config_through(m.dir.path(), "eu", &["wap"]);
    let openssh = |program: &str| {
        let mut c = tokio::process::Command::new(program);
        c.env("DEVMESH_CONFIG_DIR", m.dir.path().join("alice-cli"))
            .env("DEVMESH_URL", &m.primary.as_ref().unwrap().url)
            .env("DEVMESH_SESSION_TOKEN", m.alice_key())
            .stdin(std::process::Stdio::null());
        c
    };
    let run = |mut c: tokio::process::Command| async move {
        let out = c.output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let local = m.dir.path().join("local");
    let remote = m.dir.path().join("remote");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    let payload = noise(64 << 20, 7);
    std::fs::write(local.join("big.bin"), &payload).unwrap();
    let at = |p: &std::path::Path| format!("devmesh.wap:{}", p.display());

    // scp up and back down: wap's agent is in ap, the session through eu.
    let mut c = openssh("scp");
    c.arg("-F")
        .arg(&cfg)
        .arg(local.join("big.bin"))
        .arg(at(&remote.join("up.bin")));
    run(c).await;
    assert!(
        std::fs::read(remote.join("up.bin")).unwrap() == payload,
        "scp up"
    );
    let mut c = openssh("scp");
    c.arg("-F")
        .arg(&cfg)
        .arg(at(&remote.join("up.bin")))
        .arg(local.join("down.bin"));
    run(c).await;
    assert!(
        std::fs::read(local.join("down.bin")).unwrap() == payload,
        "scp down"
    );

    // sftp, both ways in one batch.
    let batch = m.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            local.join("big.bin").display(),
            remote.join("sftp.bin").display(),
            remote.join("sftp.bin").display(),
            local.join("sftp-back.bin").display()
        ),
    )
    .unwrap();
    let mut c = openssh("sftp");
    c.arg("-F")
        .arg(&cfg)
        .arg("-b")
        .arg(&batch)
        .arg("devmesh.wap");
    run(c).await;
    assert!(
        std::fs::read(local.join("sftp-back.bin")).unwrap() == payload,
        "sftp"
    );

    // rsync of a tree, then of a change to it.
    let tree = local.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.bin"), noise(1 << 20, 9)).unwrap();
    let rsync = |src: &std::path::Path| {
        let mut c = openssh("rsync");
        c.arg("-a")
            .arg("-e")
            .arg(format!("ssh -F {}", cfg.display()))
            .arg(format!("{}/", src.display()))
            .arg(format!("{}/", at(&remote.join("tree"))));
        c
    };
    run(rsync(&tree)).await;
    std::fs::write(tree.join("a.txt"), "alpha, changed\n").unwrap();
    run(rsync(&tree)).await;
    assert_eq!(
        std::fs::read_to_string(remote.join("tree/a.txt")).unwrap(),
        "alpha, changed\n"
    );
    assert!(
        std::fs::read(remote.join("tree/sub/b.bin")).unwrap() == noise(1 << 20, 9),
        "rsync"
    );
}

#[tokio::test]
async fn an_ssh_session_whose_agent_dies_ends_with_a_clear_error_not_a_hang() {
    let mut m = Mesh::start().await;
    let started = crate::support::started_session(
        &[
            "ssh",
            "--region",
            "eu",
            "wap",
            "--",
            "echo started; sleep 600",
        ],
        &m.dir.path().join("alice-cli"),
        &m.primary.as_ref().unwrap().url,
        &m.alice_key(),
    )
    .await;
    // wap's agent dies without a word (SIGKILL).
    m._agents.remove(1).process.kill().await;
    let (status, err) = started.ended(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(
        err.contains("the connection to the workspace was lost"),
        "{err}"
    );
}

#[tokio::test]
async fn tcp_and_udp_port_forwards_run_through_an_edge_across_the_mesh() {
    let m = Mesh::start().await;
    let port = || crate::support::free_port().unwrap();
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let (tcp_local, udp_local) = (port(), port());
    // wap's agent is in ap; the forwards go through eu.
    let _forward = tokio::process::Command::new(crate::support::BIN)
        .args(["port-forward", "--region", "eu", "wap", "--tcp"])
        .arg(format!("{tcp_local}:{}", m._upstream.port()))
        .arg("--udp")
        .arg(format!("{udp_local}:{echo_port}"))
        .env("DEVMESH_CONFIG_DIR", m.dir.path().join("alice-cli"))
        .env("DEVMESH_URL", &m.primary.as_ref().unwrap().url)
        .env("DEVMESH_SESSION_TOKEN", m.alice_key())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let answers = eventually(30, "the TCP forward", || async {
        let all = futures_util::future::join_all((0..10).map(|i| {
            client
                .get(format!("http://127.0.0.1:{tcp_local}/echo?n={i}"))
                .send()
        }))
        .await;
        all.into_iter()
            .map(|r| r.ok().filter(|r| r.status().is_success()))
            .collect::<Option<Vec<_>>>()
    })
    .await;
    assert_eq!(answers.len(), 10);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(("127.0.0.1", udp_local)).await.unwrap();
    let got = eventually(30, "a UDP answer", || async {
        let mut buf = [0u8; 64];
        udp.send(b"across the mesh").await.ok()?;
        let n = tokio::time::timeout(Duration::from_millis(500), udp.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf[..n].to_vec())
    })
    .await;
    assert_eq!(got, b"across the mesh");
    // Both sessions went across the mesh from eu.
    assert!(edge_metric(&m.eu, MESH_OUT).await >= 2);
    let flows = audited(&m.owner, "port_forward_udp", "eu").await;
    assert_eq!(flows.len(), 1, "one flow from one client address");
}
