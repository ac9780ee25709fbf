//! Latency percentiles and the summary every measurement reports.

use std::time::Duration;

use serde::Serialize;

/// Nearest-rank percentile of ascending `sorted` (`p` in 0..=100); `None`
/// when empty. Nearest rank never interpolates, so p99.9 of 100 samples is
/// the largest one rather than an invented value.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps float error (99.9 / 100 × 1000 = 999.0000000000001)
    // from bumping an exact rank to the next one.
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `x` to two decimals, for figures in the report.
pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What one case (one target under one load) measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Successful operations.
    pub count: usize,
    /// Failed operations.
    pub errors: usize,
    /// Latency percentiles, ms (absent when nothing succeeded).
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile, ms.
    pub p999_ms: Option<f64>,
    /// Largest latency, ms.
    pub max_ms: Option<f64>,
    /// Operations per second over the wall-clock time of the case.
    pub ops_per_s: f64,
    /// Payload MiB/s, for cases that move bulk data.
    pub mib_per_s: Option<f64>,
    /// Wall-clock time of the case, seconds.
    pub elapsed_s: f64,
}

/// Collects latencies of one case.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    /// Latencies in ms, unordered until [`Samples::summary`].
    pub ms: Vec<f64>,
    /// Failed operations.
    pub errors: usize,
    /// Payload bytes moved.
    pub bytes: u64,
}

impl Samples {
    /// Records one success.
    pub fn ok(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1000.0);
    }

    /// Adds another collector's samples.
    pub fn merge(&mut self, other: Samples) {
        self.ms.extend(other.ms);
        self.errors += other.errors;
        self.bytes += other.bytes;
    }

    /// Sorts the samples and summarises them over `elapsed`.
    pub fn summary(&mut self, elapsed: Duration) -> Summary {
        self.ms.sort_by(f64::total_cmp);
        let secs = elapsed.as_secs_f64().max(1e-9);
        let p = |q| percentile(&self.ms, q);
        Summary {
            count: self.ms.len(),
            errors: self.errors,
            p50_ms: p(50.0),
            p90_ms: p(90.0),
            p99_ms: p(99.0),
            p999_ms: p(99.9),
            max_ms: self.ms.last().copied(),
            ops_per_s: self.ms.len() as f64 / secs,
            mib_per_s: (self.bytes > 0).then(|| self.bytes as f64 / secs / (1024.0 * 1024.0)),
            elapsed_s: secs,
        }
    }
}

/// `a ÷ b`, or `None` when either is missing or `b` is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 90.0), Some(90.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 99.9), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.9), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.9), Some(999.0));
    }

    #[test]
    fn summary_sorts_counts_and_rates() {
        let mut s = Samples::default();
        for ms in [3, 1, 2, 4] {
            s.ok(Duration::from_millis(ms));
        }
        s.errors = 1;
        s.bytes = 4 * 1024 * 1024;
        let sum = s.summary(Duration::from_secs(2));
        assert_eq!(sum.count, 4);
        assert_eq!(sum.errors, 1);
        assert_eq!(sum.p50_ms, Some(2.0));
        assert_eq!(sum.max_ms, Some(4.0));
        assert_eq!(sum.ops_per_s, 2.0);
        assert_eq!(sum.mib_per_s, Some(2.0));
    }

    #[test]
    fn ratio_needs_both_sides() {
        assert_eq!(ratio(Some(2.0), Some(4.0)), Some(0.5));
        assert_eq!(ratio(None, Some(4.0)), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }
}
