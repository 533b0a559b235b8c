//! previewd, the control plane: the gRPC API, the environment manager, the
//! redb store, cluster operations, agent attachment and metrics.
//!
//! Nothing here is imported by the agent or the CLI.

pub mod api;
pub mod attach;
pub mod auth;
pub mod cluster;
pub mod manager;
pub mod metrics;
pub mod server;
pub mod store;
