//! `trainer`: resumable DDPM training of the reference UNet.
//!
//! * [`RunConfig`] — the whole run in one TOML file (`configs/*.toml`), one struct per concern.
//! * [`Trainer`] — `Trainer::new(cfg, run_dir, device, opts)?.run(stop)`: epochs over the
//!   packed dataset, checkpoints ([`checkpoint`]), `metrics.jsonl`, `loss.png`, preview grids,
//!   TensorBoard event files ([`tensorboard`]). A resumed run ends bit for bit where an
//!   uninterrupted one would (on CPU): every random number comes from a seeded, saved stream.
//! * [`StepEngine`] — the model, optimizer and EMA, with [`StepEngine::train_step`]: one
//!   optimizer step on a given batch (what `cargo xtask bench` times).
//! * [`Adam`] — Adam/AdamW as `torch.optim.Adam`, whose moments are saved in checkpoints.

pub mod adam;
#[cfg(feature = "cuda")]
mod adam_cuda;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod metrics;
#[doc(hidden)]
pub mod multi_tensor;
pub mod plot;
pub mod preview;
#[cfg(feature = "cuda")]
mod step_graph;
pub mod tensorboard;
mod trainer;

use std::path::Path;

pub use adam::{Adam, AdamParams};
pub use config::{CheckpointConfig, DataConfig, LogConfig, Precision, RunConfig, TrainConfig};
pub use trainer::{
    read_tensors, resolve_config, CudaGraphReport, HostPhases, LaunchedStep, QueuedStep, StepCallback, StepEngine, StepMetrics, StepOutput, StepPipeline, StopReason, TrainOptions, TrainSummary,
    Trainer,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("config mismatch on resume: {0}")]
    ConfigMismatch(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    NonFinite(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Invalid(String),
    /// Testing aid: the run was abandoned without saving, as a `kill -9` would.
    #[doc(hidden)]
    #[error("simulated crash after step {0}")]
    SimulatedCrash(u64),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, #[source] source: std::io::Error },
    #[error(transparent)]
    UNet(#[from] unet::UNetError),
    #[error(transparent)]
    Diffusion(#[from] diffusion::DiffusionError),
    #[error(transparent)]
    Sampler(#[from] sampler::SamplerError),
    #[error(transparent)]
    AnimeData(#[from] anime_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { what, path: path.display().to_string(), source }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
