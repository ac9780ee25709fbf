//! `devmesh edge` as a process: it registers with the primary, the region
//! turns healthy, it answers its health and latency endpoints, deregisters
//! on SIGTERM, and stops with a clear message when its token is revoked.
//! Also: the relays of healthy edges reach agents' manifests.

use devmesh_tests::{Api, TestPrimary, fresh_database};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{EdgeProcess, ServerProcess, create_edge, eventually, register};

/// A primary process on a fresh database, and its first user (an owner).
async fn primary_with_owner(dir: &std::path::Path) -> (ServerProcess, Api) {
    let db = fresh_database().await;
    let url = db.url();
    let primary = ServerProcess::start(
        &["--relay-address", "127.0.0.1:0"],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        dir,
    )
    .await;
    let anon = Api::new(&primary.url, None);
    anon.post(
        "/users/first",
        json!({"email": "o@example.com", "username": "owner", "password": "owner-password"}),
    )
    .await;
    let owner = anon.login("owner", "owner-password").await;
    (primary, owner)
}

async fn region(owner: &Api, name: &str) -> Value {
    let (_, r) = owner.get("/regions").await;
    r["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn an_edge_registers_reports_health_deregisters_and_stops_when_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, owner) = primary_with_owner(dir.path()).await;
    let (mut edge, token) = create_edge(&owner, &primary.url, "eu", &[], dir.path()).await;
    let edge_url = edge.url.clone();
    let r = eventually(30, "the eu region healthy", || {
        let owner = owner.clone();
        async move { Some(region(&owner, "eu").await).filter(|r| r["healthy"] == true) }
    })
    .await;
    assert_eq!(r["access_url"], edge.url);
    assert_eq!(r["wildcard_hostname"], "*.eu.apps.localhost");

    // The primary records the registration a moment before the edge has
    // read its answer.
    let report: Value = eventually(30, "the edge's report names its region", || async {
        let r: Value = reqwest::get(format!("{edge_url}/healthz-report"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (r["edge_name"] == "eu").then_some(r)
    })
    .await;
    assert_eq!(report["primary_reachable"], true);
    let latency = reqwest::get(format!("{edge_url}/latency-check"))
        .await
        .unwrap();
    assert_eq!(latency.status(), StatusCode::OK);
    assert_eq!(latency.headers()["access-control-allow-origin"], "*");
    assert_eq!(latency.headers()["timing-allow-origin"], "*");

    // SIGTERM: the edge deregisters and exits cleanly.
    edge.signal(Signal::SIGTERM);
    let status = edge.wait(20).await;
    assert!(status.success(), "{status}");
    assert_eq!(region(&owner, "eu").await["status"], "unregistered");

    // A revoked token stops the edge with a message saying so.
    let port = edge.port();
    let mut edge = EdgeProcess::start(&primary.url, &token, "eu", port, &[], dir.path()).await;
    eventually(30, "the eu region healthy again", || {
        let owner = owner.clone();
        async move { Some(region(&owner, "eu").await).filter(|r| r["healthy"] == true) }
    })
    .await;
    let (s, _) = owner.post("/edges/eu/token", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let status = edge.wait(40).await;
    assert_eq!(status.code(), Some(1));
    let err = edge.log_text();
    assert!(err.contains("revoked"), "{err}");
}

#[tokio::test]
async fn an_edge_terminates_tls_with_the_operators_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, owner) = primary_with_owner(dir.path()).await;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["ap.localhost".into(), "*.ap.apps.localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
    std::fs::write(dir.path().join("edge.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("edge.key"), key.serialize_pem()).unwrap();

    let (cert, key) = (dir.path().join("edge.pem"), dir.path().join("edge.key"));
    let (edge, _) = create_edge(
        &owner,
        &primary.url,
        "ap",
        &[
            "--access-url",
            "https://ap.localhost",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        dir.path(),
    )
    .await;
    let addr = edge
        .url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("{}", edge.url))
        .to_owned();
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("ap.localhost", addr.parse().unwrap())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let resp = client
        .get(format!("https://ap.localhost:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "ok");
    edge.kill().await;
}

/// `(region, address, server_name)` of each relay in a list.
fn relays(list: &Value) -> Vec<(String, String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let field = |f: &str| r[f].as_str().unwrap().to_owned();
            (field("region"), field("address"), field("server_name"))
        })
        .collect()
}

#[tokio::test]
async fn manifests_list_the_relays_of_edges_that_heartbeated_recently() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let (s, t) = owner
        .post(
            "/templates",
            json!({"name": "byo", "definition": {"agents": [{"name": "main"}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let (s, ws) = owner
        .post("/workspaces", json!({"name": "ws", "template": "byo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ws}");
    let agent_token = ws["agent_tokens"][0]["token"].as_str().unwrap().to_owned();
    let manifest_relays = || async {
        let resp = reqwest::Client::new()
            .get(format!("{}/api/v2/workspaceagents/me/manifest", p.url))
            .header(devmesh_shared::api::AGENT_TOKEN_HEADER, &agent_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        relays(&resp.json::<Value>().await.unwrap()["relays"])
    };
    let primary_relay = manifest_relays().await;
    assert_eq!(primary_relay.len(), 1);
    assert_eq!(primary_relay[0].0, "primary");
    assert_eq!(primary_relay[0].2, "primary.relay.devmesh.internal");

    let mut tokens = Vec::new();
    for (name, hosts) in [
        ("eu", json!(["10.0.0.1", "10.0.0.2"])),
        ("us", json!(["10.0.1.1"])),
    ] {
        let (_, e) = owner
            .post(
                "/edges",
                json!({"name": name, "access_url": "https://edge.example.com", "relay_hosts": hosts}),
            )
            .await;
        tokens.push(e["edge_token"].as_str().unwrap().to_owned());
    }
    let (eu_1, eu_2, us_1) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    let (s, r) = register(&p.url, &tokens[0], eu_1, "10.0.0.1:4433", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (s, r) = register(&p.url, &tokens[1], us_1, "10.0.1.1:4433", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    // The us replica stops heartbeating: past the 30 s it is not healthy.
    sqlx::query(
        "UPDATE relay_replicas SET last_heartbeat_at = now() - interval '31 seconds' WHERE replica_id = $1",
    )
    .bind(us_1)
    .execute(p.pool())
    .await
    .unwrap();

    let eu = |address: &str| {
        (
            "eu".to_owned(),
            address.to_owned(),
            "eu.relay.devmesh.internal".to_owned(),
        )
    };
    let listed = manifest_relays().await;
    assert_eq!(listed, [primary_relay[0].clone(), eu("10.0.0.1:4433")]);

    // A second eu replica: agents see both.
    let (s, second) = register(&p.url, &tokens[0], eu_2, "10.0.0.2:4433", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{second}");
    let listed = manifest_relays().await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.contains(&eu("10.0.0.2:4433")), "{listed:?}");
    p.stop().await;
}

#[tokio::test]
async fn an_edge_the_primary_cannot_call_back_is_unhealthy() {
    let p = TestPrimary::start().await;
    let owner = p.owner().await;
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats arrive, but nothing answers at the advertised access URL.
    let _edge = create_edge(
        &owner,
        &p.url,
        "eu",
        &["--access-url", "http://127.0.0.1:9"],
        dir.path(),
    )
    .await;
    let r = eventually(40, "the eu region unhealthy", || {
        let owner = owner.clone();
        async move { Some(region(&owner, "eu").await).filter(|r| r["status"] == "unhealthy") }
    })
    .await;
    assert_eq!(r["healthy"], false);
    let (_, edges) = owner.get("/edges").await;
    assert_eq!(edges["edges"][0]["status"], "unhealthy");
}

#[tokio::test]
async fn an_edge_runs_from_a_settings_file_and_refuses_bad_settings_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, owner) = primary_with_owner(dir.path()).await;
    let port = crate::support::free_port().unwrap();
    let (s, e) = owner
        .post(
            "/edges",
            json!({"name": "eu", "access_url": format!("http://127.0.0.1:{port}"),
                   "wildcard_hostname": "*.eu.apps.localhost", "relay_hosts": ["127.0.0.1"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        format!(
            "primary-url = \"{}\"\nedge-token = \"{}\"\naccess-url = \"http://127.0.0.1:{port}\"\n\
             listen = \"127.0.0.1:{port}\"\nwildcard-access-url = \"*.eu.apps.localhost\"\n\
             relay-address = \"127.0.0.1:0\"\n",
            primary.url,
            e["edge_token"].as_str().unwrap()
        ),
    )
    .unwrap();
    let _edge = EdgeProcess::start_with_config(&file, dir.path()).await;
    eventually(30, "the eu region healthy", || {
        let owner = owner.clone();
        async move { Some(region(&owner, "eu").await).filter(|r| r["healthy"] == true) }
    })
    .await;

    // A bad setting is a usage error (exit 64) naming it, before anything binds.
    std::fs::write(&file, "primary-url = \"ftp://x\"\nedge-token = \"x\"\n").unwrap();
    let out = tokio::process::Command::new(crate::support::BIN)
        .args(["edge", "--config"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--primary-url") && err.lines().count() == 1,
        "{err}"
    );
}
