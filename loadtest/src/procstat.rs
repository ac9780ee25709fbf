//! CPU time and memory of the devmesh processes, read from `/proc`, sampled
//! in the background so each scenario can report its CPU seconds, its peak
//! RSS and RSS over time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

/// Linux reports CPU time in clock ticks; USER_HZ is 100 on every
/// architecture devmesh runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// One process's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// Parses `/proc/<pid>/stat` (CPU ticks) and `/proc/<pid>/status` (VmRSS).
pub fn parse(stat: &str, status: &str) -> Option<Reading> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the whole line, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(Reading {
        cpu_s: (utime + stime) as f64 / TICKS_PER_SECOND,
        rss_kib,
    })
}

/// The load generator's own CPU seconds: this process (every thread) and
/// the children it has waited for (a `wrk` driver), from
/// `/proc/self/stat`.
pub fn generator_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14 to 17 of the whole line.
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / TICKS_PER_SECOND)
}

/// The generator's CPU over a window that just ended, sampled in the
/// background (a plain thread, so a busy runtime does not skew it).
pub mod generator {
    use std::collections::VecDeque;
    use std::sync::OnceLock;
    use std::time::Duration;

    use tokio::time::Instant;

    use parking_lot::Mutex;

    /// How often the sampler reads `/proc/self/stat`.
    const PERIOD: Duration = Duration::from_millis(100);

    fn samples() -> &'static Mutex<VecDeque<(Instant, f64)>> {
        static SAMPLES: OnceLock<Mutex<VecDeque<(Instant, f64)>>> = OnceLock::new();
        SAMPLES.get_or_init(|| {
            std::thread::Builder::new()
                .name("generator-cpu".into())
                .spawn(|| {
                    loop {
                        if let Some(cpu) = super::generator_cpu_s() {
                            let mut s = samples().lock();
                            s.push_back((Instant::now(), cpu));
                            // Two hours at 10 Hz.
                            if s.len() > 72_000 {
                                s.pop_front();
                            }
                        }
                        std::thread::sleep(PERIOD);
                    }
                })
                .ok();
            Mutex::new(VecDeque::new())
        })
    }

    /// Starts sampling (call once before measuring).
    pub fn start() {
        samples();
    }

    /// Windows shorter than this are not attributed: the sampling period
    /// would dominate them.
    const SHORTEST: Duration = Duration::from_millis(500);

    /// CPU seconds the generator used over the last `window`, and its
    /// share of the machine (`cpu ÷ (window × cores)`); `None` for a
    /// window too short to tell, or one the sampler did not see start.
    pub fn over(window: Duration) -> Option<(f64, f64)> {
        let now = Instant::now();
        between(now.checked_sub(window)?, now)
    }

    /// Like [`over`], for the window from `start` to `end` (both past).
    pub fn between(start: Instant, end: Instant) -> Option<(f64, f64)> {
        let window = end.checked_duration_since(start)?;
        if window < SHORTEST {
            return None;
        }
        let s = samples().lock();
        let at = |t: Instant| -> Option<f64> {
            // The CPU reading at `t`, between the samples around it.
            let i = s.iter().rposition(|(ti, _)| *ti <= t)?;
            let (t0, c0) = s[i];
            Some(match s.get(i + 1) {
                Some(&(t1, c1)) if t1 > t0 => {
                    let f =
                        t.duration_since(t0).as_secs_f64() / t1.duration_since(t0).as_secs_f64();
                    c0 + (c1 - c0) * f.clamp(0.0, 1.0)
                }
                _ => c0,
            })
        };
        let begin = at(start)?;
        let finish = if end + PERIOD >= Instant::now() {
            super::generator_cpu_s()?
        } else {
            at(end)?
        };
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let cpu = (finish - begin).max(0.0);
        Some((cpu, (cpu / (window.as_secs_f64() * cores)).min(1.0)))
    }
}

/// Reads a live process; `None` once it has exited.
pub fn read(pid: u32) -> Option<Reading> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse(&stat, &status)
}

/// A process's figures over one window.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Its role, like `primary` or `agent us-east/0`.
    pub name: String,
    /// CPU seconds used in the window.
    pub cpu_s: f64,
    /// Largest RSS sampled in the window, MiB.
    pub peak_rss_mib: f64,
    /// RSS at the start of the window, MiB.
    pub start_rss_mib: f64,
    /// `(seconds since the window started, MiB)`.
    #[serde(skip)]
    pub rss_series: Vec<(f64, f64)>,
}

#[derive(Debug, Default)]
struct State {
    procs: BTreeMap<String, u32>,
    /// Per name: `(when, reading)`.
    samples: BTreeMap<String, Vec<(Instant, Reading)>>,
}

/// Samples every registered process every `period`.
#[derive(Debug, Clone)]
pub struct Monitor {
    state: Arc<Mutex<State>>,
}

/// The start of a measurement window.
#[derive(Debug, Clone)]
pub struct Window {
    start: Instant,
    first: BTreeMap<String, Reading>,
}

impl Monitor {
    /// Starts sampling; stops when the last clone is dropped.
    pub fn start(period: Duration) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { break };
                let procs = state.lock().procs.clone();
                let now = Instant::now();
                let readings: Vec<_> = procs
                    .iter()
                    .filter_map(|(name, pid)| Some((name.clone(), read(*pid)?)))
                    .collect();
                let mut s = state.lock();
                for (name, r) in readings {
                    let v = s.samples.entry(name).or_default();
                    v.push((now, r));
                    // Keep at most ~1 hour at 4 Hz per process.
                    if v.len() > 15_000 {
                        v.drain(..5_000);
                    }
                }
            }
        });
        Self { state }
    }

    /// Watches `pid` under `name` (replacing an earlier process of that name).
    pub fn add(&self, name: impl Into<String>, pid: u32) {
        self.state.lock().procs.insert(name.into(), pid);
    }

    /// The processes watched now, by name.
    pub fn procs(&self) -> BTreeMap<String, u32> {
        self.state.lock().procs.clone()
    }

    /// Stops watching `name`.
    pub fn remove(&self, name: &str) {
        self.state.lock().procs.remove(name);
    }

    /// Opens a window now.
    pub fn window(&self) -> Window {
        let procs = self.state.lock().procs.clone();
        Window {
            start: Instant::now(),
            first: procs
                .iter()
                .filter_map(|(n, pid)| Some((n.clone(), read(*pid)?)))
                .collect(),
        }
    }

    /// Every process's figures since `w` opened.
    pub fn usage(&self, w: &Window) -> Vec<Usage> {
        let procs = self.state.lock().procs.clone();
        let now: BTreeMap<String, Reading> = procs
            .iter()
            .filter_map(|(n, pid)| Some((n.clone(), read(*pid)?)))
            .collect();
        let s = self.state.lock();
        let mut names: Vec<&String> = w.first.keys().chain(now.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let series: Vec<(f64, f64)> = s
                    .samples
                    .get(name)
                    .map(|v| {
                        v.iter()
                            .filter(|(t, _)| *t >= w.start)
                            .map(|(t, r)| {
                                (
                                    t.duration_since(w.start).as_secs_f64(),
                                    r.rss_kib as f64 / 1024.0,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let first = w.first.get(name);
                let last = now
                    .get(name)
                    .or_else(|| s.samples.get(name).and_then(|v| v.last()).map(|(_, r)| r));
                let mib = |r: Option<&Reading>| r.map_or(0.0, |r| r.rss_kib as f64 / 1024.0);
                let peak = series
                    .iter()
                    .map(|(_, m)| *m)
                    .chain([mib(first), mib(last)])
                    .fold(0.0, f64::max);
                Usage {
                    name: name.clone(),
                    cpu_s: match (first, last) {
                        (Some(a), Some(b)) => (b.cpu_s - a.cpu_s).max(0.0),
                        (None, Some(b)) => b.cpu_s,
                        _ => 0.0,
                    },
                    peak_rss_mib: peak,
                    start_rss_mib: mib(first),
                    rss_series: series,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_tricky_name() {
        let stat = "1234 (dev mesh) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 1000 200 18446744073709551615";
        let status = "Name:\tdevmesh\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t8\n";
        let r = parse(stat, status).unwrap();
        assert_eq!(r.cpu_s, 3.0);
        assert_eq!(r.rss_kib, 5120);
        assert_eq!(parse("garbage", status), None);
    }

    #[test]
    fn reads_this_process() {
        let r = read(std::process::id()).unwrap();
        assert!(r.rss_kib > 0);
    }
}
