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

fn config(primary: &FakePrimary) -> AgentConfig {
    AgentArgs {
        url: Some(primary.url.clone()),
        token: Some(TOKEN.into()),
        ..Default::default()
    }
    .resolve()
    .unwrap()
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
        let task = tokio::spawn(run_with(config(primary), shutdown.clone(), tuning()));
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

#[test]
fn unusable_settings_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let good = || AgentArgs {
        url: Some("https://example.test".into()),
        token: Some("t".into()),
        ..Default::default()
    };
    for (broken, needle) in [
        (
            AgentArgs {
                url: Some("ftp://example.test".into()),
                ..good()
            },
            "--url",
        ),
        (
            AgentArgs {
                url: None,
                ..good()
            },
            "--url",
        ),
        (
            AgentArgs {
                token: Some(" ".into()),
                ..good()
            },
            "--token",
        ),
        (
            AgentArgs {
                ca_cert: Some(dir.path().join("missing.pem")),
                ..good()
            },
            "missing.pem",
        ),
        (
            AgentArgs {
                ca_cert: Some(empty.clone()),
                ..good()
            },
            "no PEM certificate",
        ),
        (
            AgentArgs {
                relay_region: Some("Not A Region".into()),
                ..good()
            },
            "--relay-region",
        ),
    ] {
        let err = broken.resolve().unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_settings_file_fills_what_flags_leave_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "url = \"https://file.example.test/\"\ntoken = \"from-file\"\nrelay-region = \"sydney\"\n",
    )
    .unwrap();
    let config = AgentArgs {
        config: Some(path.clone()),
        relay_region: Some("tokyo".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(config.url, "https://file.example.test");
    assert_eq!(config.token.expose(), "from-file");
    assert_eq!(config.relay_region.as_deref(), Some("tokyo"), "a flag wins");

    std::fs::write(&path, "tokn = \"typo\"\n").unwrap();
    let err = AgentArgs {
        config: Some(path),
        ..Default::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(err.contains("tokn"), "{err}");
}

#[test]
fn debug_never_shows_the_token() {
    let args = AgentArgs {
        url: Some("https://example.test".into()),
        token: Some("super-secret".into()),
        ..Default::default()
    };
    let shown = format!("{args:?}");
    assert!(!shown.contains("super-secret"), "{shown}");
    assert!(shown.contains("****"));
    let shown = format!("{:?}", args.resolve().unwrap());
    assert!(!shown.contains("super-secret"), "{shown}");
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
    assert_eq!(cli.agent.url.as_deref(), Some("https://devmesh.test"));
    assert_eq!(cli.agent.token.as_deref(), Some("abc"));
    assert_eq!(
        cli.agent.ca_cert.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
}
