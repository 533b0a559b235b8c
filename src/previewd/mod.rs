//! previewd, the control plane: the gRPC API, the environment manager, the
//! redb store, cluster operations, agent attachment, metrics and the queue
//! splitters.
//!
//! Nothing here is imported by the agent or the CLI.

pub mod api;
pub mod attach;
pub mod auth;
pub mod cluster;
pub mod dbs;
pub mod manager;
pub mod metrics;
pub mod queues;
pub mod server;
pub mod store;
