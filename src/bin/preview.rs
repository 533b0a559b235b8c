//! preview: the command-line client.
use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = preview::cli::Cli::parse();
    if let Err(e) = preview::cli::run(cli).await {
        eprintln!("error: {e}");
        std::process::exit(match e {
            preview::cli::CliError::Usage(_) => 2,
            _ => 1,
        });
    }
}
