//! Preview environments on Kubernetes: run changed services as preview pods
//! inside an existing cluster and route keyed staging traffic to them.
//!
//! - [`model`]: the shared words (keys, targets, records, routes); [`wire`]: their protobuf forms.
//! - [`agent`]: the data plane in target pods (preview-agent).
//! - [`previewd`]: the control plane (API, manager, store, cluster, attach, metrics).
//! - [`config`]: the user's mirrord-shaped config file.
//! - [`filter`]: which requests belong to an environment.
//! - [`cli`]: the `preview` command.

pub mod agent;
pub mod cli;
pub mod config;
pub mod filter;
pub mod model;
pub mod net;
pub mod previewd;
pub mod proto;
pub mod telemetry;
pub mod wire;

/// Deterministic randomness for property tests: failures reproduce.
#[cfg(test)]
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
