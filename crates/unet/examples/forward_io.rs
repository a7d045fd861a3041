//! Writes a model file's noise prediction on a fixed input, for checking the same file in
//! another implementation (`scripts/check_weights_in_pytorch.py` loads it into the PyTorch
//! reference and compares).
//!
//! `cargo run --release -p unet --example forward_io -- MODEL.safetensors OUT.safetensors [--ema]`
//! writes `x` `[2, C, S, S]`, `t` (i64 `[2]`) and `eps` (the network's output, eval mode).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use unet::{Mode, ModelWeights};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: forward_io MODEL.safetensors OUT.safetensors [--ema]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, out, ema) = match args.as_slice() {
        [m, o] => (Path::new(m), Path::new(o), false),
        [m, o, e] if e == "--ema" => (Path::new(m), Path::new(o), true),
        _ => return Err(USAGE.into()),
    };
    let dev = Device::Cpu;
    let weights = ModelWeights::load(model)?;
    if ema && !weights.tensors.keys().any(|k| k.starts_with(unet::weights::EMA_PREFIX)) {
        return Err(format!("{} has no EMA weights (trained without train.ema_decay): drop --ema", model.display()).into());
    }
    let net = weights.build(&dev, ema)?;
    let c = &weights.config;
    let n = 2 * c.image_channels * c.image_size * c.image_size;
    // Smooth and in [-1, 1], with no random generator to agree on.
    let x = Tensor::arange(0u32, n as u32, &dev)?.to_dtype(DType::F32)?.affine(0.37, 0.0)?.sin()?.reshape((2, c.image_channels, c.image_size, c.image_size))?;
    let t = Tensor::new(&[10i64, (c.num_steps as i64 * 7) / 10], &dev)?;
    let eps = net.forward_t(&x, &t, Mode::Eval)?;
    let tensors: HashMap<String, Tensor> = [("x".to_string(), x), ("t".to_string(), t), ("eps".to_string(), eps)].into();
    candle_core::safetensors::save(&tensors, out).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("wrote {} ({} weights)", out.display(), if ema { "EMA" } else { "plain" });
    Ok(())
}
