//! The three passes of a convolution on CUDA through cuDNN (forward, backward-data,
//! backward-filter), for f32, bf16 and f16.
//!
//! candle 0.11 uses cuDNN only for the forward pass; its backward goes through a hand-written
//! `conv_transpose2d` kernel for the input gradient and a convolution with the whole output map
//! as kernel for the weight gradient, far from what cuDNN's backward kernels (which PyTorch
//! uses) do on the same card. `crate::conv` calls these from its custom ops' `cuda_fwd`.
//!
//! Each (pass, shape) gets its algorithm once, from cuDNN's heuristics (`cudnnGet*Algorithm_v7`,
//! as PyTorch does with `benchmark=False`), or with `UNET_CUDNN_ALGO=find` from cuDNN's Find
//! (`cudnnFind*AlgorithmEx`: every algorithm run and timed on the call's own buffers, as with
//! PyTorch's `torch.backends.cudnn.benchmark = True`), with the math type of the fastest result.
//! On an H100 (stop 25) Find's choices made the training step slower, 0.222 s against 0.124 s
//! in f32, and their convolutions took more GPU time in the step than the heuristics' (e.g. the
//! weight gradients 65.9 ms against 23.2), so the heuristics stay the default. The choice is
//! cached per shape once one has run, with the call's descriptors and workspace size
//! (`Prepared`), so that later calls of the shape make the one cuDNN call that runs the pass.
//! Should the heuristics fail, or their choice be unsupported, want more scratch memory than
//! can be had, or fail to launch, the pass tries the algorithms every build has (precomputed
//! then plain implicit GEMM forward,
//! algorithms 1 then 0 backward), as PyTorch goes down its list; a choice that failed only for
//! want of memory is not replaced in the cache. (cudarc gives the heuristics'
//! first choice only, not its math type: there, our math types are PyTorch's defaults.)
//!
//! f32 convolutions may use TF32 tensor cores, as PyTorch's cuDNN convolutions do by default;
//! `set_tf32(false)` asks for exact f32 (the self-test does, to compare with the CPU at 1e-3).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::safe::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::cudnn::{sys, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::conv::Geometry;

mod graph;

static TF32: AtomicBool = AtomicBool::new(true);

/// Whether f32 convolutions may use TF32 tensor cores (default: yes, like PyTorch's cuDNN).
pub fn set_tf32(on: bool) {
    TF32.store(on, Ordering::Relaxed);
}

pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// The custom ops are used on CUDA unless `UNET_CUDA_CONV=candle` (candle's own conv2d and its
/// backward: for A/B runs, and a way out should a cuDNN algorithm misbehave on some card).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CUDA_CONV").map_or(true, |v| v != "candle"))
}

/// Whether algorithms are measured by cuDNN's Find (`UNET_CUDNN_ALGO=find`) rather than taken
/// from its heuristics (the default: Find's choices measured slower in the step, above).
pub fn find_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CUDNN_ALGO").is_ok_and(|v| v == "find"))
}

/// Whether 1x1 convolutions (stride 1, no padding) in bf16 or f16 go through cuBLAS instead of
/// cuDNN (`UNET_CONV1X1=gemm`), all three passes (`conv::gemm_1x1`): the forward pass and the
/// input gradient one batched GEMM each, the weight gradient one GEMM over the batch and the
/// pixels together after two channel-major copies. On an H100 (stop 25) cuDNN's heuristics took
/// 10.6 ms for the step's 20 bf16 forward passes of 256->256 at 16x16, where f32 took 0.9 ms; a
/// GEMM of that size is tens of microseconds. The backward passes' GPU times were in line, but
/// the bf16 step's host time was 1.7 times the f32 step's, with cuBLASLt (which cuDNN's GEMM
/// engines call) at 13% of the host's samples against 5%: the backward passes go through cuBLAS
/// too since stop 30. Not yet run on a GPU, so opt-in: the check's step 7 self-tests and
/// times it.
pub fn gemm_1x1_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CONV1X1").is_ok_and(|v| v == "gemm"))
}

fn takes_gemm_1x1(d: Geometry, dtype: DType) -> bool {
    d.k == 1 && d.stride == 1 && d.padding == 0 && matches!(dtype, DType::BF16 | DType::F16) && gemm_1x1_enabled()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Pass {
    /// (x, w) -> y
    Forward,
    /// (dy, w) -> dx
    InputGrad,
    /// (x, dy) -> dw
    WeightGrad,
}

#[derive(Debug, Clone, Copy)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    InputGrad(sys::cudnnConvolutionBwdDataAlgo_t),
    WeightGrad(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// Pass, element type, exact f32 or not, shape.
type AlgoKey = (Pass, DType, bool, Geometry);

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device, as candle does.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    // Choices cost little (heuristics) or much (Find) but would run per call and per layer: keep
    // each per shape, with the math type Find measured it with (none: our default's).
    static ALGOS: RefCell<HashMap<AlgoKey, (Algo, Option<sys::cudnnMathType_t>)>> = RefCell::new(HashMap::new());
    // Find needs the raw handle and descriptors, which cudarc's safe types keep to themselves.
    static RAW_HANDLES: RefCell<HashMap<DeviceId, find::RawHandle>> = RefCell::new(HashMap::new());
    // Each cached (pass, shape)'s descriptors and workspace size, a `Prepared<T, C>` (`run_typed`).
    static PREPARED: RefCell<HashMap<(AlgoKey, DeviceId), Box<dyn std::any::Any>>> = RefCell::new(HashMap::new());
    // Launches from `PREPARED` so far, and the keys whose kept launch failed, with the error:
    // those go the full way from then on (and say so in `choices`).
    static PREPARED_LAUNCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static PREPARED_FAILED: RefCell<HashMap<(AlgoKey, DeviceId), String>> = RefCell::new(HashMap::new());
}

/// Passes launched from kept descriptors on this thread so far, and how many (pass, shape)s
/// went back to the full path after such a launch failed (the self-test checks both).
pub fn prepared_launches() -> (usize, usize) {
    (PREPARED_LAUNCHES.with(|n| n.get()), PREPARED_FAILED.with(|f| f.borrow().len()))
}

/// Whether cached shapes launch from their kept descriptors ([`Prepared`]); `UNET_CUDNN_PREPARED=0`
/// makes them again on every call, as before (an A/B switch, and the check script's first
/// fallback when a convolution check fails).
pub fn prepared_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CUDNN_PREPARED").map_or(true, |v| v != "0"))
}

/// What a (pass, shape) needs for its launch once its algorithm is cached: its descriptors and
/// the algorithm's workspace size. Without them every call made, set and destroyed four
/// descriptors, set the math type and asked cuDNN for the workspace size: some fifteen cuDNN
/// calls, the pass included; cuDNN 9 serves the legacy workspace query through its engine
/// machinery, which the H100's host profile showed choosing engines per call (stop 25: 16% of
/// the host's samples in cuDNN, the step host-bound).
struct Prepared<T: 'static, C: 'static> {
    conv: ConvDescriptor<C>,
    x: TensorDescriptor<T>,
    y: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    algo: Algo,
    workspace: usize,
}

impl<T: CudnnDataType + DeviceRepr + WithDType, C: CudnnDataType> Prepared<T, C> {
    fn workspace_size(&self) -> Result<usize> {
        let (conv, x, y, w) = (&self.conv, &self.x, &self.y, &self.w);
        match self.algo {
            Algo::Forward(a) => ConvForward { conv, x, w, y }.get_workspace_size(a),
            Algo::InputGrad(a) => ConvBackwardData { conv, dx: x, w, dy: y }.get_workspace_size(a),
            Algo::WeightGrad(a) => ConvBackwardFilter { conv, x, dw: w, dy: y }.get_workspace_size(a),
        }
        .map_err(candle_core::Error::wrap)
    }

    /// The pass into a new output of `out_len` elements: `a` and `b` as in [`run_typed`].
    fn launch(&self, pass: Pass, dev: &CudaDevice, a: &CudaView<T>, b: &CudaView<T>, out_len: usize) -> Result<CudaSlice<T>> {
        let (conv, x, y, w) = (&self.conv, &self.x, &self.y, &self.w);
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        // SAFETY: the pass writes every element of the output (beta = 0).
        let mut out = unsafe { dev.alloc::<T>(out_len)? };
        let mut ws = workspace(dev, self.workspace)?;
        // SAFETY: these descriptors were made for this key's shapes and element type (NCHW,
        // contiguous), and ran this algorithm with this workspace size before.
        unsafe {
            match (pass, self.algo) {
                (Pass::Forward, Algo::Forward(alg)) => ConvForward { conv, x, w, y }.launch(alg, ws.as_mut(), (one, zero), a, b, &mut out),
                (Pass::InputGrad, Algo::InputGrad(alg)) => ConvBackwardData { conv, dx: x, w, dy: y }.launch(alg, ws.as_mut(), (one, zero), &mut out, b, a),
                (Pass::WeightGrad, Algo::WeightGrad(alg)) => ConvBackwardFilter { conv, x, dw: w, dy: y }.launch(alg, ws.as_mut(), (one, zero), a, &mut out, b),
                (p, alg) => candle_core::bail!("cuDNN: {alg:?} cached for the {p:?} pass"),
            }
        }
        .map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn contiguous<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!("cuDNN conv2d expects contiguous inputs");
    }
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Runs one pass: `a`, `b` are (x, w), (dy, w) or (x, dy) as `pass` says.
pub(crate) fn run(pass: Pass, d: Geometry, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    let dev = a.device.clone();
    let name = || format!("conv {pass:?} {}->{} {}x{} k{} s{} b{} {:?}", d.c, d.o, d.h, d.w, d.k, d.stride, d.b, a.dtype());
    if takes_gemm_1x1(d, a.dtype()) && a.dtype() == b.dtype() {
        use crate::conv::gemm_1x1;
        let name = || format!("{} (GEMM)", name());
        return crate::cuda_ops::profile::time(&dev, name, || match pass {
            Pass::Forward => gemm_1x1::forward(d, a, la, b, lb),
            Pass::InputGrad => gemm_1x1::input_grad(d, a, la, b, lb),
            Pass::WeightGrad => gemm_1x1::weight_grad(d, a, la, b, lb),
        });
    }
    crate::cuda_ops::profile::time(&dev, name, || match (&a.slice, &b.slice) {
        (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => run_typed::<f32, f32>(pass, d, a, la, b, lb, &dev),
        // cuDNN has only the "pseudo" half configurations: half storage, f32 compute.
        (CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_)) => run_typed::<bf16, f32>(pass, d, a, la, b, lb, &dev),
        (CudaStorageSlice::F16(_), CudaStorageSlice::F16(_)) => run_typed::<f16, f32>(pass, d, a, la, b, lb, &dev),
        _ => candle_core::bail!("cuDNN conv2d: dtypes {:?} and {:?} not supported together", a.dtype(), b.dtype()),
    })
}

fn run_typed<T, C>(pass: Pass, d: Geometry, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout, dev: &CudaDevice) -> Result<CudaStorage>
where
    T: CudaDType + DeviceRepr + ValidAsZeroBits + CudnnDataType + WithDType,
    C: CudnnDataType + 'static,
{
    use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
    let w = |e| candle_core::Error::wrap(e);
    let (p, s) = (d.padding as i32, d.stride as i32);
    let strict = T::DTYPE == DType::F32 && !tf32();
    // FMA math forbids tensor cores (and so TF32); the default lets cuDNN use them for f32 on
    // Ampere and later, and always for the half types (PyTorch's choices, `Descriptors.h`).
    let math = match (T::DTYPE, strict) {
        (DType::F32, true) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        (DType::F32, false) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    let key = (pass, T::DTYPE, strict, d);
    let av = contiguous::<T>(a, la)?;
    let bv = contiguous::<T>(b, lb)?;
    let geometry = find::Geometry4 {
        x: [d.b as i32, d.c as i32, d.h as i32, d.w as i32],
        y: [d.b as i32, d.o as i32, d.ho() as i32, d.wo() as i32],
        w: [d.o as i32, d.c as i32, d.k as i32, d.k as i32],
        pad: p,
        stride: s,
        data: T::DATA_TYPE,
        compute: C::DATA_TYPE,
        math,
        strict,
    };
    let out_len = match pass {
        Pass::Forward => d.b * d.o * d.hw_out(),
        Pass::InputGrad => d.b * d.c * d.h * d.w,
        Pass::WeightGrad => d.o * d.ckk(),
    };
    if graph::enabled() && !strict {
        // SAFETY: the pass writes every element of the output (beta = 0).
        let mut out = unsafe { dev.alloc::<T>(out_len)? };
        if graph::run(key, pass, &geometry, dev, &av, &bv, &mut out)? {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
    }
    let prepared_key = (key, dev.id());
    let prepared = prepared_enabled().then(|| PREPARED.with(|m| {
        let m = m.borrow();
        m.get(&prepared_key)
            .and_then(|p| p.downcast_ref::<Prepared<T, C>>())
            .map(|p| p.launch(pass, dev, &av, &bv, out_len))
    })).flatten();
    match prepared {
        Some(Ok(out)) => {
            PREPARED_LAUNCHES.with(|n| n.set(n.get() + 1));
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        // The full path below tries the fallbacks; this shape is not kept again.
        Some(Err(e)) => {
            PREPARED.with(|m| m.borrow_mut().remove(&prepared_key));
            PREPARED_FAILED.with(|f| f.borrow_mut().insert(prepared_key, e.to_string()));
        }
        None => {}
    }
    let cudnn = handle(dev)?;
    let mut conv = cudnn.create_conv2d::<C>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION).map_err(w)?;
    conv.set_math_type(math).map_err(w)?;
    let x_desc = cudnn.create_4d_tensor::<T>(NCHW, [d.b as i32, d.c as i32, d.h as i32, d.w as i32]).map_err(w)?;
    let y_desc = cudnn.create_4d_tensor::<T>(NCHW, [d.b as i32, d.o as i32, d.ho() as i32, d.wo() as i32]).map_err(w)?;
    let w_desc = cudnn.create_4d_filter::<T>(NCHW, [d.o as i32, d.c as i32, d.k as i32, d.k as i32]).map_err(w)?;
    let cached = ALGOS.with(|m| m.borrow().get(&key).copied());
    if let Some((_, Some(m))) = cached {
        conv.set_math_type(m).map_err(w)?;
    }
    let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
    // Measured once per shape when nothing is cached; `None` leaves it to the heuristics.
    let measure = |out: &mut CudaSlice<T>, sizes: &dyn Fn(u32) -> Option<usize>| -> Option<(u32, sys::cudnnMathType_t)> {
        if cached.is_some() || !find_enabled() {
            return None;
        }
        find::fastest(pass, &geometry, dev, &av, &bv, out, sizes)
    };
    // SAFETY (each `alloc`): cuDNN writes every element of the output (beta = 0).
    // SAFETY (each `launch`): the descriptors above describe these buffers (NCHW, contiguous,
    // element type T), and the output is the one the pass writes.
    // One pass: Find's or the cache's or the heuristics' algorithm, then the launch. `$op` builds
    // the pass's cudarc op (again after the math type changes: it borrows the descriptor),
    // `$launch` runs it as `$o` with algorithm `$a`, workspace `$ws`, into `$out`.
    macro_rules! pass {
        ($op:expr, $table:expr, $variant:path, $fallbacks:expr, |$o:ident, $a:ident, $ws:ident, $out:ident| $launch:expr) => {{
            let mut out = unsafe { dev.alloc::<T>(out_len)? };
            let found = {
                let op = $op;
                measure(&mut out, &|i| op.get_workspace_size($table[i as usize]).ok()).map(|(i, m)| ($table[i as usize], m))
            };
            let (first, found_math) = {
                let op = $op;
                first_choice(cached, |a| if let $variant(a) = a { Some(a) } else { None }, found, || op.pick_algorithm().ok())
            };
            if let (Some(m), None) = (found_math, cached) {
                conv.set_math_type(m).map_err(w)?;
            }
            let $o = $op;
            run_first_that_runs(key, $variant, (first, found_math), &$fallbacks, dev, |a| $o.get_workspace_size(a).map_err(w), |$a, $ws| {
                let $out = &mut out;
                unsafe { $launch.map_err(w) }
            })?;
            out
        }};
    }
    use sys::cudnnConvolutionBwdDataAlgo_t as D;
    use sys::cudnnConvolutionBwdFilterAlgo_t as B;
    use sys::cudnnConvolutionFwdAlgo_t as F;
    let out: CudaSlice<T> = match pass {
        Pass::Forward => pass!(
            ConvForward { conv: &conv, x: &x_desc, w: &w_desc, y: &y_desc },
            find::FWD,
            Algo::Forward,
            [F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM],
            |op, a, ws, out| op.launch(a, ws.as_mut(), (one, zero), &av, &bv, out)
        ),
        // `a` is dy, `b` the kernel.
        Pass::InputGrad => pass!(
            ConvBackwardData { conv: &conv, dx: &x_desc, w: &w_desc, dy: &y_desc },
            find::DATA,
            Algo::InputGrad,
            [D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0],
            |op, a, ws, out| op.launch(a, ws.as_mut(), (one, zero), out, &bv, &av)
        ),
        // `a` is x, `b` is dy.
        Pass::WeightGrad => pass!(
            ConvBackwardFilter { conv: &conv, x: &x_desc, dw: &w_desc, dy: &y_desc },
            find::FILTER,
            Algo::WeightGrad,
            [B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0],
            |op, a, ws, out| op.launch(a, ws.as_mut(), (one, zero), &av, out, &bv)
        ),
    };
    // Cached (not a choice that memory decided): later calls launch it from `Prepared`, with
    // these descriptors and their math type as it ran.
    let keep = prepared_enabled() && !PREPARED_FAILED.with(|f| f.borrow().contains_key(&prepared_key));
    if let Some((algo, _)) = ALGOS.with(|m| m.borrow().get(&key).copied()).filter(|_| keep) {
        let mut p = Prepared::<T, C> { conv, x: x_desc, y: y_desc, w: w_desc, algo, workspace: 0 };
        if let Ok(n) = p.workspace_size() {
            p.workspace = n;
            PREPARED.with(|m| m.borrow_mut().insert(prepared_key, Box::new(p)));
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The algorithm to try first and the math type it runs with: the cached choice, else Find's
/// (`found`), else the heuristics'; the math type is `None` where our default applies.
fn first_choice<A>(
    cached: Option<(Algo, Option<sys::cudnnMathType_t>)>,
    of_pass: fn(Algo) -> Option<A>,
    found: Option<(A, sys::cudnnMathType_t)>,
    heuristics: impl FnOnce() -> Option<A>,
) -> (Option<A>, Option<sys::cudnnMathType_t>) {
    match (cached.and_then(|(a, m)| of_pass(a).map(|a| (a, m))), found) {
        (Some((a, m)), _) => (Some(a), m),
        (None, Some((a, m))) => (Some(a), Some(m)),
        (None, None) => (heuristics(), None),
    }
}

/// Runs the pass with `first` (the cached choice, Find's or the heuristics', with the math type Find ran
/// it with), else with each of
/// `fallbacks` (algorithms every cuDNN build has for these NCHW shapes), by
/// [`crate::conv::first_that_runs`], and caches what ran when that says it may.
fn run_first_that_runs<A: Copy + PartialEq + std::fmt::Debug>(
    key: AlgoKey,
    wrap: fn(A) -> Algo,
    (first, first_math): (Option<A>, Option<sys::cudnnMathType_t>),
    fallbacks: &[A],
    dev: &CudaDevice,
    workspace_size: impl Fn(A) -> Result<usize>,
    launch: impl FnMut(A, &mut Option<CudaSlice<u8>>) -> Result<()>,
) -> Result<()> {
    let (ran, cacheable) = crate::conv::first_that_runs(first.into_iter().chain(fallbacks.iter().copied()), workspace_size, |n| workspace(dev, n), launch)?;
    // After a Find (whose choice comes with its math type), what ran is kept even when a
    // candidate before it was short of memory: Find costs milliseconds, and would run again on
    // every call of the shape (the H100 run with Find on had single calls of 7 to 29 ms in its
    // profiled step, which a repeated Find would explain).
    if cacheable || first_math.is_some() {
        // A fallback ran with the descriptor's math type as it was set for `first`: cached with
        // it, later calls launch it as this one did.
        ALGOS.with(|m| m.borrow_mut().insert(key, (wrap(ran), first_math)));
    }
    Ok(())
}

/// cuDNN's scratch space; its contents are never read before being written.
fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: scratch only, as above.
    Ok(Some(unsafe { dev.alloc::<u8>(bytes)? }))
}

/// The algorithm cached for each (pass, element type, exact f32, shape) on this thread and how
/// it was chosen, or its graph plan (`UNET_CUDNN_API=graph`), for the bench's profile; then
/// what Find or the graph API could not do, if anything.
pub fn choices() -> Vec<String> {
    let mut out: Vec<String> = ALGOS.with(|m| {
        m.borrow()
            .iter()
            .map(|((pass, dt, strict, d), (algo, math))| {
                let how = match math {
                    Some(m) => format!("Find, {m:?}"),
                    None => "heuristics or fallback".into(),
                };
                let exact = if *strict { " exact" } else { "" };
                format!("conv {pass:?} {}->{} {}x{} k{} s{} b{} {dt:?}{exact}: {algo:?} ({how})", d.c, d.o, d.h, d.w, d.k, d.stride, d.b)
            })
            .collect()
    });
    out.extend(graph::planned().into_iter().map(|((pass, dt, strict, d), ok)| {
        let exact = if strict { " exact" } else { "" };
        let how = if ok { "graph plan" } else { "no graph plan: legacy calls" };
        format!("conv {pass:?} {}->{} {}x{} k{} s{} b{} {dt:?}{exact}: {how}", d.c, d.o, d.h, d.w, d.k, d.stride, d.b)
    }));
    out.sort();
    out.extend(find::FAILURES.with(|f| f.borrow().iter().map(|e| format!("Find failed: {e}")).collect::<Vec<_>>()));
    out.extend(graph::FAILURES.with(|f| f.borrow().iter().map(|e| format!("Graph API failed: {e}")).collect::<Vec<_>>()));
    out.extend(PREPARED_FAILED.with(|f| {
        f.borrow()
            .iter()
            .map(|(((pass, dt, strict, d), _), e)| {
                let exact = if *strict { " exact" } else { "" };
                format!("kept descriptors failed, conv {pass:?} {}->{} {}x{} k{} s{} b{} {dt:?}{exact}: {e}", d.c, d.o, d.h, d.w, d.k, d.stride, d.b)
            })
            .collect::<Vec<_>>()
    }));
    out
}

/// cuDNN's Find through the raw API (cudarc's safe descriptors keep their handles private).
mod find {
    use std::cell::RefCell;
    use std::ffi::c_void;

    use candle_core::cuda_backend::cudarc::cudnn::result::{self, CudnnError};
    use candle_core::cuda_backend::cudarc::cudnn::sys;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr};
    use candle_core::cuda_backend::CudaDevice;

    use super::{Pass, RAW_HANDLES};

    thread_local! {
        pub(super) static FAILURES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Each pass's algorithms, indexed by their cuDNN value.
    pub(super) const FWD: [sys::cudnnConvolutionFwdAlgo_t; 8] = {
        use sys::cudnnConvolutionFwdAlgo_t as F;
        [
            F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            F::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            F::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            F::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            F::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            F::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            F::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        ]
    };
    pub(super) const DATA: [sys::cudnnConvolutionBwdDataAlgo_t; 6] = {
        use sys::cudnnConvolutionBwdDataAlgo_t as D;
        [
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        ]
    };
    pub(super) const FILTER: [sys::cudnnConvolutionBwdFilterAlgo_t; 7] = {
        use sys::cudnnConvolutionBwdFilterAlgo_t as B;
        [
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        ]
    };

    /// Find's scratch space at most. The implicit-GEMM algorithms that win at these sizes need
    /// little; FFT ones can ask for gigabytes, and what Find takes stays in our memory pool (and
    /// in the peak the bench reports).
    const MAX_WORKSPACE: usize = 256 << 20;

    pub(super) struct RawHandle(sys::cudnnHandle_t);

    impl Drop for RawHandle {
        fn drop(&mut self) {
            // SAFETY: created by `create_handle` below, destroyed once.
            let _ = unsafe { result::destroy_handle(self.0) };
        }
    }

    /// A pass's shapes and types, as the safe descriptors of `run_typed` have them.
    pub(super) struct Geometry4 {
        pub x: [i32; 4],
        pub y: [i32; 4],
        pub w: [i32; 4],
        pub pad: i32,
        pub stride: i32,
        pub data: sys::cudnnDataType_t,
        pub compute: sys::cudnnDataType_t,
        pub math: sys::cudnnMathType_t,
        /// Exact f32: only results without tensor-core math count.
        pub strict: bool,
    }

    struct Descriptors {
        x: sys::cudnnTensorDescriptor_t,
        y: sys::cudnnTensorDescriptor_t,
        w: sys::cudnnFilterDescriptor_t,
        conv: sys::cudnnConvolutionDescriptor_t,
    }

    impl Drop for Descriptors {
        fn drop(&mut self) {
            // SAFETY: each was created below (or is null, never created) and is destroyed once.
            unsafe {
                if !self.x.is_null() {
                    let _ = result::destroy_tensor_descriptor(self.x);
                }
                if !self.y.is_null() {
                    let _ = result::destroy_tensor_descriptor(self.y);
                }
                if !self.w.is_null() {
                    let _ = result::destroy_filter_descriptor(self.w);
                }
                if !self.conv.is_null() {
                    let _ = result::destroy_convolution_descriptor(self.conv);
                }
            }
        }
    }

    fn descriptors(g: &Geometry4) -> Result<Descriptors, CudnnError> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let null = std::ptr::null_mut();
        let mut d = Descriptors { x: null, y: null as _, w: null as _, conv: null as _ };
        d.x = result::create_tensor_descriptor()?;
        d.y = result::create_tensor_descriptor()?;
        d.w = result::create_filter_descriptor()?;
        d.conv = result::create_convolution_descriptor()?;
        // SAFETY: the descriptors were just created.
        unsafe {
            result::set_tensor4d_descriptor(d.x, NCHW, g.data, g.x)?;
            result::set_tensor4d_descriptor(d.y, NCHW, g.data, g.y)?;
            result::set_filter4d_descriptor(d.w, g.data, NCHW, g.w)?;
            result::set_convolution2d_descriptor(d.conv, g.pad, g.pad, g.stride, g.stride, 1, 1, sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION, g.compute)?;
            result::set_convolution_math_type(d.conv, g.math)?;
        }
        Ok(d)
    }

    pub(super) fn handle(dev: &CudaDevice) -> Result<sys::cudnnHandle_t, CudnnError> {
        RAW_HANDLES.with(|m| {
            if let Some(h) = m.borrow().get(&dev.id()) {
                return Ok(h.0);
            }
            let h = RawHandle(result::create_handle()?);
            // SAFETY: the handle was just created; the stream is the device's, which all our
            // work on this thread goes to, so Find runs after what wrote its inputs.
            unsafe { result::set_stream(h.0, dev.cuda_stream().cu_stream() as sys::cudaStream_t)? };
            let raw = h.0;
            m.borrow_mut().insert(dev.id(), h);
            Ok(raw)
        })
    }

    /// The fastest algorithm (its cuDNN value) and its math type that Find measured on these
    /// buffers (`a`, `b` and `out` as `run_typed` passes them), or `None` (the reason kept
    /// for [`super::choices`]) to leave the choice to the heuristics. `sizes` gives an
    /// algorithm's workspace, `None` when it does not apply.
    pub(super) fn fastest<T: DeviceRepr>(
        pass: Pass,
        g: &Geometry4,
        dev: &CudaDevice,
        a: &CudaView<T>,
        b: &CudaView<T>,
        out: &mut CudaSlice<T>,
        sizes: &dyn Fn(u32) -> Option<usize>,
    ) -> Option<(u32, sys::cudnnMathType_t)> {
        let found = (|| -> candle_core::Result<Option<(u32, sys::cudnnMathType_t)>> {
            let w = candle_core::Error::wrap;
            let count = match pass {
                Pass::Forward => FWD.len(),
                Pass::InputGrad => DATA.len(),
                Pass::WeightGrad => FILTER.len(),
            };
            let want = (0..count as u32).filter_map(sizes).max().unwrap_or(0).min(MAX_WORKSPACE);
            // The most scratch memory that can be had, up to what the hungriest algorithm wants;
            // algorithms wanting more are left out of the race.
            let mut bytes = want;
            let mut ws: Option<CudaSlice<u8>> = None;
            while bytes > 0 {
                // SAFETY: scratch only: cuDNN writes it before reading it.
                match unsafe { dev.alloc::<u8>(bytes) } {
                    Ok(s) => {
                        ws = Some(s);
                        break;
                    }
                    Err(_) => bytes /= 2,
                }
            }
            let d = descriptors(g).map_err(w)?;
            let h = handle(dev).map_err(w)?;
            let stream = dev.cuda_stream();
            let (ap, _ga) = a.device_ptr(&stream);
            let (bp, _gb) = b.device_ptr(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            let (wsp, _gw) = match ws.as_mut() {
                Some(s) => {
                    let (p, g) = s.device_ptr_mut(&stream);
                    (p as *mut c_void, Some(g))
                }
                None => (std::ptr::null_mut(), None),
            };
            let (ap, bp, op) = (ap as *const c_void, bp as *const c_void, op as *mut c_void);
            let mut n: i32 = 0;
            // (algorithm, status, math type) of each result, fastest first.
            let results: Vec<(u32, sys::cudnnStatus_t, sys::cudnnMathType_t)> = match pass {
                Pass::Forward => {
                    // SAFETY: all-zero bytes are a valid value of these plain C structs.
                    let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = unsafe { std::mem::zeroed() };
                    // SAFETY: the descriptors describe these buffers (x = a, w = b, y = out), the
                    // workspace is `bytes` long, and the guards keep the pointers valid until the
                    // call returns (Find runs synchronously).
                    unsafe { sys::cudnnFindConvolutionForwardAlgorithmEx(h, d.x, ap, d.w, bp, d.conv, d.y, op, perf.len() as i32, &mut n, perf.as_mut_ptr(), wsp, bytes) }.result().map_err(w)?;
                    perf[..n.clamp(0, perf.len() as i32) as usize].iter().map(|p| (p.algo as u32, p.status, p.mathType)).collect()
                }
                Pass::InputGrad => {
                    // SAFETY: as above.
                    let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 6] = unsafe { std::mem::zeroed() };
                    // SAFETY: as above, with w = b, dy = a, dx = out.
                    unsafe { sys::cudnnFindConvolutionBackwardDataAlgorithmEx(h, d.w, bp, d.y, ap, d.conv, d.x, op, perf.len() as i32, &mut n, perf.as_mut_ptr(), wsp, bytes) }.result().map_err(w)?;
                    perf[..n.clamp(0, perf.len() as i32) as usize].iter().map(|p| (p.algo as u32, p.status, p.mathType)).collect()
                }
                Pass::WeightGrad => {
                    // SAFETY: as above.
                    let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 7] = unsafe { std::mem::zeroed() };
                    // SAFETY: as above, with x = a, dy = b, dw = out.
                    unsafe { sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(h, d.x, ap, d.y, bp, d.conv, d.w, op, perf.len() as i32, &mut n, perf.as_mut_ptr(), wsp, bytes) }.result().map_err(w)?;
                    perf[..n.clamp(0, perf.len() as i32) as usize].iter().map(|p| (p.algo as u32, p.status, p.mathType)).collect()
                }
            };
            Ok(pick(&results, g.strict, count))
        })();
        match found {
            Ok(found) => found,
            Err(e) => {
                FAILURES.with(|f| f.borrow_mut().push(format!("{pass:?} x {:?} w {:?}: {e}", g.x, g.w)));
                None
            }
        }
    }

    /// The first (fastest) result that ran and whose math keeps the precision asked for: exact
    /// f32 takes FMA math only, and no type takes a conversion to half precision (f16's range
    /// is narrower than f32's and bf16's).
    pub(super) fn pick(results: &[(u32, sys::cudnnStatus_t, sys::cudnnMathType_t)], strict: bool, count: usize) -> Option<(u32, sys::cudnnMathType_t)> {
        use sys::cudnnMathType_t as M;
        results
            .iter()
            .find(|(algo, status, math)| {
                (*algo as usize) < count
                    && *status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                    && (!strict || *math == M::CUDNN_FMA_MATH)
                    && *math != M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
            })
            .map(|(algo, _, math)| (*algo, *math))
    }
}

#[cfg(test)]
mod tests {
    use super::find::{pick, FWD};
    use super::sys::{cudnnMathType_t as M, cudnnStatus_t as S};

    #[test]
    fn find_takes_the_fastest_result_that_ran_with_the_precision_asked_for() {
        let ok = S::CUDNN_STATUS_SUCCESS;
        let results = [
            (6, S::CUDNN_STATUS_NOT_SUPPORTED, M::CUDNN_FMA_MATH),
            (1, ok, M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION),
            (7, ok, M::CUDNN_TENSOR_OP_MATH),
            (0, ok, M::CUDNN_FMA_MATH),
        ];
        let n = FWD.len();
        // bf16, or f32 with TF32: the first that ran, but never a conversion to half.
        assert_eq!(pick(&results, false, n), Some((7, M::CUDNN_TENSOR_OP_MATH)));
        // Exact f32: FMA math only.
        assert_eq!(pick(&results, true, n), Some((0, M::CUDNN_FMA_MATH)));
        assert_eq!(pick(&results[..3], true, n), None);
        // An algorithm value this build does not know is skipped, not indexed.
        assert_eq!(pick(&[(8, ok, M::CUDNN_FMA_MATH)], true, n), None);
        assert_eq!(pick(&[], false, n), None);
    }

    #[test]
    fn each_algorithm_table_is_indexed_by_its_cudnn_value() {
        assert!(super::find::FWD.iter().enumerate().all(|(i, a)| *a as usize == i));
        assert!(super::find::DATA.iter().enumerate().all(|(i, a)| *a as usize == i));
        assert!(super::find::FILTER.iter().enumerate().all(|(i, a)| *a as usize == i));
    }
}
