//! The whole agent (`run`) against a fake primary and a real QUIC relay.

use std::time::Duration;

use devmesh_shared::api::{LifecycleState, ScriptSpec, ScriptTrigger};
use quinn::ConnectionError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::testutil::{
    Behaviour, FakePrimary, RelayOptions, TOKEN, TestRelay, echo_through, eventually, within,
};

use LifecycleState::{Off, Ready, ShuttingDown, Starting};

fn tuning() -> Tuning {
    Tuning {
        tunnel: tunnel::Timing {
            ping_interval: Duration::from_millis(100),
            ..tunnel::Timing::default()
        },
        ..Tuning::default()
    }
}

fn args(primary: &FakePrimary) -> AgentArgs {
    AgentArgs {
        url: primary.url.clone(),
        token: TOKEN.into(),
        ca_cert: None,
        relay_region: None,
    }
}

fn script(name: &str, script: &str, run_on: ScriptTrigger) -> ScriptSpec {
    ScriptSpec {
        name: name.into(),
        script: script.into(),
        run_on,
        timeout_seconds: 10,
    }
}

/// A running agent; cancelled if the test ends early.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(primary: &FakePrimary) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with(args(primary), shutdown.clone(), tuning()));
        Self { shutdown, task }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        within("the agent to stop", &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_over_a_real_tunnel() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let mut manifest = relay.manifest();
    manifest.scripts = vec![
        script("setup", "echo hello; echo oops >&2", ScriptTrigger::Start),
        script("teardown", "echo bye", ScriptTrigger::Stop),
    ];
    let primary = FakePrimary::start(Behaviour::new(manifest)).await;
    let agent = Running::start(&primary);

    let rc = relay.next_attached().await;
    assert_eq!(rc.ticket, "ticket-1");
    primary
        .wait_for("ready", |r| r.lifecycle.last() == Some(&Ready))
        .await;
    echo_through(&rc).await;

    agent.stop().await;
    primary.recorded(|r| {
        assert_eq!(r.lifecycle, [Starting, Ready, ShuttingDown, Off]);
        let lines: Vec<(&str, &str, &str)> = r
            .log_batches
            .iter()
            .flatten()
            .map(|e| (e.source.as_str(), e.level.as_str(), e.output.as_str()))
            .collect();
        assert!(lines.contains(&("setup", "info", "hello")), "{lines:?}");
        assert!(lines.contains(&("setup", "error", "oops")), "{lines:?}");
        assert!(lines.contains(&("teardown", "info", "bye")), "{lines:?}");
        assert_eq!(r.manifest_calls, 1);
    });
    let closed = within("the relay to see the close", rc.conn.closed()).await;
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c)
            if c.error_code == tunnel::close::SHUTDOWN && &c.reason[..] == b"shutdown"),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_serves_while_startup_scripts_run_and_shutdown_kills_them() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let mut manifest = relay.manifest();
    manifest.scripts = vec![script("slow", "sleep 30", ScriptTrigger::Start)];
    let primary = FakePrimary::start(Behaviour::new(manifest)).await;
    let agent = Running::start(&primary);

    let rc = relay.next_attached().await;
    echo_through(&rc).await;
    primary.recorded(|r| assert_eq!(r.lifecycle, [Starting]));

    let started = tokio::time::Instant::now();
    agent.stop().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    primary.recorded(|r| assert_eq!(r.lifecycle, [Starting, ShuttingDown, Off]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_script_failure_reports_start_error() {
    let relay = TestRelay::start(RelayOptions::default()).await;
    let mut manifest = relay.manifest();
    manifest.scripts = vec![script("bad", "exit 2", ScriptTrigger::Start)];
    let primary = FakePrimary::start(Behaviour::new(manifest)).await;
    let agent = Running::start(&primary);
    primary
        .wait_for("start_error", |r| {
            r.lifecycle.last() == Some(&LifecycleState::StartError)
        })
        .await;
    agent.stop().await;
    primary.recorded(|r| {
        assert_eq!(
            r.lifecycle,
            [Starting, LifecycleState::StartError, ShuttingDown, Off]
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_attach_is_retried_with_a_fresh_ticket() {
    let mut relay = TestRelay::start(RelayOptions {
        refuse_first: 1,
        ..RelayOptions::default()
    })
    .await;
    let primary = FakePrimary::start(Behaviour::new(relay.manifest())).await;
    let agent = Running::start(&primary);

    let rc = relay.next_attached().await;
    assert_eq!(rc.ticket, "ticket-2");
    assert_eq!(relay.tickets(), ["ticket-1", "ticket-2"]);
    echo_through(&rc).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_reattaches_with_a_new_manifest_and_ticket() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let primary = FakePrimary::start(Behaviour::new(relay.manifest())).await;
    let agent = Running::start(&primary);

    let first = relay.next_attached().await;
    first.conn.close(7u32.into(), b"relay restarting");
    let second = relay.next_attached().await;
    assert_eq!(second.ticket, "ticket-2");
    echo_through(&second).await;
    primary.recorded(|r| assert_eq!(r.manifest_calls, 2));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_retried_until_the_primary_accepts_it() {
    let mut relay = TestRelay::start(RelayOptions::default()).await;
    let mut behaviour = Behaviour::new(relay.manifest());
    behaviour.unauthorized_manifests = 2;
    let primary = FakePrimary::start(behaviour).await;
    let agent = Running::start(&primary);

    let rc = relay.next_attached().await;
    primary.recorded(|r| assert_eq!(r.manifest_calls, 3));
    echo_through(&rc).await;
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_before_the_manifest_arrives_returns_ok() {
    let mut behaviour = Behaviour::new(crate::testutil::empty_manifest());
    behaviour.unauthorized_manifests = u32::MAX;
    let primary = FakePrimary::start(behaviour).await;
    let agent = Running::start(&primary);
    eventually("a manifest call", || {
        primary.recorded(|r| r.manifest_calls > 0)
    })
    .await;
    agent.stop().await;
    primary.recorded(|r| assert!(r.lifecycle.is_empty()));
}

#[tokio::test]
async fn unusable_settings_are_errors() {
    let bad_url = AgentArgs {
        url: "ftp://example.test".into(),
        token: "t".into(),
        ca_cert: None,
        relay_region: None,
    };
    assert!(run(bad_url, CancellationToken::new()).await.is_err());

    let dir = tempfile::tempdir().unwrap();
    let missing = AgentArgs {
        url: "https://example.test".into(),
        token: "t".into(),
        ca_cert: Some(dir.path().join("missing.pem")),
        relay_region: None,
    };
    assert!(run(missing, CancellationToken::new()).await.is_err());

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let no_certs = AgentArgs {
        url: "https://example.test".into(),
        token: "t".into(),
        ca_cert: Some(empty),
        relay_region: None,
    };
    assert!(run(no_certs, CancellationToken::new()).await.is_err());
}

#[test]
fn debug_never_shows_the_token() {
    let args = AgentArgs {
        url: "https://example.test".into(),
        token: "super-secret".into(),
        ca_cert: None,
        relay_region: None,
    };
    let shown = format!("{args:?}");
    assert!(!shown.contains("super-secret"), "{shown}");
    assert!(shown.contains("****"));
}

#[test]
fn args_parse_from_flags() {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }
    let cli = Cli::try_parse_from([
        "agent",
        "--url",
        "https://devmesh.test",
        "--token",
        "abc",
        "--ca-cert",
        "/etc/ca.pem",
    ])
    .unwrap();
    assert_eq!(cli.agent.url, "https://devmesh.test");
    assert_eq!(cli.agent.token, "abc");
    assert_eq!(
        cli.agent.ca_cert.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
}
