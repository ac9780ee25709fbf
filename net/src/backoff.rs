//! Jittered exponential backoff for everything devmesh retries: API calls,
//! relay attaches, log uploads, edge registration.
//!
//! Delays are drawn from `[nominal / 2, nominal]`, where the nominal delay
//! starts at [`Backoff::BASE`] and doubles up to [`Backoff::CAP`]. The jitter
//! spreads the reconnects of many agents after a relay or primary restart.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Exponential backoff state. Cheap to create; one per retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// The nominal delay of the next wait.
    next: Duration,
    /// The nominal delay of the last wait (the first's before any).
    last: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Self::BASE, Self::CAP)
    }
}

impl Backoff {
    /// The first nominal delay.
    pub const BASE: Duration = Duration::from_millis(250);
    /// The largest nominal delay.
    pub const CAP: Duration = Duration::from_secs(30);
    /// A connection attached at least this long resets the backoff when it
    /// ends: it was healthy, so the next failure is a new incident.
    pub const RESET_AFTER: Duration = Duration::from_secs(60);

    /// A backoff starting at `base` and doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        let first = base.min(cap);
        Self {
            base,
            cap,
            next: first,
            last: first,
        }
    }

    /// The nominal delay the next [`Backoff::next_delay`] is drawn under.
    #[cfg(test)]
    pub fn nominal(&self) -> Duration {
        self.next
    }

    /// The next delay, jittered into `[nominal / 2, nominal]`, and advances
    /// the nominal delay.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.next;
        self.last = nominal;
        self.next = nominal.saturating_mul(2).min(self.cap);
        jittered(nominal)
    }

    /// Another delay under the last nominal delay, without advancing: for
    /// a retry loop that found a reason to keep its pace.
    pub fn again(&self) -> Duration {
        jittered(self.last)
    }

    /// Whether the nominal delay has grown to the cap.
    pub fn at_cap(&self) -> bool {
        self.next >= self.cap
    }

    /// Starts over at the base delay.
    pub fn reset(&mut self) {
        self.next = self.base.min(self.cap);
        self.last = self.next;
    }

    /// Resets if a connection stayed attached for [`Backoff::RESET_AFTER`].
    pub fn connection_lasted(&mut self, attached_for: Duration) {
        if attached_for >= Self::RESET_AFTER {
            self.reset();
        }
    }

    /// Sleeps for the next delay. Returns `false` (early) if `cancel` fires.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = cancel.cancelled() => false,
        }
    }
}

/// A delay in `[nominal / 2, nominal]`.
fn jittered(nominal: Duration) -> Duration {
    let lo = nominal / 2;
    if nominal <= lo {
        return nominal;
    }
    rand::thread_rng().gen_range(lo..=nominal)
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_by_doubling_and_caps() {
        let mut b = Backoff::default();
        let mut nominals = Vec::new();
        for _ in 0..10 {
            nominals.push(b.nominal());
            b.next_delay();
        }
        assert_eq!(
            nominals,
            [
                ms(250),
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(16000),
                ms(30000),
                ms(30000),
                ms(30000)
            ]
        );
    }

    #[test]
    fn jitter_stays_within_half_to_full_nominal() {
        let mut seen_below_nominal = false;
        for _ in 0..200 {
            let mut b = Backoff::default();
            for _ in 0..12 {
                let nominal = b.nominal();
                let d = b.next_delay();
                assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
                assert!(d <= Backoff::CAP);
                seen_below_nominal |= d < nominal;
            }
        }
        assert!(seen_below_nominal, "delays are jittered");
    }

    #[test]
    fn again_keeps_the_pace_and_the_cap_is_reported() {
        let mut b = Backoff::new(ms(100), ms(400));
        b.next_delay();
        b.next_delay();
        for _ in 0..50 {
            let d = b.again();
            assert!(d >= ms(100) && d <= ms(200), "{d:?}");
        }
        assert_eq!(b.nominal(), ms(400), "again does not advance");
        assert!(b.at_cap());
        assert!(!Backoff::new(ms(100), ms(400)).at_cap());
    }

    #[test]
    fn reset_starts_over_and_only_after_a_long_connection() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay();
        }
        b.connection_lasted(Backoff::RESET_AFTER - ms(1));
        assert_eq!(b.nominal(), ms(8000));
        b.connection_lasted(Backoff::RESET_AFTER);
        assert_eq!(b.nominal(), ms(250));
        b.next_delay();
        b.reset();
        assert_eq!(b.nominal(), ms(250));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_the_jittered_delay_on_tokio_time() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::default();
        for nominal in [ms(250), ms(500), ms(1000)] {
            let start = Instant::now();
            assert!(b.wait(&cancel).await);
            let slept = start.elapsed();
            assert!(
                slept >= nominal / 2 && slept <= nominal + ms(1),
                "{slept:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wait_returns_early_on_cancel() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::new(Backoff::CAP, Backoff::CAP);
        let start = Instant::now();
        let waiting = b.wait(&cancel);
        cancel.cancel();
        assert!(!waiting.await);
        assert!(start.elapsed() < ms(1));
    }
}
