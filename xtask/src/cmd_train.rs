use anyhow::Result;
#[derive(clap::Args)]
pub struct TrainArgs {}
pub fn run(_a: TrainArgs) -> Result<()> { anyhow::bail!("not yet implemented") }
