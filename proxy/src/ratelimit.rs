//! A fixed-window rate limiter keyed by string (client IP, login name).
//! Small and in-memory: each primary replica (and each edge) limits on its
//! own, which is what slowing down password guessing, or a client making an
//! edge ask the primary about made-up hosts and keys, needs.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Entries kept before stale windows are swept.
const SWEEP_AT: usize = 10_000;

/// Allows `limit` hits per key in each `window`.
#[derive(Debug)]
pub struct RateLimiter {
    limit: u32,
    window: Duration,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RateLimiter {
    /// A limiter allowing `limit` hits per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Records a hit for `key`. `Err(wait)` when over the limit, with how
    /// long until the window resets.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut windows = self.windows.lock();
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let entry = windows.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.limit {
            return Err(self.window.saturating_sub(now.duration_since(entry.0)));
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_per_key_and_resets_after_the_window() {
        let rl = RateLimiter::new(2, Duration::from_secs(60));
        assert!(rl.check("a").is_ok());
        assert!(rl.check("a").is_ok());
        let wait = rl.check("a").unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        assert!(rl.check("b").is_ok(), "keys are independent");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(rl.check("a").unwrap_err(), Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(rl.check("a").is_ok());
    }
}
