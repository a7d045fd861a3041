//! Per-shape times of the CPU 3x3 convolution (forward, and both gradients through candle's
//! backward pass) at the shapes of the bench's reduced model (32x32, ch 32, mult [1, 2, 2],
//! batch 32) and of the reference model's levels at batch 8:
//! `RAYON_NUM_THREADS=2 cargo run --release -p unet --example conv_shapes [reduced|reference]`.
//! `scripts/conv_shapes.py` times PyTorch's `conv2d` on the same shapes.

use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "reduced".into());
    // (batch, in channels, side, out channels)
    let shapes: &[(usize, usize, usize, usize)] = match which.as_str() {
        "reference" => &[(8, 64, 64, 64), (8, 128, 64, 64), (8, 128, 32, 128), (8, 256, 16, 256), (8, 256, 8, 256), (8, 512, 8, 256)],
        _ => &[(32, 3, 32, 32), (32, 32, 32, 32), (32, 64, 32, 32), (32, 96, 32, 32), (32, 32, 16, 64), (32, 64, 16, 64), (32, 128, 16, 64), (32, 64, 8, 64), (32, 128, 8, 64)],
    };
    let dev = Device::Cpu;
    // `SIDE=8` keeps only the 8x8 shapes (for a profiler); `REPS` sets the timed runs.
    let side: Option<usize> = std::env::var("SIDE").ok().and_then(|s| s.parse().ok());
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    println!("{:>24} {:>10} {:>10}", "b x c x h x h -> o", "fwd ms", "bwd ms");
    for &(b, c, h, o) in shapes.iter().filter(|s| side.is_none_or(|side| s.2 == side)) {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, h), &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, c, 3, 3), &dev)? * (1.0 / (9.0 * c as f64).sqrt()))?)?;
        let r = Tensor::randn(0f32, 1.0, (b, o, h, h), &dev)?;
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for i in 0..reps + 2 {
            let t = Instant::now();
            let y = unet::conv::conv2d(x.as_tensor(), w.as_tensor(), 1, 1)?;
            let t1 = t.elapsed().as_secs_f64();
            let loss = (y * &r)?.sum_all()?;
            let t = Instant::now();
            let g = loss.backward()?;
            let t2 = t.elapsed().as_secs_f64();
            assert!(g.get(&x).is_some() && g.get(&w).is_some());
            if i >= 2 {
                fwd.push(t1 * 1e3);
                bwd.push(t2 * 1e3);
            }
        }
        println!("{:>24} {:10.2} {:10.2}", format!("{b}x{c}x{h}x{h} -> {o}"), median(fwd), median(bwd));
    }
    Ok(())
}
