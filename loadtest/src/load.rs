//! Load generators over HTTP: keep-alive small requests at a concurrency,
//! bulk downloads and uploads with the pattern check, one at a time or in
//! parallel. Clients are `reqwest`, the same for every target, so the
//! client's own cost cancels out of the ratios.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::stats::Samples;
use crate::topology::Endpoint;
use devmesh_tests::upstream::{Verifier, pattern_chunk};

fn get(client: &reqwest::Client, ep: &Endpoint, path: &str) -> reqwest::RequestBuilder {
    let r = client.get(format!("{}{path}", ep.base));
    match &ep.token {
        Some(t) => r.header("Devmesh-Session-Token", t),
        None => r,
    }
}

/// One small GET; `Ok(latency)` when the body had the expected size.
pub async fn small_once(
    client: &reqwest::Client,
    ep: &Endpoint,
    size: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let resp = get(client, ep, &format!("/blob/{size}")).send().await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let body = resp.bytes().await?;
    anyhow::ensure!(body.len() == size, "body of {} bytes", body.len());
    Ok(t.elapsed())
}

/// `requests` small GETs spread over `concurrency` tasks sharing `client`.
/// Warms up with one request per task first.
pub async fn small(
    client: &reqwest::Client,
    ep: &Endpoint,
    size: usize,
    requests: usize,
    concurrency: usize,
) -> (Samples, Duration) {
    let warm =
        futures_util::future::join_all((0..concurrency).map(|_| small_once(client, ep, size)));
    let _ = warm.await;
    let start = Instant::now();
    let per = requests.div_ceil(concurrency);
    let tasks = (0..concurrency).map(|i| {
        let (client, ep) = (client.clone(), ep.clone());
        let n = per.min(requests.saturating_sub(i * per));
        tokio::spawn(async move {
            let mut s = Samples::default();
            for _ in 0..n {
                match small_once(&client, &ep, size).await {
                    Ok(d) => s.ok(d),
                    Err(_) => s.errors += 1,
                }
            }
            s
        })
    });
    let mut all = Samples::default();
    for r in futures_util::future::join_all(tasks).await {
        all.merge(r.unwrap_or_default());
    }
    (all, start.elapsed())
}

/// `h2load`, a C load generator far cheaper per request than this tool's
/// own client, as the driver of small requests: `requests` GETs of
/// `/blob/{size}` over `concurrency` connections (one stream each), with
/// HTTP/1.1 or HTTP/2. Every request's latency comes from its log file.
pub async fn small_h2load(
    h2load: &std::path::Path,
    ep: &Endpoint,
    http2: bool,
    size: usize,
    requests: usize,
    concurrency: usize,
    scratch: &std::path::Path,
) -> anyhow::Result<(Samples, Duration)> {
    use anyhow::Context;
    let (scheme, rest) = ep.base.split_once("://").context("no scheme")?;
    let port = rest.rsplit_once(':').map_or("443", |(_, p)| p);
    let log = scratch.join(format!("h2load-{}.log", uuid::Uuid::new_v4().simple()));
    let mut cmd = tokio::process::Command::new(h2load);
    cmd.arg("-n")
        .arg(requests.to_string())
        .arg("-c")
        .arg(concurrency.to_string())
        .args(["-t", "1", "-m", "1"])
        .arg(format!("--connect-to=127.0.0.1:{port}"))
        .arg(format!("--log-file={}", log.display()));
    if !http2 {
        cmd.arg("--h1");
    }
    if let Some(t) = &ep.token {
        cmd.arg("-H").arg(format!("Devmesh-Session-Token: {t}"));
    }
    cmd.arg(format!("{scheme}://{rest}/blob/{size}"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let start = Instant::now();
    let out = cmd.output().await;
    let elapsed = start.elapsed();
    let text = std::fs::read_to_string(&log);
    let _ = std::fs::remove_file(&log);
    let out = out.context("cannot run h2load")?;
    anyhow::ensure!(
        out.status.success(),
        "h2load failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = text.context("h2load wrote no log")?;
    let mut s = Samples::default();
    // Each line: start time (µs since the epoch), status, duration (µs), client.
    for line in text.lines() {
        let mut f = line.split('\t');
        let (_, status, micros) = (f.next(), f.next(), f.next());
        match (
            status.and_then(|v| v.parse::<u16>().ok()),
            micros.and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some(200..=299), Some(us)) => s.ok(Duration::from_micros(us)),
            _ => s.errors += 1,
        }
    }
    // Requests that never completed are not in the log.
    s.errors += requests.saturating_sub(s.ms.len() + s.errors);
    s.bytes = (s.ms.len() * size) as u64;
    Ok((s, elapsed))
}

/// Downloads `/bytes/{size}` and checks every byte; returns bytes received.
pub async fn download(
    client: &reqwest::Client,
    ep: &Endpoint,
    size: u64,
    rate_limit: Option<(u64, Duration)>,
) -> anyhow::Result<u64> {
    let mut resp = get(client, ep, &format!("/bytes/{size}")).send().await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let mut v = Verifier::new();
    let start = Instant::now();
    while let Some(chunk) = resp.chunk().await? {
        v.update(&chunk);
        if let Some((bytes_per_s, stop_after)) = rate_limit {
            // Pace the reads: sleep until this many bytes are "due".
            let due = Duration::from_secs_f64(v.offset as f64 / bytes_per_s as f64);
            if due > start.elapsed() {
                tokio::time::sleep(due - start.elapsed()).await;
            }
            if start.elapsed() >= stop_after {
                anyhow::ensure!(v.ok, "corrupt bytes before offset {}", v.offset);
                return Ok(v.offset);
            }
        }
    }
    anyhow::ensure!(v.ok, "corrupt bytes in the download");
    anyhow::ensure!(v.offset == size, "got {} of {size} bytes", v.offset);
    Ok(v.offset)
}

/// Uploads `size` pattern bytes to `/upload`; the app checks them.
pub async fn upload(client: &reqwest::Client, ep: &Endpoint, size: u64) -> anyhow::Result<u64> {
    const CHUNK: u64 = 256 * 1024;
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        (off < size).then(|| {
            let len = (size - off).min(CHUNK);
            (
                Ok::<_, std::io::Error>(pattern_chunk(off, len as usize)),
                off + len,
            )
        })
    });
    let mut r = client
        .post(format!("{}/upload", ep.base))
        .header("content-length", size.to_string())
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(t) = &ep.token {
        r = r.header("Devmesh-Session-Token", t);
    }
    let resp = r.send().await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let text = resp.text().await?;
    anyhow::ensure!(text == format!("ok {size}"), "the app says {text:?}");
    Ok(size)
}

/// `streams` parallel transfers sharing `total` bytes; one sample per stream.
pub async fn parallel(
    client: &reqwest::Client,
    ep: &Endpoint,
    total: u64,
    streams: usize,
    up: bool,
) -> (Samples, Duration) {
    let each = total / streams as u64;
    let start = Instant::now();
    let mut set = futures_util::stream::FuturesUnordered::new();
    for _ in 0..streams {
        let (client, ep) = (client.clone(), ep.clone());
        set.push(async move {
            let t = Instant::now();
            let r = if up {
                upload(&client, &ep, each).await
            } else {
                download(&client, &ep, each, None).await
            };
            (r, t.elapsed())
        });
    }
    let mut s = Samples::default();
    while let Some((r, d)) = set.next().await {
        match r {
            Ok(n) => {
                s.bytes += n;
                s.ok(d);
            }
            Err(_) => s.errors += 1,
        }
    }
    (s, start.elapsed())
}
