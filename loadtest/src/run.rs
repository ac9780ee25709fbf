//! The `run` command: start the topology and the baselines, run each
//! configured scenario, write the report. A scenario that fails is recorded
//! as failed and the run goes on.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::baselines::{Nginx, Rathole, RatholeTransport};
use crate::report::{Report, ScenarioReport};
use crate::scenario::{Protocol, Scenario};
use crate::topology::{Deployment, Endpoint, Options, app_client};
use crate::{plot, scenarios};

/// Everything a scenario needs.
pub struct Ctx {
    /// The scenario file (after `--quick`).
    pub scenario: Scenario,
    /// The running deployment.
    pub dep: Deployment,
    /// Baseline endpoints that started: direct, nginx, nginx + rathole.
    pub baselines: Vec<Endpoint>,
    /// The upstream app's port.
    pub app_port: u16,
    /// Live progress line.
    pub progress: indicatif::ProgressBar,
    /// Output folder.
    pub out: PathBuf,
    /// Whether the transport ceiling runs.
    pub ceiling: bool,
    /// Stops background helpers.
    pub stop: CancellationToken,
}

impl Ctx {
    /// The devmesh path from the client's region without WAN emulation:
    /// through the client region's edge when it serves apps, else through
    /// the primary (with a note saying so).
    pub fn devmesh(&self, notes: &mut Vec<String>) -> Endpoint {
        if let Some(e) = self
            .dep
            .edges
            .iter()
            .position(|e| e.region == self.dep.client_region)
            && let Some(mut ep) = self.dep.via_edge(e, 0, false)
        {
            ep.name = "devmesh (edge)".into();
            return ep;
        }
        if self.dep.edges.iter().any(|e| e.unavailable.is_some()) {
            let n = "edge path unavailable: measured through the primary".to_owned();
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        self.dep.via_primary(0, false)
    }

    /// devmesh first, then every baseline.
    pub fn targets(&self, notes: &mut Vec<String>) -> Vec<Endpoint> {
        let mut v = vec![self.devmesh(notes)];
        v.extend(self.baselines.iter().cloned());
        v
    }

    /// An app client for `proto`.
    pub fn client(&self, proto: Protocol) -> anyhow::Result<reqwest::Client> {
        app_client(&self.dep.ca_pem, proto)
    }
}

/// Raises the open-file limit (inherited by every process started here):
/// 10,000 WebSockets need two sockets each in this process alone (client
/// and upstream app). Root may go past the hard limit; others get the hard
/// limit.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 262_144;
    if setrlimit(Resource::RLIMIT_NOFILE, WANTED, WANTED).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Runs the scenario file end to end and writes the report into `out`:
/// each included file first, on a deployment of its own, then the file
/// itself. Returns the path of `report.md` and the names of failed
/// scenarios.
pub async fn run(
    mut scenario: Scenario,
    opts: Options,
    only: Option<Vec<String>>,
    quick: bool,
) -> anyhow::Result<(PathBuf, Vec<String>)> {
    raise_nofile();
    crate::procstat::generator::start();
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    std::fs::create_dir_all(&opts.out)?;
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(200));
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    let mut report = Report {
        name: scenario.name.clone(),
        quick,
        started_at,
        ..Default::default()
    };
    report.machine.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        report.machine.insert("kernel".into(), k.trim().to_owned());
    }
    let only = only.as_deref();
    let parts = std::mem::take(&mut scenario.parts);
    if let Some(o) = only {
        let known = |x: &String| {
            let one = |s: &Scenario, part: Option<&str>| {
                any_wanted(s, Some(std::slice::from_ref(x)), part)
            };
            one(&scenario, None) || parts.iter().any(|p| one(p, Some(&p.name)))
        };
        let unknown: Vec<_> = o.iter().filter(|x| !known(x)).cloned().collect();
        anyhow::ensure!(
            unknown.is_empty(),
            "--only names no scenario of this file or its includes: {}",
            unknown.join(", ")
        );
    }
    if opts.existing.is_some() && !parts.is_empty() {
        // Each part registers edges of its own; against a deployment that
        // outlives the run they would collide with the main file's.
        report.notes.push(format!(
            "Included scenario files not run against an existing deployment (--url): {}",
            parts
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    } else {
        for part in parts {
            let name = part.name.clone();
            if !any_wanted(&part, only, Some(&name)) {
                continue;
            }
            let part_opts = Options {
                out: opts.out.join(&name),
                ..opts.clone()
            };
            std::fs::create_dir_all(&part_opts.out)?;
            let mut sub = Report::default();
            let result = measure(part, &part_opts, only, Some(&name), &progress, &mut sub).await;
            merge_part(&mut report, &name, sub);
            // A part that cannot start is a failed scenario of the run;
            // the rest still runs.
            if let Err(e) = result {
                let mut sr = ScenarioReport::new(&name, "an included scenario file");
                sr.status = format!("failed: {e:#}");
                report.scenarios.push(sr);
            }
        }
    }
    let main = if any_wanted(&scenario, only, None) {
        measure(scenario, &opts, only, None, &progress, &mut report).await
    } else {
        Ok(())
    };

    progress.set_message("writing the report");
    let mut plots = Vec::new();
    for s in &report.scenarios {
        plots.extend(plot::scenario(&opts.out, s));
    }
    report.total_s = started.elapsed().as_secs_f64();
    crate::report::write(&opts.out, &report, &plots)?;
    progress.finish_and_clear();
    // The parts' results are written even when the main deployment failed.
    main?;
    let failed = report
        .scenarios
        .iter()
        .filter(|s| s.status != "ok")
        .map(|s| s.name.clone())
        .collect();
    Ok((opts.out.join("report.md"), failed))
}

/// Whether `only` (none: every one) names scenario `name`, plainly (in
/// every file) or as `<part>.<name>` (in the included file `part`).
fn wanted(only: Option<&[String]>, part: Option<&str>, name: &str) -> bool {
    only.is_none_or(|o| {
        o.iter().any(|x| {
            x == name
                || part.is_some_and(|p| {
                    x.strip_prefix(p).and_then(|r| r.strip_prefix('.')) == Some(name)
                })
        })
    })
}

/// Whether `only` names a scenario `s` configures.
fn any_wanted(s: &Scenario, only: Option<&[String]>, part: Option<&str>) -> bool {
    let configured = serde_json::to_value(&s.scenarios).unwrap_or_default();
    configured
        .as_object()
        .is_some_and(|m| m.iter().any(|(k, v)| !v.is_null() && wanted(only, part, k)))
}

/// Adds an included file's results to the run's report, each name
/// prefixed with the file's.
fn merge_part(report: &mut Report, part: &str, sub: Report) {
    for (k, v) in sub.baselines {
        report.baselines.insert(format!("{part}: {k}"), v);
    }
    for (k, v) in sub.edges {
        report.edges.insert(format!("{part}: {k}"), v);
    }
    report
        .notes
        .extend(sub.notes.into_iter().map(|n| format!("{part}: {n}")));
    report.wan.extend(sub.wan.into_iter().map(|mut w| {
        if let Some(o) = w.as_object_mut() {
            o.insert("deployment".into(), part.into());
        }
        w
    }));
    for mut s in sub.scenarios {
        s.name = format!("{part}.{}", s.name);
        s.title = format!("{} (the {part} deployment)", s.title);
        report.scenarios.push(s);
    }
}

/// Starts `scenario`'s deployment and baselines, runs each of its
/// scenarios `only` names into `report`, and stops everything it started.
/// `part`: the included file's name, when it is one.
async fn measure(
    scenario: Scenario,
    opts: &Options,
    only: Option<&[String]>,
    part: Option<&str>,
    progress: &indicatif::ProgressBar,
    report: &mut Report,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    // Serves until the measurement ends (dropped with it).
    let upstream = devmesh_tests::upstream::Upstream::try_start().await?;
    let app_port = upstream.port();

    let dep = Deployment::start(&scenario, opts, app_port, progress)
        .await
        .context("starting the deployment")?;
    for e in &dep.edges {
        report.edges.insert(
            format!("edge {}", e.region),
            e.unavailable.clone().unwrap_or_else(|| {
                format!(
                    "serves apps on *.{}",
                    e.app_host_suffix.as_deref().unwrap_or("")
                )
            }),
        );
    }

    // Baselines.
    progress.set_message("starting baselines");
    let b = &scenario.baselines;
    let mut baselines = Vec::new();
    let mut keep_alive: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let mut state = |name: &str, r: anyhow::Result<()>| {
        report.baselines.insert(
            name.into(),
            match r {
                Ok(()) => "ok".into(),
                Err(e) if format!("{e:#}").starts_with("missing") => format!("{e:#}"),
                Err(e) => format!("failed: {e:#}"),
            },
        );
    };
    if b.direct {
        baselines.push(Endpoint {
            name: "direct".into(),
            base: format!("http://127.0.0.1:{app_port}"),
            token: None,
        });
        state("direct", Ok(()));
    } else {
        state("direct", Err(anyhow::anyhow!("off in the scenario file")));
    }
    let base_dir = opts.out.join("baselines");
    if b.nginx {
        match Nginx::start(&base_dir, "nginx", app_port, &dep.cert, &dep.key).await {
            Ok(n) => {
                baselines.push(Endpoint {
                    name: "nginx".into(),
                    base: format!("https://localhost:{}", n.port),
                    token: None,
                });
                keep_alive.push(Box::new(n));
                state("nginx", Ok(()));
            }
            Err(e) => state("nginx", Err(e)),
        }
    }
    if b.rathole {
        for (transport, name) in [
            (RatholeTransport::Tcp, "nginx+rathole"),
            (RatholeTransport::Noise, "nginx+rathole (noise)"),
        ] {
            let r = async {
                let r = Rathole::start(&base_dir, app_port, transport).await?;
                let n = Nginx::start(
                    &base_dir,
                    &format!("nginx-{}", transport.dir()),
                    r.port,
                    &dep.cert,
                    &dep.key,
                )
                .await?;
                anyhow::Ok((r, n))
            }
            .await;
            match r {
                Ok((r, n)) => {
                    baselines.push(Endpoint {
                        name: name.into(),
                        base: format!("https://localhost:{}", n.port),
                        token: None,
                    });
                    keep_alive.push(Box::new(r));
                    keep_alive.push(Box::new(n));
                    state(name, Ok(()));
                }
                Err(e) => state(name, Err(e)),
            }
        }
    }
    state(
        "transport ceiling (raw quinn, raw rustls)",
        if b.transport_ceiling {
            Ok(())
        } else {
            Err(anyhow::anyhow!("off in the scenario file"))
        },
    );

    let mut ctx = Ctx {
        ceiling: scenario.baselines.transport_ceiling,
        scenario,
        dep,
        baselines,
        app_port,
        progress: progress.clone(),
        out: opts.out.clone(),
        stop: stop.clone(),
    };

    let wanted = |n: &str| wanted(only, part, n);
    let shown = |n: &str| part.map_or_else(|| n.to_owned(), |p| format!("{p}.{n}"));
    let s = ctx.scenario.scenarios.clone();
    macro_rules! scenario {
        ($name:literal, $title:literal, $cfg:expr, $f:path) => {
            if let Some(cfg) = &$cfg
                && wanted($name)
            {
                progress.set_message(format!("scenario {}", shown($name)));
                let mut sr = ScenarioReport::new($name, $title);
                let window = ctx.dep.monitor.window();
                let t = Instant::now();
                if let Err(e) = $f(&mut ctx, cfg, &mut sr).await {
                    sr.status = format!("failed: {e:#}");
                }
                sr.extra.insert(
                    "duration_s".into(),
                    serde_json::json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
                );
                sr.processes = ctx.dep.monitor.usage(&window);
                progress.println(format!(
                    "{:>12}: {} ({:.1} s)",
                    shown($name),
                    sr.status,
                    t.elapsed().as_secs_f64()
                ));
                report.scenarios.push(sr);
            }
        };
    }
    scenario!(
        "small",
        "1 KiB GETs, keep-alive, concurrency 1 and 64, HTTP/1.1 and HTTP/2",
        s.small,
        scenarios::small
    );
    scenario!(
        "bulk",
        "large download and upload with checksum, single and parallel streams",
        s.bulk,
        scenarios::bulk
    );
    scenario!(
        "websockets",
        "many concurrent WebSockets, echo every few seconds",
        s.websockets,
        scenarios::websockets
    );
    scenario!(
        "agents",
        "many lightweight agents attached to one relay",
        s.agents,
        scenarios::agents
    );
    scenario!(
        "regions",
        "client in another region: via its edge vs via the primary, over the WAN emulator",
        s.regions,
        scenarios::regions
    );
    scenario!(
        "fairness",
        "small requests with and without a competing bulk download",
        s.fairness,
        scenarios::fairness
    );
    scenario!(
        "slow_reader",
        "a reader at a slow pace: memory of the proxies stays flat",
        s.slow_reader,
        scenarios::slow_reader
    );
    scenario!(
        "mesh",
        "the edge path: primary calls in steady state, and the latency of one mesh hop",
        s.mesh,
        scenarios::mesh
    );
    scenario!(
        "soak",
        "a fixed request rate for a long time: RSS, open files and p99 over time",
        s.soak,
        crate::soak::run
    );
    scenario!(
        "chaos",
        "faults under load, with writes under fire: what clients saw and what was kept",
        s.chaos,
        crate::chaos::run
    );
    scenario!(
        "failover",
        "an edge killed under load",
        s.failover,
        scenarios::failover
    );

    for (region, f) in &ctx.dep.relay_fronts {
        report.wan.push(serde_json::json!({
            "udp_front_of_relay": region,
            "totals": f.counters.snapshot(),
        }));
    }
    for f in &ctx.dep.wan {
        report.wan.push(serde_json::json!({
            "from": f.from, "to": f.to,
            "rtt_ms": f.spec.delay.as_secs_f64() * 2000.0,
            "jitter_ms": f.spec.jitter.as_secs_f64() * 1000.0,
            "loss": f.spec.loss,
            "bytes_per_s": f.spec.bytes_per_s,
            "totals": f.relay.counters.snapshot(),
        }));
    }
    if ctx
        .dep
        .wan
        .iter()
        .any(|f| f.to == "primary" && f.from != ctx.dep.client_region)
    {
        report.notes.push("Agents outside the primary's region reach the primary's API through their WAN link. QUIC to an edge's relay (from its agents, and over the mesh from other relays and the primary) goes through a UDP front with the matching link; the primary's own relay has no front (agents attach to their region's edge while it answers).".into());
    }
    stop.cancel();
    drop(keep_alive);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_a_scenario_everywhere_or_in_one_included_file() {
        let only = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let small = only(&["small"]);
        assert!(wanted(Some(&small), None, "small"));
        assert!(wanted(Some(&small), Some("dataplane"), "small"));
        let part = only(&["dataplane.small"]);
        assert!(wanted(Some(&part), Some("dataplane"), "small"));
        assert!(!wanted(Some(&part), None, "small"));
        assert!(!wanted(Some(&part), Some("other"), "small"));
        assert!(!wanted(Some(&part), Some("dataplane"), "bulk"));
        assert!(!wanted(
            Some(&only(&["dataplanesmall"])),
            Some("dataplane"),
            "small"
        ));
        assert!(wanted(None, Some("dataplane"), "bulk"));

        let dp = Scenario::parse(include_str!("../scenarios/dataplane.toml")).unwrap();
        assert!(any_wanted(&dp, Some(&small), Some("dataplane")));
        assert!(any_wanted(&dp, Some(&part), Some("dataplane")));
        assert!(!any_wanted(&dp, Some(&part), None));
        assert!(!any_wanted(&dp, Some(&only(&["chaos"])), Some("dataplane")));
    }
}
