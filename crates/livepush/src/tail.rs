//! `livepush tail` (filled in with the client SDK).

use clap::Args;

#[derive(Debug, Args)]
pub struct TailArgs {}

pub async fn run(_a: TailArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
