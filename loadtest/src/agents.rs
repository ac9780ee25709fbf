//! Scenario 4: thousands of lightweight agent clients in this process, each
//! speaking the real tunnel protocol (`devmesh_shared::tunnel`): fetch an
//! attach ticket with its agent token, open a QUIC connection to the relay,
//! present the ticket on the control stream, wait for `Attached`, and stay
//! attached. They serve no streams; they measure what an attached agent
//! costs the relay.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use devmesh_shared::api::{AGENT_TOKEN_HEADER, AgentManifest, AttachTicketResponse};
use devmesh_shared::tunnel::io as wire;
use devmesh_shared::tunnel::session::{AgentSession, PingTiming};
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::report::ScenarioReport;
use crate::run::Ctx;
use crate::scenario;
use crate::stats::Samples;

/// The control-stream timers of a real agent. These agents attach and
/// then hold the stream; QUIC keep-alives keep them attached.
const PING_TIMING: PingTiming = PingTiming {
    ping_interval: Duration::from_secs(10),
    dead_after: Duration::from_secs(30),
};

/// Agents sharing one client UDP socket.
const AGENTS_PER_ENDPOINT: usize = 256;
/// Attaches in flight at once.
const IN_FLIGHT: usize = 64;

/// One agent's attach; returns the connection and its control stream (kept
/// open for as long as the agent should stay attached).
async fn attach(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    manifest: &AgentManifest,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let relay = manifest
        .relays
        .first()
        .context("the manifest lists no relay")?;
    let ticket: AttachTicketResponse = http
        .post(format!("{url}/api/v2/workspaceagents/me/attach-ticket"))
        .header(AGENT_TOKEN_HEADER, token)
        .json(&json!({ "relay": relay.address }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let addr = tokio::net::lookup_host(relay.address.as_str())
        .await?
        .next()
        .context("relay address")?;
    let conn = endpoint
        .connect_with(config.clone(), addr, &relay.server_name)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut session = AgentSession::new(ticket.ticket, PING_TIMING, Instant::now());
    wire::attach(&mut send, &mut recv, &mut session).await?;
    Ok((conn, send, recv))
}

/// Runs scenario 4.
pub async fn run(
    ctx: &mut Ctx,
    cfg: &scenario::Agents,
    sr: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let per = cfg.per_workspace;
    let workspaces = cfg.count.div_ceil(per);
    let template = format!("{}-many", ctx.dep.run_id);
    let agents: Vec<_> = (0..per).map(|i| json!({"name": format!("a{i}")})).collect();
    ctx.dep
        .api_post(
            "/templates",
            json!({"name": template, "definition": {"agents": agents}}),
        )
        .await?;
    // Agent tokens, from one workspace per `per` agents.
    let mut tokens = Vec::with_capacity(cfg.count);
    let t = Instant::now();
    let mut creates = futures_util::stream::iter(0..workspaces)
        .map(|w| {
            let dep = &ctx.dep;
            let template = template.clone();
            async move {
                dep.api_post(
                    "/workspaces",
                    json!({"name": format!("{}-m{w}", dep.run_id), "template": template}),
                )
                .await
            }
        })
        .buffer_unordered(8);
    while let Some(ws) = creates.next().await {
        let ws = ws?;
        for a in ws["agent_tokens"].as_array().context("agent tokens")? {
            if tokens.len() < cfg.count {
                tokens.push(a["token"].as_str().context("token")?.to_owned());
            }
        }
        ctx.progress
            .set_message(format!("agents: {} agent tokens", tokens.len()));
    }
    drop(creates);
    sr.extra
        .insert("workspaces created".into(), json!(workspaces));
    sr.extra.insert(
        "seconds to create them".into(),
        json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
    );

    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            &ctx.dep.ca_pem,
        )?)?)
        .pool_max_idle_per_host(IN_FLIGHT)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = ctx.dep.url.clone();
    let manifest: AgentManifest = http
        .get(format!("{url}/api/v2/workspaceagents/me/manifest"))
        .header(AGENT_TOKEN_HEADER, &tokens[0])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    // A real agent's QUIC settings, so the relay pays what it pays for one.
    let config = devmesh_net::quic::agent_client(&manifest.mesh_ca_pem)?;
    let endpoints: Vec<quinn::Endpoint> = (0..cfg.count.div_ceil(AGENTS_PER_ENDPOINT))
        .map(|_| {
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                devmesh_net::sockets::udp_socket("127.0.0.1:0".parse().expect("addr"))?,
                Arc::new(quinn::TokioRuntime),
            )
        })
        .collect::<std::io::Result<_>>()?;

    let window = ctx.dep.monitor.window();
    let start = Instant::now();
    let mut samples = Samples::default();
    let mut held = Vec::with_capacity(cfg.count);
    let mut errors: Vec<String> = Vec::new();
    {
        let (http, url, config, manifest, endpoints) =
            (&http, &url, &config, &manifest, &endpoints);
        let mut attaches = futures_util::stream::iter(tokens.iter().enumerate())
            .map(|(i, token)| async move {
                let t = Instant::now();
                let r = attach(
                    http,
                    url,
                    token,
                    &endpoints[i / AGENTS_PER_ENDPOINT],
                    config,
                    manifest,
                )
                .await;
                (r, t.elapsed())
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some((r, d)) = attaches.next().await {
            match r {
                Ok(x) => {
                    samples.ok(d);
                    held.push(x);
                }
                Err(e) => {
                    samples.errors += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            if (samples.ms.len() + samples.errors) % 100 == 0 {
                ctx.progress.set_message(format!(
                    "agents: {} attached, {} failed",
                    samples.ms.len(),
                    samples.errors
                ));
            }
        }
    }
    let elapsed = start.elapsed();
    // Hold them all attached for a moment so RSS settles, then sample.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let usage = ctx.dep.monitor.usage(&window);
    let attached = held.len();
    sr.add(
        format!("attach {} agents, {IN_FLIGHT} at a time", cfg.count),
        "devmesh primary relay",
        samples,
        elapsed,
    );
    sr.extra.insert("agents attached".into(), json!(attached));
    sr.extra.insert(
        "attach rate per second".into(),
        json!((attached as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0),
    );
    if let Some(p) = usage.iter().find(|u| u.name == "primary") {
        sr.extra.insert(
            "primary RSS per attached agent (KiB)".into(),
            json!(
                ((p.peak_rss_mib - p.start_rss_mib).max(0.0) * 1024.0 / attached.max(1) as f64
                    * 10.0)
                    .round()
                    / 10.0
            ),
        );
    }
    for e in errors {
        sr.notes.push(format!("attach error: {e}"));
    }
    sr.notes.push("RSS per agent is the primary's peak RSS during the attaches minus its RSS before, ÷ agents; memory the allocator kept from earlier scenarios is reused first, so this is a lower bound.".into());
    sr.notes.push("Each attach = ticket over HTTPS from the primary + QUIC handshake + attach exchange on the control stream.".into());
    for (conn, _, _) in &held {
        conn.close(devmesh_shared::tunnel::close::SHUTDOWN.into(), b"done");
    }
    drop(held);
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
    }
    Ok(())
}
