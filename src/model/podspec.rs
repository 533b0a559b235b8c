//! The names that previewd writes into pod specs and the agent reads back:
//! environment variables, subcommands, flags, container names and ports.
//! One place, so the two sides cannot drift apart.

/// Env: the environment key, in preview pods (app and outbound sidecar).
pub const ENV_KEY: &str = "PREVIEW_KEY";
/// Env: the agent's pod name and namespace (sent to previewd in its hello).
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Env: the CA (PEM) an agent trusts when it reaches previewd over TLS.
pub const ENV_CA: &str = "PREVIEW_CA";
/// Env: the agent's proof of its pod, sent to previewd with its hello.
pub const ENV_PROOF: &str = "PREVIEW_AGENT_PROOF";
/// gRPC metadata that carries [`ENV_PROOF`]'s value.
pub const PROOF_HEADER: &str = "x-preview-agent-proof";
/// Env: the agent's log filter.
pub const ENV_LOG: &str = "RUST_LOG";

/// Agent subcommands.
pub const CMD_RUN: &str = "run";
pub const CMD_CLEANUP: &str = "cleanup";
pub const CMD_OUTBOUND: &str = "outbound";
pub const CMD_READY: &str = "ready";
/// Agent flag: previewd's URL, where routes are streamed from.
pub const ARG_SERVER: &str = "--server";
/// Agent flag: how long it stays attached, idle, once no route is left.
pub const ARG_LINGER: &str = "--linger";
/// The agent binary's path in its image.
pub const AGENT_BIN: &str = "/usr/local/bin/preview-agent";

/// Name of the outbound sidecar in preview pods.
pub const SIDECAR: &str = "preview-agent";
/// Ephemeral containers previewd adds to target pods: agents and their cleanups.
pub const AGENT_PREFIX: &str = "preview-agent-";
pub const CLEANUP_PREFIX: &str = "preview-cleanup-";
/// The group id of the outbound agent's sockets: its rules skip them.
pub const AGENT_GID: u32 = 1337;
