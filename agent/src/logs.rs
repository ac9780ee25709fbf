//! Streams script output to the primary in batches.
//!
//! Producers ([`LogSender`]) never wait: lines go into a bounded channel and
//! are dropped (and counted) when it is full, so a slow or unreachable
//! primary can never stall a script. One task ([`spawn`]) collects lines into
//! batches, flushed after [`BatchConfig::max_delay`] or
//! [`BatchConfig::max_lines`], whichever comes first, and retries a failed
//! upload with backoff. Once the primary reports the agent's log space
//! `overflowed`, everything further is discarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use devmesh_shared::api::AgentLogEntry;
use reqwest::StatusCode;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiClient, ApiError, log_api_error};
use devmesh_net::backoff::Backoff;

/// The source of lines the agent writes itself (such as drop summaries).
pub(crate) const AGENT_SOURCE: &str = "agent";

/// How lines are batched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchConfig {
    /// A batch is sent once it holds this many lines.
    pub(crate) max_lines: usize,
    /// A batch is sent once its output holds this many bytes, so a request
    /// stays well under the primary's body limit even after JSON escaping.
    pub(crate) max_bytes: usize,
    /// A batch is sent at the latest this long after its first line.
    pub(crate) max_delay: Duration,
    /// Lines that may wait for the uploader before new ones are dropped.
    pub(crate) capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_lines: 100,
            max_bytes: 256 * 1024,
            max_delay: Duration::from_millis(250),
            capacity: 4096,
        }
    }
}

/// The severity of a line: stdout is `info`, stderr is `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Standard output.
    Info,
    /// Standard error.
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Error => "error",
        }
    }
}

/// State shared by the senders and the uploader.
#[derive(Debug, Default)]
struct Shared {
    dropped: AtomicU64,
    overflowed: AtomicBool,
}

/// The producer side: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub(crate) struct LogSender {
    tx: mpsc::Sender<AgentLogEntry>,
    shared: Arc<Shared>,
}

impl LogSender {
    /// A sender and the receiver an uploader drains; [`spawn`] wires one to
    /// the primary, tests read the receiver directly.
    pub(crate) fn channel(capacity: usize) -> (Self, LogReceiver) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Shared::default());
        (
            Self {
                tx,
                shared: shared.clone(),
            },
            LogReceiver { rx, shared },
        )
    }

    /// Queues one line, or drops and counts it if the queue is full.
    pub(crate) fn send(&self, source: &str, level: Level, output: String) {
        if self.shared.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let entry = AgentLogEntry {
            source: source.to_owned(),
            level: level.as_str().to_owned(),
            output,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(entry) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The consumer side of [`LogSender::channel`].
#[derive(Debug)]
pub(crate) struct LogReceiver {
    rx: mpsc::Receiver<AgentLogEntry>,
    shared: Arc<Shared>,
}

impl LogReceiver {
    /// The next line; `None` once every sender is gone and the queue is
    /// empty.
    pub(crate) async fn recv(&mut self) -> Option<AgentLogEntry> {
        self.rx.recv().await
    }

    /// The next line if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<AgentLogEntry> {
        self.rx.try_recv().ok()
    }

    /// Lines dropped since the last call, and resets the count.
    fn take_dropped(&self) -> u64 {
        self.shared.dropped.swap(0, Ordering::Relaxed)
    }
}

/// The task [`spawn`] started, which batches lines to the primary; call
/// [`LogUploader::finish`] to flush what is queued before the agent exits.
#[derive(Debug)]
pub(crate) struct LogUploader {
    task: JoinHandle<()>,
    finish: CancellationToken,
}

impl LogUploader {
    /// Sends what is queued now and ends, without waiting for senders to go
    /// away: a script's background process may hold its output open for
    /// as long as it lives.
    pub(crate) async fn finish(self) {
        self.finish.cancel();
        let _ = self.task.await;
    }
}

/// Starts the uploader. It ends after every [`LogSender`] is dropped or
/// [`LogUploader::finish`] is called, once the queued lines are sent; or
/// when `cancel` fires, dropping what is left.
pub(crate) fn spawn(
    client: ApiClient,
    config: BatchConfig,
    cancel: CancellationToken,
) -> (LogSender, LogUploader) {
    let (tx, rx) = LogSender::channel(config.capacity);
    let finish = CancellationToken::new();
    let task = tokio::spawn(upload(client, config, rx, finish.clone(), cancel));
    (tx, LogUploader { task, finish })
}

async fn upload(
    client: ApiClient,
    config: BatchConfig,
    mut rx: LogReceiver,
    finish: CancellationToken,
    cancel: CancellationToken,
) {
    loop {
        let Some(batch) = next_batch(&mut rx, &config, &finish).await else {
            return;
        };
        if rx.shared.overflowed.load(Ordering::Relaxed) {
            // Drain without sending so the senders' queue never fills.
            continue;
        }
        if !send_batch(&client, batch, &rx.shared, &cancel).await {
            return;
        }
    }
}

/// Collects the next batch: waits for a first line, then takes more until
/// the batch is full (lines or bytes) or `max_delay` has passed. Once `finish` fires it only
/// takes what is already queued. `None` when there is nothing left to send.
async fn next_batch(
    rx: &mut LogReceiver,
    config: &BatchConfig,
    finish: &CancellationToken,
) -> Option<Vec<AgentLogEntry>> {
    let first = tokio::select! {
        biased;
        line = rx.recv() => line?,
        () = finish.cancelled() => rx.try_recv()?,
    };
    let deadline = Instant::now() + config.max_delay;
    let mut bytes = first.output.len();
    let mut batch = Vec::with_capacity(config.max_lines.min(128));
    batch.push(first);
    let has_room = |batch: &Vec<AgentLogEntry>, bytes: usize| {
        batch.len() < config.max_lines && bytes < config.max_bytes
    };
    while has_room(&batch, bytes) {
        tokio::select! {
            biased;
            line = rx.recv() => match line {
                Some(line) => {
                    bytes += line.output.len();
                    batch.push(line);
                }
                None => break,
            },
            () = finish.cancelled() => {
                while has_room(&batch, bytes) {
                    match rx.try_recv() {
                        Some(line) => {
                            bytes += line.output.len();
                            batch.push(line);
                        }
                        None => break,
                    }
                }
                break;
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let dropped = rx.take_dropped();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "script output came faster than it could be uploaded"
        );
        batch.push(AgentLogEntry {
            source: AGENT_SOURCE.to_owned(),
            level: Level::Error.as_str().to_owned(),
            output: format!("dropped {dropped} lines"),
        });
    }
    Some(batch)
}

/// Uploads one batch, retrying with backoff. `false` if cancelled.
async fn send_batch(
    client: &ApiClient,
    batch: Vec<AgentLogEntry>,
    shared: &Shared,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::default();
    loop {
        let result = tokio::select! {
            r = client.logs(batch.clone()) => r,
            () = cancel.cancelled() => return false,
        };
        match result {
            Ok(accepted) => {
                if accepted.overflowed {
                    tracing::warn!(
                        "the primary's log space for this agent is full; no more script output \
                         is sent"
                    );
                    shared.overflowed.store(true, Ordering::Relaxed);
                }
                return true;
            }
            Err(ApiError::Status { status, message })
                if status.is_client_error()
                    && status != StatusCode::REQUEST_TIMEOUT
                    && status != StatusCode::TOO_MANY_REQUESTS =>
            {
                // Sending the same batch again would be refused again.
                let lines = batch.len();
                tracing::warn!(%status, %message, lines, "the primary refused a log batch");
                return true;
            }
            Err(e) => log_api_error("uploading script output", &e),
        }
        if !backoff.wait(cancel).await {
            return false;
        }
    }
}

#[cfg(test)]
mod tests;
