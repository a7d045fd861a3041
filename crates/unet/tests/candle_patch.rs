//! The vendored candle-core's backprop patch (third_party/README.md): gradients of a tensor used
//! several times are summed in place when the store holds the only handle on the running sum.
//! These check that the sums are exact and that a gradient shared by two entries (both inputs
//! of an addition receive the same tensor) is never written through; and that a first gradient
//! that is a view is stored as its own compact buffer.

use candle_core::{Device, Tensor, Var};


/// Above the in-place sum's serial threshold (64K) and not a multiple of its parallel chunk
/// (16K); `SMALL` stays on the serial path.
const N: usize = 100_000;
const SMALL: usize = 1_000;

fn ramp_n(n: usize, scale: f32, offset: f32) -> Tensor {
    Tensor::from_vec((0..n).map(|i| ((i as f32) * scale + offset).sin()).collect::<Vec<_>>(), n, &Device::Cpu).unwrap()
}

fn ramp(scale: f32, offset: f32) -> Tensor {
    ramp_n(N, scale, offset)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

#[test]
fn gradients_of_a_tensor_used_three_times_are_summed_exactly() {
    for n in [N, SMALL] {
        three_uses(n);
    }
}

fn three_uses(n: usize) {
    let x = Var::from_tensor(&ramp_n(n, 0.01, 0.0)).unwrap();
    let (w1, w2, w3) = (ramp_n(n, 0.02, 1.0), ramp_n(n, 0.03, 2.0), ramp_n(n, 0.05, 3.0));
    let f = ((x.mul(&w1).unwrap().sum_all().unwrap() + x.mul(&w2).unwrap().sum_all().unwrap()).unwrap() + x.mul(&w3).unwrap().sum_all().unwrap()).unwrap();
    let g = f.backward().unwrap();
    let got = values(g.get(&x).unwrap());
    let (a, b, c) = (values(&w1), values(&w2), values(&w3));
    assert_eq!(got.len(), n);
    for i in 0..n {
        // The store adds in graph order; any order of three terms is within one rounding.
        let want = a[i] + b[i] + c[i];
        assert!((got[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "at {i}: {} vs {want}", got[i]);
    }
}

#[test]
fn a_gradient_shared_by_two_inputs_is_not_written_in_place() {
    // u = x + y hands the same gradient tensor to x and to y; x's other use then adds to x's
    // gradient. Whatever order the backward pass visits them in, y's gradient must stay w.
    for x_term_first in [false, true] {
        let x = Var::from_tensor(&ramp(0.01, 0.5)).unwrap();
        let y = Var::from_tensor(&ramp(0.02, 1.5)).unwrap();
        let (w, v) = (ramp(0.07, 0.0), ramp(0.11, 1.0));
        let shared = (x.as_tensor() + y.as_tensor()).unwrap().mul(&w).unwrap().sum_all().unwrap();
        let other = x.mul(&v).unwrap().sum_all().unwrap();
        let f = if x_term_first { (other + shared).unwrap() } else { (shared + other).unwrap() };
        let g = f.backward().unwrap();
        let (gx, gy) = (values(g.get(&x).unwrap()), values(g.get(&y).unwrap()));
        let (wv, vv) = (values(&w), values(&v));
        for i in 0..N {
            assert_eq!(gy[i], wv[i], "y's gradient changed at {i} (x term first: {x_term_first})");
            assert_eq!(gx[i], wv[i] + vv[i], "x's gradient at {i} (x term first: {x_term_first})");
        }
    }
}

/// The length of `t`'s whole CPU buffer.
fn buffer_len(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len(),
        _ => panic!("expected an f32 CPU tensor"),
    }
}

#[test]
fn a_view_gradient_is_stored_as_a_compact_exact_copy() {
    // A concatenation hands each input a narrow of its gradient: strided along dim 1, an offset
    // slice along dim 0. Strided, or a slice of a large buffer (over 2^22 values: 2^22 + 3 x 4
    // here), each must be stored as its own buffer (not a view keeping the whole gradient
    // alive), with the same values.
    for (dim, a_shape, b_shape) in [(0, (3, 4), (1 << 20, 4)), (1, (2, 3), (2, 5))] {
        let a = Var::from_tensor(&ramp_n(a_shape.0 * a_shape.1, 0.3, 0.1).reshape(a_shape).unwrap()).unwrap();
        let b = Var::from_tensor(&ramp_n(b_shape.0 * b_shape.1, 0.2, 0.7).reshape(b_shape).unwrap()).unwrap();
        let c = Tensor::cat(&[a.as_tensor(), b.as_tensor()], dim).unwrap();
        // With -0.0 in each input's part: a copy keeps it, upstream's 0 + g made it +0.0.
        let mut wv = values(&ramp_n(c.elem_count(), 0.13, 0.3));
        let last = wv.len() - 1;
        (wv[0], wv[last]) = (-0.0, -0.0);
        let w = Tensor::from_vec(wv, c.shape(), &Device::Cpu).unwrap();
        let g = c.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let split = a.as_tensor().dim(dim).unwrap();
        for (x, start, len) in [(&a, 0, split), (&b, split, c.dim(dim).unwrap() - split)] {
            let got = g.get(x.as_tensor()).unwrap();
            let want = w.narrow(dim, start, len).unwrap();
            assert!(got.is_contiguous() && got.layout().start_offset() == 0, "dim {dim}: a view was stored");
            assert_eq!(buffer_len(got), got.elem_count(), "dim {dim}: the gradient keeps a larger buffer");
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(got), bits(&want), "dim {dim}");
        }
    }
}

#[test]
fn a_contiguous_slice_of_a_small_gradient_is_stored_as_a_view_with_exact_values() {
    // The time-embedding projections' weights are stacked, and each gets a row range of the
    // stack's gradient: contiguous slices of a small buffer, stored as they are (a copy each
    // cost an allocation and a launch). The values are the slices' own, and a second use of
    // an input still adds to its gradient (a new buffer: the view is not written).
    let parts: Vec<Var> = (0..3).map(|i| Var::from_tensor(&ramp_n(2 * 5, 0.3 + i as f32, 0.1).reshape((2, 5)).unwrap()).unwrap()).collect();
    let refs: Vec<&Tensor> = parts.iter().map(|v| v.as_tensor()).collect();
    let w = ramp_n(6 * 5, 0.13, 0.3).reshape((6, 5)).unwrap();
    let v = ramp_n(2 * 5, 0.7, 1.1).reshape((2, 5)).unwrap();
    for second_use in [false, true] {
        let stacked = Tensor::cat(&refs, 0).unwrap();
        let mut f = stacked.mul(&w).unwrap().sum_all().unwrap();
        if second_use {
            f = (f + parts[1].as_tensor().mul(&v).unwrap().sum_all().unwrap()).unwrap();
        }
        let g = f.backward().unwrap();
        for (i, p) in parts.iter().enumerate() {
            let got = g.get(p.as_tensor()).unwrap();
            let mut want = values(&w.narrow(0, 2 * i, 2).unwrap().flatten_all().unwrap());
            if second_use && i == 1 {
                want.iter_mut().zip(values(&v.flatten_all().unwrap())).for_each(|(a, b)| *a += b);
            } else {
                assert_eq!(buffer_len(got), 6 * 5, "part {i}: the slice was copied (second use: {second_use})");
                assert_eq!(got.layout().start_offset(), 10 * i, "part {i}");
            }
            assert_eq!(values(&got.flatten_all().unwrap()), want, "part {i} (second use: {second_use})");
        }
    }
}

#[test]
fn a_packed_gradient_is_stored_without_a_copy_and_sums_stay_exact() {
    // GroupNorm's backward returns its input gradient as the head of one buffer [dx | dw | db]:
    // a short tail, so the gradient is stored as it is (no copy). A second use of the input
    // then adds to it, in either order of the two terms. 131,072 values: above the in-place
    // sum's serial threshold.
    let dev = Device::Cpu;
    let shape = (2, 4, 128, 128);
    let vm = candle_nn::VarMap::new();
    let gn = unet::norm::GroupNorm::new(candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev), 2, 4, 1e-5).unwrap();
    let n = 2 * 4 * 128 * 128;
    let x = Var::from_tensor(&ramp_n(n, 0.37, 0.2).reshape(shape).unwrap()).unwrap();
    let (w, v) = (ramp_n(n, 0.011, 0.4).reshape(shape).unwrap(), ramp_n(n, 0.017, 1.1).reshape(shape).unwrap());
    let gn_term = || gn.forward(x.as_tensor()).unwrap().mul(&w).unwrap().sum_all().unwrap();
    let g = gn_term().backward().unwrap();
    let alone = g.get(x.as_tensor()).unwrap();
    assert!(buffer_len(alone) > n, "GroupNorm's input gradient was copied (or is no longer packed)");
    let alone = values(&alone.flatten_all().unwrap());
    let vv = values(&v.flatten_all().unwrap());
    for gn_first in [true, false] {
        let other = x.mul(&v).unwrap().sum_all().unwrap();
        let f = if gn_first { (gn_term() + other).unwrap() } else { (other + gn_term()).unwrap() };
        let g = f.backward().unwrap();
        let got = values(&g.get(x.as_tensor()).unwrap().flatten_all().unwrap());
        for i in 0..n {
            assert_eq!(got[i], alone[i] + vv[i], "at {i} (GroupNorm term first: {gn_first})");
        }
    }
}

#[test]
fn gradients_of_an_empty_tensor_used_twice_are_summed_without_a_panic() {
    // A skip connection on an empty batch: one use of `a` gets a compact gradient, the other a
    // narrow of cat's gradient, which counts as contiguous (the empty batch dimension is not
    // checked) and starts past the end of its empty buffer. Upstream candle returns an empty
    // gradient, and so must the patch. Both orders of the two uses, so that the view comes second.
    for shape in [(0usize, 4usize, 8usize, 8usize), (0, 1, 2, 2)] {
        for view_second in [false, true] {
            let a = Var::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
            let other = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
            let joined = Tensor::cat(&[&other, a.as_tensor()], 1).unwrap().sum_all().unwrap();
            let scaled = a.as_tensor().affine(2.0, 0.0).unwrap().sum_all().unwrap();
            let y = if view_second { (scaled + joined).unwrap() } else { (joined + scaled).unwrap() };
            let grads = y.backward().unwrap();
            let g = grads.get(a.as_tensor()).expect("a gradient for the variable");
            assert_eq!(g.dims(), [shape.0, shape.1, shape.2, shape.3]);
        }
    }
}

#[test]
fn a_broadcast_input_gets_the_sum_of_its_gradient_over_the_broadcast_dims() {
    // The patched `Broadcast` arm stores the reduction as the input's gradient (upstream added it
    // to zeros). Left dims added, size-1 dims widened, both, none; the input also used directly,
    // before and after the broadcast use, so the stored sum is then added to.
    let cases: [(&[usize], &[usize]); 5] = [(&[3], &[2, 3]), (&[2, 3, 1, 1], &[2, 3, 4, 5]), (&[3, 1], &[2, 4, 3, 5]), (&[1, 3, 1], &[2, 1, 3, 4]), (&[2, 3], &[2, 3])];
    for (arg_dims, out_dims) in cases {
        let n: usize = arg_dims.iter().product();
        let m: usize = out_dims.iter().product();
        let a = Var::from_tensor(&ramp_n(n, 0.7, 0.1).reshape(arg_dims).unwrap()).unwrap();
        let w = ramp_n(m, 0.013, 0.5).reshape(out_dims).unwrap();
        let v = ramp_n(n, 0.29, 1.3).reshape(arg_dims).unwrap();
        // d/da sum(broadcast(a) * w) by hand: each output element's weight goes to the input
        // element it was broadcast from.
        let wv = values(&w.flatten_all().unwrap());
        let mut want = vec![0f64; n];
        let left = out_dims.len() - arg_dims.len();
        for (flat, wi) in wv.iter().enumerate() {
            let (mut rem, mut src, mut stride) = (flat, 0, 1);
            for (d, &size) in out_dims.iter().enumerate().rev() {
                let i = rem % size;
                rem /= size;
                if d >= left && arg_dims[d - left] != 1 {
                    src += i * stride;
                }
                if d >= left {
                    stride *= arg_dims[d - left];
                }
            }
            want[src] += *wi as f64;
        }
        let vv = values(&v.flatten_all().unwrap());
        for direct in [None, Some(true), Some(false)] {
            let bterm = || a.broadcast_as(out_dims).unwrap().mul(&w).unwrap().sum_all().unwrap();
            let f = match direct {
                None => bterm(),
                Some(first) => {
                    let d = a.mul(&v).unwrap().sum_all().unwrap();
                    if first { (d + bterm()).unwrap() } else { (bterm() + d).unwrap() }
                }
            };
            let g = f.backward().unwrap();
            let got = g.get(a.as_tensor()).unwrap();
            assert_eq!(got.dims(), arg_dims, "{arg_dims:?} -> {out_dims:?}");
            let got = values(&got.flatten_all().unwrap());
            for i in 0..n {
                let want = want[i] + if direct.is_some() { vv[i] as f64 } else { 0.0 };
                assert!((got[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{arg_dims:?} -> {out_dims:?} at {i}: {} against {want} (direct use: {direct:?})", got[i]);
            }
        }
    }
}

#[test]
fn clamp_and_maximum_gradients_go_to_the_tracked_sides_only() {
    // The patched `Maximum`/`Minimum` arm skips the constant side (a clamp's bound); the tracked
    // ones keep upstream's gradient, ties split in half.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[-4f32, -3.0, -1.0, 0.0, 2.5, 3.0, 7.0], &dev).unwrap()).unwrap();
    let w = Tensor::new(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &dev).unwrap();
    let g = x.clamp(-3f32, 3f32).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    // Inside the bounds the slope is 1; at a bound the tie gives half; outside, 0.
    assert_eq!(values(g.get(x.as_tensor()).unwrap()), [0.0, 1.0, 3.0, 4.0, 5.0, 3.0, 0.0]);
    let y = Var::from_tensor(&Tensor::new(&[-5f32, -3.0, 0.0, 1.0, 2.5, 4.0, 7.0], &dev).unwrap()).unwrap();
    let g = x.maximum(y.as_tensor()).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(g.get(x.as_tensor()).unwrap()), [1.0, 1.0, 0.0, 0.0, 2.5, 0.0, 3.5]);
    assert_eq!(values(g.get(y.as_tensor()).unwrap()), [0.0, 1.0, 3.0, 4.0, 2.5, 6.0, 3.5]);
}

#[test]
fn narrows_of_one_tensor_add_their_gradients_into_its_slices() {
    // The patched `Narrow` arm: a first gradient is copied into a cleared buffer, later ones
    // added into their slice in place. Disjoint and overlapping slices, along dims 0 and 1, the
    // whole range (upstream's path), and a direct use of the tensor before or after the narrows;
    // checked against sums made by hand.
    let (rows, cols) = (6, 10);
    let a = Var::from_tensor(&ramp_n(rows * cols, 0.37, 0.2).reshape((rows, cols)).unwrap()).unwrap();
    let slices: [(usize, usize, usize); 6] = [(1, 0, 4), (1, 4, 3), (1, 2, 5), (0, 1, 2), (1, 0, 10), (0, 5, 1)];
    let ws: Vec<Tensor> = slices
        .iter()
        .enumerate()
        .map(|(i, &(dim, _, len))| {
            let shape = if dim == 0 { (len, cols) } else { (rows, len) };
            ramp_n(shape.0 * shape.1, 0.11 + 0.07 * i as f32, 0.3 * i as f32).reshape(shape).unwrap()
        })
        .collect();
    let v = ramp_n(rows * cols, 0.23, 1.7).reshape((rows, cols)).unwrap();
    let mut want = vec![0f32; rows * cols];
    for (&(dim, start, _), w) in slices.iter().zip(&ws) {
        let wv = w.to_vec2::<f32>().unwrap();
        for (i, row) in wv.iter().enumerate() {
            for (j, x) in row.iter().enumerate() {
                let (r, c) = if dim == 0 { (start + i, j) } else { (i, start + j) };
                want[r * cols + c] += x;
            }
        }
    }
    let vv = values(&v.flatten_all().unwrap());
    for direct in [None, Some(true), Some(false)] {
        let narrows = || {
            let mut f: Option<Tensor> = None;
            for (&(dim, start, len), w) in slices.iter().zip(&ws) {
                let term = a.narrow(dim, start, len).unwrap().mul(w).unwrap().sum_all().unwrap();
                f = Some(match f {
                    None => term,
                    Some(f) => (f + term).unwrap(),
                });
            }
            f.unwrap()
        };
        let d = || a.mul(&v).unwrap().sum_all().unwrap();
        let f = match direct {
            None => narrows(),
            Some(true) => (d() + narrows()).unwrap(),
            Some(false) => (narrows() + d()).unwrap(),
        };
        let g = f.backward().unwrap();
        let got = values(&g.get(a.as_tensor()).unwrap().flatten_all().unwrap());
        for i in 0..rows * cols {
            let want = want[i] + if direct.is_some() { vv[i] } else { 0.0 };
            assert!((got[i] - want).abs() <= 1e-5 * (1.0 + want.abs()), "at {i}: {} against {want} (direct use: {direct:?})", got[i]);
        }
    }
}

#[test]
fn a_narrow_after_another_use_of_its_tensor_adds_into_its_slice() {
    // Disjoint slices of a gradient made only by narrows are copied in (the rest is still
    // zeros). Once another use has changed the sum (a subtraction's `or_insert` or an
    // addition's `accumulate`), a later slice must be added, not copied over it.
    let n = 9;
    let a = Var::from_tensor(&ramp_n(n, 0.3, 0.1)).unwrap();
    let x = ramp_n(n, 0.5, 0.9);
    let (w1, w2, v) = (ramp_n(3, 0.7, 0.4), ramp_n(3, 0.9, 0.2), ramp_n(n, 0.31, 1.3));
    let (w1v, w2v, vv) = (values(&w1), values(&w2), values(&v));
    for subtract in [true, false] {
        for order in 0..3 {
            let n1 = a.narrow(0, 0, 3).unwrap().mul(&w1).unwrap().sum_all().unwrap();
            let n2 = a.narrow(0, 3, 3).unwrap().mul(&w2).unwrap().sum_all().unwrap();
            let other = if subtract { x.sub(a.as_tensor()).unwrap() } else { x.add(a.as_tensor()).unwrap() };
            let other = other.mul(&v).unwrap().sum_all().unwrap();
            let f = match order {
                0 => ((n1 + other).unwrap() + n2).unwrap(),
                1 => ((other + n1).unwrap() + n2).unwrap(),
                _ => ((n1 + n2).unwrap() + other).unwrap(),
            };
            let got = values(f.backward().unwrap().get(a.as_tensor()).unwrap());
            for i in 0..n {
                let slices = if i < 3 { w1v[i] } else if i < 6 { w2v[i - 3] } else { 0.0 };
                let want = slices + if subtract { -vv[i] } else { vv[i] };
                assert!((got[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "at {i}: {} against {want} (subtract: {subtract}, order {order})", got[i]);
            }
        }
    }
}

#[test]
fn a_narrow_gradient_never_writes_into_a_gradient_another_entry_holds() {
    // An addition hands both inputs the same gradient tensor. When `b = a + c` and both `a` and
    // `b` are narrowed, `a`'s stored sum can be the very tensor `c` also holds: the slice must
    // not be written into it in place.
    let n = 8;
    let a = Var::from_tensor(&ramp_n(n, 0.3, 0.1)).unwrap();
    let c = Var::from_tensor(&ramp_n(n, 0.5, 0.9)).unwrap();
    let w = ramp_n(n, 0.7, 0.4);
    let u = ramp_n(3, 0.9, 0.2);
    let (wv, uv) = (values(&w), values(&u));
    // Either order of the terms: the backward pass reaches the addition or the narrow first.
    for sum_first in [true, false] {
        let b = (a.as_tensor() + c.as_tensor()).unwrap();
        let (bt, nt) = (b.mul(&w).unwrap().sum_all().unwrap(), a.narrow(0, 2, 3).unwrap().mul(&u).unwrap().sum_all().unwrap());
        let f = if sum_first { (bt + nt).unwrap() } else { (nt + bt).unwrap() };
        let g = f.backward().unwrap();
        assert_eq!(values(g.get(c.as_tensor()).unwrap()), wv, "c's gradient was written through (sum first: {sum_first})");
        let ga = values(g.get(a.as_tensor()).unwrap());
        for i in 0..n {
            let want = wv[i] + if (2..5).contains(&i) { uv[i - 2] } else { 0.0 };
            assert_eq!(ga[i], want, "a's gradient at {i} (sum first: {sum_first})");
        }
    }
}

/// The address of `t`'s buffer: equal for tensors that share it.
fn buffer_id(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const candle_core::Storage as usize
}

/// The distinct buffers a graph holds until its backward pass: every node's.
fn buffers_held(root: &Tensor) -> usize {
    root.sorted_nodes().into_iter().map(buffer_id).collect::<std::collections::HashSet<_>>().len()
}

/// A same-shape f32 addition on the CPU, for `Tensor::add_in_own_buffer`.
struct AddSame;

impl candle_core::InplaceOp2 for AddSame {
    fn name(&self) -> &'static str {
        "test-add"
    }
    fn cpu_fwd(&self, s1: &mut candle_core::CpuStorage, l1: &candle_core::Layout, s2: &candle_core::CpuStorage, l2: &candle_core::Layout) -> candle_core::Result<()> {
        match (s1, s2) {
            (candle_core::CpuStorage::F32(y), candle_core::CpuStorage::F32(a)) => {
                let (o1, o2, n) = (l1.start_offset(), l2.start_offset(), l1.shape().elem_count());
                for (y, a) in y[o1..o1 + n].iter_mut().zip(&a[o2..o2 + n]) {
                    *y += *a;
                }
                Ok(())
            }
            _ => candle_core::bail!("f32 only"),
        }
    }
}

#[test]
fn a_sum_into_its_own_buffer_keeps_one_buffer_and_the_same_values_and_gradients() {
    let x = Var::from_tensor(&ramp_n(SMALL, 0.01, 0.3)).unwrap();
    let r = Var::from_tensor(&ramp_n(SMALL, 0.02, 0.7)).unwrap();
    let w = ramp_n(SMALL, 0.05, 1.1);
    // An affine map's backward pass reads neither its output nor its input's values.
    let plain = x.affine(2.0, 1.0).unwrap().add(r.as_tensor()).unwrap();
    let y = x.affine(2.0, 1.0).unwrap();
    let y_buffer = buffer_id(&y);
    let sum = y.add_in_own_buffer(r.as_tensor(), &AddSame).unwrap().expect("a fresh output's own buffer");
    assert_eq!(buffer_id(&sum), y_buffer, "the sum is written into the affine map's buffer");
    assert_eq!(values(&sum), values(&plain));
    // x, r, w, the sum and the losses' buffers; `add` also holds the affine map's output.
    let (f, f_plain) = (sum.mul(&w).unwrap().sum_all().unwrap(), plain.mul(&w).unwrap().sum_all().unwrap());
    assert_eq!(buffers_held(&f) + 1, buffers_held(&f_plain), "one buffer fewer held for the backward pass");
    let (g, gp) = (f.backward().unwrap(), f_plain.backward().unwrap());
    for v in [&x, &r] {
        assert_eq!(values(g.get(v.as_tensor()).unwrap()), values(gp.get(v.as_tensor()).unwrap()));
    }
}

#[test]
fn a_sum_into_a_buffer_someone_else_holds_is_refused_and_changes_nothing() {
    let x = Var::from_tensor(&ramp_n(SMALL, 0.01, 0.3)).unwrap();
    let r = ramp_n(SMALL, 0.02, 0.7);
    let y = x.affine(2.0, 1.0).unwrap();
    let seen = y.clone();
    let before = values(&seen);
    let back = y.add_in_own_buffer(&r, &AddSame).unwrap().expect_err("another handle reads the buffer");
    assert_eq!(values(&back), before);
    assert_eq!(values(&seen), before);
    // A variable's buffer, another dtype, a view: refused too.
    assert!(x.as_tensor().clone().add_in_own_buffer(&r, &AddSame).unwrap().is_err(), "a variable");
    assert!(x.affine(2.0, 1.0).unwrap().add_in_own_buffer(&r.to_dtype(candle_core::DType::F64).unwrap(), &AddSame).unwrap().is_err(), "another dtype");
    let m = ramp_n(2 * SMALL, 0.01, 0.0).reshape((SMALL, 2)).unwrap();
    let r2 = ramp_n(2 * SMALL, 0.03, 0.2).reshape((2, SMALL)).unwrap();
    assert!(m.t().unwrap().contiguous().unwrap().add_in_own_buffer(&r2, &AddSame).unwrap().is_ok(), "a compact copy");
    // Its own buffer's only handle, but strided.
    let strided = ramp_n(2 * SMALL, 0.01, 0.0).reshape((SMALL, 2)).unwrap().t().unwrap();
    assert!(strided.add_in_own_buffer(&r2, &AddSame).unwrap().is_err(), "a strided view");
    // A shape that does not broadcast is an error, with the buffer untouched.
    let z = x.affine(2.0, 1.0).unwrap();
    assert!(z.add_in_own_buffer(&ramp_n(3, 0.1, 0.0), &AddSame).is_err());
}

#[test]
fn a_convolution_plus_an_addend_is_the_sum_add_gives_with_its_gradients() {
    use candle_core::{DType, Module};
    let dev = Device::Cpu;
    let (b, c, o, h, w) = (3, 4, 6, 5, 7);
    let vals = |n: usize, s: f32, off: f32| (0..n).map(|i| ((i as f32) * s + off).sin()).collect::<Vec<f32>>();
    let wv = Var::from_tensor(&Tensor::from_vec(vals(o * c * 9, 0.37, 0.1), (o, c, 3, 3), &dev).unwrap()).unwrap();
    let bv = Var::from_tensor(&Tensor::from_vec(vals(o, 0.7, 0.2), o, &dev).unwrap()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors([("weight".to_string(), wv.as_tensor().clone()), ("bias".to_string(), bv.as_tensor().clone())].into(), DType::F32, &dev);
    let conv = unet::conv::Conv2d::new(vb, c, o, 3, 1, 1).unwrap();
    let x = Var::from_tensor(&Tensor::from_vec(vals(b * c * h * w, 0.11, 0.3), (b, c, h, w), &dev).unwrap()).unwrap();
    let dy = Tensor::from_vec(vals(b * o * h * w, 0.23, 0.9), (b, o, h, w), &dev).unwrap();
    // A residual; one value per image and channel, as a narrow of a wider product (rows 2*o
    // apart, as the stacked time-embedding projections give); one value per channel.
    let skip = Var::from_tensor(&Tensor::from_vec(vals(b * o * h * w, 0.05, 1.3), (b, o, h, w), &dev).unwrap()).unwrap();
    let wide = Var::from_tensor(&Tensor::from_vec(vals(b * 2 * o, 0.3, 0.4), (b, 2 * o), &dev).unwrap()).unwrap();
    let row = Var::from_tensor(&Tensor::from_vec(vals(o, 0.9, 0.6), (1, o), &dev).unwrap()).unwrap();
    let per_image = wide.narrow(1, o, o).unwrap().unsqueeze(2).unwrap().unsqueeze(3).unwrap();
    let per_channel = row.unsqueeze(2).unwrap().unsqueeze(3).unwrap();
    for (name, addend, leaf) in [("residual", skip.as_tensor().clone(), &skip), ("per image", per_image, &wide), ("per channel", per_channel, &row)] {
        let got = conv.forward_plus(x.as_tensor(), &addend).unwrap();
        let want = conv.forward(x.as_tensor()).unwrap().broadcast_add(&addend).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&got), flat(&want), "{name}: the same additions");
        let (fg, fw) = (got.mul(&dy).unwrap().sum_all().unwrap(), want.mul(&dy).unwrap().sum_all().unwrap());
        assert_eq!(buffers_held(&fg) + 1, buffers_held(&fw), "{name}: the convolution's output is not held besides the sum");
        let (g, gw) = (fg.backward().unwrap(), fw.backward().unwrap());
        for (what, v) in [("x", &x), ("weight", &wv), ("bias", &bv), ("addend", leaf)] {
            assert_eq!(flat(g.get(v.as_tensor()).unwrap()), flat(gw.get(v.as_tensor()).unwrap()), "{name}: {what}'s gradient");
        }
    }
}

// The backward pass's release of saved values (stop 34, `SavedRelease` in backprop.rs). Each
// test sets the thread's switch, so that `UNET_RELEASE_SAVED` in the environment changes nothing.

use candle_core::backprop::set_release_saved_on_this_thread;
/// The graph's nodes of `N` elements, from the root down (`sorted_nodes`' order: a chain's
/// nodes last op first), variables excluded: the way to a node the caller holds no handle on.
fn chain_back(t: &Tensor) -> Vec<&Tensor> {
    t.sorted_nodes().into_iter().filter(|t| t.elem_count() == N && !t.is_variable()).collect()
}

/// The elements `t`'s buffer holds now: zero once the backward pass has released it.
fn held(t: &Tensor) -> usize {
    match &*t.storage_and_layout().0 {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len(),
        _ => panic!("f32 CPU tensors only"),
    }
}

/// `loss = sum(exp(sin(x)) * w)`: `exp` reads its own output, `sin` and `mul` their inputs.
fn chain(x: &Var, w: &Tensor) -> Tensor {
    x.sin().unwrap().exp().unwrap().mul(w).unwrap().sum_all().unwrap()
}

#[test]
fn saved_values_are_released_by_the_backward_pass_with_the_same_gradients() {
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let w = ramp(0.02, 0.7);
    set_release_saved_on_this_thread(Some(false));
    let kept = chain(&x, &w);
    let want = values(kept.backward().unwrap().get(x.as_tensor()).unwrap());
    set_release_saved_on_this_thread(Some(true));
    let loss = chain(&x, &w);
    let grads = loss.backward().unwrap();
    assert_eq!(values(grads.get(x.as_tensor()).unwrap()).iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    // The gradient is a plain tensor: the pass recorded no ops of its own.
    assert!(!grads.get(x.as_tensor()).unwrap().track_op());
    let nodes = chain_back(&loss);
    assert_eq!(nodes.len(), 3, "the product, the exponential and the sine");
    for t in nodes {
        assert_eq!(held(t), 0, "released");
    }
    assert_eq!(held(x.as_tensor()), N, "a variable keeps its values");
    assert_eq!(held(&w), N, "a constant the caller holds keeps its values");
    assert_eq!(loss.to_scalar::<f32>().unwrap(), kept.to_scalar::<f32>().unwrap(), "the root keeps its value");
    // Without the release, upstream's graph: every buffer kept, and the pass's ops recorded.
    assert!(chain_back(&kept).into_iter().all(|t| held(t) == N));
    set_release_saved_on_this_thread(None);
}

#[test]
fn values_someone_else_can_reach_are_kept() {
    set_release_saved_on_this_thread(Some(true));
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let w = ramp(0.02, 0.7);
    // A handle on a node, a view of a node off the graph, a detached copy of a node.
    let e1 = x.sin().unwrap().exp().unwrap();
    let e1_before = values(&e1);
    let loss1 = e1.mul(&w).unwrap().sum_all().unwrap();
    let e2 = x.cos().unwrap().exp().unwrap();
    let view = e2.reshape((N / 100, 100)).unwrap();
    let view_before = view.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let loss2 = e2.mul(&w).unwrap().sum_all().unwrap();
    drop(e2);
    let e3 = x.affine(3.0, 1.0).unwrap().exp().unwrap();
    let detached = e3.detach();
    let detached_before = values(&detached);
    let loss3 = e3.mul(&w).unwrap().sum_all().unwrap();
    drop(e3);
    for loss in [&loss1, &loss2, &loss3] {
        loss.backward().unwrap();
    }
    assert_eq!(values(&e1), e1_before, "a node the caller holds");
    assert_eq!(view.flatten_all().unwrap().to_vec1::<f32>().unwrap(), view_before, "a view off the graph");
    assert_eq!(values(&detached), detached_before, "a detached copy");
    // What only the graphs held went: the sine and the cosine behind the exponentials.
    for loss in [&loss1, &loss2] {
        let [prod, exp, trig] = chain_back(loss)[..] else { panic!("three nodes") };
        assert_eq!((held(prod), held(exp), held(trig)), (0, N, 0));
    }
    set_release_saved_on_this_thread(None);
}

#[test]
fn a_sum_in_its_own_buffer_is_released_after_both_of_its_nodes() {
    set_release_saved_on_this_thread(Some(true));
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let r = Var::from_tensor(&ramp(0.02, 0.7)).unwrap();
    let w = ramp(0.05, 1.1);
    let plain = x.affine(2.0, 1.0).unwrap().add(r.as_tensor()).unwrap().exp().unwrap().mul(&w).unwrap().sum_all().unwrap();
    let sum = x.affine(2.0, 1.0).unwrap().add_in_own_buffer(r.as_tensor(), &AddSame).unwrap().expect("its own buffer");
    let loss = sum.exp().unwrap().mul(&w).unwrap().sum_all().unwrap();
    drop(sum);
    let (g, gp) = (loss.backward().unwrap(), plain.backward().unwrap());
    for v in [&x, &r] {
        assert_eq!(values(g.get(v.as_tensor()).unwrap()), values(gp.get(v.as_tensor()).unwrap()));
    }
    let [_, _, sum, affine] = chain_back(&loss)[..] else { panic!("the product, the exponential, the sum and the affine map") };
    assert_eq!((held(sum), held(affine)), (0, 0), "one buffer, released once the affine map is done");
    set_release_saved_on_this_thread(None);
}

#[test]
fn a_view_s_buffer_is_released_only_after_its_source_has_read_it() {
    // `exp` reads its own output, through the buffer its reshape shares: the loop does the view
    // first, the exponential last. Released after the first sharer, the exponential's arm
    // would read an empty buffer.
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let w = ramp(0.02, 0.7).reshape((N / 100, 100)).unwrap();
    let f = |x: &Var| x.exp().unwrap().reshape((N / 100, 100)).unwrap().mul(&w).unwrap().sum_all().unwrap();
    set_release_saved_on_this_thread(Some(false));
    let want = values(f(&x).backward().unwrap().get(x.as_tensor()).unwrap());
    set_release_saved_on_this_thread(Some(true));
    let loss = f(&x);
    let got = values(loss.backward().unwrap().get(x.as_tensor()).unwrap());
    assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    let [prod, view, exp] = chain_back(&loss)[..] else { panic!("the product, the view and the exponential") };
    assert_eq!((held(prod), held(view), held(exp)), (0, 0, 0));
    set_release_saved_on_this_thread(None);
}

#[test]
fn a_failed_backward_pass_leaves_ops_recorded_again() {
    set_release_saved_on_this_thread(Some(true));
    let x = Var::from_tensor(&ramp(0.01, 0.3).reshape((1, 1, N / 400, 400)).unwrap()).unwrap();
    // candle has no backward pass for bilinear upsampling: an error midway through the pass.
    let loss = x.exp().unwrap().upsample_bilinear2d(N / 200, 800, false).unwrap().sum_all().unwrap();
    assert!(loss.backward().is_err());
    assert!(x.exp().unwrap().track_op(), "ops are recorded after the failed pass");
    set_release_saved_on_this_thread(None);
}

#[test]
fn a_second_backward_pass_through_a_released_graph_is_an_error() {
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let w = ramp(0.02, 0.7);
    set_release_saved_on_this_thread(Some(true));
    let loss = chain(&x, &w);
    loss.backward().unwrap();
    let err = loss.backward().expect_err("its saved values are gone").to_string();
    assert!(err.contains("released"), "{err}");
    // Two losses of one prediction: the second pass needs what the first released.
    let pred = x.sin().unwrap().exp().unwrap();
    let (l1, l2) = (pred.mul(&w).unwrap().sum_all().unwrap(), pred.sqr().unwrap().sum_all().unwrap());
    drop(pred);
    l1.backward().unwrap();
    assert!(l2.backward().is_err());
    // Kept, both work, as upstream.
    set_release_saved_on_this_thread(Some(false));
    let loss = chain(&x, &w);
    let (a, b) = (loss.backward().unwrap(), loss.backward().unwrap());
    assert_eq!(values(a.get(x.as_tensor()).unwrap()), values(b.get(x.as_tensor()).unwrap()));
    set_release_saved_on_this_thread(None);
}

#[test]
fn a_concatenation_s_input_released_in_the_forward_pass_gives_the_same_gradients() {
    set_release_saved_on_this_thread(Some(true));
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let r = Var::from_tensor(&ramp(0.02, 0.7)).unwrap();
    let w = ramp_n(2 * N, 0.03, 0.1);
    // h = 2x + 1 + r, in the affine map's own buffer; then cat([h, r]) * w.
    let f = |release: bool| {
        let h = x.affine(2.0, 1.0).unwrap().add_in_own_buffer(r.as_tensor(), &AddSame).unwrap().expect("its own buffer");
        let cat = Tensor::cat(&[&h, r.as_tensor()], 0).unwrap();
        if release {
            assert!(unsafe { h.release_unread(&cat) }, "only the concatenation holds it");
        }
        cat.exp().unwrap().mul(&w).unwrap().sum_all().unwrap()
    };
    let want = f(false).backward().unwrap();
    let loss = f(true);
    // The sum and the affine map share the released buffer; a backward pass is no second one.
    let [_, _, _, sum, affine] = loss.sorted_nodes().into_iter().filter(|t| !t.is_variable() && t.elem_count() >= N).collect::<Vec<_>>()[..] else {
        panic!("the product, the exponential, the concatenation, the sum and the affine map")
    };
    assert_eq!((held(sum), held(affine)), (0, 0));
    let got = loss.backward().unwrap();
    for v in [&x, &r] {
        assert_eq!(values(got.get(v.as_tensor()).unwrap()), values(want.get(v.as_tensor()).unwrap()));
    }
    set_release_saved_on_this_thread(None);
}

#[test]
fn a_buffer_someone_else_can_reach_is_not_released_in_the_forward_pass() {
    let x = Var::from_tensor(&ramp(0.01, 0.3)).unwrap();
    let want = values(&x.affine(2.0, 1.0).unwrap());
    // Another handle on the tensor.
    let h = x.affine(2.0, 1.0).unwrap();
    let cat = Tensor::cat(&[&h, x.as_tensor()], 0).unwrap();
    let other = h.clone();
    assert!(!unsafe { h.release_unread(&cat) });
    assert_eq!(values(&other), want);
    // A reader that does not hold it.
    let unrelated = x.sin().unwrap();
    assert!(!unsafe { other.clone().release_unread(&unrelated) });
    // A detached copy sharing the buffer: the handles on the tensor are right, the buffer's not.
    let detached = other.detach();
    assert!(!unsafe { other.release_unread(&cat) }, "a detached copy shares its buffer");
    assert_eq!(values(&detached), want);
    // An in-place sum whose left operand someone else holds too.
    let r = ramp(0.02, 0.7);
    let sum = x.affine(2.0, 1.0).unwrap().add_in_own_buffer(&r, &AddSame).unwrap().expect("its own buffer");
    let operand = sum.sorted_nodes().into_iter().find(|t| t.id() != sum.id() && !t.is_variable()).expect("the affine map").clone();
    let cat2 = Tensor::cat(&[&sum, x.as_tensor()], 0).unwrap();
    assert!(!unsafe { sum.release_unread(&cat2) }, "the operand has another handle");
    assert_eq!(held(&operand), N);
    // A variable; and with no graph recorded, nothing to do: dropping frees it.
    assert!(!unsafe { x.as_tensor().clone().release_unread(&cat) });
    let plain = ramp(0.05, 0.0);
    let copy = Tensor::cat(&[&plain, &plain], 0).unwrap();
    assert!(!unsafe { plain.release_unread(&copy) });
}
