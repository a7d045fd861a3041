//! The CUDA side of unet's fused ops, in f32 and bf16 (`kernels.cu`, compiled once per process
//! by NVRTC):
//! - `norm`'s GroupNorm (+ Hardswish, + dropout: a stored mask, or `HashedDropout`, which stores
//!   none): one kernel forward, one backward.
//!   candle's composite GroupNorm is about ten kernels forward, each keeping a full-size
//!   intermediate for the backward pass, and Hardswish and the mask add five more; on a GPU
//!   these passes are memory-bound, so their count is the cost. Here the forward pass reads the
//!   input twice for the statistics, writes the output once, and keeps only the input.
//! - `softmax`'s scaled softmax over the last dimension: one kernel each way, keeping only the
//!   output, where the composite keeps four attention-sized tensors per layer (the reference
//!   model attends at 16x16: at batch 128, 32 MB each in f32; a 32x32 level would be 512 MB).
//! - `upsample`'s nearest x2 upsampling and its backward (the sum of each 2x2 block): candle
//!   computes that backward as a grouped convolution, which it runs as one convolution per
//!   channel (256 launches and a concatenation per layer).
//! - `conv`'s bias: added in place to the cuDNN output (candle's broadcast add wrote a second
//!   full-size tensor and kept the first for the backward pass), and its gradient, a sum per
//!   channel.
//! - [`tune_device`]: the allocator settings a training loop wants, set once per device.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Result, Storage, Tensor};
use half::bf16;

use crate::norm::HashedDropout;

const SRC: &str = include_str!("kernels.cu");
const MODULE: &str = "unet_kernels";
const THREADS: u32 = 256;

/// Whether our own CUDA kernel for a part is on: yes unless the environment variable `var` is
/// `candle` (candle's ops instead: for A/B runs, and a way out should a kernel misbehave on
/// some card). Read once per process into `cell`.
pub fn switch_on(cell: &'static OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).map_or(true, |v| v != "candle"))
}

/// `src` compiled to PTX by NVRTC once per process (into `cell`; a failure is kept too, and
/// reported with `what` on every call). `fmad`: whether NVRTC may contract a multiply and an add
/// into one fused operation (its default, and nvcc's); without it each rounds on its own, as on
/// the CPU.
pub fn nvrtc_once(cell: &'static OnceLock<std::result::Result<String, String>>, src: &str, what: &str, fmad: bool) -> Result<&'static str> {
    use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    cell.get_or_init(|| {
        compile_ptx_with_opts(src, CompileOptions { fmad: Some(fmad), ..Default::default() }).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling {what}: {e}")))
}

/// Names the kernel set in an error from loading one of its kernels: the driver may refuse the
/// PTX (one made by an NVRTC newer than the driver, say), and `scripts/gpu/gpu-check.sh` reads
/// the set's name to switch back the parts it serves.
pub fn load_error(what: &'static str, name: &'static str) -> impl FnOnce(candle_core::Error) -> candle_core::Error {
    move |e| in_context(e, format!("loading {what} ({name})"))
}

/// `e` behind `what`, on one line: candle's `Error::context` puts the two on lines of their own,
/// which the command line's one-line error would show as a literal `\n`.
pub fn in_context(e: candle_core::Error, what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e}"))
}

/// Sets up a CUDA device for many short-lived tensors, unless `UNET_CUDA_POOL=candle`:
/// - cudarc allocates from the device's stream-ordered memory pool, whose release threshold is 0
///   by default: every synchronization (one per training step, reading the loss) hands the
///   pool's free memory back to the driver, and the next step maps it again, gigabytes of it.
///   PyTorch's caching allocator keeps it, and so do RMM and PyTorch's own cudaMallocAsync
///   backend, by setting the threshold to the maximum; so do we.
/// - cudarc creates two events per allocation to order uses across streams; candle runs each
///   thread's ops on that thread's default stream (`per_thread_stream`), and the project issues
///   all its CUDA work from one thread, so they are never waited on, and tensors made after
///   this skip them. (Work queued from a second thread, a prefetcher say, would need them back.)
///
/// A device without memory pools is left as it is. Other devices: nothing to do.
pub fn tune_device(dev: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    static ON: OnceLock<bool> = OnceLock::new();
    let candle_core::Device::Cuda(d) = dev else { return Ok(()) };
    if !switch_on(&ON, "UNET_CUDA_POOL") {
        return Ok(());
    }
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if ctx.has_async_alloc() {
        ctx.bind_to_thread().w()?;
        let mut keep_all = u64::MAX;
        // SAFETY: the device comes from a live context, and the release threshold attribute
        // takes a u64 (cuMemPoolSetAttribute's documentation).
        unsafe {
            let pool = result::device::get_mem_pool(ctx.cu_device()).w()?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep_all as *mut u64).cast(),
            )
            .w()?;
        }
    }
    // SAFETY: candle never puts this device in multi-stream mode, the only mode in which cudarc
    // waits on these events; its per-thread streams are safe as long as one thread issues the
    // work (see above).
    unsafe { d.disable_event_tracking() };
    Ok(())
}

/// The fused GroupNorm kernels, unless `UNET_CUDA_NORM=candle`.
pub fn norm_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch_on(&ON, "UNET_CUDA_NORM")
}

/// Whether a ResBlock adds its time embedding and its first convolution's bias inside the
/// GroupNorm kernels that follow them (`UNET_FOLD_TEMB=1`; `GroupNorm::forward_hardswish_shifted`)
/// instead of in two full-size passes of their own and their backward reductions. Not yet run
/// on a GPU, so opt-in: the check's step 7 self-tests and times it.
pub fn fold_temb_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_FOLD_TEMB").is_ok_and(|v| v == "1"))
}

/// The upsampling kernels, unless `UNET_CUDA_UPSAMPLE=candle`.
pub fn upsample_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch_on(&ON, "UNET_CUDA_UPSAMPLE")
}

/// The softmax kernels, unless `UNET_CUDA_SOFTMAX=candle`.
pub fn softmax_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    switch_on(&ON, "UNET_CUDA_SOFTMAX")
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    nvrtc_once(&PTX, SRC, "unet's CUDA kernels", true)
}

/// The GroupNorm kernels' dropout arguments (`GN_DROP_ARGS`), last: the mask or a null
/// pointer, then the hash key, threshold (0: none) and scale, then the seed's device address
/// (0: none, the key is whole) and the call site's mix.
struct DropArgs {
    key: u64,
    thr: u32,
    scale: f32,
    seed_at: u64,
    site_mix: u64,
}

impl DropArgs {
    fn new(hashed: Option<HashedDropout>) -> Self {
        match hashed {
            Some(h) => Self { key: h.key, thr: h.threshold, scale: h.scale, seed_at: h.seed_at, site_mix: h.site_mix },
            None => Self { key: 0, thr: 0, scale: 1.0, seed_at: 0, site_mix: 0 },
        }
    }

    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>, mask: &'a Option<CudaView<'a, f32>>, null: &'a usize) {
        match mask {
            Some(m) => args.arg(m),
            None => args.arg(null),
        };
        // The address goes as a pointer-sized integer: the kernel reads it as
        // `const unsigned long long*`.
        args.arg(&self.key).arg(&self.thr).arg(&self.scale).arg(&self.seed_at).arg(&self.site_mix);
    }
}

/// Shape of a GroupNorm call: [n, c, ...spatial].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
}

fn view<'a, T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    len: usize,
) -> Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!("unet CUDA kernels expect contiguous inputs");
    }
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..l.start_offset() + len))
}

fn launch_config(d: &Dims) -> LaunchConfig {
    rows_config(d.n * d.groups)
}

/// One block per row (or group).
fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The magic numbers of the kernels' divisions by HW (`int_div`), once the kernels' 32-bit
/// indices are known to hold: `span` (a group, or an image) must leave a block's stride of room
/// below 2^31, as the loops add it before they compare.
fn hw_magic(what: &str, hw: usize, span: usize) -> Result<(u32, u32)> {
    if hw == 0 || hw >= 1 << 31 || span >= (1 << 31) - THREADS as usize {
        candle_core::bail!("{what} (CUDA): {span} values in one block's range, of maps of {hw} values: the kernels index up to 2^31");
    }
    Ok(crate::int_div::magic(hw as u32))
}

/// Runs `f` with the mask's device buffer (f32, contiguous, x's shape), if any.
fn with_mask<R>(mask: Option<&Tensor>, len: usize, f: impl FnOnce(Option<CudaView<'_, f32>>) -> Result<R>) -> Result<R> {
    match mask {
        None => f(None),
        Some(m) => {
            let (storage, layout) = m.storage_and_layout();
            match &*storage {
                Storage::Cuda(s) => f(Some(view::<f32>(s, layout, len)?)),
                _ => candle_core::bail!("group norm: the dropout mask must be on the input's CUDA device"),
            }
        }
    }
}

/// y = act(group_norm(x + shift) * w + b) * dropout (the mask, or the hashed factors), in x's
/// dtype (w, b and the shift, one value per image and channel, share it); with `save`, also
/// each group's mean and 1/std (f32, 2 per (image, group)) for [`backward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(d: Dims, eps: f32, act: bool, mask: Option<&Tensor>, hashed: Option<HashedDropout>, x: &CudaStorage, lx: &Layout, w: &CudaStorage, lw: &Layout, b: &CudaStorage, lb: &Layout, shift: Option<(&CudaStorage, &Layout)>, save: bool) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = x.device.clone();
    let len = d.n * d.c * d.hw;
    let (c, hw, g, act) = (d.c as i32, d.hw as i32, d.groups as i32, act as i32);
    let (hw_m, hw_s) = hw_magic("group norm", d.hw, d.c / d.groups * d.hw)?;
    let null = 0usize;
    let drop = DropArgs::new(hashed);
    with_mask(mask, len, |mask| {
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let (xv, wv, bv) = (view::<$t>(x, lx, len)?, view::<$t>(w, lw, d.c)?, view::<$t>(b, lb, d.c)?);
                let sv = match shift {
                    Some((s, l)) => Some(view::<$t>(s, l, d.n * d.c)?),
                    None => None,
                };
                // SAFETY: the kernel writes every element (one block per group, each group
                // whole), and with `save` both statistics of every group.
                let mut out = unsafe { dev.alloc::<$t>(len)? };
                let mut saved = if save { Some(unsafe { dev.alloc::<f32>(2 * d.n * d.groups)? }) } else { None };
                let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
                let mut args = func.builder();
                args.arg(&xv).arg(&wv).arg(&bv);
                match &sv {
                    Some(v) => args.arg(v),
                    None => args.arg(&null),
                };
                args.arg(&mut out);
                match saved.as_mut() {
                    Some(s) => args.arg(s),
                    None => args.arg(&null),
                };
                args.arg(&c).arg(&hw).arg(&g).arg(&eps).arg(&act).arg(&hw_m).arg(&hw_s);
                drop.push(&mut args, &mask, &null);
                let name = || format!("groupnorm{} fwd {}ch {}px b{} {}", if act != 0 { "+hardswish" } else { "" }, d.c, d.hw, d.n, stringify!($t));
                // SAFETY: argument types and order match `gn_fwd_*` in kernels.cu; the buffers
                // hold the lengths the kernel indexes (n*c*hw, c, c; 2*n*groups saved).
                profile::time(&dev, name, || unsafe { args.launch(launch_config(&d)) }.w())?;
                (CudaStorage::wrap_cuda_slice(out, dev.clone()), saved.map(|s| CudaStorage::wrap_cuda_slice(s, dev.clone())))
            }};
        }
        if shift.is_some_and(|(s, _)| s.dtype() != x.dtype()) {
            candle_core::bail!("group norm (CUDA): the shift must have the input's dtype {:?}", x.dtype());
        }
        Ok(match (&x.slice, &w.slice, &b.slice) {
            (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => run!(f32, "gn_fwd_f32"),
            (CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_)) => run!(bf16, "gn_fwd_bf16"),
            _ => candle_core::bail!("group norm (CUDA): dtypes {:?}/{:?}/{:?} not supported", x.dtype(), w.dtype(), b.dtype()),
        })
    })
}

/// From x, dy, w, b (and a shift, n*c): dx in x's dtype, and f32 [dw partial sums (n*c) | db
/// partial sums (n*c)], per image, with the shift's gradient (n*c) appended when there is a
/// shift. `saved`: the forward pass's statistics ([`forward`] with `save`), or `None` to
/// recompute them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(d: Dims, eps: f32, act: bool, mask: Option<&Tensor>, hashed: Option<HashedDropout>, x: &CudaStorage, lx: &Layout, dy: &CudaStorage, ldy: &Layout, w: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout), shift: Option<(&CudaStorage, &Layout)>, saved: Option<&CudaStorage>) -> Result<(CudaStorage, CudaStorage)> {
    let dev = x.device.clone();
    let len = d.n * d.c * d.hw;
    let shifted = shift.is_some();
    let shift_len = if shifted { d.n * d.c } else { 0 };
    let aux_len = 2 * d.n * d.c + shift_len;
    let (n, c, hw, g, act) = (d.n as i32, d.c as i32, d.hw as i32, d.groups as i32, act as i32);
    let (hw_m, hw_s) = hw_magic("group norm backward", d.hw, d.c / d.groups * d.hw)?;
    let null = 0usize;
    let drop = DropArgs::new(hashed);
    with_mask(mask, len, |mask| {
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let (xv, dyv) = (view::<$t>(x, lx, len)?, view::<$t>(dy, ldy, len)?);
                let (wv, bv) = (view::<$t>(w.0, w.1, d.c)?, view::<$t>(b.0, b.1, d.c)?);
                let sv = match shift {
                    Some((s, l)) => Some(view::<$t>(s, l, shift_len)?),
                    None => None,
                };
                let stats = match saved {
                    Some(s) => {
                        let v = s.as_cuda_slice::<f32>()?;
                        if v.len() != 2 * d.n * d.groups {
                            candle_core::bail!("group norm backward (CUDA): {} saved statistics for {} groups", v.len(), d.n * d.groups);
                        }
                        Some(v)
                    }
                    None => None,
                };
                // SAFETY: every dx element and every (image, channel) partial sum (and shift
                // gradient) is written.
                let mut dx = unsafe { dev.alloc::<$t>(len)? };
                let mut aux = unsafe { dev.alloc::<f32>(aux_len)? };
                let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
                let mut args = func.builder();
                args.arg(&xv).arg(&wv).arg(&bv);
                match &sv {
                    Some(v) => args.arg(v),
                    None => args.arg(&null),
                };
                args.arg(&dyv);
                match stats {
                    Some(v) => args.arg(v),
                    None => args.arg(&null),
                };
                args.arg(&mut dx).arg(&mut aux).arg(&n).arg(&c).arg(&hw).arg(&g).arg(&eps).arg(&act).arg(&hw_m).arg(&hw_s);
                drop.push(&mut args, &mask, &null);
                let name = || format!("groupnorm{} bwd {}ch {}px b{} {}", if act != 0 { "+hardswish" } else { "" }, d.c, d.hw, d.n, stringify!($t));
                // SAFETY: argument types and order match `gn_bwd_*` in kernels.cu; `dx` holds
                // n*c*hw values and `aux` 2*n*c (+ n*c with a shift).
                profile::time(&dev, name, || unsafe { args.launch(launch_config(&d)) }.w())?;
                (CudaStorage::wrap_cuda_slice(dx, dev.clone()), CudaStorage::wrap_cuda_slice(aux, dev.clone()))
            }};
        }
        if [w.0.dtype(), b.0.dtype()].into_iter().chain(shift.map(|(s, _)| s.dtype())).any(|t| t != x.dtype()) {
            candle_core::bail!("group norm backward (CUDA): w, b and the shift must have the input's dtype {:?}", x.dtype());
        }
        Ok(match (&x.slice, &dy.slice) {
            (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => run!(f32, "gn_bwd_f32"),
            (CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_)) => run!(bf16, "gn_bwd_bf16"),
            _ => candle_core::bail!("group norm backward (CUDA): dtypes {:?}/{:?} not supported", x.dtype(), dy.dtype()),
        })
    })
}

/// y = softmax(scale * x) over rows of `len` values (x contiguous, f32 or bf16).
pub(crate) fn softmax(x: &CudaStorage, lx: &Layout, len: usize, scale: f32) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let total = lx.shape().elem_count();
    let rows = total / len.max(1);
    let len_i = len as i32;
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let xv = view::<$t>(x, lx, total)?;
            // SAFETY: every row is written in full.
            let mut out = unsafe { dev.alloc::<$t>(total)? };
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
            let mut args = func.builder();
            args.arg(&xv).arg(&mut out).arg(&len_i).arg(&scale);
            let name = || format!("softmax fwd {rows}x{len} {}", stringify!($t));
            // SAFETY: argument types and order match `softmax_fwd_*` in kernels.cu; both buffers
            // hold rows * len values.
            profile::time(&dev, name, || unsafe { args.launch(rows_config(rows)) }.w())?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match &x.slice {
        CudaStorageSlice::F32(_) => run!(f32, "softmax_fwd_f32"),
        CudaStorageSlice::BF16(_) => run!(bf16, "softmax_fwd_bf16"),
        _ => candle_core::bail!("softmax (CUDA): dtype {:?} not supported", x.dtype()),
    })
}

/// dx = scale * y * (dy - sum(dy * y)) over rows of `len` values.
pub(crate) fn softmax_backward(y: &CudaStorage, ly: &Layout, dy: &CudaStorage, ldy: &Layout, len: usize, scale: f32) -> Result<CudaStorage> {
    let dev = y.device.clone();
    let total = ly.shape().elem_count();
    let rows = total / len.max(1);
    let len_i = len as i32;
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let (yv, dyv) = (view::<$t>(y, ly, total)?, view::<$t>(dy, ldy, total)?);
            // SAFETY: every row is written in full.
            let mut out = unsafe { dev.alloc::<$t>(total)? };
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
            let mut args = func.builder();
            args.arg(&yv).arg(&dyv).arg(&mut out).arg(&len_i).arg(&scale);
            let name = || format!("softmax bwd {rows}x{len} {}", stringify!($t));
            // SAFETY: argument types and order match `softmax_bwd_*` in kernels.cu; the three
            // buffers hold rows * len values.
            profile::time(&dev, name, || unsafe { args.launch(rows_config(rows)) }.w())?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match (&y.slice, &dy.slice) {
        (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => run!(f32, "softmax_bwd_f32"),
        (CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_)) => run!(bf16, "softmax_bwd_bf16"),
        _ => candle_core::bail!("softmax backward (CUDA): dtypes {:?}/{:?} not supported", y.dtype(), dy.dtype()),
    })
}

/// Nearest x2 upsampling (`up`) of [n, c, h, w], or its adjoint, the 2x2 block sum (`!up`) of
/// [n, c, 2h, 2w]; `l`'s last dimension is w (resp. 2w).
pub(crate) fn upsample2x(x: &CudaStorage, lx: &Layout, up: bool) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let total = lx.shape().elem_count();
    let w_in = *lx.dims().last().unwrap_or(&1);
    // Threads run over the smaller side: input values up, output values down.
    let (n_threads, w, out_len) = if up { (total, w_in, total * 4) } else { (total / 4, w_in / 2, total / 4) };
    let (n64, w_i) = (n_threads as i64, w as i32);
    let blocks = n_threads.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let xv = view::<$t>(x, lx, total)?;
            // SAFETY: every output value is written (each input value's block, or each block's sum).
            let mut out = unsafe { dev.alloc::<$t>(out_len)? };
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
            let mut args = func.builder();
            args.arg(&xv).arg(&mut out).arg(&n64).arg(&w_i);
            let name = || format!("{} {:?}", $name, lx.dims());
            // SAFETY: argument types and order match `up2x_*` / `blocksum2x_*` in kernels.cu; the
            // buffers hold `total` and `out_len` values.
            profile::time(&dev, name, || unsafe { args.launch(cfg) }.w())?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match (&x.slice, up) {
        (CudaStorageSlice::F32(_), true) => run!(f32, "up2x_f32"),
        (CudaStorageSlice::BF16(_), true) => run!(bf16, "up2x_bf16"),
        (CudaStorageSlice::F32(_), false) => run!(f32, "blocksum2x_f32"),
        (CudaStorageSlice::BF16(_), false) => run!(bf16, "blocksum2x_bf16"),
        _ => candle_core::bail!("upsample2x (CUDA): dtype {:?} not supported", x.dtype()),
    })
}

/// `y[n, c, :] += b[c]` in place, `y` being [n, c, hw...] (contiguous, as a convolution's fresh
/// output is) and `b` [c], both f32 or both bf16.
pub(crate) fn bias_add_inplace(y: &mut CudaStorage, total: usize, b: &CudaStorage, lb: &Layout, c: usize, hw: usize) -> Result<()> {
    if !lb.is_contiguous() || lb.shape().elem_count() != c {
        candle_core::bail!("bias add (CUDA): the bias {:?} is not {c} compact values", lb.shape());
    }
    channel_add_inplace("bias add", y, total, b, ChannelRows { offset: lb.start_offset(), rows: 1, stride: 0 }, c, hw)
}

/// Where the values a [`channel_add_inplace`] adds are: `rows` rows of `c` consecutive values
/// from `offset` in the buffer, `stride` apart (1 row: the same for every image; else one per image).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelRows {
    pub offset: usize,
    pub rows: usize,
    pub stride: usize,
}

/// `y[n, c, :] += b[row(n), c]` in place, `y` being [n, c, hw...] from the start of its buffer,
/// row(n) 0 when `b` has one row and n when it has one per image; both f32 or both bf16.
/// `what` names it in errors and profiles: the check script sends a failing "time embedding
/// add" to `UNET_INPLACE_SUMS=0`, a failing "bias add" to candle's convolutions.
pub(crate) fn channel_add_inplace(what: &'static str, y: &mut CudaStorage, total: usize, b: &CudaStorage, rows: ChannelRows, c: usize, hw: usize) -> Result<()> {
    let dev = y.device.clone();
    let per_image = rows.rows != 1;
    if c == 0 || hw == 0 || !total.is_multiple_of(c * hw) {
        candle_core::bail!("{what} (CUDA): {total} values do not split into channels of {c} x {hw}");
    }
    let (n, chw) = (total / (c * hw), c * hw);
    if per_image && (rows.rows != n || rows.stride < c) {
        candle_core::bail!("{what} (CUDA): {} rows {} apart to add to {n} images of {c} channels", rows.rows, rows.stride);
    }
    // The span the kernel reads: the last row's end.
    let b_len = (rows.rows - 1) * rows.stride + c;
    let b_stride = if per_image { rows.stride as i64 } else { 0i64 };
    let (hw_m, hw_s) = hw_magic(what, hw, chw)?;
    if n > i32::MAX as usize {
        candle_core::bail!("{what} (CUDA): {n} images, more than a launch indexes");
    }
    let (n_i, chw_u) = (n as i32, chw as u32);
    // Images along y (the kernel strides over the rest), about four values a thread along x.
    let cfg = LaunchConfig {
        grid_dim: (chw.div_ceil(4 * THREADS as usize).clamp(1, 65_535) as u32, n.clamp(1, 65_535) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let dtype = y.dtype();
    // The bias add keeps the name stop 25's profile gave it.
    let label = if what == "bias add" { "conv bias add" } else { what };
    let name = || format!("{label} {c}ch {hw}px {dtype:?}");
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let bs = b.as_cuda_slice::<$t>()?;
            if bs.len() < rows.offset + b_len {
                candle_core::bail!("{what} (CUDA): the values to add end at {}, past their buffer's {}", rows.offset + b_len, bs.len());
            }
            let bv = bs.slice(rows.offset..rows.offset + b_len);
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
            let ys = y.as_cuda_slice_mut::<$t>()?;
            if ys.len() < total {
                candle_core::bail!("{what} (CUDA): the output holds {} values, not {total}", ys.len());
            }
            let mut args = func.builder();
            args.arg(ys).arg(&bv).arg(&n_i).arg(&chw_u).arg(&hw_m).arg(&hw_s).arg(&b_stride);
            // SAFETY: argument types and order match `bias_add_*` in kernels.cu; `y` holds
            // `total` values, and `b` the `b_len` read at `n * b_stride + c` for n < N, c < C.
            profile::time(&dev, name, || unsafe { args.launch(cfg) }.w())?;
        }};
    }
    match (dtype, b.dtype()) {
        (candle_core::DType::F32, candle_core::DType::F32) => run!(f32, "bias_add_f32"),
        (candle_core::DType::BF16, candle_core::DType::BF16) => run!(bf16, "bias_add_bf16"),
        (a, bd) => candle_core::bail!("{what} (CUDA): dtypes {a:?}/{bd:?} not supported"),
    }
    Ok(())
}

/// `y += a` in place over `total` values from the start of `y`'s buffer (`a` compact), both f32
/// or both bf16: a sum written into the buffer of the convolution output it adds to.
pub(crate) fn add_inplace(y: &mut CudaStorage, total: usize, a: &CudaStorage, la: &Layout) -> Result<()> {
    let dev = y.device.clone();
    let n = total as i64;
    let cfg = LaunchConfig {
        grid_dim: (total.div_ceil(4 * THREADS as usize).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let dtype = y.dtype();
    let name = || format!("residual add in place {:?} {dtype:?}", la.dims());
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let av = view::<$t>(a, la, total)?;
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
            let ys = y.as_cuda_slice_mut::<$t>()?;
            if ys.len() < total {
                candle_core::bail!("residual add in place (CUDA): the output holds {} values, not {total}", ys.len());
            }
            let mut args = func.builder();
            args.arg(ys).arg(&av).arg(&n);
            // SAFETY: argument types and order match `add_into_*` in kernels.cu; `y` and `a`
            // hold `total` values.
            profile::time(&dev, name, || unsafe { args.launch(cfg) }.w())?;
        }};
    }
    match (dtype, a.dtype()) {
        (candle_core::DType::F32, candle_core::DType::F32) => run!(f32, "add_into_f32"),
        (candle_core::DType::BF16, candle_core::DType::BF16) => run!(bf16, "add_into_bf16"),
        (yd, ad) => candle_core::bail!("residual add in place (CUDA): dtypes {yd:?}/{ad:?} not supported"),
    }
    Ok(())
}

/// `a + h + b[c]` for `a`, `h` [n, c, hw...] (contiguous) and `b` [c], all f32 or all bf16: a
/// ResBlock's residual sum with its convolutions' bias, in one pass.
pub(crate) fn residual_bias_add(a: &CudaStorage, la: &Layout, h: &CudaStorage, lh: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    let dev = a.device.clone();
    let (n, c, hgt, w) = la.shape().dims4()?;
    let hw = hgt * w;
    let total = n * c * hw;
    if lh.shape() != la.shape() || lb.shape().elem_count() != c {
        candle_core::bail!("residual add (CUDA): shapes {:?} + {:?} + bias {:?} do not match", la.shape(), lh.shape(), lb.shape());
    }
    let (hw_m, hw_s) = hw_magic("residual add", hw, c * hw)?;
    if n > i32::MAX as usize {
        candle_core::bail!("residual add (CUDA): {n} images, more than a launch indexes");
    }
    let (n_i, chw_u) = (n as i32, (c * hw) as u32);
    let cfg = LaunchConfig {
        grid_dim: ((c * hw).div_ceil(4 * THREADS as usize).clamp(1, 65_535) as u32, n.clamp(1, 65_535) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = || format!("residual+bias add {c}ch {hw}px b{n} {:?}", a.dtype());
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let (av, hv, bv) = (view::<$t>(a, la, total)?, view::<$t>(h, lh, total)?, view::<$t>(b, lb, c)?);
            // SAFETY: the kernel writes every one of the `total` values.
            let mut out = unsafe { dev.alloc::<$t>(total)? };
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $name))?;
            let mut args = func.builder();
            args.arg(&av).arg(&hv).arg(&bv).arg(&mut out).arg(&n_i).arg(&chw_u).arg(&hw_m).arg(&hw_s);
            // SAFETY: argument types and order match `residual_bias_add_*` in kernels.cu; `a`,
            // `h` and `out` hold `total` values and `b` `c`.
            profile::time(&dev, name, || unsafe { args.launch(cfg) }.w())?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match (&a.slice, &h.slice, &b.slice) {
        (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => run!(f32, "residual_bias_add_f32"),
        (CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_)) => run!(bf16, "residual_bias_add_bf16"),
        _ => candle_core::bail!("residual add (CUDA): dtypes {:?}/{:?}/{:?} not supported", a.dtype(), h.dtype(), b.dtype()),
    })
}

/// The per-channel sum of `dy` [n, c, h, w] (a convolution's bias gradient), in its dtype: per
/// (image, channel) partial sums in f32, then their sum per channel in image order.
pub(crate) fn channel_sum(dy: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = dy.device.clone();
    let (n, c, h, w) = l.shape().dims4()?;
    let (n_i, c_i, hw64) = (n as i32, c as i32, (h * w) as i64);
    let rows = n * c;
    // One warp a row.
    let warps = THREADS as usize / 32;
    if rows == 0 || rows.div_ceil(warps) > i32::MAX as usize || n > i32::MAX as usize {
        candle_core::bail!("channel sum (CUDA): {n} images x {c} channels is not a launchable grid");
    }
    let rows64 = rows as i64;
    macro_rules! run {
        ($t:ty, $partial:literal, $finish:literal) => {{
            let dyv = view::<$t>(dy, l, n * c * h * w)?;
            // SAFETY: one block per (image, channel) writes its partial sum, then one thread per
            // channel its total: every element of both.
            let mut part = unsafe { dev.alloc::<f32>(rows)? };
            let mut out = unsafe { dev.alloc::<$t>(c)? };
            let partial = dev.get_or_load_custom_func($partial, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $partial))?;
            let finish = dev.get_or_load_custom_func($finish, MODULE, ptx()?).map_err(load_error("unet's CUDA kernels", $finish))?;
            let name = || format!("conv bias grad {c}ch {h}x{w} b{n} {}", stringify!($t));
            let finish_cfg = LaunchConfig { grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            profile::time(&dev, name, || {
                let mut args = partial.builder();
                args.arg(&dyv).arg(&mut part).arg(&hw64).arg(&rows64);
                // SAFETY: argument types and order match `channel_partial_*` in kernels.cu; `dy`
                // holds rows * hw values and `part` rows.
                unsafe { args.launch(rows_config(rows.div_ceil(warps))) }.w()?;
                let mut args = finish.builder();
                args.arg(&part).arg(&mut out).arg(&n_i).arg(&c_i);
                // SAFETY: argument types and order match `channel_finish_*`; `part` holds n * c
                // values and `out` c.
                unsafe { args.launch(finish_cfg) }.w()
            })?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match &dy.slice {
        CudaStorageSlice::F32(_) => run!(f32, "channel_partial_f32", "channel_finish_f32"),
        CudaStorageSlice::BF16(_) => run!(bf16, "channel_partial_bf16", "channel_finish_bf16"),
        _ => candle_core::bail!("channel sum (CUDA): dtype {:?} not supported", dy.dtype()),
    })
}

/// Opt-in GPU-time accounting of our own CUDA ops (`UNET_CUDA_PROFILE=1`): each launch is
/// bracketed by two timing events on its stream, and [`profile::report`] waits for them and
/// sums the time per op and shape. What it leaves out (candle's matmuls, element-wise ops,
/// casts) is the step time minus its total. Off, it costs one flag read per op.
pub mod profile {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::cudarc::driver::CudaEvent;
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::Result;

    thread_local! {
        static SPANS: RefCell<Vec<(String, CudaEvent, CudaEvent, f64)>> = const { RefCell::new(Vec::new()) };
    }

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var("UNET_CUDA_PROFILE").is_ok_and(|v| v == "1"))
    }

    /// Runs `f` (which queues work on `dev`'s stream) and, when profiling, records its GPU span
    /// under the name `name()` gives, with the host's time in `f` (queueing it: for a cuDNN pass,
    /// the library's own per-call work).
    /// A failure of `f` gets the op's name as context, so that an error names the kernel.
    pub fn time<R>(dev: &CudaDevice, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<R>) -> Result<R> {
        // Nor while a CUDA graph is being captured (the sampler's): the events would be
        // captured too, and never recorded as such.
        if !enabled() || capturing(dev) {
            return f().map_err(|e| super::in_context(e, format!("in CUDA op: {}", name())));
        }
        let stream = dev.cuda_stream();
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        let clock = std::time::Instant::now();
        let out = match f() {
            Ok(out) => out,
            Err(e) => return Err(super::in_context(e, format!("in CUDA op: {}", name()))),
        };
        let host_ms = clock.elapsed().as_secs_f64() * 1e3;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        SPANS.with(|s| s.borrow_mut().push((name(), start, end, host_ms)));
        Ok(out)
    }

    fn capturing(dev: &CudaDevice) -> bool {
        use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
        !matches!(dev.cuda_stream().capture_status(), Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE))
    }

    /// Forgets the spans recorded so far (warm-up runs, say).
    pub fn clear() {
        SPANS.with(|s| s.borrow_mut().clear());
    }

    /// One name's spans, summed.
    #[derive(Debug, Clone, Default)]
    pub struct OpTotal {
        pub name: String,
        /// GPU milliseconds between the events around the calls.
        pub gpu_ms: f64,
        /// Host milliseconds spent queueing the calls.
        pub host_ms: f64,
        pub calls: usize,
    }

    /// Totals per name, largest GPU time first; forgets the spans.
    pub fn report() -> Result<Vec<OpTotal>> {
        let spans = SPANS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let mut sums: BTreeMap<String, OpTotal> = BTreeMap::new();
        for (name, start, end, host_ms) in spans {
            let ms = start.elapsed_ms(&end).w()? as f64;
            let e = sums.entry(name.clone()).or_insert_with(|| OpTotal { name, ..OpTotal::default() });
            e.gpu_ms += ms;
            e.host_ms += host_ms;
            e.calls += 1;
        }
        let mut out: Vec<OpTotal> = sums.into_values().collect();
        out.sort_by(|a, b| b.gpu_ms.total_cmp(&a.gpu_ms));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    /// The kernel names the launches above ask for: string literals `"<name>_f32"` /
    /// `"<name>_bf16"` (each found on its own, whatever other quotes the file holds).
    fn names_asked_for(rust_src: &str, suffixes: &[&str]) -> Vec<String> {
        let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        let mut names: Vec<String> = rust_src
            .match_indices('"')
            .filter_map(|(i, _)| {
                let rest = &rust_src[i + 1..];
                let n = rest.bytes().take_while(|&b| ident(b)).count();
                (n > 0 && rest[n..].starts_with('"')).then(|| &rest[..n])
            })
            .filter(|s| !s.starts_with('_') && suffixes.iter().any(|x| s.ends_with(x)))
            .map(String::from)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// NVRTC is a host library, so the kernels compile here as the device path compiles them,
    /// though no GPU runs them (`scripts/gpu/test-cuda-build.sh`): a source NVRTC refuses, or a
    /// launch asking for a kernel the PTX does not have, would otherwise first show on a GPU.
    #[test]
    fn the_kernels_compile_with_nvrtc_and_have_every_entry_point_asked_for() {
        let ptx = super::ptx().unwrap();
        let asked = names_asked_for(include_str!("cuda_ops.rs"), &["_f32", "_bf16"]);
        assert_eq!(asked.len(), 22, "{asked:?}");
        for name in &asked {
            assert!(ptx.contains(&format!(".entry {name}(")), "the PTX has no entry {name}");
        }
        let defined = super::SRC.matches("__global__ void ").count();
        assert_eq!(ptx.matches(".entry ").count(), defined, "every kernel of kernels.cu is in the PTX");
    }
}
