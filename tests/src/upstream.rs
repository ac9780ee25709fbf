//! The upstream app every test and load run ends at: what a workspace
//! would serve, on loopback, over HTTP and HTTPS (self-signed).
//!
//! * `GET /echo` → JSON of method, path, query and headers;
//! * `POST /echo` → the request body back, streamed;
//! * `GET /blob/{n}` → `n` bytes of `x` in one body (small requests);
//! * `GET /bytes/{n}` → `n` bytes of the [`pattern_byte`] pattern, streamed;
//! * `POST /sha256` → `{len, sha256}` of the body, consumed as a stream;
//! * `POST /upload` → `ok N` or `corrupt N`: the body checked against the
//!   pattern at memcmp speed (a bulk upload's checksum);
//! * `GET /sse` → server-sent events; each next event waits for `POST /sse/next`;
//! * `GET /ws` → WebSocket echo;
//! * `GET /healthz` → 200, or 500 after `POST /health/fail`;
//! * `GET /set-cookie` → tries to set a devmesh cookie and one of its own;
//! * anything else → like `GET /echo`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

#[derive(Clone, Default)]
struct Shared {
    next_event: Arc<Notify>,
    unhealthy: Arc<AtomicBool>,
}

/// A running upstream app; stops when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The same app over HTTPS (self-signed), as apps in workspaces often are.
    pub tls_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// === The byte pattern ===

/// Period of the payload pattern: a prime, so that chunk boundaries never
/// line up with it and a shifted or repeated chunk is caught.
const PERIOD: usize = 251;
/// Copies of the period in the reference buffer: enough that a chunk of
/// the upstream's largest size (256 KiB) at any phase is one slice of it.
/// (At 1,024 copies, 251 KiB, every 256 KiB chunk took the byte-by-byte
/// path and generating the body cost the load generator a third of the
/// machine during bulk runs.)
const REFERENCE_PERIODS: usize = 2048;

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
        // Longer than the reference: whole periods copied from it.
        let mut v = Vec::with_capacity(len);
        let mut at = start;
        while v.len() < len {
            let take = (len - v.len()).min(r.len() - at);
            v.extend_from_slice(&r[at..at + take]);
            at = (at + take) % PERIOD;
        }
        Bytes::from(v)
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

/// SHA-256 of the first `n` pattern bytes.
pub fn pattern_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut off = 0;
    while off < n {
        let len = (n - off).min(64 * 1024);
        h.update(pattern_chunk(off, len as usize));
        off += len;
    }
    hex::encode(h.finalize())
}

// === The app ===

impl Upstream {
    /// Starts the upstream on free loopback ports.
    pub async fn start() -> Self {
        Self::try_start().await.expect("start the upstream app")
    }

    /// [`Upstream::start`], for callers that report errors.
    pub async fn try_start() -> std::io::Result<Self> {
        let shared = Shared::default();
        let app = Router::new()
            .route("/echo", get(echo_get).post(echo_post))
            .route("/blob/{n}", get(blob))
            .route("/bytes/{n}", get(bytes))
            .route("/sha256", post(sha256))
            .route("/upload", post(upload))
            .route("/sse", get(sse))
            .route("/sse/next", post(sse_next))
            .route("/ws", get(ws))
            .route("/healthz", get(health))
            .route("/health/fail", post(health_fail))
            .route("/set-cookie", get(set_cookie))
            .fallback(echo_get)
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let plain_app = app.clone();
        let plain = tokio::spawn(async move {
            let _ = axum::serve(listener, plain_app).await;
        });
        let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let tls_addr = tls_listener.local_addr()?;
        let tls = tokio::spawn(serve_tls(tls_listener, app));
        Ok(Self {
            addr,
            tls_addr,
            tasks: vec![plain, tls],
        })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

async fn echo_get(req: Request) -> impl IntoResponse {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                serde_json::Value::String(v.to_str().unwrap_or_default().to_owned()),
            )
        })
        .collect();
    axum::Json(serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    }))
}

/// Tries to plant devmesh cookies next to one of its own: plainly, behind a
/// raw non-ASCII byte in an attribute (which once slipped past a filter
/// that read headers as text), nameless, and under other spellings.
async fn set_cookie() -> impl IntoResponse {
    let mut resp = "cookies set".into_response();
    for raw in [
        b"devmesh_app_key_0000=planted; Domain=apps.localhost; Path=/".as_slice(),
        b"devmesh_app_token_0000=planted; Domain=localhost; Path=/caf\xc3\xa9",
        b"DEVMESH_SESSION_TOKEN=planted; Path=/",
        b"__Host-devmesh_session_token=planted; Secure; Path=/",
        b"devmesh_app_state_planted",
        b"theme=dark; Path=/",
    ] {
        resp.headers_mut().append(
            "set-cookie",
            axum::http::HeaderValue::from_bytes(raw).expect("valid header bytes"),
        );
    }
    resp
}

async fn echo_post(headers: HeaderMap, body: Body) -> impl IntoResponse {
    let ct = headers.get("content-type").cloned();
    let mut resp = Body::from_stream(body.into_data_stream()).into_response();
    if let Some(ct) = ct {
        resp.headers_mut().insert("content-type", ct);
    }
    resp
}

async fn blob(Path(n): Path<usize>) -> Vec<u8> {
    vec![b'x'; n.min(16 * 1024 * 1024)]
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
            Err(_) => return (StatusCode::BAD_REQUEST, "body error".to_owned()),
        }
    }
    let verdict = if v.ok { "ok" } else { "corrupt" };
    (StatusCode::OK, format!("{verdict} {}", v.offset))
}

async fn sha256(body: Body) -> impl IntoResponse {
    let mut h = Sha256::new();
    let mut len = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return (StatusCode::BAD_REQUEST, "body error").into_response();
        };
        len += chunk.len() as u64;
        h.update(&chunk);
    }
    axum::Json(serde_json::json!({"len": len, "sha256": hex::encode(h.finalize())})).into_response()
}

async fn sse(State(s): State<Shared>) -> impl IntoResponse {
    let stream = futures_util::stream::unfold((0u32, s.next_event), |(i, next)| async move {
        if i == 3 {
            return None;
        }
        if i > 0 {
            next.notified().await;
        }
        Some((
            Ok::<_, std::io::Error>(Bytes::from(format!("data: event {i}\n\n"))),
            (i + 1, next),
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

async fn sse_next(State(s): State<Shared>) -> StatusCode {
    s.next_event.notify_one();
    StatusCode::NO_CONTENT
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

async fn health(State(s): State<Shared>) -> StatusCode {
    if s.unhealthy.load(Ordering::Relaxed) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

async fn health_fail(State(s): State<Shared>) -> StatusCode {
    s.unhealthy.store(true, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn serve_tls(listener: tokio::net::TcpListener, app: Router) {
    use tower::ServiceExt;
    crate::install();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(Body::new))
                });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
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
