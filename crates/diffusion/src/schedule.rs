//! Noise schedules and every per-step coefficient derived from them.
//!
//! Arrays are `f32` and computed the way the reference's `model.py` computes them with
//! PyTorch on CPU, so that a checkpoint trained there samples identically here.

use serde::{Deserialize, Serialize};

use crate::DiffusionError;

/// Which beta schedule to use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `torch.linspace(start, end, T)`: the reference (1e-4 .. 0.02) and the DDPM paper.
    Linear { start: f32, end: f32 },
    /// Nichol & Dhariwal's cosine schedule, betas clipped at 0.999; `s` defaults to their 0.008.
    Cosine {
        #[serde(default = "default_cosine_offset")]
        s: f64,
    },
}

fn default_cosine_offset() -> f64 {
    0.008
}

/// The most diffusion steps a schedule may have: 100 times the usual 1000, far beyond any
/// published use, and small enough that a typo (1e9) is an error rather than gigabytes of tables.
pub const MAX_NUM_STEPS: usize = 100_000;

impl Default for BetaSchedule {
    fn default() -> Self {
        BetaSchedule::Linear { start: 1e-4, end: 0.02 }
    }
}

/// The diffusion process configuration (`[diffusion]` in the TOML configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub num_steps: usize,
    #[serde(default)]
    pub beta: BetaSchedule,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { num_steps: 1000, beta: BetaSchedule::default() }
    }
}

/// All per-step arrays, indexed by the 0-based step `t` in `0..T` (the reference's convention).
#[derive(Debug, Clone)]
pub struct Schedule {
    pub betas: Vec<f32>,
    pub alphas: Vec<f32>,
    pub alphas_sqrt: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
    pub alphas_cumprod_prev: Vec<f32>,
    pub alphas_cumprod_sqrt: Vec<f32>,
    pub one_minus_alphas_cumprod_sqrt: Vec<f32>,
    /// beta-tilde: `beta_t (1 - abar_{t-1}) / (1 - abar_t)`; 0 at t = 0.
    pub posterior_variance: Vec<f32>,
}

/// `torch.linspace(start, end, steps)` for f32 on CPU, bit for bit: torch fills the first half
/// forwards from `start` and the second half backwards from `end`, each with one fused multiply-add.
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => return vec![],
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig) -> Result<Self, DiffusionError> {
        if !(2..=MAX_NUM_STEPS).contains(&cfg.num_steps) {
            return Err(DiffusionError::Config(format!("num_steps must be in 2..={MAX_NUM_STEPS}, got {}", cfg.num_steps)));
        }
        let betas = match cfg.beta {
            BetaSchedule::Linear { start, end } => {
                if !(0.0 < start && start <= end && end < 1.0) {
                    return Err(DiffusionError::Config(format!(
                        "linear betas need 0 < start <= end < 1, got {start}..{end}"
                    )));
                }
                torch_linspace_f32(start, end, cfg.num_steps)
            }
            BetaSchedule::Cosine { s } => {
                // s is a small offset (0.008 in Improved DDPM); far above 1 the betas degenerate.
                if !(0.0..=1.0).contains(&s) {
                    return Err(DiffusionError::Config(format!("cosine offset s must be in [0, 1], got {s}")));
                }
                cosine_betas(cfg.num_steps, s)
            }
        };
        Self::from_betas(betas)
    }

    /// The reference's schedule: linear 1e-4..0.02 over 1000 steps.
    pub fn reference() -> Self {
        Self::new(&ScheduleConfig::default()).expect("the default schedule is valid")
    }

    /// Any schedule of noise variances: 1 to [`MAX_NUM_STEPS`] of them, each in (0, 1) (a zero
    /// makes the first posterior variance 0/0, a one divides the reverse step by zero).
    pub fn from_betas(betas: Vec<f32>) -> Result<Self, DiffusionError> {
        if !(1..=MAX_NUM_STEPS).contains(&betas.len()) {
            return Err(DiffusionError::Config(format!("a schedule needs 1..={MAX_NUM_STEPS} betas, got {}", betas.len())));
        }
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(**b > 0.0 && **b < 1.0)) {
            return Err(DiffusionError::Config(format!("beta {i} is {b}: every beta must be in (0, 1)")));
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        // torch's CPU cumprod accumulates f32 input in f64 and rounds each prefix.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f32> = alphas
            .iter()
            .map(|&a| {
                acc *= a as f64;
                acc as f32
            })
            .collect();
        let mut alphas_cumprod_prev = Vec::with_capacity(betas.len());
        alphas_cumprod_prev.push(1.0f32);
        alphas_cumprod_prev.extend_from_slice(&alphas_cumprod[..alphas_cumprod.len() - 1]);
        let posterior_variance = betas
            .iter()
            .zip(&alphas_cumprod_prev)
            .zip(&alphas_cumprod)
            .map(|((&b, &prev), &acp)| b * (1.0 - prev) / (1.0 - acp))
            .collect();
        Ok(Self {
            alphas_sqrt: alphas.iter().map(|a| a.sqrt()).collect(),
            alphas_cumprod_sqrt: alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            one_minus_alphas_cumprod_sqrt: alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect(),
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
        })
    }

    pub fn num_steps(&self) -> usize {
        self.betas.len()
    }

    pub(crate) fn check_t(&self, t: usize) -> Result<(), DiffusionError> {
        if t >= self.num_steps() {
            return Err(DiffusionError::Timestep { t, num_steps: self.num_steps() });
        }
        Ok(())
    }
}

fn cosine_betas(num_steps: usize, s: f64) -> Vec<f32> {
    let f = |t: f64| (((t / num_steps as f64) + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
    (0..num_steps)
        .map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(0.999) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints_and_monotone() {
        let b = torch_linspace_f32(1e-4, 0.02, 1000);
        assert_eq!(b[0], 1e-4);
        assert_eq!(b[999], 0.02);
        assert!(b.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn posterior_variance_is_zero_at_start_and_below_beta() {
        let s = Schedule::reference();
        assert_eq!(s.posterior_variance[0], 0.0);
        for t in 1..1000 {
            assert!(s.posterior_variance[t] <= s.betas[t]);
            assert!(s.posterior_variance[t] > 0.0);
        }
    }

    #[test]
    fn cosine_schedule_is_valid() {
        let s = Schedule::new(&ScheduleConfig { num_steps: 1000, beta: BetaSchedule::Cosine { s: 0.008 } }).unwrap();
        assert!(s.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
        assert!(s.alphas_cumprod[999] < 1e-3);
        assert!(s.alphas_cumprod[0] > 0.999);
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(Schedule::new(&ScheduleConfig { num_steps: 1, beta: BetaSchedule::default() }).is_err());
        assert!(Schedule::new(&ScheduleConfig { num_steps: MAX_NUM_STEPS + 1, beta: BetaSchedule::default() }).is_err());
        assert!(Schedule::new(&ScheduleConfig { num_steps: MAX_NUM_STEPS, beta: BetaSchedule::default() }).is_ok());
        let bad = ScheduleConfig { num_steps: 10, beta: BetaSchedule::Linear { start: 0.5, end: 0.1 } };
        assert!(Schedule::new(&bad).is_err());
    }
}
