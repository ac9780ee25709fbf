//! Workspace apps and dev URLs through the primary, end to end: the real
//! `devmesh server` and `devmesh agent` binaries, a real QUIC tunnel, real
//! upstream servers, curl and a WebSocket client.

use std::process::Stdio;
use std::time::Duration;

use devmesh_tests::upstream::{Upstream, pattern_sha256};
use devmesh_tests::{Api, fresh_database};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{AgentProcess, ServerProcess, app_client, eventually};

/// A primary with apps on `*.apps.localhost`, an owner, a member `alice`
/// with workspace `dev` whose agent runs, and an upstream app.
struct World {
    _config: tempfile::TempDir,
    primary: ServerProcess,
    owner: Api,
    alice: Api,
    upstream: Upstream,
    workspace: Value,
    agent_token: String,
    agent: Option<AgentProcess>,
    port: u16,
    db_url: String,
}

impl World {
    async fn start() -> Self {
        let db = fresh_database().await;
        let config = tempfile::tempdir().unwrap();
        let url = db.url();
        let primary = ServerProcess::start(
            &[
                "--wildcard-access-url",
                "*.apps.localhost",
                "--relay-address",
                "127.0.0.1:0",
                "--enable-path-apps",
                "--secrets-key-file",
                config.path().join("secrets.key").to_str().unwrap(),
            ],
            &[("DEVMESH_POSTGRES_URL", url.expose())],
            config.path(),
        )
        .await;
        let port: u16 = primary.url.rsplit(':').next().unwrap().parse().unwrap();
        let anon = Api::new(&primary.url, None);
        anon.post("/users/first", json!({"email": "owner@example.com", "username": "owner", "password": "owner-password"}))
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
                json!({"name": "byo", "definition": {"agents": [{
                    "name": "main",
                    "env": {"GREETING": "hello"},
                    "apps": [
                        {"slug": "echo", "port": up, "healthcheck": {"url": format!("http://127.0.0.1:{up}/healthz"), "interval_seconds": 1, "threshold": 1}},
                        {"slug": "team", "port": up, "sharing_level": "authenticated"},
                        {"slug": "pub", "port": up, "sharing_level": "public"},
                        {"slug": "dead", "port": 1},
                        {"slug": "docs", "port": up, "subdomain": false, "sharing_level": "public"}
                    ],
                    "scripts": [{"name": "setup", "script": "echo \"$GREETING from setup\"; echo oops >&2"}]
                }]}}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        let (s, created) = alice
            .post("/workspaces", json!({"name": "dev", "template": "byo"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        let agent_token = created["agent_tokens"][0]["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let agent = AgentProcess::start(&primary.url, &agent_token, config.path());
        let world = Self {
            _config: config,
            primary,
            owner,
            alice,
            upstream,
            workspace: created["workspace"].clone(),
            agent_token,
            agent: Some(agent),
            port,
            db_url: url.expose().to_owned(),
        };
        world.wait_agent("connected", Some("ready")).await;
        world
    }

    fn ws_id(&self) -> String {
        self.workspace["id"].as_str().unwrap().to_owned()
    }

    async fn wait_agent(&self, status: &str, lifecycle: Option<&str>) -> Value {
        let id = self.ws_id();
        let log = self.agent.as_ref().map(|a| a.log().to_path_buf());
        eventually(30, &format!("agent {status} (log: {log:?})"), || {
            let alice = self.alice.clone();
            let id = id.clone();
            async move {
                let (_, ws) = alice.get(&format!("/workspaces/{id}")).await;
                let agent = ws["agents"][0].clone();
                (agent["status"] == status
                    && lifecycle.is_none_or(|l| agent["lifecycle_state"] == l))
                .then_some(agent)
            }
        })
        .await
    }

    fn app_url(&self, label: &str, path: &str) -> String {
        format!("http://{label}.apps.localhost:{}{path}", self.port)
    }

    async fn get(&self, as_user: Option<&Api>, label: &str, path: &str) -> reqwest::Response {
        let mut req = app_client(false).get(self.app_url(label, path));
        if let Some(u) = as_user {
            req = req.header("Devmesh-Session-Token", u.token.as_deref().unwrap());
        }
        req.send().await.unwrap()
    }
}

#[tokio::test]
async fn apps_dev_urls_and_sharing_levels_through_the_primary() {
    let w = World::start().await;
    let alice = &w.alice;

    // An app, with and without the agent in the hostname.
    for label in ["echo--main--dev--alice", "echo--dev--alice"] {
        let resp = w.get(Some(alice), label, "/echo?x=1").await;
        assert_eq!(resp.status(), StatusCode::OK, "{label}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["path"], "/echo");
        assert_eq!(body["query"], "x=1");
        let h = &body["headers"];
        assert!(
            h.get("devmesh-session-token").is_none(),
            "credentials never reach the app: {h}"
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["x-forwarded-host"],
            format!("{label}.apps.localhost:{}", w.port)
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    }
    // A bearer key works too, and a POST body streams through.
    let resp = app_client(false)
        .post(w.app_url("echo--dev--alice", "/echo"))
        .bearer_auth(alice.token.as_deref().unwrap())
        .body("ping through the tunnel")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "ping through the tunnel");

    // A dev URL by port.
    let dev = format!("{}--main--dev--alice", w.upstream.port());
    assert_eq!(
        w.get(Some(alice), &dev, "/echo").await.status(),
        StatusCode::OK
    );

    // Sharing: owner-only, authenticated, public; and a port share.
    let bob = Api::new(&w.primary.url, None)
        .login("bob", "bob-password")
        .await;
    let html_forbidden = app_client(false)
        .get(w.app_url("echo--dev--alice", "/echo"))
        .header("Devmesh-Session-Token", bob.token.as_deref().unwrap())
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(html_forbidden.status(), StatusCode::FORBIDDEN);
    assert!(
        html_forbidden
            .text()
            .await
            .unwrap()
            .contains("Not authorized")
    );
    assert_eq!(
        w.get(None, "echo--dev--alice", "/echo").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        w.get(Some(&bob), "team--dev--alice", "/echo")
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        w.get(None, "team--dev--alice", "/echo").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        w.get(None, "pub--dev--alice", "/echo").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        w.get(None, &dev, "/echo").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (s, _) = alice
        .post(
            &format!("/workspaces/{}/port-shares", w.ws_id()),
            json!({"agent_name": "main", "port": w.upstream.port(), "sharing_level": "public"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(w.get(None, &dev, "/echo").await.status(), StatusCode::OK);
    let (s, _) = bob
        .post(
            &format!("/workspaces/{}/port-shares", w.ws_id()),
            json!({"agent_name": "main", "port": 1, "sharing_level": "public"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "only the owner may share");

    // Routing fields are checked: the user in the hostname must own the workspace.
    for label in [
        "echo--dev--bob",
        "echo--dev--owner",
        "nope--dev--alice",
        "echo--other--dev--alice",
        "echo--dev--ghost",
    ] {
        let resp = w.get(Some(alice), label, "/echo").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{label}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["message"], "App not found.");
    }
    // Without credentials nothing is revealed: a missing app looks like any
    // app that needs signing in.
    for label in ["nope--dev--alice", "echo--dev--ghost", "echo--dev--bob"] {
        assert_eq!(
            w.get(None, label, "/echo").await.status(),
            StatusCode::UNAUTHORIZED,
            "{label}"
        );
    }
    // Nothing listens on the app's port: a clear 502.
    let resp = w.get(Some(alice), "dead--dev--alice", "/").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("refused the connection")
    );

    // Health checks, lifecycle and script logs reach the API.
    let agent = w.wait_agent("connected", Some("ready")).await;
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    eventually(20, "echo healthy", || {
        let alice = alice.clone();
        let id = w.ws_id();
        async move {
            let (_, ws) = alice.get(&format!("/workspaces/{id}")).await;
            let apps = ws["agents"][0]["apps"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            apps.iter()
                .any(|a| a["slug"] == "echo" && a["health"] == "healthy")
                .then_some(())
        }
    })
    .await;
    let (_, logs) = alice
        .get(&format!("/workspaceagents/{agent_id}/logs"))
        .await;
    let lines: Vec<(String, String)> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["level"].as_str().unwrap().to_owned(),
                l["output"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        lines.contains(&("info".into(), "hello from setup".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("error".into(), "oops".into())),
        "{lines:?}"
    );
    assert_eq!(
        bob.get(&format!("/workspaceagents/{agent_id}/logs"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let _ = &w.owner;
}

#[tokio::test]
async fn large_transfers_websockets_and_sse_stream_through_the_tunnel() {
    let w = World::start().await;
    let token = w.alice.token.clone().unwrap();
    let host = format!("echo--dev--alice.apps.localhost:{}", w.port);
    let size: u64 = 256 * 1024 * 1024;

    // 256 MiB download with curl, checksummed.
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sS --fail --connect-to ::127.0.0.1:{} -H 'Devmesh-Session-Token: {token}' http://{host}/bytes/{size} | sha256sum",
            w.port
        ))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(got, pattern_sha256(size));

    // 256 MiB upload with curl, checksummed by the app.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let block: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        for _ in 0..256 {
            f.write_all(&block).unwrap();
        }
    }
    let expected = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let block: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        for _ in 0..256 {
            h.update(&block);
        }
        hex::encode(h.finalize())
    };
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--connect-to",
            &format!("::127.0.0.1:{}", w.port),
        ])
        .args([
            "-H",
            &format!("Devmesh-Session-Token: {token}"),
            "-H",
            "Expect:",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("http://{host}/sha256"))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["len"], size);
    assert_eq!(body["sha256"], expected.as_str());

    // WebSocket echo.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", w.port))
        .await
        .unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{host}/ws"),
    )
    .unwrap();
    req.headers_mut()
        .insert("Devmesh-Session-Token", token.parse().unwrap());
    let (mut socket, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("websocket upgrade");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(format!(
                "hello {i}"
            )))
            .await
            .unwrap();
        let msg = socket.next().await.unwrap().unwrap();
        assert_eq!(msg.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    socket.close(None).await.unwrap();

    // SSE: each event arrives before the app has even produced the next.
    let mut resp = app_client(false)
        .get(w.app_url("echo--dev--alice", "/sse"))
        .header("Devmesh-Session-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let next = format!("http://127.0.0.1:{}/sse/next", w.upstream.port());
    for i in 0..3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("event arrives")
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&chunk),
            format!("data: event {i}\n\n")
        );
        reqwest::Client::new().post(&next).send().await.unwrap();
    }
}

/// Alice downloads 256 MiB of pattern bytes from `label` with curl while
/// `request` is sent again and again; checks the bytes arrived whole and
/// every request was answered 200, and returns how many pauses the
/// primary's pacing counted meanwhile.
async fn pauses_beside<F, Fut>(w: &World, label: &str, request: F) -> u64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = reqwest::Response>,
{
    let size: u64 = 256 * 1024 * 1024;
    let base = format!("http://127.0.0.1:{}", w.port);
    let paused = || crate::support::metric(&base, "devmesh_relay_bulk_pauses_total");
    let before = paused().await;
    let mut download = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sS --fail --connect-to ::127.0.0.1:{port} -H 'Devmesh-Session-Token: {token}' http://{label}.apps.localhost:{port}/bytes/{size} | sha256sum",
            port = w.port,
            token = w.alice.token.as_deref().unwrap(),
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut answered = 0;
    while download.try_wait().unwrap().is_none() {
        assert_eq!(request().await.status(), StatusCode::OK);
        answered += 1;
    }
    let out = download.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.split_whitespace().next().unwrap_or_default(),
        pattern_sha256(size)
    );
    assert!(
        answered > 10,
        "only {answered} requests beside the download"
    );
    paused().await - before
}

/// A download does not keep its own app's requests waiting for a core:
/// while small requests to the same app flow, the proxy paces the download
/// (its pauses are counted), every request is answered, and the download
/// still arrives whole. A stranger using a public app can pace downloads
/// from that app's port only, never from the owner's other ports.
#[tokio::test]
async fn a_download_makes_way_for_requests_to_its_workspace_and_arrives_whole() {
    let w = World::start().await;
    let own = || w.get(Some(&w.alice), "echo--dev--alice", "/echo");
    let pauses = pauses_beside(&w, "echo--dev--alice", own).await;
    assert!(pauses > 0, "the download was never paced beside requests");

    // Alone, a download is never paced: a proxy page, not an app request,
    // is all that runs beside it.
    let health = || reqwest::get(format!("http://127.0.0.1:{}/healthz", w.port));
    let alone = pauses_beside(&w, "echo--dev--alice", || async { health().await.unwrap() }).await;
    assert_eq!(alone, 0, "a download alone was paced");

    // A stranger hammering the public app: it shares the port (and its
    // capacity) with `echo`, so a download from `echo` makes way; a dev URL
    // on another port of the same workspace is never slowed by it.
    let stranger = || w.get(None, "pub--dev--alice", "/echo");
    let same_port = pauses_beside(&w, "echo--dev--alice", stranger).await;
    assert!(
        same_port > 0,
        "a download from the public app's port was never paced"
    );
    let other = Upstream::start().await;
    let other_label = format!("{}--main--dev--alice", other.port());
    let other_port = pauses_beside(&w, &other_label, stranger).await;
    assert_eq!(
        other_port, 0,
        "a stranger on a public port paced the owner's other port"
    );
}

#[tokio::test]
async fn browsers_sign_in_through_the_auth_redirect_and_get_app_cookies() {
    let w = World::start().await;
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let browser = crate::support::app_client_with_jar(jar.clone());
    let app = w.app_url("echo--dev--alice", "/echo?from=browser");

    // 1. No credentials: off to the primary's auth redirect.
    let r = browser
        .get(&app)
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to_primary = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        to_primary.starts_with(&format!(
            "{}/api/v2/applications/auth-redirect?redirect_uri=",
            w.primary.url
        )),
        "{to_primary}"
    );

    // 2. Not signed in on the dashboard: the login page.
    let r = browser.get(&to_primary).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let login = format!(
        "{}{}",
        w.primary.url,
        r.headers()["location"].to_str().unwrap()
    );
    let page = browser
        .get(&login)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let redirect = page
        .split("name=\"redirect\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&");

    // A forged CSRF token is refused.
    let r = browser
        .post(format!("{}/login", w.primary.url))
        .form(&[
            ("email", "alice"),
            ("password", "alice-password"),
            ("csrf", "forged"),
            ("redirect", &redirect),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let page = r.text().await.unwrap();
    let csrf_retry = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(csrf, csrf_retry);

    // 3. Sign in: back to the auth redirect, which hands out a sealed
    // one-time grant for this one app host.
    let r = browser
        .post(format!("{}/login", w.primary.url))
        .form(&[
            ("email", "alice"),
            ("password", "alice-password"),
            ("csrf", &csrf_retry),
            ("redirect", &redirect),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let back = format!(
        "{}{}",
        w.primary.url,
        r.headers()["location"].to_str().unwrap()
    );
    let r = browser.get(&back).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let with_grant = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        with_grant.starts_with(&app) && with_grant.contains("devmesh_app_grant="),
        "{with_grant}"
    );

    // The grant works only in the browser that started the sign-in
    // (another browser lacks its state cookie), only on its own host, and
    // only once.
    let flow_state = url::Url::parse(&to_primary)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("the redirect carries a state");
    let elsewhere = app_client(false)
        .get(&with_grant)
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), StatusCode::BAD_REQUEST);
    assert!(elsewhere.text().await.unwrap().contains("another browser"));
    let other_host = with_grant.replacen("echo--dev--alice", "team--dev--alice", 1);
    let moved = app_client(false)
        .get(&other_host)
        .header("Cookie", format!("devmesh_app_state={flow_state}"))
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), StatusCode::BAD_REQUEST);
    assert!(moved.text().await.unwrap().contains("another app"));

    // 4. The app host turns it into a token cookie for itself alone and
    // strips it from the URL.
    let r = browser.get(&with_grant).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], app);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("devmesh_app_token_")
            && cookie.contains("HttpOnly")
            && !cookie.contains("Domain="),
        "{cookie}"
    );
    let replay = app_client(false)
        .get(&with_grant)
        .header("Cookie", format!("devmesh_app_state={flow_state}"))
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);
    assert!(replay.text().await.unwrap().contains("already used"));

    // 5. The app works; no devmesh cookie reaches it.
    let app_url: reqwest::Url = app.parse().unwrap();
    jar.add_cookie_str("theme=dark; Domain=apps.localhost; Path=/", &app_url);
    let r = browser.get(&app).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let cookies = body["headers"]["cookie"].as_str().unwrap_or_default();
    assert_eq!(cookies, "theme=dark", "only the app's own cookies reach it");
    // Another app of the same user takes a bounce through the primary, but
    // no password: the dashboard session vouches for a grant for it.
    let team = w.app_url("team--dev--alice", "/echo");
    let mut url = team.clone();
    let mut hops = 0;
    let last = loop {
        let r = browser
            .get(&url)
            .header("Accept", "text/html")
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::SEE_OTHER {
            break r;
        }
        let next = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(
            !next.contains("/login"),
            "no second password prompt: {next}"
        );
        url = if next.starts_with('/') {
            format!("{}{next}", w.primary.url)
        } else {
            next
        };
        hops += 1;
        assert!(hops < 6, "too many redirects");
    };
    assert_eq!(last.status(), StatusCode::OK);
    assert_eq!(url, team);

    // Suspending the user cuts their app access at once, app token and all.
    let (s, _) = w.owner.put("/users/alice/status/suspend").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        browser.get(&app).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let (s, _) = w.owner.put("/users/alice/status/activate").await;
    assert_eq!(s, StatusCode::OK);

    // Forged and foreign tokens do not open the app.
    let forged = app_client(false)
        .get(&app)
        .header(
            "Cookie",
            "devmesh_app_token_0000=eyJhbGciOiJFZERTQSJ9.e30.AAAA",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);

    // No open redirects.
    let r = app_client(false)
        .get(format!(
            "{}/api/v2/applications/auth-redirect?redirect_uri=https://evil.example.com/",
            w.primary.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_login_redirect_refused(&w.primary.url, "//evil.example.com").await;
}

#[tokio::test]
async fn agents_recover_from_being_killed_and_from_primary_restarts() {
    let mut w = World::start().await;
    let token = w.alice.token.clone().unwrap();

    // Kill the agent in the middle of a large response: the client sees the
    // stream fail, and new requests get a clear 502.
    let mut resp = app_client(false)
        .get(w.app_url("echo--dev--alice", "/bytes/1073741824"))
        .header("Devmesh-Session-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.chunk().await.unwrap().expect("first bytes");
    w.agent.take().unwrap().kill().await;
    let mut failed = false;
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the broken response must end, not hang");
    assert!(
        failed,
        "a response cut by a dying agent must not look complete"
    );
    eventually(40, "502 agent not connected", || {
        let w = &w;
        async move {
            let r = w.get(Some(&w.alice), "echo--dev--alice", "/echo").await;
            (r.status() == StatusCode::BAD_GATEWAY
                && r.text().await.unwrap().contains("not connected"))
            .then_some(())
        }
    })
    .await;
    w.wait_agent("disconnected", None).await;

    // The agent comes back with the same token.
    w.agent = Some(AgentProcess::start(
        &w.primary.url,
        &w.agent_token,
        w._config.path(),
    ));
    w.wait_agent("connected", None).await;
    assert_eq!(
        w.get(Some(&w.alice), "echo--dev--alice", "/echo")
            .await
            .status(),
        StatusCode::OK
    );

    // Restart the primary on the same address: the agent re-attaches by itself.
    let addr = w.primary.url.trim_start_matches("http://").to_owned();
    w.primary.terminate().await;
    w.primary = ServerProcess::start(
        &[
            "--wildcard-access-url",
            "*.apps.localhost",
            "--relay-address",
            "127.0.0.1:0",
            "--http-address",
            &addr,
            "--secrets-key-file",
            w._config.path().join("secrets.key").to_str().unwrap(),
        ],
        &[("DEVMESH_POSTGRES_URL", &w.db_url)],
        w._config.path(),
    )
    .await;
    eventually(60, "apps work after the primary restarts", || {
        let w = &w;
        async move {
            (w.get(Some(&w.alice), "echo--dev--alice", "/echo")
                .await
                .status()
                == StatusCode::OK)
                .then_some(())
        }
    })
    .await;

    // SIGTERM: the agent reports shutting_down → off and exits cleanly.
    let status = w.agent.take().unwrap().stop().await;
    assert!(status.success());
    w.wait_agent("disconnected", Some("off")).await;
}

#[tokio::test]
async fn https_upstreams_and_path_apps() {
    let w = World::start().await;
    let alice = &w.alice;

    // A dev URL with the `s` suffix speaks TLS to the app inside the workspace.
    let tls_port = w.upstream.tls_addr.port();
    let resp = w
        .get(
            Some(alice),
            &format!("{tls_port}s--dev--alice"),
            "/echo?tls=1",
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.text().await);
    assert_eq!(resp.json::<Value>().await.unwrap()["query"], "tls=1");
    // The same port without `s` is plain HTTP to a TLS server: a clean 502, not a hang.
    let resp = w
        .get(Some(alice), &format!("{tls_port}--dev--alice"), "/echo")
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);

    // Path apps: owner-only on the dashboard origin, with X-Forwarded-Prefix.
    let base = &w.primary.url;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http
        .get(format!("{base}/@alice/dev/apps/docs/echo?q=1"))
        .header("Devmesh-Session-Token", alice.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/echo");
    assert_eq!(body["query"], "q=1");
    assert_eq!(
        body["headers"]["x-forwarded-prefix"],
        "/@alice/dev/apps/docs"
    );
    let resp = http
        .get(format!("{base}/@alice/dev.main/apps/docs"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(resp.headers()["location"], "/@alice/dev.main/apps/docs/");
    // Public sharing does not open path apps to others: they share the dashboard's origin.
    assert_eq!(
        http.get(format!("{base}/@alice/dev/apps/docs/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let bob = Api::new(base, None).login("bob", "bob-password").await;
    let resp = http
        .get(format!("{base}/@alice/dev/apps/docs/echo"))
        .header("Devmesh-Session-Token", bob.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Subdomain apps are not reachable by path, nor path apps by subdomain.
    let resp = http
        .get(format!("{base}/@alice/dev/apps/echo/echo"))
        .header("Devmesh-Session-Token", alice.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        w.get(Some(alice), "docs--dev--alice", "/echo")
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn stopped_workspaces_expired_tokens_and_tokens_for_other_hosts_are_refused() {
    use devmesh_shared::api::SharingLevel;
    use devmesh_shared::signing::{AppTarget, AppToken, SigningKey};
    let w = World::start().await;
    let host = format!("pub--dev--alice.apps.localhost:{}", w.port);
    let (_, ws) = w.alice.get(&format!("/workspaces/{}", w.ws_id())).await;
    let agent_id: uuid::Uuid = ws["agents"][0]["id"].as_str().unwrap().parse().unwrap();
    let workspace_id: uuid::Uuid = w.ws_id().parse().unwrap();
    let alice_id: uuid::Uuid = w.alice.get("/users/me").await.1["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // The primary's own signing key, read from its database and decrypted
    // with its secrets key: a token it could
    // have minted, but expired, or for another host, must not open the app.
    let mut conn = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&w.db_url).await.unwrap()
    };
    let (kid, pkcs8): (String, Vec<u8>) =
        sqlx::query_as("SELECT kid, pkcs8 FROM signing_keys LIMIT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    // Stored encrypted: what an operator holding the secrets key could do.
    let vault =
        devmesh_primary::vault::Vault::load_or_create(&w._config.path().join("secrets.key"))
            .unwrap();
    let pkcs8 = vault
        .unwrap(&format!("signing_key:{kid}"), &pkcs8, |_| false)
        .unwrap();
    let key = SigningKey::from_pkcs8(kid, pkcs8.plain()).unwrap();
    // Cookie names carry a hash of the apps domain.
    let token_cookie = {
        use sha2::Digest;
        format!(
            "devmesh_app_token_{}",
            &hex::encode(sha2::Sha256::digest(b"*.apps.localhost"))[..8]
        )
    };
    let now = chrono::Utc::now().timestamp();
    let token = |host: &str, slug: &str, exp: i64| {
        key.sign(&AppToken {
            user_id: Some(alice_id),
            workspace_id,
            agent_id,
            target: AppTarget::Slug(slug.into()),
            host: host.into(),
            sharing_level: SharingLevel::Owner,
            key_id: None,
            port: 0,
            https: false,
            base_path: "/".into(),
            issued_at_ms: now * 1000,
            exp,
        })
    };
    let with_cookie = |label: &str, cookie: String| {
        app_client(false)
            .get(w.app_url(label, "/echo"))
            .header("Cookie", format!("{token_cookie}={cookie}"))
            .send()
    };
    // Sanity: a fresh token for the right host opens the owner-only app.
    let echo_host = format!("echo--dev--alice.apps.localhost:{}", w.port);
    let ok = with_cookie("echo--dev--alice", token(&echo_host, "echo", now + 600))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let expired = with_cookie("echo--dev--alice", token(&echo_host, "echo", now - 1))
        .await
        .unwrap();
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    let other_host = with_cookie("echo--dev--alice", token(&host, "echo", now + 600))
        .await
        .unwrap();
    assert_eq!(other_host.status(), StatusCode::UNAUTHORIZED);
    let other_app = with_cookie("echo--dev--alice", token(&echo_host, "team", now + 600))
        .await
        .unwrap();
    assert_eq!(other_app.status(), StatusCode::UNAUTHORIZED);
    let foreign = SigningKey::generate("attacker");
    let forged = foreign.sign(&AppToken {
        user_id: Some(alice_id),
        workspace_id,
        agent_id,
        target: AppTarget::Slug("echo".into()),
        host: echo_host.clone(),
        sharing_level: SharingLevel::Owner,
        key_id: None,
        port: 0,
        https: false,
        base_path: "/".into(),
        issued_at_ms: now * 1000,
        exp: now + 600,
    });
    assert_eq!(
        with_cookie("echo--dev--alice", forged)
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // Stopping the workspace cuts access at once, even with a valid token.
    let (s, _) = w
        .alice
        .post(
            &format!("/workspaces/{}/builds", w.ws_id()),
            json!({"transition": "stop"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let resp = app_client(false)
        .get(w.app_url("echo--dev--alice", "/echo"))
        .header(
            "Cookie",
            format!("{token_cookie}={}", token(&echo_host, "echo", now + 600)),
        )
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.text().await.unwrap().contains("Workspace stopped"));
    // …and the stopped build's agent token no longer works.
    let r = reqwest::Client::new()
        .get(format!(
            "{}/api/v2/workspaceagents/me/manifest",
            w.primary.url
        ))
        .header("Devmesh-Agent-Token", &w.agent_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn script_logs_stop_at_one_mebibyte_with_an_overflow_flag() {
    let w = World::start().await;
    let agent = reqwest::Client::new();
    let post = |lines: Vec<String>| {
        let logs: Vec<Value> = lines
            .into_iter()
            .map(|l| json!({"source": "big", "output": l}))
            .collect();
        agent
            .post(format!("{}/api/v2/workspaceagents/me/logs", w.primary.url))
            .header("Devmesh-Agent-Token", &w.agent_token)
            .json(&json!({"logs": logs}))
            .send()
    };
    let line = "x".repeat(1023);
    let mut overflowed = false;
    for _ in 0..12 {
        let r: Value = post(vec![line.clone(); 100])
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if r["overflowed"] == true {
            overflowed = true;
            break;
        }
    }
    assert!(overflowed, "1 MiB of logs must overflow");
    let r: Value = post(vec!["after".into()])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["accepted"], 0);
    let agent_id = w.wait_agent("connected", None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, logs) = w
        .alice
        .get(&format!("/workspaceagents/{agent_id}/logs"))
        .await;
    assert_eq!(logs["overflowed"], true);
    let stored: usize = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["output"].as_str().unwrap().len() + 1)
        .sum();
    assert!(stored <= 1024 * 1024, "{stored}");
    assert!(!logs.to_string().contains("\"after\""));
}

#[tokio::test]
async fn cookies_never_ride_cross_site_requests_and_apps_cannot_plant_them() {
    let w = World::start().await;
    // An app token cookie for one host, as a browser would hold it after
    // signing in (a request with a key hands one out too).
    let token_cookie = |label: &'static str| {
        let w = &w;
        async move {
            let r = w.get(Some(&w.alice), label, "/echo").await;
            assert_eq!(r.status(), StatusCode::OK);
            let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
            assert!(set.starts_with("devmesh_app_token_"), "{set}");
            set.split(';').next().unwrap().to_owned()
        }
    };
    let echo_cookie = token_cookie("echo--dev--alice").await;
    let get = |label: &str, path: &str, headers: Vec<(&'static str, String)>| {
        let mut req = app_client(false)
            .get(w.app_url(label, path))
            .header("Cookie", echo_cookie.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    let same = || vec![("sec-fetch-site", "same-origin".to_owned())];
    // The cookie works for the app's own page and for a top-level navigation…
    assert_eq!(
        get("echo--dev--alice", "/echo", same())
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let nav = |dest: &str| {
        vec![
            ("sec-fetch-site", "same-site".to_owned()),
            ("sec-fetch-mode", "navigate".to_owned()),
            ("sec-fetch-dest", dest.to_owned()),
        ]
    };
    assert_eq!(
        get("echo--dev--alice", "/echo", nav("document"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // …but not for another app's frame around it, nor another app's script
    // (fetch, form post, WebSocket).
    assert_eq!(
        get("echo--dev--alice", "/echo", nav("iframe"))
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let cors = vec![
        ("sec-fetch-site", "same-site".to_owned()),
        ("sec-fetch-mode", "cors".to_owned()),
    ];
    assert_eq!(
        get("echo--dev--alice", "/echo", cors)
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let evil_origin = vec![(
        "origin",
        format!("http://pub--dev--bob.apps.localhost:{}", w.port),
    )];
    assert_eq!(
        get("echo--dev--alice", "/echo", evil_origin)
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // A token cookie is good for its own host only.
    assert_eq!(
        get("team--dev--alice", "/echo", same())
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // The dashboard refuses cookie-authenticated changes from other sites.
    let session = w.alice.token.clone().unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/api/v2/users/me/keys", w.primary.url))
        .header("Cookie", format!("devmesh_session_token={session}"))
        .header("sec-fetch-site", "cross-site")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = reqwest::Client::new()
        .post(format!("{}/api/v2/users/me/keys", w.primary.url))
        .header("Cookie", format!("devmesh_session_token={session}"))
        .header("sec-fetch-site", "same-origin")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // An app cannot plant devmesh cookies, however spelt; its own pass.
    let r = get("pub--dev--alice", "/set-cookie", same()).await.unwrap();
    let set: Vec<&[u8]> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert!(set.iter().any(|c| c.starts_with(b"theme=dark")), "{set:?}");
    assert!(
        !set.iter()
            .any(|c| c.windows(7).any(|w| w == b"planted")
                || c.windows(10).any(|w| w == b"app_state_")),
        "{set:?}"
    );

    // Devmesh keys never reach the app, whatever the case of "Bearer"; the
    // app's own bearer tokens do, and the token cookie still signs the user in.
    let r = app_client(false)
        .get(w.app_url("team--dev--alice", "/echo"))
        .header("authorization", format!("bearer {session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert!(body["headers"].get("authorization").is_none(), "{body}");
    let r = get(
        "echo--dev--alice",
        "/echo",
        vec![
            ("authorization", "Bearer app-own-jwt".into()),
            ("sec-fetch-site", "same-origin".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["headers"]["authorization"],
        "Bearer app-own-jwt"
    );

    // Client-supplied forwarding headers are replaced; Host is the app host.
    let r = get(
        "echo--dev--alice",
        "/echo",
        vec![
            ("x-forwarded-prefix", "/evil".into()),
            ("x-real-ip", "6.6.6.6".into()),
            ("sec-fetch-site", "same-origin".into()),
        ],
    )
    .await
    .unwrap();
    let h = r.json::<Value>().await.unwrap()["headers"].clone();
    assert!(
        h.get("x-forwarded-prefix").is_none() && h.get("x-real-ip").is_none(),
        "{h}"
    );
    assert_eq!(
        h["host"],
        format!("echo--dev--alice.apps.localhost:{}", w.port)
    );

    // `/@...` on an app host belongs to the app (Vite serves /@vite/client).
    let r = get("echo--dev--alice", "/@vite/client", same())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/@vite/client");

    // Sign-in links go only to this deployment's scheme and port.
    let r = app_client(false)
        .get(format!(
            "{}/api/v2/applications/auth-redirect?redirect_uri=http://echo--dev--alice.apps.localhost:1/",
            w.primary.url
        ))
        .header("Devmesh-Session-Token", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_login_redirect_refused(&w.primary.url, "/%09/evil.example").await;

    // A NUL byte in script output is stored, not a reason to drop the batch.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v2/workspaceagents/me/logs", w.primary.url))
        .header("Devmesh-Agent-Token", &w.agent_token)
        .json(&json!({"logs": [{"source": "s", "output": "a\u{0}b"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// The login page must fall back to `/` for a `redirect` off this origin.
async fn assert_login_redirect_refused(primary: &str, redirect: &str) {
    let page = app_client(false)
        .get(format!("{primary}/login?redirect={redirect}"))
        .send()
        .await
        .unwrap();
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("name=\"redirect\" value=\"/\""),
        "{redirect}"
    );
}
