//! The three passes of a convolution on CUDA through cuDNN (forward, backward-data,
//! backward-filter), for f32, bf16 and f16.
//!
//! candle 0.11 uses cuDNN only for the forward pass; its backward goes through a hand-written
//! `conv_transpose2d` kernel for the input gradient and a convolution with the whole output map
//! as kernel for the weight gradient, far from what cuDNN's backward kernels (which PyTorch
//! uses) do on the same card. `crate::conv` calls these from its custom ops' `cuda_fwd`.
//!
//! Algorithms come from cuDNN's heuristics (`cudnnGet*Algorithm_v7`, as PyTorch does with
//! `benchmark=False`), cached per shape once one has run. Should the heuristics fail, or their
//! choice be unsupported, want more scratch memory than can be had, or fail to launch, the pass
//! tries the algorithms every build has (precomputed then plain implicit GEMM forward,
//! algorithms 1 then 0 backward), as PyTorch goes down its list; a choice that failed only for
//! want of memory is not replaced in the cache. (cudarc gives the heuristics'
//! first choice only, not its math type; our math types are PyTorch's defaults.)
//!
//! f32 convolutions may use TF32 tensor cores, as PyTorch's cuDNN convolutions do by default;
//! `set_tf32(false)` asks for exact f32 (the self-test does, to compare with the CPU at 1e-3).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::safe::{ConvBackwardData, ConvBackwardFilter, ConvForward, Cudnn};
use candle_core::cuda_backend::cudarc::cudnn::{sys, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::conv::Geometry;

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
    // Heuristic queries cost little but run per call and per layer: keep their answer per shape.
    static ALGOS: RefCell<HashMap<AlgoKey, Algo>> = RefCell::new(HashMap::new());
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
    C: CudnnDataType,
{
    use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
    let w = |e| candle_core::Error::wrap(e);
    let cudnn = handle(dev)?;
    let (p, s) = (d.padding as i32, d.stride as i32);
    let mut conv = cudnn.create_conv2d::<C>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION).map_err(w)?;
    let strict = T::DTYPE == DType::F32 && !tf32();
    // FMA math forbids tensor cores (and so TF32); the default lets cuDNN use them for f32 on
    // Ampere and later, and always for the half types (PyTorch's choices, `Descriptors.h`).
    let math = match (T::DTYPE, strict) {
        (DType::F32, true) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        (DType::F32, false) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    conv.set_math_type(math).map_err(w)?;
    let x_desc = cudnn.create_4d_tensor::<T>(NCHW, [d.b as i32, d.c as i32, d.h as i32, d.w as i32]).map_err(w)?;
    let y_desc = cudnn.create_4d_tensor::<T>(NCHW, [d.b as i32, d.o as i32, d.ho() as i32, d.wo() as i32]).map_err(w)?;
    let w_desc = cudnn.create_4d_filter::<T>(NCHW, [d.o as i32, d.c as i32, d.k as i32, d.k as i32]).map_err(w)?;
    let key = (pass, T::DTYPE, strict, d);
    let cached = ALGOS.with(|m| m.borrow().get(&key).copied());
    let av = contiguous::<T>(a, la)?;
    let bv = contiguous::<T>(b, lb)?;
    let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
    // SAFETY (each `alloc`): cuDNN writes every element of the output (beta = 0).
    // SAFETY (each `launch`): the descriptors above describe these buffers (NCHW, contiguous,
    // element type T), and the output is the one the pass writes.
    let out: CudaSlice<T> = match pass {
        Pass::Forward => {
            use sys::cudnnConvolutionFwdAlgo_t as F;
            let op = ConvForward { conv: &conv, x: &x_desc, w: &w_desc, y: &y_desc };
            let first = match cached {
                Some(Algo::Forward(a)) => Some(a),
                _ => op.pick_algorithm().ok(),
            };
            let mut out = unsafe { dev.alloc::<T>(d.b * d.o * d.hw_out())? };
            run_first_that_runs(key, Algo::Forward, first, &[F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM], dev, |a| op.get_workspace_size(a).map_err(w), |a, ws| {
                unsafe { op.launch(a, ws.as_mut(), (one, zero), &av, &bv, &mut out).map_err(w) }
            })?;
            out
        }
        Pass::InputGrad => {
            use sys::cudnnConvolutionBwdDataAlgo_t as D;
            let op = ConvBackwardData { conv: &conv, dx: &x_desc, w: &w_desc, dy: &y_desc };
            let first = match cached {
                Some(Algo::InputGrad(a)) => Some(a),
                _ => op.pick_algorithm().ok(),
            };
            let mut out = unsafe { dev.alloc::<T>(d.b * d.c * d.h * d.w)? };
            // `a` is dy, `b` the kernel.
            run_first_that_runs(key, Algo::InputGrad, first, &[D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0], dev, |a| op.get_workspace_size(a).map_err(w), |a, ws| {
                unsafe { op.launch(a, ws.as_mut(), (one, zero), &mut out, &bv, &av).map_err(w) }
            })?;
            out
        }
        Pass::WeightGrad => {
            use sys::cudnnConvolutionBwdFilterAlgo_t as B;
            let op = ConvBackwardFilter { conv: &conv, x: &x_desc, dw: &w_desc, dy: &y_desc };
            let first = match cached {
                Some(Algo::WeightGrad(a)) => Some(a),
                _ => op.pick_algorithm().ok(),
            };
            let mut out = unsafe { dev.alloc::<T>(d.o * d.ckk())? };
            // `a` is x, `b` is dy.
            run_first_that_runs(key, Algo::WeightGrad, first, &[B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, B::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0], dev, |a| op.get_workspace_size(a).map_err(w), |a, ws| {
                unsafe { op.launch(a, ws.as_mut(), (one, zero), &av, &mut out, &bv).map_err(w) }
            })?;
            out
        }
    };
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Runs the pass with `first` (the cached or the heuristics' choice), else with each of
/// `fallbacks` (algorithms every cuDNN build has for these NCHW shapes), by
/// [`crate::conv::first_that_runs`], and caches what ran when that says it may.
fn run_first_that_runs<A: Copy + PartialEq + std::fmt::Debug>(
    key: AlgoKey,
    wrap: fn(A) -> Algo,
    first: Option<A>,
    fallbacks: &[A],
    dev: &CudaDevice,
    workspace_size: impl Fn(A) -> Result<usize>,
    launch: impl FnMut(A, &mut Option<CudaSlice<u8>>) -> Result<()>,
) -> Result<()> {
    let (ran, cacheable) = crate::conv::first_that_runs(first.into_iter().chain(fallbacks.iter().copied()), workspace_size, |n| workspace(dev, n), launch)?;
    if cacheable {
        ALGOS.with(|m| m.borrow_mut().insert(key, wrap(ran)));
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
