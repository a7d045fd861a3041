//! Renders a sample grid from a model file with the preview sampler:
//! `cargo run -p trainer --example preview -- runs/demo/run/model.safetensors out.png [count] [steps] [clip]`.

use candle_core::Device;
use diffusion::NoiseRng;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let w = unet::ModelWeights::load(std::path::Path::new(&a[1]))?;
    let count: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let steps: usize = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let clip = a.get(5).map(|s| s == "true").unwrap_or(true);
    let model = w.build(&Device::Cpu, w.has_ema())?;
    let schedule = diffusion::Schedule::reference();
    let s = w.config.image_size;
    let noise = NoiseRng::new(0).randn((count, 3, s, s), &Device::Cpu)?;
    let x0 = if clip {
        trainer::preview::ddim_clipped(&model, &schedule, &noise, steps, 16)?
    } else {
        let kind = diffusion::SamplerKind::Ddim { steps, eta: 0.0 };
        sampler::generate(&model, &schedule, &noise, &kind, &mut NoiseRng::new(0), 16, |_, _| {})?
    };
    let imgs = sampler::tensor_to_images(&x0)?;
    let grid = sampler::make_grid(&imgs, (count as f64).sqrt().ceil() as usize, 2);
    grid.save(&a[2])?;
    Ok(())
}
