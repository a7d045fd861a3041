//! `sampler`: everything a user does with a trained model — sample grids with either
//! posterior variance, DDIM, the diffusion-process strips, the recover experiment,
//! interpolation — and the image-grid helpers the trainer's previews reuse.
//!
//! It joins the `unet` network to the `diffusion` math; it never trains.

//!
//! Randomness: image `i` of a run seeded with `s` draws its x_T and every per-step noise from
//! its own stream (`diffusion::NoiseRng::with_stream(s, i)`, see [`noise`]), so a seed fixes the
//! images whatever the batch size, and the first k images of a larger run are the k images of
//! a smaller one.
//!
//! Entry points: [`Sampler`] (samples, process strips, recover, interpolation),
//! [`sample_grid`] (for benchmarks), [`generate`] (trainer previews), [`load_model`] /
//! [`resolve_checkpoint`] (model files), and the grid helpers in [`grid`].

pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
mod font;
pub mod grid;
pub mod noise;
pub mod progress;
pub mod sampling;

use candle_core::Tensor;
use diffusion::{NoisePredictor, NoiseRng, SamplerKind, Schedule};
use unet::{Mode, UNet};

pub use checkpoint::{load_model, resolve_checkpoint, schedule_for, LoadedModel};
pub use grid::{make_grid, save_png, tensor_grid, tensor_to_images, with_column_labels};
pub use image::RgbImage;
pub use noise::ImageStreams;
pub use progress::Progress;
pub use sampling::{
    default_batch, kind_name, output_tag, process_file_name, recover_file_name, sample_file_name, reverse_steps, sample_grid, validate_kind, ProcessStrip, RecoverMode, Recovered, Sampler,
};

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

/// A UNet in evaluation mode (dropout off) as a noise predictor. A model in another dtype than
/// the state (bf16 weights, f32 state) gets its input cast and gives its prediction back in the
/// state's dtype, as under `torch.autocast`: the chain of small updates keeps f32 precision.
pub struct EvalModel<'a>(pub &'a UNet);

impl NoisePredictor for EvalModel<'_> {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward_t(&x_t.to_dtype(self.0.dtype())?, t, Mode::Eval)?.to_dtype(x_t.dtype())
    }
}

/// Runs the reverse process from the given `x_T` (`[N, C, H, W]`), `batch` images at a time
/// (bounding memory), and returns x_0 in [-1, 1] (clamped) on the CPU.
///
/// One `u64` is drawn from `rng`; image i's per-step noise then comes from its own stream of
/// that seed, so `batch` does not change the result. `on_step(i, n)` follows step i of n
/// (0-based), for every batch.
pub fn generate(
    model: &UNet,
    schedule: &Schedule,
    x_t: &Tensor,
    kind: &SamplerKind,
    rng: &mut NoiseRng,
    batch: usize,
    on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let seed = rng.next_u64();
    Sampler::for_unet(model, schedule).batch(batch).sample_from(x_t, kind, seed, on_step)
}
