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

/// How long a complete request may take to be answered before the client
/// half-closes, and how long the server may then take to close.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

/// Decodes a corpus line: `\r \n \0 \\ \xHH`, and `{C*N}` repeating `C`
/// (itself decoded) `N` times. A `{` is a repetition only when `*N}` comes
/// before the next `{`; JSON braces stay literal.
fn decode(line: &str) -> Vec<u8> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 < b.len() => {
                match b[i + 1] {
                    b'r' => out.push(b'\r'),
                    b'n' => out.push(b'\n'),
                    b'0' => out.push(0),
                    b't' => out.push(b'\t'),
                    b'\\' => out.push(b'\\'),
                    b'x' if i + 3 < b.len() => {
                        let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                        out.push(u8::from_str_radix(hex, 16).unwrap());
                        i += 2;
                    }
                    other => out.extend_from_slice(&[b'\\', other]),
                }
                i += 2;
            }
            b'{' => {
                let rest = &line[i + 1..];
                let next_open = rest.find('{');
                let repeat = rest.find('*').and_then(|star| {
                    let digits: String = rest[star + 1..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    let close = star + 1 + digits.len();
                    (!digits.is_empty() && rest[close..].starts_with('}'))
                        .then(|| (star, digits.parse::<usize>().unwrap(), close))
                });
                match repeat {
                    Some((star, n, close)) if next_open.is_none_or(|o| o > close) => {
                        let unit = decode(&rest[..star]);
                        for _ in 0..n {
                            out.extend_from_slice(&unit);
                        }
                        i += 1 + close + 1;
                    }
                    _ => {
                        out.push(b'{');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

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
    let corpus = include_str!("../corpus/http.txt");
    let cases: Vec<(usize, Vec<u8>)> = corpus
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#') && !l.starts_with("QUIC "))
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
    let corpus = include_str!("../corpus/http.txt");
    let cases: Vec<(usize, Vec<u8>)> = corpus
        .lines()
        .enumerate()
        .filter_map(|(n, l)| Some((n + 1, decode(l.strip_prefix("QUIC ")?))))
        .collect();
    assert!(cases.len() >= 20, "{} QUIC cases", cases.len());
    for (line, bytes) in cases {
        let conn = endpoint
            .connect_with(config.clone(), relay, &server_name)
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("http.txt:{line}: the relay refused a handshake: {e}"));
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let _ = send.write_all(&bytes).await;
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
