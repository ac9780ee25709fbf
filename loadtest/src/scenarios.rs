//! The eight scenarios. Each fills a [`ScenarioReport`]: rows per case and
//! target (devmesh first, then the baselines), notes, and extra figures.
//! Nothing here asserts a timing: the tool measures, people judge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::Instant;

use crate::report::ScenarioReport;
use crate::run::Ctx;
use crate::scenario::{self, Protocol};
use crate::stats::{Samples, round};
use crate::topology::Endpoint;
use crate::wan::{LinkSpec, TcpRelay};
use crate::{baselines, load};

const MIB: u64 = 1024 * 1024;

// === 1: small requests ===

/// Scenario 1.
pub async fn small(
    ctx: &mut Ctx,
    cfg: &scenario::Small,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let targets = ctx.targets(&mut sr.notes);
    // The tool's own client costs far more CPU per request than what it
    // measures on a small machine; h2load, where installed, drives these
    // cases instead, so the figures are devmesh's and not the client's.
    let h2load = match cfg.driver {
        scenario::Driver::Client => None,
        scenario::Driver::Auto => baselines::which("h2load"),
        scenario::Driver::H2load => Some(
            baselines::which("h2load")
                .context("driver = \"h2load\" but h2load is not installed")?,
        ),
    };
    sr.notes.push(match &h2load {
        Some(_) => "Driver: h2load (one stream per connection); the tool's own client only warms up.".into(),
        None if cfg.driver == scenario::Driver::Client => "Driver: the tool's own reqwest client (driver = \"client\"); see the generator share column before trusting a ratio.".into(),
        None => "Driver: the tool's own reqwest client (h2load not found: install nghttp2-client); see the generator share column before trusting a ratio.".into(),
    });
    for &c in &cfg.concurrency {
        for &proto in &cfg.protocols {
            let case = format!("c={c} {}", proto.label());
            for t in &targets {
                ctx.progress
                    .set_message(format!("small: {case} via {}", t.name));
                let client = ctx.client(proto)?;
                let (s, d) = match &h2load {
                    Some(bin) => {
                        // Warm the path (the edge's route cache, the pools).
                        let _ = load::small(&client, t, cfg.body_bytes, c.min(8), c.min(8)).await;
                        match load::small_h2load(
                            bin,
                            t,
                            proto == Protocol::Http2,
                            cfg.body_bytes,
                            cfg.requests,
                            c,
                            &ctx.out,
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(e) => {
                                sr.notes.push(format!("{case} via {}: {e:#}", t.name));
                                continue;
                            }
                        }
                    }
                    None => load::small(&client, t, cfg.body_bytes, cfg.requests, c).await,
                };
                sr.add(&case, &t.name, s, d);
            }
        }
    }
    Ok(())
}

// === 2: bulk ===

/// Scenario 2.
pub async fn bulk(
    ctx: &mut Ctx,
    cfg: &scenario::Bulk,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let size = cfg.size_mib * MIB;
    let targets = ctx.targets(&mut sr.notes);
    let client = ctx.client(Protocol::Http1)?;
    let down = format!("download {} MiB", cfg.size_mib);
    let up = format!("upload {} MiB", cfg.size_mib);
    for t in &targets {
        for (case, is_up) in [(&down, false), (&up, true)] {
            ctx.progress
                .set_message(format!("bulk: {case} via {}", t.name));
            let (s, d) = load::parallel(&client, t, size, 1, is_up).await;
            sr.add(case.as_str(), &t.name, s, d);
        }
        if cfg.parallel > 1 {
            for (dir, is_up) in [("download", false), ("upload", true)] {
                let case = format!("{dir} {} MiB as {} streams", cfg.size_mib, cfg.parallel);
                ctx.progress
                    .set_message(format!("bulk: {case} via {}", t.name));
                let (s, d) = load::parallel(&client, t, size, cfg.parallel, is_up).await;
                sr.add(case, &t.name, s, d);
            }
        }
    }
    if ctx.ceiling {
        for (name, r) in [
            ("ceiling: raw quinn", baselines::quinn_bulk(size).await),
            ("ceiling: raw rustls", baselines::rustls_bulk(size).await),
        ] {
            ctx.progress.set_message(format!("bulk: {name}"));
            let mut s = Samples::default();
            match r {
                Ok(d) => {
                    s.ok(d);
                    s.bytes = size;
                    sr.add(&down, name, s, d);
                }
                Err(e) => sr.notes.push(format!("{name} failed: {e:#}")),
            }
        }
    }
    sr.notes.push("Checksum: every byte is checked against a known pattern on receipt (downloads by the client, uploads by the app).".into());
    Ok(())
}

// === 3: WebSockets ===

async fn ws_connect(
    ep: &Endpoint,
    ca: &rustls::RootCertStore,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<Box<dyn AsyncReadWrite>>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (scheme, rest) = ep.base.split_once("://").context("url")?;
    let (host, port) = rest.rsplit_once(':').context("port")?;
    let port: u16 = port.parse()?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn AsyncReadWrite> = if scheme == "https" {
        let mut c = rustls::ClientConfig::builder()
            .with_root_certificates(ca.clone())
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(c))
            .connect(
                rustls::pki_types::ServerName::try_from(host.to_owned())?,
                tcp,
            )
            .await?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let mut req = format!("ws://{host}:{port}/ws").into_client_request()?;
    if let Some(t) = &ep.token {
        req.headers_mut()
            .insert("Devmesh-Session-Token", t.parse()?);
    }
    let (ws, _) = tokio_tungstenite::client_async(req, io).await?;
    Ok(ws)
}

/// A byte stream for a WebSocket (TCP or TLS).
pub trait AsyncReadWrite: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

fn roots(ctx: &Ctx) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ctx.dep.ca_pem)? {
        roots.add(c?)?;
    }
    Ok(roots)
}

/// Scenario 3.
pub async fn websockets(
    ctx: &mut Ctx,
    cfg: &scenario::Websockets,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let roots = Arc::new(roots(ctx)?);
    let mut targets = vec![ctx.devmesh(&mut sr.notes)];
    targets.extend(ctx.baselines.iter().filter(|b| b.name == "nginx").cloned());
    let interval = Duration::from_secs_f64(cfg.interval_s);
    for t in targets {
        let window = ctx.dep.monitor.window();
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let connect = Arc::new(parking_lot::Mutex::new(Samples::default()));
        let echo = Arc::new(parking_lot::Mutex::new(Samples::default()));
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        // Why opens failed, each reason once with its count.
        let why = Arc::new(parking_lot::Mutex::new(std::collections::BTreeMap::<
            String,
            usize,
        >::new()));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(cfg.connections);
        for i in 0..cfg.connections {
            let why = why.clone();
            let (ep, roots, stop, opened2, connect, echo, gate) = (
                t.clone(),
                roots.clone(),
                stop.clone(),
                opened.clone(),
                connect.clone(),
                echo.clone(),
                gate.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                let t0 = Instant::now();
                let ws =
                    tokio::time::timeout(Duration::from_secs(30), ws_connect(&ep, &roots)).await;
                drop(permit);
                let mut ws = match ws {
                    Ok(Ok(ws)) => {
                        connect.lock().ok(t0.elapsed());
                        opened2.fetch_add(1, Ordering::Relaxed);
                        ws
                    }
                    failed => {
                        connect.lock().errors += 1;
                        let reason = match failed {
                            Ok(Err(e)) => format!("{e:#}"),
                            _ => "no answer within 30 s".to_owned(),
                        };
                        *why.lock().entry(reason).or_default() += 1;
                        return;
                    }
                };
                // Spread the sends over the interval.
                let phase = interval.mul_f64((i % 997) as f64 / 997.0);
                tokio::time::sleep(phase).await;
                let msg = format!("ping {i}");
                while !stop.load(Ordering::Relaxed) {
                    let t1 = Instant::now();
                    let ok = async {
                        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
                            .await?;
                        loop {
                            match ws.next().await {
                                Some(Ok(m)) if m.is_text() => {
                                    return anyhow::Ok(m.into_text()? == msg.as_str());
                                }
                                Some(Ok(_)) => continue,
                                _ => return Ok(false),
                            }
                        }
                    }
                    .await
                    .unwrap_or(false);
                    if ok {
                        echo.lock().ok(t1.elapsed());
                    } else {
                        echo.lock().errors += 1;
                        return;
                    }
                    tokio::time::sleep(interval).await;
                }
                let _ = ws.close(None).await;
            }));
            if i % 500 == 499 {
                ctx.progress.set_message(format!(
                    "websockets via {}: {} open",
                    t.name,
                    opened.load(Ordering::Relaxed)
                ));
            }
        }
        // Wait until every connection has opened or failed.
        loop {
            let settled = {
                let c = connect.lock();
                c.ms.len() + c.errors
            };
            if settled >= cfg.connections {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let open_time = start.elapsed();
        for (reason, n) in why.lock().iter().take(5) {
            sr.notes
                .push(format!("{}: {n} opens failed: {reason}", t.name));
        }
        let before_hold = ctx.dep.monitor.usage(&window);
        ctx.progress.set_message(format!(
            "websockets via {}: {} open, holding",
            t.name,
            opened.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_secs_f64(cfg.hold_s)).await;
        let held = ctx.dep.monitor.usage(&window);
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        let n = opened.load(Ordering::Relaxed);
        let connect = std::mem::take(&mut *connect.lock());
        let echo = std::mem::take(&mut *echo.lock());
        sr.add_window(
            format!("connect ({} connections)", cfg.connections),
            &t.name,
            connect,
            start,
            open_time,
        );
        sr.add(
            format!("echo every {} s", cfg.interval_s),
            &t.name,
            echo,
            start.elapsed(),
        );
        if t.name.starts_with("devmesh") {
            let mut per = serde_json::Map::new();
            for (p, b) in held.iter().zip(before_hold.iter()) {
                let grown = (p.peak_rss_mib - p.start_rss_mib).max(0.0);
                per.insert(
                    p.name.clone(),
                    json!({
                        "rss_start_mib": round(p.start_rss_mib),
                        "rss_peak_mib": round(p.peak_rss_mib),
                        "kib_per_connection": round(grown * 1024.0 / n.max(1) as f64),
                        "cpu_s_while_opening": round(b.cpu_s),
                    }),
                );
            }
            sr.extra.insert(
                "devmesh_rss_per_connection".into(),
                serde_json::Value::Object(per),
            );
            sr.extra.insert("devmesh_connections_open".into(), json!(n));
        } else {
            sr.extra
                .insert(format!("{}_connections_open", t.name), json!(n));
        }
    }
    sr.notes.push("RSS per connection: (peak RSS while all were open − RSS before) ÷ connections, per devmesh process.".into());
    Ok(())
}

// === 4: agents ===

/// Scenario 4.
pub async fn agents(
    ctx: &mut Ctx,
    cfg: &scenario::Agents,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    crate::agents::run(ctx, cfg, sr).await
}

// === 5: regions ===

/// Scenario 5.
pub async fn regions(
    ctx: &mut Ctx,
    cfg: &scenario::Regions,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let client_region = ctx.dep.client_region.clone();
    // A workspace in the client's own region, reached through its edge or
    // through the primary (which crosses the mesh back to that region).
    let agent = ctx
        .dep
        .agents
        .iter()
        .position(|a| a.region == client_region)
        .unwrap_or(0);
    let mut paths: Vec<(Endpoint, Option<usize>)> = Vec::new();
    let mut p = ctx.dep.via_primary(agent, true);
    p.name = format!(
        "devmesh via primary ({client_region} → {})",
        ctx.dep.primary_region
    );
    let primary_front = ctx
        .dep
        .wan
        .iter()
        .position(|f| f.from == client_region && f.to == "primary");
    paths.push((p, primary_front));
    if let Some(e) = ctx.dep.edges.iter().position(|e| e.region == client_region) {
        match ctx.dep.via_edge(e, agent, true) {
            Some(mut ep) => {
                ep.name = format!("devmesh via edge {client_region}");
                let front = ctx.dep.wan.iter().position(|f| f.from == client_region && f.to == client_region);
                paths.push((ep, front));
            }
            None => sr.notes.push(format!(
                "edge path unavailable: the {client_region} edge does not serve apps yet; only the path through the primary is measured"
            )),
        }
    } else {
        sr.notes
            .push(format!("no edge in the client's region {client_region}"));
    }
    if ctx.dep.wan.is_empty() {
        sr.notes
            .push("WAN emulation is off in the scenario file: every path is plain loopback".into());
    }
    for (ep, front) in &paths {
        // First visits: a fresh client each time (TCP + TLS handshake + request).
        let before = front.map(|f| ctx.dep.wan[f].relay.counters.snapshot());
        let mut s = Samples::default();
        let t = Instant::now();
        for _ in 0..cfg.first_visits {
            ctx.progress
                .set_message(format!("regions: first visits via {}", ep.name));
            let client = ctx.client(Protocol::Http1)?;
            match load::small_once(&client, ep, 1024).await {
                Ok(d) => s.ok(d),
                Err(_) => s.errors += 1,
            }
        }
        sr.add("first visit", &ep.name, s, t.elapsed());
        if let (Some(f), Some(b)) = (front, before) {
            let d = ctx.dep.wan[*f].relay.counters.snapshot() - b;
            sr.extra.insert(
                format!("round trips per first visit, {}", ep.name),
                json!(round(d.round_trips as f64 / cfg.first_visits.max(1) as f64)),
            );
        }
        // First visits as a browser signed in to the dashboard makes them:
        // app host → primary's auth redirect → back with a one-time key →
        // the app, every hop over its emulated link.
        let mut s = Samples::default();
        let mut hops = 0;
        let t = Instant::now();
        for _ in 0..cfg.first_visits {
            ctx.progress.set_message(format!(
                "regions: first visits with sign-in via {}",
                ep.name
            ));
            match browser_first_visit(ctx, ep).await {
                Ok((d, h)) => {
                    s.ok(d);
                    hops = h;
                }
                Err(e) => {
                    tracing_note(
                        sr,
                        format!("a first visit with sign-in via {} failed: {e:#}", ep.name),
                    );
                    s.errors += 1;
                }
            }
        }
        sr.add("first visit with sign-in", &ep.name, s, t.elapsed());
        sr.extra.insert(
            format!("HTTP requests per first visit with sign-in, {}", ep.name),
            json!(hops),
        );
        // Steady state on one kept-alive connection.
        ctx.progress
            .set_message(format!("regions: steady state via {}", ep.name));
        let client = ctx.client(Protocol::Http1)?;
        let before = front.map(|f| ctx.dep.wan[f].relay.counters.snapshot());
        let (s, d) = load::small(&client, ep, 1024, cfg.requests, 1).await;
        sr.add("steady state", &ep.name, s, d);
        if let (Some(f), Some(b)) = (front, before) {
            let d = ctx.dep.wan[*f].relay.counters.snapshot() - b;
            sr.extra.insert(
                format!("round trips per steady request, {}", ep.name),
                json!(round(d.round_trips as f64 / (cfg.requests + 1) as f64)),
            );
        }
    }
    let stop = ctx.stop.child_token();
    // The floor of the steady state through the edge: the app reached
    // directly through the same two emulated links the edge path crosses
    // (client → edge, edge → agent), so the ratio is devmesh's own cost.
    if let Some((ep, Some(f))) = paths.get(1) {
        let spec = ctx.dep.wan[*f].spec;
        let inner =
            TcpRelay::start(([127, 0, 0, 1], ctx.app_port).into(), spec, stop.clone()).await?;
        let outer = TcpRelay::start(inner.addr, spec, stop.clone()).await?;
        let floor = Endpoint {
            name: format!("floor: direct through two emulated {client_region} links"),
            base: format!("http://{}", outer.addr),
            token: None,
        };
        ctx.progress
            .set_message(format!("regions: steady state via {}", floor.name));
        let client = ctx.client(Protocol::Http1)?;
        let (s, d) = load::small(&client, &floor, 1024, cfg.requests, 1).await;
        let floor_p50 = sr.add("steady state", &floor.name, s, d).summary.p50_ms;
        let edge_p50 = sr
            .rows
            .iter()
            .find(|r| r.case == "steady state" && r.target == ep.name)
            .and_then(|r| r.summary.p50_ms);
        if let (Some(edge_p50), Some(floor_p50)) = (edge_p50, floor_p50.filter(|f| *f > 0.0)) {
            sr.extra.insert(
                format!("steady state p50, {} ÷ floor", ep.name),
                json!(round(edge_p50 / floor_p50)),
            );
        }
    }
    // The emulator's own overhead: direct, and direct through a 0 ms link.
    let relay = TcpRelay::start(
        ([127, 0, 0, 1], ctx.app_port).into(),
        LinkSpec::rtt(Duration::ZERO),
        stop.clone(),
    )
    .await?;
    let direct = Endpoint {
        name: "direct".into(),
        base: format!("http://127.0.0.1:{}", ctx.app_port),
        token: None,
    };
    let emulated = Endpoint {
        name: "direct through the emulator (0 ms)".into(),
        base: format!("http://127.0.0.1:{}", relay.addr.port()),
        token: None,
    };
    for ep in [&direct, &emulated] {
        ctx.progress
            .set_message(format!("regions: emulator overhead, {}", ep.name));
        let client = ctx.client(Protocol::Http1)?;
        let (s, d) = load::small(&client, ep, 1024, cfg.requests.max(200), 1).await;
        let row = sr.add("emulator overhead: 1 KiB GETs", &ep.name, s, d);
        let p50 = row.summary.p50_ms;
        let mib = cfg.emulator_overhead_mib;
        let (s, d) = load::parallel(&client, ep, mib * MIB, 1, false).await;
        let mibs = sr
            .add(
                format!("emulator overhead: {mib} MiB download"),
                &ep.name,
                s,
                d,
            )
            .summary
            .mib_per_s;
        sr.extra.insert(
            format!("emulator overhead: {} p50 ms / MiB/s", ep.name),
            json!([p50, mibs]),
        );
    }
    stop.cancel();
    sr.notes.push("Round trips are counted on the emulated link as request→response turns of its TCP connections.".into());
    sr.notes.push("First visit: a new connection with TCP and TLS handshakes and the session-token header. First visit with sign-in: a fresh cookie-keeping client, signed in to the dashboard, following the app's redirects to the primary's auth redirect and back (each on its own connection), as a browser does on its first visit to an app.".into());
    Ok(())
}

/// One first visit with sign-in (see the regions scenario); returns its
/// time and how many HTTP requests it took.
async fn browser_first_visit(ctx: &Ctx, ep: &Endpoint) -> anyhow::Result<(Duration, usize)> {
    let jar = Arc::new(reqwest::cookie::Jar::default());
    // Signed in to the dashboard (cookies are per host, not per port; the
    // deployment is HTTPS, so the cookie has the host-only `__Host-` name).
    jar.add_cookie_str(
        &format!(
            "__Host-devmesh_session_token={}; Path=/; Secure",
            ctx.dep.token
        ),
        &"https://localhost/".parse()?,
    );
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let counted = requests.clone();
    let client = reqwest::Client::builder()
        .dns_resolver(Arc::new(crate::topology::Loopback))
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            &ctx.dep.ca_pem,
        )?)?)
        .cookie_provider(jar)
        .redirect(reqwest::redirect::Policy::custom(move |a| {
            counted.fetch_add(1, Ordering::Relaxed);
            if a.previous().len() > 8 {
                a.error("too many redirects")
            } else {
                a.follow()
            }
        }))
        .http1_only()
        .timeout(Duration::from_secs(60))
        .build()?;
    let t = Instant::now();
    let resp = client
        .get(format!("{}/blob/1024", ep.base))
        .header("Accept", "text/html")
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let body = resp.bytes().await?;
    anyhow::ensure!(body.len() == 1024, "body of {} bytes", body.len());
    Ok((t.elapsed(), requests.load(Ordering::Relaxed)))
}

fn tracing_note(sr: &mut ScenarioReport, note: String) {
    if !sr.notes.contains(&note) {
        sr.notes.push(note);
    }
}

// === 6: fairness ===

/// Scenario 6.
pub async fn fairness(
    ctx: &mut Ctx,
    cfg: &scenario::Fairness,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let targets = ctx.targets(&mut sr.notes);
    let n = cfg.small_clients * cfg.requests_per_client;
    for t in &targets {
        let client = ctx.client(Protocol::Http1)?;
        ctx.progress
            .set_message(format!("fairness: small alone via {}", t.name));
        let (s, d) = load::small(&client, t, 1024, n, cfg.small_clients).await;
        sr.add("64 small clients alone", &t.name, s, d);
        ctx.progress
            .set_message(format!("fairness: small beside a download via {}", t.name));
        let bulk_client = ctx.client(Protocol::Http1)?;
        let (bt, size) = (t.clone(), cfg.bulk_mib * MIB);
        let bulk = tokio::spawn(async move {
            let t0 = Instant::now();
            let r = load::download(&bulk_client, &bt, size, None).await;
            (r, t0.elapsed())
        });
        // Let the download get going before the small requests start.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (s, d) = load::small(&client, t, 1024, n, cfg.small_clients).await;
        let still_running = !bulk.is_finished();
        sr.add("64 small clients beside a download", &t.name, s, d);
        let (r, bd) = bulk.await?;
        let mut bs = Samples::default();
        match r {
            Ok(b) => {
                bs.bytes = b;
                bs.ok(bd);
            }
            Err(_) => bs.errors += 1,
        }
        sr.add("the competing download", &t.name, bs, bd);
        if !still_running {
            sr.notes.push(format!(
                "{}: the download finished before the small requests did; raise bulk_mib",
                t.name
            ));
        }
    }
    for r in sr.rows.iter_mut() {
        if r.case.starts_with("64 small") {
            r.case = r.case.replacen("64", &cfg.small_clients.to_string(), 1);
        }
    }
    Ok(())
}

// === 7: slow reader ===

/// Scenario 7.
pub async fn slow_reader(
    ctx: &mut Ctx,
    cfg: &scenario::SlowReader,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let ep = ctx.devmesh(&mut sr.notes);
    let client = ctx.client(Protocol::Http1)?;
    let rate = cfg.rate_kib_s * 1024;
    ctx.progress.set_message(format!(
        "slow reader: {} KiB/s for {} s",
        cfg.rate_kib_s, cfg.duration_s
    ));
    let t = Instant::now();
    let r = load::download(
        &client,
        &ep,
        cfg.size_mib * MIB,
        Some((rate, Duration::from_secs_f64(cfg.duration_s))),
    )
    .await;
    let d = t.elapsed();
    let mut s = Samples::default();
    match r {
        Ok(b) => {
            s.bytes = b;
            s.ok(d);
        }
        Err(e) => {
            s.errors += 1;
            sr.notes.push(format!("the slow download failed: {e:#}"));
        }
    }
    sr.add(
        format!("{} KiB/s reader of {} MiB", cfg.rate_kib_s, cfg.size_mib),
        &ep.name,
        s,
        d,
    );
    sr.notes.push("The reader stops after duration_s; flat RSS lines in the plot mean the proxies apply backpressure instead of buffering the body.".into());
    Ok(())
}

// === 8: failover ===

/// Scenario 8.
pub async fn failover(
    ctx: &mut Ctx,
    cfg: &scenario::Failover,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let Some(e) = ctx.dep.edges.iter().position(|e| e.proc.is_some()) else {
        sr.notes.push("no edge to kill in this topology".into());
        return Ok(());
    };
    let region = ctx.dep.edges[e].region.clone();
    // The load targets an agent attached to the edge that dies, through a
    // path that survives: another edge that serves apps, or the primary.
    let agent = ctx
        .dep
        .agents
        .iter()
        .position(|a| a.region == region)
        .unwrap_or(0);
    let other = (0..ctx.dep.edges.len())
        .find(|&o| o != e && ctx.dep.edges[o].proc.is_some())
        .and_then(|o| ctx.dep.via_edge(o, agent, false));
    let ep = match other {
        Some(ep) => ep,
        None => {
            sr.notes.push(format!(
                "no other edge serves apps: the load goes through the primary while edge {region} is killed"
            ));
            ctx.dep.via_primary(agent, false)
        }
    };
    sr.notes.push(format!(
        "load: {} → the agent of {region}, whose edge is killed",
        ep.name
    ));
    let client = ctx.client(Protocol::Http1)?;
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(parking_lot::Mutex::new(
        Vec::<(f64, Result<Duration, ()>)>::new(),
    ));
    let start = Instant::now();
    let load_tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, ep, stop, samples) =
                (client.clone(), ep.clone(), stop.clone(), samples.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = load::small_once(&client, &ep, 1024).await.map_err(|_| ());
                    samples.lock().push((start.elapsed().as_secs_f64(), r));
                    if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    ctx.progress.set_message(format!(
        "failover: load for {} s, then kill edge {region}",
        cfg.before_s
    ));
    tokio::time::sleep(Duration::from_secs_f64(cfg.before_s)).await;
    let killed_at = start.elapsed().as_secs_f64();
    ctx.dep.kill_edge(e).await;
    // Every agent must answer again through the devmesh path; all are
    // polled at once, so an agent's time is its own, not the sum of the
    // checks before it.
    let t = Instant::now();
    ctx.progress
        .set_message("failover: waiting for every agent to answer");
    let timeout = Duration::from_secs_f64(cfg.reattach_timeout_s);
    let dep = &ctx.dep;
    let answered = futures_util::future::join_all(
        (0..dep.agents.len()).map(|i| dep.wait_attached(i, timeout)),
    )
    .await;
    let reattached = answered.iter().all(Result::is_ok);
    let reattach = t.elapsed();
    // Keep the load going a little after recovery, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load_tasks {
        let _ = t.await;
    }
    let all = std::mem::take(&mut *samples.lock());
    let (mut before, mut after) = (Samples::default(), Samples::default());
    // Requests that failed once every agent answered again: the issue's
    // "no request sent after re-attach fails".
    let recovered_at = killed_at + reattach.as_secs_f64();
    let failed_after_recovery = all
        .iter()
        .filter(|(at, r)| *at > recovered_at && r.is_err())
        .count();
    let last_failure = all
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(at, _)| at - killed_at)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    for (at, r) in all {
        let s = if at < killed_at {
            &mut before
        } else {
            &mut after
        };
        match r {
            Ok(d) => s.ok(d),
            Err(()) => s.errors += 1,
        }
    }
    sr.add_window(
        "8 clients before the kill",
        &ep.name,
        before,
        start,
        Duration::from_secs_f64(killed_at),
    );
    sr.add(
        "8 clients after the kill",
        &ep.name,
        after,
        start.elapsed() - Duration::from_secs_f64(killed_at),
    );
    sr.extra.insert("killed edge".into(), json!(region));
    sr.extra.insert(
        "requests failed after every agent answered again".into(),
        json!(failed_after_recovery),
    );
    sr.extra.insert(
        "seconds from the kill to the load's last failure".into(),
        last_failure.map_or(json!("none"), |s| json!(round(s))),
    );
    sr.extra.insert(
        "seconds until every agent answered again".into(),
        if reattached {
            json!(round(reattach.as_secs_f64()))
        } else {
            json!(format!("not within {} s", cfg.reattach_timeout_s))
        },
    );
    Ok(())
}

// === 9: the edge path ===

/// Scenario 9: how many requests the primary serves while an edge answers
/// steady-state requests for an agent attached to it (the design says
/// none), and the latency one mesh hop adds: the same edge to its own agent
/// and to an agent attached to another edge, interleaved so that machine
/// noise falls on both paths alike. With WAN emulation the hop includes the
/// link between the two regions; `scenarios/edges.toml` turns it off to
/// measure devmesh's own cost of a hop.
pub async fn mesh(
    ctx: &mut Ctx,
    cfg: &scenario::Mesh,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let dep = &ctx.dep;
    let found = dep.edges.iter().enumerate().find_map(|(e, edge)| {
        edge.app_host_suffix.as_ref()?;
        let local = dep.agents.iter().position(|a| a.region == edge.region)?;
        let remote = dep.agents.iter().position(|a| {
            a.region != edge.region && dep.edges.iter().any(|x| x.region == a.region)
        })?;
        Some((e, local, remote))
    });
    let Some((e, local, remote)) = found else {
        sr.notes
            .push("needs two edges that serve apps, each with an agent in its region".into());
        return Ok(());
    };
    let client = ctx.client(Protocol::Http1)?;
    let mut local_ep = dep.via_edge(e, local, false).context("edge path")?;
    let mut remote_ep = dep.via_edge(e, remote, false).context("edge path")?;
    local_ep.name = format!("edge {} → its own agent", dep.edges[e].region);
    remote_ep.name = format!(
        "edge {} → agent in {} (one mesh hop)",
        dep.edges[e].region, dep.agents[remote].region
    );
    // The first requests authorise with the primary and open the mesh link.
    for ep in [&local_ep, &remote_ep] {
        for _ in 0..20 {
            load::small_once(&client, ep, 1024).await?;
        }
    }

    ctx.progress.set_message(format!(
        "mesh: {} steady-state requests through the edge",
        cfg.steady_requests
    ));
    let before = primary_requests(ctx).await?;
    let mut steady = Samples::default();
    let t = Instant::now();
    for _ in 0..cfg.steady_requests {
        match load::small_once(&client, &local_ep, 1024).await {
            Ok(d) => steady.ok(d),
            Err(_) => steady.errors += 1,
        }
    }
    let elapsed = t.elapsed();
    let after = primary_requests(ctx).await?;
    sr.add("steady state", &local_ep.name, steady, elapsed);
    sr.extra.insert(
        format!(
            "requests the primary served during {} edge requests",
            cfg.steady_requests
        ),
        json!(after.saturating_sub(before)),
    );

    ctx.progress
        .set_message(format!("mesh: {} requests per path", cfg.requests));
    let (mut direct, mut hop) = (Samples::default(), Samples::default());
    let t = Instant::now();
    for _ in 0..cfg.requests {
        for (ep, s) in [(&local_ep, &mut direct), (&remote_ep, &mut hop)] {
            match load::small_once(&client, ep, 1024).await {
                Ok(d) => s.ok(d),
                Err(_) => s.errors += 1,
            }
        }
    }
    let elapsed = t.elapsed();
    let a = sr
        .add("1 KiB GET, c=1", &local_ep.name, direct, elapsed)
        .summary
        .clone();
    let b = sr
        .add("1 KiB GET, c=1", &remote_ep.name, hop, elapsed)
        .summary
        .clone();
    let added = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => json!(round(y - x)),
        _ => json!(null),
    };
    sr.extra
        .insert("mesh hop adds p50 ms".into(), added(a.p50_ms, b.p50_ms));
    sr.extra
        .insert("mesh hop adds p99 ms".into(), added(a.p99_ms, b.p99_ms));
    Ok(())
}

/// Requests the primary has served, except edges' heartbeats and event
/// streams and metric scrapes (from its `/metrics`).
async fn primary_requests(ctx: &Ctx) -> anyhow::Result<u64> {
    let text = ctx
        .dep
        .http
        .get(format!("{}/metrics", ctx.dep.url))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("devmesh_http_requests_total{"))
        .filter(|l| {
            ![
                "/api/v2/edges/me/register",
                "/api/v2/edges/me/events",
                "/metrics",
            ]
            .iter()
            .any(|r| l.contains(&format!("route=\"{r}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}
