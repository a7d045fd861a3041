use anyhow::Result;
#[derive(clap::Args)]
pub struct PrepareDataArgs {}
#[derive(clap::Args)]
pub struct BenchDataArgs {}
pub fn prepare(_a: PrepareDataArgs) -> Result<()> { anyhow::bail!("not yet implemented") }
pub fn bench(_a: BenchDataArgs) -> Result<()> { anyhow::bail!("not yet implemented") }
