use anyhow::Result;
#[derive(clap::Args)]
pub struct SampleArgs {}
pub fn run(_a: SampleArgs) -> Result<()> { anyhow::bail!("not yet implemented") }
