//! Scenario 11: soak. A fixed request rate through the client's devmesh
//! path for a set time, sampling every devmesh process's RSS and open file
//! descriptors each second. The report gives each process's figures at the
//! end of the warm-up and at the end, their slopes over the second half,
//! p99 per tenth of the run, and errors. The expectation: errors in at
//! most one request in a thousand (a debug build on a loaded CI machine
//! lost 1 of 6,000 to a timeout), and nothing growing without bound (after
//! the warm-up, RSS within 10 % + 4 MiB of where it was, open files within
//! 16).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::load;
use crate::procstat;
use crate::report::ScenarioReport;
use crate::run::Ctx;
use crate::scenario::{self, Protocol};
use crate::stats::{Samples, percentile, round};

/// Requests in flight at most (the rate is what is fixed).
const MAX_IN_FLIGHT: usize = 64;
/// Share of the run before the baseline of growth is taken.
const WARM_UP: f64 = 0.2;

/// Open file descriptors of `pid`.
fn open_files(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Least-squares slope of `(x, y)` points, per unit of x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// One process over the run: `(seconds, RSS MiB, open files)`.
type Series = Vec<(f64, f64, f64)>;

/// Runs scenario 11.
pub async fn run(
    ctx: &mut Ctx,
    cfg: &scenario::Soak,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let ep = ctx.devmesh(&mut sr.notes);
    let client = ctx.client(Protocol::Http1)?;
    let duration = Duration::from_secs_f64(cfg.duration_s);
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(parking_lot::Mutex::new(Vec::<(f64, Option<f64>)>::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let start = Instant::now();
    ctx.progress.set_message(format!(
        "soak: {} requests/s through {} for {} s",
        cfg.rate_per_s, ep.name, cfg.duration_s
    ));

    // The load: one request per tick; a tick that finds every slot busy
    // counts as an error (the rate was not held).
    let driver = {
        let (stop, results, client, ep, gate) = (
            stop.clone(),
            results.clone(),
            client.clone(),
            ep.clone(),
            gate.clone(),
        );
        let every = Duration::from_secs_f64(1.0 / cfg.rate_per_s.max(1.0));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(permit) = gate.clone().try_acquire_owned() else {
                    results.lock().push((start.elapsed().as_secs_f64(), None));
                    continue;
                };
                let (results, client, ep) = (results.clone(), client.clone(), ep.clone());
                tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        load::small_once(&client, &ep, 1024),
                    )
                    .await;
                    let ms = match r {
                        Ok(Ok(d)) => Some(d.as_secs_f64() * 1000.0),
                        _ => None,
                    };
                    results.lock().push((start.elapsed().as_secs_f64(), ms));
                    drop(permit);
                });
            }
        })
    };

    // Every second: each devmesh process's RSS and open files.
    let mut series: BTreeMap<String, Series> = BTreeMap::new();
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < duration {
        sample.tick().await;
        let at = start.elapsed().as_secs_f64();
        for (name, pid) in ctx.dep.monitor.procs() {
            if name == "load generator" {
                continue;
            }
            if let (Some(r), Some(fds)) = (procstat::read(pid), open_files(pid)) {
                series
                    .entry(name)
                    .or_default()
                    .push((at, r.rss_kib as f64 / 1024.0, fds as f64));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = driver.await;
    // Every request in flight ends (answered or timed out after 10 s)
    // and gives its slot back.
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        gate.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    let elapsed = start.elapsed();

    // Latency and errors, overall and per tenth of the run.
    let all = std::mem::take(&mut *results.lock());
    let mut overall = Samples::default();
    let tenth = cfg.duration_s / 10.0;
    let mut p99s = Vec::new();
    for k in 0..10 {
        let (from, to) = (tenth * k as f64, tenth * (k + 1) as f64);
        let mut ms: Vec<f64> = all
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .filter_map(|(_, ms)| *ms)
            .collect();
        ms.sort_by(f64::total_cmp);
        p99s.push(json!([round(to), percentile(&ms, 99.0).map(round)]));
    }
    for (_, ms) in &all {
        match ms {
            Some(ms) => overall.ok(Duration::from_secs_f64(ms / 1000.0)),
            None => overall.errors += 1,
        }
    }
    let errors = overall.errors;
    sr.add(
        format!("{} requests/s for {} s", cfg.rate_per_s, cfg.duration_s),
        &ep.name,
        overall,
        elapsed,
    );
    sr.extra
        .insert("p99 ms per tenth of the run".into(), json!(p99s));

    // Growth after the warm-up, per process.
    let warm = cfg.duration_s * WARM_UP;
    let half = cfg.duration_s / 2.0;
    let mut grew = Vec::new();
    let mut per_process = serde_json::Map::new();
    for (name, points) in &series {
        let after: Vec<_> = points.iter().filter(|(t, _, _)| *t >= warm).collect();
        let (Some(first), Some(last)) = (after.first(), after.last()) else {
            continue;
        };
        let second_half: Vec<_> = points.iter().filter(|(t, _, _)| *t >= half).collect();
        let rss_slope = slope(
            &second_half
                .iter()
                .map(|(t, r, _)| (*t, *r))
                .collect::<Vec<_>>(),
        ) * 60.0;
        let fd_slope = slope(
            &second_half
                .iter()
                .map(|(t, _, f)| (*t, *f))
                .collect::<Vec<_>>(),
        ) * 60.0;
        let rss_max = after.iter().map(|(_, r, _)| *r).fold(0.0, f64::max);
        let fds_max = after.iter().map(|(_, _, f)| *f).fold(0.0, f64::max);
        if rss_max > first.1 * 1.10 + 4.0 || fds_max > first.2 + 16.0 {
            grew.push(name.clone());
        }
        per_process.insert(
            name.clone(),
            json!({
                "rss_mib_after_warm_up": round(first.1),
                "rss_mib_at_end": round(last.1),
                "rss_mib_max": round(rss_max),
                "rss_mib_per_min_second_half": round(rss_slope),
                "open_files_after_warm_up": first.2,
                "open_files_at_end": last.2,
                "open_files_max": fds_max,
                "open_files_per_min_second_half": round(fd_slope),
            }),
        );
    }
    sr.extra.insert("processes".into(), json!(per_process));
    let total = all.len();
    let met = errors * 1000 <= total && grew.is_empty();
    sr.extra.insert(
        "expectation".into(),
        json!(format!(
            "errors in at most 1 request of 1,000 ({errors} of {total}); after the warm-up ({:.0} s) no process's RSS above 110 % + 4 MiB nor its open files above +16: {}",
            warm,
            if met { "met".to_owned() } else { format!("NOT met (errors {errors}; grew: {})", grew.join(", ")) }
        )),
    );
    anyhow::ensure!(met, "the soak's expectation was not met");
    Ok(())
}
