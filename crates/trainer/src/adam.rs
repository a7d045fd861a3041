//! Adam / AdamW with state that can be saved and restored, as `torch.optim.Adam`.
//!
//! candle-nn's `AdamW` decays weights by 0.01 by default and cannot export its moments, so a
//! resumed run would not match an uninterrupted one. This one keeps the first and second
//! moments per variable (sorted by name), the step count, and bias-corrects as PyTorch does:
//!
//! ```text
//! g  = grad (+ wd * p for Adam's L2 term)        p *= 1 - lr * wd   (AdamW, decoupled)
//! m  = b1 * m + (1 - b1) * g
//! v  = b2 * v + (1 - b2) * g^2
//! p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```

use std::collections::HashMap;

use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use crate::TrainError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay instead of Adam's L2 term.
    pub decoupled: bool,
}

impl Default for AdamParams {
    /// `torch.optim.Adam()` defaults except the learning rate (the reference's 1e-4).
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

/// The optimizer over a fixed, name-sorted list of variables.
pub struct Adam {
    pub params: AdamParams,
    names: Vec<String>,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far (PyTorch's `state['step']`).
    step: u64,
}

impl Adam {
    /// `vars` in any order; they are sorted by name (the state's canonical order).
    pub fn new(vars: Vec<(String, Var)>, params: AdamParams) -> Result<Self, TrainError> {
        let p = &params;
        let ok = p.lr.is_finite() && p.lr >= 0.0
            && (0.0..1.0).contains(&p.beta1)
            && (0.0..1.0).contains(&p.beta2)
            && p.eps.is_finite() && p.eps > 0.0
            && p.weight_decay.is_finite() && p.weight_decay >= 0.0;
        if !ok {
            return Err(TrainError::Invalid(format!(
                "Adam: lr must be finite and >= 0, betas in [0, 1), eps finite and > 0, weight_decay finite and >= 0; got {p:?}"
            )));
        }
        let mut vars = vars;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut names = Vec::with_capacity(vars.len());
        let mut vs = Vec::with_capacity(vars.len());
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if var.dtype() != DType::F32 {
                return Err(TrainError::Invalid(format!("Adam: variable {name} is {:?}, expected f32", var.dtype())));
            }
            m.push(var.as_tensor().zeros_like()?);
            v.push(var.as_tensor().zeros_like()?);
            names.push(name);
            vs.push(var);
        }
        Ok(Self { params, names, vars: vs, m, v, step: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The gradient of every variable (zeros for a variable the loss does not reach).
    pub fn gradients(&self, grads: &GradStore) -> Result<Vec<Tensor>, TrainError> {
        self.vars
            .iter()
            .map(|var| match grads.get(var.as_tensor()) {
                // Detached: a variable's gradient can be a graph node (a matmul's weight gradient
                // is computed from the tracked activation), which would keep that step's whole
                // forward graph alive for as long as the gradient lives.
                Some(g) => Ok(g.detach()),
                None => Ok(var.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// One update with the given gradients (same order as [`Adam::vars`]) and learning rate.
    pub fn step_with(&mut self, grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        self.step_full(grads, lr, 1.0, None)
    }

    /// One update with the gradients scaled by `grad_scale` (clipping: [`clip_scale`]), then the
    /// EMA copies (same order as [`Adam::vars`]) moved towards the new values:
    /// `e = decay e + (1 - decay) p`. On CUDA all of it is one pass over each variable, a few
    /// launches for all of them (`adam_cuda`); elsewhere, one variable at a time.
    pub fn step_full(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64, ema: Option<(&mut [Tensor], f64)>) -> Result<(), TrainError> {
        self.check_lengths(grads, ema.as_ref().map(|(e, _)| e.len()))?;
        #[cfg(feature = "cuda")]
        if self.step_cuda(grads, lr, grad_scale, ema.as_ref().map(|(e, d)| (&**e, *d)), None)? {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if self.vars.first().and_then(|v| crate::adam_cuda::device_of(v.as_tensor())).is_some() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("Adam on CUDA: a tensor is not contiguous f32 on the device; using candle's ops (slower)"));
        }
        let AdamParams { beta1: b1, beta2: b2, eps, weight_decay: wd, decoupled, .. } = self.params;
        let (step_size, bias2_sqrt) = self.bias_corrections(lr);
        self.step += 1;
        for (i, grad) in grads.iter().enumerate() {
            // The moments outlive the step: computed from a tracked gradient they would record it
            // as their input, and each step's moments would chain onto the previous ones.
            // The same for the weight-decay term, which reads the variable.
            let mut grad = grad.detach();
            if grad_scale != 1.0 {
                grad = grad.affine(grad_scale, 0.0)?;
            }
            let grad = &grad;
            let p = &self.vars[i].as_tensor().detach();
            if p.elem_count() == 0 {
                // Nothing to update (and candle's ops may hand an empty tensor back as it is,
                // which `Var::set` refuses).
                continue;
            }
            if in_place(p) && wd == 0.0 && p.is_contiguous() {
                // In place, one pass per state tensor: the composite below allocates ~8
                // parameter-sized temporaries per variable.
                let g = grad.to_dtype(DType::F32)?.contiguous()?;
                self.m[i].inplace_op2(&g, &MomentUpdate::new(b1, false))?;
                self.v[i].inplace_op2(&g, &MomentUpdate::new(b2, true))?;
                let update = ParamUpdate { step_size: step_size as f32, bias2_sqrt: bias2_sqrt as f32, eps: eps as f32 };
                p.inplace_op3(&self.m[i], &self.v[i], &update)?;
                continue;
            }
            let mut g = grad.clone();
            if wd != 0.0 && !decoupled {
                g = g.add(&p.affine(wd, 0.0)?)?;
            }
            let m = self.m[i].affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?;
            let v = self.v[i].affine(b2, 0.0)?.add(&g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, eps)?;
            let mut new_p = p.clone();
            if wd != 0.0 && decoupled {
                new_p = new_p.affine(1.0 - lr * wd, 0.0)?;
            }
            let new_p = new_p.sub(&m.div(&denom)?.affine(step_size, 0.0)?)?;
            self.vars[i].set(&new_p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        if let Some((ema, d)) = ema {
            for (e, v) in ema.iter_mut().zip(&self.vars) {
                // From the detached variable: computed from the variable itself, the new EMA would
                // record the previous one as its input, and the chain grew by three
                // parameter-sized tensors a step (an OOM kill after ~1400 steps of `mini64`).
                *e = e.affine(d, 0.0)?.add(&v.as_tensor().detach().affine(1.0 - d, 0.0)?)?;
            }
        }
        Ok(())
    }

    /// The next update's step size `lr / (1 - b1^t)` and `sqrt(1 - b2^t)`, as PyTorch's Adam.
    fn bias_corrections(&self, lr: f64) -> (f64, f64) {
        let t = (self.step + 1) as i32;
        (lr / (1.0 - self.params.beta1.powi(t)), (1.0 - self.params.beta2.powi(t)).sqrt())
    }

    fn check_lengths(&self, grads: &[Tensor], ema: Option<usize>) -> Result<(), TrainError> {
        if grads.len() != self.vars.len() {
            return Err(TrainError::Invalid(format!("Adam: {} gradients for {} variables", grads.len(), self.vars.len())));
        }
        match ema {
            Some(n) if n != self.vars.len() => Err(TrainError::Invalid(format!("Adam: {n} EMA copies for {} variables", self.vars.len()))),
            _ => Ok(()),
        }
    }

    /// The step on CUDA by the multi-tensor kernels (`adam_cuda`), behind `gate` when given;
    /// `false`, touching nothing, when they cannot take it (another device, a tensor that is not
    /// contiguous f32, `TRAINER_CUDA_ADAM=candle`).
    #[cfg(feature = "cuda")]
    fn step_cuda(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64, ema: Option<(&[Tensor], f64)>, gate: Option<&crate::adam_cuda::Gate>) -> Result<bool, TrainError> {
        let Some(dev) = self.vars.first().and_then(|v| crate::adam_cuda::device_of(v.as_tensor())) else { return Ok(false) };
        let AdamParams { beta1: b1, beta2: b2, eps, weight_decay: wd, decoupled, .. } = self.params;
        let (step_size, bias2_sqrt) = self.bias_corrections(lr);
        let grads = grads.iter().map(|g| g.detach().to_dtype(DType::F32)?.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
        let p: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let s = crate::adam_cuda::StepScalars {
            b1: b1 as f32,
            r1: (1.0 - b1) as f32,
            b2: b2 as f32,
            r2: (1.0 - b2) as f32,
            step_size: step_size as f32,
            bias2_sqrt: bias2_sqrt as f32,
            eps: eps as f32,
            grad_scale: grad_scale as f32,
            wd_l2: if decoupled { 0.0 } else { wd as f32 },
            p_mul: if decoupled { (1.0 - lr * wd) as f32 } else { 1.0 },
            ema_decay: ema.map_or(0.0, |(_, d)| d as f32),
            ema_rest: ema.map_or(1.0, |(_, d)| (1.0 - d) as f32),
            gate: gate.map_or(0, |g| g.address(&dev)),
        };
        if crate::adam_cuda::step(&dev, &p, &grads, &self.m, &self.v, ema.map(|(e, _)| e), &s)? {
            self.step += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// [`Adam::step_full`] on CUDA, queued behind `gate` ([`crate::adam_cuda::Gate::set`]):
    /// the device skips the update when the step's loss or gradient norm is not finite and
    /// applies the clipping scale itself, so the host need not wait for either before the next
    /// step is queued. `false`, touching nothing, when the CUDA kernels cannot take the step (the
    /// caller then checks on the host and calls `step_full`). The step is counted:
    /// [`Adam::uncount_step`] takes it back when the gate turns out to have skipped it.
    #[cfg(feature = "cuda")]
    pub(crate) fn step_gated(&mut self, grads: &[Tensor], lr: f64, gate: &crate::adam_cuda::Gate, ema: Option<(&[Tensor], f64)>) -> Result<bool, TrainError> {
        self.check_lengths(grads, ema.map(|(e, _)| e.len()))?;
        self.step_cuda(grads, lr, 1.0, ema, Some(gate))
    }

    /// Takes back the count of a gated step the device skipped ([`Adam::step_gated`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn uncount_step(&mut self) {
        self.step = self.step.saturating_sub(1);
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`), for a safetensors file. They are
    /// copies: the live moments are updated in place.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut out = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            for (key, t) in [(format!("m.{name}"), &self.m[i]), (format!("v.{name}"), &self.v[i])] {
                out.insert(key, t.copy()?);
            }
        }
        Ok(out)
    }

    /// Restores the moments and step count saved by [`Adam::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<(), TrainError> {
        for (i, name) in self.names.iter().enumerate() {
            let dev = self.vars[i].device();
            for (prefix, slot) in [("m.", &mut self.m[i]), ("v.", &mut self.v[i])] {
                let key = format!("{prefix}{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::Checkpoint(format!("optimizer state has no '{key}'")))?;
                if t.dims() != slot.dims() {
                    return Err(TrainError::Checkpoint(format!(
                        "optimizer state '{key}' has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                // A private copy: the moments are updated in place.
                *slot = t.to_dtype(DType::F32)?.to_device(dev)?.copy()?;
            }
        }
        if tensors.len() != 2 * self.names.len() {
            return Err(TrainError::Checkpoint(format!(
                "optimizer state has {} tensors, expected {}",
                tensors.len(),
                2 * self.names.len()
            )));
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients (as `torch.nn.utils.clip_grad_norm_` computes it). On
/// CUDA, a few launches for all of them (`adam_cuda`), accumulated in double.
pub fn global_norm(grads: &[Tensor]) -> Result<f64, TrainError> {
    #[cfg(feature = "cuda")]
    if let Some(dev) = grads.first().and_then(crate::adam_cuda::device_of) {
        if let Some(norm) = crate::adam_cuda::global_norm(&dev, grads)? {
            return Ok(norm);
        }
    }
    let mut acc: Option<Tensor> = None;
    for g in grads {
        let s = g.sqr()?.sum_all()?;
        acc = Some(match acc {
            None => s,
            Some(a) => a.add(&s)?,
        });
    }
    Ok(match acc {
        None => 0.0,
        Some(a) => (a.to_dtype(DType::F64)?.to_scalar::<f64>()?).sqrt(),
    })
}

/// For the GPU self-test: what two reads of the device's update gate gave, the second queued
/// behind long work (`adam_cuda::gate_read_waits`); `None` without CUDA.
pub fn cuda_gate_read_waits(dev: &candle_core::Device) -> Result<Option<[(f32, f64); 2]>, TrainError> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = dev {
        return Ok(Some(crate::adam_cuda::gate_read_waits(d)?));
    }
    let _ = dev;
    Ok(None)
}

/// (optimizer steps, gradient norms) done by the CUDA multi-tensor kernels in this process
/// (always 0 without the `cuda` feature): a CUDA run can check it did not fall back.
pub fn cuda_kernel_use() -> (u64, u64) {
    #[cfg(feature = "cuda")]
    return crate::adam_cuda::kernel_use();
    #[cfg(not(feature = "cuda"))]
    (0, 0)
}

/// The factor that brings gradients of global norm `norm` to at most `max_norm` (PyTorch's
/// `clip_coef = max_norm / (norm + 1e-6)`, applied when below 1): 1 when they are within it.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    coef.min(1.0)
}

/// The learning rate at (0-based) step `step` with linear warm-up over `warmup` steps.
pub fn warmup_lr(lr: f64, step: u64, warmup: u64) -> f64 {
    if warmup == 0 {
        lr
    } else {
        lr * ((step + 1) as f64 / warmup as f64).min(1.0)
    }
}

/// Whether the per-variable in-place update ops run on `p`'s device: the CPU (CUDA updates all
/// variables at once, in `adam_cuda`).
fn in_place(p: &Tensor) -> bool {
    p.device().is_cpu()
}

fn contiguous_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("adam: non-contiguous operand".into()))?;
    Ok(&data[a..b])
}

fn contiguous_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("adam: non-contiguous state".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adam: state is not f32"),
    }
}

/// `m = beta m + (1 - beta) g` (or `g^2` for the second moment), in place.
struct MomentUpdate {
    beta: f32,
    /// `1 - beta` in f64, then rounded, as PyTorch passes it to its kernels (in f32,
    /// `1 - 0.999` is 1.3e-5 off, and `1 - 0.9999` 1.7e-4), and as the composite path has it.
    rest: f32,
    square: bool,
}

impl MomentUpdate {
    fn new(beta: f64, square: bool) -> Self {
        Self { beta: beta as f32, rest: (1.0 - beta) as f32, square }
    }
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let g = contiguous_slice(gs, gl)?;
        let m = contiguous_slice_mut(dst, dst_l)?;
        let (beta, rest) = (self.beta, self.rest);
        if self.square {
            m.iter_mut().zip(g).for_each(|(m, &g)| *m = beta * *m + rest * (g * g));
        } else {
            m.iter_mut().zip(g).for_each(|(m, &g)| *m = beta * *m + rest * g);
        }
        Ok(())
    }
}

/// `p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, in place (torch's `addcdiv_`).
struct ParamUpdate {
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, ms: &CpuStorage, ml: &Layout, vs: &CpuStorage, vl: &Layout) -> candle_core::Result<()> {
        let m = contiguous_slice(ms, ml)?;
        let v = contiguous_slice(vs, vl)?;
        let p = contiguous_slice_mut(dst, dst_l)?;
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p -= self.step_size * m / (v.sqrt() / self.bias2_sqrt + self.eps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(vals: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(vals, &Device::Cpu).unwrap()).unwrap()
    }

    /// torch.optim.Adam, written out in f64 from its documented algorithm.
    #[allow(clippy::too_many_arguments)]
    fn torch_adam(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], t: i32, lr: f64, b1: f64, b2: f64, eps: f64) {
        for i in 0..p.len() {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let mhat = m[i] / (1.0 - b1.powi(t));
            let vhat = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }

    #[test]
    fn moments_do_not_keep_the_graph_of_tracked_gradients() {
        for wd in [0.0, 0.01] {
            let w = var(&[0.5, -1.0, 2.0]);
            let mut opt = Adam::new(vec![("w".into(), w.clone())], AdamParams { weight_decay: wd, ..Default::default() }).unwrap();
            for _ in 0..3 {
                // A gradient that is itself a graph node, as a matmul's weight gradient is.
                let g = w.as_tensor().affine(2.0, 0.1).unwrap();
                assert!(g.track_op());
                opt.step_with(&[g], 1e-2).unwrap();
            }
            assert!(!opt.m[0].track_op() && !opt.v[0].track_op(), "weight decay {wd}: the moments chain onto past steps");
        }
    }

    #[test]
    fn parameters_out_of_range_are_refused() {
        let bad = [
            AdamParams { lr: f64::NAN, ..Default::default() },
            AdamParams { lr: -1e-4, ..Default::default() },
            AdamParams { beta1: 2.0, ..Default::default() },
            AdamParams { beta2: -1.0, ..Default::default() },
            AdamParams { eps: -1.0, ..Default::default() },
            AdamParams { eps: 0.0, ..Default::default() },
            AdamParams { weight_decay: f64::NAN, ..Default::default() },
        ];
        for p in bad {
            let e = Adam::new(vec![("w".into(), var(&[1.0]))], p).err().expect("refused").to_string();
            assert!(e.contains("Adam:"), "{e}");
        }
        assert!(Adam::new(vec![("w".into(), var(&[1.0]))], AdamParams::default()).is_ok());
    }

    #[test]
    fn matches_hand_computed_torch_adam_steps() {
        let p0 = [0.5f32, -1.0, 2.0, 0.0];
        let x = var(&p0);
        let mut opt = Adam::new(vec![("w".into(), x.clone())], AdamParams { lr: 0.1, ..Default::default() }).unwrap();
        // First step, written out by hand: m = 0.1 g, v = 0.001 g^2, mhat = g, vhat = g^2,
        // so p -= lr * g / (|g| + eps) = lr * sign(g) (for g != 0) and nothing for g = 0.
        let g1 = [0.2f32, -0.4, 3.0, 0.0];
        opt.step_with(&[Tensor::new(&g1, &Device::Cpu).unwrap()], 0.1).unwrap();
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        let expect1 = [0.5 - 0.1 * 0.2 / (0.2 + 1e-8), -1.0 + 0.1 * 0.4 / (0.4 + 1e-8), 2.0 - 0.1 * 3.0 / (3.0 + 1e-8), 0.0];
        for (a, b) in got.iter().zip(expect1) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got:?} vs {expect1:?}");
        }
        // Then two more steps against the formula in f64 (no weight decay: the zero-gradient
        // coordinate must not move at all).
        let mut p: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
        let gs = [g1, [-0.1, 0.3, 1.0, 0.0], [0.05, 0.05, -2.0, 0.0]];
        for (k, g) in gs.iter().enumerate() {
            let gd: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            torch_adam(&mut p, &mut m, &mut v, &gd, k as i32 + 1, 0.1, 0.9, 0.999, 1e-8);
            if k > 0 {
                opt.step_with(&[Tensor::new(g, &Device::Cpu).unwrap()], 0.1).unwrap();
            }
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&p) {
            assert!((*a as f64 - b).abs() < 1e-5, "{got:?} vs {p:?}");
        }
        assert_eq!(got[3], 0.0, "no weight decay");
        assert_eq!(opt.step_count(), 3);
        // The moments are PyTorch's exp_avg / exp_avg_sq.
        let st = opt.state_tensors().unwrap();
        let m_got = st["m.w"].to_vec1::<f32>().unwrap();
        let v_got = st["v.w"].to_vec1::<f32>().unwrap();
        for i in 0..4 {
            assert!((m_got[i] as f64 - m[i]).abs() < 1e-6);
            assert!((v_got[i] as f64 - v[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let g = |k: f32| Tensor::new(&[0.3f32 * k, -0.2, 0.1], &Device::Cpu).unwrap();
        let a = var(&[1.0, 2.0, 3.0]);
        let mut oa = Adam::new(vec![("a".into(), a.clone())], AdamParams::default()).unwrap();
        for k in 0..3 {
            oa.step_with(&[g(k as f32)], 1e-2).unwrap();
        }
        let b = var(&a.as_tensor().to_vec1::<f32>().unwrap());
        let mut ob = Adam::new(vec![("a".into(), b.clone())], AdamParams::default()).unwrap();
        ob.load_state(&oa.state_tensors().unwrap(), oa.step_count()).unwrap();
        oa.step_with(&[g(5.0)], 1e-2).unwrap();
        ob.step_with(&[g(5.0)], 1e-2).unwrap();
        assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), b.as_tensor().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn weight_decay_variants() {
        let zero = Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap();
        // AdamW: a zero gradient still shrinks p by lr * wd * p.
        let a = var(&[1.0, -2.0]);
        let mut o = Adam::new(vec![("a".into(), a.clone())], AdamParams { weight_decay: 0.1, decoupled: true, ..Default::default() }).unwrap();
        o.step_with(std::slice::from_ref(&zero), 0.5).unwrap();
        let got = a.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - 0.95).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6, "{got:?}");
        // Adam + L2: g = wd * p, so the first step moves by lr * sign(p).
        let b = var(&[1.0, -2.0]);
        let mut o = Adam::new(vec![("b".into(), b.clone())], AdamParams { weight_decay: 0.1, ..Default::default() }).unwrap();
        o.step_with(&[zero], 0.5).unwrap();
        let got = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - 0.5).abs() < 1e-5 && (got[1] + 1.5).abs() < 1e-5, "{got:?}");
    }

    #[test]
    fn full_step_scales_the_gradients_then_moves_the_ema() {
        for params in [AdamParams::default(), AdamParams { weight_decay: 0.1, ..Default::default() }] {
            let g = Tensor::new(&[0.3f32, -0.2, 0.0, 4.0], &Device::Cpu).unwrap();
            let (a, b) = (var(&[1.0, 2.0, -3.0, 0.5]), var(&[1.0, 2.0, -3.0, 0.5]));
            let mut oa = Adam::new(vec![("a".into(), a.clone())], params).unwrap();
            let mut ob = Adam::new(vec![("b".into(), b.clone())], params).unwrap();
            let mut ema = vec![Tensor::new(&[0f32, 1.0, 2.0, 3.0], &Device::Cpu).unwrap()];
            for k in 0..3 {
                let e0 = ema[0].to_vec1::<f32>().unwrap();
                oa.step_full(std::slice::from_ref(&g), 1e-2, 0.25, Some((ema.as_mut_slice(), 0.9))).unwrap();
                ob.step_with(&[g.affine(0.25, 0.0).unwrap()], 1e-2).unwrap();
                let (pa, pb) = (a.as_tensor().to_vec1::<f32>().unwrap(), b.as_tensor().to_vec1::<f32>().unwrap());
                assert_eq!(pa, pb, "step {k}, weight decay {}", params.weight_decay);
                let want: Vec<f32> = e0.iter().zip(&pa).map(|(e, p)| e * 0.9 + p * 0.1).collect();
                for (got, want) in ema[0].to_vec1::<f32>().unwrap().iter().zip(&want) {
                    assert!((got - want).abs() < 1e-6, "EMA {got} against {want}");
                }
            }
            let mut short: Vec<Tensor> = vec![];
            assert!(oa.step_full(std::slice::from_ref(&g), 1e-2, 1.0, Some((short.as_mut_slice(), 0.9))).is_err());
        }
    }

    #[test]
    fn clipping_and_norm_and_warmup() {
        let gs = vec![Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[4f32], &Device::Cpu).unwrap()];
        let n = global_norm(&gs).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let scaled: Vec<Tensor> = gs.iter().map(|g| g.affine(clip_scale(n, 1.0), 0.0).unwrap()).collect();
        assert!((global_norm(&scaled).unwrap() - 1.0).abs() < 1e-5);
        assert_eq!(clip_scale(1.0, 10.0), 1.0);
        assert_eq!(warmup_lr(1e-3, 0, 0), 1e-3);
        assert!((warmup_lr(1e-3, 0, 10) - 1e-4).abs() < 1e-12);
        assert_eq!(warmup_lr(1e-3, 9, 10), 1e-3);
        assert_eq!(warmup_lr(1e-3, 50, 10), 1e-3);
    }
}
