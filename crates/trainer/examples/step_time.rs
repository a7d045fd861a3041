//! Times training steps of a config on random data:
//! `cargo run --release -p trainer --example step_time -- [config] [batch] [steps]`.
//!
//! This is the recipe for a benchmark: build a `StepEngine`, make a batch, call `train_step`
//! (which waits for the device by reading the loss) in a timed loop after a warm-up step.

use std::time::Instant;

use candle_core::{Device, Tensor};
use diffusion::NoiseRng;
use trainer::{RunConfig, StepEngine};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = RunConfig::from_name_or_path(args.get(1).map(String::as_str).unwrap_or("tiny"))?;
    if let Some(b) = args.get(2) {
        cfg.train.batch_size = b.parse()?;
    }
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dev = Device::Cpu;
    let mut engine = StepEngine::new(&cfg, &dev)?;
    let mut rng = NoiseRng::new(0);
    let s = cfg.unet.image_size;
    let x0 = rng.randn((cfg.train.batch_size, 3, s, s), &dev)?.tanh()?;
    engine.train_step(&x0, &mut rng)?; // warm-up
    // Forward only, for reference.
    let t = Tensor::zeros(cfg.train.batch_size, candle_core::DType::U32, &dev)?;
    let t0 = Instant::now();
    let y = engine.model.forward_t(&x0, &t, unet::Mode::Train { seed: 1 })?;
    let _ = y.sum_all()?.to_scalar::<f32>()?;
    let fwd = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..steps {
        engine.train_step(&x0, &mut rng)?;
    }
    let per = t0.elapsed().as_secs_f64() / steps as f64;
    println!(
        "{}x{} ch {} batch {}: forward {:.3} s, train step {:.3} s, {:.1} images/s",
        s,
        s,
        cfg.unet.ch,
        cfg.train.batch_size,
        fwd,
        per,
        cfg.train.batch_size as f64 / per
    );
    Ok(())
}
