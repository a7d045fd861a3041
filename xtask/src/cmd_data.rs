//! `prepare-data` and `bench-data`: flags -> `anime_data`.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use crate::common::out;

#[derive(clap::Args)]
pub struct PrepareDataArgs {
    /// Folder with the raw Kaggle images (splcher/animefacedataset, unzipped).
    #[arg(long, default_value = "dataset/anime/raw/images")]
    raw: PathBuf,
    /// Output folder: images/, packed.safetensors, skipped.txt.
    #[arg(long, default_value = "dataset/anime/processed")]
    out: PathBuf,
    /// Side of the square output images.
    #[arg(long, default_value_t = anime_data::DEFAULT_SIZE)]
    size: u32,
    /// Redo every output, even those a previous run left valid.
    #[arg(long)]
    force: bool,
    /// none: stretch to a square like the reference; center: cut the centred square first.
    #[arg(long, default_value = "none", value_parser = ["none", "center"])]
    crop: String,
    /// Only the first N image files (in name order).
    #[arg(long, value_parser = crate::common::positive)]
    limit: Option<usize>,
    /// Skip inputs above this many megapixels without decoding them.
    #[arg(long, default_value_t = 40.0, allow_negative_numbers = true)]
    max_megapixels: f64,
    /// Fetch an image-parquet dataset from the Hugging Face hub instead of reading --raw,
    /// e.g. DrishtiSharma/Anime-Face-Dataset (needs a build with --features hub).
    #[arg(long, value_name = "DATASET")]
    from_hub: Option<String>,
    /// Prepare from local parquet files instead of --raw (needs --features hub).
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with = "from_hub")]
    from_parquet: Vec<PathBuf>,
}

pub fn prepare(a: PrepareDataArgs) -> Result<()> {
    let mut opts = anime_data::PrepareOptions::new(&a.raw, &a.out);
    opts.size = a.size;
    opts.force = a.force;
    opts.crop = a.crop.parse().map_err(anyhow::Error::msg)?;
    opts.limit = a.limit;
    ensure!(a.max_megapixels.is_finite() && a.max_megapixels > 0.0, "--max-megapixels must be a number > 0, got {}", a.max_megapixels);
    opts.max_pixels = (a.max_megapixels * 1e6) as u64;
    let report = if let Some(dataset) = &a.from_hub {
        from_hub(dataset, &opts)?
    } else if !a.from_parquet.is_empty() {
        from_parquet(&a.from_parquet, &opts)?
    } else {
        anime_data::prepare(&opts, true).context("prepare-data")?
    };
    out!("{report}");
    Ok(())
}

#[cfg(feature = "hub")]
fn from_hub(dataset: &str, opts: &anime_data::PrepareOptions) -> Result<anime_data::PrepareReport> {
    anime_data::hub::prepare_from_hub(dataset, opts, true).context("prepare-data --from-hub")
}

#[cfg(feature = "hub")]
fn from_parquet(files: &[PathBuf], opts: &anime_data::PrepareOptions) -> Result<anime_data::PrepareReport> {
    anime_data::hub::prepare_from_parquet(files, opts, true).context("prepare-data --from-parquet")
}

#[cfg(not(feature = "hub"))]
fn from_hub(_dataset: &str, _opts: &anime_data::PrepareOptions) -> Result<anime_data::PrepareReport> {
    anyhow::bail!("--from-hub needs the hub feature: cargo run --release -p xtask --features hub -- prepare-data --from-hub ...")
}

#[cfg(not(feature = "hub"))]
fn from_parquet(_files: &[PathBuf], _opts: &anime_data::PrepareOptions) -> Result<anime_data::PrepareReport> {
    anyhow::bail!("--from-parquet needs the hub feature: cargo run --release -p xtask --features hub -- prepare-data --from-parquet ...")
}

#[derive(clap::Args)]
pub struct BenchDataArgs {
    /// Number of generated Kaggle-like JPEGs (cached in the workdir between runs).
    #[arg(long, default_value_t = 3000)]
    n: usize,
    /// Folder for the generated inputs and the outputs.
    #[arg(long, default_value = "target/bench-data")]
    workdir: PathBuf,
    /// Output size.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Timed runs of each contender (the best is reported).
    #[arg(long, default_value_t = 3, value_parser = crate::common::positive)]
    repeat: usize,
    /// Python interpreter for the reference Pillow loop; `none` to skip it.
    #[arg(long, default_value = "python3")]
    python: String,
}

pub fn bench(a: BenchDataArgs) -> Result<()> {
    let opts = anime_data::bench::BenchOptions { n: a.n, workdir: a.workdir, size: a.size, repeat: a.repeat, python: a.python };
    let report = anime_data::bench::run_bench(&opts).context("bench-data")?;
    out!("{report}");
    Ok(())
}
