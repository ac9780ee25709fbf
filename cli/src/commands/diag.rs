//! `devmesh ping WS`, `devmesh speedtest WS` and `devmesh netcheck`: the
//! path to a workspace, hop by hop, and how much it carries.
//!
//! Both workspace commands use a `Probe` stream (`POST
//! /api/v2/workspaceagents/{id}/probe`): the agent counts what the client
//! uploads, answers with the count, then sends what the client asked to
//! download. The region says how it reached the agent in response headers.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::Global;
use super::ssh::{after, find_agent, parse_target, through_region};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn header_ms(resp: &reqwest::Response, name: &str) -> Option<f64> {
    resp.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// Reads a probe's answer: the upload count, then `download` bytes.
async fn read_probe(resp: reqwest::Response, download: u64) -> anyhow::Result<u64> {
    let mut body = resp.bytes_stream();
    let mut head = Vec::with_capacity(8);
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the probe was cut off")?;
        let take = (8 - head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..take]);
        got += (chunk.len() - take) as u64;
    }
    anyhow::ensure!(head.len() == 8, "the probe ended before the agent answered");
    anyhow::ensure!(
        got == download,
        "the agent sent {got} of {download} bytes before the probe ended"
    );
    Ok(u64::from_be_bytes(head.try_into().expect("eight bytes")))
}

/// One hop's round trip, as `devmesh ping` shows it.
#[derive(Debug, Clone, serde::Serialize)]
struct Hop {
    from: String,
    to: String,
    rtt_ms: Option<f64>,
}

pub(crate) async fn ping(g: &Global, target: String, count: u32) -> anyhow::Result<()> {
    let (ws, agent) = parse_target(&target)?;
    let short = g.client()?;
    let agent = find_agent(&short, ws, agent).await?;
    let path = format!("/workspaceagents/{agent}/probe");
    let mut totals = Vec::new();
    let mut last = None;
    for i in 0..count.max(1) {
        let started = Instant::now();
        let opened = through_region(g, &short, &path, |_| reqwest::Body::from(Vec::new())).await?;
        let region = opened.region.clone();
        let open_ms = header_ms(&opened.resp, "devmesh-open-ms");
        let mesh_ms = header_ms(&opened.resp, "devmesh-mesh-rtt-ms");
        let route = opened
            .resp
            .headers()
            .get("devmesh-route")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("here")
            .to_owned();
        read_probe(opened.resp, 0).await?;
        let total = started.elapsed();
        totals.push(ms(total));
        if g.output == crate::output::Format::Table {
            println!(
                "reply {} from {ws} through {}: {:.2} ms",
                i + 1,
                region.name,
                ms(total)
            );
        }
        last = Some((region, route, open_ms, mesh_ms));
        if i + 1 < count {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let Some((region, route, open_ms, mesh_ms)) = last else {
        return Ok(());
    };
    let mut hops = vec![Hop {
        from: "you".into(),
        to: region.name.clone(),
        rtt_ms: region.rtt_ms,
    }];
    let agent_ms = match (route.strip_prefix("mesh:"), open_ms) {
        (Some(home), Some(open)) => {
            hops.push(Hop {
                from: region.name.clone(),
                to: format!("{home} (mesh)"),
                rtt_ms: mesh_ms,
            });
            mesh_ms.map(|m| (open - m).max(0.0))
        }
        (_, open) => open,
    };
    let relay = route
        .strip_prefix("mesh:")
        .unwrap_or(&region.name)
        .to_owned();
    hops.push(Hop {
        from: relay,
        to: "agent".into(),
        rtt_ms: agent_ms,
    });
    totals.sort_by(f64::total_cmp);
    let median = totals[totals.len() / 2];
    if g.output == crate::output::Format::Json {
        let out = serde_json::json!({
            "region": region.name,
            "hops": hops,
            "round_trip_ms": {"min": totals[0], "median": median},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("\nRound trip per hop:");
    for h in &hops {
        match h.rtt_ms {
            Some(r) => println!("  {:>10} → {:<16} {r:>8.2} ms", h.from, h.to),
            None => println!("  {:>10} → {:<16} {:>8}", h.from, h.to, "unknown"),
        }
    }
    println!(
        "Whole request (you → agent → you): min {:.2} ms, median {median:.2} ms",
        totals[0]
    );
    Ok(())
}

pub(crate) async fn speedtest(g: &Global, target: String, megabytes: u64) -> anyhow::Result<()> {
    let (ws, agent) = parse_target(&target)?;
    anyhow::ensure!(
        (1..=4096).contains(&megabytes),
        "--megabytes takes 1 to 4096"
    );
    let bytes = megabytes << 20;
    let short = g.client()?;
    let agent = find_agent(&short, ws, agent).await?;

    // Down: the agent sends, the client counts.
    let path = format!("/workspaceagents/{agent}/probe?download={bytes}");
    let started = Instant::now();
    let opened = through_region(g, &short, &path, |_| reqwest::Body::from(Vec::new())).await?;
    let region = opened.region.name.clone();
    read_probe(opened.resp, bytes).await?;
    let down = started.elapsed();

    // Up: the client sends, the agent counts and answers once it has all.
    let path = format!("/workspaceagents/{agent}/probe");
    let started = Instant::now();
    let opened = through_region(g, &short, &path, |accepted| {
        let chunk = bytes::Bytes::from(vec![0u8; 64 * 1024]);
        let chunks = bytes.div_ceil(64 * 1024);
        let last = bytes - (chunks - 1) * 64 * 1024;
        let zeros = futures_util::stream::iter((0..chunks).map(move |i| {
            Ok::<_, std::io::Error>(if i + 1 == chunks {
                chunk.slice(..last as usize)
            } else {
                chunk.clone()
            })
        }));
        after(accepted, zeros)
    })
    .await?;
    let counted = read_probe(opened.resp, 0).await?;
    let up = started.elapsed();
    anyhow::ensure!(counted == bytes, "the agent got {counted} of {bytes} bytes");
    let mbits = |d: Duration| (bytes as f64 * 8.0) / d.as_secs_f64() / 1e6;
    if g.output == crate::output::Format::Json {
        let out = serde_json::json!({
            "region": region,
            "bytes": bytes,
            "download_mbit_s": mbits(down),
            "upload_mbit_s": mbits(up),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{megabytes} MiB each way between you and {ws}, through {region}:");
    println!(
        "  download  {:>10.1} Mbit/s  ({:.2} s)",
        mbits(down),
        down.as_secs_f64()
    );
    println!(
        "  upload    {:>10.1} Mbit/s  ({:.2} s)",
        mbits(up),
        up.as_secs_f64()
    );
    Ok(())
}

/// One region as `devmesh netcheck` found it.
#[derive(Debug, serde::Serialize)]
struct RegionCheck {
    region: String,
    healthy: bool,
    https_rtt_ms: Option<f64>,
    /// Whether a QUIC handshake with the region's relay completed: UDP
    /// gets through (agents need it; `ssh` and apps do not).
    udp: Option<bool>,
    udp_rtt_ms: Option<f64>,
}

pub(crate) async fn netcheck(g: &Global) -> anyhow::Result<()> {
    let client = g.client()?;
    let regions: devmesh_shared::api::RegionsResponse = client.get("/regions").await?;
    let ranked = crate::regions::measure(&client, g.ca_cert.as_deref()).await?;
    let quic = if regions.mesh_ca_pem.is_empty() {
        None
    } else {
        devmesh_net::quic::agent_client(&regions.mesh_ca_pem).ok()
    };
    let checks = regions.regions.iter().map(|r| {
        let https = ranked
            .iter()
            .find(|x| x.name == r.name)
            .and_then(|x| x.rtt_ms);
        let quic = quic.clone();
        async move {
            let udp = match (&r.relay_address, quic) {
                (Some(addr), Some(config)) => Some(
                    quic_handshake(
                        addr,
                        &devmesh_shared::names::relay_server_name(&r.name),
                        config,
                    )
                    .await,
                ),
                _ => None,
            };
            RegionCheck {
                region: r.name.clone(),
                healthy: r.healthy,
                https_rtt_ms: https,
                udp: udp.as_ref().map(Result::is_ok),
                udp_rtt_ms: udp.and_then(Result::ok).map(ms),
            }
        }
    });
    let checks: Vec<RegionCheck> = futures_util::future::join_all(checks).await;
    if g.output == crate::output::Format::Json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:>12}  UDP (QUIC to the relay)",
        "REGION", "HEALTHY", "HTTPS RTT"
    );
    for c in &checks {
        let https = c
            .https_rtt_ms
            .map_or("unreachable".to_owned(), |r| format!("{r:.2} ms"));
        let udp = match (c.udp, c.udp_rtt_ms) {
            (Some(true), Some(r)) => format!("gets through ({r:.2} ms)"),
            (Some(false), _) => "blocked or down".to_owned(),
            _ => "no relay address".to_owned(),
        };
        println!(
            "{:<16} {:<9} {:>12}  {udp}",
            c.region,
            if c.healthy { "yes" } else { "no" },
            https
        );
    }
    let nearest = checks
        .iter()
        .filter(|c| c.healthy)
        .filter_map(|c| c.https_rtt_ms.map(|r| (r, &c.region)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, name)) = nearest {
        println!("Nearest healthy region: {name}");
    }
    Ok(())
}

/// The time a QUIC handshake with the relay at `addr` took.
async fn quic_handshake(
    addr: &str,
    server_name: &str,
    config: quinn::ClientConfig,
) -> anyhow::Result<Duration> {
    let target = tokio::net::lookup_host(addr)
        .await?
        .next()
        .context("the relay's address resolves to nothing")?;
    let bind: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind)?;
    let started = Instant::now();
    let conn = tokio::time::timeout(
        Duration::from_secs(3),
        endpoint.connect_with(config, target, server_name)?,
    )
    .await
    .context("no answer in 3 s")??;
    let took = started.elapsed();
    conn.close(devmesh_shared::tunnel::close::PROBE.into(), b"netcheck");
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    Ok(took)
}
