//! The agent's one error type.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::intercept;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("routes file {path}: {message}")]
    Routes { path: PathBuf, message: String },
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
