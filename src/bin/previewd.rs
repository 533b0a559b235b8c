//! previewd: the preview environments server.
use clap::Parser;
use preview::previewd::server::{ServerArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    preview::telemetry::init();
    let args = ServerArgs::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    run(args, listener, shutdown).await?;
    Ok(())
}
