//! App health checks: one task per app with a health check polls its URL,
//! a [`Tracker`] turns pass/fail results into health changes, and one
//! reporter task posts only the changes to the primary.

use std::collections::BTreeMap;
use std::time::Duration;

use devmesh_shared::api::{AppHealth, ManifestApp};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiClient, log_api_error};
use devmesh_net::backoff::Backoff;

/// No check waits longer than this, whatever the interval.
const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

// === State machine ===

/// Health of one app from its check results; no I/O, no clock.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    threshold: u32,
    failures: u32,
    state: AppHealth,
}

impl Tracker {
    /// Starts `initializing`; `threshold` consecutive failures (at least 1)
    /// make it `unhealthy`.
    pub(crate) fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            failures: 0,
            state: AppHealth::Initializing,
        }
    }

    /// The current health.
    #[cfg(test)]
    pub(crate) fn state(&self) -> AppHealth {
        self.state
    }

    /// Records one check result; returns the new health if it changed.
    pub(crate) fn observe(&mut self, passed: bool) -> Option<AppHealth> {
        let next = if passed {
            self.failures = 0;
            AppHealth::Healthy
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.threshold {
                AppHealth::Unhealthy
            } else {
                self.state
            }
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }
}

// === Checks ===

/// One app's check, with its timing resolved.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    /// The app's slug.
    pub(crate) slug: String,
    /// The URL polled with GET; any 2xx or 3xx passes.
    pub(crate) url: String,
    /// Time between checks.
    pub(crate) interval: Duration,
    /// Time one check may take.
    pub(crate) timeout: Duration,
    /// Consecutive failures before `unhealthy`.
    pub(crate) threshold: u32,
}

impl Check {
    /// The check of a manifest app, if it has one.
    pub(crate) fn from_manifest(app: &ManifestApp) -> Option<Self> {
        let hc = app.healthcheck.as_ref()?;
        let interval = Duration::from_secs(hc.interval_seconds.max(1).into());
        Some(Self {
            slug: app.slug.clone(),
            url: hc.url.clone(),
            interval,
            timeout: interval.min(MAX_CHECK_TIMEOUT),
            threshold: hc.threshold,
        })
    }
}

/// Starts one task per check plus the reporter. All end when `cancel`
/// fires; the returned set holds them.
pub(crate) fn spawn(
    client: ApiClient,
    checks: Vec<Check>,
    cancel: CancellationToken,
) -> anyhow::Result<JoinSet<()>> {
    let mut tasks = JoinSet::new();
    if checks.is_empty() {
        return Ok(tasks);
    }
    // Redirects are not followed: a 3xx already counts as healthy. No proxy:
    // the URL is the app as the agent reaches it directly.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("devmesh-agent/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let (tx, rx) = mpsc::channel(checks.len() * 4);
    for check in checks {
        tasks.spawn(run_check(http.clone(), check, tx.clone(), cancel.clone()));
    }
    tasks.spawn(report(client, rx, cancel));
    Ok(tasks)
}

async fn run_check(
    http: reqwest::Client,
    check: Check,
    changes: mpsc::Sender<(String, AppHealth)>,
    cancel: CancellationToken,
) {
    let mut tracker = Tracker::new(check.threshold);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = cancel.cancelled() => return,
        }
        let passed = tokio::select! {
            p = probe(&http, &check) => p,
            () = cancel.cancelled() => return,
        };
        if let Some(health) = tracker.observe(passed) {
            tracing::info!(app = %check.slug, ?health, "app health changed");
            if changes.send((check.slug.clone(), health)).await.is_err() {
                return;
            }
        }
    }
}

/// One GET; any 2xx or 3xx passes.
async fn probe(http: &reqwest::Client, check: &Check) -> bool {
    match http.get(&check.url).timeout(check.timeout).send().await {
        Ok(resp) => {
            let s = resp.status();
            let passed = s.is_success() || s.is_redirection();
            if !passed {
                tracing::debug!(app = %check.slug, status = %s, "health check failed");
            }
            passed
        }
        Err(e) => {
            tracing::debug!(app = %check.slug, error = %e, "health check failed");
            false
        }
    }
}

/// Posts changes, merging those that arrive while a post is retried so the
/// primary always gets the latest health of each app, and only changes.
async fn report(
    client: ApiClient,
    mut changes: mpsc::Receiver<(String, AppHealth)>,
    cancel: CancellationToken,
) {
    let mut reported: BTreeMap<String, AppHealth> = BTreeMap::new();
    let mut pending: BTreeMap<String, AppHealth> = BTreeMap::new();
    let mut backoff = Backoff::default();
    loop {
        if pending.is_empty() {
            tokio::select! {
                change = changes.recv() => match change {
                    Some((slug, h)) => { pending.insert(slug, h); }
                    None => return,
                },
                () = cancel.cancelled() => return,
            }
        }
        while let Ok((slug, h)) = changes.try_recv() {
            pending.insert(slug, h);
        }
        // A flip and a flip back while a post was failing is no change.
        pending.retain(|slug, h| reported.get(slug) != Some(h));
        if pending.is_empty() {
            continue;
        }
        let result = tokio::select! {
            r = client.app_health(pending.clone()) => r,
            () = cancel.cancelled() => return,
        };
        match result {
            Ok(()) => {
                reported.append(&mut pending);
                backoff.reset();
            }
            Err(e) => {
                log_api_error("reporting app health", &e);
                if !backoff.wait(&cancel).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
