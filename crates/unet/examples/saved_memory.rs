//! How much memory a training step's graph holds: the bytes alive once the loss is computed
//! (the activations the backward pass will read), and the peak during the backward pass, for
//! the reference network on the CPU. The graph is the same on every device, so this is what a
//! GPU step holds too, less what cuDNN or our pool add there.
//!
//! `cargo run --release -p unet --example saved_memory -- [batch ...]` (default: 2 4). The
//! difference between two batch sizes, per image, is what each image costs; PyTorch's figure
//! comes from `scripts/saved_memory_torch.py`.

use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use unet::{Mode, UNet, UNetConfig};

#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

fn mb(b: usize) -> f64 {
    b as f64 / 1e6
}

fn main() -> candle_core::Result<()> {
    let batches: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a batch size")).collect();
    let batches = if batches.is_empty() { vec![2, 4] } else { batches };
    let cfg = UNetConfig::reference();
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = UNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg)?;
    let s = cfg.image_size;
    let mut rows = Vec::new();
    for &b in &batches {
        let x = Tensor::randn(0f32, 1., (b, cfg.image_channels, s, s), &dev)?;
        let noise = Tensor::randn(0f32, 1., (b, cfg.image_channels, s, s), &dev)?;
        let t = Tensor::new(&vec![500u32; b][..], &dev)?;
        // A warm-up step, so that caches (Winograd weights, scratch) are not counted as the graph.
        let loss = (model.forward_t(&x, &t, Mode::Train { seed: 1 })? - &noise)?.sqr()?.mean_all()?;
        drop(loss.backward()?);
        drop(loss);
        let before = LIVE.load(Ordering::Relaxed);
        let loss = (model.forward_t(&x, &t, Mode::Train { seed: 1 })? - &noise)?.sqr()?.mean_all()?;
        let held = LIVE.load(Ordering::Relaxed) - before;
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let grads = loss.backward()?;
        let peak = PEAK.load(Ordering::Relaxed) - before;
        drop(grads);
        drop(loss);
        println!("batch {b}: graph holds {:.1} MB after the loss; peak {:.1} MB in the backward pass", mb(held), mb(peak));
        rows.push((b, held, peak));
    }
    if let [(b0, h0, p0), .., (b1, h1, p1)] = rows[..] {
        let n = (b1 - b0) as f64;
        println!(
            "per image: {:.1} MB held, {:.1} MB at the backward peak",
            (h1 as f64 - h0 as f64) / n / 1e6,
            (p1 as f64 - p0 as f64) / n / 1e6
        );
    }
    Ok(())
}
