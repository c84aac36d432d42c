//! `gatehouse-core [--config FILE]`: reads the configuration, starts the Core, and stops
//! it gracefully on SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use gatehouse_core::config::FileConfig;
use tracing_subscriber::EnvFilter;

/// The reference Core of gatehouse: gRPC gateway service, admin HTTP API, SQLite store.
#[derive(Parser)]
#[command(name = "gatehouse-core", version)]
struct Args {
    /// TOML configuration file (see config/core.toml); without it every default applies.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = FileConfig::load(args.config.as_deref())?
        .resolve()
        .context("invalid configuration")?;
    let core = gatehouse_core::start(config).await?;
    shutdown_signal().await?;
    tracing::info!("stopping");
    core.stop().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
