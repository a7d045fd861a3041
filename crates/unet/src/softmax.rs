//! `softmax(scale * x)` over the last dimension, as one CPU op with its own backward.
//!
//! The attention scores go through candle_nn's differentiable composite otherwise (max, sub,
//! exp, sum, div, each with a full-size intermediate and a backward of its own; candle 0.11's
//! `softmax_last_dim` has no backward). Here the forward is one pass per row and the backward
//! `dx = scale * y * (dy - sum(dy * y))` is one more, keeping only the output. On CUDA (f32,
//! bf16) the same op runs the kernels of `cuda_ops`. Other devices and dtypes use the composite.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `softmax(scale * x)` along the last dimension.
pub fn scaled_softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(x) {
        x.contiguous()?.apply_op1(ScaledSoftmax { scale: scale as f32 })
    } else {
        candle_nn::ops::softmax(&x.affine(scale, 0.0)?, D::Minus1)
    }
}

fn fused(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return matches!(x.dtype(), DType::F32 | DType::BF16) && x.rank() >= 1 && crate::cuda_ops::softmax_enabled();
    }
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `e^x` for `x <= 0` within 2 ulp of `f32::exp`, in plain arithmetic that vectorises (libm's
/// `expf` is a scalar call and was half the softmax's time): `x = n ln2 + r` with `|r| <= ln2/2`,
/// a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients), and `2^n` built in the
/// exponent bits. Inputs are clamped at -87.3 (giving 1.2e-38, the smallest normal float)
/// so that the exponent stays valid; next to a row's maximum term (1) that is nothing.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5 * 2^23 trick, and no `mul_add`: the build targets baseline
    // x86-64, where `round` and `mul_add` are library calls rather than instructions.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[derive(Debug, Clone, Copy)]
struct ScaledSoftmax {
    scale: f32,
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize)> {
    let data = s.as_slice::<f32>()?;
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("softmax op expects contiguous input".into()))?;
    let dim = *l.dims().last().unwrap_or(&1);
    Ok((&data[a..b], dim.max(1)))
}

impl candle_core::CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dim) = rows(s, l)?;
        // Every row is written in full.
        let mut out = crate::output_buffer(x.len(), 0);
        let scale = self.scale;
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, r)| {
            let max = r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            for (ov, &v) in o.iter_mut().zip(r) {
                *ov = exp_nonpositive(v * scale - max);
            }
            let inv = 1.0 / o.iter().sum::<f32>();
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let len = *l.dims().last().unwrap_or(&1);
        Ok((crate::cuda_ops::softmax(s, l, len, self.scale)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = y.apply_op2_no_bwd(&grad.contiguous()?, &ScaledSoftmaxBackward { scale: self.scale })?;
        Ok(Some(dx))
    }
}

struct ScaledSoftmaxBackward {
    scale: f32,
}

impl candle_core::CustomOp2 for ScaledSoftmaxBackward {
    fn name(&self) -> &'static str {
        "scaled-softmax-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let len = *l1.dims().last().unwrap_or(&1);
        Ok((crate::cuda_ops::softmax_backward(s1, l1, s2, l2, len, self.scale)?, l1.shape().clone()))
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dim) = rows(s1, l1)?;
        let (g, _) = rows(s2, l2)?;
        // Every row is written in full.
        let mut dx = crate::output_buffer(y.len(), 0);
        let scale = self.scale;
        dx.par_chunks_mut(dim).zip(y.par_chunks(dim).zip(g.par_chunks(dim))).for_each(|(d, (yr, gr))| {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((dv, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                *dv = scale * yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fast_exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e6) < 1.3e-38);
    }

    #[test]
    fn matches_the_composite_forward_and_backward() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..2 * 3 * 7).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
        let x = Var::from_vec(v, (2, 3, 7), &dev).unwrap();
        let r = Tensor::from_vec((0..42).map(|i| ((i * 13 % 5) as f32) - 2.0).collect::<Vec<_>>(), (2, 3, 7), &dev).unwrap();
        let ours = scaled_softmax_last_dim(x.as_tensor(), 0.3).unwrap();
        let theirs = candle_nn::ops::softmax(&x.as_tensor().affine(0.3, 0.0).unwrap(), D::Minus1).unwrap();
        let diff = |a: &Tensor, b: &Tensor| a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&ours, &theirs) < 1e-6);
        let g1 = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = theirs.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-5);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let base: Vec<f32> = (0..10).map(|i| (i as f32 * 0.61).sin() * 2.0).collect();
        let r = Tensor::from_vec((0..10).map(|i| (i as f32 * 1.3).cos()).collect::<Vec<_>>(), (2, 5), &dev).unwrap();
        let f = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), (2, 5), &dev).unwrap();
            scaled_softmax_last_dim(&t, 1.7).unwrap().mul(&r).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let x = Var::from_vec(base.clone(), (2, 5), &dev).unwrap();
        let g = scaled_softmax_last_dim(x.as_tensor(), 1.7).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..10 {
            let eps = 1e-2;
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (f(&p) - f(&m)) / (2.0 * eps as f64);
            assert!((fd - g[i] as f64).abs() < 1e-3, "{i}: fd {fd} vs {}", g[i]);
        }
    }
}
