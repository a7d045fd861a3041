//! `cargo xtask demo`: generated faces, a few minutes of CPU training, a sample grid.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anime_data::PackedDataset;
use candle_core::Device;
use tracing::info;

use crate::{RunConfig, TrainError, TrainOptions, TrainSummary, Trainer};

pub struct DemoOptions {
    /// Output folder: `data/`, `run/`, `samples.png`, `data.png`, `loss.png`.
    pub out: PathBuf,
    /// Training time budget.
    pub minutes: f64,
    /// Generated images.
    pub images: usize,
    /// Images in the sample grid.
    pub samples: usize,
    /// Seed of the generated faces and of the sample noise.
    pub seed: u64,
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self { out: "runs/demo".into(), minutes: 3.0, images: 512, samples: 64, seed: 0, progress: true }
    }
}

pub struct DemoReport {
    pub samples: PathBuf,
    pub data_grid: PathBuf,
    pub loss: PathBuf,
    pub run_dir: PathBuf,
    pub summary: TrainSummary,
    /// Mean training loss of the first and last logged windows.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
}

/// Upscales a small grid (nearest neighbour) so that it can be looked at.
fn enlarge(img: &image::RgbImage, factor: u32) -> image::RgbImage {
    image::imageops::resize(img, img.width() * factor, img.height() * factor, image::imageops::FilterType::Nearest)
}

pub fn run_demo(opts: &DemoOptions, device: &Device, stop: Arc<AtomicBool>) -> Result<DemoReport, TrainError> {
    let mut cfg = RunConfig::from_name_or_path("demo")?;
    let size = cfg.unet.image_size;
    let data_dir = opts.out.join("data");
    cfg.data.path = data_dir.display().to_string();
    cfg.train.max_minutes = Some(opts.minutes);
    cfg.validate()?;
    // The demo rewrites its whole folder (data, `run/` deleted first): a second demo into the
    // same folder would delete the first one's run, lock and all, under it.
    let lock = crate::checkpoint::RunLock::acquire(&opts.out)?;
    if let Some(w) = &lock.unguarded {
        tracing::warn!("{w}");
    }
    // Always a fresh run: the demo owns `<out>/run`, but not while a trainer uses it
    // (`train --run <out>/run`): its lock says so, before anything here is rewritten.
    let run_dir = opts.out.join("run");
    let run_in_use = if run_dir.exists() { Some(crate::checkpoint::RunLock::acquire(&run_dir)?) } else { None };

    info!("generating {} procedural {size}x{size} faces in {}", opts.images, data_dir.display());
    let faces = anime_data::synthetic_faces(opts.images, size, opts.seed);
    let names = (0..faces.len()).map(|i| format!("face_{i:05}.png")).collect();
    let pixels: Vec<u8> = faces.iter().flat_map(|f| f.as_raw().iter().copied()).collect();
    unet::weights::create_dir_all(&data_dir).map_err(|e| TrainError::io("cannot create", &data_dir, e))?;
    PackedDataset::from_images(names, size, pixels)?.save(&data_dir.join(anime_data::PACKED_FILE))?;
    let n_show = opts.samples.min(faces.len());
    let data_grid = opts.out.join("data.png");
    let ncol = (n_show as f64).sqrt().ceil() as usize;
    crate::checkpoint::save_png_atomic(&data_grid, &enlarge(&sampler::make_grid(&faces[..n_show], ncol, 2), 4))?;

    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|e| TrainError::io("cannot clear", &run_dir, e))?;
    }
    drop(run_in_use);
    info!("training the demo UNet for {} min on {:?} (Ctrl-C stops early and still samples)", opts.minutes, device);
    let mut trainer = Trainer::new(cfg.clone(), &run_dir, device, TrainOptions { progress: opts.progress, ..Default::default() })?;
    let summary = trainer.run(stop)?;

    info!("sampling {} images (DDIM, 50 steps, EMA weights)", opts.samples);
    let grid = trainer.sample_grid(opts.samples, 50, opts.seed, true)?;
    let samples = opts.out.join("samples.png");
    crate::checkpoint::save_png_atomic(&samples, &enlarge(&grid, 4))?;
    let loss = opts.out.join("loss.png");
    std::fs::copy(run_dir.join("loss.png"), &loss).map_err(|e| TrainError::io("cannot copy", &loss, e))?;
    let recs = crate::metrics::MetricsLog::open(&run_dir, |_| true)?;
    let steps: Vec<f64> = recs.records.iter().filter(|r| r.kind == "step").map(|r| r.loss).collect();
    Ok(DemoReport {
        samples,
        data_grid,
        loss,
        run_dir,
        summary,
        first_loss: steps.first().copied(),
        last_loss: steps.last().copied(),
    })
}

/// Where a demo puts its data (for docs and tests).
pub fn data_dir(out: &Path) -> PathBuf {
    out.join("data")
}
