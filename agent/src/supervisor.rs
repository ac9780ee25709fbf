//! Keeps the agent attached to the nearest relay: fetch the manifest,
//! measure the round-trip time to every relay it lists, attach to the
//! nearest that accepts a fresh ticket, and serve. While attached, measure
//! again every [`Timing::recheck_interval`] (sooner, by [`Failback`], after
//! a failover or when a nearer relay turned the agent away) and move,
//! make-before-break, when [`RelayChooser`] says another relay is clearly
//! nearer. When the connection is lost, go at once to the relay measured
//! next nearest, or start over with a fresh manifest; back off only when
//! no relay accepts (or connections keep dying young). Survives primary
//! restarts and network loss on its own.

use std::sync::Arc;
use std::time::Duration;

use devmesh_shared::api::{AgentManifest, RelayInfo};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::client::{self, ApiClient, log_api_error};
use crate::nearest::{self, Decision, Failback, Measurement, RelayChooser};
use crate::tunnel::{self, Attached, End, Timing};
use devmesh_net::backoff::Backoff;

/// Time a re-check may spend fetching the manifest; past it, the re-check
/// measures the relays it already knows.
const RECHECK_MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel that served this long before it was lost is re-attached at
/// once, without the back-off kept for relays that accept and drop.
const LASTED: Duration = Duration::from_secs(5);

/// Runs until `cancel` fires, then closes the connection (code 0,
/// "shutdown") and returns. `manifest` saves the first fetch when the
/// caller already has one; later rounds fetch their own, since relays and
/// the mesh CA can change.
pub(crate) async fn run(
    client: ApiClient,
    manifest: Option<AgentManifest>,
    timing: Timing,
    cancel: CancellationToken,
) {
    // Every tunnel is served in a task of its own; one left behind by a
    // move may still be closing when the agent shuts down.
    let tunnels = TaskTracker::new();
    let probes = Arc::new(tunnel::Probes::default());
    keep_attached(&client, manifest, &timing, &cancel, &tunnels, &probes).await;
    tunnels.close();
    tunnels.wait().await;
}

async fn keep_attached(
    client: &ApiClient,
    mut manifest: Option<AgentManifest>,
    timing: &Timing,
    cancel: &CancellationToken,
    tunnels: &TaskTracker,
    probes: &Arc<tunnel::Probes>,
) {
    let mut backoff = Backoff::default();
    // The relay whose tunnel was just lost: not worth probing first again.
    let mut lost: Option<RelayInfo> = None;
    // What the agent knew when its tunnel was lost: the relays and how
    // near each measured last.
    let mut resume: Option<Known> = None;
    // Whether a tunnel has been lost: every attach after one may be to a
    // relay farther than the lost one, and re-checks come sooner.
    let mut after_loss = false;
    loop {
        // After a loss, the relays measured last go first, nearest first,
        // without a manifest fetch or a new measurement: both cost round
        // trips while the workspace is unreachable. Only if none of them
        // takes the agent does it start over.
        let quick = match (resume.take(), lost.as_ref()) {
            (Some(known), Some(gone)) => {
                match attach_known(client, &known, gone, timing, cancel).await {
                    Round::Attached(first, _) => Some((known, first)),
                    Round::Cancelled => return,
                    Round::Failed => None,
                }
            }
            _ => None,
        };
        let (known, first) = match quick {
            Some(attached) => attached,
            None => {
                let manifest = match manifest.take() {
                    Some(m) => m,
                    None => {
                        match client::retry("fetching the manifest", cancel, || client.manifest())
                            .await
                        {
                            Some(m) => m,
                            None => return,
                        }
                    }
                };
                match attach_nearest(
                    client,
                    &manifest,
                    lost.take().as_ref(),
                    timing,
                    cancel,
                    probes,
                )
                .await
                {
                    Round::Cancelled => return,
                    Round::Failed => {
                        if !backoff.wait(cancel).await {
                            return;
                        }
                        continue;
                    }
                    Round::Attached(first, measured) => (
                        Known {
                            agent_id: manifest.agent_id.to_string().into(),
                            relays: manifest.relays,
                            mesh_ca_pem: manifest.mesh_ca_pem,
                            measured,
                            fetched_at: Instant::now(),
                        },
                        first,
                    ),
                }
            }
        };
        let since = Instant::now();
        let displaced = after_loss || first.runner_up;
        let (end, last, known) = stay_attached(
            client, known, *first, displaced, timing, cancel, tunnels, probes,
        )
        .await;
        lost = Some(last);
        after_loss = true;
        resume = Some(known);
        let attached_for = since.elapsed();
        // Anything else is a lost tunnel, which `stay_attached` (knowing
        // the relay) has logged.
        if end == End::Shutdown {
            tracing::info!("tunnel closed for shutdown");
            return;
        }
        // A connection that lasted was healthy: find the next-nearest
        // relay now. One that died young may be a relay that accepts and
        // drops, so that keeps backing off.
        if attached_for >= Backoff::RESET_AFTER {
            backoff.reset();
            continue;
        }
        // One that served for a while was no relay that accepts and drops:
        // the workspace is unreachable until the agent re-attaches, so it
        // goes at once (such a relay would cost one attach per LASTED).
        if attached_for >= LASTED {
            continue;
        }
        if !backoff.wait(cancel).await {
            return;
        }
    }
}

// === Attaching ===

/// A tunnel just attached, with how it measured.
struct Attachment {
    tunnel: Attached,
    relay: RelayInfo,
    rtt: Option<Duration>,
    /// A relay measured nearer did not take the agent.
    runner_up: bool,
}

/// The result of one pass over the candidate relays.
enum Round {
    /// Attached, with the round's measurements.
    Attached(Box<Attachment>, Vec<Measurement>),
    Failed,
    Cancelled,
}

/// Measures every relay in `manifest` and tries them nearest first, each
/// with a fresh ticket. A relay whose tunnel was just `lost` is not probed
/// (a dead relay's probes only time out) and comes last, unless it is the
/// only one.
async fn attach_nearest(
    client: &ApiClient,
    manifest: &AgentManifest,
    lost: Option<&RelayInfo>,
    timing: &Timing,
    cancel: &CancellationToken,
    probes: &Arc<tunnel::Probes>,
) -> Round {
    let config = match tunnel::client_config(&manifest.mesh_ca_pem) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the manifest's mesh CA is unusable; retrying");
            return Round::Failed;
        }
    };
    if manifest.relays.is_empty() {
        tracing::warn!("the manifest lists no relays; retrying");
        return Round::Failed;
    }
    let (others, just_lost): (Vec<RelayInfo>, Vec<RelayInfo>) = manifest
        .relays
        .iter()
        .cloned()
        .partition(|r| Some(r) != lost || manifest.relays.len() == 1);
    let mut measured = tokio::select! {
        m = tunnel::measure(&others, &config, timing, probes, tunnel::PROBES_PER_RELAY) => m,
        () = cancel.cancelled() => return Round::Cancelled,
    };
    nearest::prefer_region(&mut measured, client.region());
    measured.extend(
        just_lost
            .into_iter()
            .map(|relay| Measurement { relay, rtt: None }),
    );
    attach_in_order(client, measured, &config, timing, cancel).await
}

/// Tries `measured`'s relays nearest first, each with a fresh ticket.
async fn attach_in_order(
    client: &ApiClient,
    measured: Vec<Measurement>,
    config: &quinn::ClientConfig,
    timing: &Timing,
    cancel: &CancellationToken,
) -> Round {
    for (i, candidate) in nearest::order_candidates(measured.clone())
        .into_iter()
        .enumerate()
    {
        let attached = tokio::select! {
            a = attach_one(client, &candidate.relay, config, timing) => a,
            () = cancel.cancelled() => return Round::Cancelled,
        };
        match attached {
            Ok(tunnel) => {
                let attachment = Attachment {
                    tunnel,
                    relay: candidate.relay,
                    rtt: candidate.rtt,
                    runner_up: i > 0,
                };
                return Round::Attached(Box::new(attachment), measured);
            }
            Err(Failure::Ticket) => return Round::Failed,
            Err(Failure::Relay) => {}
        }
    }
    Round::Failed
}

/// After a loss: the relay the last measurement ranked nearest after
/// `gone` (among those that answered it), with no new measurement and no
/// manifest fetch, given [`Timing::probe_timeout`] to take the agent. The
/// measurement may be minutes old and that relay may have died too (a
/// whole region going down): then the caller starts over, measuring every
/// relay at once.
async fn attach_known(
    client: &ApiClient,
    known: &Known,
    gone: &RelayInfo,
    timing: &Timing,
    cancel: &CancellationToken,
) -> Round {
    let Ok(config) = tunnel::client_config(&known.mesh_ca_pem) else {
        return Round::Failed;
    };
    let mut measured: Vec<Measurement> = known
        .measured
        .iter()
        .filter(|m| m.relay != *gone && m.rtt.is_some())
        .cloned()
        .collect();
    nearest::prefer_region(&mut measured, client.region());
    let Some(next) = nearest::order_candidates(measured).into_iter().next() else {
        return Round::Failed;
    };
    tracing::info!(
        region = %next.relay.region,
        address = %next.relay.address,
        rtt_ms = rtt_ms(next.rtt),
        "re-attaching to the relay measured next nearest"
    );
    let attached = tokio::select! {
        a = tokio::time::timeout(timing.probe_timeout, attach_one(client, &next.relay, &config, timing)) => a,
        () = cancel.cancelled() => return Round::Cancelled,
    };
    match attached {
        Ok(Ok(tunnel)) => {
            let attachment = Attachment {
                tunnel,
                relay: next.relay,
                rtt: next.rtt,
                runner_up: true,
            };
            Round::Attached(Box::new(attachment), Vec::new())
        }
        Ok(Err(_)) => Round::Failed,
        Err(_) => {
            tracing::warn!(region = %next.relay.region, "no attach in time; measuring every relay");
            Round::Failed
        }
    }
}

/// Why [`attach_one`] failed; both are logged already.
enum Failure {
    /// No ticket: the primary is unreachable or refuses us, so no relay
    /// will do better.
    Ticket,
    /// This relay did not attach us.
    Relay,
}

/// Gets a fresh ticket and attaches to `relay` with it.
async fn attach_one(
    client: &ApiClient,
    relay: &RelayInfo,
    config: &quinn::ClientConfig,
    timing: &Timing,
) -> Result<Attached, Failure> {
    let ticket = match client.attach_ticket(&relay.address).await {
        Ok(t) => t.ticket,
        Err(e) => {
            log_api_error("getting an attach ticket", &e);
            return Err(Failure::Ticket);
        }
    };
    tunnel::attach(relay, config, &ticket, timing)
        .await
        .map_err(|e| {
            tracing::warn!(
                region = %relay.region,
                address = %relay.address,
                error = %e,
                "cannot attach to relay"
            );
            Failure::Relay
        })
}

// === Serving and moving ===

/// A tunnel being served by its own task.
struct Serving {
    task: JoinHandle<End>,
    /// Fires to close the tunnel because the agent moved.
    moved: CancellationToken,
    relay: RelayInfo,
}

/// Logs the attachment and spawns the task serving it.
fn spawn_serving(
    attachment: Attachment,
    agent_id: &Arc<str>,
    timing: &Timing,
    cancel: &CancellationToken,
    tunnels: &TaskTracker,
) -> Serving {
    let Attachment {
        tunnel, relay, rtt, ..
    } = attachment;
    tracing::info!(
        region = %relay.region,
        address = %relay.address,
        rtt_ms = rtt_ms(rtt),
        relay = %tunnel.relay_name,
        peer = %tunnel.remote_address(),
        "attached to relay"
    );
    let moved = CancellationToken::new();
    let span = tracing::info_span!("tunnel", region = %relay.region);
    let task = tunnels.spawn({
        let (agent_id, timing, cancel, moved) =
            (agent_id.clone(), *timing, cancel.clone(), moved.clone());
        async move { tunnel.serve(agent_id, &timing, &cancel, &moved).await }.instrument(span)
    });
    Serving { task, moved, relay }
}

/// Serves `first` and whatever the agent moves to, re-measuring every
/// [`Timing::recheck_interval`]. Returns when the tunnel being served is
/// lost or `cancel` fires, with the relay it was served by.
///
/// `displaced`: `first` was attached after a loss (by a measurement that
/// may be stale or taken while the nearest relay was down) or after a
/// nearer relay refused it, so the agent may now sit far from its users:
/// re-checks then follow [`Failback`], from [`Timing::failback_interval`],
/// and so they do again after a move made while displaced (it may have
/// been to the second nearest while the nearest is still down).
#[allow(clippy::too_many_arguments)]
async fn stay_attached(
    client: &ApiClient,
    mut known: Known,
    first: Attachment,
    displaced: bool,
    timing: &Timing,
    cancel: &CancellationToken,
    tunnels: &TaskTracker,
    probes: &Arc<tunnel::Probes>,
) -> (End, RelayInfo, Known) {
    let agent_id = known.agent_id.clone();
    let mut chooser = RelayChooser::new(first.relay.clone());
    let mut current = spawn_serving(first, &agent_id, timing, cancel, tunnels);
    let new_failback = || Failback::new(timing.failback_interval, timing.recheck_interval);
    let mut failback = displaced.then(new_failback);
    loop {
        let scheduled = failback
            .as_mut()
            .and_then(|f| f.next(tunnel::PROBES_PER_RELAY));
        if scheduled.is_none() {
            failback = None;
        }
        let (wait, handshakes) =
            scheduled.unwrap_or((timing.recheck_interval, tunnel::PROBES_PER_RELAY));
        // A displaced agent's re-checks come often: the manifest fetched
        // at attach (or at the last usual re-check) serves them, so a
        // large failover does not send every agent to the primary every
        // few seconds.
        let fetch = failback.is_none() || known.fetched_at.elapsed() >= timing.recheck_interval;
        let rechecked = tokio::select! {
            end = &mut current.task => {
                let end = ended(end);
                if let End::Lost(reason) = &end {
                    tracing::warn!(
                        region = %current.relay.region,
                        address = %current.relay.address,
                        %reason,
                        "tunnel lost; re-attaching"
                    );
                }
                return (end, current.relay.clone(), known);
            }
            rechecked = async {
                tokio::time::sleep(wait).await;
                recheck(client, &mut known, &mut chooser, timing, probes, handshakes, fetch).await
            } => rechecked,
        };
        let next = match rechecked {
            Rechecked::Stay { nearer_rounds } => {
                if let Some(f) = failback.as_mut() {
                    f.observed(nearer_rounds);
                }
                continue;
            }
            Rechecked::MoveFailed => {
                if let Some(f) = failback.as_mut() {
                    f.move_failed();
                }
                continue;
            }
            Rechecked::Move(next) => *next,
        };
        if failback.is_some() {
            failback = Some(new_failback());
        }
        // Make before break: the new tunnel serves before the old one closes.
        let next = spawn_serving(next, &agent_id, timing, cancel, tunnels);
        current.moved.cancel();
        tracing::debug!(region = %current.relay.region, "closing the tunnel left behind");
        // The old task finishes closing on its own, tracked by `tunnels`.
        current = next;
    }
}

fn ended(joined: Result<End, tokio::task::JoinError>) -> End {
    match joined {
        Ok(end) => end,
        Err(e) => End::Lost(format!("the tunnel task failed: {e}")),
    }
}

/// What the agent knows of the relays while attached.
struct Known {
    agent_id: Arc<str>,
    relays: Vec<RelayInfo>,
    mesh_ca_pem: String,
    /// The last round of measurements (at attach, then each re-check).
    measured: Vec<Measurement>,
    /// When `relays` and `mesh_ca_pem` came from the primary.
    fetched_at: Instant,
}

/// What a re-check found.
enum Rechecked {
    /// Stay where the agent is; `nearer_rounds` rounds in a row (this one
    /// included) found another relay clearly nearer.
    Stay { nearer_rounds: u32 },
    /// A relay was nearer long enough, but did not take the agent.
    MoveFailed,
    /// Attached to a nearer relay; the caller closes the old tunnel.
    Move(Box<Attachment>),
}

/// One re-check: refresh the relay list if `fetch` and the primary
/// answers, measure every relay (and the current one, listed or not) with
/// `handshakes` each, and if the chooser says move, attach to the nearer
/// relay.
#[allow(clippy::too_many_arguments)]
async fn recheck(
    client: &ApiClient,
    known: &mut Known,
    chooser: &mut RelayChooser,
    timing: &Timing,
    probes: &Arc<tunnel::Probes>,
    handshakes: u32,
    fetch: bool,
) -> Rechecked {
    if fetch {
        match tokio::time::timeout(RECHECK_MANIFEST_TIMEOUT, client.manifest()).await {
            Ok(Ok(m)) => {
                known.relays = m.relays;
                known.mesh_ca_pem = m.mesh_ca_pem;
                known.fetched_at = Instant::now();
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "re-check: no fresh manifest; using the last");
            }
            Err(_) => tracing::debug!("re-check: no fresh manifest in time; using the last"),
        }
    }
    let config = match tunnel::client_config(&known.mesh_ca_pem) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "re-check: the manifest's mesh CA is unusable");
            return Rechecked::Stay { nearer_rounds: 0 };
        }
    };
    let mut relays = known.relays.clone();
    if !relays.contains(chooser.current()) {
        relays.push(chooser.current().clone());
    }
    let mut measured = tunnel::measure(&relays, &config, timing, probes, handshakes).await;
    nearest::prefer_region(&mut measured, client.region());
    known.measured.clone_from(&measured);
    let (to, from_rtt) = match chooser.observe(&measured) {
        Decision::Stay { nearer_rounds } => {
            tracing::debug!(
                nearer_rounds,
                needed = nearest::ROUNDS,
                rtts = %Rtts(&measured),
                "re-checked the relays"
            );
            return Rechecked::Stay { nearer_rounds };
        }
        Decision::Move { to, from_rtt } => (to, from_rtt),
    };
    let from = chooser.current();
    tracing::info!(
        from.region = %from.region,
        from.address = %from.address,
        from.rtt_ms = rtt_ms(from_rtt),
        to.region = %to.relay.region,
        to.address = %to.relay.address,
        to.rtt_ms = rtt_ms(to.rtt),
        "moving to a nearer relay"
    );
    match attach_one(client, &to.relay, &config, timing).await {
        Ok(tunnel) => {
            chooser.moved_to(to.relay.clone());
            Rechecked::Move(Box::new(Attachment {
                tunnel,
                relay: to.relay,
                rtt: to.rtt,
                runner_up: false,
            }))
        }
        Err(_) => {
            tracing::warn!(region = %from.region, "staying on the current relay");
            Rechecked::MoveFailed
        }
    }
}

/// An RTT in milliseconds to a tenth, for logs.
fn rtt_ms(rtt: Option<Duration>) -> Option<f64> {
    rtt.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0)
}

/// A round's RTTs as `region=12.3ms, other=unreachable`, for debug logs.
struct Rtts<'a>(&'a [Measurement]);

impl std::fmt::Display for Rtts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match rtt_ms(m.rtt) {
                Some(ms) => write!(f, "{}={ms}ms", m.relay.region)?,
                None => write!(f, "{}=unreachable", m.relay.region)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
