//! The sampler's network calls replayed from a CUDA graph: the forward pass is captured once per
//! input shape and launched for every later step, so the host's per-op cost (over a thousand
//! candle and cuDNN calls a pass; the H100 runs of stop 25 found the sampler host-bound, its host
//! queue time equal to its run time) is paid once instead of at every step.
//!
//! Opt-in (`SAMPLER_CUDA_GRAPH=1`) until a GPU run has measured it: nothing here has run on a
//! GPU yet. `cargo xtask-cuda self-test --device cuda --only cuda-graph` checks its samples
//! against the plain calls'. Should a capture fail (an operation that cannot be captured), the
//! predictor says why ([`GraphedModel::failure`]) and makes plain calls from then on.
//!
//! What a capture needs, and how it is met: the inputs live in buffers of the graph's own
//! (each call copies `x_t` and `t` into them before the launch); every kernel module, cuDNN
//! algorithm and cuBLAS workspace exists before the capture (one plain call first); candle's
//! uploads of shapes and strides come from its cache (`enable_cuda_graph_htod_cache`, filled by
//! that first call); the memory the pass allocates comes from the graph, which frees and
//! re-makes it at each launch (`AUTO_FREE_ON_LAUNCH`), so the output buffer keeps its address
//! and each call returns a copy of it. The capture itself is `unet::cuda_graph::capture`'s (shared
//! with the trainer's step): it launches the graph once, so that the output's memory exists
//! before anything could free it, and cleans up after a failed capture. A review checked this
//! against CUDA's capture and graph-memory rules, and candle's and cudarc's code paths.

use std::cell::{Cell, RefCell};

use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{DType, Device, Tensor};
use diffusion::NoisePredictor;

use crate::EvalModel;

/// Whether [`crate::Sampler::for_unet`] replays its network calls from CUDA graphs
/// (`SAMPLER_CUDA_GRAPH=1`).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SAMPLER_CUDA_GRAPH").is_ok_and(|v| v == "1"))
}

/// Captures kept at most: the full batch and a last, smaller one.
const MAX_CAPTURES: usize = 2;

/// One captured forward pass.
struct Captured {
    x: Tensor,
    t: Tensor,
    out: Tensor,
    graph: CudaGraph,
}

impl Captured {
    fn fits(&self, x: &Tensor, t: &Tensor) -> bool {
        self.x.dims() == x.dims() && self.x.dtype() == x.dtype() && self.t.dims() == t.dims() && self.t.dtype() == t.dtype()
    }
}

/// A UNet in evaluation mode whose calls on a CUDA device are replayed from CUDA graphs.
pub struct GraphedModel<'a> {
    plain: EvalModel<'a>,
    captured: RefCell<Vec<Captured>>,
    failure: RefCell<Option<String>>,
    launches: Cell<usize>,
}

impl<'a> GraphedModel<'a> {
    pub fn new(model: &'a unet::UNet) -> Self {
        Self { plain: EvalModel(model), captured: RefCell::new(Vec::new()), failure: RefCell::new(None), launches: Cell::new(0) }
    }

    /// Why the calls went back to plain ones, if they did.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Graph launches so far (one per network call served from a graph).
    pub fn launches(&self) -> usize {
        self.launches.get()
    }

    fn capture(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Captured> {
        let Device::Cuda(dev) = x_t.device() else { candle_core::bail!("CUDA graphs need a CUDA device") };
        // Buffers of the graph's own, made before the capture and holding only this call's
        // shapes (`copy` of a view would keep the whole buffer behind it).
        let x = x_t.zeros_like()?;
        x.slice_set(&x_t.contiguous()?, 0, 0)?;
        let t_buf = t.zeros_like()?;
        t_buf.slice_set(&t.contiguous()?, 0, 0)?;
        let t = t_buf;
        let _cache = dev.enable_cuda_graph_htod_cache();
        // Kernel modules, cuDNN's choices, cuBLAS's workspace and candle's parameter uploads,
        // none of which may happen while capturing.
        self.plain.predict_noise(&x, &t)?;
        x_t.device().synchronize()?;
        // Detached at once: with trainable weights the autograd links would keep every
        // activation alive inside the graph.
        let (out, graph) = unet::cuda_graph::capture(dev, || self.plain.predict_noise(&x, &t).map(|o| o.detach()))?;
        Ok(Captured { x, t, out, graph })
    }

    fn replay(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let mut captured = self.captured.borrow_mut();
        let i = match captured.iter().position(|c| c.fits(x_t, t)) {
            Some(i) => i,
            None => {
                if captured.len() == MAX_CAPTURES {
                    let oldest = captured.remove(0);
                    let Device::Cuda(dev) = x_t.device() else { candle_core::bail!("CUDA graphs need a CUDA device") };
                    drop(oldest);
                    unet::cuda_graph::trim_graph_memory(dev)?;
                }
                captured.push(self.capture(x_t, t)?);
                captured.len() - 1
            }
        };
        let c = &captured[i];
        // Queued on the same stream as the launch, so the graph reads this call's inputs.
        c.x.slice_set(x_t, 0, 0)?;
        c.t.slice_set(&t.contiguous()?, 0, 0)?;
        c.graph.launch().map_err(candle_core::Error::wrap)?;
        self.launches.set(self.launches.get() + 1);
        // The next launch rewrites the output buffer: the caller gets its own copy.
        c.out.copy()
    }
}

/// By reference too, so that a caller keeps the model for [`GraphedModel::launches`] and
/// [`GraphedModel::failure`] after sampling.
impl NoisePredictor for &GraphedModel<'_> {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        (**self).predict_noise(x_t, t)
    }
}

impl NoisePredictor for GraphedModel<'_> {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        if !x_t.device().is_cuda() || self.failure.borrow().is_some() || !matches!(x_t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return self.plain.predict_noise(x_t, t);
        }
        match self.replay(x_t, t) {
            Ok(eps) => Ok(eps),
            Err(e) => {
                // From now on, plain calls; this one too, with no error of the graphs' left
                // recorded for cudarc to return from it.
                *self.failure.borrow_mut() = Some(e.to_string());
                self.captured.borrow_mut().clear();
                if let Device::Cuda(d) = x_t.device() {
                    let _ = d.cuda_stream().context().check_err();
                    let _ = unet::cuda_graph::trim_graph_memory(d);
                    let _ = d.cuda_stream().context().check_err();
                }
                self.plain.predict_noise(x_t, t)
            }
        }
    }
}

/// The driver keeps a destroyed graph's memory until it is trimmed: a training run's preview
/// sampler would otherwise leave its graphs' memory beside the training step's.
impl Drop for GraphedModel<'_> {
    fn drop(&mut self) {
        let mut captured = self.captured.borrow_mut();
        let Some(Device::Cuda(dev)) = captured.first().map(|c| c.x.device().clone()) else { return };
        captured.clear();
        let _ = unet::cuda_graph::trim_graph_memory(&dev);
        let _ = dev.cuda_stream().context().check_err();
    }
}
