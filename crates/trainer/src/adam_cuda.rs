//! The optimizer step on CUDA: the gradients' global norm and the Adam update (with clipping,
//! weight decay and EMA) over many variables a launch (`adam_cuda.cu`, planned by
//! [`crate::multi_tensor`]). Per variable, the norm took three kernels, Adam three (in place;
//! composed of candle's ops, twelve and eight parameter-sized temporaries) and the EMA three:
//! for the reference network's 331 variables, about 2,000 launches a step (3,000 with EMA).
//! This takes 13: six for the norm's partial sums, one to total them, six for the update.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::backend::BackendDevice;
use candle_core::{DType, Result, Storage, Tensor};

use crate::multi_tensor::{plan, Buffers, MtArgs};

const SRC: &str = include_str!("adam_cuda.cu");
const MODULE: &str = "trainer_adam";
const THREADS: u32 = 256;
/// Elements a block: ~1,600 blocks for the reference's 25.4 M parameters.
const CHUNK: u32 = 16384;

// SAFETY: `MtArgs` is `repr(C)`, plain integers, laid out as the kernels' `struct MtArgs`
// (asserted on both sides), and passed by value.
unsafe impl DeviceRepr for MtArgs {}

/// Optimizer steps and gradient norms done by these kernels in this process: the self-test
/// checks that a CUDA run did not fall back to the composite path unnoticed.
static STEPS: AtomicU64 = AtomicU64::new(0);
static NORMS: AtomicU64 = AtomicU64::new(0);

/// (optimizer steps, gradient norms) done by the multi-tensor kernels so far.
pub fn kernel_use() -> (u64, u64) {
    (STEPS.load(Ordering::Relaxed), NORMS.load(Ordering::Relaxed))
}

/// The multi-tensor kernels are used on CUDA unless `TRAINER_CUDA_ADAM=candle` (the composite:
/// for A/B runs, and a way out).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    unet::cuda_ops::switch_on(&ON, "TRAINER_CUDA_ADAM")
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    // Unfused: given the same gradients, the step rounds as the CPU's does (bit for bit for
    // plain Adam; AdamW and L2 take a composite path on the CPU), which the self-test can then
    // hold to a tight tolerance. The kernel is memory-bound: no measurable cost is expected
    // (not yet measured on a GPU).
    unet::cuda_ops::nvrtc_once(&PTX, SRC, "the Adam CUDA kernels", false)
}

/// The device address of a contiguous f32 CUDA tensor's first element, and its element count,
/// if it is one. The tensor must outlive the kernels that use the address.
fn address(t: &Tensor, dev: &CudaDevice) -> Option<(u64, usize)> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cuda(s) if s.device.same_device(dev) => {
            let slice = s.as_cuda_slice::<f32>().ok()?;
            let stream = dev.cuda_stream();
            let (ptr, _sync) = slice.device_ptr(&stream);
            Some((ptr + 4 * start as u64, end - start))
        }
        _ => None,
    }
}

fn launch_config(blocks: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The CUDA device of `t`, when the multi-tensor kernels serve it.
pub fn device_of(t: &Tensor) -> Option<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) if enabled() => Some(d.clone()),
        _ => None,
    }
}

/// `sqrt(sum g^2)` over all of `grads` (contiguous f32 on `dev`), or `None` if one of them is
/// not. Accumulated in double, in a fixed order. Waits for the device.
pub fn global_norm(dev: &CudaDevice, grads: &[Tensor]) -> Result<Option<f64>> {
    let Some(sum) = sum_of_squares(dev, grads)? else { return Ok(None) };
    let host = dev.clone_dtoh(&sum)?;
    Ok(Some(host[0].sqrt()))
}

/// `sum g^2` over all of `grads` (contiguous f32 on `dev`), queued: a one-element device buffer,
/// or `None` if one of them is not.
pub fn sum_of_squares(dev: &CudaDevice, grads: &[Tensor]) -> Result<Option<CudaSlice<f64>>> {
    let mut bufs = Vec::with_capacity(grads.len());
    for g in grads {
        let Some((g, n)) = address(g, dev) else { return Ok(None) };
        bufs.push(Buffers { g, n, ..Default::default() });
    }
    let launches = plan(&bufs, CHUNK);
    let total: u32 = launches.iter().map(|(_, b)| b).sum();
    let mut sum = dev.alloc_zeros::<f64>(1)?;
    if total == 0 {
        NORMS.fetch_add(1, Ordering::Relaxed);
        return Ok(Some(sum));
    }
    let func = dev.get_or_load_custom_func("sumsq_multi", MODULE, ptx()?).map_err(unet::cuda_ops::load_error("the Adam CUDA kernels", "sumsq_multi"))?;
    // SAFETY: every element is written: block b of a launch writes partial[offset + b].
    let mut partial = unsafe { dev.alloc::<f64>(total as usize)? };
    let mut offset = 0usize;
    for (args, blocks) in &launches {
        if *blocks == 0 {
            continue;
        }
        let mut out = partial.slice_mut(offset..offset + *blocks as usize);
        let mut b = func.builder();
        b.arg(args).arg(&mut out);
        // SAFETY: argument types and order match `sumsq_multi`; the addresses are live
        // contiguous f32 buffers of the given sizes (`grads` outlives the launch in stream order).
        unet::cuda_ops::profile::time(dev, || format!("adam grad sumsq {} tensors", args.count), || unsafe { b.launch(launch_config(*blocks)) }.w())?;
        offset += *blocks as usize;
    }
    let func = dev.get_or_load_custom_func("sum_partials", MODULE, ptx()?).map_err(unet::cuda_ops::load_error("the Adam CUDA kernels", "sum_partials"))?;
    let mut b = func.builder();
    b.arg(&partial).arg(&total).arg(&mut sum);
    // SAFETY: argument types and order match `sum_partials`; `partial` holds `total` values.
    unet::cuda_ops::profile::time(dev, || "adam grad sumsq total".into(), || unsafe { b.launch(launch_config(1)) }.w())?;
    NORMS.fetch_add(1, Ordering::Relaxed);
    Ok(Some(sum))
}

/// The device buffers of a step queued before the host checks it (`step_gate` in
/// `adam_cuda.cu`), kept from step to step, and the pinned host copy of the read-back values.
pub struct Gate {
    /// {1 to update else 0, clipping scale}: `adam_multi` reads it.
    gate: CudaSlice<f32>,
    /// {loss, sum of squared gradients} on the device, then in `host` once copied.
    readback: CudaSlice<f64>,
    host: PinnedHostSlice<f64>,
    /// Recorded after the copy to `host`. (The pinned slice's own event is recorded only when
    /// cudarc manages synchronization between streams, which these devices do not use: on one
    /// stream without event tracking, waiting on it would return at once.)
    copied: CudaEvent,
}

impl Drop for Gate {
    fn drop(&mut self) {
        // The pinned memory must outlive a copy into it still in flight.
        let _ = self.copied.synchronize();
    }
}

impl Gate {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let gate = dev.alloc_zeros::<f32>(2)?;
        let readback = dev.alloc_zeros::<f64>(2)?;
        // Plain page-locked memory: the default (write-combined) is slow for the host to read.
        // SAFETY: nothing is read from it before a copy into it has completed (`Gate::read`).
        let ctx = dev.cuda_stream().context().clone();
        let host = unsafe { ctx.alloc_pinned_with_flags::<f64>(2, 0) }.w()?;
        let copied = ctx.new_event(None).w()?;
        Ok(Self { gate, readback, host, copied })
    }

    /// The gate's device address, for [`step`].
    pub fn address(&self, dev: &CudaDevice) -> u64 {
        let stream = dev.cuda_stream();
        let (ptr, _sync) = self.gate.device_ptr(&stream);
        ptr
    }

    /// Queues the gate of a step from the sum of squares (`sum_of_squares`) and the loss (an f32
    /// scalar on `dev`), then the copy of {loss, sum of squares} to the host, which
    /// [`Gate::read`] waits for. `clip_max` 0: no clipping. `false`, queueing nothing, when the
    /// loss is not one f32 value on `dev`.
    pub fn set(&mut self, dev: &CudaDevice, sumsq: &CudaSlice<f64>, loss: &Tensor, clip_max: f64) -> Result<bool> {
        let Some((loss_addr, 1)) = address(loss, dev) else { return Ok(false) };
        let func = dev.get_or_load_custom_func("step_gate", MODULE, ptx()?).map_err(unet::cuda_ops::load_error("the Adam CUDA kernels", "step_gate"))?;
        let mut b = func.builder();
        b.arg(sumsq).arg(&loss_addr).arg(&clip_max).arg(&mut self.gate).arg(&mut self.readback);
        // SAFETY: argument types and order match `step_gate`; the loss is a live f32 value
        // (the caller keeps its tensor until the step is queued), the buffers hold two values.
        unet::cuda_ops::profile::time(dev, || "adam step gate".into(), || unsafe { b.launch(launch_config(1)) }.w())?;
        let stream = dev.cuda_stream();
        stream.memcpy_dtoh(&self.readback, &mut self.host).w()?;
        self.copied.record(&stream).w()?;
        Ok(true)
    }

    /// (loss, sum of squared gradients) of the last [`Gate::set`], waiting for them (and only
    /// for them: work queued after the copy goes on).
    pub fn read(&self) -> Result<(f32, f64)> {
        self.copied.synchronize().w()?;
        let v = self.host.as_slice().w()?;
        Ok((v[0] as f32, v[1]))
    }
}

/// For the GPU self-test: two gates in turn on one [`Gate`], each read at once; the second's loss
/// is computed after ~30 large matmuls, so its copy comes well after the host asks. Returns what
/// each read gave: {(0.5, 25), (0.25, 100)} when a read waits for its copy; a read that did not
/// would give the first's values (or junk) for the second.
pub fn gate_read_waits(dev: &CudaDevice) -> Result<[(f32, f64); 2]> {
    let device = candle_core::Device::Cuda(dev.clone());
    let mut gate = Gate::new(dev)?;
    let mut read = |loss: &Tensor, grads: &[Tensor]| -> Result<(f32, f64)> {
        let sum = sum_of_squares(dev, grads)?.ok_or_else(|| candle_core::Error::Msg("gate check: gradients not contiguous f32".into()))?;
        if !gate.set(dev, &sum, loss, 0.0)? {
            candle_core::bail!("gate check: the loss is not one f32 value on the device");
        }
        gate.read()
    };
    let first = read(&Tensor::new(0.5f32, &device)?, &[Tensor::new(&[3f32, 4.0], &device)?])?;
    // Small values, so that the products stay finite (and shrink to zero).
    let a = Tensor::full(1e-4f32, (4096, 4096), &device)?;
    let mut x = a.clone();
    for _ in 0..30 {
        x = x.matmul(&a)?;
    }
    let loss = x.sum_all()?.affine(0.0, 0.25)?;
    let second = read(&loss, &[Tensor::new(&[6f32, 8.0], &device)?])?;
    Ok([first, second])
}

/// The scalars of one Adam step (see `adam_multi` in `adam_cuda.cu`).
pub struct StepScalars {
    pub b1: f32,
    /// `1 - b1` in f64, rounded (as `adam::MomentUpdate`), and so on.
    pub r1: f32,
    pub b2: f32,
    pub r2: f32,
    pub step_size: f32,
    pub bias2_sqrt: f32,
    pub eps: f32,
    pub grad_scale: f32,
    pub wd_l2: f32,
    pub p_mul: f32,
    pub ema_decay: f32,
    pub ema_rest: f32,
    /// The device address of a [`Gate`]'s flag and clipping scale ([`Gate::address`]), or 0.
    pub gate: u64,
}

/// One Adam step over all variables in place: `p`, `m`, `v` (and `ema`, when given) updated
/// from `grads`, when the gate (`s.gate`, if given) lets it, with its clipping scale. Returns
/// `false`, touching nothing, when one of the tensors is not a contiguous f32 tensor on `dev`
/// (the caller then takes the composite path). A failed launch leaves the earlier launches'
/// variables updated: the caller treats it as fatal.
pub fn step(dev: &CudaDevice, p: &[Tensor], grads: &[Tensor], m: &[Tensor], v: &[Tensor], ema: Option<&[Tensor]>, s: &StepScalars) -> Result<bool> {
    let mut bufs = Vec::with_capacity(p.len());
    for i in 0..p.len() {
        let e = match ema {
            Some(e) => match address(&e[i], dev) {
                Some(a) => Some(a),
                None => return Ok(false),
            },
            None => None,
        };
        let (Some(pa), Some(ga), Some(ma), Some(va)) = (address(&p[i], dev), address(&grads[i], dev), address(&m[i], dev), address(&v[i], dev)) else {
            return Ok(false);
        };
        let n = pa.1;
        if [ga.1, ma.1, va.1, e.map_or(n, |e| e.1)].iter().any(|&k| k != n) {
            candle_core::bail!("adam (CUDA): variable {i} has {n} elements, but its gradient or state differs");
        }
        bufs.push(Buffers { p: pa.0, g: ga.0, m: ma.0, v: va.0, e: e.map_or(0, |e| e.0), n });
    }
    let func = dev.get_or_load_custom_func("adam_multi", MODULE, ptx()?).map_err(unet::cuda_ops::load_error("the Adam CUDA kernels", "adam_multi"))?;
    for (args, blocks) in plan(&bufs, CHUNK) {
        if blocks == 0 {
            continue;
        }
        let mut b = func.builder();
        b.arg(&args).arg(&s.b1).arg(&s.r1).arg(&s.b2).arg(&s.r2).arg(&s.step_size).arg(&s.bias2_sqrt).arg(&s.eps);
        b.arg(&s.grad_scale).arg(&s.wd_l2).arg(&s.p_mul).arg(&s.ema_decay).arg(&s.ema_rest).arg(&s.gate);
        // SAFETY: argument types and order match `adam_multi`; every address is a live,
        // contiguous f32 buffer of its tensor's size, and the gate's (when not 0) two f32s. The
        // kernel writes p, m, v and e in place: the optimizer owns m, v and e, and p is a
        // variable, which candle updates in place too.
        unet::cuda_ops::profile::time(dev, || format!("adam step {} tensors", args.count), || unsafe { b.launch(launch_config(blocks)) }.w())?;
    }
    STEPS.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

#[cfg(test)]
mod tests {
    /// As unet's kernels (`unet::cuda_ops`): NVRTC compiles them here, with the device path's
    /// options, and the PTX has every entry point the step asks for.
    #[test]
    fn the_adam_kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        let asked: Vec<&str> = include_str!("adam_cuda.rs").split("get_or_load_custom_func(\"").skip(1).filter_map(|s| s.split('"').next()).collect();
        assert_eq!(asked, ["sumsq_multi", "sum_partials", "step_gate", "adam_multi"]);
        for name in asked {
            assert!(ptx.contains(&format!(".entry {name}(")), "the PTX has no entry {name}");
        }
    }
}
