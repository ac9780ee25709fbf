//! Keeps the agent attached: fetch the manifest, get a fresh ticket, attach
//! to the first relay that accepts, serve until the connection is lost, back
//! off, repeat. Survives primary restarts and network loss on its own.

use std::sync::Arc;

use devmesh_shared::api::AgentManifest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, ApiClient, log_api_error};
use crate::tunnel::{self, Attached, End, Timing};
use devmesh_shared::backoff::Backoff;

/// Runs until `cancel` fires, then closes the connection (code 0,
/// "shutdown") and returns. `manifest` saves the first fetch when the
/// caller already has one; later rounds fetch their own, since relays and
/// the mesh CA can change.
pub(crate) async fn run(
    client: ApiClient,
    mut manifest: Option<AgentManifest>,
    timing: Timing,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let manifest = match manifest.take() {
            Some(m) => m,
            None => {
                match client::retry("fetching the manifest", &cancel, || client.manifest()).await {
                    Some(m) => m,
                    None => return,
                }
            }
        };
        let agent_id: Arc<str> = manifest.agent_id.to_string().into();
        match attach_any(&client, &manifest, &timing, &cancel).await {
            Round::Cancelled => return,
            Round::Failed => {}
            Round::Attached { tunnel, region } => {
                let tunnel = *tunnel;
                let since = Instant::now();
                tracing::info!(
                    relay = %tunnel.relay_name,
                    %region,
                    address = %tunnel.remote_address(),
                    "attached to relay"
                );
                match tunnel.serve(agent_id, &timing, &cancel).await {
                    End::Shutdown => {
                        tracing::info!("tunnel closed for shutdown");
                        return;
                    }
                    End::Lost(reason) => {
                        tracing::warn!(%reason, "tunnel lost; reconnecting");
                    }
                }
                backoff.connection_lasted(since.elapsed());
            }
        }
        if !backoff.wait(&cancel).await {
            return;
        }
    }
}

/// The result of one pass over the candidate relays.
enum Round {
    Attached {
        tunnel: Box<Attached>,
        region: String,
    },
    Failed,
    Cancelled,
}

/// Tries each candidate relay once, with a fresh ticket each.
async fn attach_any(
    client: &ApiClient,
    manifest: &AgentManifest,
    timing: &Timing,
    cancel: &CancellationToken,
) -> Round {
    let config = match tunnel::client_config(&manifest.mesh_ca_pem) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the manifest's mesh CA is unusable; retrying");
            return Round::Failed;
        }
    };
    let candidates = tunnel::order_candidates(&manifest.relays);
    if candidates.is_empty() {
        tracing::warn!("the manifest lists no relays; retrying");
        return Round::Failed;
    }
    for relay in candidates {
        let ticket = tokio::select! {
            t = client.attach_ticket() => t,
            () = cancel.cancelled() => return Round::Cancelled,
        };
        let ticket = match ticket {
            Ok(t) => t.ticket,
            Err(e) => {
                log_api_error("getting an attach ticket", &e);
                return Round::Failed;
            }
        };
        let attached = tokio::select! {
            a = tunnel::attach(relay, &config, &ticket, timing) => a,
            () = cancel.cancelled() => return Round::Cancelled,
        };
        match attached {
            Ok(tunnel) => {
                return Round::Attached {
                    tunnel: Box::new(tunnel),
                    region: relay.region.clone(),
                };
            }
            Err(e) => tracing::warn!(
                region = %relay.region,
                address = %relay.address,
                error = %e,
                "cannot attach to relay"
            ),
        }
    }
    Round::Failed
}
