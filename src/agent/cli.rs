//! preview-agent's command line: subcommands, flags and the runtime they ask for.
//! Names that previewd writes into pod specs come from `model::podspec`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::podspec;

#[derive(Parser, Debug)]
#[command(name = "preview-agent", version, about = "Routes keyed staging traffic to preview pods")]
pub struct AgentCli {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Start the worker under a guard that removes its rules when it ends.
    #[command(name = podspec::CMD_RUN)]
    Run(WorkerArgs),
    /// The worker itself (started by `run`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Remove every agent rule in this network namespace.
    #[command(name = podspec::CMD_CLEANUP)]
    Cleanup,
    /// Wait until a local agent's admin port answers (the outbound sidecar's
    /// postStart hook: the app starts only once the rules are in).
    #[command(name = podspec::CMD_READY, hide = true)]
    Ready {
        #[arg(long, default_value = "127.0.0.1:15092")]
        admin: SocketAddr,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// In a preview pod: add the environment key to the `baggage` of every
    /// outgoing HTTP request, so downstream calls stay in the environment.
    #[command(name = podspec::CMD_OUTBOUND)]
    Outbound(OutboundArgs),
    /// The share gateway: opens share links (http://<slug>.<share domain>/)
    /// by forwarding to their environment's entry Service with the key added.
    Gateway(GatewayArgs),
}

impl AgentCommand {
    /// Threads for this command's runtime: the data plane's setting, else one.
    pub fn threads(&self) -> usize {
        match self {
            AgentCommand::Worker(a) => a.runtime.threads.into(),
            AgentCommand::Outbound(a) => a.runtime.threads.into(),
            AgentCommand::Gateway(a) => a.runtime.threads.into(),
            _ => 1,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Data-plane threads. One (the default) serves every connection on a
    /// single thread, as linkerd2-proxy does given one core: at a pod's
    /// rates, waking a second thread costs more than it gives.
    #[arg(long, env = "PREVIEW_AGENT_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

/// The runtime of an agent process: one thread, or a work-stealing pool.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

#[derive(Args, Debug, Clone)]
pub struct OutboundArgs {
    /// The environment key to propagate.
    #[arg(long, env = podspec::ENV_KEY)]
    pub key: String,
    /// Where outgoing connections are redirected (REDIRECT in OUTPUT lands on loopback).
    #[arg(long, env = "PREVIEW_AGENT_OUTBOUND_LISTEN", default_value = "127.0.0.1:15002")]
    pub listen: SocketAddr,
    /// Admin port (`/metrics`); bound once the rules are in, so a startup
    /// probe on it tells the kubelet when the app may start.
    #[arg(long, env = "PREVIEW_AGENT_ADMIN", default_value = "0.0.0.0:15092")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Where browsers' requests arrive.
    #[arg(long, env = "PREVIEW_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// previewd's address: links are streamed from it.
    #[arg(long, env = "PREVIEW_GATEWAY_SERVER")]
    pub server: String,
    /// The CA to trust for an https --server (a PEM file).
    #[arg(long, env = "PREVIEW_GATEWAY_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A bearer token for previewd, re-read at every connection (a projected
    /// ServiceAccount token with audience previewd).
    #[arg(long, env = "PREVIEW_GATEWAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This gateway's name in previewd's log.
    #[arg(long, env = "HOSTNAME", default_value = "preview-gateway")]
    pub name: String,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Target ports to intercept [default: the ports of the routes, kept in
    /// step as routes change].
    #[arg(long, env = "PREVIEW_AGENT_PORTS", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Where intercepted connections are redirected.
    #[arg(long, env = "PREVIEW_AGENT_LISTEN", default_value = "0.0.0.0:15001")]
    pub listen: SocketAddr,
    /// Admin port (`/metrics`, `/routes`); never intercepted.
    #[arg(long, env = "PREVIEW_AGENT_ADMIN", default_value = "0.0.0.0:15090")]
    pub admin: SocketAddr,
    /// Routes as a JSON list, re-read when the file changes.
    #[arg(long, env = "PREVIEW_AGENT_ROUTES", required_unless_present = "server", conflicts_with = "server")]
    pub routes: Option<PathBuf>,
    /// previewd's address: routes are streamed from it.
    #[arg(long, env = "PREVIEW_AGENT_SERVER", requires_all = ["pod", "namespace"])]
    pub server: Option<String>,
    /// This pod's name (downward API), sent to previewd.
    #[arg(long, env = podspec::ENV_POD_NAME)]
    pub pod: Option<String>,
    /// This pod's namespace (downward API), sent to previewd.
    #[arg(long, env = podspec::ENV_POD_NAMESPACE)]
    pub namespace: Option<String>,
    /// The CA (PEM text) to trust for an https --server.
    #[arg(long, env = podspec::ENV_CA, hide_env_values = true)]
    pub ca: Option<String>,
    /// Proof of this pod that previewd gave the agent, sent with its hello.
    #[arg(long, env = podspec::ENV_PROOF, hide_env_values = true)]
    pub proof: Option<String>,
    /// Bytes of mirror copies that may be queued or in flight at once;
    /// copies past it are dropped and counted (`mirror_dropped`).
    #[arg(long, env = "PREVIEW_AGENT_MIRROR_MAX_BYTES", default_value_t = super::state::MIRROR_MAX_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub mirror_max_bytes: u64,
    /// How long to stay attached, idle and with no rules, once no route is
    /// left: a new environment on this target within it reuses this agent
    /// (ephemeral containers cannot be removed, so each new one stays in the
    /// pod spec for the pod's life). 0 exits at once.
    #[arg(long, env = "PREVIEW_AGENT_LINGER", default_value = "10m", value_parser = parse_linger)]
    pub linger: std::time::Duration,
    /// Chain name (chosen by the guard).
    #[arg(long, hide = true)]
    pub chain: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn parse_linger(s: &str) -> Result<std::time::Duration, String> {
    crate::model::Ttl::parse_duration("--linger", s).map_err(|e| e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_flags_previewd_writes_parse_here() {
        let args =
            ["preview-agent", podspec::CMD_RUN, podspec::ARG_SERVER, "http://p:7443", podspec::ARG_LINGER, "90s"];
        let cli = AgentCli::try_parse_from(args.iter().chain(&["--pod", "p", "--namespace", "n"]).copied());
        let cli = cli.expect("previewd's agent arguments parse");
        let AgentCommand::Run(w) = cli.command else { panic!("not run: {:?}", cli.command) };
        assert_eq!(w.linger, std::time::Duration::from_secs(90));
        let zero = AgentCli::try_parse_from(["preview-agent", "worker", "--routes", "r.json", "--linger", "0s"]);
        assert!(zero.is_ok_and(|c| matches!(c.command, AgentCommand::Worker(w) if w.linger.is_zero())));
    }

    #[test]
    fn threads_default_to_one_and_zero_is_refused() {
        let parse = |extra: &[&str]| {
            let args = ["preview-agent", "worker", "--routes", "r.json"].iter().chain(extra).copied();
            AgentCli::try_parse_from(args)
        };
        assert_eq!(parse(&[]).map(|c| c.command.threads()).ok(), Some(1));
        assert_eq!(parse(&["--threads", "2"]).map(|c| c.command.threads()).ok(), Some(2));
        let err = parse(&["--threads", "0"]).expect_err("0 threads is refused").to_string();
        assert!(err.contains("--threads"), "{err}");
    }
}
