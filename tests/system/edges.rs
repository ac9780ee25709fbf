//! `devmesh edge` as a process: it registers with the primary, the region
//! turns healthy, it answers its health and latency endpoints, deregisters
//! on SIGTERM, and stops with a clear message when its token is revoked.

use std::process::Stdio;
use std::time::Duration;

use devmesh_tests::{Api, fresh_database};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{BIN, EdgeProcess, ServerProcess, eventually};

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
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let url = db.url();
    let primary = ServerProcess::start(
        &["--relay-address", "127.0.0.1:0"],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        dir.path(),
    )
    .await;
    let anon = Api::new(&primary.url, None);
    anon.post(
        "/users/first",
        json!({"email": "o@example.com", "username": "owner", "password": "owner-password"}),
    )
    .await;
    let owner = anon.login("owner", "owner-password").await;
    let (_, eu) = owner.post("/edges", json!({"name": "eu"})).await;
    let token = eu["edge_token"].as_str().unwrap().to_owned();

    let mut edge = EdgeProcess::start(&primary.url, &token, "eu", &[], dir.path()).await;
    let edge_url = edge.url.clone();
    let r = eventually(30, "the eu region healthy", || {
        let owner = owner.clone();
        async move { Some(region(&owner, "eu").await).filter(|r| r["healthy"] == true) }
    })
    .await;
    assert_eq!(r["access_url"], "http://eu.localhost:8080");
    assert_eq!(r["wildcard_hostname"], "*.eu.apps.localhost");

    let report: Value = reqwest::get(format!("{edge_url}/healthz-report"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["edge_name"], "eu");
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
    let mut edge = EdgeProcess::start(&primary.url, &token, "eu", &[], dir.path()).await;
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
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let url = db.url();
    let primary = ServerProcess::start(
        &["--relay-address", "127.0.0.1:0"],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        dir.path(),
    )
    .await;
    let anon = Api::new(&primary.url, None);
    anon.post(
        "/users/first",
        json!({"email": "o@example.com", "username": "owner", "password": "owner-password"}),
    )
    .await;
    let owner = anon.login("owner", "owner-password").await;
    let (_, ap) = owner.post("/edges", json!({"name": "ap"})).await;

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

    let mut child = Command::new(BIN)
        .args([
            "edge",
            "--primary-url",
            &primary.url,
            "--listen",
            "127.0.0.1:0",
            "--relay-address",
            "127.0.0.1:0",
            "--access-url",
            "https://ap.localhost",
        ])
        .arg("--tls-cert")
        .arg(dir.path().join("edge.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("edge.key"))
        .env("DEVMESH_EDGE_TOKEN", ap["edge_token"].as_str().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line
        .strip_prefix("Started edge listener at https://")
        .unwrap_or_else(|| panic!("{line}"))
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
    let _ = child.kill().await;
}
