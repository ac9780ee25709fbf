//! The workspace agent (`devmesh agent`): connects a workspace's apps to the nearest relay.
//!
//! It keeps one QUIC tunnel to the nearest relay and splices the relay's
//! streams onto local ports, runs the startup and stop scripts and streams
//! their output, checks app health, and reports lifecycle, logs and health
//! to the primary.
//!
//! [`run`] is the whole agent; the CLI parses [`AgentArgs`] and cancels the
//! token on SIGTERM or SIGINT.

#![forbid(unsafe_code)]

mod client;
mod config;
mod health;
mod lifecycle;
mod logs;
mod metadata;
mod nearest;
mod probe;
mod pty;
mod scripts;
mod sftp;
mod ssh;
mod supervisor;
mod tunnel;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use devmesh_shared::api::{AgentManifest, LifecycleState, ScriptTrigger};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::config::{AgentArgs, AgentConfig};

use crate::client::ApiClient;
use crate::lifecycle::Lifecycle;
use crate::scripts::{OnFailure, Outcome, ScriptEnv};

/// Runs the agent until `shutdown` is cancelled, then runs the stop
/// scripts, reports the final state, closes the tunnel and returns `Ok`.
///
/// Errors only for unusable settings (a bad URL or CA bundle); everything
/// that can heal (the primary down, the token refused, relays unreachable)
/// is retried with backoff and logged.
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(args.resolve()?, shutdown, Tuning::default()).await
}

/// Timers and sizes that tests shorten.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    tunnel: tunnel::Timing,
    batch: logs::BatchConfig,
    /// How long shutdown waits for the last logs and lifecycle state.
    flush_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            tunnel: tunnel::Timing::default(),
            batch: logs::BatchConfig::default(),
            flush_timeout: Duration::from_secs(10),
        }
    }
}

async fn run_with(
    config: AgentConfig,
    shutdown: CancellationToken,
    tuning: Tuning,
) -> anyhow::Result<()> {
    devmesh_net::runtime::install_crypto_provider();
    let client = ApiClient::new(&config.url, config.token, config.ca_cert.as_deref())
        .context("invalid agent settings")?
        .pinned_to(config.relay_region.clone());
    tracing::info!(version = devmesh_shared::VERSION, url = %config.url, "devmesh agent starting");
    pty::set_grace(config.terminal_grace);

    let Some(manifest) =
        client::retry("fetching the manifest", &shutdown, || client.manifest()).await
    else {
        tracing::info!("shut down before the manifest arrived");
        return Ok(());
    };
    let span = tracing::info_span!(
        "agent",
        agent.id = %manifest.agent_id,
        workspace.id = %manifest.workspace_id,
    );
    serve(client, manifest, shutdown, tuning)
        .instrument(span)
        .await
}

async fn serve(
    client: ApiClient,
    manifest: AgentManifest,
    shutdown: CancellationToken,
    tuning: Tuning,
) -> anyhow::Result<()> {
    tracing::info!(
        agent = %manifest.agent_name,
        workspace = %manifest.workspace_name,
        owner = %manifest.owner_name,
        scripts = manifest.scripts.len(),
        metadata = manifest.metadata.len(),
        apps = manifest.apps.len(),
        relays = manifest.relays.len(),
        "manifest received"
    );

    // The tunnel and the uploads outlive `shutdown`: stop scripts still log,
    // and users keep their connections until the scripts are done.
    let tunnel_stop = CancellationToken::new();
    let tunnel = tokio::spawn(
        supervisor::run(
            client.clone(),
            Some(manifest.clone()),
            tuning.tunnel,
            tunnel_stop.clone(),
        )
        .in_current_span(),
    );
    let uploads_stop = CancellationToken::new();
    let (logs, log_uploader) = logs::spawn(client.clone(), tuning.batch, uploads_stop.clone());
    let lifecycle = Lifecycle::spawn(client.clone(), uploads_stop.clone());
    let checks = manifest
        .apps
        .iter()
        .filter_map(health::Check::from_manifest)
        .collect();
    let mut health = health::spawn(client.clone(), checks, shutdown.child_token())
        .context("cannot start health checks")?;

    let env = ScriptEnv {
        directory: manifest.directory.as_ref().map(PathBuf::from),
        env: manifest.env.clone(),
    };
    if let Err(e) = ssh::install(env.clone()) {
        tracing::warn!(error = %format!("{e:#}"), "cannot start the ssh server; ssh to this agent will fail");
    }
    let mut measuring = metadata::spawn(
        client.clone(),
        &manifest.metadata,
        &env,
        shutdown.child_token(),
    );

    // === Start ===
    lifecycle.set(LifecycleState::Starting);
    let start_scripts = scripts::run_all(
        &manifest.scripts,
        ScriptTrigger::Start,
        &env,
        &logs,
        OnFailure::Stop,
    );
    let started = tokio::select! {
        outcome = start_scripts => Some(outcome),
        () = shutdown.cancelled() => None,
    };
    match started {
        Some(outcome) => {
            lifecycle.set(match outcome {
                Outcome::Success => LifecycleState::Ready,
                Outcome::Failed => LifecycleState::StartError,
                Outcome::TimedOut => LifecycleState::StartTimeout,
            });
            shutdown.cancelled().await;
        }
        None => tracing::info!("shutdown requested during startup scripts; they were killed"),
    }

    // === Shutdown ===
    tracing::info!("shutting down");
    while health.join_next().await.is_some() {}
    while measuring.join_next().await.is_some() {}
    lifecycle.set(LifecycleState::ShuttingDown);
    let stopped = scripts::run_all(
        &manifest.scripts,
        ScriptTrigger::Stop,
        &env,
        &logs,
        OnFailure::Continue,
    )
    .await;
    lifecycle.set(match stopped {
        Outcome::Success => LifecycleState::Off,
        Outcome::Failed => LifecycleState::ShutdownError,
        Outcome::TimedOut => LifecycleState::ShutdownTimeout,
    });
    drop(logs);
    let flushed = tokio::time::timeout(tuning.flush_timeout, async {
        log_uploader.finish().await;
        lifecycle.finish().await;
    })
    .await;
    if flushed.is_err() {
        tracing::warn!(
            "the primary did not take the last logs or lifecycle state in time; giving up on them"
        );
        uploads_stop.cancel();
    }
    tunnel_stop.cancel();
    let _ = tunnel.await;
    tracing::info!("agent stopped");
    Ok(())
}
