//! Interactive traffic before bulk, per app of a workspace.
//!
//! Every app connection to one workspace crosses the same proxy, the same
//! agent and the same cores. A download that keeps them busy makes each
//! page load, API call and keystroke to that workspace wait for a core:
//! on a 2-core machine, 64 small clients' p99 grew 5× beside one download.
//! QUIC stream priorities do not help (measured: no change), because the
//! tunnel connection is not the bottleneck; the CPU every hop spends per
//! byte is.
//!
//! So a connection moving bulk (over [`BULK_ENTER`] bytes/s in its last
//! [`WINDOW`]) while an interactive connection to the same app (the same
//! port of the same workspace agent) has moved bytes in the last
//! [`RECENT`] is paced to [`SHARE`] of the speed it had unpaced. Its reads
//! and writes wait, so the whole chain behind it (QUIC flow control, the
//! agent, the app, the client) slows with it and the cores go to the
//! interactive requests. Pacing counts bytes, not time: a pause of the
//! reads alone would let the agent fill the stream's 8 MiB window
//! meanwhile, and the next read would drain it at once. When the
//! interactive traffic stops, it runs at full speed again within
//! [`RECENT`] (a paced connection asks again at least that often).
//!
//! Another app's or workspace's traffic never slows it: fairness between
//! them is the operating system's scheduler's. Lanes are per app, not per
//! workspace, because an app's port may be shared: a stranger using a
//! public port can pace downloads from that port (whose capacity they
//! share anyway), never from the owner's other ports.
//!
//! [`Pacer`] is the state machine (it takes `now`, it never reads the
//! clock); [`Paced`] drives it for a connection's reads and writes.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use uuid::Uuid;

use crate::relay::RelayStats;

/// How long a connection's rate is measured over.
pub const WINDOW: Duration = Duration::from_millis(10);
/// A connection above this rate (bytes/s) over a window is moving bulk:
/// 24 MiB/s, 250 KiB in 10 ms; one keep-alive connection of small requests
/// stays far below it even back to back.
pub const BULK_ENTER: f64 = 24.0 * 1024.0 * 1024.0;
/// A bulk connection below this rate over a window is interactive again.
pub const BULK_LEAVE: f64 = 2.0 * 1024.0 * 1024.0;
/// Interactive bytes this recent make an app's lane busy.
pub const RECENT: Duration = Duration::from_millis(10);
/// While its lane is busy, a bulk connection moves at this share of
/// the speed it had unpaced.
pub const SHARE: f64 = 0.25;
/// A lane marked this recently is not marked again (well under [`RECENT`]).
const TOUCH_EVERY: Duration = Duration::from_millis(1);
/// How far ahead a paced connection may move at once, in time at its paced
/// rate: above the timer's millisecond, so a late wake-up is not lost rate.
pub const BURST: Duration = Duration::from_millis(4);

// === Lanes ===

/// One app's traffic at this proxy (a port of a workspace agent): when an
/// interactive connection to it last moved bytes.
#[derive(Debug)]
pub struct Lane {
    /// What the timestamps count from.
    born: Instant,
    /// Microseconds from `born` to the last interactive bytes, plus one
    /// (0: never).
    interactive_at: AtomicU64,
}

impl Lane {
    fn new(now: Instant) -> Self {
        Self {
            born: now,
            interactive_at: AtomicU64::new(0),
        }
    }

    fn micros(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.born).as_micros()).unwrap_or(u64::MAX)
    }

    /// Interactive bytes moved at `now`; returns the mark left, or `None`
    /// when the lane was marked less than [`TOUCH_EVERY`] ago (a read of a
    /// shared line instead of a write on every interactive read and write).
    fn touch(&self, now: Instant) -> Option<u64> {
        let mark = self.micros(now).saturating_add(1);
        let at = self.interactive_at.load(Ordering::Relaxed);
        if at != 0 && mark.saturating_sub(at) < TOUCH_EVERY.as_micros() as u64 {
            return None;
        }
        self.interactive_at.fetch_max(mark, Ordering::Relaxed);
        Some(mark)
    }

    /// Whether interactive bytes moved within [`RECENT`] of `now`, other
    /// than those that left the mark `mine` (a download's own first bytes
    /// must not hold it back).
    fn busy(&self, now: Instant, mine: u64) -> bool {
        match self.interactive_at.load(Ordering::Relaxed) {
            0 => false,
            at if at == mine => false,
            at => self.micros(now).saturating_sub(at - 1) < RECENT.as_micros() as u64,
        }
    }
}

/// The lanes of the apps (a workspace agent's port) this proxy carries
/// traffic for, each kept while a connection to it is open.
#[derive(Debug, Default)]
pub struct Lanes(Mutex<LaneMap>);

#[derive(Debug, Default)]
struct LaneMap {
    by_app: HashMap<(Uuid, u16), Weak<Lane>>,
    /// Entries at which the map is next swept of lanes nobody holds.
    sweep_at: usize,
}

impl Lanes {
    /// The lane of the app on `port` of `agent`'s workspace, shared with
    /// its other connections.
    pub fn lane(&self, agent: Uuid, port: u16) -> Arc<Lane> {
        let mut lanes = self.0.lock();
        if let Some(lane) = lanes.by_app.get(&(agent, port)).and_then(Weak::upgrade) {
            return lane;
        }
        let lane = Arc::new(Lane::new(Instant::now()));
        lanes.by_app.insert((agent, port), Arc::downgrade(&lane));
        // Amortised: sweep when the map has doubled since the last sweep.
        if lanes.by_app.len() >= lanes.sweep_at {
            lanes.by_app.retain(|_, l| l.strong_count() > 0);
            lanes.sweep_at = (lanes.by_app.len() * 2).max(64);
        }
        lane
    }

    /// Lanes in the map.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().by_app.len()
    }
}

// === The state machine ===

/// One connection's pace: its rate over the last window, whether that
/// makes it bulk, its full speed, and its credit while held to [`SHARE`]
/// of that speed.
#[derive(Debug)]
pub struct Pacer {
    lane: Arc<Lane>,
    window_start: Instant,
    window_bytes: u64,
    bulk: bool,
    /// Bytes/s over the last window it moved without being paced.
    full_rate: f64,
    /// Whether it is being paced (bulk, and its lane busy).
    pacing: bool,
    /// Whether it was paced at any time in the current window.
    paced_in_window: bool,
    /// Bytes it may move now while paced (negative: owed).
    credit: f64,
    /// When `credit` was last topped up.
    refilled: Instant,
    /// The last mark this connection left on its lane.
    touched: u64,
    /// Whether it has moved any bytes yet (its first window starts there,
    /// not at the handshake).
    started: bool,
    /// When it last moved bytes or was held back.
    active: Instant,
}

impl Pacer {
    /// A connection on `lane`, opened at `now`: interactive until its rate says otherwise.
    pub fn new(lane: Arc<Lane>, now: Instant) -> Self {
        Self {
            lane,
            window_start: now,
            window_bytes: 0,
            bulk: false,
            full_rate: BULK_ENTER,
            pacing: false,
            paced_in_window: false,
            credit: 0.0,
            refilled: now,
            touched: 0,
            started: false,
            active: now,
        }
    }

    /// The rate it is held to while paced, bytes/s.
    fn paced_rate(&self) -> f64 {
        self.full_rate * SHARE
    }

    /// Whether the connection may move bytes at `now`; if not, when to ask
    /// again.
    pub fn admit(&mut self, now: Instant) -> Result<(), Instant> {
        // A connection idle for a while (a pooled one, reused) is judged
        // afresh by what it moves next. Held back is not idle.
        if self.bulk && now.saturating_duration_since(self.active) > 4 * WINDOW {
            self.bulk = false;
            self.window_start = now;
            self.window_bytes = 0;
            self.paced_in_window = false;
        }
        if !self.bulk || !self.lane.busy(now, self.touched) {
            self.pacing = false;
            return Ok(());
        }
        let rate = self.paced_rate();
        let burst = rate * BURST.as_secs_f64();
        if !self.pacing {
            self.pacing = true;
            self.credit = burst;
        } else {
            let gained = now.saturating_duration_since(self.refilled).as_secs_f64() * rate;
            self.credit = (self.credit + gained).min(burst);
        }
        self.refilled = now;
        self.paced_in_window = true;
        if self.credit > 0.0 {
            return Ok(());
        }
        self.active = now;
        // Asked again within RECENT at the latest, so the connection runs
        // at full speed soon after the interactive traffic stops instead
        // of waiting out its whole debt.
        let owed = Duration::from_secs_f64(-self.credit / rate) + Duration::from_micros(1);
        Err(now + owed.min(RECENT))
    }

    /// `n` bytes moved at `now`.
    pub fn moved(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        if !self.started {
            self.started = true;
            self.window_start = now;
        }
        self.active = now;
        if self.pacing {
            self.credit -= n as f64;
        }
        self.window_bytes += n as u64;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            let rate = self.window_bytes as f64 / elapsed.as_secs_f64();
            self.bulk = if self.bulk {
                rate >= BULK_LEAVE
            } else {
                rate >= BULK_ENTER
            };
            if !self.bulk {
                self.pacing = false;
            }
            // One slow window (the app thinking, the client reading
            // slowly) halves the estimate at most.
            if self.bulk && !self.paced_in_window {
                self.full_rate = rate.max(self.full_rate / 2.0).max(BULK_ENTER);
            }
            self.window_start = now;
            self.window_bytes = 0;
            self.paced_in_window = self.pacing;
        }
        if !self.bulk
            && let Some(mark) = self.lane.touch(now)
        {
            self.touched = mark;
        }
    }

    /// Whether the connection is moving bulk.
    pub fn bulk(&self) -> bool {
        self.bulk
    }
}

// === The connection ===

/// A connection whose reads and writes follow its [`Pacer`]. Flushes and
/// shutdowns are passed straight through (though a TLS stream above this
/// one writes what it flushes, and those writes are paced). Reads and
/// writes wait on pauses of their own, so the two halves may be driven
/// by different tasks.
pub struct Paced<IO> {
    io: IO,
    pacer: Pacer,
    read_pause: Option<Pin<Box<Sleep>>>,
    write_pause: Option<Pin<Box<Sleep>>>,
    stats: Arc<RelayStats>,
}

/// Which half of a connection waits.
#[derive(Clone, Copy)]
enum Half {
    Read,
    Write,
}

impl<IO> Paced<IO> {
    /// `io` on `lane`, its pauses counted in `stats`.
    pub fn new(io: IO, lane: Arc<Lane>, stats: Arc<RelayStats>) -> Self {
        Self {
            io,
            pacer: Pacer::new(lane, Instant::now()),
            read_pause: None,
            write_pause: None,
            stats,
        }
    }

    fn gate(&mut self, cx: &mut Context<'_>, half: Half) -> Poll<()> {
        let slot = match half {
            Half::Read => &mut self.read_pause,
            Half::Write => &mut self.write_pause,
        };
        loop {
            if let Some(pause) = slot {
                ready!(pause.as_mut().poll(cx));
                *slot = None;
            }
            // Interactive connections (nearly all) go through without
            // reading the clock.
            if !self.pacer.bulk() {
                return Poll::Ready(());
            }
            match self.pacer.admit(Instant::now()) {
                Ok(()) => return Poll::Ready(()),
                Err(resume) => {
                    self.stats.bulk_pauses.fetch_add(1, Ordering::Relaxed);
                    *slot = Some(Box::pin(tokio::time::sleep_until(resume)));
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> Paced<IO> {
    /// A write (`write`) once the pacer admits it, its bytes counted.
    fn paced_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        ready!(self.gate(cx, Half::Write));
        let r = ready!(write(Pin::new(&mut self.io), cx));
        if let Ok(n) = r {
            self.pacer.moved(n, Instant::now());
        }
        Poll::Ready(r)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Paced<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.gate(cx, Half::Read));
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut this.io).poll_read(cx, buf));
        if r.is_ok() {
            this.pacer
                .moved(buf.filled().len() - before, Instant::now());
        }
        Poll::Ready(r)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Paced<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .paced_write(cx, |io, cx| io.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .paced_write(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
