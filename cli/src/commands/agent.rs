//! `devmesh agent`: runs the workspace agent until SIGTERM or Ctrl-C, then
//! runs stop scripts and reports `off`.

use tokio_util::sync::CancellationToken;

pub(crate) async fn run(args: devmesh_agent::AgentArgs) -> anyhow::Result<()> {
    devmesh_shared::runtime::init_logging(devmesh_shared::runtime::LogFormat::Text);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        super::server::wait_for_signal().await;
        token.cancel();
    });
    devmesh_agent::run(args, shutdown).await
}
