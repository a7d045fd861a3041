//! Writes a randomly initialised model file (for trying the CLI without a trained model).
//!
//! `cargo run --release -p sampler --example random_model -- OUT.safetensors [preset] [seed] [--ema]`
//! with preset one of reference (default), tiny, micro, cifar10.

use candle_core::Device;
use unet::{ModelWeights, UNetConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().ok_or("usage: random_model OUT.safetensors [preset] [seed] [--ema]")?;
    let preset = args.get(1).map(String::as_str).unwrap_or("reference");
    let seed: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let cfg = UNetConfig::preset(preset).ok_or_else(|| format!("unknown preset '{preset}'"))?;
    let (model, vm) = unet::new_trainable(&cfg, &Device::Cpu, seed)?;
    let mut tensors = unet::weights::state_dict(&model, &vm)?;
    if args.iter().any(|a| a == "--ema") {
        let ema: Vec<_> = tensors
            .iter()
            .filter(|(k, _)| k.as_str() != unet::TIME_TABLE_KEY)
            .map(|(k, v)| Ok((format!("ema.{k}"), v.copy()?)))
            .collect::<candle_core::Result<_>>()?;
        tensors.extend(ema);
    }
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("diffusion_config".to_string(), serde_json::to_string(&diffusion::ScheduleConfig::default())?);
    ModelWeights { config: cfg, tensors, metadata }.save(std::path::Path::new(out))?;
    println!("wrote {out} ({preset}, seed {seed})");
    Ok(())
}
