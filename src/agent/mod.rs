//! preview-agent: the data plane that runs in a target pod's network
//! namespace. It redirects the target's ports to itself and routes each
//! request: to a preview pod (steal), to the app plus a copy (mirror), or to
//! the app unchanged.
//!
//! `gateway` is the share gateway, the same proxy in front of share links
//! (`share_heads`: what a link changes in the heads it forwards).
//!
//! Process code (`cli`, `guard`, `worker`, `outbound`, `source`) is kept
//! apart from the proxy (`proxy`, `h1`, `framing`, `mirror`, `state`,
//! `detect`, `routes`) and the rules (`intercept`, and `sockdiag`, which
//! resets connections made to the app before them). `run` is a small guard process
//! that starts the worker and removes the worker's rules whatever way it
//! ends (exit, SIGTERM, panic, SIGKILL of the worker). `cleanup` removes
//! rules left when both were killed.

mod cli;
pub mod detect;
mod error;
pub mod framing;
pub mod gateway;
mod guard;
pub mod h1;
pub mod intercept;
pub mod metrics;
mod mirror;
mod outbound;
pub mod proxy;
pub mod routes;
mod share_heads;
mod sockdiag;
mod source;
mod state;
mod worker;

pub use cli::{AgentCli, AgentCommand, GatewayArgs, OutboundArgs, RuntimeArgs, WorkerArgs, runtime};
pub use error::AgentError;
pub use gateway::gateway;
pub use guard::{cleanup, guard};
pub use outbound::{outbound, ready};
pub use worker::worker;
