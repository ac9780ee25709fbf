//! Shell sessions, for the primary and the edges alike, spliced to a
//! tunnel stream the region opened to the agent:
//! - SSH ([`splice`]): one HTTP request whose body is what the client
//!   sends and whose response body is what the agent answers, both
//!   streamed, on an `Ssh` stream;
//! - a reconnecting terminal ([`terminal`]): a WebSocket (what browsers
//!   can open) on a `Pty` stream. Binary messages carry input and output;
//!   a text message is JSON, `{"data": "…"}` for input and
//!   `{"cols": 120, "rows": 40}` to resize.
//!
//! The session ends when either side ends, when the region shuts down, or
//! within [`REVOCATION_CHECK`] of a revocation that cuts off its user, key
//! or workspace.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::http::header;
use axum::response::Response;
use devmesh_shared::api::RevokedSubject;
use futures_util::StreamExt;
use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;

use crate::revocations::Revocations;

/// Tells the client which way its session went: `Devmesh-Region`, and
/// `Devmesh-Route` (`here`, or `mesh:REGION`), `Devmesh-Open-Ms` (the round
/// trip that opened the stream, through every hop) and, across the mesh,
/// `Devmesh-Mesh-Rtt-Ms` (QUIC's estimate for the mesh link).
pub fn route_headers(
    resp: &mut Response,
    region: &str,
    route: &crate::relay::Route,
    opened_in: Duration,
) {
    use crate::relay::Route;
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = header::HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    };
    put("devmesh-region", region.to_owned());
    put("devmesh-open-ms", ms(opened_in));
    match route {
        Route::Here { .. } | Route::Unknown => put("devmesh-route", "here".into()),
        Route::Mesh { region, rtt } => {
            put("devmesh-route", format!("mesh:{region}"));
            if let Some(rtt) = rtt {
                put("devmesh-mesh-rtt-ms", ms(*rtt));
            }
        }
    }
}

/// A tunnel stream to an agent, both halves.
pub type Stream = (SendStream, RecvStream);

/// How often a session looks for revocations that end it.
pub const REVOCATION_CHECK: Duration = Duration::from_millis(250);
/// The most read from the agent per response chunk.
const CHUNK: usize = 32 * 1024;

/// Who a session runs for: what revocations end it, counted from when the
/// region (or the primary, for an edge) allowed it.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The user, their key and the workspace.
    pub subjects: Vec<RevokedSubject>,
    /// When access was decided, unix milliseconds.
    pub began_ms: i64,
}

/// One session: how it ends, and what it carried.
#[derive(Debug, Default)]
pub struct Session {
    /// Cancelled when the session is over, for whatever reason; cancelling
    /// it ends the session.
    pub ended: CancellationToken,
    up: AtomicU64,
    down: AtomicU64,
}

impl Session {
    /// A session that also ends when `parent` (the region's shutdown) is
    /// cancelled.
    pub fn new(parent: &CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            ended: parent.child_token(),
            ..Self::default()
        })
    }

    /// Bytes carried so far: client → agent, agent → client.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// Cancels the session when the response body is dropped (the client went
/// away), as well as when it ends.
struct EndOnDrop(CancellationToken);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Ends the session (cancels `ended`) once a revocation cuts its holder off.
fn watch_revocations(holder: Holder, revocations: Arc<Revocations>, ended: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = ended.cancelled() => return,
                () = tokio::time::sleep(REVOCATION_CHECK) => {}
            }
            if holder
                .subjects
                .iter()
                .any(|s| revocations.cuts(s, holder.began_ms))
            {
                tracing::info!("a shell session's user, key or workspace was revoked; ending it");
                ended.cancel();
                return;
            }
        }
    });
}

/// Splices `body` (client → agent) and the returned response (agent →
/// client) to the stream `(send, recv)`, for `session`.
pub fn splice(
    (mut send, recv): (SendStream, RecvStream),
    body: Body,
    holder: Holder,
    revocations: Arc<Revocations>,
    session: &Arc<Session>,
) -> Response {
    let ended = session.ended.clone();
    watch_revocations(holder, revocations, ended.clone());
    // Client → agent, until the client's body ends.
    let up_ended = ended.clone();
    let counts = session.clone();
    tokio::spawn(async move {
        let mut up = body.into_data_stream();
        loop {
            let chunk = tokio::select! {
                c = up.next() => c,
                () = up_ended.cancelled() => None,
            };
            match chunk {
                Some(Ok(b)) if send.write_all(&b).await.is_ok() => {
                    counts.up.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                _ => break,
            }
        }
        let _ = send.finish();
    });
    // Agent → client, as the response body.
    let guard = (EndOnDrop(ended), session.clone());
    // A stream that broke (the agent, or a relay on the way, went away)
    // ends the body with an error, so the client says so rather than
    // taking it for the session's end.
    let down = futures_util::stream::unfold(Some((recv, guard)), |state| async move {
        let (mut recv, guard) = state?;
        let mut buf = vec![0u8; CHUNK];
        let read = tokio::select! {
            r = recv.read(&mut buf) => r,
            () = guard.0.0.cancelled() => {
                let _ = recv.stop(devmesh_shared::tunnel::stream_code::DONE.into());
                return None;
            }
        };
        match read {
            Ok(Some(n)) => {
                buf.truncate(n);
                guard.1.down.fetch_add(n as u64, Ordering::Relaxed);
                Some((Ok(Bytes::from(buf)), Some((recv, guard))))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::info!(error = %e, "a shell session's stream to the agent broke");
                let lost = std::io::Error::other("the connection to the workspace agent was lost");
                Some((Err(lost), None))
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(down));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// How long a terminal's output may wait for its WebSocket client.
const WS_STALLED: Duration = Duration::from_secs(10);

/// The largest WebSocket message a terminal client may send.
pub const MAX_TERMINAL_MESSAGE: usize = 64 * 1024;

/// A text message from a terminal client.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminalMessage {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    cols: Option<u16>,
    #[serde(default)]
    rows: Option<u16>,
}

/// Answers a WebSocket upgrade with a [`terminal`] on `stream`. The
/// session ends (and `session.ended` is cancelled) whether or not the
/// client completes the upgrade.
pub fn upgrade_terminal(
    ws: axum::extract::WebSocketUpgrade,
    stream: (SendStream, RecvStream),
    holder: Holder,
    revocations: Arc<Revocations>,
    session: Arc<Session>,
) -> Response {
    let guard = EndOnDrop(session.ended.clone());
    ws.max_message_size(MAX_TERMINAL_MESSAGE)
        .max_frame_size(MAX_TERMINAL_MESSAGE)
        .on_upgrade(move |socket| async move {
            terminal(socket, stream, holder, revocations, session).await;
            drop(guard);
        })
}

/// Carries a terminal between the WebSocket `ws` and the `Pty` stream
/// `(send, recv)` until either ends or the session does. A malformed
/// message closes the WebSocket (1007) and the stream; the terminal itself
/// waits in the agent for the client to reconnect.
async fn terminal(
    mut ws: WebSocket,
    (mut send, mut recv): (SendStream, RecvStream),
    holder: Holder,
    revocations: Arc<Revocations>,
    session: Arc<Session>,
) {
    use devmesh_shared::tunnel::pty::Frame;
    let ended = session.ended.clone();
    watch_revocations(holder, revocations, ended.clone());
    let mut buf = vec![0u8; CHUNK];
    let close = loop {
        tokio::select! {
            () = ended.cancelled() => break (1001, "the session ended"),
            read = recv.read(&mut buf) => match read {
                Ok(Some(n)) => {
                    session.down.fetch_add(n as u64, Ordering::Relaxed);
                    let out = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    // A client that takes nothing for a while is let go; the
                    // terminal waits in the agent for it to come back.
                    match tokio::time::timeout(WS_STALLED, ws.send(out)).await {
                        Ok(Ok(())) => {}
                        _ => break (1001, "the client stopped reading"),
                    }
                }
                // The terminal's command ended.
                Ok(None) => break (1000, "the terminal ended"),
                Err(_) => break (1011, "the connection to the workspace was lost"),
            },
            msg = ws.recv() => {
                let frames = match msg {
                    Some(Ok(Message::Binary(b))) => vec![Frame::Input(b.to_vec())],
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<TerminalMessage>(&t) {
                        Ok(m) => {
                            let mut frames = Vec::new();
                            if let Some(d) = m.data {
                                frames.push(Frame::Input(d.into_bytes()));
                            }
                            if let (Some(cols), Some(rows)) = (m.cols, m.rows) {
                                frames.push(Frame::Resize { cols, rows });
                            }
                            frames
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "a malformed terminal message; closing");
                            break (1007, "malformed message");
                        }
                    },
                    Some(Ok(_)) => Vec::new(),
                    Some(Err(_)) | None => break (1000, ""),
                };
                let mut bytes = Vec::new();
                for f in &frames {
                    f.encode(&mut bytes);
                }
                session.up.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if send.write_all(&bytes).await.is_err() {
                    break (1011, "the connection to the workspace was lost");
                }
            }
        }
    };
    let _ = send.finish();
    let _ = recv.stop(devmesh_shared::tunnel::stream_code::DONE.into());
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: close.0,
            reason: close.1.into(),
        })))
        .await;
    ended.cancel();
}
