//! `unet`: the reference DDPM UNet (Hardswish, GroupNorm 32, attention at 16x16, frozen
//! sinusoidal time table), its configs and presets, its weight files, and the import of the
//! reference's PyTorch Lightning checkpoint.
//!
//! Parameter names are the reference's, exactly (e.g. `downblocks.3.net.weight`), so its
//! checkpoint loads by name with no mapping table. The crate knows nothing of diffusion: the
//! network maps `(x_t, t)` to predicted noise.

pub mod bmm;
pub mod config;
pub mod conv;
#[cfg(feature = "cudnn")]
pub mod conv_cudnn;
pub mod lightning;
pub mod model;
pub mod norm;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
#[cfg(feature = "cuda")]
pub mod cuda_ops;
pub mod int_div;
pub mod softmax;
pub mod upsample;
pub mod weights;
mod winograd;

pub use config::UNetConfig;
pub use model::{sinusoid_table, Intermediates, Mode, UNet, TIME_TABLE_KEY};
pub use weights::{expected_shapes, new_trainable, parameter_counts, ModelWeights};

/// A buffer of `len` floats (with room for `spare` more) for a kernel that writes every element
/// before anything reads it.
/// Not zeroing it saves a pass over each output: the memsets of zeroed allocations were 5-7%
/// of a CPU forward pass of the small model. Candle allocates its own outputs the same way.
#[allow(clippy::uninit_vec)] // deliberate, as candle's own `alloc_uninit`: see the SAFETY note
pub(crate) fn output_buffer(len: usize, spare: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + spare);
    // SAFETY: f32 has no invalid bit patterns, and every caller writes all `len` elements before
    // any is read (each call site says why).
    unsafe { v.set_len(len) };
    v
}

#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    #[error("unet config: {0}")]
    Config(String),
    #[error("checkpoint is missing tensor '{name}' (expected shape {expected:?}): it is not a checkpoint of this architecture/config")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("checkpoint tensor '{name}' has shape {found:?}, expected {expected:?}: it was trained with another config")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
