//! A training step's loss and gradients replayed from a CUDA graph: the forward pass, the loss,
//! the backward pass and the gradients' gathering (every micro-batch part, and the bf16 casts)
//! are captured once per batch shape and launched at every later step, so the host's per-op cost
//! (the H100 runs of stop 25 found the step host-bound: 106 ms of its 124 spent queueing, over a
//! thousand candle and cuDNN calls) is paid once. The optimizer, the gradient norm and the loss's
//! read stay plain calls: a few multi-tensor launches whose scalars change every step.
//!
//! Opt-in (`TRAIN_CUDA_GRAPH=1`, or [`crate::StepEngine::set_cuda_graph`]) until a GPU run has
//! measured it: nothing here has run on a GPU yet. `cargo xtask-cuda self-test --device cuda
//! --only cuda-graph` checks its steps against plain ones. Should a capture or a launch fail,
//! the engine says why ([`crate::StepEngine::cuda_graph_report`]) and makes plain steps from
//! then on.
//!
//! What changes from step to step lives in buffers of the graph's own, rewritten before each
//! launch: the images, the noise, the timesteps and their `q_sample` factors, and the dropout
//! seed, which the GroupNorm kernels read from device memory (`unet::Mode::TrainSeedAt`), since
//! a graph replays the kernel arguments it captured. The weights are read where they are: Adam
//! updates them in place. The capture itself is `unet::cuda_graph::capture`'s.

use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{CudaDevice, Tensor};

use crate::trainer::StepDraws;
use crate::Precision;

/// Whether new engines replay their steps from CUDA graphs (`TRAIN_CUDA_GRAPH=1`).
pub(crate) fn enabled_by_env() -> bool {
    std::env::var("TRAIN_CUDA_GRAPH").is_ok_and(|v| v == "1")
}

/// What a capture is valid for: the batch's shape, the micro-batch and the precision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Key {
    pub dims: Vec<usize>,
    pub micro: usize,
    pub precision: Precision,
}

/// The inputs of a captured step, in buffers of its own.
pub(crate) struct Inputs {
    pub x0: Tensor,
    pub noise: Tensor,
    pub t: Tensor,
    pub a: Tensor,
    pub s: Tensor,
    /// The dropout seed, a u64 as two u32 words (little-endian), read by the kernels.
    pub seed: Tensor,
}

fn seed_words(seed: u64, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    Tensor::new(&[seed as u32, (seed >> 32) as u32], dev)
}

/// A compact buffer of its own holding `t`'s values.
fn own_copy(t: &Tensor) -> candle_core::Result<Tensor> {
    let b = t.zeros_like()?;
    b.slice_set(&t.contiguous()?, 0, 0)?;
    Ok(b)
}

impl Inputs {
    pub fn new(x0: &Tensor, d: &StepDraws) -> candle_core::Result<Self> {
        Ok(Self {
            x0: own_copy(x0)?,
            noise: own_copy(&d.noise)?,
            t: own_copy(&d.t)?,
            a: own_copy(&d.a)?,
            s: own_copy(&d.s)?,
            seed: seed_words(d.seed, x0.device())?,
        })
    }

    /// This step's values into the buffers, queued on the stream the graph is launched on.
    fn load(&self, x0: &Tensor, d: &StepDraws) -> candle_core::Result<()> {
        self.x0.slice_set(&x0.contiguous()?, 0, 0)?;
        self.noise.slice_set(&d.noise.contiguous()?, 0, 0)?;
        self.t.slice_set(&d.t.contiguous()?, 0, 0)?;
        self.a.slice_set(&d.a.contiguous()?, 0, 0)?;
        self.s.slice_set(&d.s.contiguous()?, 0, 0)?;
        self.seed.slice_set(&seed_words(d.seed, x0.device())?, 0, 0)
    }

    pub fn seed_at(&self) -> candle_core::Result<u64> {
        unet::cuda_graph::device_address(&self.seed)
    }
}

/// One captured step. The fields drop in order: the outputs (graph memory, which may be freed
/// outside the graph once it has run) before the graph.
pub(crate) struct StepGraph {
    pub key: Key,
    pub inputs: Inputs,
    pub loss: Tensor,
    pub grads: Vec<Tensor>,
    pub graph: CudaGraph,
}

impl StepGraph {
    /// Loads this step's inputs and launches: the outputs are rewritten in place.
    pub fn replay(&self, x0: &Tensor, d: &StepDraws) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        self.inputs.load(x0, d)?;
        self.graph.launch().map_err(candle_core::Error::wrap)?;
        Ok((self.loss.clone(), self.grads.clone()))
    }
}

/// Captures kept at most: an epoch's full batches and its last, smaller one.
pub(crate) const MAX_CAPTURES: usize = 2;

/// The engine's graphs: its captures, and why it went back to plain steps.
#[derive(Default)]
pub(crate) struct GraphState {
    pub captured: Vec<StepGraph>,
    pub failure: Option<String>,
    pub launches: usize,
    pub captures: usize,
}

impl GraphState {
    /// Forgets the captures (the weights they read may have moved) and any failure.
    pub fn reset(&mut self) {
        self.captured.clear();
        self.failure = None;
    }

    /// Room for one more capture: the oldest goes, with the memory its graph kept.
    pub fn make_room(&mut self, dev: &CudaDevice) -> candle_core::Result<()> {
        if self.captured.len() >= MAX_CAPTURES {
            self.captured.remove(0);
            unet::cuda_graph::trim_graph_memory(dev)?;
        }
        Ok(())
    }

    /// Plain steps from now on, saying why; no error of the graphs' left recorded on `dev`, and
    /// their memory given back.
    pub fn fail(&mut self, why: String, dev: &CudaDevice) {
        tracing::warn!("training steps from a CUDA graph: {why}; going on with plain steps");
        self.failure = Some(why);
        self.captured.clear();
        let _ = dev.cuda_stream().context().check_err();
        let _ = unet::cuda_graph::trim_graph_memory(dev);
        let _ = dev.cuda_stream().context().check_err();
    }
}
