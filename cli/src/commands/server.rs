//! `devmesh server`.

use std::io::Write;

use devmesh_primary::ServerArgs;

pub(crate) async fn run(args: ServerArgs) -> anyhow::Result<()> {
    // Validate everything before anything binds or starts.
    let config = args.resolve()?;
    devmesh_shared::runtime::init_logging(config.log_format);
    let access_url = config.access_url.clone();
    let server = devmesh_primary::start(config).await?;
    // Scripts and tests read this line to learn the bound address.
    println!("Started HTTP listener at {}", server.url());
    println!("View the API at {access_url}/api/v2/buildinfo");
    let _ = std::io::stdout().flush();

    let token = server.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
    });
    server.cancelled().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
