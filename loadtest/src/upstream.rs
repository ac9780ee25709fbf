//! The upstream apps every path ends at, served from this process on
//! loopback: an HTTP echo of configurable size, a large-file server and an
//! upload sink that both verify a known byte pattern (the checksum of bulk
//! transfers), a WebSocket echo and an SSE stream.

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

// === The byte pattern ===

/// Period of the payload pattern: a prime, so that chunk boundaries never
/// line up with it and a shifted or repeated chunk is caught.
const PERIOD: usize = 251;
/// Copies of the period in the reference buffer.
const REFERENCE_PERIODS: usize = 1024;

/// The pattern byte at offset `i`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PERIOD as u64) as u8
}

fn reference() -> &'static [u8] {
    static REF: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        (0..(PERIOD * REFERENCE_PERIODS) as u64)
            .map(pattern_byte)
            .collect()
    })
}

/// `len` pattern bytes starting at offset `off`.
pub fn pattern_chunk(off: u64, len: usize) -> Bytes {
    let r = reference();
    let start = (off % PERIOD as u64) as usize;
    if start + len <= r.len() {
        Bytes::copy_from_slice(&r[start..start + len])
    } else {
        Bytes::from(
            (off..off + len as u64)
                .map(pattern_byte)
                .collect::<Vec<u8>>(),
        )
    }
}

/// Checks a received stream against the pattern, chunk by chunk: the
/// transfer's checksum, at memcmp speed so it does not bound throughput.
#[derive(Debug, Default, Clone)]
pub struct Verifier {
    /// Bytes checked so far.
    pub offset: u64,
    /// Whether every byte so far matched.
    pub ok: bool,
}

impl Verifier {
    /// A verifier at offset 0.
    pub fn new() -> Self {
        Self {
            offset: 0,
            ok: true,
        }
    }

    /// Checks the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        let r = reference();
        while !data.is_empty() {
            let start = (self.offset % PERIOD as u64) as usize;
            let n = data.len().min(r.len() - start);
            if data[..n] != r[start..start + n] {
                self.ok = false;
            }
            self.offset += n as u64;
            data = &data[n..];
        }
    }
}

// === The apps ===

#[derive(Debug, Deserialize)]
struct EchoQuery {
    size: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct SseQuery {
    events: Option<u32>,
    interval_ms: Option<u64>,
}

/// The app router.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { "devmesh-loadtest upstream" }))
        .route(
            "/echo",
            get(|Query(q): Query<EchoQuery>| async move {
                vec![b'x'; q.size.unwrap_or(1024).min(16 * 1024 * 1024)]
            }),
        )
        .route("/bytes/{n}", get(bytes))
        .route("/upload", post(upload))
        .route("/ws", get(ws))
        .route("/sse", get(sse))
}

async fn bytes(Path(n): Path<u64>) -> impl IntoResponse {
    const CHUNK: u64 = 256 * 1024;
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        (off < n).then(|| {
            let len = (n - off).min(CHUNK);
            (
                Ok::<_, std::io::Error>(pattern_chunk(off, len as usize)),
                off + len,
            )
        })
    });
    (
        [("content-length", n.to_string())],
        Body::from_stream(stream),
    )
}

async fn upload(body: Body) -> impl IntoResponse {
    let mut v = Verifier::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => v.update(&c),
            Err(_) => return (axum::http::StatusCode::BAD_REQUEST, "body error".to_owned()),
        }
    }
    let verdict = if v.ok { "ok" } else { "corrupt" };
    (
        axum::http::StatusCode::OK,
        format!("{verdict} {}", v.offset),
    )
}

async fn ws(upgrade: WebSocketUpgrade) -> impl IntoResponse {
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn sse(Query(q): Query<SseQuery>) -> impl IntoResponse {
    let events = q.events.unwrap_or(10);
    let interval = Duration::from_millis(q.interval_ms.unwrap_or(100));
    let stream = futures_util::stream::unfold(0u32, move |i| async move {
        if i >= events {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Some((
            Ok::<_, std::io::Error>(Bytes::from(format!("data: event {i}\n\n"))),
            i + 1,
        ))
    });
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(stream),
    )
}

/// Serves the apps on `127.0.0.1:0` until `stop`; returns the port.
pub async fn start(stop: CancellationToken) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router())
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_accepts_the_pattern_in_any_chunking_and_catches_a_flip() {
        let total = 3 * PERIOD * REFERENCE_PERIODS + 17;
        let data: Vec<u8> = (0..total as u64).map(pattern_byte).collect();
        for step in [1, 250, 251, 4096, 300_000] {
            let mut v = Verifier::new();
            for c in data.chunks(step) {
                v.update(c);
            }
            assert!(v.ok && v.offset == total as u64, "step {step}");
        }
        let mut bad = data.clone();
        bad[100_000] ^= 1;
        let mut v = Verifier::new();
        v.update(&bad);
        assert!(!v.ok);
    }

    #[test]
    fn chunks_continue_the_pattern() {
        let a = pattern_chunk(0, 1000);
        let b = pattern_chunk(1000, PERIOD * REFERENCE_PERIODS + 5);
        let mut v = Verifier::new();
        v.update(&a);
        v.update(&b);
        assert!(v.ok);
    }
}
