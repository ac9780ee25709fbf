//! A user-space WAN emulator: a TCP and a UDP relay that deliver what they
//! receive after a link's one-way delay, with optional jitter, loss and a
//! bandwidth cap, in order, and with backpressure (a TCP relay stops reading
//! when its in-flight budget is full, so the sender's window closes as on a
//! real path).
//!
//! [`Shaper`] decides when each chunk may leave (sans-IO, takes `now`); the
//! relays only move bytes. Each relay counts connections, bytes and the
//! "turns" of its TCP connections (a request answered by a response), the
//! measure of cross-region round trips the regions scenario reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// === Link shaping ===

/// How one direction of a link behaves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkSpec {
    /// One-way delay.
    pub delay: Duration,
    /// Extra one-way delay, uniform in `0..=jitter`.
    pub jitter: Duration,
    /// Share of chunks lost.
    pub loss: f64,
    /// Bytes per second; `None` is uncapped.
    pub bytes_per_s: Option<f64>,
}

impl LinkSpec {
    /// A link with only a round-trip time.
    pub fn rtt(rtt: Duration) -> Self {
        Self {
            delay: rtt / 2,
            jitter: Duration::ZERO,
            loss: 0.0,
            bytes_per_s: None,
        }
    }
}

/// What happens to one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at this instant.
    At(Instant),
    /// Dropped (datagrams only).
    Lost,
}

/// Schedules chunks of one direction: delay plus jitter, serialisation time
/// under the bandwidth cap, never earlier than the chunk before (order is
/// kept even when jitter would reorder).
#[derive(Debug)]
pub struct Shaper {
    spec: LinkSpec,
    /// When the previous chunk leaves.
    last: Option<Instant>,
    /// When the link finishes serialising what it was given.
    wire_free: Option<Instant>,
}

impl Shaper {
    /// A shaper for `spec`.
    pub fn new(spec: LinkSpec) -> Self {
        Self {
            spec,
            last: None,
            wire_free: None,
        }
    }

    /// When a `len`-byte chunk received at `now` leaves. `roll` and
    /// `jitter_roll` are uniform in `[0, 1)`, drawn by the caller so tests
    /// can choose them. `datagram`: a lost chunk is dropped; on a stream it
    /// is delivered one round trip late, as a retransmission would be.
    pub fn schedule(
        &mut self,
        now: Instant,
        len: usize,
        roll: f64,
        jitter_roll: f64,
        datagram: bool,
    ) -> Verdict {
        let lost = roll < self.spec.loss;
        if lost && datagram {
            return Verdict::Lost;
        }
        // Serialisation under the cap: the chunk starts when the wire is free.
        let mut sent = now;
        if let Some(bps) = self.spec.bytes_per_s {
            let start = self.wire_free.map_or(now, |w| w.max(now));
            sent = start + Duration::from_secs_f64(len as f64 / bps);
            self.wire_free = Some(sent);
        }
        let mut at = sent + self.spec.delay + self.spec.jitter.mul_f64(jitter_roll.clamp(0.0, 1.0));
        if lost {
            at += self.spec.delay * 2;
        }
        if let Some(last) = self.last {
            at = at.max(last);
        }
        self.last = Some(at);
        Verdict::At(at)
    }
}

// === Counters ===

/// What crossed one emulated link.
#[derive(Debug, Default)]
pub struct Counters {
    /// TCP connections or UDP flows opened.
    pub connections: AtomicU64,
    /// Bytes client → server.
    pub bytes_up: AtomicU64,
    /// Bytes server → client.
    pub bytes_down: AtomicU64,
    /// TCP turns: the server's answer after the client spoke.
    pub round_trips: AtomicU64,
    /// Datagrams dropped by the loss setting.
    pub lost: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Connections or flows.
    pub connections: u64,
    /// Bytes client → server.
    pub bytes_up: u64,
    /// Bytes server → client.
    pub bytes_down: u64,
    /// Request/response turns.
    pub round_trips: u64,
    /// Dropped datagrams.
    pub lost: u64,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            connections: self.connections.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            round_trips: self.round_trips.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Sub for CounterSnapshot {
    type Output = CounterSnapshot;
    fn sub(self, o: Self) -> Self {
        CounterSnapshot {
            connections: self.connections - o.connections,
            bytes_up: self.bytes_up - o.bytes_up,
            bytes_down: self.bytes_down - o.bytes_down,
            round_trips: self.round_trips - o.round_trips,
            lost: self.lost - o.lost,
        }
    }
}

// === TCP relay ===

/// Bytes one direction of a TCP connection may hold in flight inside the
/// emulator (the emulated path's buffer). Past it the relay stops reading.
const TCP_IN_FLIGHT: usize = 16 * 1024 * 1024;
const TCP_CHUNK: usize = 64 * 1024;

/// A listening TCP relay to `target` over an emulated link.
#[derive(Debug)]
pub struct TcpRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// What crossed it.
    pub counters: Arc<Counters>,
}

impl TcpRelay {
    /// Listens on `127.0.0.1:0` and relays each connection to `target`.
    pub async fn start(
        target: SocketAddr,
        spec: LinkSpec,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let c = c.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = relay_tcp(client, server, spec, c) => {}
                    }
                });
            }
        });
        Ok(Self { addr, counters })
    }
}

/// Which way bytes last moved on a connection, to count turns.
const DIR_NONE: u64 = 0;
const DIR_UP: u64 = 1;
const DIR_DOWN: u64 = 2;

async fn relay_tcp(client: TcpStream, server: TcpStream, spec: LinkSpec, c: Arc<Counters>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let last_dir = Arc::new(AtomicU64::new(DIR_NONE));
    let up = pipe(cr, sw, spec, c.clone(), last_dir.clone(), true);
    let down = pipe(sr, cw, spec, c, last_dir, false);
    let _ = tokio::join!(up, down);
}

/// Moves one direction through a [`Shaper`]: a reader that stamps chunks
/// and a writer that releases them on time. The channel is bounded by bytes
/// through a semaphore, which is the backpressure.
pub async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    spec: LinkSpec,
    c: Arc<Counters>,
    last_dir: Arc<AtomicU64>,
    up: bool,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let budget = Arc::new(tokio::sync::Semaphore::new(TCP_IN_FLIGHT));
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(Instant, Vec<u8>, tokio::sync::OwnedSemaphorePermit)>();
    let writer = tokio::spawn(async move {
        while let Some((at, buf, permit)) = rx.recv().await {
            sleep_until(at).await;
            if w.write_all(&buf).await.is_err() {
                return;
            }
            drop(permit);
        }
        let _ = w.shutdown().await;
    });
    let mut shaper = Shaper::new(spec);
    let mut buf = vec![0u8; TCP_CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(permit) = budget.clone().acquire_many_owned(n as u32).await else {
            break;
        };
        let (bytes, dir) = if up {
            (&c.bytes_up, DIR_UP)
        } else {
            (&c.bytes_down, DIR_DOWN)
        };
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        let prev = last_dir.swap(dir, Ordering::Relaxed);
        if !up && prev == DIR_UP {
            c.round_trips.fetch_add(1, Ordering::Relaxed);
        }
        let (roll, jroll) = {
            let mut rng = rand::thread_rng();
            (rng.r#gen::<f64>(), rng.r#gen::<f64>())
        };
        let Verdict::At(at) = shaper.schedule(Instant::now(), n, roll, jroll, false) else {
            unreachable!("stream chunks are never dropped");
        };
        if tx.send((at, buf[..n].to_vec(), permit)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

// === UDP relay ===

/// Datagrams queued per direction of a flow before the relay drops, like a
/// router's queue.
const UDP_QUEUE: usize = 8192;

/// A UDP relay to `target` over an emulated link: each client address gets
/// its own socket towards the target, so the target sees distinct flows.
#[derive(Debug)]
pub struct UdpRelay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What crossed it.
    pub counters: Arc<Counters>,
}

impl UdpRelay {
    /// Binds `127.0.0.1:0` and relays to `target`.
    pub async fn start(
        target: SocketAddr,
        spec: LinkSpec,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        Self::start_by_source(target, spec, HashMap::new(), stop).await
    }

    /// Like [`UdpRelay::start`], with links that depend on the sender: a
    /// relay's front applies each peer relay's link to the datagrams from
    /// that relay's socket, and `default` to everyone else (its own
    /// region's agents).
    pub async fn start_by_source(
        target: SocketAddr,
        default: LinkSpec,
        by_source: HashMap<SocketAddr, LinkSpec>,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        tokio::spawn(async move {
            let mut flows: std::collections::HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>)>> =
                Default::default();
            let mut shapers: std::collections::HashMap<SocketAddr, Shaper> = Default::default();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = front.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                // Not the entry API: setting up a flow awaits in between.
                #[allow(clippy::map_entry)]
                if !flows.contains_key(&from) {
                    let spec = by_source.get(&from).copied().unwrap_or(default);
                    let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if back.connect(target).await.is_err() {
                        continue;
                    }
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    let back = Arc::new(back);
                    let (tx, rx) = mpsc::channel(UDP_QUEUE);
                    tokio::spawn(udp_release(rx, back.clone(), None));
                    // Server → client: read, shape, release through the front socket.
                    let (dtx, drx) = mpsc::channel(UDP_QUEUE);
                    tokio::spawn(udp_release(drx, front.clone(), Some(from)));
                    let (c2, stop2) = (c.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut shaper = Shaper::new(spec);
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = tokio::select! {
                                _ = stop2.cancelled() => break,
                                r = back.recv(&mut buf) => match r {
                                    Ok(n) => n,
                                    // An ICMP "port unreachable" for an
                                    // earlier datagram: the target died (a
                                    // relay killed). It may come back on
                                    // the same port; keep the flow.
                                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                                    Err(_) => break,
                                },
                            };
                            c2.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                            let (roll, jroll) = {
                                let mut rng = rand::thread_rng();
                                (rng.r#gen::<f64>(), rng.r#gen::<f64>())
                            };
                            match shaper.schedule(Instant::now(), n, roll, jroll, true) {
                                Verdict::Lost => {
                                    c2.lost.fetch_add(1, Ordering::Relaxed);
                                }
                                Verdict::At(at) => {
                                    if dtx.try_send((at, buf[..n].to_vec())).is_err() {
                                        c2.lost.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                    });
                    flows.insert(from, tx);
                    shapers.insert(from, Shaper::new(spec));
                }
                c.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                let (roll, jroll) = {
                    let mut rng = rand::thread_rng();
                    (rng.r#gen::<f64>(), rng.r#gen::<f64>())
                };
                let shaper = shapers.get_mut(&from).expect("inserted with its flow");
                match shaper.schedule(Instant::now(), n, roll, jroll, true) {
                    Verdict::Lost => {
                        c.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::At(at) => {
                        let tx = &flows[&from];
                        if tx.try_send((at, buf[..n].to_vec())).is_err() {
                            c.lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Ok(Self { addr, counters })
    }
}

async fn udp_release(
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    sock: Arc<UdpSocket>,
    to: Option<SocketAddr>,
) {
    while let Some((at, buf)) = rx.recv().await {
        sleep_until(at).await;
        let _ = match to {
            Some(to) => sock.send_to(&buf, to).await,
            None => sock.send(&buf).await,
        };
    }
}

// === Precise release times ===

/// Sleeps until `at` to within the OS timer's precision (tens of µs).
/// tokio's timer wheel fires on whole milliseconds, rounding up, so a 1 ms
/// one-way delay became 1–2 ms, and a request crossing two emulated 2 ms
/// links (four legs) carried up to 4 ms of the emulator's own. The coarse
/// part of a long wait stays on tokio's timer (so paused-clock tests still
/// advance); the last 2 ms are timed by [`Clock`]'s thread.
pub async fn sleep_until(at: Instant) {
    const COARSE: Duration = Duration::from_millis(2);
    let now = Instant::now();
    if at <= now {
        return;
    }
    if at - now > COARSE {
        tokio::time::sleep_until(at - COARSE).await;
    }
    let left = at.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        // Whichever comes first: the precise thread in real time, tokio's
        // timer under a paused test clock (which jumps straight to `at`).
        tokio::select! {
            _ = Clock::get().wait(left) => {}
            _ = tokio::time::sleep_until(at) => {}
        }
    }
}

/// The clock thread's notion of time: the OS's monotonic clock, never a
/// paused test clock (the thread runs outside any runtime).
#[allow(clippy::disallowed_types)]
type RealInstant = std::time::Instant;

/// One thread that keeps pending deadlines in a heap and wakes each with a
/// oneshot when it passes, sleeping on a condition variable in between.
struct Clock {
    state: parking_lot::Mutex<ClockState>,
    wake: parking_lot::Condvar,
}

#[derive(Default)]
struct ClockState {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(RealInstant, u64)>>,
    waiting: HashMap<u64, tokio::sync::oneshot::Sender<()>>,
    next: u64,
}

impl Clock {
    fn get() -> &'static Clock {
        static CLOCK: std::sync::OnceLock<&'static Clock> = std::sync::OnceLock::new();
        CLOCK.get_or_init(|| {
            let clock: &'static Clock = Box::leak(Box::new(Clock {
                state: parking_lot::Mutex::new(ClockState::default()),
                wake: parking_lot::Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("wan-clock".into())
                .spawn(move || clock.run())
                .expect("spawn the emulator's clock thread");
            clock
        })
    }

    async fn wait(&self, d: Duration) {
        let at = RealInstant::now() + d;
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = self.state.lock();
            let id = s.next;
            s.next += 1;
            let earliest = s.heap.peek().is_none_or(|r| at < r.0.0);
            s.heap.push(std::cmp::Reverse((at, id)));
            s.waiting.insert(id, tx);
            if earliest {
                self.wake.notify_one();
            }
        }
        let _ = rx.await;
    }

    fn run(&self) {
        let mut s = self.state.lock();
        loop {
            let now = RealInstant::now();
            while let Some(std::cmp::Reverse((at, id))) = s.heap.peek().copied()
                && at <= now
            {
                s.heap.pop();
                if let Some(tx) = s.waiting.remove(&id) {
                    let _ = tx.send(());
                }
            }
            match s.heap.peek().map(|r| r.0.0) {
                Some(at) => {
                    self.wake.wait_until(&mut s, at);
                }
                None => self.wake.wait(&mut s),
            }
        }
    }
}

#[cfg(test)]
mod tests;
