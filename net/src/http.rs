//! The one HTTP accept loop the primary and the edges serve with, over
//! plain TCP or TLS: HTTP/1.1 and HTTP/2 (ALPN or prior knowledge), one
//! task per connection with the TLS handshake inside it under a timeout,
//! connection caps (in all and per client IP), a header-read timeout, an
//! idle timeout, and a graceful drain on shutdown.
//!
//! The idle timeout closes a connection that moves no byte for that long
//! while no request is in flight: a client that connects and says nothing,
//! or that keeps an idle keep-alive connection forever. A slow download, a
//! long poll or an upgraded WebSocket are requests in flight, and never
//! idle. The header-read timeout (hyper's) bounds how long a request's head
//! may take to arrive, so a head sent a byte at a time cannot hold a slot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// The largest request head (request line and headers) accepted, in
/// bytes: 64 KiB, twice nginx's default of four 8 KiB buffers, enough for
/// any browser's cookies; larger heads are refused, not buffered.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Bounds on what clients may hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once, from everyone.
    pub max_connections: usize,
    /// Connections at once from one IP address; 0 means no limit.
    pub max_connections_per_ip: usize,
    /// Time for a request's head to arrive, once a connection waits for one.
    pub header_read_timeout: Duration,
    /// Time a connection may stay silent while no request is in flight.
    pub idle_timeout: Duration,
    /// Time for the TLS handshake.
    pub handshake_timeout: Duration,
    /// How long open connections get to finish on shutdown.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_connections_per_ip: 1_024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
        }
    }
}

/// Connections open per client IP (for any listener: the HTTP accept loop
/// here, the relays' QUIC endpoints).
#[derive(Debug, Default)]
pub struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// One connection's slot in [`PerIp`], given back on drop.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A slot for one more connection from `ip`, unless it has `max` open
    /// already (`0`: no limit).
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut map = self.0.lock();
        let n = map.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, over TLS when `tls` is
/// given, within `limits`. The client's address reaches handlers as
/// `ConnectInfo<SocketAddr>`; `TCP_NODELAY` is set on every connection
/// (Nagle's algorithm against delayed ACKs costs 40 ms a round trip).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    limits: Limits,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};

    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A request head past this is refused (431) before it is parsed.
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp::default());
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(client.addr = %remote, "connection limit reached; dropping a connection");
            continue;
        };
        let Some(slot) = per_ip.take(remote.ip(), limits.max_connections_per_ip) else {
            tracing::warn!(client.addr = %remote, limit = limits.max_connections_per_ip, "per-IP connection limit reached; dropping a connection");
            continue;
        };
        let (acceptor, app, builder, watcher) = (
            acceptor.clone(),
            app.clone(),
            builder.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            let _held = (permit, slot);
            let activity = Arc::new(Activity::default());
            let io = IdleIo::new(tcp, activity.clone(), limits.idle_timeout);
            let service = service(app, remote, activity);
            let result = match acceptor {
                None => {
                    let conn = builder
                        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(
                        limits.handshake_timeout,
                        acceptor.accept(io),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(client.addr = %remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(client.addr = %remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder
                        .serve_connection_with_upgrades(
                            hyper_util::rt::TokioIo::new(stream),
                            service,
                        )
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client.addr = %remote, error = %e, "connection ended");
            }
        });
    }
    if tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.grace, "connections still open after the grace period; closing them");
    }
}

/// The app as a hyper service that records requests in flight (until
/// their response body ends) and upgrades on the connection's [`Activity`].
fn service(
    app: axum::Router,
    remote: SocketAddr,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    use tower::ServiceExt;
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        let guard = InFlight::new(activity.clone());
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await?;
            if resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                guard.activity.upgraded.store(true, Ordering::Release);
            }
            Ok(resp.map(|body| {
                axum::body::Body::new(GuardedBody {
                    inner: body,
                    _guard: guard,
                })
            }))
        }
    })
}

// === Idle tracking ===

/// What a connection is doing, shared by its IO and its service.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
}

impl Activity {
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0 || self.upgraded.load(Ordering::Acquire)
    }
}

/// One request in flight, until dropped with its response body.
struct InFlight {
    activity: Arc<Activity>,
}

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self { activity }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight.
struct GuardedBody {
    inner: axum::body::Body,
    _guard: InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that fails reads with `TimedOut` once it has moved no byte for
/// `idle` while its connection had nothing in flight.
struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, activity: Arc<Activity>, idle: Duration) -> Self {
        Self {
            inner,
            activity,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                ready!(self.deadline.as_mut().poll(cx));
                if self.activity.busy() {
                    // Not idle, just quiet: look again after another period.
                    self.touch();
                    let _ = self.deadline.as_mut().poll(cx);
                    return Poll::Pending;
                }
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle connection",
                )))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        if matches!(r, Ok(n) if n > 0) {
            self.touch();
        }
        Poll::Ready(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        if matches!(r, Ok(n) if n > 0) {
            self.touch();
        }
        Poll::Ready(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        tokio::spawn(serve(listener, app, None, stop.clone(), limits));
        (addr, stop)
    }

    /// Reads until the server closes; errs if it does not within `secs`.
    async fn closed_within(s: &mut tokio::net::TcpStream, secs: u64) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection in time")
            .ok();
        out
    }

    #[tokio::test]
    async fn silent_and_half_sent_requests_are_dropped() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(300),
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop) = server(limits).await;
        // Says nothing at all.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_within(&mut silent, 5).await;
        // Sends half a request head, a byte at a time.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        for b in b"GET / HTTP/1.1\r\nHost: x\r\n" {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed_within(&mut slow, 5).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        // A whole request is answered, then the idle keep-alive closed.
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = closed_within(&mut ok, 5).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }

    #[tokio::test]
    async fn connections_per_ip_are_capped() {
        let limits = Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let (addr, _stop) = server(limits).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The third is accepted by the kernel, then dropped at once.
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(closed_within(&mut c, 5).await.is_empty());
        drop(_a);
        // A slot freed is a slot usable again, once the server sees it go.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = d
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            if closed_within(&mut d, 5).await.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "the freed slot is never reused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
