//! The shared words of previewd, the agent and the CLI: keys, targets,
//! modes, TTLs, environment records and routes, and the names previewd
//! writes into pod specs for the agent to read, share links, split queues and database branches. Plain data and its
//! validation only: no tonic, no kube.

mod agent;
pub mod db;
mod field;
mod key;
pub mod podspec;
pub mod queue;
mod record;
mod request;
mod route;
pub mod share;
mod target;
mod ttl;

pub use agent::{AgentState, AgentStatus};
pub use field::{FieldError, validate_dns_label, validate_dns_subdomain};
pub use key::{Key, MAX_KEY_LEN};
pub use record::{EnvRecord, PodRecord, PodState};
pub use request::{Cleaned, DbPhase, DbStats, EnvStatus, PodRequest, QueueStats, StartRequest, Started};
pub use route::Route;
pub use target::{Mode, Target, WorkloadKind};
pub use ttl::Ttl;

/// The version of every binary; previewd sends it in [`VERSION_HEADER`] and
/// the CLI warns when it differs from its own.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const VERSION_HEADER: &str = "preview-version";

/// FNV-1a: a hash that is the same in every process and release (pod
/// names, temporary topic names).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Wall-clock Unix time in milliseconds (0 before 1970).
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
