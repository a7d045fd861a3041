//! DDIM (eta = 0) with the predicted x_0 clipped to [-1, 1] at every step, as the DDPM
//! reference implementation's `clip_denoised`: an undertrained network's x_0 estimate at large t
//! is its noise error amplified by 1/sqrt(abar_t) (~150 at t = 999), and without the clip the
//! deterministic DDIM path saturates to flat primary colours. Used for the training previews
//! and the demo (`log.sample_clip`); `sampler::generate` is the unclipped sampler.

use candle_core::{Device, Tensor};
use diffusion::Schedule;
use unet::{Mode, UNet};

use crate::TrainError;

/// Runs the clipped DDIM from `x_t` (at t = T-1) in chunks of `batch`; returns x_0 on the CPU.
pub fn ddim_clipped(model: &UNet, schedule: &Schedule, x_t: &Tensor, steps: usize, batch: usize) -> Result<Tensor, TrainError> {
    let ts = diffusion::ddim_timesteps(schedule.num_steps(), steps)?;
    let n = x_t.dim(0)?;
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch.max(1).min(n - start);
        let mut x = x_t.narrow(0, start, len)?;
        for (i, &t) in ts.iter().enumerate() {
            let tt = Tensor::full(t as u32, len, x.device())?;
            let eps = model.forward_t(&x, &tt, Mode::Eval)?;
            let a_t = schedule.alphas_cumprod[t] as f64;
            let x0 = x.sub(&eps.affine(schedule.one_minus_alphas_cumprod_sqrt[t] as f64, 0.0)?)?.affine(1.0 / a_t.sqrt(), 0.0)?;
            let x0 = x0.clamp(-1f32, 1f32)?;
            x = match ts.get(i + 1) {
                None => x0,
                Some(&p) => {
                    // The noise consistent with the clipped x_0, then the deterministic step.
                    let eps = x.sub(&x0.affine(a_t.sqrt(), 0.0)?)?.affine(1.0 / (1.0 - a_t).sqrt(), 0.0)?;
                    let a_p = schedule.alphas_cumprod[p] as f64;
                    x0.affine(a_p.sqrt(), 0.0)?.add(&eps.affine((1.0 - a_p).sqrt(), 0.0)?)?
                }
            };
        }
        outs.push(x.to_device(&Device::Cpu)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}
