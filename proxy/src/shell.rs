//! A shell session carried by one HTTP request, for the primary and the
//! edges alike: the request body is what the client sends, the response
//! body what the agent answers, both streamed, spliced to a tunnel stream
//! (`Ssh` or `Pty`) the region opened to the agent.
//!
//! The session ends when either side ends, when the region shuts down, or
//! within [`REVOCATION_CHECK`] of a revocation that cuts off its user, key
//! or workspace.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use devmesh_shared::api::RevokedSubject;
use futures_util::StreamExt;
use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;

use crate::revocations::Revocations;

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
    {
        let ended = ended.clone();
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
                    tracing::info!(
                        "a shell session's user, key or workspace was revoked; ending it"
                    );
                    ended.cancel();
                    return;
                }
            }
        });
    }
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
    let down = futures_util::stream::unfold((recv, guard), |(mut recv, guard)| async move {
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
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), (recv, guard)))
            }
            _ => None,
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
