//! preview-agent: the data plane in target pods (see `preview::agent`).
use clap::Parser;
use preview::agent::{AgentCli, AgentCommand};

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
        std::process::exit(1);
    }
}
