//! The app trust boundary, attacked the way a hostile app, a stranger and a
//! careless client would, against the real binaries: a primary serving
//! `*.apps.localhost` and an edge serving the nested `*.eu.apps.localhost`
//! (the layout the README uses), and real HTTP clients with cookie jars.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mesh::Mesh;
use crate::support::{app_client, app_client_with_jar, create_edge, eventually, quic_client};

/// A browser-like client: loopback DNS, a cookie jar, no redirects followed.
fn browser() -> (reqwest::Client, Arc<reqwest::cookie::Jar>) {
    let jar = Arc::new(reqwest::cookie::Jar::default());
    (app_client_with_jar(jar.clone()), jar)
}

/// The grant the auth redirect hands `key`'s browser for `redirect_uri`,
/// with the state an attacker picked; `None` when it refuses.
async fn grant(m: &Mesh, key: &str, redirect_uri: &str, state: &str) -> Option<String> {
    let mut url = reqwest::Url::parse(&format!(
        "http://127.0.0.1:{}/api/v2/applications/auth-redirect",
        m.primary_port
    ))
    .unwrap();
    url.query_pairs_mut()
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("state", state);
    let r = app_client(false)
        .get(url)
        .header("Devmesh-Session-Token", key)
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    if r.status() != StatusCode::SEE_OTHER {
        return None;
    }
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.starts_with(redirect_uri), "{to}");
    Some(to)
}

/// Brings a grant URL back to its host, as the browser holding `state` would.
async fn bring(url: &str, state: &str) -> reqwest::Response {
    app_client(false)
        .get(url)
        .header("Cookie", format!("devmesh_app_state={state}"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn no_devmesh_cookie_from_any_domain_reaches_an_app() {
    let m = Mesh::start().await;
    let key = m.alice_key();
    let (client, jar) = browser();
    let edge_app = Mesh::url(&m.eu, "eu", "echo--weu--alice", "/echo");
    let primary_app = format!(
        "http://echo--weu--alice.apps.localhost:{}/echo",
        m.primary_port
    );
    // What a browser holds after using the primary's apps, the dashboard
    // and another region: cookies on the parent domain reach the nested one.
    for (cookie, on) in [
        (
            "devmesh_app_token_0a1b2c3d=primary-token; Domain=apps.localhost",
            &primary_app,
        ),
        (
            "devmesh_app_key_0a1b2c3d=old-key; Domain=apps.localhost",
            &primary_app,
        ),
        (
            "devmesh_app_state=state; Domain=apps.localhost",
            &primary_app,
        ),
        (
            "devmesh_session_token=session; Domain=localhost",
            &primary_app,
        ),
        (
            "DevMesh_Session_Token=session2; Domain=localhost",
            &primary_app,
        ),
        ("theme=dark; Domain=apps.localhost", &primary_app),
    ] {
        jar.add_cookie_str(&format!("{cookie}; Path=/"), &on.parse().unwrap());
    }
    for url in [&edge_app, &primary_app] {
        let r = client
            .get(url.as_str())
            .header("Devmesh-Session-Token", &key)
            .header("Devmesh-Edge-Token", "not-for-apps")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["headers"]["cookie"], "theme=dark", "{url}: {body}");
        let headers = body["headers"].as_object().unwrap();
        assert!(
            !headers.keys().any(|h| h.starts_with("devmesh")),
            "{url}: {body}"
        );
    }
}

#[tokio::test]
async fn a_hostile_page_cannot_turn_the_auth_redirect_into_a_key() {
    let m = Mesh::start().await;
    let key = m.alice_key();
    let eu = m.eu.port();
    let public_host = format!("pub--weu--alice.eu.apps.localhost:{eu}");
    let private_host = format!("echo--weu--alice.eu.apps.localhost:{eu}");
    let attacker_state = "attackerchosenstate0123";

    // A page on a public app opens the auth redirect (in a popup, say) for
    // its own host and reads the grant from the popup's URL.
    let stolen = grant(&m, &key, &format!("http://{public_host}/"), attacker_state)
        .await
        .expect("alice may open the public app");
    assert!(!stolen.contains(&key), "the grant is not the key");

    // The grant does not open another host, even with the state it names.
    let elsewhere = stolen.replacen(&public_host, &private_host, 1);
    let r = bring(&elsewhere, attacker_state).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get("set-cookie").is_none());

    // On its own host it yields a token for that host alone, once…
    let r = bring(&stolen, attacker_state).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let token = set
        .iter()
        .find(|c| c.starts_with("devmesh_app_token_"))
        .expect("a token cookie");
    assert!(!token.contains("Domain="), "host-only: {token}");
    let token = token.split(';').next().unwrap().to_owned();
    let again = bring(&stolen, attacker_state).await;
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);

    // …which opens none of alice's other apps, here or anywhere.
    for url in [
        format!("http://{private_host}/echo"),
        format!(
            "http://echo--weu--alice.apps.localhost:{}/echo",
            m.primary_port
        ),
    ] {
        let r = app_client(false)
            .get(&url)
            .header("Cookie", &token)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{url}");
    }

    // No grant at all for an app the user may not open: bob's workspace.
    let bob = m.alice.with_token(&{
        let anon = devmesh_tests::Api::new(&m.alice.base, None);
        anon.login("bob", "bob-password").await.token.unwrap()
    });
    let (s, _) = bob
        .post("/workspaces", json!({"name": "wbob", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let bob_host = format!("echo--wbob--bob.eu.apps.localhost:{eu}");
    assert!(
        grant(&m, &key, &format!("http://{bob_host}/"), attacker_state)
            .await
            .is_none(),
        "a grant for an app alice may not open"
    );
    // Nor for a state the server would never issue.
    assert!(
        grant(&m, &key, &format!("http://{public_host}/"), "x")
            .await
            .is_none()
    );
}

#[tokio::test]
async fn after_sign_in_the_browser_stays_on_the_app_host() {
    let m = Mesh::start().await;
    let key = m.alice_key();
    let host = format!("pub--weu--alice.eu.apps.localhost:{}", m.eu.port());
    let state = "honestbrowserstate012345";
    let with_grant = grant(&m, &key, &format!("http://{host}//evil.example/x"), state)
        .await
        .unwrap();
    let r = bring(&with_grant, state).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = r.headers()["location"].to_str().unwrap();
    assert_eq!(to, format!("http://{host}/evil.example/x"));
}

#[tokio::test]
async fn invalid_keys_tell_nothing_and_hosts_must_agree() {
    let m = Mesh::start().await;
    let edge = &m.eu;
    // With a made-up key, a missing app, a missing user and a real app all
    // answer alike: no oracle for what exists.
    let mut seen = Vec::new();
    for label in ["echo--weu--alice", "nope--weu--alice", "echo--weu--nobody"] {
        let r = m.get(&Mesh::url(edge, "eu", label, "/"), Some("x")).await;
        seen.push(r.status());
        let r = m
            .get(
                &Mesh::url(edge, "eu", label, "/"),
                Some("0123456789-abcdefghijklmnopqrstuv"),
            )
            .await;
        seen.push(r.status());
    }
    assert!(
        seen.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{seen:?}"
    );

    // An absolute-form request naming one host with a Host header naming
    // another is refused, not routed by either.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", edge.port()))
        .await
        .unwrap();
    let req = format!(
        "GET http://echo--weu--alice.eu.apps.localhost:{0}/echo HTTP/1.1\r\nHost: pub--weu--alice.eu.apps.localhost:{0}\r\nConnection: close\r\n\r\n",
        edge.port()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test]
async fn devmesh_pages_refuse_framing() {
    let m = Mesh::start().await;
    let primary = format!("http://127.0.0.1:{}", m.primary_port);
    for url in [
        format!("{primary}/login"),
        format!("{primary}/api/v2/buildinfo"),
        format!("{}/healthz", m.eu.url),
        Mesh::url(&m.eu, "eu", "echo--weu--nobody", "/"),
    ] {
        let r = app_client(false)
            .get(&url)
            .header("Accept", "text/html")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-frame-options"], "DENY", "{url}");
        assert!(
            r.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"),
            "{url}"
        );
    }
}

#[tokio::test]
async fn silent_slow_and_greedy_clients_cannot_hold_the_listeners() {
    let m = Mesh::start().await;
    let primary = format!("http://127.0.0.1:{}", m.primary_port);
    let (tight, _) = create_edge(
        &m.owner,
        &primary,
        "tight",
        &[
            "--max-connections-per-ip",
            "4",
            "--access-checks-per-minute",
            "5",
        ],
        m.dir.path(),
    )
    .await;
    // Half a request head, then nothing: dropped by the header timeout, on
    // the primary and on an edge alike.
    for port in [m.primary_port, tight.port()] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x").await.unwrap();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "a half-sent request is dropped (port {port})"
        );
    }
    // Past the per-IP cap, new connections are closed at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", tight.port()))
                .await
                .unwrap(),
        );
    }
    eventually(10, "the fifth connection to be refused", || async {
        let mut extra = tokio::net::TcpStream::connect(("127.0.0.1", tight.port()))
            .await
            .ok()?;
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut out)).await;
        out.is_empty().then_some(())
    })
    .await;
    drop(held);
    // Others (and the same client, once it lets go) are served.
    eventually(10, "the edge to serve again", || async {
        let r = reqwest::get(format!("{}/healthz", tight.url)).await.ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    // Random well-formed keys each miss every cache and would each cost
    // the primary a lookup: one client gets only so many a minute.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let key = format!("{i:010}-abcdefghijklmnopqrstuvwxyz012345");
        let r = m
            .get(
                &Mesh::url(&tight, "tight", "echo--weu--alice", "/"),
                Some(&key),
            )
            .await;
        statuses.push(r.status());
    }
    // Refused until the limit, then rate-limited; never served. (On a
    // loaded machine an access check may time out: 503, "unavailable",
    // which counts against the limit like any other.)
    let refused = statuses
        .iter()
        .take_while(|s| **s != StatusCode::TOO_MANY_REQUESTS)
        .collect::<Vec<_>>();
    assert!(
        refused.iter().all(|s| matches!(
            **s,
            StatusCode::UNAUTHORIZED | StatusCode::SERVICE_UNAVAILABLE
        )) && refused.contains(&&StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    assert_eq!(
        refused.len(),
        5,
        "five checks a minute at most: {statuses:?}"
    );
    assert!(
        statuses[5..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn login_input_is_bounded_before_it_is_stored_or_hashed() {
    let m = Mesh::start().await;
    let anon = devmesh_tests::Api::new(&m.alice.base, None);
    let huge = "a".repeat(900 * 1024);
    for body in [
        json!({"email": huge, "password": "whatever-password"}),
        json!({"email": "alice\u{0}", "password": "alice-password"}),
        json!({"email": "alice", "password": "alice\u{0}password"}),
        json!({"email": "alice", "password": "p".repeat(64 * 1024)}),
    ] {
        let (s, e) = anon.post("/users/login", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["message"].as_str().unwrap().contains("not valid"), "{e}");
    }
    // A NUL anywhere else the database would refuse is a 400 too, with no
    // word from the database.
    let (s, e) = m
        .owner
        .post(
            "/users",
            json!({"email": "n\u{0}@example.com", "username": "nul", "password": "password-long"}),
        )
        .await;
    assert!(s.is_client_error(), "{s} {e}");
    assert!(
        !e.to_string().contains("sqlx") && !e.to_string().contains("0x00"),
        "{e}"
    );
    let (_, audit) = m.owner.get("/audit?action=login_failed").await;
    assert!(!audit.to_string().contains(&huge[..1024]), "never stored");
}

#[tokio::test]
async fn clients_never_follow_a_redirect_with_their_token() {
    // A "primary" that sends every request elsewhere, and the elsewhere
    // that records what reaches it.
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let sink = {
        let seen = seen.clone();
        axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                seen.lock().push(format!("{headers:?}"));
                "{}"
            }
        })
    };
    let sink_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink_l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(sink_l, sink).await });
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let redirector = {
        let asked = asked.clone();
        axum::Router::new().fallback(move || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { axum::response::Redirect::temporary(&format!("http://{sink_addr}/stolen")) }
        })
    };
    let red_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let red_addr = red_l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(red_l, redirector).await });

    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(crate::support::BIN)
        .args(["whoami"])
        .env("DEVMESH_CONFIG_DIR", dir.path())
        .env("DEVMESH_URL", format!("http://{red_addr}"))
        .env("DEVMESH_SESSION_TOKEN", "secret-session-token")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let agent = tokio::process::Command::new(crate::support::BIN)
        .args(["agent"])
        .env("DEVMESH_URL", format!("http://{red_addr}"))
        .env("DEVMESH_AGENT_TOKEN", "secret-agent-token")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let edge = tokio::process::Command::new(crate::support::BIN)
        .args([
            "edge",
            "--primary-url",
            &format!("http://{red_addr}"),
            "--edge-token",
            "00000000-0000-0000-0000-000000000000:secret-edge-token",
            "--access-url",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--relay-address",
            "127.0.0.1:0",
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The CLI asked once; the agent and the edge keep retrying.
    eventually(30, "the agent and the edge to call the primary", || {
        let asked = asked.clone();
        async move { (asked.load(std::sync::atomic::Ordering::SeqCst) >= 4).then_some(()) }
    })
    .await;
    drop((agent, edge));
    let seen = seen.lock();
    assert!(
        seen.iter().all(|h| !h.contains("secret")),
        "a token followed a redirect: {seen:?}"
    );
}

/// A ticket for the agent whose token is `agent_token` to attach to `relay`.
async fn ticket(primary: &str, agent_token: &str, relay: &str) -> String {
    let r: Value = reqwest::Client::new()
        .post(format!("{primary}/api/v2/workspaceagents/me/attach-ticket"))
        .header(devmesh_shared::api::AGENT_TOKEN_HEADER, agent_token)
        .json(&json!({ "relay": relay }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["ticket"].as_str().expect("a ticket").to_owned()
}

/// The sum of a primary metric's samples whose line starts with `prefix`.
async fn primary_metric(m: &Mesh, prefix: &str) -> u64 {
    crate::support::metric(&format!("http://127.0.0.1:{}", m.primary_port), prefix).await
}

/// The token of an edge `name` the owner created for loopback addresses: a
/// stolen token, or a hostile operator's.
async fn rogue_edge(m: &Mesh, name: &str) -> String {
    let (s, e) = m
        .owner
        .post(
            "/edges",
            json!({"name": name, "access_url": "https://edge.example.com", "relay_hosts": ["127.0.0.1"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    e["edge_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_edge_cannot_claim_agents_domains_or_addresses_it_was_not_given() {
    use crate::support::register;
    use devmesh_shared::signing::{AttachTicket, SigningKey};
    let m = Mesh::start().await;
    let primary = format!("http://127.0.0.1:{}", m.primary_port);
    let (r1, r2) = (&rogue_edge(&m, "r1").await, &rogue_edge(&m, "r2").await);
    let (_, regions) = m.owner.get("/regions").await;
    let eu_relay = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "eu")
        .unwrap()["relay_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused_before =
        primary_metric(&m, "devmesh_edge_refusals_total{result=\"registration\"}").await;

    // Domains and addresses the owner did not give it: an open redirect
    // through the auth redirect, another region's relay (wiping its
    // attachments), or probes pointed anywhere.
    let replica = uuid::Uuid::new_v4();
    for (relay, with, why) in [
        (
            "127.0.0.1:40001",
            json!({"access_url": "https://evil.example"}),
            "access URL",
        ),
        (
            "127.0.0.1:40001",
            json!({"wildcard_hostname": "*.evil.example"}),
            "app wildcard",
        ),
        (
            "127.0.0.1:40001",
            json!({"global_wildcard_hostname": "*.apps.localhost"}),
            "global app wildcard",
        ),
        ("10.9.9.9:40001", json!({}), "relay hosts"),
        (eu_relay.as_str(), json!({}), "another edge's relay"),
    ] {
        let (s, body) = register(&primary, r1, replica, relay, with).await;
        assert_eq!(s, StatusCode::CONFLICT, "{why}: {body}");
        assert!(body["message"].as_str().unwrap().contains(why), "{body}");
    }
    assert_eq!(m.attached_region("weu").await.as_deref(), Some("eu"));
    assert_eq!(
        primary_metric(&m, "devmesh_edge_refusals_total{result=\"registration\"}").await,
        refused_before + 5
    );

    // Claims of attachments without the agent's ticket for this relay: a
    // bare agent id (what edges used to send), a ticket signed by anyone
    // but the primary, and a real ticket for another relay.
    let (s, ws) = m
        .alice
        .post("/workspaces", json!({"name": "wx", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ws}");
    let wx_agent = ws["agent_tokens"][0]["token"].as_str().unwrap().to_owned();
    let wx_agent_id: uuid::Uuid = ws["agent_tokens"][0]["agent_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (s, body) = register(&primary, r1, replica, "127.0.0.1:40001", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let forged = SigningKey::generate("k1").sign(&AttachTicket {
        agent_id: wx_agent_id,
        workspace_id: uuid::Uuid::new_v4(),
        relay: "127.0.0.1:40001".into(),
        nonce: "n".into(),
        issued_at_ms: i64::MAX / 2,
        exp: i64::MAX / 2,
    });
    let weu_agent = {
        let (_, w) = m.alice.get("/users/me/workspaces/weu").await;
        w["agents"][0]["id"].as_str().unwrap().to_owned()
    };
    let for_eu = ticket(&primary, &wx_agent, &eu_relay).await;
    let (s, body) = register(
        &primary,
        r1,
        replica,
        "127.0.0.1:40001",
        json!({"attachments": [weu_agent, forged, for_eu]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(m.attached_region("weu").await.as_deref(), Some("eu"));
    assert_eq!(m.attached_region("wx").await, None);
    assert!(
        primary_metric(
            &m,
            "devmesh_edge_refusals_total{result=\"attachment_proof\"}"
        )
        .await
            >= 3
    );

    // A real ticket counts, until the agent attaches elsewhere with a newer
    // one: an old ticket replayed cannot pull it back.
    let old = ticket(&primary, &wx_agent, "127.0.0.1:40001").await;
    let (s, _) = register(
        &primary,
        r2,
        uuid::Uuid::new_v4(),
        "127.0.0.1:40002",
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let newer = ticket(&primary, &wx_agent, "127.0.0.1:40002").await;
    let (s, _) = register(
        &primary,
        r1,
        replica,
        "127.0.0.1:40001",
        json!({"attachments": [old.clone()]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m.attached_region("wx").await.as_deref(), Some("r1"));
    let (s, _) = register(
        &primary,
        r2,
        uuid::Uuid::new_v4(),
        "127.0.0.1:40002",
        json!({"attachments": [newer]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m.attached_region("wx").await.as_deref(), Some("r2"));
    let (s, _) = register(
        &primary,
        r1,
        replica,
        "127.0.0.1:40001",
        json!({"attachments": [old]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m.attached_region("wx").await.as_deref(), Some("r2"));

    // Replicas are capped.
    let mut last = StatusCode::OK;
    for i in 0..40u16 {
        let (s, body) = register(
            &primary,
            r2,
            uuid::Uuid::new_v4(),
            &format!("127.0.0.1:{}", 41000 + i),
            json!({}),
        )
        .await;
        if s != StatusCode::OK {
            assert!(
                body["message"].as_str().unwrap().contains("replicas"),
                "{body}"
            );
            last = s;
            break;
        }
    }
    assert_eq!(
        last,
        StatusCode::CONFLICT,
        "40 replicas of one edge registered"
    );
}

#[tokio::test]
async fn a_copy_of_the_database_mints_nothing_without_the_secrets_key() {
    use devmesh_shared::signing::SigningKey;
    let db = devmesh_tests::fresh_database().await;
    let p = devmesh_tests::TestPrimary::start_on(db.clone()).await;
    p.owner().await;
    p.stop().await;
    let mut conn = db.connect().await;
    let read = |q: &'static str| sqlx::query_as::<_, (String, Vec<u8>)>(q);
    let (kid, pkcs8) = read("SELECT kid, pkcs8 FROM signing_keys")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(SigningKey::from_pkcs8(kid.clone(), &pkcs8).is_err());
    let (_, sealing) = read("SELECT kid, key FROM app_encryption_keys")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_ne!(sealing.len(), 32, "the sealing key is stored in the clear");
    let ca: String = sqlx::query_scalar("SELECT key_pem FROM mesh_ca")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!ca.contains("PRIVATE KEY") && rcgen::KeyPair::from_pem(&ca).is_err());

    // Keys an older version stored in the clear are encrypted on the next
    // start, and keep working.
    let plain = SigningKey::generate(kid.clone());
    sqlx::query("UPDATE signing_keys SET pkcs8 = $1 WHERE kid = $2")
        .bind(plain.pkcs8())
        .bind(&kid)
        .execute(&mut conn)
        .await
        .unwrap();
    let p = devmesh_tests::TestPrimary::start_on(db.clone()).await;
    let owner = p.anon().login("owner@example.com", "owner-password").await;
    assert_eq!(owner.get("/users/me").await.0, StatusCode::OK);
    let (_, stored) = read("SELECT kid, pkcs8 FROM signing_keys")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(SigningKey::from_pkcs8(kid.clone(), &stored).is_err());
    p.stop().await;
}

#[tokio::test]
async fn a_mesh_certificate_alone_reaches_no_agent_and_dies_with_its_edge() {
    use crate::support::register;
    use devmesh_shared::tunnel::{self, MeshHeader, StreamHeader, io as tio};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let m = Mesh::start().await;
    let primary = format!("http://127.0.0.1:{}", m.primary_port);
    // An edge whose token leaked (or a hostile operator): it registers and
    // gets a genuine mesh certificate.
    let token = &rogue_edge(&m, "rogue").await;
    let (key, csr) = crate::support::csr();
    let (s, reg) = register(
        &primary,
        token,
        uuid::Uuid::new_v4(),
        "127.0.0.1:40009",
        json!({ "csr_pem": csr }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{reg}");

    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(reg["mesh_cert_pem"].as_str().unwrap().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let config = quic_client(
        reg["mesh_ca_pem"].as_str().unwrap(),
        tunnel::MESH_ALPN,
        Some((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))),
    );
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let (_, regions) = m.owner.get("/regions").await;
    let eu_relay: std::net::SocketAddr = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "eu")
        .unwrap()["relay_address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let dial = || async {
        endpoint
            .connect_with(
                config.clone(),
                eu_relay,
                &devmesh_shared::names::relay_server_name("eu"),
            )
            .unwrap()
            .await
            .unwrap()
    };
    let weu_agent: uuid::Uuid = {
        let (_, w) = m.alice.get("/users/me/workspaces/weu").await;
        w["agents"][0]["id"].as_str().unwrap().parse().unwrap()
    };

    // Straight to the home relay of alice's agent, asking for its database
    // port, or for a shell (its SSH server trusts whoever the stream is
    // opened for): refused without a grant naming that agent and stream.
    let conn = dial().await;
    for inner in [StreamHeader::Tcp { port: 5432 }, StreamHeader::Ssh] {
        for grant in [String::new(), "forged.grant.x".to_owned()] {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            tio::write_mesh_header(
                &mut send,
                &MeshHeader {
                    agent_id: weu_agent,
                    grant,
                    inner: inner.clone(),
                },
            )
            .await
            .unwrap();
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await.unwrap();
            assert_eq!(status[0], tunnel::status::DENIED, "{inner:?}");
        }
    }

    // With a user's key (edges see keys), the rogue edge asks the primary
    // for a probe: not audited, so its grant must open nothing else.
    let resp = reqwest::Client::new()
        .post(format!("{primary}/api/v2/edges/me/shell-access"))
        .header(devmesh_shared::api::EDGE_TOKEN_HEADER, token.as_str())
        .json(&json!({"agent_id": weu_agent, "key": m.alice_key(), "client_ip": "1.2.3.4", "kind": "probe"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let access: Value = resp.json().await.unwrap();
    let grant = access["grant"].as_str().unwrap().to_owned();
    for (inner, allowed) in [
        (StreamHeader::Probe { download: 0 }, true),
        (StreamHeader::Ssh, false),
        (
            StreamHeader::Pty {
                session: uuid::Uuid::new_v4(),
                cols: 80,
                rows: 24,
                command: String::new(),
            },
            false,
        ),
        (StreamHeader::Udp { port: 53 }, false),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        tio::write_mesh_header(
            &mut send,
            &MeshHeader {
                agent_id: weu_agent,
                grant: grant.clone(),
                inner: inner.clone(),
            },
        )
        .await
        .unwrap();
        let mut status = [0u8; 1];
        recv.read_exact(&mut status).await.unwrap();
        let expected = if allowed {
            tunnel::status::OK
        } else {
            tunnel::status::DENIED
        };
        assert_eq!(status[0], expected, "{inner:?} with a probe's grant");
    }

    // The owner deletes the edge: its link is cut within seconds, and its
    // certificate (still unexpired) opens no new one.
    let (s, _) = m.owner.delete("/edges/rogue").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the home relay cuts a deleted edge's mesh link");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == tunnel::close::NOT_A_MESH_PEER.into()),
        "{closed:?}"
    );
    let again = dial().await;
    let closed = tokio::time::timeout(Duration::from_secs(5), again.closed())
        .await
        .expect("a deleted edge's certificate opens no link");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == tunnel::close::NOT_A_MESH_PEER.into()),
        "{closed:?}"
    );
}

/// A QUIC client config trusting the mesh CA in `ca_pem`, speaking `alpn`,
/// with a client certificate when given.
#[tokio::test]
async fn an_attach_ticket_works_once_and_only_at_the_relay_it_names() {
    use devmesh_shared::tunnel::{self, Control, io as tio};
    let m = Mesh::start().await;
    let primary = format!("http://127.0.0.1:{}", m.primary_port);
    let (s, ws) = m
        .alice
        .post("/workspaces", json!({"name": "wt", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ws}");
    let agent_token = ws["agent_tokens"][0]["token"].as_str().unwrap().to_owned();
    let manifest: Value = reqwest::Client::new()
        .get(format!("{primary}/api/v2/workspaceagents/me/manifest"))
        .header(devmesh_shared::api::AGENT_TOKEN_HEADER, &agent_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let relay = |region: &str| {
        let r = manifest["relays"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == region)
            .unwrap_or_else(|| panic!("no {region} relay in {manifest}"));
        (
            r["address"].as_str().unwrap().to_owned(),
            r["server_name"].as_str().unwrap().to_owned(),
        )
    };
    let config = quic_client(
        manifest["mesh_ca_pem"].as_str().unwrap(),
        tunnel::ALPN,
        None,
    );
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let present = |(address, name): (String, String), ticket: String| {
        let (endpoint, config) = (endpoint.clone(), config.clone());
        async move {
            let conn = endpoint
                .connect_with(config, address.parse().unwrap(), &name)
                .unwrap()
                .await
                .unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            tio::write_control(&mut send, &Control::Attach { ticket })
                .await
                .unwrap();
            let answer = tio::read_control(&mut recv).await.unwrap();
            (conn, send, recv, answer)
        }
    };
    let eu = relay("eu");
    let ticket = ticket(&primary, &agent_token, &eu.0).await;

    // Another relay that saw it (here, ap) cannot use it.
    let (_c, _s, _r, answer) = present(relay("ap"), ticket.clone()).await;
    assert!(
        matches!(&answer, Some(Control::Refused { reason }) if reason.contains("another relay")),
        "{answer:?}"
    );
    // At eu it attaches once; the same ticket again is refused.
    let (_tunnel, _s, _r, answer) = present(eu.clone(), ticket.clone()).await;
    assert!(
        matches!(answer, Some(Control::Attached { .. })),
        "{answer:?}"
    );
    let (_c, _s2, _r2, answer) = present(eu.clone(), ticket).await;
    assert!(
        matches!(&answer, Some(Control::Refused { reason }) if reason.contains("already used")),
        "{answer:?}"
    );
    // No ticket at all for a relay that is not registered.
    let r = reqwest::Client::new()
        .post(format!("{primary}/api/v2/workspaceagents/me/attach-ticket"))
        .header(devmesh_shared::api::AGENT_TOKEN_HEADER, &agent_token)
        .json(&json!({ "relay": "203.0.113.9:4433" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

/// Reads `stream` (server-sent events) until an event's data contains
/// `needle`; everything read on the way.
async fn sse_until(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    seen: &mut String,
    needle: &str,
) {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {seen}"))
            .expect("the stream goes on")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_live_workspace_stream_shows_a_member_only_their_own_workspaces() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = crate::provisioning::primary_with(dir.path(), &[]).await;
    let (s, _) = owner
        .post(
            "/users",
            json!({"email": "bob@example.com", "username": "bob", "password": "bob-password"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let bob = devmesh_tests::Api::new(&server.url, None)
        .login("bob", "bob-password")
        .await;
    let (s, _) = owner
        .post(
            "/templates",
            json!({"name": "byo", "definition": {"agents": [{"name": "main"}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // Bob watches.
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v2/workspaces/watch", server.url))
        .header("Devmesh-Session-Token", bob.token.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    // The owner's workspace changes first, then bob's.
    let (s, _) = owner
        .post(
            "/workspaces",
            json!({"name": "owners-secret-ws", "template": "byo"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = bob
        .post("/workspaces", json!({"name": "bobs-ws", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    sse_until(&mut stream, &mut seen, "\"name\":\"bobs-ws\"").await;
    assert!(seen.contains("event: workspace"), "{seen}");
    assert!(!seen.contains("owners-secret-ws"), "{seen}");
    // Without credentials: nothing.
    let resp = reqwest::get(format!("{}/api/v2/workspaces/watch", server.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Signing out ends the stream, with nothing else happening.
    let (s, _) = bob.post("/users/logout", json!({})).await;
    assert!(s.is_success());
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended after signing out");
}
