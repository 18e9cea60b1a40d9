//! `comfyfleet` binary. Minimal CLI on the `sim` branch: only the `sim` subcommand.

use clap::{Parser, Subcommand};
use comfyfleet::sim::{self, SimArgs};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "comfyfleet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A ComfyUI-protocol server that simulates execution (tests, demos, load tests).
    Sim(SimArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match Cli::parse().command {
        Command::Sim(args) => {
            let listener = tokio::net::TcpListener::bind(args.bind).await?;
            eprintln!(
                "comfyfleet sim listening on http://{}",
                listener.local_addr()?
            );
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
            });
            sim::run(listener, args.to_config(), shutdown).await?;
        }
    }
    Ok(())
}
