//! `sampler`: everything a user does with a trained model — sample grids with either
//! posterior variance, DDIM, the diffusion-process strips, the recover experiment,
//! interpolation — and the image-grid helpers the trainer's previews reuse.
//!
//! It joins the `unet` network to the `diffusion` math; it never trains.

pub mod grid;

use candle_core::{Device, Tensor};
use diffusion::{NoisePredictor, NoiseRng, SamplerKind, Schedule};
use unet::{Mode, UNet};

pub use grid::{make_grid, tensor_to_images};

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error(transparent)]
    Diffusion(#[from] diffusion::DiffusionError),
    #[error(transparent)]
    UNet(#[from] unet::UNetError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    #[error("{path}: {reason}")]
    Image { path: String, reason: String },
}

pub type Result<T> = std::result::Result<T, SamplerError>;

/// A UNet in evaluation mode (dropout off) as a noise predictor.
pub struct EvalModel<'a>(pub &'a UNet);

impl NoisePredictor for EvalModel<'_> {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward_t(x_t, t, Mode::Eval)
    }
}

/// Runs the reverse process from the given `x_T` (`[N, C, H, W]`), `batch` images at a time
/// (bounding memory), and returns x_0 in [-1, 1] (clamped) on the CPU.
pub fn generate(
    model: &UNet,
    schedule: &Schedule,
    x_t: &Tensor,
    kind: &SamplerKind,
    rng: &mut NoiseRng,
    batch: usize,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let n = x_t.dim(0)?;
    let batch = batch.max(1);
    let t_start = schedule.num_steps() - 1;
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let chunk = x_t.narrow(0, start, len)?;
        let x0 = diffusion::reverse_process(schedule, &EvalModel(model), &chunk, t_start, kind, rng, |i, total, _, _| on_step(i, total))?;
        outs.push(x0.clamp(-1f32, 1f32)?.to_device(&Device::Cpu)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}
