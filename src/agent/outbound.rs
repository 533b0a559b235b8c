//! Outbound mode, in preview pods: every outgoing TCP connection goes
//! through a proxy that adds the key to HTTP requests; and `ready`, the
//! sidecar's postStart hook.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::cli::OutboundArgs;
use super::error::AgentError;
use super::intercept::{self, Backend, Direction};
use super::metrics::Metrics;
use super::proxy::Proxy;
use super::worker::serve_admin;
use crate::model::Key;
use crate::model::podspec::AGENT_GID;

/// Outbound mode (preview pods): redirects every outgoing TCP connection
/// to a proxy that adds the key to HTTP requests and passes the rest on
/// unchanged, until SIGTERM.
pub async fn outbound(args: OutboundArgs) -> Result<(), AgentError> {
    let key =
        Key::parse("--key", &args.key).map_err(|e| AgentError::Routes { path: "--key".into(), message: e.message })?;
    // Our own sockets carry this gid, so the rules let them out untouched.
    // SAFETY: setgid(2) has no memory effects; it fails without CAP_SETGID.
    if unsafe { libc::setgid(AGENT_GID) } != 0 {
        return Err(AgentError::Io(std::io::Error::last_os_error()));
    }
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| AgentError::Bind { addr: args.listen, source })?;
    let chain = intercept::chain_name();
    let backend = Backend::detect()?;
    let stale = backend.remove_all()?;
    if !stale.is_empty() {
        tracing::warn!(?stale, "removed rules left by a dead agent");
    }
    backend.install(&chain, &Direction::Outbound { agent_gid: AGENT_GID }, args.listen.port())?;
    let metrics = Arc::new(Metrics::default());
    let admin = match TcpListener::bind(args.admin).await {
        Ok(a) => a,
        Err(source) => {
            backend.remove(&chain)?;
            return Err(AgentError::Bind { addr: args.admin, source });
        }
    };
    tracing::info!(%chain, %key, "propagating the key on outgoing HTTP");
    tokio::spawn(serve_admin(admin, Arc::default(), metrics.clone()));
    let proxy = Proxy::propagating(metrics, key);
    tokio::spawn(async move {
        loop {
            let (stream, _) = crate::net::accept(&listener).await;
            match intercept::original_dst(&stream) {
                Ok(dst) => {
                    tokio::spawn(proxy.clone().serve(stream, dst));
                }
                Err(e) => tracing::debug!(error = %e, "not a redirected connection; dropping it"),
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    backend.remove(&chain)?;
    tracing::info!(%chain, "rules removed; exiting");
    Ok(())
}

/// Polls `admin` until it accepts a connection.
pub async fn ready(admin: SocketAddr, timeout: Duration) -> Result<(), AgentError> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::net::TcpStream::connect(admin).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > end => return Err(AgentError::Bind { addr: admin, source: e }),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
