//! Upstream apps for whole-system tests: what a workspace would serve.
//!
//! One server on `127.0.0.1:0` with:
//! * `GET /echo` → JSON of method, path, query and headers;
//! * `POST /echo` → the request body back, streamed;
//! * `GET /bytes/{n}` → `n` deterministic bytes ([`pattern`]), streamed;
//! * `POST /sha256` → `{len, sha256}` of the body, consumed as a stream;
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

/// The byte at offset `i` of every `/bytes/{n}` response.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

/// SHA-256 of the first `n` pattern bytes, computed the same way the server streams them.
pub fn pattern_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut off = 0;
    while off < n {
        let len = (n - off).min(64 * 1024);
        h.update(chunk(off, len));
        off += len;
    }
    hex::encode(h.finalize())
}

fn chunk(off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(pattern).collect()
}

impl Upstream {
    /// Starts the upstream on a free loopback port.
    pub async fn start() -> Self {
        let shared = Shared::default();
        let app = Router::new()
            .route("/echo", get(echo_get).post(echo_post))
            .route("/bytes/{n}", get(bytes))
            .route("/sha256", post(sha256))
            .route("/sse", get(sse))
            .route("/sse/next", post(sse_next))
            .route("/ws", get(ws))
            .route("/healthz", get(health))
            .route("/health/fail", post(health_fail))
            .route("/set-cookie", get(set_cookie))
            .fallback(echo_get)
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let plain_app = app.clone();
        let plain = tokio::spawn(async move {
            let _ = axum::serve(listener, plain_app).await;
        });
        let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let tls_addr = tls_listener.local_addr().expect("addr");
        let tls = tokio::spawn(serve_tls(tls_listener, app));
        Self {
            addr,
            tls_addr,
            tasks: vec![plain, tls],
        }
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

async fn bytes(Path(n): Path<u64>) -> impl IntoResponse {
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= n {
            return None;
        }
        let len = (n - off).min(64 * 1024);
        Some((
            Ok::<_, std::io::Error>(Bytes::from(chunk(off, len))),
            off + len,
        ))
    });
    (
        [("content-length", n.to_string())],
        Body::from_stream(stream),
    )
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
