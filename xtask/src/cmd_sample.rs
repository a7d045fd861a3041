//! `cargo xtask sample`: sample grids, diffusion-process strips, the recover experiment and
//! noise interpolation from a trained model. Parses flags and calls the `sampler` crate.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use clap::ValueEnum;
use diffusion::{FinalStepNoise, SamplerKind, Variance};
use sampler::{Progress, RecoverMode, Sampler};
use tracing::info;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// Grids of samples: sample_0.png (sigma^2 = beta), sample_1.png (beta-tilde).
    Samples,
    /// The diffusion process x_T ... x_0 of a few samples: process_0.png, process_1.png.
    Process,
    /// Test-split images noised to t and denoised back: recover_t=100.png, ...
    Recover,
    /// Slerp between pairs of noises, decoded with deterministic DDIM: interpolate.png.
    Interpolate,
    /// All of the above.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VarianceArg {
    Beta,
    BetaTilde,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    Ddpm,
    Ddim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FinalNoiseArg {
    /// No noise at the last step (DDPM paper, Algorithm 2).
    Paper,
    /// Noise at the last step too, as the reference did.
    Reference,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RecoverModeArg {
    /// Denoise from step t down to 0 (SDEdit): small t gives the original back.
    Sdedit,
    /// All T reverse steps from the noised image, as the reference did (recover_reference_t=...png).
    Reference,
    /// Both, one file each.
    Both,
}

#[derive(clap::Args)]
#[command(after_help = "\
Outputs (in --out):
  samples      sample_0.png / sample_1.png (sigma^2 = beta / beta-tilde), or sample_ddim_steps=N_eta=E.png
  process      process_0.png / process_1.png (process_ddim_steps=N_eta=E.png): one row per sample,
               x_T ... x_0, columns labelled t=... (at most one per reverse step)
  recover      recover_t=100.png ...: rows = test images; columns = original, noised to t, denoised
               with each variance (recover_reference_t=...png with --recover-mode reference)
  interpolate  interpolate.png: rows = pairs of noises, columns = slerp weights 0..1 (DDIM, eta 0)
With --clip-x0 every name ends in _clip (sample_1_clip.png, ...).

Naming any of --what/--process/--recover/--interpolate makes only what is named; with none of
them, only the sample grids are made. Image i uses noise stream i of --seed: the same seed gives
the same images whatever --batch is (up to the rounding of batched matrix products: at most one
8-bit level in a few pixels).

Examples:
  cargo xtask sample                                  # 16x16 grids, both variances, DDPM 1000 steps
  cargo xtask sample --sampler ddim --steps 50 --eta 0 --grid 8x8
  cargo xtask-cuda sample --what all --checkpoint runs/anime64   # the CUDA build: on the GPU
  cargo xtask sample --recover --recover-mode both --data dataset/anime/processed")]
pub struct SampleArgs {
    /// Model file (.safetensors written by train/import-checkpoint, or a Lightning .ckpt), or a
    /// run folder holding model.safetensors [default: checkpoints/last.safetensors, else the
    /// newest runs/*/model.safetensors]
    #[arg(long, value_name = "PATH")]
    checkpoint: Option<PathBuf>,
    /// What to make, comma-separated
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    what: Vec<What>,
    /// Shorthand for --what process (combines with --what)
    #[arg(long)]
    process: bool,
    /// Shorthand for --what recover
    #[arg(long)]
    recover: bool,
    /// Shorthand for --what interpolate
    #[arg(long)]
    interpolate: bool,
    /// Sample grid size, COLSxROWS (cells of the image size, 2 px padding: 16x16 at 64 px is 1058x1058)
    #[arg(long, default_value = "16x16", value_name = "COLSxROWS")]
    grid: String,
    /// Reverse-process variance for DDPM: sigma^2 = beta (file suffix 0), beta-tilde (1), or both
    /// [default: both]
    #[arg(long, value_enum, value_name = "VARIANCE")]
    variance: Option<VarianceArg>,
    /// Reverse process: ddpm (all T steps) or ddim (--steps, --eta)
    #[arg(long, value_enum, default_value = "ddpm")]
    sampler: SamplerArg,
    /// DDIM steps, 1..=T [default: 50]; also the steps of --interpolate
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// DDIM eta in [0, 1]: 0 deterministic, 1 = DDPM with beta-tilde [default: 0]
    #[arg(long, value_name = "E", allow_negative_numbers = true)]
    eta: Option<f64>,
    /// Noise seed
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder
    #[arg(long, default_value = "gen", value_name = "DIR")]
    out: PathBuf,
    /// Also write each sample as its own PNG: <out>/individual/<beta|beta-tilde|ddim-...>/00000.png
    #[arg(long)]
    save_individual: bool,
    /// cpu, cuda or cuda:N [default: cuda if this binary has CUDA and a GPU is present, else cpu]
    #[arg(long)]
    device: Option<String>,
    /// Images per network evaluation (bounds memory) [default: 64 on CPU, 256 on GPU]
    #[arg(long, value_name = "B")]
    batch: Option<usize>,
    /// Use the raw weights even when the file has EMA weights
    #[arg(long)]
    no_ema: bool,
    /// Clip each step's predicted x_0 to [-1, 1] (the DDPM paper's code: clip_denoised); the
    /// reference does not. Keeps small or undertrained models' samples from saturating. Output
    /// names get a _clip suffix
    #[arg(long)]
    clip_x0: bool,
    /// Whether DDPM's last step (t = 0) adds noise
    #[arg(long, value_enum, default_value = "paper")]
    final_noise: FinalNoiseArg,
    /// Recover: noise levels t (1-based, noised with step index t-1), comma-separated
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000", value_name = "T,..", value_parser = crate::common::positive)]
    recover_t: Vec<usize>,
    /// Recover: how to denoise
    #[arg(long, value_enum, default_value = "sdedit")]
    recover_mode: RecoverModeArg,
    /// Recover: number of test images
    #[arg(long, default_value_t = DEFAULT_RECOVER_COUNT, value_name = "N")]
    recover_count: usize,
    /// Recover: packed dataset (a folder holding packed.safetensors, or the file); the test split
    /// is the reference's (seed 999, 2.5% val, 2.5% test)
    #[arg(long, default_value = "dataset/anime/processed", value_name = "PATH")]
    data: PathBuf,
    /// Process: samples (rows)
    #[arg(long, default_value_t = DEFAULT_PROCESS_ROWS, value_name = "N")]
    process_rows: usize,
    /// Process: snapshots per row, evenly spaced from x_T to x_0
    #[arg(long, default_value_t = DEFAULT_PROCESS_COLUMNS, value_name = "N")]
    process_columns: usize,
    /// Interpolation strip size, COLSxROWS (columns = slerp weights)
    #[arg(long, default_value = DEFAULT_INTERP_GRID, value_name = "COLSxROWS")]
    interp_grid: String,
}

// Defaults named once: `run` compares with them to warn about flags whose output is not made
// (the recover levels' default is clap's string, checked against this list by a test).
const DEFAULT_RECOVER_T: [usize; 3] = [100, 500, 1000];
const DEFAULT_RECOVER_COUNT: usize = 10;
const DEFAULT_PROCESS_ROWS: usize = 6;
const DEFAULT_PROCESS_COLUMNS: usize = 15;
const DEFAULT_INTERP_GRID: &str = "10x4";
/// Every image of a grid or strip is held until it is written: a bound on one run.
const MAX_IMAGES: usize = 100_000;

/// Parses `COLSxROWS`.
fn parse_grid(flag: &str, s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("bad {flag} '{s}': expected COLSxROWS with positive numbers, such as 16x16");
    let (c, r) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let c: usize = c.trim().parse().map_err(|_| bad())?;
    let r: usize = r.trim().parse().map_err(|_| bad())?;
    if c == 0 || r == 0 {
        return Err(bad());
    }
    if c.checked_mul(r).is_none_or(|n| n > MAX_IMAGES) {
        anyhow::bail!("{flag} '{s}' asks for too many images: at most 100,000 a run (250x200 gives FID's 50,000; for more, run again with another --seed)");
    }
    Ok((c, r))
}

/// The outputs to make.
fn outputs(a: &SampleArgs) -> Vec<What> {
    let mut w: Vec<What> = a.what.clone();
    if a.process {
        w.push(What::Process);
    }
    if a.recover {
        w.push(What::Recover);
    }
    if a.interpolate {
        w.push(What::Interpolate);
    }
    if w.is_empty() {
        w.push(What::Samples);
    }
    if w.contains(&What::All) {
        return vec![What::Samples, What::Process, What::Recover, What::Interpolate];
    }
    let mut out = Vec::new();
    for x in [What::Samples, What::Process, What::Recover, What::Interpolate] {
        if w.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// The sampler settings to run (one per variance for DDPM, one for DDIM).
fn kinds(a: &SampleArgs) -> Result<Vec<SamplerKind>> {
    let final_noise = match a.final_noise {
        FinalNoiseArg::Paper => FinalStepNoise::Paper,
        FinalNoiseArg::Reference => FinalStepNoise::Reference,
    };
    Ok(match a.sampler {
        SamplerArg::Ddpm => {
            ensure!(a.eta.is_none(), "--eta applies to --sampler ddim");
            let variances = match a.variance.unwrap_or(VarianceArg::Both) {
                VarianceArg::Beta => vec![Variance::Beta],
                VarianceArg::BetaTilde => vec![Variance::BetaTilde],
                VarianceArg::Both => vec![Variance::Beta, Variance::BetaTilde],
            };
            variances.into_iter().map(|variance| SamplerKind::Ddpm { variance, final_noise }).collect()
        }
        SamplerArg::Ddim => {
            if a.variance.is_some() {
                tracing::warn!("--variance applies to --sampler ddpm: ignored (DDIM's noise is set by --eta)");
            }
            if a.final_noise == FinalNoiseArg::Reference {
                tracing::warn!("--final-noise applies to --sampler ddpm: ignored (DDIM's last step is deterministic)");
            }
            // + 0.0 turns -0 into 0 (file names would read "eta=-0").
            let eta = a.eta.unwrap_or(0.0) + 0.0;
            ensure!((0.0..=1.0).contains(&eta), "--eta must be in [0, 1], got {eta}");
            vec![SamplerKind::Ddim { steps: a.steps.unwrap_or(50), eta }]
        }
    })
}

/// Column label of a sampler setting (fits a 64 px cell at scale 1 at least).
/// Deletes `NNNNN.png` files numbered `from` or above: a folder of individual samples is read
/// as one set (an FID folder), and an earlier run's extra images would silently join it.
/// Files of other names are the user's and stay.
fn remove_numbered_pngs_from(dir: &Path, from: usize) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".png") else { continue };
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if stem.len() == 5 && stem.bytes().all(|b| b.is_ascii_digit()) && stem.parse::<usize>().is_ok_and(|i| i >= from) {
            std::fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn short_label(kind: &SamplerKind) -> String {
    match kind {
        SamplerKind::Ddpm { variance: Variance::Beta, .. } => "beta".into(),
        SamplerKind::Ddpm { variance: Variance::BetaTilde, .. } => "beta-tilde".into(),
        SamplerKind::Ddim { steps, eta } => format!("ddim{steps} e{eta}"),
    }
}

/// `count` test-split images of the packed dataset as `[count, 3, S, S]` in [-1, 1].
fn test_images(data: &Path, count: usize, size: usize) -> Result<Tensor> {
    let is_file = data.is_file() || data.extension().is_some_and(|e| e == "safetensors");
    let file = if is_file { data.to_path_buf() } else { data.join(anime_data::PACKED_FILE) };
    ensure!(
        file.is_file(),
        "recover needs the packed dataset: {} not found (run `cargo xtask prepare-data`, or pass --data)",
        file.display()
    );
    let ds = anime_data::PackedDataset::load(&file).with_context(|| format!("loading {}", file.display()))?;
    ensure!(ds.size() == size, "{}: images are {}x{} but the model makes {size}x{size}", file.display(), ds.size(), ds.size());
    let split = anime_data::split_indices(
        ds.len(),
        anime_data::REFERENCE_SEED,
        anime_data::REFERENCE_VAL_FRAC,
        anime_data::REFERENCE_TEST_FRAC,
    )?;
    ensure!(
        split.test.len() >= count,
        "{}: the test split has {} images ({} in all), fewer than --recover-count {count} (lower it, or use a bigger dataset)",
        file.display(),
        split.test.len(),
        ds.len()
    );
    let idx = &split.test[..count];
    let mut data = Vec::with_capacity(count * 3 * size * size);
    for &i in idx {
        let px = ds.image_pixels(i); // HWC
        for c in 0..3 {
            data.extend((0..size * size).map(|p| px[p * 3 + c] as f32 / 127.5 - 1.0));
        }
    }
    info!("recover: {count} test images of {} (indices {:?})", file.display(), idx);
    Ok(Tensor::from_vec(data, (count, 3, size, size), &Device::Cpu)?)
}

fn save(img: &sampler::RgbImage, path: &Path) -> Result<()> {
    sampler::save_png(img, path)?;
    info!("wrote {} ({}x{})", path.display(), img.width(), img.height());
    Ok(())
}

pub fn run(mut a: SampleArgs) -> Result<()> {
    // Flags first: cheap errors before loading anything.
    let what = outputs(&a);
    // A t named twice would only write its file twice.
    let mut seen = std::collections::HashSet::new();
    a.recover_t.retain(|t| seen.insert(*t));
    let (cols, rows) = parse_grid("--grid", &a.grid)?;
    let (icols, irows) = parse_grid("--interp-grid", &a.interp_grid)?;
    let kinds = kinds(&a)?;
    if a.sampler == SamplerArg::Ddpm && a.steps.is_some() && !what.contains(&What::Interpolate) {
        bail!("--steps applies to --sampler ddim and to interpolation; DDPM always takes all T steps");
    }
    if a.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    if what.contains(&What::Recover) {
        ensure!(!a.recover_t.is_empty(), "--recover-t needs at least one t");
        ensure!(a.recover_count > 0, "--recover-count must be at least 1");
    }
    if what.contains(&What::Process) {
        ensure!(a.process_rows > 0 && a.process_columns >= 2, "--process-rows must be >= 1 and --process-columns >= 2");
        // Like --grid: every snapshot is held until the strip is written.
        ensure!(
            a.process_rows.checked_mul(a.process_columns).is_some_and(|n| n <= MAX_IMAGES),
            "--process-rows x --process-columns must be at most 100,000 images, got {} x {}",
            a.process_rows,
            a.process_columns
        );
    } else if a.process_rows != DEFAULT_PROCESS_ROWS || a.process_columns != DEFAULT_PROCESS_COLUMNS {
        tracing::warn!("--process-rows and --process-columns apply to --what process: ignored");
    }
    if !what.contains(&What::Recover) && (a.recover_mode != RecoverModeArg::Sdedit || a.recover_t != DEFAULT_RECOVER_T || a.recover_count != DEFAULT_RECOVER_COUNT) {
        tracing::warn!("--recover-t, --recover-count and --recover-mode apply to --what recover: ignored");
    }
    if !what.contains(&What::Interpolate) && a.interp_grid != DEFAULT_INTERP_GRID {
        tracing::warn!("--interp-grid applies to --what interpolate: ignored");
    }

    let device = crate::common::pick_device(a.device.as_deref(), crate::common::NoGpu::UseCpu)?;
    let path = sampler::resolve_checkpoint(a.checkpoint.as_deref(), Path::new("."))?;
    let model = sampler::load_model(&path, &device, !a.no_ema).with_context(|| format!("loading checkpoint {}", path.display()))?;
    let cfg = &model.config;
    info!(
        "model {} ({}x{} px, ch {}, ch_mult {:?}), {} weights{}, T = {}, device {}",
        path.display(),
        cfg.image_size,
        cfg.image_size,
        cfg.ch,
        cfg.ch_mult,
        if model.ema { "EMA" } else { "raw" },
        if model.has_ema && !model.ema { " (--no-ema; the file has EMA weights)" } else if !model.has_ema { " (the file has no EMA weights)" } else { "" },
        model.schedule.num_steps(),
        crate::common::device_name(&device),
    );
    let t_count = model.schedule.num_steps();
    for k in &kinds {
        sampler::validate_kind(&model.schedule, k)?;
    }
    let interp_steps = a.steps.unwrap_or(50);
    if what.contains(&What::Interpolate) {
        ensure!((1..=t_count).contains(&interp_steps), "--steps must be in 1..={t_count} (the model's T), got {interp_steps}");
    }
    if let Some(&bad) = a.recover_t.iter().find(|&&t| t > t_count) {
        if what.contains(&What::Recover) {
            bail!("--recover-t {bad} is beyond the model's T = {t_count}");
        }
    }
    // Load the recover images before spending time on samples.
    let originals = match what.contains(&What::Recover) {
        true => Some(test_images(&a.data, a.recover_count, cfg.image_size)?),
        false => None,
    };
    let batch = a.batch.unwrap_or_else(|| sampler::default_batch(&device));
    let mut s = Sampler::for_unet(&model.unet, &model.schedule).batch(batch).clip_x0(a.clip_x0);
    if a.clip_x0 {
        tracing::info!("predicted x_0 clipped to [-1, 1] at every step (--clip-x0)");
    }
    unet::weights::create_dir_all(&a.out).with_context(|| format!("cannot create --out {}", a.out.display()))?;
    // A read-only --out would otherwise fail only after all the sampling (hours for the 64 px model).
    unet::weights::check_writable(&a.out).with_context(|| format!("cannot write to --out {}", a.out.display()))?;
    let file = |name: String| a.out.join(clipped_name(&name, a.clip_x0));

    if what.contains(&What::Samples) {
        let n = cols * rows;
        for k in &kinds {
            let name = sampler::kind_name(k);
            info!(
                "sampling {n} image{} ({name}, {} network evaluations per batch of {})",
                if n == 1 { "" } else { "s" },
                sampler::reverse_steps(&model.schedule, k, t_count - 1)?.len(),
                batch.min(n)
            );
            s.set_progress(Progress::stderr(name.clone()));
            let x = s.sample(n, k, a.seed)?;
            let imgs = sampler::tensor_to_images(&x)?;
            save(&sampler::make_grid(&imgs, cols, 2), &file(sampler::sample_file_name(k)))?;
            if a.save_individual {
                let dir = a.out.join("individual").join(if a.clip_x0 { format!("{name}-clip") } else { name });
                for (i, img) in imgs.iter().enumerate() {
                    sampler::save_png(img, &dir.join(format!("{i:05}.png")))?;
                }
                let stale = remove_numbered_pngs_from(&dir, imgs.len())?;
                let stale = if stale > 0 { format!(" (and removed {stale} left from an earlier, larger run)") } else { String::new() };
                info!("wrote {} images to {}{stale}", imgs.len(), dir.display());
            }
        }
    }
    if what.contains(&What::Process) {
        for k in &kinds {
            let steps = sampler::reverse_steps(&model.schedule, k, t_count - 1)?.len();
            if a.process_columns > steps + 1 {
                info!("--process-columns {}: {} has {steps} steps, so {} columns (x_T and each step)", a.process_columns, sampler::kind_name(k), steps + 1);
            }
            s.set_progress(Progress::stderr(format!("process {}", sampler::kind_name(k))));
            let p = s.process(a.process_rows, k, a.seed, a.process_columns)?;
            save(&p.to_image()?, &file(sampler::process_file_name(k)))?;
        }
    }
    if let Some(originals) = &originals {
        let modes: Vec<RecoverMode> = match a.recover_mode {
            RecoverModeArg::Sdedit => vec![RecoverMode::Sdedit],
            RecoverModeArg::Reference => vec![RecoverMode::Reference],
            RecoverModeArg::Both => vec![RecoverMode::Sdedit, RecoverMode::Reference],
        };
        for &mode in &modes {
            for &t in &a.recover_t {
                s.set_progress(Progress::stderr(format!("recover t={t}")));
                let r = s.recover(originals, t, &kinds, mode, a.seed)?;
                let mut labels = vec!["original".to_string(), format!("t={t}")];
                labels.extend(kinds.iter().map(short_label));
                save(&r.to_image(Some(&labels))?, &file(sampler::recover_file_name(t, mode)))?;
            }
        }
    }
    if what.contains(&What::Interpolate) {
        s.set_progress(Progress::stderr("interpolate"));
        let x = s.interpolate(irows, icols, interp_steps, a.seed)?;
        save(&sampler::tensor_grid(&x, icols)?, &file("interpolate.png".into()))?;
    }
    Ok(())
}

/// `sample_1.png` -> `sample_1_clip.png` with --clip-x0, so that clipped and unclipped outputs
/// can share a folder; the reference's names without it.
fn clipped_name(name: &str, clip: bool) -> String {
    match (clip, name.strip_suffix(".png")) {
        (true, Some(stem)) => format!("{stem}_clip.png"),
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_named_constants() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sample: SampleArgs,
        }
        let a = <Cli as clap::Parser>::parse_from(["sample"]).sample;
        assert_eq!(a.recover_t, DEFAULT_RECOVER_T);
        assert_eq!((a.recover_count, a.process_rows, a.process_columns), (DEFAULT_RECOVER_COUNT, DEFAULT_PROCESS_ROWS, DEFAULT_PROCESS_COLUMNS));
        assert_eq!(a.interp_grid, DEFAULT_INTERP_GRID);
    }

    #[test]
    fn grid_flag() {
        assert_eq!(parse_grid("--grid", "16x16").unwrap(), (16, 16));
        assert_eq!(parse_grid("--grid", "10x4").unwrap(), (10, 4));
        for bad in ["16", "x4", "0x4", "4x", "axb", "4x4x4"] {
            let e = parse_grid("--grid", bad).unwrap_err().to_string();
            assert!(e.contains("COLSxROWS"), "{bad}: {e}");
        }
        assert_eq!(parse_grid("--grid", "250x400").unwrap(), (250, 400));
        for huge in ["100000x100000", "250x401", "18446744073709551615x2"] {
            let e = parse_grid("--grid", huge).unwrap_err().to_string();
            assert!(e.contains("too many images"), "{huge}: {e}");
        }
    }

    #[test]
    fn clipped_outputs_get_their_own_names() {
        assert_eq!(clipped_name("sample_ddim_steps=50_eta=1.png", true), "sample_ddim_steps=50_eta=1_clip.png");
        assert_eq!(clipped_name("sample_1.png", false), "sample_1.png");
    }
}
