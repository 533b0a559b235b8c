//! Preview environments on Kubernetes: run changed services as preview pods
//! inside an existing cluster and route keyed staging traffic to them.
//!
//! - [`agent`]: the data plane in target pods (preview-agent).
//! - [`api`]: the gRPC `PreviewService` and the one conversion of errors to `tonic::Status`.
//! - [`manager`]: validates, persists and applies environment changes; publishes status.
//! - [`store`]: durable records in redb.
//! - [`kube`]: cluster operations (cloning targets, creating and deleting objects).
//! - [`config`]: the user's mirrord-shaped config file.
//! - [`filter`]: which requests belong to an environment.
//! - [`server`]: previewd's flags and main loop.
//! - [`metrics`]: previewd's Prometheus metrics and the gRPC edge layer.
//! - [`cli`]: the `preview` command.

pub mod agent;
pub mod api;
pub mod attach;
pub mod cli;
pub mod config;
pub mod filter;
pub mod kube;
pub mod manager;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod store;
pub mod telemetry;

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
