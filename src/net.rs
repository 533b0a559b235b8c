//! Socket helpers shared by every server in the crate.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The next accepted connection. An accept that fails (out of descriptors
/// or memory: EMFILE, ENFILE, ENOBUFS) is waited out with a backoff from
/// 5 ms to 1 s instead of being retried in a spin.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut wait = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}
