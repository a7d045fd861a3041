//! Nearest-neighbour x2 upsampling as one CPU op with its own backward.
//!
//! candle 0.11 computes the backward of `upsample_nearest2d` as a grouped convolution with a
//! kernel of ones on its direct-loop CPU path: 4% of a small model's training step, for what
//! is a sum over 2x2 blocks. On CUDA (f32, bf16) the same ops run the kernels of `cuda_ops`
//! (candle runs that grouped convolution as one convolution per channel there). Other devices
//! and dtypes use candle's op.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `[B, C, H, W]` -> `[B, C, 2H, 2W]`, each pixel repeated over a 2x2 block.
pub fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if fused(x) {
        x.contiguous()?.apply_op1(Upsample2x)
    } else {
        x.upsample_nearest2d(2 * h, 2 * w)
    }
}

fn fused(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return matches!(x.dtype(), DType::F32 | DType::BF16) && crate::cuda_ops::upsample_enabled();
    }
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// (B, C, H, W).
type Dims4 = (usize, usize, usize, usize);

/// The op's contiguous input and its dimensions.
fn input<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], Dims4)> {
    let data = s.as_slice::<f32>()?;
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("upsample2x expects a contiguous input".into()))?;
    Ok((&data[a..b], l.shape().dims4()?))
}

struct Upsample2x;

impl candle_core::CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, (n, c, h, w)) = input(s, l)?;
        // Every output row is written: two per input row.
        let mut out = crate::output_buffer(x.len() * 4, 0);
        if !x.is_empty() {
            out.par_chunks_mut(4 * w).zip(x.par_chunks(w)).for_each(|(rows, src)| {
                let (top, bottom) = rows.split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(src) {
                    pair[0] = v;
                    pair[1] = v;
                }
                bottom.copy_from_slice(top);
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, 2 * h, 2 * w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        Ok((crate::cuda_ops::upsample2x(s, l, true)?, Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&BlockSum2x)?))
    }
}

/// `[B, C, 2H, 2W]` -> `[B, C, H, W]`: the sum of each 2x2 block (the adjoint of [`Upsample2x`]).
struct BlockSum2x;

impl candle_core::CustomOp1 for BlockSum2x {
    fn name(&self) -> &'static str {
        "block-sum-2x"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h2, w2) = l.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("block-sum-2x: odd size {h2}x{w2}");
        }
        Ok((crate::cuda_ops::upsample2x(s, l, false)?, Shape::from((n, c, h2 / 2, w2 / 2))))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, (n, c, h2, w2)) = input(s, l)?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("block-sum-2x: odd size {h2}x{w2}");
        }
        let w = w2 / 2;
        // Every output row is written from its two input rows.
        let mut out = crate::output_buffer(g.len() / 4, 0);
        if !g.is_empty() {
            out.par_chunks_mut(w).zip(g.par_chunks(2 * w2)).for_each(|(dst, rows)| {
                let (top, bottom) = rows.split_at(w2);
                for ((d, t), b) in dst.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                    *d = (t[0] + t[1]) + (b[0] + b[1]);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, h2 / 2, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_upsample_and_its_gradient() {
        let n = 2 * 3 * 5 * 4;
        let x = Var::from_tensor(&Tensor::from_vec((0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), (2, 3, 5, 4), &Device::Cpu).unwrap()).unwrap();
        let weights = Tensor::from_vec((0..4 * n).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(), (2, 3, 10, 8), &Device::Cpu).unwrap();
        let ours = upsample2x(&x).unwrap();
        let want = x.upsample_nearest2d(10, 8).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 10, 8]);
        assert_eq!(ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let g = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let got = g.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // d/dx[b, c, i, j] = sum of the weights over the 2x2 block the pixel was copied to.
        let wv = weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (idx, v) in got.iter().enumerate() {
            let (plane, i, j) = (idx / 20, (idx % 20) / 4, idx % 4);
            let at = |di: usize, dj: usize| wv[plane * 80 + (2 * i + di) * 8 + 2 * j + dj];
            let want = at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1);
            assert!((v - want).abs() < 1e-5, "at {idx}: {v} vs {want}");
        }
    }
}
