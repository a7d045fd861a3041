//! The CUDA side of Adam's in-place updates (`adam::MomentUpdate`, `adam::ParamUpdate`): three
//! kernels per variable (first moment, second moment, parameter), where the composite update
//! is about twelve kernels and eight parameter-sized temporaries per variable. With ~250
//! variables, launches rather than bytes are the composite's cost on a GPU.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{Layout, Result};

const SRC: &str = include_str!("adam_cuda.cu");
const MODULE: &str = "trainer_adam";

/// The in-place kernels are used on CUDA unless `TRAINER_CUDA_ADAM=candle` (the composite: for
/// A/B runs, and a way out).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    unet::cuda_ops::switch_on(&ON, "TRAINER_CUDA_ADAM")
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    unet::cuda_ops::nvrtc_once(&PTX, SRC, "the Adam CUDA kernels")
}

fn range(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("adam (CUDA): non-contiguous operand".into()))
}

fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    let (a, b) = range(l)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

fn view_mut<'a>(s: &'a mut CudaStorage, l: &Layout) -> Result<CudaViewMut<'a, f32>> {
    let (a, b) = range(l)?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

fn config(n: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `m = beta m + (1 - beta) g` (`g^2` when `square`), in place.
pub(crate) fn moment(m: &mut CudaStorage, ml: &Layout, g: &CudaStorage, gl: &Layout, beta: f32, square: bool) -> Result<()> {
    let dev = m.device.clone();
    let n = ml.shape().elem_count();
    if gl.shape().elem_count() != n {
        candle_core::bail!("adam (CUDA): gradient of {} elements for a state of {n}", gl.shape().elem_count());
    }
    let gv = view(g, gl)?;
    let mut mv = view_mut(m, ml)?;
    let func = dev.get_or_load_custom_func("adam_moment", MODULE, ptx()?)?;
    let (n64, square) = (n as u64, square as i32);
    let mut args = func.builder();
    args.arg(&mut mv).arg(&gv).arg(&n64).arg(&beta).arg(&square);
    // SAFETY: argument types and order match `adam_moment`; both buffers hold n floats.
    unet::cuda_ops::profile::time(&dev, || "adam moment".into(), || unsafe { args.launch(config(n)) }.w())?;
    Ok(())
}

/// `p -= step_size * m / (sqrt(v) / bias2_sqrt + eps)`, in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn update(p: &mut CudaStorage, pl: &Layout, m: &CudaStorage, ml: &Layout, v: &CudaStorage, vl: &Layout, step_size: f32, bias2_sqrt: f32, eps: f32) -> Result<()> {
    let dev = p.device.clone();
    let n = pl.shape().elem_count();
    if ml.shape().elem_count() != n || vl.shape().elem_count() != n {
        candle_core::bail!("adam (CUDA): moments and parameter differ in size");
    }
    let (mv, vv) = (view(m, ml)?, view(v, vl)?);
    let mut pv = view_mut(p, pl)?;
    let func = dev.get_or_load_custom_func("adam_update", MODULE, ptx()?)?;
    let n64 = n as u64;
    let mut args = func.builder();
    args.arg(&mut pv).arg(&mv).arg(&vv).arg(&n64).arg(&step_size).arg(&bias2_sqrt).arg(&eps);
    // SAFETY: argument types and order match `adam_update`; the three buffers hold n floats.
    unet::cuda_ops::profile::time(&dev, || "adam update".into(), || unsafe { args.launch(config(n)) }.w())?;
    Ok(())
}
