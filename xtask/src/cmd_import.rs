use anyhow::Result;
#[derive(clap::Args)]
pub struct ImportArgs {}
pub fn run(_a: ImportArgs) -> Result<()> { anyhow::bail!("not yet implemented") }
