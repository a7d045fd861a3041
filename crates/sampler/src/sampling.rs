//! The sampling runs: sample grids, diffusion-process strips, the recover experiment and
//! noise interpolation, all batched (bounded memory) and seeded per image (see [`crate::noise`]).

use candle_core::{Device, Tensor};
use diffusion::{FinalStepNoise, NoisePredictor, NoiseRng, SamplerKind, Schedule, Variance};
use image::RgbImage;
use unet::UNet;

use crate::noise::ImageStreams;
use crate::{EvalModel, Progress, Result, SamplerError};

/// One reverse step: from 0-based step `t` to `t_prev` (`None`: to x_0).
pub type Step = (usize, Option<usize>);

/// The steps `kind` takes from `t_start` (0-based) down to x_0, as `(t, t_prev)` pairs.
/// DDPM visits every step; DDIM visits `ddim_timesteps` below `t_start`, starting at `t_start`.
/// Same sequence as `diffusion::reverse_process`.
pub fn reverse_steps(schedule: &Schedule, kind: &SamplerKind, t_start: usize) -> Result<Vec<Step>> {
    let t_count = schedule.num_steps();
    if t_start >= t_count {
        return Err(SamplerError::Invalid(format!("start step {t_start} is out of range 0..{t_count}")));
    }
    let ts: Vec<usize> = match kind {
        SamplerKind::Ddpm { .. } => (0..=t_start).rev().collect(),
        SamplerKind::Ddim { steps, .. } => {
            let mut ts: Vec<usize> = diffusion::ddim_timesteps(t_count, *steps)?.into_iter().filter(|&t| t <= t_start).collect();
            if ts.first() != Some(&t_start) {
                ts.insert(0, t_start);
            }
            ts
        }
    };
    Ok(ts.iter().enumerate().map(|(i, &t)| (t, ts.get(i + 1).copied())).collect())
}

/// Checks a sampler setting against the schedule (DDIM steps in 1..=T, eta in [0, 1]).
pub fn validate_kind(schedule: &Schedule, kind: &SamplerKind) -> Result<()> {
    if let SamplerKind::Ddim { steps, eta } = kind {
        let t = schedule.num_steps();
        if *steps == 0 || *steps > t {
            return Err(SamplerError::Invalid(format!("DDIM steps must be in 1..={t} (the schedule's T), got {steps}")));
        }
        if !(0.0..=1.0).contains(eta) {
            return Err(SamplerError::Invalid(format!("DDIM eta must be in [0, 1], got {eta}")));
        }
    }
    Ok(())
}

/// A short file-name tag: the reference's suffix for DDPM (`0` = beta, `1` = beta-tilde; with
/// noise at the last step, `0_final-noise`, so that it does not replace the default's file),
/// `ddim_steps=50_eta=0` for DDIM.
pub fn output_tag(kind: &SamplerKind) -> String {
    match kind {
        SamplerKind::Ddpm { variance, final_noise: FinalStepNoise::Reference } => format!("{}_final-noise", variance.index()),
        SamplerKind::Ddpm { variance, .. } => variance.index().to_string(),
        SamplerKind::Ddim { steps, eta } => format!("ddim_steps={steps}_eta={eta}"),
    }
}

/// A readable name: `beta`, `beta-tilde`, `ddim-steps50-eta0` (folders of `--save-individual`).
pub fn kind_name(kind: &SamplerKind) -> String {
    match kind {
        SamplerKind::Ddpm { variance, final_noise } => {
            let name = if *variance == Variance::Beta { "beta" } else { "beta-tilde" };
            if *final_noise == FinalStepNoise::Reference { format!("{name}-final-noise") } else { name.into() }
        }
        SamplerKind::Ddim { steps, eta } => format!("ddim-steps{steps}-eta{eta}"),
    }
}

/// `sample_0.png` / `sample_1.png` (DDPM, the reference's names) or `sample_ddim_steps=50_eta=0.png`.
pub fn sample_file_name(kind: &SamplerKind) -> String {
    format!("sample_{}.png", output_tag(kind))
}

/// `process_0.png` / `process_1.png` or `process_ddim_steps=50_eta=0.png`.
pub fn process_file_name(kind: &SamplerKind) -> String {
    format!("process_{}.png", output_tag(kind))
}

/// `recover_t=100.png` (SDEdit, the default) or `recover_reference_t=100.png` (the reference's
/// all-steps variant), so both can sit side by side.
pub fn recover_file_name(t: usize, mode: RecoverMode) -> String {
    match mode {
        RecoverMode::Sdedit => format!("recover_t={t}.png"),
        RecoverMode::Reference => format!("recover_reference_t={t}.png"),
    }
}

/// The noise level (paper convention, 1-based: x_T = T, x_0 = 0) of the state after a step.
fn level_after(step: &Step) -> usize {
    step.1.map_or(0, |p| p + 1)
}

/// How the recover experiment denoises an image noised to step t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoverMode {
    /// From step t down to 0 (SDEdit): small t gives the original back.
    #[default]
    Sdedit,
    /// As the reference did: all T reverse steps from the noised image, as if it were x_T.
    Reference,
}

/// The diffusion process of `rows` samples: `columns` snapshots each, from x_T to x_0.
pub struct ProcessStrip {
    /// `[rows * columns, C, H, W]` in [-1, 1], row-major (one row per sample).
    pub images: Tensor,
    /// Noise level of each column (paper convention: `T` for x_T, 0 for x_0).
    pub levels: Vec<usize>,
    pub rows: usize,
    pub columns: usize,
}

impl ProcessStrip {
    /// The strip as a grid (2 px padding) with `t=...` column labels on top.
    pub fn to_image(&self) -> Result<RgbImage> {
        let grid = crate::grid::tensor_grid(&self.images, self.columns)?;
        let labels: Vec<String> = self.levels.iter().map(|t| format!("t={t}")).collect();
        Ok(crate::grid::with_column_labels(&grid, &labels, self.images.dim(3)?, 2))
    }
}

/// The recover experiment for one t.
pub struct Recovered {
    /// Noise level t (1-based: the image was noised with the 0-based step t - 1; 0 = clean).
    pub t: usize,
    pub original: Tensor,
    pub noised: Tensor,
    /// One per sampler setting, same order as given.
    pub denoised: Vec<Tensor>,
}

impl Recovered {
    /// One row per image; columns: original, noised, then each denoised version. `labels` (one
    /// per column) are drawn on top when given.
    pub fn to_image(&self, labels: Option<&[String]>) -> Result<RgbImage> {
        let n = self.original.dim(0)?;
        let mut cols = vec![&self.original, &self.noised];
        cols.extend(self.denoised.iter());
        let per_col: Vec<Vec<RgbImage>> = cols.iter().map(|t| crate::tensor_to_images(t)).collect::<Result<_>>()?;
        let mut cells = Vec::with_capacity(n * cols.len());
        for i in 0..n {
            for c in &per_col {
                cells.push(c[i].clone());
            }
        }
        let grid = crate::make_grid(&cells, cols.len(), 2);
        Ok(match labels {
            Some(l) => crate::grid::with_column_labels(&grid, l, self.original.dim(3)?, 2),
            None => grid,
        })
    }
}

/// Runs a noise predictor over a schedule. Every method draws image `i`'s randomness from
/// stream `i` of its seed, so results do not depend on the batch size.
pub struct Sampler<'a> {
    model: Box<dyn NoisePredictor + 'a>,
    schedule: &'a Schedule,
    /// (C, H, W) of one image.
    shape: (usize, usize, usize),
    device: Device,
    batch: usize,
    progress: Progress,
    /// Clip each step's predicted x_0 to [-1, 1] (`Schedule::clip_eps`).
    clip_x0: bool,
    /// The steps the model was trained with, when known ([`Sampler::for_unet`]): a schedule of
    /// another length would index its time table wrongly.
    model_steps: Option<usize>,
}

/// The default batch for a device: 64 on CPU, 256 on a GPU.
pub fn default_batch(device: &Device) -> usize {
    if device.is_cpu() {
        64
    } else {
        256
    }
}

impl<'a> Sampler<'a> {
    /// Any noise predictor on `device` producing images of `shape` (C, H, W).
    pub fn new(model: impl NoisePredictor + 'a, schedule: &'a Schedule, shape: (usize, usize, usize), device: &Device) -> Self {
        Self { model: Box::new(model), schedule, shape, device: device.clone(), batch: default_batch(device), progress: Progress::hidden(), clip_x0: false, model_steps: None }
    }

    /// A UNet in evaluation mode, on the device its weights live on (on CUDA with
    /// `SAMPLER_CUDA_GRAPH=1`, its calls replayed from CUDA graphs: [`crate::cuda_graph`]).
    pub fn for_unet(model: &'a UNet, schedule: &'a Schedule) -> Self {
        let cfg = model.config();
        let device = model.time_table().device().clone();
        let shape = (cfg.image_channels, cfg.image_size, cfg.image_size);
        #[cfg(feature = "cuda")]
        if device.is_cuda() && crate::cuda_graph::enabled() {
            return Self { model_steps: Some(cfg.num_steps), ..Self::new(crate::cuda_graph::GraphedModel::new(model), schedule, shape, &device) };
        }
        Self { model_steps: Some(cfg.num_steps), ..Self::new(EvalModel(model), schedule, shape, &device) }
    }

    /// `kind` fits the schedule, and the schedule fits the model.
    fn validate(&self, kind: &SamplerKind) -> Result<()> {
        if self.dims().contains(&0) {
            return Err(SamplerError::Invalid(format!("the image shape (C, H, W) must be positive, got {:?}", self.shape)));
        }
        if let Some(m) = self.model_steps.filter(|&m| m != self.schedule.num_steps()) {
            return Err(SamplerError::Invalid(format!(
                "the schedule has {} steps but the model was trained with {m}",
                self.schedule.num_steps()
            )));
        }
        validate_kind(self.schedule, kind)
    }

    /// `x` is a batch of this sampler's images: `[N >= 1, C, H, W]`.
    fn check_images(&self, x: &Tensor, what: &str) -> Result<()> {
        match x.dims() {
            [n, c, h, w] if *n > 0 && [*c, *h, *w] == self.dims() => Ok(()),
            d => Err(SamplerError::Invalid(format!(
                "{what} must be [N >= 1, {}, {}, {}], got {d:?}",
                self.shape.0, self.shape.1, self.shape.2
            ))),
        }
    }

    /// Images per network evaluation (bounds memory); 0 is taken as 1.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Clip every step's predicted x_0 to [-1, 1], as the DDPM reference code's
    /// `clip_denoised`: off by default (the Lightning reference does not), it keeps a small or
    /// undertrained model's samples from drifting into saturated colours.
    pub fn clip_x0(mut self, on: bool) -> Self {
        self.clip_x0 = on;
        self
    }

    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    pub fn set_progress(&mut self, progress: Progress) {
        self.progress = progress;
    }

    pub fn schedule(&self) -> &Schedule {
        self.schedule
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn dims(&self) -> [usize; 3] {
        [self.shape.0, self.shape.1, self.shape.2]
    }

    fn chunks(&self, n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let b = self.batch;
        (0..n.div_ceil(b)).map(move |k| k * b..((k + 1) * b).min(n))
    }

    fn last_step(&self) -> usize {
        self.schedule.num_steps() - 1
    }

    /// The reverse process over one chunk; `observe(k, x)` sees the state after step k (1-based).
    fn run_chunk(
        &self,
        mut x: Tensor,
        steps: &[Step],
        kind: &SamplerKind,
        streams: &mut ImageStreams,
        mut observe: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let dims = x.dims()[1..].to_vec();
        for (i, &(t, t_prev)) in steps.iter().enumerate() {
            let tt = Tensor::full(t as u32, b, &self.device)?;
            let mut eps = self.model.predict_noise(&x, &tt)?;
            if self.clip_x0 {
                eps = self.schedule.clip_eps(&eps, &x, t)?;
            }
            x = match kind {
                SamplerKind::Ddpm { variance, final_noise } => {
                    let z = if t > 0 || *final_noise == FinalStepNoise::Reference { Some(streams.randn(&dims, &self.device)?) } else { None };
                    self.schedule.ddpm_step(&eps, &x, t, z.as_ref(), *variance, *final_noise)?
                }
                SamplerKind::Ddim { eta, .. } => {
                    let z = if *eta > 0.0 && t_prev.is_some() { Some(streams.randn(&dims, &self.device)?) } else { None };
                    self.schedule.ddim_step(&eps, &x, t, t_prev, *eta, z.as_ref())?
                }
            };
            // A trainable model (Var weights, e.g. the trainer's previews) records the op graph:
            // cut it at every step, or memory grows with every step of the chain.
            x = x.detach();
            self.progress.inc();
            observe(i + 1, &x)?;
        }
        Ok(x)
    }

    /// `n` samples from x_T ~ N(0, I) (image i's x_T and per-step noise from stream i of
    /// `seed`): `[n, C, H, W]` in [-1, 1] on the CPU.
    pub fn sample(&self, n: usize, kind: &SamplerKind, seed: u64) -> Result<Tensor> {
        self.validate(kind)?;
        let steps = reverse_steps(self.schedule, kind, self.last_step())?;
        self.progress.begin(n.div_ceil(self.batch) * steps.len());
        let mut outs = Vec::new();
        for r in self.chunks(n) {
            let mut streams = ImageStreams::new(seed, r);
            let x_t = streams.randn(&self.dims(), &self.device)?;
            let x0 = self.run_chunk(x_t, &steps, kind, &mut streams, |_, _| Ok(()))?;
            outs.push(x0.clamp(-1f32, 1f32)?.to_device(&Device::Cpu)?);
        }
        self.progress.finish();
        cat(outs)
    }

    /// Samples from the given x_T (`[N, C, H, W]`, any float dtype: the chain runs in f32 and
    /// returns f32); per-step noise of image i from stream i of `seed`. `on_step(i, n)` is called after step i (0-based) of n, for every batch.
    pub fn sample_from(&self, x_t: &Tensor, kind: &SamplerKind, seed: u64, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
        self.sample_from_step(x_t, self.last_step(), kind, seed, on_step)
    }

    /// [`Sampler::sample_from`] with `x_t` taken as the state at step `t_start` (0-based)
    /// rather than T-1: the last `t_start + 1` DDPM steps (the benchmark times 100 of 1000).
    pub fn sample_from_step(&self, x_t: &Tensor, t_start: usize, kind: &SamplerKind, seed: u64, mut on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
        self.validate(kind)?;
        self.check_images(x_t, "x_t")?;
        let n = x_t.dim(0)?;
        let steps = reverse_steps(self.schedule, kind, t_start)?;
        let total = steps.len();
        self.progress.begin(n.div_ceil(self.batch) * total);
        let mut outs = Vec::new();
        for r in self.chunks(n) {
            // f32 like the per-step noise it is added to (the model casts to its own dtype).
            let chunk = x_t.narrow(0, r.start, r.len())?.to_device(&self.device)?.to_dtype(candle_core::DType::F32)?;
            let mut streams = ImageStreams::new(seed, r);
            let x0 = self.run_chunk(chunk, &steps, kind, &mut streams, |i, _| {
                on_step(i - 1, total);
                Ok(())
            })?;
            outs.push(x0.clamp(-1f32, 1f32)?.to_device(&Device::Cpu)?);
        }
        self.progress.finish();
        cat(outs)
    }

    /// The diffusion process of `rows` samples at `columns` evenly spaced states from x_T to
    /// x_0 (fewer when the sampler takes fewer steps). Same seed → the same samples as
    /// [`Sampler::sample`]'s first `rows`.
    pub fn process(&self, rows: usize, kind: &SamplerKind, seed: u64, columns: usize) -> Result<ProcessStrip> {
        self.validate(kind)?;
        if columns < 2 || rows == 0 {
            return Err(SamplerError::Invalid(format!("a process strip needs at least 1 row and 2 columns, got {rows}x{columns}")));
        }
        let steps = reverse_steps(self.schedule, kind, self.last_step())?;
        let states = steps.len() + 1;
        let mut picks: Vec<usize> =
            (0..columns).map(|k| ((k * (states - 1)) as f64 / (columns - 1) as f64).round() as usize).collect();
        picks.dedup();
        let levels: Vec<usize> =
            picks.iter().map(|&k| if k == 0 { self.schedule.num_steps() } else { level_after(&steps[k - 1]) }).collect();
        self.progress.begin(rows.div_ceil(self.batch) * steps.len());
        // snaps[pick] = chunks of [b, C, H, W]
        let mut snaps: Vec<Vec<Tensor>> = vec![Vec::new(); picks.len()];
        for r in self.chunks(rows) {
            let mut streams = ImageStreams::new(seed, r);
            let x_t = streams.randn(&self.dims(), &self.device)?;
            let keep = |x: &Tensor| -> Result<Tensor> { Ok(x.clamp(-1f32, 1f32)?.to_device(&Device::Cpu)?) };
            if picks[0] == 0 {
                snaps[0].push(keep(&x_t)?);
            }
            self.run_chunk(x_t, &steps, kind, &mut streams, |k, x| {
                if let Ok(j) = picks.binary_search(&k) {
                    snaps[j].push(keep(x)?);
                }
                Ok(())
            })?;
        }
        self.progress.finish();
        let per_pick: Vec<Tensor> = snaps.into_iter().map(cat).collect::<Result<_>>()?;
        let stacked = Tensor::stack(&per_pick, 1)?; // [rows, picks, C, H, W]
        let [c, h, w] = self.dims();
        let images = stacked.reshape((rows * picks.len(), c, h, w))?;
        Ok(ProcessStrip { images, levels, rows, columns: picks.len() })
    }

    /// The recover experiment: each of `originals` (`[N, C, H, W]` in [-1, 1]) is noised to
    /// level `t` (1-based, with the 0-based step t - 1; `t = 0` leaves it clean) and denoised
    /// with each of `kinds`. `Sdedit` runs the reverse process from step t - 1 down to 0 (the
    /// right way); `Reference` runs all T steps, as the reference did.
    pub fn recover(&self, originals: &Tensor, t: usize, kinds: &[SamplerKind], mode: RecoverMode, seed: u64) -> Result<Recovered> {
        let t_count = self.schedule.num_steps();
        if t > t_count {
            return Err(SamplerError::Invalid(format!("recover t must be in 0..={t_count}, got {t}")));
        }
        self.check_images(originals, "recover images")?;
        let n = originals.dim(0)?;
        let originals = &originals.to_dtype(candle_core::DType::F32)?;
        let t_start = match mode {
            RecoverMode::Sdedit => t.checked_sub(1),
            RecoverMode::Reference => Some(t_count - 1),
        };
        let mut plans = Vec::new();
        for kind in kinds {
            self.validate(kind)?;
            plans.push(match t_start {
                Some(ts) => reverse_steps(self.schedule, kind, ts)?,
                None => Vec::new(),
            });
        }
        self.progress.begin(n.div_ceil(self.batch) * plans.iter().map(Vec::len).sum::<usize>());
        let mut noised_all = Vec::new();
        let mut denoised_all: Vec<Vec<Tensor>> = vec![Vec::new(); kinds.len()];
        for r in self.chunks(n) {
            let mut streams = ImageStreams::new(seed, r.clone());
            let x0 = originals.narrow(0, r.start, r.len())?.to_device(&self.device)?;
            let noised = match t {
                0 => x0,
                t => {
                    let z = streams.randn(&self.dims(), &self.device)?;
                    self.schedule.q_sample_at(&x0, t - 1, &z)?
                }
            };
            for (k, (kind, steps)) in kinds.iter().zip(&plans).enumerate() {
                // The same noise for every setting: only the sampler differs between columns.
                let mut s = streams.clone();
                let out = self.run_chunk(noised.clone(), steps, kind, &mut s, |_, _| Ok(()))?;
                denoised_all[k].push(out.clamp(-1f32, 1f32)?.to_device(&Device::Cpu)?);
            }
            noised_all.push(noised.clamp(-1f32, 1f32)?.to_device(&Device::Cpu)?);
        }
        self.progress.finish();
        Ok(Recovered {
            t,
            original: originals.to_device(&Device::Cpu)?.clamp(-1f32, 1f32)?,
            noised: cat(noised_all)?,
            denoised: denoised_all.into_iter().map(cat).collect::<Result<_>>()?,
        })
    }

    /// Interpolation between pairs of noises: row r goes from noise a_r (stream 2r of `seed`)
    /// to b_r (stream 2r + 1) along the great circle (`diffusion::slerp`) in `columns` steps,
    /// each decoded with deterministic DDIM (eta = 0, `ddim_steps` steps).
    /// Returns `[rows * columns, C, H, W]` in [-1, 1], row-major.
    pub fn interpolate(&self, rows: usize, columns: usize, ddim_steps: usize, seed: u64) -> Result<Tensor> {
        if columns < 2 || rows == 0 {
            return Err(SamplerError::Invalid(format!("interpolation needs at least 1 row and 2 columns, got {rows}x{columns}")));
        }
        let [c, h, w] = self.dims();
        let mut xs = Vec::with_capacity(rows * columns);
        for r in 0..rows {
            let a = NoiseRng::with_stream(seed, 2 * r as u64).randn((1, c, h, w), &Device::Cpu)?;
            let b = NoiseRng::with_stream(seed, 2 * r as u64 + 1).randn((1, c, h, w), &Device::Cpu)?;
            for j in 0..columns {
                xs.push(diffusion::slerp(&a, &b, j as f64 / (columns - 1) as f64)?.to_dtype(candle_core::DType::F32)?);
            }
        }
        let x_t = Tensor::cat(&xs, 0)?;
        self.sample_from(&x_t, &SamplerKind::Ddim { steps: ddim_steps, eta: 0.0 }, seed, |_, _| {})
    }
}

fn cat(parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.is_empty() {
        return Err(SamplerError::Invalid("nothing to sample (0 images)".into()));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// `n` samples from a UNet, `batch` at a time, in one call (`Sampler` for the other options).
/// `[n, C, H, W]` in [-1, 1] on the CPU; image i depends only on (`seed`, i).
pub fn sample_grid(model: &UNet, schedule: &Schedule, n: usize, kind: &SamplerKind, seed: u64, batch: usize, progress: &Progress) -> Result<Tensor> {
    Sampler::for_unet(model, schedule).batch(batch).progress(progress.clone()).sample(n, kind, seed)
}
