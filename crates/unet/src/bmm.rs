//! Batched matrix product `op(a) op(b)` with either operand read transposed, as one CPU op with
//! its own backward.
//!
//! Attention multiplies per image a `[c, n]` by an `[n, c]` and an `[n, n]` by an `[n, c]`
//! (`n` = 256 pixels at 16x16). candle 0.11's CPU matmul runs the batch items one after the
//! other and splits each small product across the threads, and its backward multiplies by
//! transposed views that the attention code had made contiguous first; together those were
//! ~15% of a small model's training step. Here the batch items run in parallel, each product
//! reads its operands through strides (no transposed copies), and the backward is two more
//! such products. Other devices and dtypes use candle's matmul.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `op(a) op(b)` per batch item, where `op(x)` is `x` or, with its flag set, `x` transposed
/// over its last two dimensions. `a` and `b` are `[B, r, c]`.
pub fn bmm(a: &Tensor, a_t: bool, b: &Tensor, b_t: bool) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        // Items whose rows are contiguous are read where they are, however far apart (q, k and
        // v are narrows of one stacked projection).
        let items = |t: &Tensor| if item_stride(t.layout()).is_some() { Ok(t.clone()) } else { t.contiguous() };
        items(a)?.apply_op2(&items(b)?, Bmm { a_t, b_t })
    } else {
        let a = if a_t { a.transpose(1, 2)? } else { a.clone() };
        let b = if b_t { b.transpose(1, 2)? } else { b.clone() };
        a.matmul(&b)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bmm {
    a_t: bool,
    b_t: bool,
}

impl Bmm {
    /// (batch, m, k, n) from the two operands' shapes.
    fn dims(&self, la: &Layout, lb: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (ba, a0, a1) = la.shape().dims3()?;
        let (bb, b0, b1) = lb.shape().dims3()?;
        let (m, ka) = if self.a_t { (a1, a0) } else { (a0, a1) };
        let (kb, n) = if self.b_t { (b1, b0) } else { (b0, b1) };
        if ba != bb || ka != kb {
            candle_core::bail!("bmm: {:?}{} x {:?}{} do not fit", la.shape(), if self.a_t { "^T" } else { "" }, lb.shape(), if self.b_t { "^T" } else { "" });
        }
        Ok((ba, m, ka, n))
    }
}

/// For a `[B, r, c]` layout whose items each have contiguous rows, the distance between
/// items (0 for a single item); `None` for any other layout.
fn item_stride(l: &Layout) -> Option<usize> {
    let (d, s) = (l.dims(), l.stride());
    if d.len() != 3 || (d[2] > 1 && s[2] != 1) || (d[1] > 1 && s[1] != d[2]) {
        return None;
    }
    Some(if d[0] > 1 { s[0] } else { 0 })
}

/// The operand's values from its first element, and the distance between its items.
fn items<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize)> {
    let data = s.as_slice::<f32>()?;
    let stride = item_stride(l).ok_or_else(|| candle_core::Error::Msg("bmm expects operands with contiguous rows".into()))?;
    let (b, r, c) = l.shape().dims3()?;
    // The last item must lie in the buffer.
    let end = l.start_offset() + b.saturating_sub(1) * stride + r * c;
    if b > 0 && end > data.len() {
        candle_core::bail!("bmm: an operand's layout runs past its buffer");
    }
    Ok((&data[l.start_offset().min(data.len())..], stride))
}

impl candle_core::CustomOp2 for Bmm {
    fn name(&self) -> &'static str {
        "bmm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, m, k, n) = self.dims(l1, l2)?;
        let ((a, sa), (b, sb)) = (items(s1, l1)?, items(s2, l2)?);
        // The GEMM overwrites every element (beta = 0, no accumulation).
        let mut out = crate::output_buffer(batch * m * n, 0);
        if m * n == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((batch, m, n))));
        }
        if k == 0 {
            out.fill(0.0);
            return Ok((CpuStorage::F32(out), Shape::from((batch, m, n))));
        }
        // Enough images to share out: one single-threaded GEMM each; otherwise split each GEMM.
        let threads = crate::conv::gemm_threads(batch);
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
            let (ai, bi) = (&a[i * sa..i * sa + m * k], &b[i * sb..i * sb + k * n]);
            crate::conv::matmul(m, n, k, dst, false, ai, self.a_t, bi, self.b_t, threads);
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, m, n))))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let no_bwd = |x: &Tensor, x_t: bool, y: &Tensor, y_t: bool| x.apply_op2_no_bwd(y, &Bmm { a_t: x_t, b_t: y_t });
        // C = op(A) op(B): d op(A) = dC op(B)^T and d op(B) = op(A)^T dC, transposed back
        // where the operand was read transposed.
        let da = if !a.track_op() {
            None
        } else if self.a_t {
            Some(no_bwd(b, self.b_t, &g, true)?)
        } else {
            Some(no_bwd(&g, false, b, !self.b_t)?)
        };
        let db = if !b.track_op() {
            None
        } else if self.b_t {
            Some(no_bwd(&g, true, a, self.a_t)?)
        } else {
            Some(no_bwd(a, !self.a_t, &g, false)?)
        };
        Ok((da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn lcg(seed: u64, shape: &[usize]) -> Tensor {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Every transpose combination, batches below and above the pool size, against candle's
    /// matmul of transposed views: the product and both gradients (of a weighted sum, so that
    /// each output element's gradient differs).
    #[test]
    fn matches_candle_matmul_and_its_gradients() {
        let (m, k, n) = (5usize, 7usize, 3usize);
        for batch in [1usize, 4] {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let a_shape = if a_t { [batch, k, m] } else { [batch, m, k] };
                let b_shape = if b_t { [batch, n, k] } else { [batch, k, n] };
                let a = Var::from_tensor(&lcg(1, &a_shape)).unwrap();
                let b = Var::from_tensor(&lcg(2, &b_shape)).unwrap();
                let w = lcg(3, &[batch, m, n]);
                let ours = bmm(&a, a_t, &b, b_t).unwrap();
                let at = if a_t { a.transpose(1, 2).unwrap() } else { a.as_tensor().clone() };
                let bt = if b_t { b.transpose(1, 2).unwrap() } else { b.as_tensor().clone() };
                let want = at.matmul(&bt).unwrap();
                assert_eq!(ours.dims(), &[batch, m, n]);
                assert!(max_diff(&ours, &want) < 1e-5, "product, batch {batch} a_t {a_t} b_t {b_t}");
                // The path other dtypes and devices take (candle's matmul of transposed views).
                let f64_path = bmm(&a.to_dtype(DType::F64).unwrap(), a_t, &b.to_dtype(DType::F64).unwrap(), b_t).unwrap().to_dtype(DType::F32).unwrap();
                assert!(max_diff(&f64_path, &want) < 1e-5, "fallback, batch {batch} a_t {a_t} b_t {b_t}");
                let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let g_want = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&a, &b] {
                    let (x, y) = (g_ours.get(v).unwrap(), g_want.get(v).unwrap());
                    assert_eq!(x.dims(), v.dims());
                    assert!(max_diff(x, y) < 1e-5, "gradient, batch {batch} a_t {a_t} b_t {b_t}");
                }
            }
        }
    }

    #[test]
    fn operands_read_in_place_from_a_stacked_tensor_match_compact_copies() {
        // Attention's q, k and v are narrows of one [B, 3, r, c] product: each image's rows
        // contiguous, images 3 r c apart. Read in place, the product and both gradients must
        // equal those of compact copies.
        let (batch, r, c) = (3usize, 4usize, 5usize);
        let stack = Var::from_tensor(&lcg(7, &[batch, 3, r, c])).unwrap();
        let part = |i: usize| stack.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        let (a, b) = (part(0), part(2));
        assert!(!a.is_contiguous() && item_stride(a.layout()) == Some(3 * r * c));
        let w = lcg(8, &[batch, r, r]);
        for (a_t, b_t) in [(false, true), (true, false)] {
            let (m, n) = if a_t { (c, c) } else { (r, r) };
            let w = if a_t { lcg(9, &[batch, m, n]) } else { w.clone() };
            let ours = bmm(&a, a_t, &b, b_t).unwrap();
            let want = bmm(&a.contiguous().unwrap(), a_t, &b.contiguous().unwrap(), b_t).unwrap();
            assert_eq!(ours.dims(), &[batch, m, n]);
            assert_eq!(max_diff(&ours, &want), 0.0, "a_t {a_t} b_t {b_t}");
            // candle's matmul (the GPU's path) on the same strided views: batch stride 3 r c.
            let s64 = stack.as_tensor().to_dtype(DType::F64).unwrap();
            let p64 = |i: usize| s64.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
            let candle_path = bmm(&p64(0), a_t, &p64(2), b_t).unwrap().to_dtype(DType::F32).unwrap();
            assert!(max_diff(&candle_path, &want) < 1e-5, "candle's matmul, a_t {a_t} b_t {b_t}");
            let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g_want = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (x, y) = (g_ours.get(&stack).unwrap(), g_want.get(&stack).unwrap());
            assert_eq!(max_diff(x, y), 0.0, "gradient, a_t {a_t} b_t {b_t}");
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let a = lcg(1, &[2, 3, 4]);
        let b = lcg(2, &[2, 5, 6]);
        assert!(bmm(&a, false, &b, false).is_err());
        assert!(bmm(&a, true, &lcg(3, &[3, 3, 4]), false).is_err());
    }
}
