//! `livepush bench`: the project's load generator. Every figure livepush claims comes from
//! here, printed as ratios measured in one run.

mod publish;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Reliable publishes per second under each durability policy, side by side.
    Publish(publish::PublishBench),
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.command {
        BenchCommand::Publish(p) => publish::run(p).await,
    }
}

/// Latency percentile (nearest rank) of sorted samples, in milliseconds.
pub fn percentile_ms(sorted: &[std::time::Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}
