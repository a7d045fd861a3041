use anyhow::Result;
#[derive(clap::Args)]
pub struct DemoArgs {}
pub fn run(_a: DemoArgs) -> Result<()> { anyhow::bail!("not yet implemented") }
