//! `diffusion`: the mathematics of denoising diffusion, and nothing of the network.
//!
//! This crate owns the noise schedules ([`Schedule`]), the forward process q(x_t | x_0), the
//! training loss, the DDPM reverse step with both posterior variances, DDIM steps, and the
//! reverse-process loops. The network is anything that implements [`NoisePredictor`], so the
//! crate never depends on the UNet.
//!
//! Conventions follow the PyTorch reference: timesteps are 0-based indices `0..T`, tensors are
//! NCHW f32 in [-1, 1], and coefficients are f32 computed in the reference's operation order.
//!
//! Any closure `Fn(&x_t, &t) -> candle_core::Result<eps>` is a noise predictor (the UNet is
//! one through `sampler::EvalModel`). An oracle that knows the clean images has zero loss, and
//! every sampler ends on those images:
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use diffusion::{reverse_process, NoiseRng, SamplerKind, Schedule};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let schedule = Schedule::reference(); // linear betas 1e-4..0.02, T = 1000
//! let mut rng = NoiseRng::new(0);
//! let x0 = rng.randn((2, 3, 8, 8), &Device::Cpu)?.tanh()?;
//!
//! // The exact noise in x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per image's step t.
//! let (sched, target) = (schedule.clone(), x0.clone());
//! let oracle = move |x_t: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
//!     let t = t.to_vec1::<u32>()?;
//!     let per_image = |v: &[f32]| Tensor::from_iter(t.iter().map(|&i| v[i as usize]), &Device::Cpu)?.reshape((t.len(), 1, 1, 1));
//!     let (a, s) = (per_image(&sched.alphas_cumprod_sqrt)?, per_image(&sched.one_minus_alphas_cumprod_sqrt)?);
//!     x_t.broadcast_sub(&target.broadcast_mul(&a)?)?.broadcast_div(&s)
//! };
//!
//! // Training: the loss at random steps.
//! let (ts, _) = rng.timesteps(2, schedule.num_steps(), &Device::Cpu)?;
//! let noise = rng.randn((2, 3, 8, 8), &Device::Cpu)?;
//! assert!(schedule.loss(&oracle, &x0, &ts, &noise)?.to_scalar::<f32>()? < 1e-6);
//!
//! // Sampling: DDIM, 50 steps, from x_T down to x_0.
//! let x_big_t = rng.randn((2, 3, 8, 8), &Device::Cpu)?;
//! let kind = SamplerKind::Ddim { steps: 50, eta: 0.0 };
//! let out = reverse_process(&schedule, &oracle, &x_big_t, schedule.num_steps() - 1, &kind, &mut rng, |_, _, _, _| {})?;
//! assert!((out - &x0)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
//! # Ok(())
//! # }
//! ```

pub mod rng;
pub mod schedule;
pub mod upload;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use rng::{NoiseRng, RngState};
pub use schedule::{BetaSchedule, Schedule, ScheduleConfig, MAX_NUM_STEPS};

#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("diffusion config: {0}")]
    Config(String),
    /// A wrong argument to a step or sampler (shapes, dtypes, missing noise, weights).
    #[error("{0}")]
    Invalid(String),
    #[error("timestep {t} is out of range 0..{num_steps}")]
    Timestep { t: usize, num_steps: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DiffusionError>;

/// A network that predicts the noise in `x_t`: `eps = f(x_t, t)`, with `t` a u32 tensor of
/// shape `[B]` (one 0-based step per sample).
pub trait NoisePredictor {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;
}

impl<F> NoisePredictor for F
where
    F: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self(x_t, t)
    }
}

/// The reverse-process variance sigma_t^2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variance {
    /// sigma^2 = beta_t (the reference's `posterior_choice = 0`).
    Beta,
    /// sigma^2 = beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (`posterior_choice = 1`).
    BetaTilde,
}

impl Variance {
    /// The reference's file suffix: `sample_0.png` is beta, `sample_1.png` is beta-tilde.
    pub fn index(self) -> usize {
        match self {
            Variance::Beta => 0,
            Variance::BetaTilde => 1,
        }
    }
}

/// Whether the last reverse step (t = 0) adds noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinalStepNoise {
    /// The DDPM paper (Algorithm 2): x_0 is the mean, no noise at t = 0.
    #[default]
    Paper,
    /// The reference adds sigma_0 z at t = 0 too (0.01 z for sigma^2 = beta).
    Reference,
}

/// The scalar coefficients of one DDPM reverse step:
/// `x_{t-1} = mean_scale * (x_t - eps_scale * eps) + sigma * z`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmCoefficients {
    pub mean_scale: f32,
    pub eps_scale: f32,
    pub sigma: f32,
}

/// The scalar coefficients of one DDIM step from `t` to `t_prev`:
/// `x_prev = x0_scale * (x_t - x0_eps_scale * eps) + dir_scale * eps + sigma * z`
/// where the first term is `sqrt(abar_prev) * x0_pred`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimCoefficients {
    /// sqrt(abar_prev) / sqrt(abar_t)
    pub x0_scale: f32,
    /// sqrt(1 - abar_t)
    pub x0_eps_scale: f32,
    /// sqrt(1 - abar_prev - sigma^2)
    pub dir_scale: f32,
    pub sigma: f32,
}

impl DdimCoefficients {
    /// The same step written as DDPM's `mean_scale * (x_t - eps_scale * eps)`: lets tests compare
    /// DDIM (eta = 1, every step) with DDPM (beta-tilde) coefficient for coefficient.
    pub fn as_ddpm(&self) -> DdpmCoefficients {
        let mean_scale = self.x0_scale as f64;
        // x_prev = m x_t - (m * c + d) eps  with m = x0_scale, c = x0_eps_scale, d = dir_scale
        let eps_total = self.x0_scale as f64 * self.x0_eps_scale as f64 - self.dir_scale as f64;
        DdpmCoefficients { mean_scale: mean_scale as f32, eps_scale: (eps_total / mean_scale) as f32, sigma: self.sigma }
    }
}

fn per_sample(values: Vec<f32>, device: &Device) -> candle_core::Result<Tensor> {
    let n = values.len();
    upload::tensor_from_slice(&values, (n, 1, 1, 1), device)
}

impl Schedule {
    /// Forward process: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`, one `t` per sample.
    pub fn q_sample(&self, x0: &Tensor, t: &[u32], noise: &Tensor) -> Result<Tensor> {
        check_pair(x0, noise, "q_sample")?;
        let b = x0.dim(0)?;
        if t.len() != b {
            return Err(DiffusionError::Invalid(format!("q_sample: {} timesteps for a batch of {b}", t.len())));
        }
        let (a, s) = self.q_coefficients(t)?;
        self.q_sample_with(x0, &per_sample(a, x0.device())?, &per_sample(s, x0.device())?, noise)
    }

    /// `sqrt(abar_t)` and `sqrt(1 - abar_t)` for each of `t`, the factors of `x_0` and of the
    /// noise in [`Schedule::q_sample`].
    pub fn q_coefficients(&self, t: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        for &ti in t {
            self.check_t(ti as usize)?;
        }
        Ok((
            t.iter().map(|&i| self.alphas_cumprod_sqrt[i as usize]).collect(),
            t.iter().map(|&i| self.one_minus_alphas_cumprod_sqrt[i as usize]).collect(),
        ))
    }

    /// [`Schedule::q_sample`] with its factors already on the device: `a` and `s`, f32
    /// `[B, 1, 1, 1]` from [`Schedule::q_coefficients`]. A training step replayed from a CUDA
    /// graph cannot upload them itself.
    pub fn q_sample_with(&self, x0: &Tensor, a: &Tensor, s: &Tensor, noise: &Tensor) -> Result<Tensor> {
        check_pair(x0, noise, "q_sample")?;
        let b = x0.dim(0)?;
        for (name, f) in [("a", a), ("s", s)] {
            if f.dims() != [b, 1, 1, 1] {
                return Err(DiffusionError::Invalid(format!("q_sample: factor {name} must be [{b}, 1, 1, 1], got {:?}", f.dims())));
            }
        }
        let a = a.to_dtype(x0.dtype())?;
        let s = s.to_dtype(x0.dtype())?;
        Ok(x0.broadcast_mul(&a)?.add(&noise.broadcast_mul(&s)?)?)
    }

    /// Forward process with the same `t` for the whole batch.
    pub fn q_sample_at(&self, x0: &Tensor, t: usize, noise: &Tensor) -> Result<Tensor> {
        check_pair(x0, noise, "q_sample_at")?;
        self.check_t(t)?;
        let a = self.alphas_cumprod_sqrt[t] as f64;
        let s = self.one_minus_alphas_cumprod_sqrt[t] as f64;
        Ok(x0.affine(a, 0.0)?.add(&noise.affine(s, 0.0)?)?)
    }

    /// The training objective: MSE between `noise` and the network's prediction from `x_t`.
    pub fn loss(&self, model: &dyn NoisePredictor, x0: &Tensor, t: &[u32], noise: &Tensor) -> Result<Tensor> {
        let x_t = self.q_sample(x0, t, noise)?;
        let t_tensor = upload::tensor_from_slice(t, t.len(), x0.device())?;
        let eps = model.predict_noise(&x_t, &t_tensor)?;
        Ok(mse(&eps, noise)?)
    }

    /// [`Schedule::loss`] with everything already on the device: the steps `t` (u32 `[B]`) and
    /// their factors `a`, `s` ([`Schedule::q_sample_with`]). The same operations, so the same
    /// result.
    pub fn loss_with(&self, model: &dyn NoisePredictor, x0: &Tensor, t: &Tensor, a: &Tensor, s: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let x_t = self.q_sample_with(x0, a, s, noise)?;
        let eps = model.predict_noise(&x_t, t)?;
        Ok(mse(&eps, noise)?)
    }

    pub fn ddpm_coefficients(&self, t: usize, variance: Variance, final_noise: FinalStepNoise) -> Result<DdpmCoefficients> {
        self.check_t(t)?;
        let eps_scale = (1.0 - self.alphas[t]) / self.one_minus_alphas_cumprod_sqrt[t];
        let mean_scale = 1.0 / self.alphas_sqrt[t];
        let sigma = if t == 0 && final_noise == FinalStepNoise::Paper {
            0.0
        } else {
            match variance {
                Variance::Beta => self.betas[t].sqrt(),
                Variance::BetaTilde => self.posterior_variance[t].sqrt(),
            }
        };
        Ok(DdpmCoefficients { mean_scale, eps_scale, sigma })
    }

    /// One DDPM reverse step from `x_t` given the predicted noise; `z` is the fresh Gaussian noise,
    /// required when the step's sigma is not 0 (every step but the last, or all of them with
    /// [`FinalStepNoise::Reference`]) and ignored otherwise.
    pub fn ddpm_step(
        &self,
        eps: &Tensor,
        x_t: &Tensor,
        t: usize,
        z: Option<&Tensor>,
        variance: Variance,
        final_noise: FinalStepNoise,
    ) -> Result<Tensor> {
        let c = self.ddpm_coefficients(t, variance, final_noise)?;
        check_pair(eps, x_t, "ddpm_step")?;
        if c.sigma != 0.0 && z.is_none() {
            return Err(DiffusionError::Invalid(format!("ddpm_step at t = {t} has sigma {} > 0: it needs the noise z", c.sigma)));
        }
        // Same operation order as the reference: (1/sqrt(a)) * (x_t - coef * eps) + sigma * z.
        let mean = x_t.sub(&eps.affine(c.eps_scale as f64, 0.0)?)?.affine(c.mean_scale as f64, 0.0)?;
        match z {
            Some(z) if c.sigma != 0.0 || final_noise == FinalStepNoise::Reference => {
                Ok(mean.add(&z.affine(c.sigma as f64, 0.0)?)?)
            }
            _ => Ok(mean),
        }
    }

    /// Coefficients of a DDIM step from `t` to `t_prev` (`None` = to x_0).
    pub fn ddim_coefficients(&self, t: usize, t_prev: Option<usize>, eta: f64) -> Result<DdimCoefficients> {
        self.check_t(t)?;
        if let Some(p) = t_prev {
            if p >= t {
                return Err(DiffusionError::Config(format!("DDIM step must go down in t: {t} -> {p}")));
            }
        }
        if !(0.0..=1.0).contains(&eta) {
            return Err(DiffusionError::Config(format!("DDIM eta must be in [0, 1], got {eta}")));
        }
        let a_t = self.alphas_cumprod[t] as f64;
        let a_prev = t_prev.map(|p| self.alphas_cumprod[p] as f64).unwrap_or(1.0);
        // 1 - abar_t/abar_prev from the betas in f64: the ratio of two f32 cumulative products
        // loses most digits to cancellation at small t.
        let first = t_prev.map_or(0, |p| p + 1);
        let ratio: f64 = self.betas[first..=t].iter().map(|&b| 1.0 - b as f64).product();
        let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - ratio)).max(0.0).sqrt();
        let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
        Ok(DdimCoefficients {
            x0_scale: (a_prev.sqrt() / a_t.sqrt()) as f32,
            x0_eps_scale: (1.0 - a_t).sqrt() as f32,
            dir_scale: dir as f32,
            sigma: sigma as f32,
        })
    }

    /// One DDIM step (Song et al. 2021, eq. 12); `z` is required when the step's sigma is not 0
    /// (eta > 0, to a `t_prev`) and ignored otherwise.
    pub fn ddim_step(&self, eps: &Tensor, x_t: &Tensor, t: usize, t_prev: Option<usize>, eta: f64, z: Option<&Tensor>) -> Result<Tensor> {
        let c = self.ddim_coefficients(t, t_prev, eta)?;
        check_pair(eps, x_t, "ddim_step")?;
        if c.sigma > 0.0 && z.is_none() {
            return Err(DiffusionError::Invalid(format!("ddim_step {t} -> {} with eta {eta} has sigma {} > 0: it needs the noise z", t_prev.map_or("x_0".to_string(), |p| p.to_string()), c.sigma)));
        }
        let x0_part = x_t.sub(&eps.affine(c.x0_eps_scale as f64, 0.0)?)?.affine(c.x0_scale as f64, 0.0)?;
        let mut out = x0_part.add(&eps.affine(c.dir_scale as f64, 0.0)?)?;
        if c.sigma > 0.0 {
            if let Some(z) = z {
                out = out.add(&z.affine(c.sigma as f64, 0.0)?)?;
            }
        }
        Ok(out)
    }

    /// A deterministic DDIM step (eta = 0) with the predicted x_0 clipped to [-1, 1], as the DDPM
    /// reference implementation's `clip_denoised`: an undertrained network's x_0 estimate at large
    /// t is its noise error amplified by 1/sqrt(abar_t) (~150 at t = 999), which otherwise
    /// saturates the samples. The step uses the noise consistent with the clipped x_0.
    pub fn ddim_step_clipped(&self, eps: &Tensor, x_t: &Tensor, t: usize, t_prev: Option<usize>) -> Result<Tensor> {
        check_pair(eps, x_t, "ddim_step_clipped")?;
        let Some(p) = t_prev else { return Ok(self.predict_x0(eps, x_t, t)?.clamp(-1f32, 1f32)?) };
        self.check_t(t)?;
        if p >= t {
            return Err(DiffusionError::Config(format!("DDIM step must go down in t: {t} -> {p}")));
        }
        let (x0, eps) = self.clipped_x0_and_eps(eps, x_t, t)?;
        let a_p = self.alphas_cumprod[p] as f64;
        Ok(x0.affine(a_p.sqrt(), 0.0)?.add(&eps.affine((1.0 - a_p).sqrt(), 0.0)?)?)
    }

    /// The noise consistent with the predicted x_0 clipped to [-1, 1] (the DDPM reference code's
    /// `clip_denoised`): any DDPM or DDIM step given this noise uses the clipped x_0, since
    /// both steps are functions of (x_0, noise) through `x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`.
    /// Where the prediction is inside the range the noise is unchanged (up to rounding).
    pub fn clip_eps(&self, eps: &Tensor, x_t: &Tensor, t: usize) -> Result<Tensor> {
        Ok(self.clipped_x0_and_eps(eps, x_t, t)?.1)
    }

    /// The predicted x_0 clipped to [-1, 1], and the noise consistent with it at step `t`.
    fn clipped_x0_and_eps(&self, eps: &Tensor, x_t: &Tensor, t: usize) -> Result<(Tensor, Tensor)> {
        let x0 = self.predict_x0(eps, x_t, t)?.clamp(-1f32, 1f32)?;
        let a_t = self.alphas_cumprod[t] as f64;
        let eps = x_t.sub(&x0.affine(a_t.sqrt(), 0.0)?)?.affine(1.0 / (1.0 - a_t).sqrt(), 0.0)?;
        Ok((x0, eps))
    }

    /// The prediction of x_0 from `x_t` and the predicted noise.
    pub fn predict_x0(&self, eps: &Tensor, x_t: &Tensor, t: usize) -> Result<Tensor> {
        self.check_t(t)?;
        let a = self.alphas_cumprod_sqrt[t] as f64;
        let s = self.one_minus_alphas_cumprod_sqrt[t] as f64;
        Ok(x_t.sub(&eps.affine(s, 0.0)?)?.affine(1.0 / a, 0.0)?)
    }
}

/// `a` and `b` are batches of the same shape and a float dtype, with at least one element
/// (candle would broadcast a `[1, ..]` noise silently, or give NaN for an empty batch).
fn check_pair(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() || a.elem_count() == 0 || a.rank() == 0 {
        return Err(DiffusionError::Invalid(format!("{what}: the tensors must be non-empty batches of one shape, got {:?} and {:?}", a.dims(), b.dims())));
    }
    if !a.dtype().is_float() || !b.dtype().is_float() {
        return Err(DiffusionError::Invalid(format!("{what}: the tensors must be floats, got {:?} and {:?}", a.dtype(), b.dtype())));
    }
    Ok(())
}

/// Mean squared error over all elements, as `F.mse_loss`.
pub fn mse(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.sub(b)?.sqr()?.mean_all()
}

/// `steps` timesteps for DDIM, evenly spaced from T-1 down to 0 (both ends included when
/// `steps >= 2`), descending and without repeats.
pub fn ddim_timesteps(num_steps: usize, steps: usize) -> Result<Vec<usize>> {
    if num_steps == 0 {
        return Err(DiffusionError::Config("DDIM steps of a schedule with no steps".into()));
    }
    if steps == 0 || steps > num_steps {
        return Err(DiffusionError::Config(format!("DDIM steps must be in 1..={num_steps}, got {steps}")));
    }
    if steps == 1 {
        return Ok(vec![num_steps - 1]);
    }
    let mut ts: Vec<usize> = (0..steps)
        .map(|i| ((i as f64) * (num_steps - 1) as f64 / (steps - 1) as f64).round() as usize)
        .collect();
    ts.dedup();
    ts.reverse();
    Ok(ts)
}

/// How the reverse process runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SamplerKind {
    Ddpm { variance: Variance, #[serde(default)] final_noise: FinalStepNoise },
    Ddim { steps: usize, eta: f64 },
}

/// Runs the reverse process from `x_start` at step `t_start` down to x_0.
///
/// `on_step(i, n, t, &x)` is called after each step with the new x (the state at `t`'s
/// predecessor; `t` is the step just taken). The noise for step k comes from `rng`, so a seed
/// fixes the whole trajectory.
#[allow(clippy::too_many_arguments)]
pub fn reverse_process(
    schedule: &Schedule,
    model: &dyn NoisePredictor,
    x_start: &Tensor,
    t_start: usize,
    kind: &SamplerKind,
    rng: &mut NoiseRng,
    mut on_step: impl FnMut(usize, usize, usize, &Tensor),
) -> Result<Tensor> {
    schedule.check_t(t_start)?;
    let b = x_start.dim(0)?;
    let device = x_start.device().clone();
    let shape = x_start.shape().clone();
    let mut x = x_start.clone();
    match kind {
        SamplerKind::Ddpm { variance, final_noise } => {
            let n = t_start + 1;
            for (i, t) in (0..=t_start).rev().enumerate() {
                let tt = Tensor::full(t as u32, b, &device)?;
                let eps = model.predict_noise(&x, &tt)?;
                let needs_noise = t > 0 || *final_noise == FinalStepNoise::Reference;
                let z = if needs_noise { Some(rng.randn(shape.clone(), &device)?.to_dtype(x.dtype())?) } else { None };
                x = schedule.ddpm_step(&eps, &x, t, z.as_ref(), *variance, *final_noise)?;
                on_step(i, n, t, &x);
            }
        }
        SamplerKind::Ddim { steps, eta } => {
            let ts: Vec<usize> = ddim_timesteps(schedule.num_steps(), *steps)?
                .into_iter()
                .filter(|&t| t <= t_start)
                .collect();
            let mut ts = ts;
            if ts.first() != Some(&t_start) {
                ts.insert(0, t_start);
            }
            let n = ts.len();
            for i in 0..n {
                let t = ts[i];
                let t_prev = ts.get(i + 1).copied();
                let tt = Tensor::full(t as u32, b, &device)?;
                let eps = model.predict_noise(&x, &tt)?;
                let z = if *eta > 0.0 && t_prev.is_some() { Some(rng.randn(shape.clone(), &device)?.to_dtype(x.dtype())?) } else { None };
                x = schedule.ddim_step(&eps, &x, t, t_prev, *eta, z.as_ref())?;
                on_step(i, n, t, &x);
            }
        }
    }
    Ok(x)
}

/// Number of network evaluations `kind` needs to go from `t_start` to x_0.
pub fn num_evaluations(schedule: &Schedule, kind: &SamplerKind, t_start: usize) -> Result<usize> {
    Ok(match kind {
        SamplerKind::Ddpm { .. } => t_start + 1,
        SamplerKind::Ddim { steps, .. } => {
            let ts = ddim_timesteps(schedule.num_steps(), *steps)?;
            let k = ts.iter().filter(|&&t| t <= t_start).count();
            if ts.contains(&t_start) { k } else { k + 1 }
        }
    })
}

/// Spherical interpolation between two noises (for latent walks); `w` in [0, 1].
pub fn slerp(a: &Tensor, b: &Tensor, w: f64) -> Result<Tensor> {
    check_pair(a, b, "slerp")?;
    if !(0.0..=1.0).contains(&w) {
        return Err(DiffusionError::Invalid(format!("slerp weight must be in [0, 1], got {w}")));
    }
    let af = a.flatten_all()?.to_dtype(DType::F64)?;
    let bf = b.flatten_all()?.to_dtype(DType::F64)?;
    let dot = af.mul(&bf)?.sum_all()?.to_scalar::<f64>()?;
    let na = af.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let nb = bf.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    if !(na > 0.0 && nb > 0.0 && na.is_finite() && nb.is_finite()) {
        return Err(DiffusionError::Invalid(format!("slerp needs two finite non-zero vectors, got norms {na} and {nb}")));
    }
    let cos = (dot / (na * nb)).clamp(-1.0, 1.0);
    let theta = cos.acos();
    let out = if theta.abs() < 1e-6 {
        a.affine(1.0 - w, 0.0)?.add(&b.affine(w, 0.0)?)?
    } else {
        let s = theta.sin();
        a.affine(((1.0 - w) * theta).sin() / s, 0.0)?.add(&b.affine((w * theta).sin() / s, 0.0)?)?
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_errors_not_panics_or_nan() {
        let dev = Device::Cpu;
        let s = Schedule::reference();
        let x = Tensor::ones((2, 3, 4, 4), DType::F32, &dev).unwrap();
        let one = Tensor::ones((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let empty = Tensor::zeros((0, 3, 4, 4), DType::F32, &dev).unwrap();
        let bytes = Tensor::zeros((2, 3, 4, 4), DType::U8, &dev).unwrap();
        // Broadcast noise, an empty batch, integer images.
        assert!(s.q_sample(&x, &[1, 2], &one).is_err());
        assert!(s.q_sample_at(&x, 1, &one).is_err());
        assert!(s.q_sample(&empty, &[], &empty).is_err());
        assert!(s.q_sample(&bytes, &[1, 2], &bytes).is_err());
        // A step with noise in it and no noise given.
        assert!(s.ddpm_step(&x, &x, 500, None, Variance::Beta, FinalStepNoise::Paper).is_err());
        assert!(s.ddpm_step(&x, &x, 0, None, Variance::Beta, FinalStepNoise::Paper).is_ok());
        assert!(s.ddim_step(&x, &x, 500, Some(400), 1.0, None).is_err());
        assert!(s.ddim_step(&x, &x, 500, Some(400), 0.0, None).is_ok());
        // Upward and out-of-range DDIM steps, clipped or not.
        assert!(s.ddim_step_clipped(&x, &x, 400, Some(500)).is_err());
        assert!(s.ddim_step_clipped(&x, &x, 1000, Some(5)).is_err());
        // Slerp of a zero vector or with a weight outside [0, 1].
        let zero = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        assert!(slerp(&zero, &one, 0.5).is_err());
        assert!(slerp(&one, &one, f64::NAN).is_err());
        assert!(slerp(&one, &one.affine(-1.0, 0.5).unwrap(), 0.5).is_ok());
        // The generator's own arguments.
        let mut rng = NoiseRng::new(0);
        assert!(rng.below(0).is_err());
        assert!(rng.bernoulli(2.0).is_err() && rng.bernoulli(f64::NAN).is_err());
        assert!(rng.timesteps(4, 0, &dev).is_err());
        // Schedules that are empty, or whose betas are outside (0, 1).
        for betas in [vec![], vec![0.0, 0.5], vec![0.1, 1.0], vec![0.1, f32::NAN]] {
            assert!(Schedule::from_betas(betas).is_err());
        }
        for s in [f64::INFINITY, 1e300, -0.1, f64::NAN] {
            let cfg = ScheduleConfig { num_steps: 100, beta: BetaSchedule::Cosine { s } };
            assert!(Schedule::new(&cfg).is_err(), "cosine s = {s}");
        }
    }

    #[test]
    fn ddim_timesteps_cover_the_range() {
        assert_eq!(ddim_timesteps(1000, 1000).unwrap(), (0..1000).rev().collect::<Vec<_>>());
        let ts = ddim_timesteps(1000, 10).unwrap();
        assert_eq!(ts.len(), 10);
        assert_eq!(ts[0], 999);
        assert_eq!(*ts.last().unwrap(), 0);
        assert!(ts.windows(2).all(|w| w[0] > w[1]));
        assert!(ddim_timesteps(1000, 0).is_err());
        assert!(ddim_timesteps(1000, 1001).is_err());
    }

    #[test]
    fn ddim_eta_one_all_steps_is_ddpm_beta_tilde() {
        let s = Schedule::reference();
        for t in [1usize, 2, 5, 10, 50, 500, 998, 999] {
            let ddim = s.ddim_coefficients(t, Some(t - 1), 1.0).unwrap().as_ddpm();
            let ddpm = s.ddpm_coefficients(t, Variance::BetaTilde, FinalStepNoise::Paper).unwrap();
            let rel = |a: f32, b: f32| ((a - b) / b).abs();
            // At small t both sides divide by 1 - abar_t ~ 1e-4, formed from f32 abar as in the
            // reference: f32 rounding (6e-8) then shows up at the 1e-3 relative level.
            let tol = if t < 10 { 2e-3 } else { 1e-4 };
            assert!(rel(ddim.mean_scale, ddpm.mean_scale) < 1e-5, "t={t} mean {ddim:?} vs {ddpm:?}");
            assert!(rel(ddim.eps_scale, ddpm.eps_scale) < tol, "t={t} eps {ddim:?} vs {ddpm:?}");
            assert!(rel(ddim.sigma, ddpm.sigma) < tol, "t={t} sigma {ddim:?} vs {ddpm:?}");
        }
        // Last step: both deterministic (paper convention).
        let last = s.ddim_coefficients(0, None, 1.0).unwrap();
        assert_eq!(last.sigma, 0.0);
    }

    #[test]
    fn ddim_eta_zero_is_deterministic() {
        let s = Schedule::reference();
        let c = s.ddim_coefficients(500, Some(400), 0.0).unwrap();
        assert_eq!(c.sigma, 0.0);
        assert!(s.ddim_coefficients(500, Some(600), 0.0).is_err());
        assert!(s.ddim_coefficients(500, Some(400), 1.5).is_err());
    }

    #[test]
    fn final_step_noise_conventions() {
        let s = Schedule::reference();
        let paper = s.ddpm_coefficients(0, Variance::Beta, FinalStepNoise::Paper).unwrap();
        let reference = s.ddpm_coefficients(0, Variance::Beta, FinalStepNoise::Reference).unwrap();
        assert_eq!(paper.sigma, 0.0);
        assert!((reference.sigma - 0.01).abs() < 1e-7);
        let tilde = s.ddpm_coefficients(0, Variance::BetaTilde, FinalStepNoise::Reference).unwrap();
        assert_eq!(tilde.sigma, 0.0);
    }

    #[test]
    fn reverse_process_with_exact_noise_oracle_recovers_x0() {
        // A predictor that knows x0 returns the exact noise; DDIM eta=0 then recovers x0.
        let dev = Device::Cpu;
        let s = Schedule::reference();
        let mut rng = NoiseRng::new(0);
        let x0 = rng.randn((2, 3, 4, 4), &dev).unwrap().tanh().unwrap();
        let oracle = |x_t: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
            let t0 = t.to_vec1::<u32>()?[0] as usize;
            let a = s.alphas_cumprod_sqrt[t0] as f64;
            let b = s.one_minus_alphas_cumprod_sqrt[t0] as f64;
            x_t.sub(&x0.affine(a, 0.0)?)?.affine(1.0 / b, 0.0)
        };
        let noise = rng.randn((2, 3, 4, 4), &dev).unwrap();
        let x_t = s.q_sample_at(&x0, 300, &noise).unwrap();
        let kind = SamplerKind::Ddim { steps: 20, eta: 0.0 };
        let mut calls = 0;
        let out = reverse_process(&s, &oracle, &x_t, 300, &kind, &mut rng, |_, _, _, _| calls += 1).unwrap();
        assert_eq!(calls, num_evaluations(&s, &kind, 300).unwrap());
        let err = out.sub(&x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-3, "{err}");
    }

    #[test]
    fn clipped_noise_gives_the_clipped_x0_and_keeps_an_in_range_prediction() {
        let s = Schedule::reference();
        let x_t = Tensor::new(&[[0.3f32, -0.2, 0.05, 2.5]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[0.1f32, 0.2, -0.1, -3.0]], &Device::Cpu).unwrap();
        for t in [10usize, 500, 999] {
            let x0 = s.predict_x0(&eps, &x_t, t).unwrap().to_vec2::<f32>().unwrap()[0].clone();
            let e = s.clip_eps(&eps, &x_t, t).unwrap();
            let x0c = s.predict_x0(&e, &x_t, t).unwrap().to_vec2::<f32>().unwrap()[0].clone();
            let (e, eps) = (e.to_vec2::<f32>().unwrap()[0].clone(), eps.to_vec2::<f32>().unwrap()[0].clone());
            for i in 0..4 {
                let want = x0[i].clamp(-1.0, 1.0);
                assert!((x0c[i] - want).abs() < 2e-3 * (1.0 + x0[i].abs()), "t {t} [{i}]: {} vs {want}", x0c[i]);
                if x0[i].abs() < 1.0 {
                    assert!((e[i] - eps[i]).abs() < 1e-3, "t {t} [{i}]: in range, the noise must not change");
                }
            }
        }
    }

    #[test]
    fn clipped_ddim_step_equals_plain_step_inside_the_range_and_clips_outside() {
        let dev = Device::Cpu;
        let s = Schedule::reference();
        let mut rng = NoiseRng::new(4);
        // |x_t| < 0.5, so the x_0 estimate (about 0.97 x_t at t = 10) stays inside [-1, 1].
        let x_t = rng.randn((2, 3, 4, 4), &dev).unwrap().tanh().unwrap().affine(0.5, 0.0).unwrap();
        let small_eps = x_t.affine(0.999, 0.0).unwrap();
        let plain = s.ddim_step(&small_eps, &x_t, 10, Some(5), 0.0, None).unwrap();
        let clipped = s.ddim_step_clipped(&small_eps, &x_t, 10, Some(5)).unwrap();
        let d = plain.sub(&clipped).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}");
        // At the last step the result is the clipped x_0 itself.
        let big = x_t.affine(-50.0, 0.0).unwrap();
        let last = s.ddim_step_clipped(&big, &x_t, 999, None).unwrap();
        let m = last.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(m <= 1.0 && m > 0.99, "{m}");
    }

    #[test]
    fn loss_of_perfect_predictor_is_zero() {
        let dev = Device::Cpu;
        let s = Schedule::reference();
        let mut rng = NoiseRng::new(1);
        let x0 = rng.randn((3, 3, 4, 4), &dev).unwrap();
        let noise = rng.randn((3, 3, 4, 4), &dev).unwrap();
        let t = [0u32, 10, 999];
        let n2 = noise.clone();
        let cheat = move |_x: &Tensor, _t: &Tensor| -> candle_core::Result<Tensor> { Ok(n2.clone()) };
        let l = s.loss(&cheat, &x0, &t, &noise).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(l, 0.0);
        let zero = |x: &Tensor, _t: &Tensor| x.zeros_like();
        let l = s.loss(&zero, &x0, &t, &noise).unwrap().to_scalar::<f32>().unwrap();
        assert!(l > 0.5);
    }

    #[test]
    fn the_loss_with_its_inputs_on_the_device_is_the_loss() {
        let dev = Device::Cpu;
        let s = Schedule::reference();
        let mut rng = NoiseRng::new(3);
        let x0 = rng.randn((3, 3, 4, 4), &dev).unwrap();
        let noise = rng.randn((3, 3, 4, 4), &dev).unwrap();
        let t = [0u32, 417, 999];
        // A predictor that uses both of its inputs, so that a wrong x_t or t shows.
        let model = |x: &Tensor, t: &Tensor| x.broadcast_mul(&t.to_dtype(DType::F32)?.affine(1e-3, 0.5)?.reshape((3, 1, 1, 1))?);
        let want = s.loss(&model, &x0, &t, &noise).unwrap().to_scalar::<f32>().unwrap();
        let (a, f) = s.q_coefficients(&t).unwrap();
        let dims = (3, 1, 1, 1);
        let (a, f) = (Tensor::from_vec(a, dims, &dev).unwrap(), Tensor::from_vec(f, dims, &dev).unwrap());
        let tt = Tensor::new(&t, &dev).unwrap();
        let got = s.loss_with(&model, &x0, &tt, &a, &f, &noise).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(got.to_bits(), want.to_bits());
        // The factors are checked: swapped ones give another loss, a wrong shape an error.
        let swapped = s.loss_with(&model, &x0, &tt, &f, &a, &noise).unwrap().to_scalar::<f32>().unwrap();
        assert_ne!(swapped, want);
        assert!(s.loss_with(&model, &x0, &tt, &a.reshape(3).unwrap(), &f, &noise).is_err());
        assert!(s.q_coefficients(&[1000]).is_err());
    }

    #[test]
    fn slerp_endpoints() {
        let dev = Device::Cpu;
        let mut rng = NoiseRng::new(2);
        let a = rng.randn((1, 3, 4, 4), &dev).unwrap();
        let b = rng.randn((1, 3, 4, 4), &dev).unwrap();
        let d = |x: &Tensor, y: &Tensor| x.sub(y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d(&slerp(&a, &b, 0.0).unwrap(), &a) < 1e-5);
        assert!(d(&slerp(&a, &b, 1.0).unwrap(), &b) < 1e-5);
    }
}
