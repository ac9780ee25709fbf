//! Reports lifecycle states to the primary from one task, in order, each
//! retried with backoff until delivered. Setting a state never waits.

use devmesh_shared::api::LifecycleState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiClient, log_api_error};
use devmesh_net::backoff::Backoff;

/// The handle to the reporter task.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    // Unbounded, but an agent goes through a handful of states in its life.
    tx: mpsc::UnboundedSender<LifecycleState>,
    task: JoinHandle<()>,
}

impl Lifecycle {
    /// Starts the reporter; it gives up on undelivered states when `cancel`
    /// fires.
    pub(crate) fn spawn(client: ApiClient, cancel: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(report(client, rx, cancel));
        Self { tx, task }
    }

    /// Moves to `state`. Every state is delivered, in order: the primary
    /// records when each transition happened.
    pub(crate) fn set(&self, state: LifecycleState) {
        tracing::info!(state = state.as_str(), "lifecycle");
        // The reporter only ends early when cancelled; then nobody listens.
        let _ = self.tx.send(state);
    }

    /// Waits until every state set is delivered (or the reporter is
    /// cancelled).
    pub(crate) async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

async fn report(
    client: ApiClient,
    mut rx: mpsc::UnboundedReceiver<LifecycleState>,
    cancel: CancellationToken,
) {
    while let Some(state) = tokio::select! {
        s = rx.recv() => s,
        () = cancel.cancelled() => None,
    } {
        let mut backoff = Backoff::default();
        loop {
            let result = tokio::select! {
                r = client.lifecycle(state) => r,
                () = cancel.cancelled() => return,
            };
            match result {
                Ok(()) => break,
                Err(e) => log_api_error("reporting the lifecycle state", &e),
            }
            if !backoff.wait(&cancel).await {
                return;
            }
        }
    }
}
