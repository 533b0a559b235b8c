//! Database branches in previewd: the engines (`pg`), talking to a source
//! database and to a branch server, and copying one into the other with the
//! engine's own dump tools. The manager decides what exists (from its
//! records); this module only does it.

pub mod pg;

/// What went wrong with a source database or a branch server.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {addr} is unreachable: {reason}")]
    Unavailable { addr: String, reason: String },
    /// The source refused what the target's connection says (credentials,
    /// a database that does not exist); never carries a password.
    #[error("{0}")]
    Refused(String),
    #[error("branch server {server}: {reason}")]
    Server { server: String, reason: String },
    #[error("copying {source_db} into branch server {server}: {reason}")]
    Copy { source_db: String, server: String, reason: String },
    #[error("{what}: not ready within {secs} s (creation_timeout_secs)")]
    Timeout { what: String, secs: u64 },
}

/// A password for a branch server or a branch: 128 random bits, hex.
pub fn new_password() -> String {
    let mut b = [0u8; 16];
    // The OS's random source does not fail on Linux once booted.
    getrandom::fill(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
