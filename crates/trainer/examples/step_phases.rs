//! Where a training step's time goes: `cargo run --release -p trainer --example step_phases -- [preset|reduced] [batch] [size]`.
use std::time::Instant;

use candle_core::{Device, Var};
use diffusion::{NoiseRng, Schedule};
use unet::Mode;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("reference");
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(8);
    // "reduced" is `xtask bench`'s small model (the PyTorch benchmark's REDUCED config).
    let mut cfg = match preset {
        "reduced" => unet::UNetConfig { image_size: 32, ch: 32, ch_mult: vec![1, 2, 2], attn: vec![1], num_res_blocks: 1, ..unet::UNetConfig::reference() },
        _ => unet::UNetConfig::preset(preset).ok_or_else(|| anyhow::anyhow!("no preset {preset}"))?,
    };
    if let Some(s) = args.get(3) {
        cfg.image_size = s.parse()?;
    }
    let dev = Device::Cpu;
    let (model, varmap) = unet::new_trainable(&cfg, &dev, 0)?;
    let vars: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut opt = trainer::Adam::new(vars, trainer::AdamParams::default())?;
    let schedule = Schedule::reference();
    let mut rng = NoiseRng::new(0);
    let s = cfg.image_size;
    let x0 = rng.randn((batch, 3, s, s), &dev)?.tanh()?;
    for i in 0..4 {
        let t0 = Instant::now();
        let (ts, _) = rng.timesteps(batch, 1000, &dev)?;
        let noise = rng.randn((batch, 3, s, s), &dev)?;
        let seed = rng.next_u64();
        let pred = |x: &candle_core::Tensor, t: &candle_core::Tensor| model.forward_t(x, t, Mode::Train { seed });
        let loss = schedule.loss(&pred, &x0, &ts, &noise)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let g = opt.gradients(&grads)?;
        drop(grads);
        opt.step_with(&g, 1e-4)?;
        let t3 = Instant::now();
        if i > 0 {
            println!(
                "forward {:.3} s, backward {:.3} s, adam {:.3} s, total {:.3} s",
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
                (t3 - t0).as_secs_f64()
            );
        }
    }
    Ok(())
}
