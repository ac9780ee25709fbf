//! `devmesh server`.

use std::future::Future;
use std::io::Write;

use devmesh_primary::ServerArgs;

pub(crate) async fn run(args: ServerArgs) -> anyhow::Result<()> {
    // Validate everything before anything binds or starts.
    let config = args.resolve()?;
    devmesh_net::runtime::init_logging(config.log_format);
    // Handlers go in before the "started" line: a supervisor that reads it
    // and stops the server at once must get a graceful stop, not a kill.
    let signalled = shutdown_signal();
    let access_url = config.access_url.clone();
    let server = devmesh_primary::start(config).await?;
    // Scripts and tests read this line to learn the bound address.
    println!("Started HTTP listener at {}", server.url());
    println!("View the API at {access_url}/api/v2/buildinfo");
    let _ = std::io::stdout().flush();

    let token = server.shutdown_token();
    tokio::spawn(async move {
        signalled.await;
        token.cancel();
    });
    server.cancelled().await;
    let failure = server.failure();
    tracing::info!("shutting down");
    server.stop().await;
    match failure {
        // Exit non-zero: whatever supervises this process must notice.
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

/// Installs SIGTERM and SIGINT handlers now, and resolves at the first of
/// either.
pub(crate) fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::warn!("cannot install signal handlers; stop the process with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
