//! Prometheus metrics of the primary, in an explicit registry handed down
//! through the application state (no globals).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of HTTP request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Request method.
    pub method: String,
    /// The matched route pattern (`/api/v2/users/{user}`), never the raw path.
    pub route: String,
    /// Response status code.
    pub status: String,
}

/// Labels carrying one outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The outcome; each counter lists its values where it is declared
    /// on [`Metrics`].
    pub result: String,
}

/// Labels of the request latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// As in [`HttpLabels::route`]: the pattern, never the raw path.
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric the primary exports.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by method, route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP request latency by route.
    pub http_duration: HistogramFamily,
    /// Login attempts by result (`success`, `failure`, `rate_limited`).
    pub logins: Family<ResultLabels, Counter>,
    /// API key validations by result (`cache_hit`, `cache_miss`, `invalid`).
    pub key_checks: Family<ResultLabels, Counter>,
    /// Queries that failed because the database was unavailable.
    pub db_unavailable: Counter,
    /// Claims from edges the primary refused, by kind (`attachment_proof`,
    /// `registration`).
    pub edge_refusals: Family<ResultLabels, Counter>,
    /// Calls from provisioner daemons the primary refused, by why (`key`:
    /// no valid provisioner key; `daemon`: not a daemon of that key;
    /// `job`: a job the daemon does not hold).
    pub provisioner_refusals: Family<ResultLabels, Counter>,
    /// App requests on the primary's apps domain (`devmesh_app_*`), as
    /// edges count theirs.
    pub apps: devmesh_proxy::pipeline::ProxyMetrics,
    /// Times the embedded PostgreSQL died and was started again.
    pub embedded_postgres_restarts: Counter,
    /// 1 while the embedded PostgreSQL runs, 0 while it is down (absent
    /// with an external database).
    pub embedded_postgres_up: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("devmesh");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            http_duration.clone(),
        );
        let logins = Family::<ResultLabels, Counter>::default();
        registry.register("logins", "Password login attempts", logins.clone());
        let key_checks = Family::<ResultLabels, Counter>::default();
        registry.register("api_key_checks", "API key validations", key_checks.clone());
        let db_unavailable = Counter::default();
        registry.register(
            "db_unavailable_errors",
            "Requests that failed because the database was unavailable",
            db_unavailable.clone(),
        );
        let edge_refusals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "edge_refusals",
            "Claims from edges the primary refused",
            edge_refusals.clone(),
        );
        let provisioner_refusals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "provisioner_refusals",
            "Calls from provisioner daemons the primary refused",
            provisioner_refusals.clone(),
        );
        let apps = devmesh_proxy::pipeline::ProxyMetrics::register(
            registry.sub_registry_with_prefix("app"),
        );
        let embedded_postgres_restarts = Counter::default();
        registry.register(
            "embedded_postgres_restarts",
            "Times the embedded PostgreSQL died and was started again",
            embedded_postgres_restarts.clone(),
        );
        let embedded_postgres_up = Gauge::default();
        let build_info = Family::<Vec<(String, String)>, Gauge>::default();
        build_info
            .get_or_create(&vec![("version".into(), devmesh_shared::VERSION.into())])
            .set(1);
        registry.register("build_info", "The running version", build_info);
        Self {
            registry,
            http_requests,
            http_duration,
            logins,
            key_checks,
            db_unavailable,
            edge_refusals,
            provisioner_refusals,
            apps,
            embedded_postgres_restarts,
            embedded_postgres_up,
        }
    }

    /// Exports [`Metrics::embedded_postgres_up`] (a deployment with an
    /// external database has no such gauge).
    pub fn watch_embedded_postgres(&mut self) {
        self.embedded_postgres_up.set(1);
        self.registry.register(
            "embedded_postgres_up",
            "1 while the embedded PostgreSQL runs, 0 while it is down",
            self.embedded_postgres_up.clone(),
        );
    }

    /// Exports the pool's count of connections closed because a cancelled
    /// task left them inside a transaction ([`crate::db::connect`]).
    pub fn count_stale_transactions(&mut self, counter: Counter) {
        self.registry.register(
            "db_stale_transactions",
            "Pooled connections closed because a cancelled task left them inside a transaction",
            counter,
        );
    }

    /// Counts one outcome in a result family.
    pub fn count(family: &Family<ResultLabels, Counter>, result: &str) {
        family
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
