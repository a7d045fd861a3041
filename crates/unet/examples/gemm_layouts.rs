//! GEMM throughput of the operand layouts the CPU convolutions use, single-threaded:
//! `cargo run --release -p unet --example gemm_layouts` (`T=2` for two threads).
//!
//! It is the measurement behind two choices in `conv` and `winograd`: the weight gradient is
//! computed as dW^T = cols dY^T (the column matrix packed as a row-major lhs is 1.5-3.8x slower
//! at the 64x64 levels), and Winograd's strided slots cost nothing against contiguous ones.

use std::time::Instant;

/// `dst[m, n] = lhs[m, k] rhs[k, n]` with each operand's (column, row) strides.
#[allow(clippy::too_many_arguments)]
fn bench(label: &str, m: usize, n: usize, k: usize, dst: (isize, isize), lhs: (isize, isize), rhs: (isize, isize), threads: usize) {
    let span = |(cs, rs): (isize, isize), rows: usize, cols: usize| (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1;
    let a: Vec<f32> = (0..span(lhs, m, k)).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..span(rhs, k, n)).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; span(dst, m, n)];
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let mut run = || unsafe {
        // SAFETY: the buffers span every element the strides address.
        gemm::gemm(m, n, k, c.as_mut_ptr(), dst.0, dst.1, false, a.as_ptr(), lhs.0, lhs.1, b.as_ptr(), rhs.0, rhs.1, 1.0, 1.0, false, false, false, par)
    };
    for _ in 0..2 {
        run();
    }
    let reps = 6;
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    println!("{label:48} m{m:5} n{n:5} k{k:5}: {:6.1} GFLOP/s", 2.0 * (m * n * k) as f64 / dt / 1e9);
}

fn main() {
    let t: usize = std::env::var("T").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    for &(o, ckk, hw) in &[(128usize, 1152usize, 4096usize), (256, 2304, 256), (64, 576, 4096)] {
        let (o_, c_, h_) = (o as isize, ckk as isize, hw as isize);
        bench("im2col forward: out = W cols", o, hw, ckk, (1, h_), (1, c_), (1, h_), t);
        bench("im2col input grad: dcols = W^T dY", ckk, hw, o, (1, h_), (c_, 1), (1, h_), t);
        bench("weight grad as dW = dY cols^T (old)", o, ckk, hw, (1, c_), (1, h_), (h_, 1), t);
        bench("weight grad as dW^T = cols dY^T (used)", ckk, o, hw, (1, o_), (1, h_), (h_, 1), t);
    }
    for &(o, c, n) in &[(128usize, 128usize, 1024usize), (256, 256, 256), (512, 512, 128)] {
        let (c_, n_) = (c as isize, n as isize);
        bench("winograd slot, contiguous", o, n, c, (1, n_), (1, c_), (1, n_), t);
        bench("winograd slot, row stride 16 n (used)", o, n, c, (1, 16 * n_), (1, c_), (1, 16 * n_), t);
    }
}
