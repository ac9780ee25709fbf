//! The report: `report.json` with every figure, `report.md` with tables that
//! put devmesh beside each baseline as ratios (devmesh ÷ baseline).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::procstat::Usage;
use crate::stats::{Summary, ratio};

/// Everything one invocation measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// The scenario file's name.
    pub name: String,
    /// Whether `--quick` shrank it.
    pub quick: bool,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// Wall-clock seconds of the whole run.
    pub total_s: f64,
    /// Cores, kernel and the like.
    pub machine: BTreeMap<String, String>,
    /// State of each baseline: `ok`, `missing: …`, `failed: …`, `off`.
    pub baselines: BTreeMap<String, String>,
    /// State of each edge's app path.
    pub edges: BTreeMap<String, String>,
    /// The WAN links in use and what crossed them.
    pub wan: Vec<serde_json::Value>,
    /// Notes for the reader.
    pub notes: Vec<String>,
    /// One entry per scenario, in run order.
    pub scenarios: Vec<ScenarioReport>,
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ScenarioReport {
    /// Short id (`small`, `bulk`, …).
    pub name: String,
    /// What it measures.
    pub title: String,
    /// `ok` or `failed: …` (a failed scenario does not stop the run).
    pub status: String,
    /// Observations (fallbacks, skipped parts).
    pub notes: Vec<String>,
    /// Measurements, one per case and target.
    pub rows: Vec<Row>,
    /// CPU and peak RSS of each devmesh process during the scenario.
    pub processes: Vec<Usage>,
    /// Scenario-specific figures.
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One case on one target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The load (`c=64 h2`, `1 GiB download`, …).
    pub case: String,
    /// The path measured (`devmesh`, `direct`, `nginx`, …).
    pub target: String,
    /// The figures.
    pub summary: Summary,
    /// CPU seconds the load generator itself used during the case.
    pub generator_cpu_s: Option<f64>,
    /// Its share of the machine during the case (1.0: every core busy).
    pub generator_share: Option<f64>,
    /// Sorted latencies in ms, for the CDF plots.
    #[serde(skip)]
    pub sorted_ms: Vec<f64>,
}

impl ScenarioReport {
    /// An empty report for scenario `name`.
    pub fn new(name: &str, title: &str) -> Self {
        Self {
            name: name.into(),
            title: title.into(),
            status: "ok".into(),
            ..Default::default()
        }
    }

    /// Adds a row from samples collected over the `elapsed` that just
    /// ended.
    pub fn add(
        &mut self,
        case: impl Into<String>,
        target: impl Into<String>,
        samples: crate::stats::Samples,
        elapsed: std::time::Duration,
    ) -> &Row {
        let end = tokio::time::Instant::now();
        self.add_window(case, target, samples, end - elapsed, elapsed)
    }

    /// Adds a row from samples collected over `elapsed` from `start` (for
    /// a case that ended before the row is added).
    pub fn add_window(
        &mut self,
        case: impl Into<String>,
        target: impl Into<String>,
        mut samples: crate::stats::Samples,
        start: tokio::time::Instant,
        elapsed: std::time::Duration,
    ) -> &Row {
        let summary = samples.summary(elapsed);
        let generator = crate::procstat::generator::between(start, start + elapsed);
        self.rows.push(Row {
            case: case.into(),
            target: target.into(),
            summary,
            generator_cpu_s: generator.map(|g| g.0),
            generator_share: generator.map(|g| g.1),
            sorted_ms: samples.ms,
        });
        self.rows.last().expect("just pushed")
    }
}

fn f(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn is_devmesh(target: &str) -> bool {
    target.starts_with("devmesh")
}

/// The markdown report.
pub fn markdown(r: &Report, plots: &[String]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# devmesh load test: {}\n", r.name);
    let _ = writeln!(
        md,
        "Started {}, took {:.0} s{}. Machine: {}.\n",
        r.started_at,
        r.total_s,
        if r.quick {
            " (**--quick**: tiny sizes, figures are not meaningful)"
        } else {
            ""
        },
        r.machine
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "## Baselines and paths\n\n| what | state |\n|---|---|");
    for (k, v) in r.baselines.iter().chain(r.edges.iter()) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    for n in &r.notes {
        let _ = writeln!(md, "\n- {n}");
    }
    if !r.wan.is_empty() {
        let _ = writeln!(
            md,
            "\n## WAN links\n\n```json\n{}\n```",
            serde_json::to_string_pretty(&r.wan).unwrap_or_default()
        );
    }
    for s in &r.scenarios {
        let _ = writeln!(md, "\n## {}: {}\n\nStatus: {}\n", s.name, s.title, s.status);
        for n in &s.notes {
            let _ = writeln!(md, "- {n}");
        }
        if !s.rows.is_empty() {
            let _ = writeln!(
                md,
                "\n| case | target | p50 ms | p90 ms | p99 ms | p99.9 ms | ops/s | MiB/s | ok | errors | generator CPU s | generator share |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for row in &s.rows {
                let m = &row.summary;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    row.case,
                    row.target,
                    f(m.p50_ms),
                    f(m.p90_ms),
                    f(m.p99_ms),
                    f(m.p999_ms),
                    f(Some(m.ops_per_s)),
                    f(m.mib_per_s),
                    m.count,
                    m.errors,
                    f(row.generator_cpu_s),
                    row.generator_share
                        .map_or("—".into(), |s| format!("{:.0}%", s * 100.0)),
                );
            }
            let ratios = ratio_rows(s);
            if !ratios.is_empty() {
                let _ = writeln!(
                    md,
                    "\nRatios, devmesh ÷ baseline (latency: lower is better for devmesh below 1; throughput: higher is better above 1):\n\n| case | devmesh path | baseline | p50 | p99 | ops/s | MiB/s |\n|---|---|---|---|---|---|---|"
                );
                for line in ratios {
                    let _ = writeln!(md, "{line}");
                }
            }
        }
        if !s.extra.is_empty() {
            let _ = writeln!(md, "\n| figure | value |\n|---|---|");
            for (k, v) in &s.extra {
                let _ = writeln!(md, "| {k} | {v} |");
            }
        }
        if !s.processes.is_empty() {
            let _ = writeln!(
                md,
                "\n| process | CPU s | peak RSS MiB | RSS at start MiB |\n|---|---|---|---|"
            );
            for p in &s.processes {
                let _ = writeln!(
                    md,
                    "| {} | {:.2} | {:.1} | {:.1} |",
                    p.name, p.cpu_s, p.peak_rss_mib, p.start_rss_mib
                );
            }
        }
        for p in plots
            .iter()
            .filter(|p| p.starts_with(&format!("{}-", s.name)))
        {
            let _ = writeln!(md, "\n![{p}]({p})");
        }
    }
    md
}

fn ratio_rows(s: &ScenarioReport) -> Vec<String> {
    let mut out = Vec::new();
    for d in s.rows.iter().filter(|r| is_devmesh(&r.target)) {
        for b in s
            .rows
            .iter()
            .filter(|b| b.case == d.case && !is_devmesh(&b.target))
        {
            let (x, y) = (&d.summary, &b.summary);
            out.push(format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                d.case,
                d.target,
                b.target,
                f(ratio(x.p50_ms, y.p50_ms)),
                f(ratio(x.p99_ms, y.p99_ms)),
                f(ratio(Some(x.ops_per_s), Some(y.ops_per_s))),
                f(ratio(x.mib_per_s, y.mib_per_s)),
            ));
        }
    }
    out
}

/// Writes `report.json` and `report.md` into `dir`.
pub fn write(dir: &Path, r: &Report, plots: &[String]) -> anyhow::Result<()> {
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r, plots))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Samples;
    use std::time::Duration;

    #[test]
    fn markdown_puts_devmesh_beside_each_baseline_as_ratios() {
        let mut s = ScenarioReport::new("small", "small GETs");
        for (target, ms) in [("devmesh", 2u64), ("direct", 1), ("nginx", 4)] {
            let mut x = Samples::default();
            x.ok(Duration::from_millis(ms));
            s.add("c=1 h1", target, x, Duration::from_secs(1));
        }
        let r = Report {
            name: "t".into(),
            scenarios: vec![s],
            ..Default::default()
        };
        let md = markdown(&r, &["small-cdf.png".into()]);
        assert!(md.contains("| c=1 h1 | devmesh | direct | 2.000 |"), "{md}");
        assert!(md.contains("| c=1 h1 | devmesh | nginx | 0.500 |"), "{md}");
        assert!(md.contains("![small-cdf.png]"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenarios"][0]["rows"][0]["summary"]["p50_ms"], 2.0);
    }
}
