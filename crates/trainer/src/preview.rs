//! Preview sampling: DDIM (eta = 0) with the predicted x_0 clipped at every step
//! ([`diffusion::Schedule::ddim_step_clipped`]), so that an undertrained model's previews do not
//! saturate. Used for the training previews and the demo (`log.sample_clip`).

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
            // Detached: a model whose weights are training variables would otherwise keep every
            // step's graph alive.
            x = schedule.ddim_step_clipped(&eps, &x, t, ts.get(i + 1).copied())?.detach();
        }
        outs.push(x.to_device(&Device::Cpu)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}
