//! 2-D convolution whose CPU forward and both backward passes are im2col/col2im + GEMM.
//!
//! candle 0.11's CPU conv2d backward goes through a direct-loop `conv_transpose2d` for the
//! input gradient and a convolution with the whole output map as kernel for the weight
//! gradient; both dominate a training step. Here the three passes of the 3x3, stride-1
//! convolutions go through Winograd (`crate::winograd`), and those of the others (1x1,
//! stride 2) are one im2col/col2im GEMM each per image, parallel over the batch with rayon.
//! On CUDA with the `cudnn` feature the same ops run all three passes through cuDNN
//! (`crate::conv_cudnn`). Other devices and dtypes use candle's own conv2d.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

/// Same parameter names and init hints as `candle_nn::Conv2d` (`weight` `[O, C, k, k]`, `bias` `[O]`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        if cin == 0 || cout == 0 || k == 0 || stride == 0 {
            candle_core::bail!("Conv2d: channels ({cin} -> {cout}), kernel ({k}) and stride ({stride}) must be positive");
        }
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bound = 1. / (cin as f64).sqrt();
        let bias = vb.get_with_hints(cout, "bias", Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias, stride, padding })
    }

    /// A convolution with the given weight `[O, C, k, k]` and bias `[O]` (attention's q, k and
    /// v projections stacked into one).
    pub(crate) fn from_parts(weight: Tensor, bias: Tensor, stride: usize, padding: usize) -> Self {
        Self { weight, bias, stride, padding }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The convolution without its bias, for a caller that adds the bias later, folded into
    /// another op.
    pub fn forward_without_bias(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.stride, self.padding)
    }

    /// `self.forward(x) + addend`, the addend of the output's shape (a residual) or one value
    /// per image and channel, `[B or 1, O, 1, 1]` (a time embedding). The sum is written into
    /// the convolution's own output buffer, as PyTorch's graph would only keep the sum: candle's
    /// `add` keeps both of its inputs alive until the backward pass, though the addition's
    /// backward pass never reads them, nor does the convolution's read its output. That is a
    /// full-size activation fewer per ResBlock sum and per attention block (stop 33). The same
    /// bits as `broadcast_add`.
    pub fn forward_plus(&self, x: &Tensor, addend: &Tensor) -> Result<Tensor> {
        add_to_output(self.forward(x)?, addend)
    }
}

/// `y + addend` written into `y`'s buffer (see [`Conv2d::forward_plus`]): `y` must be an output
/// whose producer's backward pass does not read it, passed by value. Falls back to
/// `broadcast_add` where that cannot be done: a shared buffer, another layout of the addend, a
/// dtype or device the in-place kernels do not take.
fn add_to_output(y: Tensor, addend: &Tensor) -> Result<Tensor> {
    let kind = if addend.dims() == y.dims() {
        Some(AddInto::Same)
    } else {
        match (y.dims(), addend.dims()) {
            // Rows one per image must not overlap (a broadcast's stride 0): the CUDA kernel
            // reads them from one span of the buffer.
            (&[b, c, _, _], &[ab, ac, 1, 1]) if ac == c && (ab == 1 || (ab == b && addend.stride()[0] >= c)) && addend.stride()[1] == 1 => Some(AddInto::PerImageChannel),
            _ => None,
        }
    };
    let supported = in_place_sums_enabled()
        && match y.device() {
            candle_core::Device::Cpu => matches!(y.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16),
            // The kernels write `y`'s buffer from its start.
            candle_core::Device::Cuda(_) => matches!(y.dtype(), DType::F32 | DType::BF16) && y.layout().start_offset() == 0,
            _ => false,
        };
    let Some(kind) = kind.filter(|_| supported) else {
        SUMS_ELSEWHERE.fetch_add(1, Ordering::Relaxed);
        return y.broadcast_add(addend);
    };
    let addend = match kind {
        AddInto::Same => addend.contiguous()?,
        AddInto::PerImageChannel => addend.clone(),
    };
    match y.add_in_own_buffer(&addend, &kind)? {
        Ok(sum) => {
            SUMS_IN_PLACE.fetch_add(1, Ordering::Relaxed);
            Ok(sum)
        }
        Err(y) => {
            SUMS_ELSEWHERE.fetch_add(1, Ordering::Relaxed);
            y.broadcast_add(&addend)
        }
    }
}

static SUMS_IN_PLACE: AtomicUsize = AtomicUsize::new(0);
static SUMS_ELSEWHERE: AtomicUsize = AtomicUsize::new(0);

/// How many [`Conv2d::forward_plus`] sums this process wrote into the convolution's buffer, and
/// how many went through `broadcast_add` instead: the GPU self-test's proof that the in-place
/// path ran (its results alone would pass either way).
pub fn in_place_sums() -> (usize, usize) {
    (SUMS_IN_PLACE.load(Ordering::Relaxed), SUMS_ELSEWHERE.load(Ordering::Relaxed))
}

/// Whether sums go into the convolution's buffer: `UNET_INPLACE_SUMS=0` turns it off (for A/B
/// runs, and a way out should the in-place kernels fail on a card).
pub fn in_place_sums_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_INPLACE_SUMS").map_or(true, |v| v != "0"))
}

/// The in-place addition of [`add_to_output`]: `Same`, an addend of `y`'s shape (compact);
/// `PerImageChannel`, `[B or 1, C, 1, 1]` with its channels consecutive, added to each
/// (image, channel) map.
#[derive(Debug, Clone, Copy)]
enum AddInto {
    Same,
    PerImageChannel,
}

impl AddInto {
    /// For `PerImageChannel`: (images, channels, values per map, the addend's rows and their stride).
    fn channel_rows(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (rows, ac, _, _) = l2.shape().dims4()?;
        if ac != c || (rows != 1 && rows != b) || l2.stride()[1] != 1 {
            candle_core::bail!("add into output: {:?} (strides {:?}) is not one value per image and channel of {:?}", l2.shape(), l2.stride(), l1.shape());
        }
        Ok((b, c, h * w, rows, if rows == 1 { 0 } else { l2.stride()[0] }))
    }
}

impl candle_core::InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "add-into-output"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let total = l1.shape().elem_count();
        if !l1.is_contiguous() {
            candle_core::bail!("add into output: the output is not compact");
        }
        let (o1, o2) = (l1.start_offset(), l2.start_offset());
        // Chunks large enough that a task is worth its scheduling.
        const CHUNK: usize = 1 << 14;
        macro_rules! add {
            ($y:expr, $a:expr) => {{
                let y = &mut $y[o1..o1 + total];
                match self {
                    AddInto::Same => {
                        if !l2.is_contiguous() || l2.shape() != l1.shape() {
                            candle_core::bail!("add into output: the addend {:?} is not compact or not {:?}", l2.shape(), l1.shape());
                        }
                        let a = &$a[o2..o2 + total];
                        y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(y, a)| {
                            for (y, a) in y.iter_mut().zip(a) {
                                *y += *a;
                            }
                        });
                    }
                    AddInto::PerImageChannel => {
                        let (_, c, hw, rows, stride) = Self::channel_rows(l1, l2)?;
                        if hw > 0 {
                            let a = &$a[..];
                            y.par_chunks_mut(hw).enumerate().for_each(|(row, y)| {
                                let image = if rows == 1 { 0 } else { row / c };
                                let v = a[o2 + image * stride + row % c];
                                for y in y.iter_mut() {
                                    *y += v;
                                }
                            });
                        }
                    }
                }
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(a)) => add!(y, a),
            (CpuStorage::F64(y), CpuStorage::F64(a)) => add!(y, a),
            (CpuStorage::BF16(y), CpuStorage::BF16(a)) => add!(y, a),
            (CpuStorage::F16(y), CpuStorage::F16(a)) => add!(y, a),
            (y, a) => candle_core::bail!("add into output: dtypes {:?}/{:?} not supported", candle_core::backend::BackendStorage::dtype(y), candle_core::backend::BackendStorage::dtype(a)),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::cuda_backend::CudaStorage, l1: &Layout, s2: &candle_core::cuda_backend::CudaStorage, l2: &Layout) -> Result<()> {
        let total = l1.shape().elem_count();
        if !l1.is_contiguous() || l1.start_offset() != 0 {
            candle_core::bail!("add into output (CUDA): the output is not compact from its buffer's start");
        }
        match self {
            AddInto::Same => {
                if l2.shape() != l1.shape() {
                    candle_core::bail!("add into output (CUDA): the addend {:?} is not {:?}", l2.shape(), l1.shape());
                }
                crate::cuda_ops::add_inplace(s1, total, s2, l2)
            }
            AddInto::PerImageChannel => {
                let (_, c, hw, rows, stride) = Self::channel_rows(l1, l2)?;
                crate::cuda_ops::channel_add_inplace("time embedding add", s1, total, s2, crate::cuda_ops::ChannelRows { offset: l2.start_offset(), rows, stride }, c, hw)
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = ConvOp { stride: self.stride, padding: self.padding };
        let y = match backend(x, &self.weight) {
            // The bias is folded into the GEMM: no extra pass, no extra tensor kept for backward.
            Backend::Cpu => return x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias, BiasedConvOp(op)),
            // Added in place to cuDNN's output: no second full-size tensor, none kept for backward.
            Backend::Cudnn if matches!(x.dtype(), DType::F32 | DType::BF16) && self.bias.dtype() == x.dtype() => {
                return x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias, BiasedConvOp(op));
            }
            Backend::Cudnn => x.contiguous()?.apply_op2(&self.weight.contiguous()?, op)?,
            Backend::Candle => x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?,
        };
        let o = self.bias.dim(0)?;
        y.broadcast_add(&self.bias.reshape((1, o, 1, 1))?)
    }
}

/// `x` [B, C, H, W] * `w` [O, C, k, k] with square stride and zero padding, no bias.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    match backend(x, w) {
        Backend::Cpu | Backend::Cudnn => x.contiguous()?.apply_op2(&w.contiguous()?, ConvOp { stride, padding }),
        Backend::Candle => x.conv2d(w, padding, stride, 1, 1),
    }
}

enum Backend {
    /// Our CPU kernels (f32).
    Cpu,
    /// cuDNN for all three passes (`crate::conv_cudnn`).
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    Cudnn,
    /// candle's own conv2d and its backward.
    Candle,
}

fn backend(x: &Tensor, w: &Tensor) -> Backend {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return Backend::Cpu;
    }
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && x.dtype() == w.dtype() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && crate::conv_cudnn::enabled() {
        return Backend::Cudnn;
    }
    Backend::Candle
}

/// Shape of one convolution: NCHW input, square kernel, stride and padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Geometry {
    pub(crate) b: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) o: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Geometry {
    pub(crate) fn ho(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }
    pub(crate) fn wo(&self) -> usize {
        (self.w + 2 * self.padding - self.k) / self.stride + 1
    }
    pub(crate) fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    pub(crate) fn hw_out(&self) -> usize {
        self.ho() * self.wo()
    }
    /// 3x3, stride 1, padding 1: the shape `winograd` handles.
    fn is_winograd(&self) -> bool {
        self.k == 3 && self.stride == 1 && self.padding == 1 && winograd_enabled()
    }
    /// 1x1, stride 1, no padding: the image already is its column matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
}

/// The three passes of a 1x1 convolution (stride 1, no padding) as matrix products, on any
/// backend's storage: with a 1x1 kernel each image already is its column matrix. The GPU path
/// uses them for bf16/f16 with `UNET_CONV1X1=gemm` (`conv_cudnn`); written against candle's
/// storage traits so that the CPU tests check the layouts the CUDA matmul is given.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) mod gemm_1x1 {
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::{Layout, Result, Shape};

    use super::Geometry;

    fn check(d: Geometry, ls: &[&Layout]) -> Result<()> {
        if !d.is_pointwise() {
            candle_core::bail!("1x1 convolution as a GEMM: {d:?} is not a 1x1 kernel of stride 1 without padding");
        }
        if ls.iter().any(|l| !l.is_contiguous()) {
            candle_core::bail!("1x1 convolution as a GEMM: the operands must be contiguous");
        }
        Ok(())
    }

    /// `y[b] = W x[b]`: W `[O, C]` as the left operand of every image (batch stride 0), `x[b]`
    /// `[C, HW]` as the right; the product is `y` in NCHW.
    pub(crate) fn forward<S: BackendStorage>(d: Geometry, x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<S> {
        check(d, &[lx, lw])?;
        let hw = d.h * d.w;
        let wl = Layout::new(Shape::from((d.b, d.o, d.c)), vec![0, d.c, 1], lw.start_offset());
        let xl = Layout::new(Shape::from((d.b, d.c, hw)), vec![d.c * hw, hw, 1], lx.start_offset());
        w.matmul(x, (d.b, d.o, hw, d.c), &wl, &xl)
    }

    /// `dx[b] = W^T dy[b]`: W read transposed `[C, O]` (strides 1 and C, batch stride 0), `dy[b]`
    /// `[O, HW]`; the product is `dx` in NCHW.
    pub(crate) fn input_grad<S: BackendStorage>(d: Geometry, dy: &S, ldy: &Layout, w: &S, lw: &Layout) -> Result<S> {
        check(d, &[ldy, lw])?;
        let hw = d.h * d.w;
        let wl = Layout::new(Shape::from((d.b, d.c, d.o)), vec![0, 1, d.c], lw.start_offset());
        let dyl = Layout::new(Shape::from((d.b, d.o, hw)), vec![d.o * hw, hw, 1], ldy.start_offset());
        w.matmul(dy, (d.b, d.c, hw, d.o), &wl, &dyl)
    }

    /// `dW = sum_b dy[b] x[b]^T` as one product over the batch and the pixels together: dy and x
    /// are first copied channel-major (`[O, B*HW]`, `[C, B*HW]`), so that the whole sum
    /// accumulates in the GEMM's f32 and is rounded once, as cuDNN's weight gradient is (a
    /// product per image, summed afterwards, would round each image's part to the storage type).
    pub(crate) fn weight_grad<S>(d: Geometry, x: &S, lx: &Layout, dy: &S, ldy: &Layout) -> Result<S>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        check(d, &[lx, ldy])?;
        let (hw, n) = (d.h * d.w, d.b * d.h * d.w);
        let channel_major = |s: &S, l: &Layout, c: usize| -> Result<S> {
            let view = Layout::new(Shape::from((c, d.b, hw)), vec![hw, c * hw, 1], l.start_offset());
            // SAFETY: every element is written by the copy below before anything reads it.
            let mut out = unsafe { s.device().alloc_uninit(&Shape::from((c, n)), s.dtype())? };
            s.copy_strided_src(&mut out, 0, &view)?;
            Ok(out)
        };
        let dyt = channel_major(dy, ldy, d.o)?;
        let xt = channel_major(x, lx, d.c)?;
        let dyl = Layout::contiguous(Shape::from((1, d.o, n)));
        let xl = Layout::new(Shape::from((1, n, d.c)), vec![d.c * n, 1, n], 0);
        dyt.matmul(&xt, (1, d.o, d.c, n), &dyl, &xl)
    }
}

/// Winograd for 3x3 convolutions unless `UNET_CONV=im2col` (for A/B benchmarks and tests).
pub fn winograd_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CONV").map_or(true, |v| v != "im2col"))
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("conv2d op expects contiguous inputs"),
    }
}

/// Column matrix [C*k*k, Ho*Wo] of one image [C, H, W].
fn im2col(g: &Geometry, img: &[f32], cols: &mut [f32]) {
    let (ho, wo) = (g.ho(), g.wo());
    let (h, w, k, s, p) = (g.h as isize, g.w as isize, g.k, g.stride as isize, g.padding as isize);
    for c in 0..g.c {
        let plane = &img[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..k {
            for kj in 0..k {
                let row = ((c * k + ki) * k + kj) * ho * wo;
                let dst = &mut cols[row..row + ho * wo];
                for oy in 0..ho {
                    let iy = oy as isize * s + ki as isize - p;
                    let line = &mut dst[oy * wo..(oy + 1) * wo];
                    if iy < 0 || iy >= h {
                        line.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if s == 1 {
                        // ix = ox + kj - p: one contiguous run plus zero borders.
                        let shift = kj as isize - p;
                        let lo = (-shift).clamp(0, wo as isize) as usize;
                        let hi = (w - shift).clamp(0, wo as isize) as usize;
                        line[..lo].fill(0.0);
                        if hi > lo {
                            let a = (lo as isize + shift) as usize;
                            line[lo..hi].copy_from_slice(&src[a..a + (hi - lo)]);
                        }
                        line[hi.max(lo)..].fill(0.0);
                    } else {
                        for (ox, v) in line.iter_mut().enumerate() {
                            let ix = ox as isize * s + kj as isize - p;
                            *v = if ix < 0 || ix >= w { 0.0 } else { src[ix as usize] };
                        }
                    }
                }
            }
        }
    }
}

/// Adds a column matrix back into image layout (the adjoint of `im2col`).
fn col2im(g: &Geometry, cols: &[f32], img: &mut [f32]) {
    img.fill(0.0);
    let (ho, wo) = (g.ho(), g.wo());
    let (h, w, k, s, p) = (g.h as isize, g.w as isize, g.k, g.stride as isize, g.padding as isize);
    for c in 0..g.c {
        let plane = &mut img[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..k {
            for kj in 0..k {
                let row = ((c * k + ki) * k + kj) * ho * wo;
                let srcrow = &cols[row..row + ho * wo];
                for oy in 0..ho {
                    let iy = oy as isize * s + ki as isize - p;
                    if iy < 0 || iy >= h {
                        continue;
                    }
                    let line = &srcrow[oy * wo..(oy + 1) * wo];
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if s == 1 {
                        let shift = kj as isize - p;
                        let lo = (-shift).clamp(0, wo as isize) as usize;
                        let hi = (w - shift).clamp(0, wo as isize) as usize;
                        if hi > lo {
                            let a = (lo as isize + shift) as usize;
                            for (d, v) in dst[a..a + (hi - lo)].iter_mut().zip(&line[lo..hi]) {
                                *d += v;
                            }
                        }
                    } else {
                        for (ox, v) in line.iter().enumerate() {
                            let ix = ox as isize * s + kj as isize - p;
                            if ix >= 0 && ix < w {
                                dst[ix as usize] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Row-major `dst[m, n] (+)= a[m, k] * b[k, n]`, with either operand optionally transposed
/// (`a_t`: `a` is stored [k, m]; `b_t`: `b` is stored [n, k]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, a: &[f32], a_t: bool, b: &[f32], b_t: bool, threads: usize) {
    debug_assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_cs, a_rs) = if a_t { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b_t { (k as isize, 1) } else { (1, n as isize) };
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the slices hold at least m*n, m*k and k*n elements with the strides given above.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, n as isize,
            accumulate,
            a.as_ptr(), a_cs, a_rs,
            b.as_ptr(), b_cs, b_rs,
            1.0, 1.0,
            false, false, false,
            par,
        )
    }
}

/// Batch items run in parallel; a batch smaller than the pool hands its threads to GEMM.
pub(crate) fn gemm_threads(batch: usize) -> usize {
    let pool = rayon::current_num_threads();
    if batch >= pool { 1 } else { pool }
}

thread_local! {
    // Column buffers are large (tens of MB) and needed on every call: keep one per thread
    // instead of faulting in fresh pages each time.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer, taken out of its slot for the call rather than borrowed: a
/// parallel GEMM inside `f` lets this thread, while it waits, run another batch item's task
/// (rayon's work stealing), and that task's call must find the slot free (it then allocates
/// its own buffer) instead of panicking on a second borrow.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut slot = s.borrow_mut();
        // Keep the larger of a nested call's buffer and ours.
        if slot.len() < buf.len() {
            *slot = buf;
        }
    });
    r
}

#[derive(Debug, Clone, Copy)]
struct ConvOp {
    stride: usize,
    padding: usize,
}

impl ConvOp {
    fn forward(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        let x = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        let (img, hw, ckk) = (g.c * g.h * g.w, g.hw_out(), g.ckk());
        // Winograd writes every output; so does the GEMM below (it overwrites without a bias, and
        // the bias fill comes first otherwise).
        let mut out = crate::output_buffer(g.b * g.o * hw, 0);
        if g.is_winograd() {
            let v = crate::winograd::choose(g.b, g.h, g.w, g.c, g.o);
            let u = crate::winograd::transform_weights(v, w, g.o, g.c);
            crate::winograd::conv3x3(v, x, g.b, g.c, g.h, g.w, &u, g.o, bias, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, g.ho(), g.wo()))));
        }
        let threads = gemm_threads(g.b);
        out.par_chunks_mut(g.o * hw).enumerate().for_each(|(i, dst)| {
            let xi = &x[i * img..(i + 1) * img];
            if let Some(bias) = bias {
                for (row, &bv) in dst.chunks_mut(hw).zip(bias) {
                    row.fill(bv);
                }
            }
            let acc = bias.is_some();
            if g.is_pointwise() {
                matmul(g.o, hw, ckk, dst, acc, w, false, xi, false, threads);
            } else {
                with_scratch(ckk * hw, |cols| {
                    im2col(&g, xi, cols);
                    matmul(g.o, hw, ckk, dst, acc, w, false, cols, false, threads);
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, g.ho(), g.wo()))))
    }

    fn geometry(&self, x: &Layout, w: &Layout) -> Result<Geometry> {
        let (b, c, h, wd) = x.shape().dims4()?;
        let (o, c2, k, k2) = w.shape().dims4()?;
        if c != c2 || k != k2 {
            candle_core::bail!("conv2d: input {:?} and kernel {:?} do not fit", x.shape(), w.shape());
        }
        if k == 0 || o == 0 || self.stride == 0 {
            candle_core::bail!("conv2d: kernel {:?} and stride {} must be non-empty and positive", w.shape(), self.stride);
        }
        if b == 0 || c == 0 {
            candle_core::bail!("conv2d: the input {:?} is empty", x.shape());
        }
        if h + 2 * self.padding < k || wd + 2 * self.padding < k {
            candle_core::bail!("conv2d: kernel {k} larger than padded input {h}x{wd}");
        }
        Ok(Geometry { b, c, h, w: wd, o, k, stride: self.stride, padding: self.padding })
    }
}

impl candle_core::CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(s1, l1, s2, l2, None)
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(&self, s1: &candle_core::cuda_backend::CudaStorage, l1: &Layout, s2: &candle_core::cuda_backend::CudaStorage, l2: &Layout) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        let out = crate::conv_cudnn::run(crate::conv_cudnn::Pass::Forward, g, s1, l1, s2, l2)?;
        Ok((out, Shape::from((g.b, g.o, g.ho(), g.wo()))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, c, h, wd) = x.dims4()?;
        // The network's first convolution reads the noisy image, which needs no gradient: its
        // input gradient would be a whole convolution for nothing.
        let dx = if x.track_op() { Some(grad.apply_op2_no_bwd(w, &ConvInputGrad { op: *self, c, h, w: wd })?) } else { None };
        let dw = if w.track_op() { Some(x.apply_op2_no_bwd(&grad, &ConvWeightGrad { op: *self, k: w.dim(2)? })?) } else { None };
        Ok((dx, dw))
    }
}

/// Convolution plus bias as one op: `(x, w, b)`.
#[derive(Debug, Clone, Copy)]
struct BiasedConvOp(ConvOp);

impl candle_core::CustomOp3 for BiasedConvOp {
    fn name(&self) -> &'static str {
        "conv2d-bias-im2col-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let bias = contiguous_f32(s3, l3)?;
        self.0.forward(s1, l1, s2, l2, Some(bias))
    }

    #[cfg(feature = "cudnn")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::cuda_backend::CudaStorage,
        l1: &Layout,
        s2: &candle_core::cuda_backend::CudaStorage,
        l2: &Layout,
        s3: &candle_core::cuda_backend::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let g = self.0.geometry(l1, l2)?;
        let mut out = crate::conv_cudnn::run(crate::conv_cudnn::Pass::Forward, g, s1, l1, s2, l2)?;
        let hw = g.ho() * g.wo();
        crate::cuda_ops::bias_add_inplace(&mut out, g.b * g.o * hw, s3, l3, g.o, hw)?;
        Ok((out, Shape::from((g.b, g.o, g.ho(), g.wo()))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = candle_core::CustomOp2::bwd(&self.0, x, w, res, grad)?;
        let db = if b.track_op() { Some(grad.contiguous()?.apply_op1_no_bwd(&ChannelSum)?) } else { None };
        Ok((dx, dw, db))
    }
}

/// `a + h + bias` with `bias` [C] broadcast over `a`, `h` [B, C, H, W] (same shape and dtype): a
/// ResBlock's residual sum taking its convolutions' biases, which they then skip
/// (`Conv2d::forward_without_bias`). One op, where a bias add in place and the residual add
/// were two full passes on the GPU (CUDA, f32 and bf16). Elsewhere: candle's ops.
pub fn residual_add_with_bias(a: &Tensor, h: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let fused = match a.device() {
        candle_core::Device::Cpu => a.dtype() == DType::F32,
        candle_core::Device::Cuda(_) => matches!(a.dtype(), DType::F32 | DType::BF16),
        _ => false,
    };
    if fused && a.dims().len() == 4 && h.dtype() == a.dtype() && bias.dtype() == a.dtype() {
        return a.contiguous()?.apply_op3(&h.contiguous()?, &bias.contiguous()?, ResidualBiasOp);
    }
    a.add(&h.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?)
}

/// `(a, h, bias)`: `a + (h + bias[c])`.
struct ResidualBiasOp;

impl candle_core::CustomOp3 for ResidualBiasOp {
    fn name(&self) -> &'static str {
        "residual-add-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape().elem_count() != c {
            candle_core::bail!("residual add: shapes {:?} + {:?} + bias {:?} do not match", l1.shape(), l2.shape(), l3.shape());
        }
        let (a, hv, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let hw = h * w;
        if a.is_empty() {
            return Ok((CpuStorage::F32(Vec::new()), l1.shape().clone()));
        }
        let mut out = crate::output_buffer(a.len(), 0);
        // Each task writes its whole (image, channel) map.
        out.par_chunks_mut(hw).zip(a.par_chunks(hw).zip(hv.par_chunks(hw))).enumerate().for_each(|(row, (o, (a, h)))| {
            let bc = b[row % c];
            for ((o, a), h) in o.iter_mut().zip(a).zip(h) {
                *o = a + (h + bc);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::cuda_backend::CudaStorage,
        l1: &Layout,
        s2: &candle_core::cuda_backend::CudaStorage,
        l2: &Layout,
        s3: &candle_core::cuda_backend::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::residual_bias_add(s1, l1, s2, l2, s3, l3)?, l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, h: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let db = if b.track_op() { Some(grad.contiguous()?.apply_op1_no_bwd(&ChannelSum)?) } else { None };
        let ga = if a.track_op() { Some(grad.clone()) } else { None };
        let gh = if h.track_op() { Some(grad.clone()) } else { None };
        Ok((ga, gh, db))
    }
}

/// Sum of [B, C, H, W] over B, H and W (candle's strided reduce is slow for this layout).
struct ChannelSum;

impl candle_core::CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::cuda_backend::CudaStorage, l: &Layout) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let c = l.shape().dims4()?.1;
        Ok((crate::cuda_ops::channel_sum(s, l)?, Shape::from(c)))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let g = contiguous_f32(s, l)?;
        let hw = h * w;
        let mut out = vec![0f32; c];
        for img in 0..b {
            for (ch, o) in out.iter_mut().enumerate() {
                let start = (img * c + ch) * hw;
                *o += g[start..start + hw].iter().sum::<f32>();
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// dX from (dY, W): per image dcols = W^T dY, then col2im.
struct ConvInputGrad {
    op: ConvOp,
    c: usize,
    h: usize,
    w: usize,
}

impl ConvInputGrad {
    /// From dY [B, O, Ho, Wo] and W [O, C, k, k].
    fn geometry(&self, dy: &Layout, w: &Layout) -> Result<Geometry> {
        let (b, o, _, _) = dy.shape().dims4()?;
        let (_, _, k, _) = w.shape().dims4()?;
        Ok(Geometry { b, c: self.c, h: self.h, w: self.w, o, k, stride: self.op.stride, padding: self.op.padding })
    }
}

impl candle_core::CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(&self, s1: &candle_core::cuda_backend::CudaStorage, l1: &Layout, s2: &candle_core::cuda_backend::CudaStorage, l2: &Layout) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        let out = crate::conv_cudnn::run(crate::conv_cudnn::Pass::InputGrad, g, s1, l1, s2, l2)?;
        Ok((out, Shape::from((g.b, g.c, g.h, g.w))))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        let (b, o) = (g.b, g.o);
        let dy = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        let (img, hw, ckk) = (g.c * g.h * g.w, g.hw_out(), g.ckk());
        // col2im accumulates, so only the Winograd path (which writes every element) skips zeroing.
        let mut dx = if g.is_winograd() { crate::output_buffer(b * img, 0) } else { vec![0f32; b * img] };
        if g.is_winograd() {
            let v = crate::winograd::choose(b, g.h, g.w, g.c, o);
            let u = crate::winograd::transform_weights_input_grad(v, w, o, g.c);
            crate::winograd::conv3x3(v, dy, b, o, g.h, g.w, &u, g.c, None, &mut dx);
            return Ok((CpuStorage::F32(dx), Shape::from((b, g.c, g.h, g.w))));
        }
        let threads = gemm_threads(b);
        dx.par_chunks_mut(img).enumerate().for_each(|(i, dst)| {
            let dyi = &dy[i * o * hw..(i + 1) * o * hw];
            if g.is_pointwise() {
                matmul(ckk, hw, o, dst, false, w, true, dyi, false, threads);
            } else {
                with_scratch(ckk * hw, |cols| {
                    matmul(ckk, hw, o, cols, false, w, true, dyi, false, threads);
                    col2im(&g, cols, dst);
                });
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, g.c, g.h, g.w))))
    }
}

/// dW from (X, dY): sum over images of dY im2col(X)^T.
struct ConvWeightGrad {
    op: ConvOp,
    k: usize,
}

impl ConvWeightGrad {
    /// From X [B, C, H, W] and dY [B, O, Ho, Wo].
    fn geometry(&self, x: &Layout, dy: &Layout) -> Result<Geometry> {
        let (b, c, h, w) = x.shape().dims4()?;
        let (_, o, _, _) = dy.shape().dims4()?;
        Ok(Geometry { b, c, h, w, o, k: self.k, stride: self.op.stride, padding: self.op.padding })
    }
}

impl candle_core::CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(&self, s1: &candle_core::cuda_backend::CudaStorage, l1: &Layout, s2: &candle_core::cuda_backend::CudaStorage, l2: &Layout) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        let out = crate::conv_cudnn::run(crate::conv_cudnn::Pass::WeightGrad, g, s1, l1, s2, l2)?;
        Ok((out, Shape::from((g.o, g.c, g.k, g.k))))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        let (b, c, h, wd, o) = (g.b, g.c, g.h, g.w, g.o);
        let x = contiguous_f32(s1, l1)?;
        let dy = contiguous_f32(s2, l2)?;
        let (img, hw, ckk) = (c * h * wd, g.hw_out(), g.ckk());
        if g.is_winograd() {
            let dw = crate::winograd::conv3x3_weight_grad(crate::winograd::choose(b, h, wd, c, o), x, dy, b, c, h, wd, o);
            return Ok((CpuStorage::F32(dw), Shape::from((o, c, self.k, self.k))));
        }
        let threads = gemm_threads(b);
        // Accumulates dW^T [ckk, o] = cols dY^T: with both operands contiguous along hw, this
        // orientation lets GEMM pack the small dY instead of transposing the large column
        // matrix (1.5-3.8x faster at the 64x64 levels, `examples/gemm_layouts.rs`). One partial sum per rayon
        // split, reduced at the end (deterministic for a fixed pool size).
        let dw_t = (0..b)
            .into_par_iter()
            .fold(
                || vec![0f32; ckk * o],
                |mut acc, i| {
                    let xi = &x[i * img..(i + 1) * img];
                    let dyi = &dy[i * o * hw..(i + 1) * o * hw];
                    if g.is_pointwise() {
                        matmul(ckk, o, hw, &mut acc, true, xi, false, dyi, true, threads);
                    } else {
                        with_scratch(ckk * hw, |cols| {
                            im2col(&g, xi, cols);
                            matmul(ckk, o, hw, &mut acc, true, cols, false, dyi, true, threads);
                        });
                    }
                    acc
                },
            )
            .reduce(|| vec![0f32; ckk * o], |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            });
        let mut dw = vec![0f32; o * ckk];
        for (r, row) in dw_t.chunks_exact(o).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                dw[j * ckk + r] = v;
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((o, c, self.k, self.k))))
    }
}

/// How a convolution pass with several possible algorithms (cuDNN's, `conv_cudnn`) picks one,
/// as PyTorch goes down cuDNN's ranked list: each candidate in turn (duplicates skipped) until
/// one runs; one that is refused (its workspace query or its launch fails), or whose workspace
/// cannot be allocated, gives way to the next. Returns what ran and whether it may be cached:
/// not when a candidate before it failed only for want of memory, which is passing, so that
/// candidate is tried again on the next call instead of a slower one being pinned for good.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn first_that_runs<A: Copy + PartialEq + std::fmt::Debug, W>(
    candidates: impl IntoIterator<Item = A>,
    workspace_size: impl Fn(A) -> Result<usize>,
    workspace: impl Fn(usize) -> Result<W>,
    mut launch: impl FnMut(A, &mut W) -> Result<()>,
) -> Result<(A, bool)> {
    let mut tried: Vec<A> = Vec::new();
    let mut failures = Vec::new();
    let mut short_of_memory = false;
    for a in candidates {
        if tried.contains(&a) {
            continue;
        }
        tried.push(a);
        let n = match workspace_size(a) {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("{a:?}: {e}"));
                continue;
            }
        };
        let mut ws = match workspace(n) {
            Ok(ws) => ws,
            Err(e) => {
                short_of_memory = true;
                failures.push(format!("{a:?}: {n} bytes of workspace: {e}"));
                continue;
            }
        };
        match launch(a, &mut ws) {
            Ok(()) => return Ok((a, !short_of_memory)),
            Err(e) => failures.push(format!("{a:?}: {e}")),
        }
    }
    candle_core::bail!("cuDNN: no algorithm ran ({})", failures.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The algorithm choice of the cuDNN passes, without a GPU: candidates 1 (refused by its
    /// workspace query), 2 (its workspace too large), 3 (its launch fails), 4 (runs).
    #[test]
    fn first_that_runs_goes_down_the_list_and_caches_only_what_memory_did_not_decide() {
        let size = |a: u32| if a == 1 { candle_core::bail!("not supported") } else { Ok(a as usize * 100) };
        let alloc = |n: usize| if (200..300).contains(&n) { candle_core::bail!("out of memory") } else { Ok(vec![0u8; n]) };
        let mut launched = Vec::new();
        let mut launch = |a: u32, ws: &mut Vec<u8>| {
            launched.push((a, ws.len()));
            if a == 3 { candle_core::bail!("launch failed") } else { Ok(()) }
        };
        // The first that runs is 4; 2 failed only for want of memory, so 4 must not be cached.
        assert_eq!(first_that_runs([1, 2, 3, 4, 5], size, alloc, &mut launch).unwrap(), (4, false));
        // Refusals alone: what ran may be cached. Duplicates are tried once.
        assert_eq!(first_that_runs([1, 3, 3, 4], size, alloc, &mut launch).unwrap(), (4, true));
        // The first candidate runs: cached.
        assert_eq!(first_that_runs([5, 4], size, alloc, &mut launch).unwrap(), (5, true));
        // None runs: the error names each candidate and why.
        let e = first_that_runs([1, 2, 3], size, alloc, &mut launch).unwrap_err().to_string();
        assert!(e.contains("1: not supported") && e.contains("2: 200 bytes of workspace: out of memory") && e.contains("3: launch failed"), "{e}");
        assert_eq!(launched, [(3, 300), (4, 400), (3, 300), (4, 400), (5, 500), (3, 300)]);
    }
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = diffusion_free_rng(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    // A tiny LCG so these tests do not depend on other crates.
    fn diffusion_free_rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn check(b: usize, c: usize, h: usize, o: usize, k: usize, stride: usize, padding: usize) {
        // Non-square when stride is 1; candle's own conv backward (the reference here) mis-sizes the
        // input gradient when a strided convolution drops border pixels, so keep those exact.
        let width = if stride == 1 { h + 1 } else { h };
        let x = Var::from_tensor(&randn(&[b, c, h, width], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[o, c, k, k], 2)).unwrap();
        let ours = conv2d(x.as_tensor(), w.as_tensor(), stride, padding).unwrap();
        let theirs = x.as_tensor().conv2d(w.as_tensor(), padding, stride, 1, 1).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-4, "forward b{b} c{c} k{k} s{stride} p{padding}");
        // Gradients of a weighted sum, against candle's own conv backward.
        let r = randn(ours.dims(), 3);
        let g1 = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = theirs.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        let dw = max_diff(g1.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap());
        assert!(dx < 1e-3 && dw < 1e-3, "grads b{b} c{c} k{k} s{stride} p{padding}: dx {dx} dw {dw}");
    }

    #[test]
    fn matches_candle_conv_forward_and_backward() {
        check(2, 3, 8, 4, 3, 1, 1);
        check(3, 4, 9, 5, 3, 2, 1);
        check(1, 6, 5, 2, 1, 1, 0);
        check(2, 5, 7, 3, 1, 2, 0);
        check(2, 4, 8, 4, 3, 2, 1);
        check(4, 2, 6, 3, 3, 1, 0);
        // 3x3 stride 1 padding 1 goes through Winograd: odd sizes, more channels.
        check(3, 7, 5, 6, 3, 1, 1);
        check(1, 16, 10, 9, 3, 1, 1);
        // Few pixels for the channels: all three passes take F(2x2) (`winograd::choose`).
        assert_eq!(crate::winograd::choose(1, 3, 4, 24, 20), crate::winograd::Variant::F2);
        check(1, 24, 3, 20, 3, 1, 1);
    }

    #[test]
    fn biased_module_matches_candle_conv_plus_bias() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let mut conv = Conv2d::new(vb, 3, 4, 3, 1, 1).unwrap();
        let w = Var::from_tensor(&randn(&[4, 3, 3, 3], 11)).unwrap();
        let b = Var::from_tensor(&randn(&[4], 12)).unwrap();
        conv.weight = w.as_tensor().clone();
        conv.bias = b.as_tensor().clone();
        let x = Var::from_tensor(&randn(&[2, 3, 6, 6], 13)).unwrap();
        let ours = conv.forward(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap().broadcast_add(&b.as_tensor().reshape((1, 4, 1, 1)).unwrap()).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-4);
        let r = randn(ours.dims(), 14);
        let g1 = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = theirs.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            assert!(max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-3);
        }
    }

    /// The GPU's bf16 1x1 passes (`gemm_1x1`, `UNET_CONV1X1=gemm`) run here on CPU storage,
    /// through the same strided layouts the CUDA matmul gets, against candle's convolution and
    /// its gradients; operands start past the beginning of their buffers, as views do.
    #[test]
    fn pointwise_passes_as_gemms_match_the_convolution_and_its_gradients() {
        use candle_core::Storage;
        for (b, c, o, h, w) in [(3, 5, 7, 4, 6), (1, 8, 3, 2, 2), (2, 4, 4, 1, 1)] {
            let d = Geometry { b, c, h, w, o, k: 1, stride: 1, padding: 0 };
            // Views at an offset: the second half of a buffer twice the size.
            let view = |dims: &[usize], seed: u64| {
                let mut big = dims.to_vec();
                big[0] *= 2;
                randn(&big, seed).narrow(0, dims[0], dims[0]).unwrap()
            };
            let (xv, wv, dy) = (view(&[b, c, h, w], 31), view(&[o, c, 1, 1], 32), view(&[b, o, h, w], 33));
            // The reference's variables are copies; the views go to the GEMMs.
            let (x, wt) = (Var::from_tensor(&xv).unwrap(), Var::from_tensor(&wv).unwrap());
            let y = x.as_tensor().conv2d(wt.as_tensor(), 0, 1, 1, 1).unwrap();
            let g = y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            let run = |f: &dyn Fn(&CpuStorage, &Layout, &CpuStorage, &Layout) -> Result<CpuStorage>, a: &Tensor, bt: &Tensor, dims: &[usize]| {
                let (sa, la) = a.storage_and_layout();
                let (sb, lb) = bt.storage_and_layout();
                let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else { panic!("CPU storage") };
                assert!(la.start_offset() > 0 && lb.start_offset() > 0, "the operands are views at an offset");
                let out = f(sa, la, sb, lb).unwrap();
                Tensor::from_vec(out.as_slice::<f32>().unwrap().to_vec(), dims, &Device::Cpu).unwrap()
            };
            let fwd = run(&|sa, la, sb, lb| gemm_1x1::forward(d, sa, la, sb, lb), &xv, &wv, &[b, o, h, w]);
            assert!(max_diff(&fwd, &y) < 1e-5, "forward {d:?}");
            let dx = run(&|sa, la, sb, lb| gemm_1x1::input_grad(d, sa, la, sb, lb), &dy, &wv, &[b, c, h, w]);
            assert!(max_diff(&dx, g.get(x.as_tensor()).unwrap()) < 1e-5, "input gradient {d:?}");
            let dw = run(&|sa, la, sb, lb| gemm_1x1::weight_grad(d, sa, la, sb, lb), &xv, &dy, &[o, c, 1, 1]);
            assert!(max_diff(&dw, g.get(wt.as_tensor()).unwrap()) < 1e-4, "weight gradient {d:?}");
        }
        // Not a 1x1 kernel of stride 1 without padding: refused, not computed wrong.
        let x = randn(&[1, 2, 3, 3], 34);
        let (s, l) = x.storage_and_layout();
        let Storage::Cpu(s) = &*s else { panic!("CPU storage") };
        let d = Geometry { b: 1, c: 2, h: 3, w: 3, o: 2, k: 3, stride: 1, padding: 1 };
        assert!(gemm_1x1::forward(d, s, l, s, l).is_err());
    }

    #[test]
    fn an_input_without_gradient_gets_none_and_the_weights_still_do() {
        let x = randn(&[2, 3, 6, 7], 21);
        let w = Var::from_tensor(&randn(&[4, 3, 3, 3], 22)).unwrap();
        let r = randn(&[2, 4, 6, 7], 23);
        let g1 = conv2d(&x, w.as_tensor(), 1, 1).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g1.get(&x).is_none(), "no gradient is computed for an input that does not track");
        let g2 = x.conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap()) < 1e-3);
    }

    #[test]
    fn more_threads_than_images_is_not_a_second_borrow_of_the_scratch() {
        // A batch smaller than the pool runs each image's GEMM in parallel; a thread waiting in
        // one may run another image's task, whose im2col needs a column buffer too. This used
        // to panic with "RefCell already borrowed".
        let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap();
        let x = Var::from_tensor(&randn(&[6, 64, 64, 64], 31)).unwrap();
        let w = Var::from_tensor(&randn(&[64, 64, 3, 3], 32)).unwrap();
        let r = randn(&[6, 64, 32, 32], 33);
        let expected = x.as_tensor().conv2d(w.as_tensor(), 1, 2, 1, 1).unwrap();
        pool.install(|| {
            for i in 0..40 {
                let y = conv2d(x.as_tensor(), w.as_tensor(), 2, 1).unwrap();
                assert!(max_diff(&y, &expected) < 1e-3);
                if i % 10 == 0 {
                    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(g.get(x.as_tensor()).is_some() && g.get(w.as_tensor()).is_some());
                }
            }
        });
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = randn(&[1, 2, 5, 5], 4);
        let w = Var::from_tensor(&randn(&[3, 2, 3, 3], 5)).unwrap();
        let r = randn(&[1, 3, 3, 3], 6);
        let f = |w: &Tensor| conv2d(&x, w, 2, 1).unwrap().mul(&r).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let grads = conv2d(&x, w.as_tensor(), 2, 1).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for idx in [0usize, 7, 20, 53] {
            let eps = 1e-2f32;
            let mut p = base.clone();
            p[idx] += eps;
            let mut m = base.clone();
            m[idx] -= eps;
            let tp = Tensor::from_vec(p, (3, 2, 3, 3), &Device::Cpu).unwrap();
            let tm = Tensor::from_vec(m, (3, 2, 3, 3), &Device::Cpu).unwrap();
            let fd = (f(&tp) - f(&tm)) / (2.0 * eps as f64);
            assert!((fd - g[idx] as f64).abs() < 1e-2, "idx {idx}: fd {fd} vs {}", g[idx]);
        }
    }
}
