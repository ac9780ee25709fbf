//! The edge's end of the primary's event stream
//! (`GET /api/v2/edges/me/events`, newline-delimited JSON).
//!
//! Each connection starts with a snapshot that replaces everything the edge
//! caches (agent locations, revocations, keys) and drops every cached
//! decision: events may have been missed while the stream was down, and a
//! gap cannot be trusted. The stream is declared dead when nothing (not even
//! a ping) arrives for [`SILENCE`].

use std::sync::Arc;
use std::time::Duration;

use devmesh_net::backoff::Backoff;
use devmesh_shared::api::EdgeEvent;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::Edge;

/// The primary pings every 10 s; this much silence means the stream is gone.
const SILENCE: Duration = Duration::from_secs(30);
/// Longest line accepted (a snapshot of many agents is the largest).
const MAX_LINE: usize = 64 * 1024 * 1024;

/// Follows the event stream until `shutdown`, reconnecting with back-off.
pub(crate) async fn follow(edge: Arc<Edge>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = stream_once(&edge, &mut backoff) => r,
        };
        edge.metrics.events_connected.set(0);
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "event stream from the primary ended; reconnecting");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn stream_once(edge: &Edge, backoff: &mut Backoff) -> anyhow::Result<()> {
    let resp = edge.primary.events().await?;
    let mut body = resp.bytes_stream();
    let mut decoder = devmesh_shared::events::Decoder::new(MAX_LINE);
    let mut synced = false;
    loop {
        let chunk = tokio::time::timeout(SILENCE, body.next())
            .await
            .map_err(|_| anyhow::anyhow!("no event or ping for {SILENCE:?}"))?;
        let Some(chunk) = chunk else {
            anyhow::bail!("the primary closed the stream");
        };
        for event in decoder.push(&chunk?)? {
            if !synced && !matches!(event, EdgeEvent::Snapshot { .. }) {
                anyhow::bail!("the stream did not start with a snapshot");
            }
            synced = true;
            edge.apply(event);
            edge.metrics.events_connected.set(1);
            backoff.reset();
        }
    }
}
