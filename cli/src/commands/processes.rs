//! `devmesh agent` and `devmesh edge`: long-running processes that stop
//! gracefully on SIGTERM or Ctrl-C (the agent runs its stop scripts, the
//! edge deregisters).

use tokio_util::sync::CancellationToken;

/// Logging for a long-running process, and a token cancelled by the first
/// SIGTERM or SIGINT.
fn until_signal() -> CancellationToken {
    devmesh_net::runtime::init_logging(devmesh_net::runtime::LogFormat::Text);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let signalled = super::server::shutdown_signal();
    tokio::spawn(async move {
        signalled.await;
        token.cancel();
    });
    shutdown
}

pub(crate) async fn agent(args: devmesh_agent::AgentArgs) -> anyhow::Result<()> {
    devmesh_agent::run(args, until_signal()).await
}

pub(crate) async fn edge(args: devmesh_edge_proxy::EdgeArgs) -> anyhow::Result<()> {
    devmesh_edge_proxy::run(args, until_signal()).await
}
