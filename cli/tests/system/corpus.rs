//! The malformed-input corpus (`cli/tests/corpus/http.txt`) against a real
//! `devmesh server`: every case gets a 4xx or a closed connection, never a
//! success, a server error, a hang or a panic, and nothing changes state.
//! Its `QUIC` cases go to the primary's relay as an agent's control stream:
//! each ends that connection, and the relay goes on serving.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::provisioning::primary_on_db;

#[path = "../corpus/decode.rs"]
mod decode;
use decode::{cases, decode};

/// How long a complete request may take to be answered before the client
/// half-closes, and how long the server may then take to close.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

/// What the server did with one case.
#[derive(Debug)]
enum Outcome {
    /// An HTTP/1 status code.
    Status(u16),
    /// It closed the connection, or answered in another protocol (an
    /// HTTP/2 GOAWAY) and closed.
    Closed,
    /// Still open, silent, after the client had half-closed.
    Hung,
}

async fn send(addr: &str, bytes: &[u8]) -> Outcome {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Outcome::Closed;
    };
    // The server may refuse to read a huge request to its end.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut half_closed = false;
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    loop {
        let limit = if half_closed {
            CLOSE_WITHIN
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.starts_with(b"HTTP/") && got.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
            Err(_) if !half_closed => {
                let _ = s.shutdown().await;
                half_closed = true;
            }
            Err(_) => return Outcome::Hung,
        }
    }
    if got.starts_with(b"HTTP/") {
        let code = got
            .split(|b| *b == b' ')
            .nth(1)
            .and_then(|c| std::str::from_utf8(c).ok()?.parse().ok())
            .unwrap_or(0);
        Outcome::Status(code)
    } else {
        Outcome::Closed
    }
}

/// Counts of what a case could change.
async fn state(api: &devmesh_tests::Api) -> Vec<usize> {
    let mut counts = Vec::new();
    for (path, field) in [
        ("/users/me/keys", "keys"),
        ("/users", "users"),
        ("/workspaces", "workspaces"),
        ("/templates", "templates"),
        ("/edges", "edges"),
    ] {
        let (_, body) = api.get(path).await;
        counts.push(
            body[field]
                .as_array()
                .or(body.as_array())
                .map_or(usize::MAX, Vec::len),
        );
    }
    counts
}

#[tokio::test]
async fn every_malformed_input_of_the_corpus_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_on_db(dir.path()).await;
    let token = owner.token.clone().unwrap();
    let addr = server.url.trim_start_matches("http://").to_owned();
    let cases: Vec<(usize, Vec<u8>)> = decode::CORPUS
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            !l.is_empty()
                && !l.starts_with('#')
                && !decode::STREAM_PREFIXES.iter().any(|p| l.starts_with(p))
        })
        .map(|(n, l)| {
            let bytes = match l.strip_prefix("API ") {
                Some(api) => {
                    let mut parts = api.splitn(3, ' ');
                    let (method, path, body) = (
                        parts.next().unwrap(),
                        parts.next().unwrap(),
                        decode(parts.next().unwrap_or("")),
                    );
                    let mut req = format!(
                        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nDevmesh-Session-Token: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    req.extend_from_slice(&body);
                    req
                }
                None => decode(l),
            };
            (n + 1, bytes)
        })
        .collect();
    assert!(cases.len() >= 200, "the corpus has {} cases", cases.len());
    let before = state(&owner).await;
    assert!(!before.contains(&usize::MAX), "unreadable state {before:?}");

    let outcomes: Vec<(usize, Outcome)> = futures_util::stream::iter(cases)
        .map(|(line, bytes)| {
            let addr = addr.clone();
            async move { (line, send(&addr, &bytes).await) }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let wrong: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| !matches!(o, Outcome::Status(400..=499) | Outcome::Closed))
        .map(|(line, o)| format!("http.txt:{line}: {o:?}"))
        .collect();
    assert!(wrong.is_empty(), "cases not refused:\n{}", wrong.join("\n"));

    // Still serving, nothing changed, nothing panicked, refusals counted.
    still_serving(&server).await;
    assert_eq!(
        state(&owner).await,
        before,
        "a refused request changed state"
    );
    let refused = crate::support::metric_where(&server.url, |l| {
        l.starts_with("devmesh_http_requests_total") && l.contains("status=\"4")
    })
    .await;
    assert!(refused >= 100, "only {refused} refusals counted");
}

#[tokio::test]
async fn garbage_on_a_relays_control_stream_ends_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_on_db(dir.path()).await;
    let (_, regions) = owner.get("/regions").await;
    let primary = &regions["regions"][0];
    let relay: std::net::SocketAddr = primary["relay_address"]
        .as_str()
        .expect("the primary's relay address")
        .parse()
        .unwrap();
    let server_name = devmesh_shared::names::relay_server_name(primary["name"].as_str().unwrap());
    let config = crate::support::quic_client(
        regions["mesh_ca_pem"].as_str().unwrap(),
        devmesh_shared::tunnel::ALPN,
        None,
    );
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cases = cases("QUIC ");
    assert!(cases.len() >= 20, "{} QUIC cases", cases.len());
    for (line, bytes) in &cases {
        let conn = endpoint
            .connect_with(config.clone(), relay, &server_name)
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("http.txt:{line}: the relay refused a handshake: {e}"));
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        // Refused: the relay closes the connection (no attach happened).
        tokio::time::timeout(CLOSE_WITHIN, conn.closed())
            .await
            .unwrap_or_else(|_| panic!("http.txt:{line}: the connection stayed open"));
    }
    // The relay and the server live on.
    let conn = endpoint
        .connect_with(config, relay, &server_name)
        .unwrap()
        .await
        .expect("the relay still accepts connections");
    conn.close(0u32.into(), b"done");
    // Each was counted: as malformed, or (a well-formed attach frame with a
    // worthless ticket) as a refused attach.
    let counted = crate::support::metric(&server.url, "devmesh_relay_malformed_total").await
        + crate::support::metric(&server.url, "devmesh_relay_attach_refused_total").await;
    assert_eq!(counted, cases.len() as u64);
    still_serving(&server).await;
}

#[tokio::test]
async fn garbage_on_a_mesh_stream_ends_that_stream_only() {
    use devmesh_shared::tunnel::{self, MeshHeader, StreamHeader, io as tio};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tempfile::tempdir().unwrap();
    let (server, owner, _db) = primary_on_db(dir.path()).await;
    // A registered edge's relay: it holds a genuine mesh certificate, so
    // the primary's relay takes its mesh connection and reads its streams.
    let (status, edge) = owner
        .post(
            "/edges",
            serde_json::json!({"name": "rogue", "access_url": "https://edge.example.com", "relay_hosts": ["127.0.0.1"]}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{edge}");
    let (key, csr) = crate::support::csr();
    let (status, reg) = crate::support::register(
        &server.url,
        edge["edge_token"].as_str().unwrap(),
        uuid::Uuid::new_v4(),
        "127.0.0.1:40009",
        serde_json::json!({ "csr_pem": csr }),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{reg}");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(reg["mesh_cert_pem"].as_str().unwrap().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let config = crate::support::quic_client(
        reg["mesh_ca_pem"].as_str().unwrap(),
        tunnel::MESH_ALPN,
        Some((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))),
    );
    let (_, regions) = owner.get("/regions").await;
    let primary = &regions["regions"][0];
    let relay: std::net::SocketAddr = primary["relay_address"].as_str().unwrap().parse().unwrap();
    let server_name = devmesh_shared::names::relay_server_name(primary["name"].as_str().unwrap());
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

    // The relay lists the new peer once the registration's event reaches
    // it: until then it closes the link. A well-formed stream without a
    // grant tells when (the relay answers it DENIED).
    let denied_header = MeshHeader {
        agent_id: uuid::Uuid::nil(),
        grant: String::new(),
        inner: StreamHeader::Tcp { port: 22 },
    };
    let mut probes = 0;
    let conn = loop {
        probes += 1;
        assert!(
            probes < 100,
            "the relay never took the registered edge's mesh link"
        );
        let conn = endpoint
            .connect_with(config.clone(), relay, &server_name)
            .unwrap()
            .await
            .unwrap();
        let answered = async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            tio::write_mesh_header(&mut send, &denied_header)
                .await
                .ok()?;
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await.ok()?;
            Some(status[0])
        };
        match tokio::time::timeout(ANSWER_WITHIN, answered).await {
            Ok(Some(status)) => {
                assert_eq!(status, tunnel::status::DENIED);
                break conn;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let denied_before =
        crate::support::metric(&server.url, "devmesh_relay_mesh_denied_total").await;
    let malformed_before =
        crate::support::metric(&server.url, "devmesh_relay_malformed_total").await;
    assert!(denied_before >= 1);

    let cases = cases("MESH ");
    assert!(cases.len() >= 20, "{} MESH cases", cases.len());
    for (line, bytes) in &cases {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // The relay may reset a long case before all of it is written.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let answer = tokio::time::timeout(CLOSE_WITHIN, recv.read_to_end(16))
            .await
            .unwrap_or_else(|_| panic!("http.txt:{line}: the stream stayed open"));
        // Reset, or refused with its status byte: never OK, never data.
        if let Ok(answer) = answer {
            assert!(
                answer.is_empty() || answer == [tunnel::status::DENIED],
                "http.txt:{line}: answered {answer:?}"
            );
        }
        assert!(
            conn.close_reason().is_none(),
            "http.txt:{line}: the mesh link was closed: {:?}",
            conn.close_reason()
        );
    }
    let malformed = crate::support::metric(&server.url, "devmesh_relay_malformed_total").await;
    let denied = crate::support::metric(&server.url, "devmesh_relay_mesh_denied_total").await;
    let (malformed, denied) = (malformed - malformed_before, denied - denied_before);
    assert_eq!(malformed + denied, cases.len() as u64);
    assert!(
        malformed >= cases.len() as u64 - 2,
        "only {malformed} counted as malformed"
    );
    // The link still carries a well-formed stream.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    tio::write_mesh_header(&mut send, &denied_header)
        .await
        .unwrap();
    let mut status = [0u8; 1];
    recv.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], tunnel::status::DENIED);
    still_serving(&server).await;
}

/// The server answers its health check and never panicked.
async fn still_serving(server: &crate::support::ServerProcess) {
    assert_eq!(
        reqwest::get(format!("{}/healthz", server.url))
            .await
            .unwrap()
            .status(),
        reqwest::StatusCode::OK
    );
    let log = std::fs::read_to_string(server.log()).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
