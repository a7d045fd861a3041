//! `cargo xtask self-test`: checks this build on a device against the PyTorch fixtures
//! (forward pass, time embedding, middle activations, both reverse steps, loss, gradients).
//! Meant for a GPU machine: the same numbers the CPU test suite checks, through the device path.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use diffusion::{FinalStepNoise, Schedule, Variance};
use unet::{Mode, UNet};

#[derive(clap::Args)]
pub struct SelfTestArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Folder with seed_tiny.ckpt and seed_tiny_io.safetensors.
    #[arg(long, default_value = "crates/unet/tests/fixtures")]
    fixtures: PathBuf,
    /// Largest absolute difference accepted (f32 on a GPU: TF32 is off in candle, 1e-3 leaves room for reduction order).
    #[arg(long, default_value_t = 1e-3)]
    tol: f32,
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    if a.dims() != b.dims() {
        bail!("shape {:?} vs {:?}", a.dims(), b.dims());
    }
    Ok(a.sub(&b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

pub fn run(a: SelfTestArgs) -> Result<()> {
    let dev = crate::common::parse_device(&a.device)?;
    let ckpt = a.fixtures.join("seed_tiny.ckpt");
    let weights = unet::lightning::import(&ckpt).with_context(|| format!("loading {}", ckpt.display()))?;
    let io_path = a.fixtures.join("seed_tiny_io.safetensors");
    let io: HashMap<String, Tensor> = candle_core::safetensors::load(&io_path, &dev).with_context(|| format!("loading {}", io_path.display()))?;
    let schedule = Schedule::reference();
    let mut failures = 0;
    let mut check = |name: &str, d: f32, tol: f32| {
        let ok = d <= tol;
        println!("{:<34} max |diff| {:>10.3e}  (tol {:.0e})  {}", name, d, tol, if ok { "ok" } else { "FAIL" });
        if !ok {
            failures += 1;
        }
    };

    // Trainable copies so that the same model gives gradients.
    let mut vars = HashMap::new();
    let mut tensors = HashMap::new();
    for (k, v) in weights.select(false) {
        let v = v.to_device(&dev)?;
        if k == unet::TIME_TABLE_KEY {
            tensors.insert(k, v);
        } else {
            let var = Var::from_tensor(&v)?;
            tensors.insert(k.clone(), var.as_tensor().clone());
            vars.insert(k, var);
        }
    }
    let model = UNet::new(VarBuilder::from_tensors(tensors, DType::F32, &dev), &weights.config)?;
    let t = io["t"].to_dtype(DType::U32)?;
    let (eps, inter) = model.forward_with_intermediates(&io["x"], &t, Mode::Eval)?;
    check("forward eps", max_diff(&eps, &io["eps"])?, a.tol);
    check("time embedding", max_diff(&inter.temb, &io["temb"])?, a.tol);
    check("middle activations", max_diff(&inter.mid, &io["mid"])?, a.tol);

    for (i, &step) in [999usize, 500, 1, 0].iter().enumerate() {
        let tt = Tensor::new(&[step as u32], &dev)?;
        let e = model.forward_t(&io["rs_x_t"], &tt, Mode::Eval)?;
        check(&format!("reverse eps t={step}"), max_diff(&e, &io["rs_eps"].get(i)?)?, a.tol);
        for (variance, key) in [(Variance::Beta, "rs_x_prev_beta"), (Variance::BetaTilde, "rs_x_prev_tilde")] {
            let x = schedule.ddpm_step(&e, &io["rs_x_t"], step, Some(&io["rs_z"]), variance, FinalStepNoise::Reference)?;
            check(&format!("{key} t={step}"), max_diff(&x, &io[key].get(i)?)?, a.tol);
        }
    }

    let ts: Vec<u32> = t.to_vec1()?;
    let pred = |x: &Tensor, t: &Tensor| model.forward_t(x, t, Mode::Eval);
    let loss = schedule.loss(&pred, &io["x"], &ts, &io["q_noise"])?;
    check("loss", max_diff(&loss.reshape(1)?, &io["loss_eval"].flatten_all()?)?, a.tol);
    let grads = loss.backward()?;
    for key in ["head.weight", "tail.2.weight", "time_embedding.time_embedding.1.weight", "middle_blocks.0.attn.proj_q.weight"] {
        let g = grads.get(vars[key].as_tensor()).with_context(|| format!("no gradient for {key}"))?;
        let expect = &io[&format!("grad.{key}")];
        let scale: f32 = expect.abs()?.flatten_all()?.max(0)?.to_device(&Device::Cpu)?.to_scalar()?;
        check(&format!("grad {key} (relative)"), max_diff(g, expect)? / scale, a.tol);
    }
    if failures > 0 {
        bail!("{failures} check(s) failed on {}", a.device);
    }
    println!("self-test: all checks passed on {}", a.device);
    Ok(())
}
