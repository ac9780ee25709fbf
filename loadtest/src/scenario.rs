//! The scenario file: which deployment to start (or target), how its regions
//! are linked, which baselines to run beside it and which scenarios to
//! measure. Parsed with `deny_unknown_fields` and checked by
//! [`Scenario::validate`] before anything starts.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A whole scenario file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for the report.
    pub name: String,
    /// Scenario files (paths relative to this one) measured first, each on
    /// a deployment of its own, and reported in this run's report with
    /// their scenarios named `<their name>.<scenario>`: one run, one
    /// report, several topologies.
    #[serde(default)]
    pub include: Vec<std::path::PathBuf>,
    /// The included files, parsed (by [`Scenario::load`]).
    #[serde(skip)]
    pub parts: Vec<Scenario>,
    /// The deployment's shape.
    pub topology: Topology,
    /// The emulated wide-area links between regions.
    #[serde(default)]
    pub wan: Wan,
    /// Which baselines run beside devmesh.
    #[serde(default)]
    pub baselines: Baselines,
    /// What to measure; a scenario left out is not run.
    #[serde(default)]
    pub scenarios: Scenarios,
}

/// Regions, their edges and agents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The region the primary runs in.
    pub primary_region: String,
    /// The region the load-generating client sits in.
    pub client_region: String,
    /// Every region, the primary's included.
    pub regions: Vec<Region>,
}

/// One region.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Region name (also the edge's name).
    pub name: String,
    /// Edges started in it (0 or 1; the primary's region usually has none).
    #[serde(default)]
    pub edges: u32,
    /// `devmesh agent` processes started in it, one workspace each.
    #[serde(default)]
    pub agents: u32,
}

/// User-space WAN emulation between regions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Wan {
    /// Off: every path is plain loopback.
    #[serde(default)]
    pub enabled: bool,
    /// Round-trip time inside one region, in ms.
    #[serde(default = "default_intra_rtt")]
    pub intra_region_rtt_ms: f64,
    /// Random extra one-way delay, uniform in `0..=jitter_ms`.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Share of packets lost (UDP: dropped; TCP: delayed by one RTT, as a retransmission).
    #[serde(default)]
    pub loss: f64,
    /// Bandwidth cap per direction and connection in Mbit/s; 0 is uncapped.
    #[serde(default)]
    pub bandwidth_mbit: f64,
    /// Cross-region links; a pair not listed uses the largest listed RTT.
    #[serde(default)]
    pub links: Vec<Link>,
}

fn default_intra_rtt() -> f64 {
    2.0
}

impl Default for Wan {
    fn default() -> Self {
        Self {
            enabled: false,
            intra_region_rtt_ms: default_intra_rtt(),
            jitter_ms: 0.0,
            loss: 0.0,
            bandwidth_mbit: 0.0,
            links: Vec::new(),
        }
    }
}

/// The round-trip time between two regions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The two regions, in either order.
    pub between: [String; 2],
    /// Round-trip time in ms.
    pub rtt_ms: f64,
}

impl Wan {
    /// The round-trip time between `a` and `b`.
    pub fn rtt(&self, a: &str, b: &str) -> Duration {
        let ms = if a == b {
            self.intra_region_rtt_ms
        } else {
            self.links
                .iter()
                .find(|l| {
                    (l.between[0] == a && l.between[1] == b)
                        || (l.between[0] == b && l.between[1] == a)
                })
                .map(|l| l.rtt_ms)
                .unwrap_or_else(|| self.links.iter().map(|l| l.rtt_ms).fold(0.0, f64::max))
        };
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }
}

/// Baselines measured in the same run; each defaults to on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Baselines {
    /// Client → upstream app on loopback.
    #[serde(default = "yes")]
    pub direct: bool,
    /// nginx terminating TLS and proxying to the app.
    #[serde(default = "yes")]
    pub nginx: bool,
    /// nginx → rathole server → rathole client → app.
    #[serde(default = "yes")]
    pub rathole: bool,
    /// Raw quinn and raw rustls bulk transfer between two tasks.
    #[serde(default = "yes")]
    pub transport_ceiling: bool,
}

fn yes() -> bool {
    true
}

impl Default for Baselines {
    fn default() -> Self {
        Self {
            direct: true,
            nginx: true,
            rathole: true,
            transport_ceiling: true,
        }
    }
}

/// The scenarios; `None` is not run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenarios {
    /// 1: small GETs.
    pub small: Option<Small>,
    /// 2: bulk download and upload.
    pub bulk: Option<Bulk>,
    /// 3: many WebSockets.
    pub websockets: Option<Websockets>,
    /// 4: many lightweight agents attached to one relay.
    pub agents: Option<Agents>,
    /// 5: a client in another region, via its edge and via the primary.
    pub regions: Option<Regions>,
    /// 6: small requests beside a bulk download.
    pub fairness: Option<Fairness>,
    /// 7: a slow reader of a large download.
    pub slow_reader: Option<SlowReader>,
    /// 8: an edge killed under load.
    pub failover: Option<Failover>,
    /// 9: the edge data path: primary calls in steady state, one mesh hop.
    pub mesh: Option<Mesh>,
    /// 10: faults under load, with writes under fire.
    pub chaos: Option<Chaos>,
    /// 11: a fixed request rate for a long time: does anything grow?
    pub soak: Option<Soak>,
}

/// Scenario 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Small {
    /// Requests per case (a case is one concurrency × protocol × target).
    pub requests: usize,
    /// Response body size in bytes.
    #[serde(default = "default_small_body")]
    pub body_bytes: usize,
    /// Concurrent clients, one case each.
    #[serde(default = "default_concurrency")]
    pub concurrency: Vec<usize>,
    /// `http1` and/or `http2`.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    /// What sends the requests.
    #[serde(default)]
    pub driver: Driver,
}

/// What drives the small-request cases.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// h2load when installed, else the tool's own client.
    #[default]
    Auto,
    /// h2load (the scenario fails without it).
    H2load,
    /// The tool's own reqwest client (to compare against h2load).
    Client,
}

fn default_small_body() -> usize {
    1024
}
fn default_concurrency() -> Vec<usize> {
    vec![1, 64]
}
fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Http1, Protocol::Http2]
}

/// An HTTP version the client insists on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 (ALPN over TLS, prior knowledge in clear).
    Http2,
}

impl Protocol {
    /// Short label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
        }
    }
}

/// Scenario 2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bulk {
    /// Size of the single-stream download and upload, MiB.
    pub size_mib: u64,
    /// Parallel streams sharing the same total size (0 or 1: skip).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
}

fn default_parallel() -> usize {
    8
}

/// Scenario 3.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Websockets {
    /// Connections held open at once.
    pub connections: usize,
    /// Each connection sends one message this often, seconds.
    pub interval_s: f64,
    /// How long all connections stay open after the last one opened, seconds.
    pub hold_s: f64,
}

/// Scenario 4.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Agents {
    /// In-process agent clients attached at once.
    pub count: usize,
    /// Agent slots per template (the primary allows at most 16).
    #[serde(default = "default_agents_per_workspace")]
    pub per_workspace: usize,
}

fn default_agents_per_workspace() -> usize {
    16
}

/// Scenario 5.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Regions {
    /// First visits (new connection, TLS handshake, first request) per path.
    pub first_visits: usize,
    /// Steady-state keep-alive requests per path.
    pub requests: usize,
    /// Size of the download that measures the emulator's own overhead, MiB.
    #[serde(default = "default_overhead_mib")]
    pub emulator_overhead_mib: u64,
}

fn default_overhead_mib() -> u64 {
    256
}

/// Scenario 6.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fairness {
    /// Small-request clients.
    pub small_clients: usize,
    /// Requests per small client.
    pub requests_per_client: usize,
    /// Size of the competing download, MiB (sized to outlast the small requests).
    pub bulk_mib: u64,
}

/// Scenario 7.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlowReader {
    /// Size of the response the server offers, MiB.
    pub size_mib: u64,
    /// The reader's pace, KiB/s.
    pub rate_kib_s: u64,
    /// How long it reads before giving up, seconds (the whole body at this
    /// pace may take longer than a run should).
    pub duration_s: f64,
}

/// Scenario 8.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    /// Load before the kill, seconds.
    pub before_s: f64,
    /// Longest wait for every agent to re-attach, seconds.
    pub reattach_timeout_s: f64,
}

/// Scenario 11.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Soak {
    /// Requests per second through the client's devmesh path.
    pub rate_per_s: f64,
    /// How long, seconds.
    pub duration_s: f64,
}

/// Scenario 10.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Chaos {
    /// The faults, in order: `postgres` (SIGKILL the embedded PostgreSQL),
    /// `freeze` (SIGSTOP the primary for `freeze_s`), `primary` (SIGKILL
    /// and restart the primary), `agent` (SIGKILL and restart the agent of
    /// the edge path's workspace), `edge` (SIGKILL an edge other than the
    /// client's, whose agent must re-attach elsewhere; started again after).
    pub faults: Vec<String>,
    /// Load before each fault, seconds.
    pub before_s: f64,
    /// Load after the API answers again, seconds.
    pub after_s: f64,
    /// Longest wait for the API to answer again, seconds.
    pub recover_timeout_s: f64,
    /// How long `freeze` keeps the primary stopped, seconds.
    #[serde(default = "default_freeze_s")]
    pub freeze_s: f64,
}

fn default_freeze_s() -> f64 {
    30.0
}

/// Scenario 9.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    /// Keep-alive requests through an edge to an agent attached to it,
    /// while counting the requests the primary serves.
    pub steady_requests: usize,
    /// Small GETs per path (local tunnel, one mesh hop) for the latency
    /// the hop adds.
    pub requests: usize,
}

/// Why a scenario file is unusable.
#[derive(Debug, PartialEq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl Scenario {
    /// Reads and parses the scenario file at `path` and the files it
    /// includes (which may not include others in turn).
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let mut s = Self::parse(&read(path)?)?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        for inc in &s.include {
            let p = dir.join(inc);
            let part = Self::parse(&read(&p)?).with_context(|| format!("{}", p.display()))?;
            anyhow::ensure!(
                devmesh_shared::names::validate_name(&part.name).is_ok(),
                "{}: an included file's name {:?} must be a plain name (its results go in a folder of that name)",
                p.display(),
                part.name
            );
            anyhow::ensure!(
                part.include.is_empty(),
                "{}: an included scenario file may not include others",
                p.display()
            );
            anyhow::ensure!(
                part.name != s.name && s.parts.iter().all(|q| q.name != part.name),
                "{}: its name {:?} is taken in this run",
                p.display(),
                part.name
            );
            s.parts.push(part);
        }
        Ok(s)
    }

    /// Parses a scenario file's text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks what serde cannot: names, references between sections, ranges.
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |m: String| Err(Invalid(m));
        let t = &self.topology;
        let mut names = BTreeSet::new();
        for r in &t.regions {
            if devmesh_shared::names::validate_name(&r.name).is_err() {
                return bad(format!(
                    "region name {:?} is not a valid name (lowercase letters, digits, single hyphens)",
                    r.name
                ));
            }
            if !names.insert(r.name.as_str()) {
                return bad(format!("region {:?} is listed twice", r.name));
            }
            if r.edges > 1 {
                return bad(format!(
                    "region {:?}: at most one edge per region is supported",
                    r.name
                ));
            }
        }
        for (what, name) in [
            ("primary_region", &t.primary_region),
            ("client_region", &t.client_region),
        ] {
            if !names.contains(name.as_str()) {
                return bad(format!("topology.{what} {name:?} is not among the regions"));
            }
        }
        if t.regions.iter().map(|r| r.agents).sum::<u32>() == 0 {
            return bad("the topology needs at least one agent".into());
        }
        for l in &self.wan.links {
            for n in &l.between {
                if !names.contains(n.as_str()) {
                    return bad(format!("wan link names unknown region {n:?}"));
                }
            }
            if !(l.rtt_ms >= 0.0 && l.rtt_ms < 10_000.0) {
                return bad(format!("wan link rtt_ms {} is out of range", l.rtt_ms));
            }
        }
        if !(0.0..1.0).contains(&self.wan.loss) {
            return bad("wan.loss must be in [0, 1)".into());
        }
        if self.wan.jitter_ms < 0.0 || self.wan.bandwidth_mbit < 0.0 {
            return bad("wan.jitter_ms and wan.bandwidth_mbit must not be negative".into());
        }
        let s = &self.scenarios;
        if let Some(small) = &s.small
            && (small.requests == 0
                || small.concurrency.is_empty()
                || small.concurrency.contains(&0)
                || small.protocols.is_empty())
        {
            return bad("scenarios.small needs requests, concurrency and protocols > 0".into());
        }
        if let Some(b) = &s.bulk
            && b.size_mib == 0
        {
            return bad("scenarios.bulk.size_mib must be > 0".into());
        }
        if let Some(a) = &s.agents
            && !(1..=16).contains(&a.per_workspace)
        {
            return bad("scenarios.agents.per_workspace must be 1-16".into());
        }
        if let Some(r) = &s.slow_reader
            && (r.rate_kib_s == 0 || r.duration_s <= 0.0)
        {
            return bad("scenarios.slow_reader needs rate_kib_s and duration_s > 0".into());
        }
        Ok(())
    }

    /// The same scenario at tiny sizes: every part runs, in well under two
    /// minutes, to keep the tool from rotting (numbers are not meaningful).
    pub fn quick(mut self) -> Self {
        self.parts = std::mem::take(&mut self.parts)
            .into_iter()
            .map(Self::quick)
            .collect();
        for r in &mut self.topology.regions {
            r.agents = r.agents.min(1);
        }
        if !self.topology.regions.iter().any(|r| r.agents > 0)
            && let Some(r) = self.topology.regions.first_mut()
        {
            r.agents = 1;
        }
        let s = &mut self.scenarios;
        if let Some(x) = &mut s.small {
            x.requests = x.requests.min(200);
        }
        if let Some(x) = &mut s.bulk {
            x.size_mib = x.size_mib.min(16);
            x.parallel = x.parallel.min(4);
        }
        if let Some(x) = &mut s.websockets {
            x.connections = x.connections.min(100);
            x.interval_s = x.interval_s.min(1.0);
            x.hold_s = x.hold_s.min(2.0);
        }
        if let Some(x) = &mut s.agents {
            x.count = x.count.min(32);
        }
        if let Some(x) = &mut s.regions {
            x.first_visits = x.first_visits.min(5);
            x.requests = x.requests.min(20);
            x.emulator_overhead_mib = x.emulator_overhead_mib.min(16);
        }
        if let Some(x) = &mut s.fairness {
            x.small_clients = x.small_clients.min(8);
            x.requests_per_client = x.requests_per_client.min(20);
            x.bulk_mib = x.bulk_mib.min(64);
        }
        if let Some(x) = &mut s.slow_reader {
            x.size_mib = x.size_mib.min(64);
            x.rate_kib_s = x.rate_kib_s.max(1024);
            x.duration_s = x.duration_s.min(3.0);
        }
        if let Some(x) = &mut s.failover {
            x.before_s = x.before_s.min(1.0);
            x.reattach_timeout_s = x.reattach_timeout_s.min(30.0);
        }
        if let Some(x) = &mut s.mesh {
            x.steady_requests = x.steady_requests.min(100);
            x.requests = x.requests.min(100);
        }
        if let Some(x) = &mut s.soak {
            // CI's soak: one minute.
            x.duration_s = x.duration_s.min(60.0);
            x.rate_per_s = x.rate_per_s.min(100.0);
        }
        if let Some(x) = &mut s.chaos {
            x.before_s = x.before_s.min(1.0);
            x.after_s = x.after_s.min(1.0);
            x.freeze_s = x.freeze_s.min(2.0);
        }
        self
    }
}

#[cfg(test)]
mod tests;
