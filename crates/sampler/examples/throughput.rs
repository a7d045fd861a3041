//! Sampling throughput of a randomly initialised model (the speed does not depend on the
//! weights): `sampler::sample_grid`, the `Sampler` path that the bench command times too (it
//! calls `Sampler::sample_from_step`, to time DDPM from a given step).
//!
//! `cargo run --release -p sampler --example throughput -- [--preset reference] [--n 4]
//!  [--ddim-steps 50] [--ddpm-steps K] [--batch B] [--device cpu|cuda]`
//!
//! Prints images/s for DDIM with `--ddim-steps` steps and, from the measured time per network
//! evaluation, the implied images/s of 1000-step DDPM. `--ddpm-steps K` also times K real DDPM
//! steps (a schedule of T = K steps: same cost per step as the 1000-step one).

use std::time::Instant;

use candle_core::Device;
use diffusion::{FinalStepNoise, SamplerKind, Schedule, ScheduleConfig, Variance};
use sampler::Progress;
use unet::UNetConfig;

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset: String = arg(&args, "--preset").unwrap_or_else(|| "reference".into());
    let n: usize = arg(&args, "--n").unwrap_or(4);
    let ddim_steps: usize = arg(&args, "--ddim-steps").unwrap_or(50);
    let ddpm_steps: Option<usize> = arg(&args, "--ddpm-steps");
    let dev_name: String = arg(&args, "--device").unwrap_or_else(|| "cpu".into());
    let device = if dev_name == "cpu" { Device::Cpu } else { Device::new_cuda(0)? };
    let batch: usize = arg(&args, "--batch").unwrap_or(n);
    let cfg = UNetConfig::preset(&preset).ok_or("unknown preset")?;
    let (model, _vm) = unet::new_trainable(&cfg, &device, 0)?;
    let schedule = Schedule::reference();
    println!("preset {preset} ({0}x{0}), {n} images, batch {batch}, device {dev_name}", cfg.image_size);

    // Warm-up: one evaluation.
    sampler::sample_grid(&model, &schedule, n.min(batch), &SamplerKind::Ddim { steps: 1, eta: 0.0 }, 0, batch, &Progress::hidden())?;

    let kind = SamplerKind::Ddim { steps: ddim_steps, eta: 0.0 };
    let t0 = Instant::now();
    sampler::sample_grid(&model, &schedule, n, &kind, 0, batch, &Progress::hidden())?;
    let dt = t0.elapsed().as_secs_f64();
    let evals = n.div_ceil(batch) * ddim_steps;
    let per_eval = dt / evals as f64;
    println!("DDIM {ddim_steps} steps: {dt:.2} s, {:.4} images/s ({:.1} ms per evaluation of {batch})", n as f64 / dt, per_eval * 1e3);
    println!("DDPM 1000 steps (implied by the time per evaluation): {:.5} images/s", n as f64 / (per_eval * 1000.0 * n.div_ceil(batch) as f64));
    if let Some(k) = ddpm_steps {
        let short = Schedule::new(&ScheduleConfig { num_steps: k, ..Default::default() })?;
        let kind = SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper };
        let t0 = Instant::now();
        sampler::sample_grid(&model, &short, n, &kind, 0, batch, &Progress::hidden())?;
        let dt = t0.elapsed().as_secs_f64();
        println!("DDPM {k} steps measured: {dt:.2} s -> 1000 steps {:.5} images/s", n as f64 / (dt * 1000.0 / k as f64));
    }
    Ok(())
}
