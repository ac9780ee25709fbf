//! The edge's Prometheus metrics (`GET /metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use devmesh_proxy::relay::RelayStats;

/// Labels of `devmesh_edge_access_decisions_total`: how one app request was
/// authorised.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    /// `token` (a valid app-token cookie), `hit`, `miss`, `refused` (a
    /// remembered refusal) or `refresh`.
    pub(crate) result: &'static str,
}

/// Labels of `devmesh_edge_shell_sessions_total`: how a request for a
/// shell session ended up.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ShellLabels {
    /// `opened`, `refused` (by the primary or for want of a key),
    /// `rate_limited`, `unavailable` (the primary could not be asked) or
    /// `agent_unreachable`.
    pub(crate) result: &'static str,
}

/// Every metric of the edge.
pub(crate) struct Metrics {
    registry: Registry,
    /// App requests, as the primary counts its own.
    pub(crate) proxy: devmesh_proxy::pipeline::ProxyMetrics,
    pub(crate) decisions: Family<CacheLabels, Counter>,
    pub(crate) primary_reachable: Gauge,
    pub(crate) events_connected: Gauge,
    pub(crate) primary_requests: Counter,
    pub(crate) shell_sessions: Family<ShellLabels, Counter>,
    pub(crate) shells_open: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("devmesh_edge");
        let proxy = devmesh_proxy::pipeline::ProxyMetrics::register(&mut registry);
        let decisions = Family::<CacheLabels, Counter>::default();
        registry.register(
            "access_decisions",
            "How app requests were authorised: a verified token cookie, a cached decision, a miss that asked the primary, or a background refresh",
            decisions.clone(),
        );
        let primary_reachable = Gauge::default();
        registry.register(
            "primary_reachable",
            "1 while the last call to the primary succeeded",
            primary_reachable.clone(),
        );
        let events_connected = Gauge::default();
        registry.register(
            "events_connected",
            "1 while the event stream from the primary is up",
            events_connected.clone(),
        );
        let primary_requests = Counter::default();
        registry.register(
            "primary_calls",
            "Calls made to the primary for access decisions and sign-ins",
            primary_requests.clone(),
        );
        let shell_sessions = Family::<ShellLabels, Counter>::default();
        registry.register(
            "shell_sessions",
            "Requests for SSH sessions through this edge, by outcome",
            shell_sessions.clone(),
        );
        let shells_open = Gauge::default();
        registry.register(
            "shell_sessions_open",
            "SSH sessions open through this edge",
            shells_open.clone(),
        );
        Self {
            registry,
            shell_sessions,
            shells_open,
            proxy,
            decisions,
            primary_reachable,
            events_connected,
            primary_requests,
        }
    }

    /// The text exposition, with the relay's counters appended.
    pub(crate) fn encode(&self, relay: Option<&RelayStats>) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        if let Some(r) = relay {
            out.push_str(&r.openmetrics("devmesh_edge"));
        }
        out.push_str("# EOF\n");
        out
    }
}
