//! HTTPS on the primary: operator certificates (wildcard, reloaded when the
//! files change), the self-signed mode, and an agent that trusts a private
//! CA through --ca-cert. Certificates are generated at test time.

use std::path::Path;

use devmesh_tests::{Api, fresh_database};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{AgentProcess, Loopback, ServerProcess, eventually};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

fn leaf(ca: &Ca, names: &[&str], cn: &str, dir: &Path) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    // Write the key first: the server reloads when either file changes.
    std::fs::write(dir.join("key.pem.tmp"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.pem.tmp"), cert.pem()).unwrap();
    std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).unwrap();
}

fn client(ca_pem: &str, http2: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .dns_resolver(std::sync::Arc::new(Loopback))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap());
    if http2 {
        b = b.http2_prior_knowledge();
    } else {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// The common name of the certificate a TLS server presents, as curl sees it.
async fn served_cn(port: u16, ca_file: &Path) -> String {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-v",
            "-o",
            "/dev/null",
            "--cacert",
            ca_file.to_str().unwrap(),
        ])
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    err.lines()
        .find_map(|l| l.trim().strip_prefix("*  subject: CN=").map(str::to_owned))
        .unwrap_or(err)
}

#[tokio::test]
async fn https_with_operator_certificates_reloads_them_and_serves_apps_to_agents_behind_a_private_ca()
 {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let authority = ca("test operator CA");
    let ca_pem = authority.cert.pem();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    leaf(
        &authority,
        &["localhost", "*.apps.localhost"],
        "first",
        dir.path(),
    );

    // Bind first to learn a free port, so the access URL can name it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let access = format!("https://localhost:{port}");
    let url = db.url();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let server = ServerProcess::start(
        &[
            "--http-address",
            &addr,
            "--access-url",
            &access,
            "--wildcard-access-url",
            "*.apps.localhost",
            "--relay-address",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        dir.path(),
    )
    .await;
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // HTTP/1.1 and HTTP/2 (ALPN), certificate checked against the private CA.
    for http2 in [false, true] {
        let resp = client(&ca_pem, http2)
            .get(format!("{access}/api/v2/buildinfo"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.version(),
            if http2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            }
        );
    }
    // A client that does not trust the CA is refused by its own TLS check.
    assert!(
        reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(Loopback))
            .build()
            .unwrap()
            .get(format!("{access}/healthz"))
            .send()
            .await
            .is_err()
    );

    // Login cookies are Secure on HTTPS.
    let http = client(&ca_pem, false);
    http.post(format!("{access}/api/v2/users/first"))
        .json(&json!({"email": "o@example.com", "username": "owner", "password": "owner-password"}))
        .send()
        .await
        .unwrap();
    let login = http
        .post(format!("{access}/api/v2/users/login"))
        .json(&json!({"email": "owner", "password": "owner-password"}))
        .send()
        .await
        .unwrap();
    assert!(
        login.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
    let token = login.json::<serde_json::Value>().await.unwrap()["session_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // An agent that trusts the private CA through --ca-cert attaches and serves an app over HTTPS.
    let upstream = devmesh_tests::upstream::Upstream::start().await;
    let owner = Api {
        base: access.clone(),
        token: Some(token.clone()),
        http: http.clone(),
    };
    let (s, t) = owner
        .post("/templates", json!({"name": "t", "definition": {"agents": [{"name": "main", "apps": [{"slug": "web", "port": upstream.port()}]}]}}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let (_, ws) = owner
        .post("/workspaces", json!({"name": "w", "template": "t"}))
        .await;
    let agent_token = ws["agent_tokens"][0]["token"].as_str().unwrap();
    let _agent = AgentProcess::start_with(
        &access,
        agent_token,
        dir.path(),
        &[(
            "DEVMESH_CA_CERT",
            dir.path().join("ca.pem").to_str().unwrap(),
        )],
    );
    let app = format!("https://web--w--owner.apps.localhost:{port}/echo");
    let body: serde_json::Value = eventually(30, "the app over HTTPS", || {
        let (http, app, token) = (http.clone(), app.clone(), token.clone());
        async move {
            let r = http
                .get(&app)
                .header("Devmesh-Session-Token", &token)
                .send()
                .await
                .ok()?;
            if r.status() != StatusCode::OK {
                return None;
            }
            r.json().await.ok()
        }
    })
    .await;
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");

    // Replace the certificate files: the new one is served without a restart.
    assert_eq!(served_cn(port, &ca_file).await, "first");
    leaf(
        &authority,
        &["localhost", "*.apps.localhost"],
        "second",
        dir.path(),
    );
    eventually(20, "the reloaded certificate", || {
        let ca_file = ca_file.clone();
        async move { (served_cn(port, &ca_file).await == "second").then_some(()) }
    })
    .await;
    // A broken replacement keeps the last good certificate.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    // Wait for the server to have tried (and refused) the broken file.
    let log = server.log().to_path_buf();
    eventually(20, "the broken certificate refused", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("keeping the old TLS certificate"))
                .map(|_| ())
        }
    })
    .await;
    assert_eq!(served_cn(port, &ca_file).await, "second");
}

#[tokio::test]
async fn the_self_signed_mode_creates_a_ca_that_curl_can_trust() {
    let db = fresh_database().await;
    let dir = devmesh_tests::shared_tempdir("devmesh-tls-");
    let url = db.url();
    let server = ServerProcess::start(
        &["--tls-self-signed", "--data-dir", dir.to_str().unwrap()],
        &[("DEVMESH_POSTGRES_URL", url.expose())],
        &dir,
    )
    .await;
    let ca = dir.join("tls/ca.pem");
    assert!(ca.exists());
    let log = std::fs::read_to_string(server.log()).unwrap();
    assert!(log.contains("curl --cacert"), "{log}");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert", ca.to_str().unwrap()])
        .arg(format!("{}/healthz", server.url))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
