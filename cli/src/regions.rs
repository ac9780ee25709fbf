//! The region a session goes through: the nearest healthy one, measured
//! against every healthy region's `/latency-check` and remembered for
//! [`CACHE_FOR`] (in `<config dir>/regions.json`), or the one pinned with
//! `--region` / `DEVMESH_REGION`.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use anyhow::Context;
use devmesh_shared::api::{Region, RegionsResponse};
use serde::{Deserialize, Serialize};

use crate::client::Client;

/// How long a measurement is trusted.
const CACHE_FOR: Duration = Duration::from_secs(10 * 60);
/// Round trips timed per region; the fastest counts.
const PROBES: usize = 3;
/// How long one probe may take before the region counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A region to go through, nearest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Ranked {
    /// `primary` or an edge's name.
    pub(crate) name: String,
    /// Where the region serves the API (its access URL).
    pub(crate) url: String,
    /// The app wildcard there, if it serves apps.
    pub(crate) wildcard: Option<String>,
    /// The fastest round trip to `/latency-check`; `None` when pinned
    /// without measuring, or unreachable.
    pub(crate) rtt_ms: Option<f64>,
}

/// What `regions.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    /// The deployment measured (the primary's URL).
    deployment: String,
    /// When, unix seconds.
    measured_at: i64,
    ranked: Vec<Ranked>,
}

fn cache_path() -> anyhow::Result<std::path::PathBuf> {
    Ok(crate::session::config_dir()?.join("regions.json"))
}

/// The regions to try for `client`'s deployment, best first: the pinned
/// one alone, else every healthy region by latency (remembered a while).
pub(crate) async fn ranked(
    client: &Client,
    pinned: Option<&str>,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Ranked>> {
    if let Some(name) = pinned {
        let regions: RegionsResponse = client.get("/regions").await?;
        let found = regions.regions.iter().find(|r| r.name == name);
        let Some(region) = found else {
            let names: Vec<&str> = regions.regions.iter().map(|r| r.name.as_str()).collect();
            anyhow::bail!("no region {name:?}: there are {}", names.join(", "));
        };
        anyhow::ensure!(
            safe_for_key(client.base(), region),
            "region {name} is reached over plain HTTP while the deployment uses HTTPS: \
             your key would cross the network in the clear"
        );
        if !region.healthy {
            eprintln!(
                "Region {name} is not healthy ({:?}); trying it as asked.",
                region.status
            );
        }
        return Ok(vec![ranked_from(region, client, None)]);
    }
    if let Some(cached) = load(client.base()) {
        return Ok(cached);
    }
    let ranked = measure(client, ca_cert).await?;
    save(client.base(), &ranked);
    Ok(ranked)
}

/// Forgets the measurement (a region it chose failed).
pub(crate) fn forget() {
    if let Ok(p) = cache_path() {
        let _ = std::fs::remove_file(p);
    }
}

/// Times every healthy region; the unreachable ones go last.
pub(crate) async fn measure(
    client: &Client,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Ranked>> {
    let regions: RegionsResponse = client.get("/regions").await?;
    let probes = regions
        .regions
        .iter()
        .filter(|r| r.healthy && safe_for_key(client.base(), r))
        .map(|r| async {
            let rtt = match r.access_url.as_deref() {
                Some(url) => probe(url, ca_cert).await,
                None => None,
            };
            ranked_from(r, client, rtt)
        });
    let mut ranked: Vec<Ranked> = futures_util::future::join_all(probes).await;
    ranked.sort_by(|a, b| {
        let key = |r: &Ranked| r.rtt_ms.unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b))
    });
    Ok(ranked)
}

/// Whether this client's key may go to region `r`: never in the clear to a
/// remote region when the deployment itself is reached over HTTPS.
fn safe_for_key(primary: &str, r: &Region) -> bool {
    let Some(url) = r.access_url.as_deref() else {
        return r.name == "primary";
    };
    if r.name == "primary" || url.starts_with("https://") || primary.starts_with("http://") {
        return true;
    }
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

fn ranked_from(r: &Region, client: &Client, rtt_ms: Option<f64>) -> Ranked {
    Ranked {
        name: r.name.clone(),
        // The primary is reached as this client reaches it.
        url: if r.name == "primary" {
            client.base().to_owned()
        } else {
            r.access_url.clone().unwrap_or_default()
        },
        wildcard: r.wildcard_hostname.clone(),
        rtt_ms,
    }
}

/// The fastest of [`PROBES`] round trips to `url`'s `/latency-check`, in
/// milliseconds; `None` if any probe fails.
async fn probe(url: &str, ca_cert: Option<&std::path::Path>) -> Option<f64> {
    let http = devmesh_net::sockets::http_client(
        concat!("devmesh-cli/", env!("CARGO_PKG_VERSION")),
        PROBE_TIMEOUT,
        ca_cert,
    )
    .ok()?;
    let target = format!("{}/latency-check", url.trim_end_matches('/'));
    let mut best = f64::INFINITY;
    // The first probe also sets the connection up; later ones reuse it.
    for _ in 0..PROBES {
        let started = tokio::time::Instant::now();
        let resp = http.get(&target).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
    }
    Some(best)
}

fn load(deployment: &str) -> Option<Vec<Ranked>> {
    let text = std::fs::read_to_string(cache_path().ok()?).ok()?;
    let cached: Cached = serde_json::from_str(&text).ok()?;
    let age = chrono::Utc::now().timestamp() - cached.measured_at;
    let fresh = (0..CACHE_FOR.as_secs() as i64).contains(&age);
    (cached.deployment == deployment && fresh && !cached.ranked.is_empty()).then_some(cached.ranked)
}

fn save(deployment: &str, ranked: &[Ranked]) {
    let write = || -> anyhow::Result<()> {
        let path = cache_path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let cached = Cached {
            deployment: deployment.to_owned(),
            measured_at: chrono::Utc::now().timestamp(),
            ranked: ranked.to_vec(),
        };
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(&cached)?)?;
        std::fs::rename(&tmp, &path).context("replacing regions.json")
    };
    if let Err(e) = write() {
        tracing::debug!(error = %e, "could not remember the nearest region");
    }
}
