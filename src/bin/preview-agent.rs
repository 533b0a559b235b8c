//! preview-agent: the data plane in target pods (see `preview::agent`).
use clap::Parser;
use preview::agent::{AgentCli, AgentCommand};

/// Kubernetes' default terminationMessagePath.
const TERMINATION_LOG: &str = "/dev/termination-log";

fn main() {
    preview::telemetry::init();
    let cli = AgentCli::parse();
    let rt = match preview::agent::runtime(cli.command.threads()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("preview-agent: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            AgentCommand::Run(args) => preview::agent::guard(args).await.map(|code| std::process::exit(code)),
            AgentCommand::Worker(args) => preview::agent::worker(args).await,
            AgentCommand::Outbound(args) => preview::agent::outbound(args).await,
            AgentCommand::Gateway(args) => preview::agent::gateway(args).await,
            AgentCommand::Ready { admin, timeout } => {
                preview::agent::ready(admin, std::time::Duration::from_secs(timeout)).await
            }
            AgentCommand::Cleanup => preview::agent::cleanup().map(|chains| {
                println!(
                    "removed {} chain(s){}{}",
                    chains.len(),
                    if chains.is_empty() { "" } else { ": " },
                    chains.join(", ")
                );
            }),
        }
    });
    if let Err(e) = result {
        eprintln!("preview-agent: {e}");
        // In a container, the kubelet shows this file as the termination
        // message, and previewd's Status quotes it (a failing agent says why).
        if std::path::Path::new(TERMINATION_LOG).exists() {
            let _ = std::fs::write(TERMINATION_LOG, format!("preview-agent: {e}\n"));
        }
        std::process::exit(1);
    }
}
