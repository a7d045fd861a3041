//! The training loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anime_data::{DeviceImages, PackedDataset, Split};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use diffusion::{NoiseRng, SamplerKind, Schedule};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{info, warn};
use unet::{Mode, ModelWeights, UNet};

use crate::adam::{clip_scale, global_norm, warmup_lr, Adam, AdamParams};
use crate::checkpoint::{self, PendingLoss, TrainState};
use crate::metrics::{MetricsLog, Record};
use crate::tensorboard::EventWriter;
use crate::{DataConfig, Precision, RunConfig, TrainError};

/// Stream of the training noise (flips, timesteps, noise, dropout seeds) under `train.seed`.
const TRAIN_STREAM: u64 = 1;
/// Stream of the validation timesteps and noise: the same every epoch.
const VAL_STREAM: u64 = 2;

/// The resolved config of a run: `config` (a file or preset name) if given, else the config of
/// the run's last checkpoint, else its saved `config.toml` (a run stopped before its first
/// checkpoint), else the reference; then the `key=value` overrides. The checkpoint comes before
/// `config.toml` because that file is written when a session starts: a session that failed at
/// once (`--lr 1e30`, diverged) would otherwise pass its override on to the next.
pub fn resolve_config(run_dir: &Path, config: Option<&str>, overrides: &[(String, String)]) -> Result<RunConfig, TrainError> {
    let saved = run_dir.join("config.toml");
    let mut cfg = match config {
        Some(spec) => RunConfig::from_name_or_path(spec)?,
        None => match checkpoint::latest_config(run_dir) {
            Some(c) => c,
            None if saved.exists() => RunConfig::load(&saved)?,
            None => RunConfig::reference(),
        },
    };
    for (k, v) in overrides {
        cfg.set(k, v)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Learning rate used (after warm-up).
    pub lr: f64,
}

/// A step's loss and gradients, queued ([`StepEngine::launch_step`]).
pub struct LaunchedStep {
    loss: Tensor,
    grads: Vec<Tensor>,
}

/// A step whose update is queued ([`StepEngine::queue_update`]), for [`StepEngine::settle`].
pub struct QueuedStep(Queued);

enum Queued {
    /// Checked on the host before the update was queued: the outcome.
    Host(Result<StepOutput, TrainError>),
    /// Behind the device's gate: read and checked by `settle`. `step`: the count before it.
    #[cfg(feature = "cuda")]
    Gated { lr: f64, step: u64 },
}

impl QueuedStep {
    /// Whether the step's loss is still to be read, its update queued behind the device's gate
    /// (else the host checked it first).
    pub fn gated(&self) -> bool {
        !matches!(self.0, Queued::Host(_))
    }
}

/// When [`Trainer::step`] queues the next step's forward and backward passes before reading
/// the current step's loss, so that the device goes on while the host reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPipeline {
    /// Never: each step waits for its loss before the next is queued (`TRAIN_PIPELINE=0`).
    Off,
    /// When the update was queued behind the device's gate ([`StepEngine::queue_update`]: CUDA
    /// with the multi-tensor optimizer). The default.
    Device,
    /// Always. Where the host checks each step before its update (the CPU), the next step is
    /// then computed before this one's outcome is returned: no gain, the same results; tests
    /// use it to check the order of things.
    Always,
}

impl StepPipeline {
    /// `Off` when `TRAIN_PIPELINE=0`, else `Device`.
    pub fn from_env() -> Self {
        match std::env::var("TRAIN_PIPELINE").as_deref() {
            Ok("0") => StepPipeline::Off,
            _ => StepPipeline::Device,
        }
    }
}

/// A non-finite loss or gradient norm: the step must not update anything.
fn check_finite(loss: f32, norm: f64, step: u64) -> Result<(), TrainError> {
    if !loss.is_finite() {
        return Err(TrainError::NonFinite(format!("loss is {loss} at step {}", step + 1)));
    }
    if !norm.is_finite() {
        return Err(TrainError::NonFinite(format!("gradient norm is {norm} at step {}", step + 1)));
    }
    Ok(())
}

/// The EMA decay of update `step` (counted from 0): early on the average follows the weights
/// closely.
fn ema_decay(decay: f64, step: u64) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

/// The model, its optimizer and EMA: everything a training step changes except the data
/// position and the noise stream.
pub struct StepEngine {
    pub cfg: RunConfig,
    pub model: UNet,
    pub varmap: VarMap,
    pub opt: Adam,
    /// EMA copies in the optimizer's (name-sorted) order, when EMA is on.
    pub ema: Option<Vec<Tensor>>,
    pub schedule: Schedule,
    device: Device,
    host: std::cell::Cell<HostPhases>,
    /// Whether [`StepEngine::step_gradients`] replays from CUDA graphs (CUDA builds and devices).
    cuda_graph: bool,
    pipeline: StepPipeline,
    gated_updates: u64,
    /// The device's gate of queued updates, made at the first ([`StepEngine::queue_update`]).
    #[cfg(feature = "cuda")]
    gate: Option<crate::adam_cuda::Gate>,
    /// Whether a step queued behind the gate is still to be settled.
    #[cfg(feature = "cuda")]
    gate_pending: bool,
    #[cfg(feature = "cuda")]
    graph: std::cell::RefCell<crate::step_graph::GraphState>,
}

/// How a step engine's CUDA graphs have served it ([`StepEngine::cuda_graph_report`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CudaGraphReport {
    /// Steps whose loss and gradients came from a graph (a capture's own launch included).
    pub launches: usize,
    /// Graphs captured (one per batch shape, micro-batch and precision in turn).
    pub captures: usize,
    /// Why the engine went back to plain steps, if it did.
    pub failure: Option<String>,
}

/// A step's draws, on the device: timesteps (u32 `[B]`), their `q_sample` factors (f32
/// `[B, 1, 1, 1]`), the noise, and the dropout seed.
pub(crate) struct StepDraws {
    pub t: Tensor,
    pub a: Tensor,
    pub s: Tensor,
    pub noise: Tensor,
    pub seed: u64,
}

/// Where a pass's dropout seed is: on the host, or in device memory (a replayed graph's).
#[derive(Debug, Clone, Copy)]
enum DropoutSeed {
    Host(u64),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    At(u64),
}

impl DropoutSeed {
    fn mode(self, first_image: u64) -> Mode {
        match self {
            DropoutSeed::Host(seed) => Mode::TrainPart { seed, first_image },
            DropoutSeed::At(seed_at) => Mode::TrainSeedAt { seed_at, first_image },
        }
    }
}

/// Host time (seconds) that [`StepEngine::loss_and_gradients`] and [`StepEngine::step_gradients`] have spent in each of their parts
/// since the engine was made. On a GPU the work is queued, not done, in that time, so this says
/// where a host-bound step's time goes; on the CPU it is the work itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostPhases {
    /// Timesteps, noise (drawn on the host) and the dropout seed.
    pub draws: f64,
    /// The bf16 copies of the weights (bf16 steps only).
    pub casts: f64,
    /// The forward pass and the loss.
    pub forward: f64,
    /// `backward()`: the graph walk and the gradients' ops.
    pub backward: f64,
    /// Taking the variables' gradients, dropping the graph, summing the parts.
    pub gather: f64,
    /// A step replayed from a CUDA graph: loading its inputs and the launch (all of the above
    /// but the draws, for such a step).
    pub replay: f64,
    /// Reading a step's loss and gradient norm back (`train_step`, `settle`): on a GPU, mostly
    /// the wait for the device.
    pub outcome: f64,
}

impl HostPhases {
    /// The change from `before` to `self`.
    pub fn since(&self, before: &HostPhases) -> HostPhases {
        HostPhases {
            draws: self.draws - before.draws,
            casts: self.casts - before.casts,
            forward: self.forward - before.forward,
            backward: self.backward - before.backward,
            gather: self.gather - before.gather,
            replay: self.replay - before.replay,
            outcome: self.outcome - before.outcome,
        }
    }
}

impl StepEngine {
    /// A freshly initialised model (seeded by `train.seed`) with zero optimizer state.
    pub fn new(cfg: &RunConfig, device: &Device) -> Result<Self, TrainError> {
        cfg.validate()?;
        if cfg.train.precision == Precision::Bf16 && !device.is_cuda() {
            // candle 0.11 has no CPU bf16 matmul or convolution.
            return Err(TrainError::Config("train.precision = \"bf16\" needs a CUDA device; use \"f32\" on the CPU".into()));
        }
        let (model, varmap) = unet::new_trainable(&cfg.unet, device, cfg.train.seed)?;
        let vars: Vec<(String, candle_core::Var)> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let t = &cfg.train;
        let params = AdamParams {
            lr: t.lr,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
            decoupled: t.decoupled_weight_decay,
        };
        let opt = Adam::new(vars, params)?;
        let ema = match t.ema() {
            // Detached: a copy of a variable would be a graph node, and each update below would
            // then chain onto the previous one, keeping every past EMA alive.
            Some(_) => Some(opt.vars().iter().map(|v| v.as_tensor().detach().copy()).collect::<candle_core::Result<Vec<_>>>()?),
            None => None,
        };
        let schedule = Schedule::new(&cfg.diffusion)?;
        #[cfg(feature = "cuda")]
        let cuda_graph = crate::step_graph::enabled_by_env();
        #[cfg(not(feature = "cuda"))]
        let cuda_graph = false;
        Ok(Self {
            cfg: cfg.clone(),
            model,
            varmap,
            opt,
            ema,
            schedule,
            device: device.clone(),
            host: Default::default(),
            cuda_graph,
            pipeline: StepPipeline::from_env(),
            gated_updates: 0,
            #[cfg(feature = "cuda")]
            gate: None,
            #[cfg(feature = "cuda")]
            gate_pending: false,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        })
    }

    /// Replays [`StepEngine::step_gradients`] from CUDA graphs, or not (the default comes from
    /// `TRAIN_CUDA_GRAPH=1`). Without CUDA (the build or the device) steps stay plain. Turning it
    /// on again forgets an earlier failure and capture.
    pub fn set_cuda_graph(&mut self, on: bool) {
        self.cuda_graph = on;
        #[cfg(feature = "cuda")]
        {
            self.graph.borrow_mut().reset();
        }
    }

    /// How the CUDA graphs have served this engine so far.
    pub fn cuda_graph_report(&self) -> CudaGraphReport {
        #[cfg(feature = "cuda")]
        {
            let g = self.graph.borrow();
            CudaGraphReport { launches: g.launches, captures: g.captures, failure: g.failure.clone() }
        }
        #[cfg(not(feature = "cuda"))]
        CudaGraphReport::default()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Host time spent so far in each part of [`Self::loss_and_gradients`] and
    /// [`Self::step_gradients`], and in reading the steps' outcomes.
    pub fn host_phases(&self) -> HostPhases {
        self.host.get()
    }

    /// Adds the time since `clock` to the part `part` picks.
    fn add_host_time(&self, clock: Instant, part: impl FnOnce(&mut HostPhases) -> &mut f64) {
        let mut host = self.host.get();
        *part(&mut host) += clock.elapsed().as_secs_f64();
        self.host.set(host);
    }

    /// One optimizer step on the batch `x0` (`[B, 3, S, S]` in [-1, 1]): draws the timesteps,
    /// the noise and the dropout seed from `rng` (in that order), computes the MSE loss on the
    /// predicted noise, back-propagates (in parts of `train.micro_batch_size` images, when set),
    /// clips if configured, updates with Adam and the EMA.
    /// Waits for the device (reads the loss), so it can be timed as is. The same as
    /// [`StepEngine::launch_step`], [`StepEngine::queue_update`] and [`StepEngine::settle`] in turn.
    pub fn train_step(&mut self, x0: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput, TrainError> {
        let launched = self.launch_step(x0, rng)?;
        let queued = self.queue_update(launched)?;
        self.settle(queued)
    }

    /// The first part of [`StepEngine::train_step`]: the draws, then the loss and gradients,
    /// queued on the device (not waited for). Nothing is updated until the step is passed to
    /// [`StepEngine::queue_update`]; an engine changed in between (weights loaded) must not be
    /// given it.
    pub fn launch_step(&self, x0: &Tensor, rng: &mut NoiseRng) -> Result<LaunchedStep, TrainError> {
        let d = self.draw(x0, rng)?;
        self.launch(x0, &d)
    }

    /// [`StepEngine::launch_step`] with its draws made.
    pub(crate) fn launch(&self, x0: &Tensor, d: &StepDraws) -> Result<LaunchedStep, TrainError> {
        let (loss, grads) = self.drawn_gradients(x0, d)?;
        Ok(LaunchedStep { loss, grads })
    }

    /// The second part: the optimizer step and the EMA. On CUDA (unless the pipeline is
    /// [`StepPipeline::Off`]) they are queued behind a gate the device computes from the loss and
    /// the gradient norm, which skips the update when either is not finite and applies the
    /// clipping scale, so the host does not wait: the next step can be queued before this one's
    /// loss is read by [`StepEngine::settle`] (what [`Trainer::step`] does), and the device does
    /// not wait for the host between steps. Elsewhere the host reads and checks them first, and
    /// `settle` hands the outcome back.
    pub fn queue_update(&mut self, launched: LaunchedStep) -> Result<QueuedStep, TrainError> {
        #[cfg(feature = "cuda")]
        if self.pipeline != StepPipeline::Off {
            if let Some(q) = self.queue_gated(&launched)? {
                return Ok(q);
            }
        }
        Ok(QueuedStep(Queued::Host(self.finish(launched))))
    }

    /// The last part: the step's outcome, waiting for its loss and gradient norm (and for nothing
    /// queued after them). A non-finite loss or norm is an error, and the step changed nothing
    /// (its update was skipped) and is not counted.
    pub fn settle(&mut self, queued: QueuedStep) -> Result<StepOutput, TrainError> {
        match queued.0 {
            Queued::Host(out) => out,
            #[cfg(feature = "cuda")]
            Queued::Gated { lr, step } => {
                self.gate_pending = false;
                self.gated_updates += 1;
                let gate = self.gate.as_ref().expect("a gated step has its engine's gate");
                let clock = Instant::now();
                let (loss, sumsq) = gate.read()?;
                self.add_host_time(clock, |h| &mut h.outcome);
                let norm = sumsq.sqrt();
                if let Err(e) = check_finite(loss, norm, step) {
                    // The gate kept the device from updating anything.
                    self.opt.uncount_step();
                    return Err(e);
                }
                Ok(StepOutput { loss, grad_norm: Some(norm), lr })
            }
        }
    }

    /// The update queued behind the device's gate, or `None` (nothing done) where the CUDA
    /// kernels cannot take it.
    #[cfg(feature = "cuda")]
    fn queue_gated(&mut self, l: &LaunchedStep) -> Result<Option<QueuedStep>, TrainError> {
        let Device::Cuda(dev) = &self.device else { return Ok(None) };
        if crate::adam_cuda::device_of(&l.loss).is_none() {
            return Ok(None);
        }
        if self.gate_pending {
            // The gate holds one step's values: a second would overwrite the first's.
            return Err(TrainError::Invalid("a queued step must be settled before the next is queued".into()));
        }
        // (A copy only for a gradient that is not contiguous: the kernels read flat buffers.)
        let grads = l.grads.iter().map(|g| g.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
        let Some(sumsq) = crate::adam_cuda::sum_of_squares(dev, &grads)? else { return Ok(None) };
        let mut gate = match self.gate.take() {
            Some(g) => g,
            None => crate::adam_cuda::Gate::new(dev)?,
        };
        let set = gate.set(dev, &sumsq, &l.loss, self.cfg.train.clip().unwrap_or(0.0));
        let step = self.opt.step_count();
        let lr = warmup_lr(self.cfg.train.lr, step, self.cfg.train.warmup_steps);
        let ema = match (self.ema.as_ref(), self.cfg.train.ema()) {
            (Some(e), Some(decay)) => Some((e.as_slice(), ema_decay(decay, step))),
            _ => None,
        };
        let gated = match set {
            Ok(true) => self.opt.step_gated(&grads, lr, &gate, ema),
            Ok(false) => Ok(false),
            Err(e) => Err(e.into()),
        };
        self.gate = Some(gate);
        let gated = gated?;
        self.gate_pending = gated;
        Ok(gated.then_some(QueuedStep(Queued::Gated { lr, step })))
    }

    /// The update checked on the host: waits for the loss and the gradient norm, then queues the
    /// optimizer step.
    fn finish(&mut self, LaunchedStep { loss: loss_v, grads: g }: LaunchedStep) -> Result<StepOutput, TrainError> {
        let step = self.opt.step_count();
        // One wait for the device a step, here: reading the loss before the backward pass would
        // add a second one, leaving a GPU idle while the backward pass is queued. Nothing has
        // been updated yet, so a non-finite loss is still caught before it does harm.
        let clock = Instant::now();
        let norm = global_norm(&g)?;
        let loss_v = loss_v.to_scalar::<f32>()?;
        self.add_host_time(clock, |h| &mut h.outcome);
        check_finite(loss_v, norm, step)?;
        let grad_scale = self.cfg.train.clip().map_or(1.0, |max| clip_scale(norm, max));
        let lr = warmup_lr(self.cfg.train.lr, step, self.cfg.train.warmup_steps);
        let ema = match (self.ema.as_mut(), self.cfg.train.ema()) {
            (Some(e), Some(decay)) => Some((e.as_mut_slice(), ema_decay(decay, step))),
            _ => None,
        };
        self.opt.step_full(&g, lr, grad_scale, ema)?;
        Ok(StepOutput { loss: loss_v, grad_norm: Some(norm), lr })
    }

    /// Steps on `batches` in turn, taken as [`Trainer::step`] takes them: each update queued,
    /// then (when the pipeline allows) the next step launched before the last one's outcome is
    /// read. `after` sees the engine and each outcome once it is read. Stops at the first error.
    pub fn train_steps<'a>(
        &mut self,
        batches: impl IntoIterator<Item = &'a Tensor>,
        rng: &mut NoiseRng,
        mut after: impl FnMut(&StepEngine, &StepOutput) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        let mut batches = batches.into_iter().fuse();
        let mut launched = match batches.next() {
            Some(x0) => Some(self.launch_step(x0, rng)?),
            None => return Ok(()),
        };
        while let Some(step) = launched.take() {
            let queued = self.queue_update(step)?;
            let ahead = if self.launches_ahead(&queued) { batches.next().map(|x0| self.launch_step(x0, rng)).transpose() } else { Ok(None) };
            // Settled even when the launch ahead failed: a queued step left unsettled would keep
            // the engine from queueing another.
            let out = self.settle(queued)?;
            launched = ahead?;
            after(self, &out)?;
            if launched.is_none() {
                launched = batches.next().map(|x0| self.launch_step(x0, rng)).transpose()?;
            }
        }
        Ok(())
    }

    /// Updates queued behind the device's gate and settled so far ([`StepEngine::queue_update`]).
    pub fn gated_updates(&self) -> u64 {
        self.gated_updates
    }

    /// Whether the next step is to be launched before `queued` is settled, by the pipeline.
    pub fn launches_ahead(&self, queued: &QueuedStep) -> bool {
        match self.pipeline {
            StepPipeline::Off => false,
            StepPipeline::Device => queued.gated(),
            StepPipeline::Always => true,
        }
    }

    /// When [`Trainer::step`] queues the next step before reading this one's loss.
    pub fn pipeline(&self) -> StepPipeline {
        self.pipeline
    }

    pub fn set_pipeline(&mut self, p: StepPipeline) {
        self.pipeline = p;
    }

    /// The batch's loss (an f32 scalar on the device, not yet read) and its gradients in the
    /// optimizer's order, drawing from `rng` as [`StepEngine::train_step`] does; changes nothing.
    /// With a micro-batch the parts' losses are weighted by their share of the batch, so the
    /// sums are the whole batch's mean loss and its gradient.
    pub fn loss_and_gradients(&self, x0: &Tensor, rng: &mut NoiseRng) -> Result<(Tensor, Vec<Tensor>), TrainError> {
        let d = self.draw(x0, rng)?;
        self.parts(x0, &d.noise, &d.t, &d.a, &d.s, DropoutSeed::Host(d.seed))
    }

    /// [`StepEngine::loss_and_gradients`], replayed from a CUDA graph when that is on
    /// ([`StepEngine::set_cuda_graph`]): the same draws and values, but the tensors are the
    /// graph's, rewritten by the next call, so they must be used before it (the optimizer step
    /// that follows does). Plain steps otherwise, and after a graph failed.
    pub fn step_gradients(&self, x0: &Tensor, rng: &mut NoiseRng) -> Result<(Tensor, Vec<Tensor>), TrainError> {
        let d = self.draw(x0, rng)?;
        self.drawn_gradients(x0, &d)
    }

    /// [`StepEngine::step_gradients`] with its draws made.
    fn drawn_gradients(&self, x0: &Tensor, d: &StepDraws) -> Result<(Tensor, Vec<Tensor>), TrainError> {
        #[cfg(feature = "cuda")]
        if self.cuda_graph {
            if let Device::Cuda(dev) = &self.device {
                if self.graph.borrow().failure.is_none() {
                    match self.graphed(dev, x0, d) {
                        Ok(out) => return Ok(out),
                        Err(e) => self.graph.borrow_mut().fail(e.to_string(), dev),
                    }
                }
            }
        }
        self.parts(x0, &d.noise, &d.t, &d.a, &d.s, DropoutSeed::Host(d.seed))
    }

    /// The step from this engine's graphs: captured first for a new batch shape, micro-batch or
    /// precision (the capture's own launch computes this step); the last two are kept, for an
    /// epoch's full batches and its smaller last one.
    #[cfg(feature = "cuda")]
    fn graphed(&self, dev: &candle_core::CudaDevice, x0: &Tensor, d: &StepDraws) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        use crate::step_graph::{Inputs, Key, StepGraph};
        let key = Key { dims: x0.dims().to_vec(), micro: self.cfg.train.micro_batch(x0.dim(0)?), precision: self.cfg.train.precision };
        let clock = Instant::now();
        let mut state = self.graph.borrow_mut();
        if let Some(c) = state.captured.iter().find(|c| c.key == key) {
            let out = c.replay(x0, d)?;
            state.launches += 1;
            drop(state);
            self.add_host_time(clock, |h| &mut h.replay);
            return Ok(out);
        }
        state.make_room(dev)?;
        let inputs = Inputs::new(x0, d)?;
        let seed = DropoutSeed::At(inputs.seed_at()?);
        let part = |i: &Inputs| self.parts(&i.x0, &i.noise, &i.t, &i.a, &i.s, seed).map_err(|e| candle_core::Error::Msg(e.to_string()));
        let _cache = dev.enable_cuda_graph_htod_cache();
        // Kernel modules, cuDNN's choices, cuBLAS's workspace and candle's shape uploads, none of
        // which may happen while capturing; nothing is updated by it.
        drop(part(&inputs)?);
        self.device.synchronize()?;
        // The loss detached: its graph links would keep the whole pass alive inside the graph.
        let ((loss, grads), graph) = unet::cuda_graph::capture(dev, || part(&inputs).map(|(l, g)| (l.detach(), g)))?;
        let c = StepGraph { key, inputs, loss, grads, graph };
        let out = (c.loss.clone(), c.grads.clone());
        state.captured.push(c);
        state.captures += 1;
        state.launches += 1;
        Ok(out)
    }

    /// Checks the batch, then draws the timesteps, the noise (on the host) and the dropout seed,
    /// in that order, for the whole batch (so the draws do not depend on the micro-batch), with
    /// the timesteps' `q_sample` factors, all on the device.
    pub(crate) fn draw(&self, x0: &Tensor, rng: &mut NoiseRng) -> Result<StepDraws, TrainError> {
        let u = &self.cfg.unet;
        let want = [u.image_channels, u.image_size, u.image_size];
        match x0.dims() {
            [b, c, h, w] if *b > 0 && [*c, *h, *w] == want && x0.dtype() == DType::F32 => {}
            d => {
                return Err(TrainError::Invalid(format!(
                    "a training batch must be f32 [B >= 1, {}, {}, {}], got {:?} {d:?}",
                    want[0], want[1], want[2], x0.dtype()
                )))
            }
        }
        let b = x0.dim(0)?;
        let clock = Instant::now();
        let (ts, t) = rng.timesteps(b, self.schedule.num_steps(), &self.device)?;
        let noise = rng.randn(x0.shape().clone(), &self.device)?;
        let seed = rng.next_u64();
        let (a, s) = self.schedule.q_coefficients(&ts)?;
        let a = diffusion::upload::tensor_from_slice(&a, (b, 1, 1, 1), &self.device)?;
        let s = diffusion::upload::tensor_from_slice(&s, (b, 1, 1, 1), &self.device)?;
        self.add_host_time(clock, |h| &mut h.draws);
        Ok(StepDraws { t, a, s, noise, seed })
    }

    /// The loss and gradients of the batch `x0` with its draws, in parts of
    /// `train.micro_batch_size` images when set.
    fn parts(&self, x0: &Tensor, noise: &Tensor, ts: &Tensor, a: &Tensor, s: &Tensor, seed: DropoutSeed) -> Result<(Tensor, Vec<Tensor>), TrainError> {
        let b = x0.dim(0)?;
        let mut host = self.host.get();
        let mut clock = Instant::now();
        // Adds the time since the last mark to one phase.
        let mut mark = |phase: &mut f64| {
            let now = Instant::now();
            *phase += (now - clock).as_secs_f64();
            clock = now;
        };
        let micro = self.cfg.train.micro_batch(b);
        // One set of bf16 casts for all the parts: each backward pass reaches the f32 variables
        // through them.
        let half = if self.cfg.train.precision == Precision::Bf16 { Some(self.bf16_view()?) } else { None };
        mark(&mut host.casts);
        let mut total: Option<(Tensor, Vec<Tensor>)> = None;
        for first in (0..b).step_by(micro) {
            let n = micro.min(b - first);
            let mode = seed.mode(first as u64);
            // (The whole range is the tensor itself: `narrow` then copies nothing.)
            let part = |t: &Tensor| t.narrow(0, first, n);
            let (x, e, t, a, s) = (part(x0)?, part(noise)?, part(ts)?, part(a)?, part(s)?);
            let loss = if let Some(half) = &half {
                let predict = move |x: &Tensor, t: &Tensor| half.forward_t(&x.to_dtype(DType::BF16)?, t, mode)?.to_dtype(DType::F32);
                self.schedule.loss_with(&predict, &x, &t, &a, &s, &e)?
            } else {
                let model = &self.model;
                let predict = move |x: &Tensor, t: &Tensor| model.forward_t(x, t, mode);
                self.schedule.loss_with(&predict, &x, &t, &a, &s, &e)?
            };
            let loss = if n == b { loss } else { loss.affine(n as f64 / b as f64, 0.0)? };
            mark(&mut host.forward);
            let grads = loss.backward()?;
            mark(&mut host.backward);
            let g = self.opt.gradients(&grads)?;
            // The graph goes before the sums grow and the next part's forward pass begins.
            drop(grads);
            let part_loss = loss.detach().to_dtype(DType::F32)?;
            drop(loss);
            let loss = part_loss;
            total = Some(match total {
                None => (loss, g),
                Some((l, sum)) => (l.add(&loss)?, sum.iter().zip(&g).map(|(a, b)| a.add(b)).collect::<candle_core::Result<_>>()?),
            });
            mark(&mut host.gather);
        }
        self.host.set(host);
        Ok(total.expect("a batch of at least one image has a first part"))
    }

    /// The model with bf16 casts of the f32 variables as its weights, for a mixed-precision step
    /// (autocast-style: f32 master weights, optimizer state, loss and EMA; bf16 compute). The
    /// casts are graph nodes, so the gradients come back to the f32 variables. Rebuilt every
    /// step: the casts must see the current values.
    fn bf16_view(&self) -> Result<UNet, TrainError> {
        let tensors = unet::weights::state_dict(&self.model, &self.varmap)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::BF16)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        Ok(UNet::new(candle_nn::VarBuilder::from_tensors(tensors, DType::BF16, &self.device), &self.cfg.unet)?)
    }

    /// The model file contents: trainable tensors, the time table, and `ema.*` copies.
    pub fn weights(&self, metadata: std::collections::BTreeMap<String, String>) -> Result<ModelWeights, TrainError> {
        let mut tensors = unet::weights::state_dict(&self.model, &self.varmap)?;
        if let Some(ema) = &self.ema {
            for (name, t) in self.opt.names().iter().zip(ema) {
                tensors.insert(format!("{}{name}", unet::weights::EMA_PREFIX), t.clone());
            }
        }
        Ok(ModelWeights { config: self.cfg.unet.clone(), tensors, metadata })
    }

    /// Sets the trainable variables (and the EMA, when on) from a model file.
    pub fn load_weights(&mut self, w: &ModelWeights) -> Result<(), TrainError> {
        // A captured step reads the variables where they are; they are set in place, but a new
        // capture costs one step and rules out any doubt.
        #[cfg(feature = "cuda")]
        {
            self.graph.borrow_mut().captured.clear();
        }
        if w.config != self.cfg.unet {
            return Err(TrainError::ConfigMismatch("the checkpoint's unet config differs from the run's".into()));
        }
        for (i, name) in self.opt.names().to_vec().iter().enumerate() {
            let t = w.tensors.get(name).ok_or_else(|| TrainError::Checkpoint(format!("model file has no '{name}'")))?;
            self.opt.vars()[i].set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
            if let Some(ema) = self.ema.as_mut() {
                let key = format!("{}{name}", unet::weights::EMA_PREFIX);
                let e = w.tensors.get(&key).ok_or_else(|| TrainError::Checkpoint(format!("model file has no '{key}'")))?;
                // A private copy: on CUDA the EMA is updated in place.
                ema[i] = e.to_dtype(DType::F32)?.to_device(&self.device)?.copy()?;
            }
        }
        Ok(())
    }

    /// A plain (non-trainable) copy of the network, from the EMA weights when `ema` and EMA is on.
    /// A snapshot for use now: on CUDA the optimizer updates the EMA in place, which a model
    /// kept across steps would see only in part (its stacked projections are copies), so build
    /// a new one after each step.
    pub fn sampling_model(&self, ema: bool) -> Result<UNet, TrainError> {
        let w = self.weights(Default::default())?;
        Ok(w.build(&self.device, ema && self.ema.is_some())?)
    }

    /// Mean loss over `images` (in batches of `batch`) with the network in eval mode, with
    /// timesteps and noise from a fresh `NoiseRng` stream: the same draws every call. The
    /// network sees `train.micro_batch_size` images at a time, when set: the forward pass of
    /// trainable weights keeps its activations as a training pass does. The draws are made per
    /// batch all the same, so the loss does not depend on the micro-batch.
    pub fn eval_loss(&self, data: &DeviceImages, images: &[usize], batch: usize, seed: u64) -> Result<f64, TrainError> {
        let mut rng = NoiseRng::with_stream(seed, VAL_STREAM);
        let model = &self.model;
        let predict = move |x: &Tensor, t: &Tensor| model.forward_t(&x.detach(), t, Mode::Eval).map(|y| y.detach());
        // Each part's loss stays on the device until the end: read one by one, every read would
        // wait for the device, which would then idle while the next part is queued.
        let mut losses = Vec::new();
        for chunk in images.chunks(batch.max(1)) {
            // Its ids copied as a training batch's are: a copy that waited for the device would
            // undo not reading each loss.
            let x0 = data.batch_with(chunk, None, |v: &[u32], n: usize| diffusion::upload::tensor_from_slice(v, n, &self.device))?;
            let (ts, _) = rng.timesteps(chunk.len(), self.schedule.num_steps(), &self.device)?;
            let noise = rng.randn(x0.shape().clone(), &self.device)?;
            let micro = self.cfg.train.micro_batch(chunk.len());
            for first in (0..chunk.len()).step_by(micro) {
                let n = micro.min(chunk.len() - first);
                let l = self.schedule.loss(&predict, &x0.narrow(0, first, n)?, &ts[first..first + n], &noise.narrow(0, first, n)?)?;
                losses.push((l.reshape(1)?, n));
            }
        }
        if losses.is_empty() {
            return Ok(0.0);
        }
        let parts = Tensor::cat(&losses.iter().map(|(l, _)| l).collect::<Vec<_>>(), 0)?.to_vec1::<f32>()?;
        // Summed in f64 in the parts' order, as when each was read at once.
        let total: f64 = parts.iter().zip(&losses).map(|(&l, &(_, n))| l as f64 * n as f64).sum();
        Ok(total / images.len().max(1) as f64)
    }
}

/// Reported to [`TrainOptions::on_step`] after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// Steps done, this one included.
    pub step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: Option<f64>,
}

/// A function called after every step.
pub type StepCallback = Box<dyn FnMut(&StepMetrics) + Send>;

/// How a run is driven (not part of the config: none of it changes the result).
#[derive(Default)]
pub struct TrainOptions {
    /// indicatif progress bars on stderr.
    pub progress: bool,
    /// Fail when the run folder has no checkpoint (`--resume`); without it a run folder that
    /// has checkpoints is resumed anyway, with a message.
    pub require_resume: bool,
    /// Called after every step (e.g. to set the stop flag, or to watch the loss).
    pub on_step: Option<StepCallback>,
    /// Testing aid: return right after this step without saving anything, as a `kill -9` would.
    /// Hidden from the docs: the crash tests need it, users do not.
    #[doc(hidden)]
    pub crash_after_step: Option<u64>,
}

/// Why [`Trainer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// All `train.epochs` done.
    Finished,
    MaxSteps,
    TimeLimit,
    /// The stop flag was set (Ctrl-C).
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub reason: StopReason,
    /// Steps done in total (all sessions).
    pub steps: u64,
    /// Epochs completed.
    pub epochs: u64,
    /// Steps done in this session.
    pub session_steps: u64,
    pub session_seconds: f64,
    pub images_per_s: f64,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    /// Step of the checkpoint this session resumed from.
    pub resumed_from: Option<u64>,
    pub last_checkpoint: Option<PathBuf>,
    /// Warnings (corrupt checkpoints skipped, settings changed on resume).
    pub warnings: Vec<String>,
}

/// A training run in a run folder.
pub struct Trainer {
    cfg: RunConfig,
    run_dir: PathBuf,
    engine: StepEngine,
    data: DeviceImages,
    split: Split,
    rng: NoiseRng,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
    order_epoch: Option<u64>,
    step: u64,
    elapsed_before: f64,
    metrics: MetricsLog,
    tb: Option<EventWriter>,
    opts: TrainOptions,
    last_saved: Option<(u64, PathBuf)>,
    resumed_from: Option<u64>,
    warnings: Vec<String>,
    fixed_noise: Option<Tensor>,
    pending_loss: PendingLoss,
    data_crc32: u32,
    /// The next step's batch and draws, made while the device ran the previous step.
    ahead: Option<Ahead>,
    _lock: checkpoint::RunLock,
}

/// A step's inputs, drawn ahead (`Trainer::step`).
struct Ahead {
    /// The generator before they were drawn: what a checkpoint saves while they wait.
    rng_before: NoiseRng,
    /// The epoch position after this step.
    end: usize,
    x0: Tensor,
    draws: StepDraws,
    /// Its loss and gradients, when queued ahead too.
    launched: Option<LaunchedStep>,
}

/// `path` itself when it is a file, else `path/packed.safetensors`.
fn packed_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(anime_data::PACKED_FILE)
    } else {
        path.to_path_buf()
    }
}

impl Trainer {
    /// Opens (or creates) the run folder: resumes from its last complete checkpoint when it has
    /// one (checking the config against it), else starts from seeded initial weights.
    pub fn new(cfg: RunConfig, run_dir: &Path, device: &Device, opts: TrainOptions) -> Result<Self, TrainError> {
        cfg.validate()?;
        if run_dir.exists() && !run_dir.is_dir() {
            return Err(TrainError::Invalid(format!("run folder {} is a file", run_dir.display())));
        }
        let packed = packed_path(Path::new(&cfg.data.path));
        if !packed.exists() {
            let size = cfg.unet.image_size;
            let size = if size == anime_data::DEFAULT_SIZE as usize { String::new() } else { format!(" --size {size}") };
            // prepare-data's default --raw is the Kaggle folder, which feeds only the default --out.
            let raw = if cfg.data.path == DataConfig::default().path { "" } else { " --raw <folder of images>" };
            return Err(TrainError::Data(format!(
                "no packed dataset at {}: run `cargo xtask prepare-data{raw} --out {}{size}` first (or pass --data)",
                packed.display(),
                cfg.data.path
            )));
        }
        let ds = PackedDataset::load(&packed)?;
        if ds.size() != cfg.unet.image_size {
            return Err(TrainError::Data(format!(
                "{} holds {}x{} images but unet.image_size is {}",
                packed.display(),
                ds.size(),
                ds.size(),
                cfg.unet.image_size
            )));
        }
        if cfg.unet.image_channels != 3 {
            return Err(TrainError::Data(format!(
                "{} holds RGB images (3 channels) but unet.image_channels is {}",
                packed.display(),
                cfg.unet.image_channels
            )));
        }
        let split = anime_data::split_indices(ds.len(), cfg.data.split_seed, cfg.data.val_frac, cfg.data.test_frac)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        if split.train.is_empty() {
            return Err(TrainError::Data(format!("{} has no training images", packed.display())));
        }
        let data = DeviceImages::new(&ds, device)?;
        let data_crc32 = ds.pixels_crc32();
        drop(ds);

        let mut engine = StepEngine::new(&cfg, device)?;
        let mut rng = NoiseRng::with_stream(cfg.train.seed, TRAIN_STREAM);
        let (mut epoch, mut position, mut step, mut elapsed_before) = (0, 0, 0, 0.0);
        let mut warnings = Vec::new();
        if cfg.train.batch_size > split.train.len() {
            let w = format!(
                "train.batch_size {} is more than the {} training images: every step is one batch of all of them",
                cfg.train.batch_size,
                split.train.len()
            );
            warn!("{w}");
            warnings.push(w);
        }
        let mut resumed_from = None;
        let mut last_saved = None;
        let mut pending_loss = PendingLoss::default();
        if checkpoint::list(run_dir).is_empty() {
            if opts.require_resume {
                return Err(TrainError::Invalid(format!("--resume: {} has no checkpoint to resume from", run_dir.display())));
            }
            if run_dir.join(checkpoint::MODEL_FILE).exists() {
                // A trained model without its checkpoints (deleted, or copied without them): a
                // new run would overwrite it and its logs.
                return Err(TrainError::Checkpoint(format!(
                    "{} holds a {} but no checkpoint to resume from: not starting a new run over it (use another --run, or move it away)",
                    run_dir.display(),
                    checkpoint::MODEL_FILE
                )));
            }
        }
        // Before reading checkpoints: resuming sets broken ones aside.
        let lock = checkpoint::RunLock::acquire(run_dir)?;
        // Now, not at the first save an epoch later: a file in the way would cost that epoch.
        let ckpts = run_dir.join(checkpoint::CHECKPOINTS_DIR);
        unet::weights::create_dir_all(&ckpts).map_err(|e| TrainError::io("cannot create", &ckpts, e))?;
        if let Some(w) = &lock.unguarded {
            warn!("{w}");
            warnings.push(w.clone());
        }
        match checkpoint::load_latest(run_dir)? {
            Some((ck, skipped)) => {
                let st = &ck.state;
                for w in cfg.check_resume(&st.config, &ck.dir.join(checkpoint::STATE_FILE))? {
                    warn!("{w}");
                    warnings.push(w);
                }
                if st.train_images != split.train.len() {
                    return Err(TrainError::ConfigMismatch(format!(
                        "the run was trained on {} training images but {} has {}: same data needed to resume",
                        st.train_images,
                        packed.display(),
                        split.train.len()
                    )));
                }
                if st.data_crc32.is_some_and(|c| c != data_crc32) {
                    // Allowed (the data may have been prepared again), but no longer the run an
                    // uninterrupted one would have been, as for a change of lr.
                    let w = format!(
                        "{} holds other images than the run was trained on (pixel checksum {data_crc32:08x}, was {:08x}): the run goes on with them",
                        packed.display(),
                        st.data_crc32.unwrap_or_default()
                    );
                    warn!("{w}");
                    warnings.push(w);
                }
                engine.load_weights(&ck.model)?;
                engine.opt.load_state(&ck.optimizer, st.step)?;
                // Resuming for sure now: the broken newer ones go out of the way.
                let fell_back = !skipped.is_empty();
                for (dir, w) in skipped {
                    let to = checkpoint::set_aside(&dir)?;
                    warn!("moved {} to {}", dir.display(), to.display());
                    warnings.push(format!("{w} (moved to {})", to.display()));
                }
                // After a fall-back the run's model is expected to be a newer one: no news. A
                // failure (a full disk) must not keep the run from starting: the next checkpoint
                // writes the model again.
                let model = run_dir.join(checkpoint::MODEL_FILE);
                let existed = model.exists();
                let w = match checkpoint::refresh_run_model(run_dir, &ck) {
                    Ok(true) if !fell_back && !existed => Some(format!("{} was missing: written again from {}", model.display(), ck.dir.display())),
                    Ok(true) if !fell_back => Some(format!("{} was not the model of {}: replaced by it", model.display(), ck.dir.display())),
                    Ok(_) => None,
                    Err(e) => Some(format!("{} is not the model of {} and could not be replaced ({e})", model.display(), ck.dir.display())),
                };
                if let Some(w) = w {
                    warn!("{w}");
                    warnings.push(w);
                }
                rng = NoiseRng::from_state(&st.rng)?;
                (epoch, position, step, elapsed_before) = (st.epoch, st.position, st.step, st.elapsed_s);
                pending_loss = st.pending_loss;
                info!(
                    "resuming {} from {} (step {step}; {epoch} epoch{} complete, {position} image{} into the next)",
                    run_dir.display(),
                    ck.dir.display(),
                    if epoch == 1 { "" } else { "s" },
                    if position == 1 { "" } else { "s" },
                );
                resumed_from = Some(step);
                last_saved = Some((step, ck.dir.clone()));
            }
            None => {
                let (total, trainable) = unet::parameter_counts(&cfg.unet)?;
                info!(
                    "new run in {}: {} training / {} validation images, UNet {trainable} trainable parameters ({total} with the time table)",
                    run_dir.display(),
                    split.train.len(),
                    split.val.len()
                );
            }
        }
        let micro = cfg.train.micro_batch(cfg.train.batch_size);
        if micro < cfg.train.batch_size {
            info!("gradient accumulation: each batch of {} in {} parts of at most {micro} images", cfg.train.batch_size, cfg.train.batch_size.div_ceil(micro));
        }
        unet::weights::write_atomic(&run_dir.join("config.toml"), cfg.to_toml_string().as_bytes())?;
        let resume_epoch = epoch;
        let metrics = MetricsLog::open(run_dir, |r| {
            r.step < step || (r.step == step && (r.kind == "step" || r.epoch < resume_epoch))
        })?;
        let tb = if cfg.log.tensorboard { Some(EventWriter::create(&run_dir.join("tb"), Some(step))?) } else { None };
        Ok(Self {
            cfg,
            run_dir: run_dir.to_path_buf(),
            engine,
            data,
            split,
            rng,
            epoch,
            position,
            order: Vec::new(),
            order_epoch: None,
            step,
            elapsed_before,
            metrics,
            tb,
            opts,
            last_saved,
            resumed_from,
            warnings,
            fixed_noise: None,
            pending_loss,
            data_crc32,
            ahead: None,
            _lock: lock,
        })
    }

    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }
    /// The engine, to read. Its weights are changed through [`Trainer::engine_mut`] only (not
    /// `Var::set` from here): that drops the step queued ahead, computed from them.
    pub fn engine(&self) -> &StepEngine {
        &self.engine
    }
    pub fn engine_mut(&mut self) -> &mut StepEngine {
        // A step queued ahead was computed from the engine as it is now.
        if let Some(a) = self.ahead.as_mut() {
            a.launched = None;
        }
        &mut self.engine
    }
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
    /// The step the run resumed from; `None` for a new run.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }
    /// Steps done so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn split(&self) -> &Split {
        &self.split
    }
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
    /// The step and folder of the newest checkpoint this run has (written or resumed from).
    pub fn last_checkpoint(&self) -> Option<(u64, &Path)> {
        self.last_saved.as_ref().map(|(s, d)| (*s, d.as_path()))
    }

    /// A step's error, with what a diverged run should do next.
    fn diverged(&self, e: TrainError) -> TrainError {
        match e {
            TrainError::NonFinite(m) => TrainError::NonFinite(format!(
                "{m} (epoch {}): training diverged and stopped without saving; {}. Lower train.lr or set train.grad_clip",
                self.epoch + 1,
                match &self.last_saved {
                    Some((s, d)) => format!("the last good checkpoint (step {s}) is kept in {}", d.display()),
                    None => "no checkpoint had been written yet".into(),
                }
            )),
            other => other,
        }
    }

    fn ensure_order(&mut self) {
        if self.order_epoch != Some(self.epoch) {
            self.order = anime_data::epoch_order(&self.split.train, self.cfg.train.seed, self.epoch);
            self.order_epoch = Some(self.epoch);
        }
    }

    fn steps_per_epoch(&self) -> u64 {
        self.split.train.len().div_ceil(self.cfg.train.batch_size) as u64
    }

    /// One optimizer step on the next batch of the epoch order (the last batch of an epoch may be
    /// smaller). Does not cross into the next epoch: call [`Trainer::end_epoch`] when
    /// [`Trainer::epoch_done`]. This is what `run` does per step, minus logging and checkpoints.
    ///
    /// While the device runs the step, the host draws the next one's batch and noise (within the
    /// epoch): on a GPU the device then never waits for them, and they come from the same
    /// stream in the same order as when drawn at the start of their own step, so the run is the
    /// same to the bit; a checkpoint saves the generator from before them. When the engine's
    /// update is gated on the device ([`StepPipeline`]), the next step's forward and backward
    /// passes are queued too, before this step's loss is read: the device then goes from one
    /// step to the next without waiting for the host.
    pub fn step(&mut self) -> Result<StepOutput, TrainError> {
        self.ensure_order();
        if self.epoch_done() {
            return Err(TrainError::Invalid("the epoch is over: call end_epoch first".into()));
        }
        let mut ahead = match self.ahead.take() {
            Some(a) => a,
            None => self.inputs(self.position)?,
        };
        let end = ahead.end;
        let launched = match ahead.launched.take() {
            Some(l) => l,
            None => self.engine.launch(&ahead.x0, &ahead.draws)?,
        };
        drop(ahead);
        if end < self.order.len() {
            // Before the update is queued: where the host checks the step first, it waits for
            // the device there. On an error, drawn again (and the error reported) at the next step.
            self.ahead = self.inputs(end).ok();
        }
        let queued = self.engine.queue_update(launched).map_err(|e| self.diverged(e))?;
        if self.engine.launches_ahead(&queued) {
            if let Some(a) = self.ahead.as_mut() {
                // Queued behind this step's update, so from the weights it makes (or, if its
                // gate skips it, the weights as they are); on an error, launched again at the
                // next step.
                a.launched = self.engine.launch(&a.x0, &a.draws).ok();
            }
        }
        let out = self.engine.settle(queued).map_err(|e| self.diverged(e))?;
        self.position = end;
        self.step += 1;
        Ok(out)
    }

    /// The batch starting at `start` of the epoch order (flips drawn first, when on), and its
    /// step's draws, from `self.rng`; on an error the generator is left as it was.
    fn inputs(&mut self, start: usize) -> Result<Ahead, TrainError> {
        let rng_before = self.rng.clone();
        let end = (start + self.cfg.train.batch_size).min(self.order.len());
        let drawn = (|| {
            let idx = &self.order[start..end];
            let flips: Option<Vec<bool>> = if self.cfg.data.hflip {
                Some((0..idx.len()).map(|_| self.rng.bernoulli(0.5)).collect::<Result<_, _>>()?)
            } else {
                None
            };
            let device = self.data.device().clone();
            let upload = |values: &[u32], len: usize| diffusion::upload::tensor_from_slice(values, len, &device);
            let x0 = self.data.batch_with(idx, flips.as_deref(), upload)?;
            let draws = self.engine.draw(&x0, &mut self.rng)?;
            Ok::<_, TrainError>((x0, draws))
        })();
        match drawn {
            Ok((x0, draws)) => Ok(Ahead { rng_before, end, x0, draws, launched: None }),
            Err(e) => {
                self.rng = rng_before;
                Err(e)
            }
        }
    }

    /// The generator as a checkpoint must save it: before any step drawn ahead.
    fn rng_for_checkpoint(&self) -> &NoiseRng {
        self.ahead.as_ref().map_or(&self.rng, |a| &a.rng_before)
    }

    pub fn epoch_done(&self) -> bool {
        self.order_epoch == Some(self.epoch) && self.position >= self.order.len()
    }

    /// Moves to the next epoch.
    pub fn end_epoch(&mut self) {
        // Called early, it drops what was drawn ahead, and the generator goes back to before it.
        if let Some(a) = self.ahead.take() {
            self.rng = a.rng_before;
        }
        self.epoch += 1;
        self.position = 0;
    }

    fn state(&self, reason: &str, session_s: f64) -> TrainState {
        TrainState {
            format: checkpoint::STATE_FORMAT.into(),
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            rng: self.rng_for_checkpoint().state(),
            train_images: self.split.train.len(),
            elapsed_s: self.elapsed_before + session_s,
            reason: reason.into(),
            saved_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            config: self.cfg.clone(),
            files: Vec::new(),
            pending_loss: self.pending_loss,
            data_crc32: Some(self.data_crc32),
        }
    }

    /// Writes a checkpoint of the current state (nothing when this step is already saved).
    pub fn save_checkpoint(&mut self, reason: &str, session_s: f64) -> Result<PathBuf, TrainError> {
        if let Some((s, d)) = &self.last_saved {
            if *s == self.step && d.exists() {
                return Ok(d.clone());
            }
        }
        let meta = checkpoint::model_metadata(&self.cfg, self.step, self.epoch);
        let weights = self.engine.weights(meta)?;
        let opt = self.engine.opt.state_tensors()?;
        let dir = checkpoint::save(&self.run_dir, self.state(reason, session_s), &weights, &opt, self.cfg.checkpoint.keep_last)?;
        self.last_saved = Some((self.step, dir.clone()));
        Ok(dir)
    }

    /// A grid of `count` samples (DDIM, `steps` steps, eta 0; x_0 clipped when `log.sample_clip`) from
    /// the fixed noise of `seed`.
    pub fn sample_grid(&self, count: usize, steps: usize, seed: u64, ema: bool) -> Result<image::RgbImage, TrainError> {
        if count == 0 {
            return Err(TrainError::Invalid("nothing to sample (0 images)".into()));
        }
        let s = self.cfg.unet.image_size;
        let noise = NoiseRng::new(seed).randn((count, self.cfg.unet.image_channels, s, s), self.engine.device())?;
        self.sample_grid_from(&noise, steps, ema)
    }

    fn sample_grid_from(&self, noise: &Tensor, steps: usize, ema: bool) -> Result<image::RgbImage, TrainError> {
        let model = self.engine.sampling_model(ema)?;
        let batch = self.cfg.train.batch_size.max(16);
        let x0 = if self.cfg.log.sample_clip {
            crate::preview::ddim_clipped(&model, &self.engine.schedule, noise, steps, batch)?
        } else {
            let kind = SamplerKind::Ddim { steps, eta: 0.0 };
            let mut rng = NoiseRng::new(0);
            sampler::generate(&model, &self.engine.schedule, noise, &kind, &mut rng, batch, |_, _| {})?
        };
        let imgs = sampler::tensor_to_images(&x0)?;
        let ncol = (imgs.len() as f64).sqrt().ceil() as usize;
        Ok(sampler::make_grid(&imgs, ncol, 2))
    }

    /// The preview grid of the fixed noise, where it was saved (`None`: it could not be).
    fn preview(&mut self) -> Result<Option<PathBuf>, TrainError> {
        let l = &self.cfg.log;
        if self.fixed_noise.is_none() {
            let s = self.cfg.unet.image_size;
            let n = NoiseRng::new(l.sample_seed).randn((l.sample_count, self.cfg.unet.image_channels, s, s), self.engine.device())?;
            self.fixed_noise = Some(n);
        }
        let grid = self.sample_grid_from(self.fixed_noise.as_ref().unwrap(), l.sample_steps, l.sample_ema)?;
        let path = self.run_dir.join("samples").join(format!("epoch_{:04}.png", self.epoch));
        // A preview is a look at the run, not part of it: an unwritable one must not stop training.
        let saved = match checkpoint::save_png_atomic(&path, &grid) {
            Ok(()) => Some(path),
            Err(e) => {
                warn!("sample preview not saved: {e}");
                None
            }
        };
        if let Some(tb) = self.tb.as_mut() {
            tb.image(self.step, "samples", &grid)?;
        }
        Ok(saved)
    }

    /// Redraws `loss.png`; like the previews, a failure is only a warning.
    fn plot(&self) {
        let (train, val) = self.metrics.curves();
        let name = self.run_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if let Err(e) = crate::plot::loss_curve(&self.run_dir.join("loss.png"), &format!("{name}: training loss"), &train, &val, (900, 560)) {
            warn!("loss curve not saved: {e}");
        }
    }

    /// Trains until all epochs are done, `train.max_steps` or `train.max_minutes` is reached, or
    /// `stop` is set; each of these ends with a checkpoint. Errors (e.g. a non-finite loss)
    /// return without saving, so the last checkpoint stays the last good state.
    pub fn run(&mut self, stop: Arc<AtomicBool>) -> Result<TrainSummary, TrainError> {
        let t0 = Instant::now();
        let session_start_step = self.step;
        let mut last_save = Instant::now();
        // This session's part of the logging window: (since, images); its losses are in
        // `pending_loss`, which may hold some from before a resume.
        let mut window = (Instant::now(), 0u64);
        let mut last_loss = None;
        let mut last_val = None;
        let mut last_lr = self.cfg.train.lr;
        let mut last_norm = None;
        let mut session_images = 0u64;
        let spe = self.steps_per_epoch();
        let reason = 'outer: loop {
            if self.epoch >= self.cfg.train.epochs {
                break StopReason::Finished;
            }
            self.ensure_order();
            let pb = if self.opts.progress {
                let pb = ProgressBar::with_draw_target(Some(spe), ProgressDrawTarget::stderr());
                pb.set_style(
                    ProgressStyle::with_template("epoch {prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
                        .expect("template")
                        .progress_chars("=> "),
                );
                pb.set_prefix(format!("{}/{}", self.epoch + 1, self.cfg.train.epochs));
                pb.set_position((self.position / self.cfg.train.batch_size) as u64);
                pb
            } else {
                ProgressBar::hidden()
            };
            let epoch_t0 = Instant::now();
            let mut epoch_images = 0u64;
            while !self.epoch_done() {
                let session_s = t0.elapsed().as_secs_f64();
                if stop.load(Ordering::SeqCst) {
                    pb.abandon();
                    break 'outer StopReason::Interrupted;
                }
                if self.cfg.train.max_steps.is_some_and(|m| self.step >= m) {
                    pb.abandon();
                    break 'outer StopReason::MaxSteps;
                }
                if self.cfg.train.max_minutes.is_some_and(|m| session_s >= m * 60.0) {
                    pb.abandon();
                    break 'outer StopReason::TimeLimit;
                }
                let b = (self.order.len() - self.position).min(self.cfg.train.batch_size) as u64;
                let out = self.step()?;
                if self.opts.crash_after_step == Some(self.step) {
                    return Err(TrainError::SimulatedCrash(self.step));
                }
                let m = StepMetrics { step: self.step, epoch: self.epoch, loss: out.loss, lr: out.lr, grad_norm: out.grad_norm };
                if let Some(cb) = self.opts.on_step.as_mut() {
                    cb(&m);
                }
                last_loss = Some(out.loss as f64);
                last_lr = out.lr;
                last_norm = out.grad_norm;
                window.1 += b;
                let pending = &mut self.pending_loss;
                pending.window_sum += out.loss as f64;
                pending.window_steps += 1;
                pending.epoch_sum += out.loss as f64;
                pending.epoch_steps += 1;
                epoch_images += b;
                session_images += b;
                let ips = epoch_images as f64 / epoch_t0.elapsed().as_secs_f64().max(1e-9);
                pb.set_message(format!("loss {:.4} {:.1} img/s", out.loss, ips));
                pb.inc(1);
                if self.step.is_multiple_of(self.cfg.log.every_steps.max(1)) {
                    let secs = window.0.elapsed().as_secs_f64().max(1e-9);
                    let rec = Record {
                        kind: "step".into(),
                        step: self.step,
                        epoch: self.epoch,
                        loss: self.pending_loss.window_sum / self.pending_loss.window_steps as f64,
                        val_loss: None,
                        lr: out.lr,
                        grad_norm: out.grad_norm,
                        images_per_s: window.1 as f64 / secs,
                        time_s: self.elapsed_before + t0.elapsed().as_secs_f64(),
                    };
                    if let Some(tb) = self.tb.as_mut() {
                        tb.scalar(self.step, "train/loss", rec.loss)?;
                        tb.scalar(self.step, "train/lr", rec.lr)?;
                        if let Some(n) = rec.grad_norm {
                            tb.scalar(self.step, "train/grad_norm", n)?;
                        }
                        tb.scalar(self.step, "perf/images_per_s", rec.images_per_s)?;
                    }
                    self.metrics.push(rec)?;
                    window = (Instant::now(), 0);
                    (self.pending_loss.window_sum, self.pending_loss.window_steps) = (0.0, 0);
                }
                let c = &self.cfg.checkpoint;
                let due_steps = c.every_steps > 0 && self.step.is_multiple_of(c.every_steps);
                let due_time = c.every_minutes > 0.0 && last_save.elapsed().as_secs_f64() >= c.every_minutes * 60.0;
                if (due_steps || due_time) && !self.epoch_done() {
                    let dir = self.save_checkpoint("periodic", t0.elapsed().as_secs_f64())?;
                    pb.suspend(|| info!("checkpoint {}", dir.display()));
                    last_save = Instant::now();
                }
            }
            pb.finish_and_clear();
            // Epoch end.
            let ended = self.epoch;
            let epoch_secs = epoch_t0.elapsed().as_secs_f64();
            let val = if self.cfg.train.validate && !self.split.val.is_empty() {
                Some(self.engine.eval_loss(&self.data, &self.split.val, self.cfg.train.batch_size, self.cfg.train.seed)?)
            } else {
                None
            };
            last_val = val.or(last_val);
            let PendingLoss { epoch_sum, epoch_steps, .. } = self.pending_loss;
            let mean = if epoch_steps > 0 { epoch_sum / epoch_steps as f64 } else { f64::NAN };
            (self.pending_loss.epoch_sum, self.pending_loss.epoch_steps) = (0.0, 0);
            let rec = Record {
                kind: "epoch".into(),
                step: self.step,
                epoch: ended,
                loss: mean,
                val_loss: val,
                lr: last_lr,
                grad_norm: last_norm,
                images_per_s: epoch_images as f64 / epoch_secs.max(1e-9),
                time_s: self.elapsed_before + t0.elapsed().as_secs_f64(),
            };
            if let Some(tb) = self.tb.as_mut() {
                if epoch_steps > 0 {
                    tb.scalar(self.step, "epoch/train_loss", mean)?;
                }
                if let Some(v) = val {
                    tb.scalar(self.step, "epoch/val_loss", v)?;
                }
            }
            self.metrics.push(rec)?;
            info!(
                "epoch {}/{} done at step {}: train loss {:.4}{} ({:.1} img/s, {:.0} s)",
                ended + 1,
                self.cfg.train.epochs,
                self.step,
                mean,
                val.map(|v| format!(", val loss {v:.4}")).unwrap_or_default(),
                epoch_images as f64 / epoch_secs.max(1e-9),
                epoch_secs
            );
            self.end_epoch();
            let every = self.cfg.log.sample_every_epochs;
            if every > 0 && (ended + 1).is_multiple_of(every) {
                if let Some(p) = self.preview()? {
                    info!("samples: {}", p.display());
                }
            }
            self.plot();
            self.save_checkpoint("epoch", t0.elapsed().as_secs_f64())?;
            last_save = Instant::now();
            if let Some(tb) = self.tb.as_mut() {
                tb.flush()?;
            }
        };
        let reason_str = match reason {
            StopReason::Finished => "finished",
            StopReason::MaxSteps => "max-steps",
            StopReason::TimeLimit => "time-limit",
            StopReason::Interrupted => "stop",
        };
        let dir = self.save_checkpoint(reason_str, t0.elapsed().as_secs_f64())?;
        self.plot();
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let session_steps = self.step - session_start_step;
        let ips = session_images as f64 / secs.max(1e-9);
        info!("{}: stopped ({reason_str}) at step {}, checkpoint {}", self.run_dir.display(), self.step, dir.display());
        Ok(TrainSummary {
            run_dir: self.run_dir.clone(),
            reason,
            steps: self.step,
            epochs: self.epoch,
            session_steps,
            session_seconds: secs,
            images_per_s: ips,
            last_loss,
            last_val_loss: last_val,
            resumed_from: self.resumed_from,
            last_checkpoint: Some(dir),
            warnings: self.warnings.clone(),
        })
    }
}

/// All tensors of a safetensors file (for comparing runs).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}
