//! GroupNorm, optionally fused with the Hardswish that follows it everywhere in this network.
//!
//! candle's GroupNorm is about ten tensor ops, each keeping a full-size intermediate alive for
//! the backward pass, and Hardswish adds four more. On CPU this op does one pass forward and
//! one backward, and keeps only its input: the statistics are recomputed in the backward pass.
//! On CUDA (f32 and bf16) the same op runs the kernels of `cuda_ops`. Other devices and
//! dtypes use the composite ops (same maths).

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Parameter names as `torch.nn.GroupNorm`: `weight` (init 1) and `bias` (init 0).
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
        }
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        Ok(Self { weight, bias, groups, eps })
    }

    /// GroupNorm alone.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        self.apply(x, false)
    }

    /// `hardswish(group_norm(x))`.
    pub fn forward_hardswish(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        self.apply(x, true)
    }

    /// `hardswish(group_norm(x)) * mask`: dropout with a mask drawn by the caller.
    pub fn forward_hardswish_masked(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        self.masked(x, mask)
    }

    fn masked(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if self.fused(x) && mask.dims() == x.dims() {
            let op = self.op(x, true, Some(mask.to_dtype(DType::F32)?.contiguous()?), None);
            x.contiguous()?.apply_op3(&self.weight, &self.bias, op)
        } else {
            self.apply(x, true)?.mul(&mask.to_dtype(x.dtype())?)
        }
    }

    /// `hardswish(group_norm(x))` with dropout `d`. On CUDA, fused, the mask is never stored:
    /// both passes recompute it from the hash. Elsewhere (and with `UNET_CUDA_NORM=candle`), the
    /// same mask is built on the host and applied as a tensor.
    pub fn forward_hardswish_dropout(&self, x: &Tensor, d: HashedDropout) -> Result<Tensor> {
        self.check_input(x)?;
        if self.fused(x) && x.device().is_cuda() {
            let op = self.op(x, true, None, Some(d));
            x.contiguous()?.apply_op3(&self.weight, &self.bias, op)
        } else {
            self.masked(x, &d.mask(x.shape(), x.device())?)
        }
    }

    /// `hardswish(group_norm(x + shift))` with dropout `d` if any, where `shift` (`[N, C]`, x's
    /// dtype) is added to every pixel of its image and channel: a ResBlock's time embedding and
    /// its first convolution's bias. On CUDA, fused: the sum is never stored, and the backward
    /// pass gives the shift's gradient with the others, where adding it first cost a full-size
    /// pass each way (and the convolution's bias another). Elsewhere, the addition, then
    /// [`GroupNorm::forward_hardswish_dropout`] (or without dropout, `forward_hardswish`).
    pub fn forward_hardswish_shifted(&self, x: &Tensor, shift: &Tensor, d: Option<HashedDropout>) -> Result<Tensor> {
        self.check_input(x)?;
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        if shift.dims() != [n, c] {
            candle_core::bail!("GroupNorm shift must be [{n}, {c}] (one value per image and channel), got {:?}", shift.dims());
        }
        if self.fused(x) && x.device().is_cuda() && shift.dtype() == x.dtype() {
            let op = ShiftedGroupNormOp(self.op(x, true, None, d));
            let wb = Tensor::cat(&[&self.weight, &self.bias], 0)?;
            return x.contiguous()?.apply_op3(&shift.contiguous()?, &wb, op);
        }
        let mut dims = vec![n, c];
        dims.resize(x.rank(), 1);
        let shifted = x.broadcast_add(&shift.to_dtype(x.dtype())?.reshape(dims)?)?;
        match d {
            Some(d) => self.forward_hardswish_dropout(&shifted, d),
            None => self.forward_hardswish(&shifted),
        }
    }

    /// The fused op for input `x`; it keeps its statistics for the backward pass when there
    /// will be one (`x` or the weights are tracked).
    fn op(&self, x: &Tensor, act: bool, mask: Option<Tensor>, hashed: Option<HashedDropout>) -> GroupNormOp {
        #[cfg(not(feature = "cuda"))]
        let _ = x;
        GroupNormOp {
            groups: self.groups,
            eps: self.eps as f32,
            act,
            mask,
            hashed,
            #[cfg(feature = "cuda")]
            saved: if x.track_op() || self.weight.track_op() || self.bias.track_op() { Some(Default::default()) } else { None },
        }
    }

    /// [N, C, ...] with N >= 1 and C this norm's channels: anything else is an error here, not
    /// a panic (or a wrong broadcast) in the kernels.
    fn check_input(&self, x: &Tensor) -> Result<()> {
        let c = self.weight.elem_count();
        match x.dims() {
            [n, xc, ..] if *n > 0 && *xc == c && x.elem_count() > 0 => Ok(()),
            d => candle_core::bail!("GroupNorm over {c} channels: input must be [N >= 1, {c}, ...], got {d:?}"),
        }
    }

    /// Whether `x` goes through the fused op (CPU f32, or CUDA f32/bf16 with matching weights).
    fn fused(&self, x: &Tensor) -> bool {
        if x.rank() < 3 {
            return false;
        }
        if x.device().is_cpu() {
            return x.dtype() == DType::F32;
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return matches!(x.dtype(), DType::F32 | DType::BF16)
                && self.weight.dtype() == x.dtype()
                && self.bias.dtype() == x.dtype()
                && crate::cuda_ops::norm_enabled();
        }
        false
    }

    /// The public forwards check `x` first (`check_input`), once.
    fn apply(&self, x: &Tensor, act: bool) -> Result<Tensor> {
        if self.fused(x) {
            let op = self.op(x, act, None, None);
            x.contiguous()?.apply_op3(&self.weight, &self.bias, op)
        } else {
            let y = composite_group_norm(x, &self.weight, &self.bias, self.groups, self.eps)?;
            if act { crate::model::hardswish(&y) } else { Ok(y) }
        }
    }
}

/// The unfused maths (candle_nn's GroupNorm), used off CPU and as the tests' reference.
pub fn composite_group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let per = x.elem_count() / (n * groups);
    let xg = x.reshape((n, groups, per))?.to_dtype(DType::F32)?;
    let mean = (xg.sum_keepdim(2)? / per as f64)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(2)? / per as f64)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(x.dtype())?.reshape(dims.as_slice())?;
    let mut wd = vec![1; dims.len()];
    wd[1] = c;
    xn.broadcast_mul(&w.reshape(wd.as_slice())?)?.broadcast_add(&b.reshape(wd.as_slice())?)
}

/// Dropout whose mask is a function of the element's index: element `i` is dropped when the top
/// 24 bits of `splitmix64(key + (i + 1) * GAMMA)` fall below `threshold` (= ceil(p * 2^24)), and
/// scaled by `1 / (1 - p)` otherwise. A device kernel recomputes it in the backward pass instead
/// of storing a mask (at batch 128 the reference network's masks would be 1.2 GB in f32), and it
/// needs no RNG state on the device. The CUDA kernels (`kernels.cu`, `drop_factor`) compute
/// exactly these factors; the CPU keeps its own ChaCha masks (`model.rs`).
///
/// The pass's seed can also live in device memory ([`HashedDropout::with_seed_at`]), read by the
/// kernels when they run: a captured CUDA graph replays its kernels' arguments unchanged, so a
/// training step replayed from one must find its new seed there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HashedDropout {
    /// The hash key; with a seed in device memory, only the offset added to the seed's key.
    pub key: u64,
    pub threshold: u32,
    pub scale: f32,
    /// Device address of the seed (8 bytes), or 0 when `key` is the whole key.
    pub seed_at: u64,
    /// The call site's part of the key, mixed with the seed read at `seed_at`.
    pub site_mix: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl HashedDropout {
    /// Call site `site` of a forward pass seeded with `seed`, dropping with probability `p`
    /// (in (0, 1)).
    pub fn new(seed: u64, site: u64, p: f32) -> Self {
        Self::with_seed_at(0, site, p).resolve(seed)
    }

    /// Call site `site` of a forward pass whose seed the kernels read from the 8 bytes at device
    /// address `seed_at` (CUDA only; the caller keeps that memory alive while the kernels may
    /// run). Once resolved with the seed found there, it is [`HashedDropout::new`]`(seed, site, p)`.
    pub fn with_seed_at(seed_at: u64, site: u64, p: f32) -> Self {
        let threshold = ((p as f64) * (1u64 << 24) as f64).ceil().clamp(1.0, (1u64 << 24) as f64) as u32;
        let site_mix = mix64(site.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
        Self { key: 0, threshold, scale: 1.0 / (1.0 - p), seed_at, site_mix }
    }

    /// The key the kernels compute from `seed` (the value at `seed_at`), `GN_DROP` in
    /// kernels.cu: `mix64(seed ^ site_mix) + key`.
    pub fn resolve(self, seed: u64) -> Self {
        Self { key: mix64(seed ^ self.site_mix).wrapping_add(self.key), seed_at: 0, site_mix: 0, ..self }
    }

    /// Whether the seed is read from device memory.
    pub fn seed_on_device(&self) -> bool {
        self.seed_at != 0
    }

    /// The same dropout seen from element `first` on: factor `i` of the result is factor
    /// `first + i` of `self`. The hash takes `key + (i + 1) * GAMMA`, so this only moves the
    /// key, and the device kernels need no offset argument.
    pub fn from_element(self, first: u64) -> Self {
        Self { key: self.key.wrapping_add(first.wrapping_mul(GOLDEN_GAMMA)), ..self }
    }

    /// Element `i`'s factor: 0 or `scale` (for a seed in device memory, of the
    /// [`HashedDropout::resolve`]d dropout).
    pub fn factor(&self, i: u64) -> f32 {
        debug_assert!(!self.seed_on_device(), "a dropout whose seed is on the device has no factors on the host");
        let u = mix64(self.key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
        if ((u >> 40) as u32) >= self.threshold { self.scale } else { 0.0 }
    }

    /// The mask as an f32 tensor (computed on the host, in parallel, then moved to `device`).
    pub fn mask(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        if self.seed_on_device() {
            candle_core::bail!("dropout with its seed in device memory runs in the CUDA kernels only; it has no host mask");
        }
        const CHUNK: usize = 1 << 16;
        let mut m = crate::output_buffer(shape.elem_count(), 0);
        // Writes every element.
        m.par_chunks_mut(CHUNK).enumerate().for_each(|(k, out)| {
            for (j, v) in out.iter_mut().enumerate() {
                *v = self.factor((k * CHUNK + j) as u64);
            }
        });
        Tensor::from_vec(m, shape, device)
    }
}

#[derive(Debug, Clone)]
struct GroupNormOp {
    groups: usize,
    eps: f32,
    act: bool,
    /// A dropout mask (0 or 1/(1-p) per element, contiguous f32 on the input's device) applied
    /// to the output: fused here so that the unmasked activation is never stored for the
    /// backward pass.
    mask: Option<Tensor>,
    /// Or hashed dropout (CUDA only): no mask at all.
    hashed: Option<HashedDropout>,
    /// On CUDA, where the forward pass leaves each group's mean and 1/std for the backward
    /// pass (shared by the op's clones, taken by the backward pass), when one will follow.
    #[cfg(feature = "cuda")]
    saved: Option<std::sync::Arc<std::sync::Mutex<Option<CudaStorage>>>>,
}

/// Runs `f` with the mask's values, if any.
fn with_mask<R>(mask: &Option<Tensor>, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    match mask {
        None => f(None),
        Some(m) => {
            let (storage, layout) = m.storage_and_layout();
            match &*storage {
                candle_core::Storage::Cpu(cpu) => f(Some(slice(cpu, layout)?)),
                _ => candle_core::bail!("group norm: the dropout mask must be on the CPU"),
            }
        }
    }
}

struct Dims {
    n: usize,
    c: usize,
    hw: usize,
    cpg: usize,
}

impl GroupNormOp {
    fn dims(&self, l: &Layout) -> Dims {
        let d = l.dims();
        let (n, c) = (d[0], d[1]);
        let hw = d[2..].iter().product();
        Dims { n, c, hw, cpg: c / self.groups }
    }

    #[cfg(feature = "cuda")]
    fn cuda_dims(&self, l: &Layout) -> crate::cuda_ops::Dims {
        let d = self.dims(l);
        crate::cuda_ops::Dims { n: d.n, c: d.c, hw: d.hw, groups: self.groups }
    }

    /// Keeps the forward pass's statistics, if this op keeps any.
    #[cfg(feature = "cuda")]
    fn keep(&self, stats: Option<CudaStorage>) -> Result<()> {
        if let (Some(slot), Some(stats)) = (&self.saved, stats) {
            *slot.lock().map_err(|_| candle_core::Error::Msg("group norm: its statistics' lock is poisoned".into()))? = Some(stats);
        }
        Ok(())
    }

    /// The forward pass's statistics, taken (`None`: the backward pass recomputes them).
    #[cfg(feature = "cuda")]
    fn take_saved(&self) -> Result<Option<CudaStorage>> {
        match &self.saved {
            Some(slot) => Ok(slot.lock().map_err(|_| candle_core::Error::Msg("group norm: its statistics' lock is poisoned".into()))?.take()),
            None => Ok(None),
        }
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("group norm op expects contiguous inputs"),
    }
}

/// Mean and 1/std of one group, accumulated in f64 (the group can hold 10^5 values).
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let len = x.len() as f64;
    let mean = lane_sum(x, |v| v as f64) / len;
    let var = lane_sum(x, |v| (v as f64 - mean).powi(2)) / len;
    (mean as f32, 1.0 / ((var as f32) + eps).sqrt())
}

/// `sum f(x)` over 8 independent f64 lanes: one running sum is a serial chain of dependent
/// adds (no SIMD, one add per 4 cycles); lanes vectorise.
#[inline]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline]
fn hardswish(y: f32) -> f32 {
    y * (y + 3.0).clamp(0.0, 6.0) / 6.0
}

/// PyTorch's hardswish_backward: 0 below -3, y/3 + 1/2 up to 3, 1 above.
#[inline]
fn hardswish_grad(y: f32) -> f32 {
    if y < -3.0 {
        0.0
    } else if y <= 3.0 {
        y / 3.0 + 0.5
    } else {
        1.0
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.act { "group-norm-hardswish" } else { "group-norm" }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.hashed.is_some() {
            candle_core::bail!("group norm: hashed dropout is fused on CUDA only (the CPU takes its mask)");
        }
        let d = self.dims(l1);
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let group_len = d.cpg * d.hw;
        // Each task writes its whole group: every element.
        let mut out = crate::output_buffer(x.len(), 0);
        with_mask(&self.mask, |mask| {
            out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(ng, (o, xs))| {
                let g = ng % self.groups;
                let (mean, rstd) = stats(xs, self.eps);
                for ci in 0..d.cpg {
                    let c = g * d.cpg + ci;
                    let (scale, shift) = (w[c] * rstd, b[c] - mean * rstd * w[c]);
                    let range = ci * d.hw..(ci + 1) * d.hw;
                    let norm = |xv: f32| {
                        let y = xv * scale + shift;
                        if self.act { hardswish(y) } else { y }
                    };
                    let (oc, xc) = (&mut o[range.clone()], &xs[range]);
                    match mask {
                        Some(m) => {
                            let at = ng * group_len + ci * d.hw;
                            for ((ov, &xv), &mv) in oc.iter_mut().zip(xc).zip(&m[at..at + d.hw]) {
                                *ov = norm(xv) * mv;
                            }
                        }
                        None => oc.iter_mut().zip(xc).for_each(|(ov, &xv)| *ov = norm(xv)),
                    }
                }
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let (out, stats) = crate::cuda_ops::forward(self.cuda_dims(l1), self.eps, self.act, self.mask.as_ref(), self.hashed, s1, l1, s2, l2, s3, l3, None, self.saved.is_some())?;
        self.keep(stats)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The op reads b itself: passing [w | b] as one argument cost a concatenation (two
        // copies and an allocation) per backward pass.
        let op = GroupNormBackward::new(self.clone(), Held::Bias(b.clone()));
        if x.device().is_cuda() {
            // The kernel gives dx in x's dtype, and f32 [dw per image | db per image], summed
            // over the images here.
            let dx = x.apply_op3_no_bwd(&grad, w, &op)?;
            let sums = op.sums(x)?;
            let (n, c) = (x.dim(0)?, w.elem_count());
            // One reduction for both, (2, n, c) over the images; dw and db are its rows (views,
            // which the patched backprop stores as they are: no copies).
            let dwb = sums.narrow(0, 0, 2 * n * c)?.reshape((2, n, c))?.sum(1)?;
            let dwb = if w.dtype() == b.dtype() { dwb.to_dtype(w.dtype())? } else { dwb };
            let dw = dwb.get(0)?.reshape(w.shape())?.to_dtype(w.dtype())?;
            let db = dwb.get(1)?.reshape(b.shape())?.to_dtype(b.dtype())?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        // One op computes all three gradients; it returns them packed as [dx | dw | db].
        let packed = x.apply_op3_no_bwd(&grad, w, &op)?;
        let n = x.elem_count();
        let c = w.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, c)?;
        let db = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `act(group_norm(x + shift))` (with its dropout) as one op on `(x, shift, [w | b])`; CUDA only.
#[derive(Debug, Clone)]
struct ShiftedGroupNormOp(GroupNormOp);

impl candle_core::CustomOp3 for ShiftedGroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-hardswish-shifted"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("group norm: the fused shift is CUDA only (elsewhere it is added first)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let d = self.0.cuda_dims(l1);
        if !l3.is_contiguous() {
            candle_core::bail!("group norm: [w | b] must be contiguous");
        }
        let w = Layout::contiguous_with_offset(Shape::from(d.c), l3.start_offset());
        let b = Layout::contiguous_with_offset(Shape::from(d.c), l3.start_offset() + d.c);
        let (out, stats) = crate::cuda_ops::forward(d, self.0.eps, self.0.act, None, self.0.hashed, s1, l1, s3, &w, s3, &b, Some((s2, l2)), self.0.saved.is_some())?;
        self.0.keep(stats)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, shift: &Tensor, wb: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        // The op reads [w | b] itself, the shift is its argument: no concatenation of the three.
        let op = GroupNormBackward::new(self.0.clone(), Held::WeightsAndBias(wb.clone()));
        // dx in x's dtype, then f32 [dw per image | db per image | dshift].
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, &shift.contiguous()?, &op)?;
        let sums = op.sums(x)?;
        // The first two thirds as (2, n, c), summed over the images: [dw | db], wb's own layout.
        let dwb = sums.narrow(0, 0, 2 * n * c)?.reshape((2, n, c))?.sum(1)?.flatten_all()?.to_dtype(wb.dtype())?;
        let dshift = sums.narrow(0, 2 * n * c, n * c)?.reshape((n, c))?.to_dtype(shift.dtype())?;
        Ok((Some(dx), Some(dshift), Some(dwb)))
    }
}

/// `(x, dy, w)` with `b` held by the op, or with a shift `(x, dy, shift)` with `[w | b]` held:
/// the gradients. On the CPU (no shift), packed f32 [dx | dw | db]. On CUDA, dx in x's dtype;
/// the kernel's f32 per-image sums (dw, db, and the shift's gradient) wait in `sums` for
/// [`GroupNormBackward::sums`]: a custom op has one output, and packing dx with them made it
/// f32, so a bf16 step wrote dx in f32 and then paid a full-size cast back. Held, not passed:
/// passing them with an argument cost a concatenation (copies and an allocation) per call.
struct GroupNormBackward {
    op: GroupNormOp,
    held: Held,
    #[cfg(feature = "cuda")]
    sums: std::sync::Arc<std::sync::Mutex<Option<(CudaStorage, usize)>>>,
}

/// What [`GroupNormBackward`] reads besides its arguments.
enum Held {
    /// The bias; w is the third argument.
    Bias(Tensor),
    /// `[w | b]` (the fused shift's op, CUDA only); the shift is the third argument.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    WeightsAndBias(Tensor),
}

impl GroupNormBackward {
    fn new(op: GroupNormOp, held: Held) -> Self {
        Self {
            op,
            held,
            #[cfg(feature = "cuda")]
            sums: Default::default(),
        }
    }

    /// The sums of the CUDA pass that ran last through this op, as an f32 tensor on `like`'s
    /// device (taken: a second call is an error).
    fn sums(&self, like: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            like.apply_op1_no_bwd(&TakeSums(self.sums.clone()))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = like;
            candle_core::bail!("group norm backward: the per-image sums come from the CUDA kernel only")
        }
    }
}

/// Hands over a [`GroupNormBackward`]'s CUDA sums as an op's output (its input is not read).
#[cfg(feature = "cuda")]
struct TakeSums(std::sync::Arc<std::sync::Mutex<Option<(CudaStorage, usize)>>>);

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for TakeSums {
    fn name(&self) -> &'static str {
        "group-norm-backward-sums"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("group norm backward: the per-image sums come from the CUDA kernel only")
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let taken = self.0.lock().map_err(|_| candle_core::Error::Msg("group norm backward: its sums' lock is poisoned".into()))?.take();
        match taken {
            Some((s, len)) => Ok((s, Shape::from(len))),
            None => candle_core::bail!("group norm backward: no sums to take (the CUDA pass did not run, or they were taken)"),
        }
    }
}

impl candle_core::CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = &self.op;
        let d = op.cuda_dims(l1);
        let saved = op.take_saved()?;
        let (dx, sums) = match &self.held {
            Held::Bias(b) => {
                let (bs, bl) = b.storage_and_layout();
                let candle_core::Storage::Cuda(bs) = &*bs else { candle_core::bail!("group norm backward: the bias is not a CUDA tensor, as the input is") };
                crate::cuda_ops::backward(d, op.eps, op.act, op.mask.as_ref(), op.hashed, s1, l1, s2, l2, (s3, l3), (bs, bl), None, saved.as_ref())?
            }
            Held::WeightsAndBias(wb) => {
                // [w | b], one buffer: two views of it.
                let (ws, wl) = wb.storage_and_layout();
                let candle_core::Storage::Cuda(ws) = &*ws else { candle_core::bail!("group norm backward: [w | b] is not a CUDA tensor, as the input is") };
                if !wl.is_contiguous() || wb.elem_count() != 2 * d.c {
                    candle_core::bail!("group norm backward: [w | b] must be {} contiguous values, got {:?}", 2 * d.c, wb.shape());
                }
                let at = |start: usize| Layout::contiguous_with_offset(Shape::from(d.c), wl.start_offset() + start);
                let (lw, lb) = (at(0), at(d.c));
                crate::cuda_ops::backward(d, op.eps, op.act, op.mask.as_ref(), op.hashed, s1, l1, s2, l2, (ws, &lw), (ws, &lb), Some((s3, l3)), saved.as_ref())?
            }
        };
        let shift_len = if matches!(self.held, Held::WeightsAndBias(_)) { d.n * d.c } else { 0 };
        *self.sums.lock().map_err(|_| candle_core::Error::Msg("group norm backward: its sums' lock is poisoned".into()))? = Some((sums, 2 * d.n * d.c + shift_len));
        Ok((dx, l1.shape().clone()))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = &self.op;
        let Held::Bias(b) = &self.held else { candle_core::bail!("group norm backward: the fused shift is CUDA only") };
        if op.hashed.is_some() {
            candle_core::bail!("group norm backward: hashed dropout is fused on CUDA only");
        }
        let d = op.dims(l1);
        let (b_storage, b_layout) = b.storage_and_layout();
        let candle_core::Storage::Cpu(b_storage) = &*b_storage else { candle_core::bail!("group norm backward: the bias is not a CPU tensor, as the input is") };
        let (x, go, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, slice(b_storage, b_layout)?);
        if w.len() != d.c || b.len() != d.c {
            candle_core::bail!("group norm backward: {} weights and {} biases for {} channels", w.len(), b.len(), d.c);
        }
        let group_len = d.cpg * d.hw;
        // Room for dw and db, appended below without a reallocation. Each task writes all of its
        // group's dx.
        let mut dx = crate::output_buffer(x.len(), 2 * d.c);
        // Per (image, channel) partial sums of dL/dy and dL/dy * xhat, reduced over images below.
        let mut partial = vec![0f32; d.n * d.c * 2];
        with_mask(&op.mask, |mask| {
            dx.par_chunks_mut(group_len)
                .zip(partial.par_chunks_mut(d.cpg * 2))
                .enumerate()
                // Per task, one channel's grad * mask (through the fused dropout first), when masked.
                .for_each_init(Vec::new, |masked: &mut Vec<f32>, (ng, (dxs, part))| {
                    let g = ng % op.groups;
                    let xs = &x[ng * group_len..(ng + 1) * group_len];
                    let gos = &go[ng * group_len..(ng + 1) * group_len];
                    let (mean, rstd) = stats(xs, op.eps);
                    // First pass: dL/dxhat into dxs, and the two group means it needs
                    // (sum of gy*w and of gy*w*xhat: w times the channel's db and dw).
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for ci in 0..d.cpg {
                        let c = g * d.cpg + ci;
                        let (wc, bc) = (w[c], b[c]);
                        // 16 lanes per sum, as in `lane_sum`.
                        let (mut db_l, mut dw_l) = ([0f32; 16], [0f32; 16]);
                        let range = ci * d.hw..(ci + 1) * d.hw;
                        let gc = match mask {
                            Some(m) => {
                                let at = ng * group_len + ci * d.hw;
                                masked.clear();
                                masked.extend(gos[range.clone()].iter().zip(&m[at..at + d.hw]).map(|(g, m)| g * m));
                                &masked[..]
                            }
                            None => &gos[range.clone()],
                        };
                        let (dxc, xc) = (&mut dxs[range.clone()], &xs[range]);
                        let mut step = |dv: &mut f32, xv: f32, gv: f32, lane: usize| {
                            let xhat = (xv - mean) * rstd;
                            let gy = if op.act { gv * hardswish_grad(xhat * wc + bc) } else { gv };
                            db_l[lane] += gy;
                            dw_l[lane] += gy * xhat;
                            *dv = gy * wc;
                        };
                        let full = xc.len() / 16 * 16;
                        for ((dv, xv), gv) in dxc[..full].chunks_exact_mut(16).zip(xc[..full].chunks_exact(16)).zip(gc[..full].chunks_exact(16)) {
                            for lane in 0..16 {
                                step(&mut dv[lane], xv[lane], gv[lane], lane);
                            }
                        }
                        for i in full..xc.len() {
                            step(&mut dxc[i], xc[i], gc[i], 0);
                        }
                        let (db_c, dw_c): (f32, f32) = (db_l.iter().sum(), dw_l.iter().sum());
                        part[2 * ci] = dw_c;
                        part[2 * ci + 1] = db_c;
                        sum_g += (wc * db_c) as f64;
                        sum_gx += (wc * dw_c) as f64;
                    }
                    let len = group_len as f64;
                    let (mg, mgx) = ((sum_g / len) as f32, (sum_gx / len) as f32);
                    for (dv, &xv) in dxs.iter_mut().zip(xs) {
                        let xhat = (xv - mean) * rstd;
                        *dv = rstd * (*dv - mg - xhat * mgx);
                    }
                });
            Ok(())
        })?;
        let mut out = dx;
        let mut dw = vec![0f32; d.c];
        let mut db = vec![0f32; d.c];
        for img in 0..d.n {
            for c in 0..d.c {
                dw[c] += partial[(img * d.c + c) * 2];
                db[c] += partial[(img * d.c + c) * 2 + 1];
            }
        }
        out.extend_from_slice(&dw);
        out.extend_from_slice(&db);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64, scale: f32, offset: f32) -> Tensor {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale + offset
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn matches_composite_forward_and_backward() {
        for act in [false, true] {
            let x = Var::from_tensor(&rand(&[3, 8, 5, 4], 1, 3.0, 0.5)).unwrap();
            let w = Var::from_tensor(&rand(&[8], 2, 1.0, 1.0)).unwrap();
            let b = Var::from_tensor(&rand(&[8], 3, 1.0, 0.0)).unwrap();
            let gn = GroupNorm { weight: w.as_tensor().clone(), bias: b.as_tensor().clone(), groups: 4, eps: 1e-5 };
            let ours = gn.apply(x.as_tensor(), act).unwrap();
            let reference = composite_group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 4, 1e-5).unwrap();
            let reference = if act { crate::model::hardswish(&reference).unwrap() } else { reference };
            assert!(max_diff(&ours, &reference) < 1e-5, "forward act={act}");
            let r = rand(ours.dims(), 4, 1.0, 0.0);
            let g1 = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = reference.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(d < 1e-4, "grad {name} act={act}: {d}");
            }
        }
    }

    #[test]
    fn fused_dropout_mask_matches_a_separate_multiply() {
        let x = Var::from_tensor(&rand(&[2, 8, 4, 3], 11, 3.0, 0.5)).unwrap();
        let w = Var::from_tensor(&rand(&[8], 12, 1.0, 1.0)).unwrap();
        let b = Var::from_tensor(&rand(&[8], 13, 1.0, 0.0)).unwrap();
        let gn = GroupNorm { weight: w.as_tensor().clone(), bias: b.as_tensor().clone(), groups: 4, eps: 1e-5 };
        // A dropout-like mask: zeros and 1/(1-p).
        let m: Vec<f32> = rand(&[2, 8, 4, 3], 14, 1.0, 0.0).flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| if v < -0.6 { 0.0 } else { 1.25 }).collect();
        let mask = Tensor::from_vec(m, (2, 8, 4, 3), &Device::Cpu).unwrap();
        let fused = gn.forward_hardswish_masked(x.as_tensor(), &mask).unwrap();
        let separate = gn.forward_hardswish(x.as_tensor()).unwrap().mul(&mask).unwrap();
        assert!(max_diff(&fused, &separate) < 1e-6);
        let r = rand(fused.dims(), 15, 1.0, 0.0);
        let g1 = fused.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = separate.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(d < 1e-5, "grad {name}: {d}");
        }
    }

    #[test]
    fn hashed_dropout_rate_scale_and_streams() {
        let d = HashedDropout::new(42, 3, 0.1);
        assert_eq!(d.threshold, 1_677_722); // ceil(0.1 * 2^24)
        let f: Vec<f32> = (0..1_000_000u64).map(|i| d.factor(i)).collect();
        let dropped = f.iter().filter(|&&v| v == 0.0).count() as f64 / f.len() as f64;
        assert!((dropped - 0.1).abs() < 0.002, "{dropped}");
        assert!(f.iter().all(|&v| v == 0.0 || v == 1.0 / 0.9));
        // Deterministic, and different for another site, another seed.
        assert_eq!(HashedDropout::new(42, 3, 0.1), d);
        for other in [HashedDropout::new(42, 4, 0.1), HashedDropout::new(43, 3, 0.1)] {
            let same = (0..10_000u64).filter(|&i| (other.factor(i) == 0.0) == (d.factor(i) == 0.0)).count();
            // Independent masks agree on ~0.9^2 + 0.1^2 = 82% of the elements.
            assert!((7900..8500).contains(&same), "{same}");
        }
        // The tensor form (parallel chunks) is the element-by-element one.
        let m = d.mask(&Shape::from((3, 70_000)), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(m.iter().enumerate().all(|(i, &v)| v == d.factor(i as u64)));
        // Seen from element k on, it is the same sequence shifted: the kernels take the moved key.
        for k in [1u64, 12_345, 1 << 40] {
            let moved = d.from_element(k);
            assert!((0..1000u64).all(|i| moved.factor(i) == d.factor(k + i)), "from element {k}");
        }
        assert_eq!(d.from_element(0), d);
        // Pinned values, from an independent (Python) implementation of the same definition:
        // the CUDA kernel's `drop_factor` is checked against `factor`, and this keeps `factor`
        // itself from drifting.
        assert_eq!(d.key, 0x09E8_B054_3D5D_9451);
        let dropped_bits = (0..64u64).filter(|&i| d.factor(i) == 0.0).fold(0u64, |acc, i| acc | 1 << i);
        assert_eq!(dropped_bits, 0x8820_0420_0140_0008);
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(GOLDEN_GAMMA), 0xE220_A839_7B1D_CDAF); // splitmix64(0)'s first output
    }

    #[test]
    fn a_seed_in_device_memory_resolves_to_the_host_seeded_dropout() {
        for (seed, site, p, first) in [(42u64, 3u64, 0.1f32, 0u64), (7, 0, 0.3, 12_345), (u64::MAX, 17, 0.5, 1 << 40)] {
            let on_device = HashedDropout::with_seed_at(0x7f00_1234_5600, site, p).from_element(first);
            assert!(on_device.seed_on_device());
            assert_eq!(on_device.resolve(seed), HashedDropout::new(seed, site, p).from_element(first), "seed {seed} site {site}");
            // Another seed in the same memory gives another mask.
            assert_ne!(on_device.resolve(seed ^ 1).key, on_device.resolve(seed).key);
        }
        let e = HashedDropout::with_seed_at(0x7f00_1234_5600, 0, 0.1).mask(&Shape::from((2, 3)), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("device memory"), "{e}");
    }

    #[test]
    fn a_shift_off_cuda_is_added_first() {
        let x = rand(&[2, 8, 4, 3], 31, 3.0, 0.5);
        let gn = GroupNorm { weight: rand(&[8], 32, 1.0, 1.0), bias: rand(&[8], 33, 1.0, 0.0), groups: 4, eps: 1e-5 };
        let shift = rand(&[2, 8], 34, 2.0, 0.0);
        let added = x.broadcast_add(&shift.reshape((2, 8, 1, 1)).unwrap()).unwrap();
        let d = HashedDropout::new(5, 0, 0.3);
        for drop in [None, Some(d)] {
            let got = gn.forward_hardswish_shifted(&x, &shift, drop).unwrap();
            let want = match drop {
                Some(d) => gn.forward_hardswish_dropout(&added, d).unwrap(),
                None => gn.forward_hardswish(&added).unwrap(),
            };
            assert_eq!(max_diff(&got, &want), 0.0, "dropout {drop:?}");
        }
        // One value per image and channel, or a one-line error.
        let e = gn.forward_hardswish_shifted(&x, &shift.reshape(16).unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("must be [2, 8]"), "{e}");
    }

    #[test]
    fn hashed_dropout_off_cuda_is_the_masked_op() {
        let x = rand(&[2, 8, 4, 3], 21, 3.0, 0.5);
        let gn = GroupNorm { weight: rand(&[8], 22, 1.0, 1.0), bias: rand(&[8], 23, 1.0, 0.0), groups: 4, eps: 1e-5 };
        let d = HashedDropout::new(5, 0, 0.3);
        let a = gn.forward_hardswish_dropout(&x, d).unwrap();
        let b = gn.forward_hardswish_masked(&x, &d.mask(x.shape(), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let base = rand(&[2, 4, 3, 3], 7, 2.0, 0.0);
        let w = rand(&[4], 8, 0.5, 1.0);
        let b = rand(&[4], 9, 0.5, 0.0);
        let r = rand(&[2, 4, 3, 3], 10, 1.0, 0.0);
        let gn = GroupNorm { weight: w, bias: b, groups: 2, eps: 1e-5 };
        let f = |x: &Tensor| gn.forward_hardswish(x).unwrap().mul(&r).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let xv = Var::from_tensor(&base).unwrap();
        let grads = gn.forward_hardswish(xv.as_tensor()).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let flat = base.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for idx in [0usize, 5, 17, 40, 71] {
            let eps = 1e-3f32;
            let mut p = flat.clone();
            p[idx] += eps;
            let mut m = flat.clone();
            m[idx] -= eps;
            let tp = Tensor::from_vec(p, base.shape(), &Device::Cpu).unwrap();
            let tm = Tensor::from_vec(m, base.shape(), &Device::Cpu).unwrap();
            let fd = (f(&tp) - f(&tm)) / (2.0 * eps as f64);
            assert!((fd - g[idx] as f64).abs() < 2e-2, "idx {idx}: fd {fd} vs {}", g[idx]);
        }
    }
}
