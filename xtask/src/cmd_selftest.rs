//! `cargo xtask self-test`: checks this build on a device against the PyTorch fixtures
//! (forward pass, time embedding, middle activations, both reverse steps, loss, gradients).
//! Meant for a GPU machine: the same numbers the CPU test suite checks, through the device path,
//! then each convolution pass of the device (cuDNN with the `cudnn` feature) against the CPU
//! kernels, shape by shape, in exact f32, TF32 and bf16, GroupNorm (+Hardswish, +mask) and the
//! attention softmax and the x2 upsampling in f32 and bf16, and three Adam steps (with the
//! gradient norm, clipping and EMA) against the CPU's, and the host's draws copied to the
//! device each step, bit for bit and without waiting for queued work. `--only` picks groups of
//! checks; one, `cuda-graph` (sampling and training steps replayed from CUDA graphs), runs only
//! when named.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use diffusion::{FinalStepNoise, Schedule, Variance};
use unet::{Mode, UNet};
use crate::common::out;

#[derive(clap::Args)]
pub struct SelfTestArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Folder with seed_tiny.ckpt and seed_tiny_io.safetensors.
    #[arg(long, default_value = "crates/unet/tests/fixtures")]
    fixtures: PathBuf,
    /// Largest absolute difference accepted (f32 on a GPU: TF32 is off for these checks, 1e-3
    /// leaves room for reduction order).
    #[arg(long, default_value_t = 1e-3, value_parser = tolerance)]
    tol: f32,
    /// Only these groups of checks, comma-separated: fixtures, micro-batch, conv, fused, adam,
    /// upload (the default: all of those), cuda-graph (sampling and training steps replayed from CUDA
    /// graphs against plain calls; only when named: it is new and untried on a GPU).
    #[arg(long, value_delimiter = ',', value_parser = ["fixtures", "micro-batch", "conv", "fused", "adam", "upload", "cuda-graph"])]
    only: Vec<String>,
}

/// A finite tolerance above 0: `inf` would pass any build, NaN or a negative one fail every check.
fn tolerance(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if t.is_finite() && t > 0.0 => Ok(t),
        Ok(t) => Err(format!("must be a finite number > 0, got {t}")),
        Err(e) => Err(e.to_string()),
    }
}

struct Checks {
    failures: usize,
}

impl Checks {
    fn check(&mut self, name: &str, d: f32, tol: f32) {
        let ok = d <= tol;
        out!("{:<44} max |diff| {:>10.3e}  (tol {:.0e})  {}", name, d, tol, if ok { "ok" } else { "FAIL" });
        if !ok {
            self.failures += 1;
        }
    }
}

/// The passes launched from kept cuDNN descriptors, and the shapes whose kept launch failed,
/// where those are in use (a cuDNN build, neither `UNET_CUDA_CONV=candle` nor
/// `UNET_CUDNN_PREPARED=0`).
fn kept_cudnn_launches() -> Option<(usize, usize)> {
    #[cfg(feature = "cudnn")]
    if unet::conv_cudnn::enabled() && unet::conv_cudnn::prepared_enabled() {
        return Some(unet::conv_cudnn::prepared_launches());
    }
    None
}

/// Exact f32 or TF32 for the device's f32 convolutions (cuDNN builds only).
fn set_tf32(_on: bool) {
    #[cfg(feature = "cudnn")]
    unet::conv_cudnn::set_tf32(_on);
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    if a.dims() != b.dims() {
        bail!("our result has shape {:?} but the fixture's {:?}: the fixtures folder's files are not seed_tiny's pair", a.dims(), b.dims());
    }
    Ok(a.sub(&b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

pub fn run(a: SelfTestArgs) -> Result<()> {
    let dev = crate::common::parse_device(&a.device)?;
    let fixtures = crate::common::repo_path(&a.fixtures);
    // The default falls back to the source tree this binary was built from: say which was used.
    out!("fixtures: {}", fixtures.display());
    let ckpt = fixtures.join("seed_tiny.ckpt");
    let weights = unet::lightning::import(&ckpt).with_context(|| format!("loading {} (--fixtures names the folder)", ckpt.display()))?;
    let io_path = fixtures.join("seed_tiny_io.safetensors");
    let io: HashMap<String, Tensor> = candle_core::safetensors::load(&io_path, &dev).with_context(|| format!("loading {}", io_path.display()))?;
    let schedule = Schedule::reference();
    let mut checks = Checks { failures: 0 };
    set_tf32(false);
    let mut check = |name: &str, d: f32, tol: f32| checks.check(name, d, tol);
    let want = |group: &str| if a.only.is_empty() { group != "cuda-graph" } else { a.only.iter().any(|g| g == group) };

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
    if want("fixtures") {
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
        let released_before = candle_core::backprop::released_saved().0;
        let grads = loss.backward()?;
        if candle_core::backprop::releases_saved_values() {
            // The gradients below pass either way: the count says the pass released what it had
            // read (the vendored candle's `SavedRelease`; `UNET_RELEASE_SAVED=0` keeps it all).
            let released = candle_core::backprop::released_saved().0 - released_before;
            out!("saved values released by the fixture's backward pass: {released} buffers");
            check("saved values released by the backward pass", if released > 0 { 0.0 } else { f32::INFINITY }, 0.0);
        }
        for key in ["head.weight", "tail.2.weight", "time_embedding.time_embedding.1.weight", "middle_blocks.0.attn.proj_q.weight"] {
            let g = grads.get(vars[key].as_tensor()).with_context(|| format!("no gradient for {key}"))?;
            let expect = &io[&format!("grad.{key}")];
            let scale: f32 = expect.abs()?.flatten_all()?.max(0)?.to_device(&Device::Cpu)?.to_scalar()?;
            check(&format!("grad {key} (relative)"), max_diff(g, expect)? / scale, a.tol);
        }
    }

    if want("micro-batch") {
        let (loss_d, grad_d) = micro_batch_against_whole(&dev, trainer::Precision::F32)?;
        check("micro-batch loss (relative)", loss_d, a.tol);
        check("micro-batch gradients (relative)", grad_d, a.tol);
        if !dev.is_cpu() {
            // The parts' bf16 casts are made once and back-propagated through once per part. Each
            // batch size may get its own convolution algorithms, which round bf16 differently.
            let (loss_d, grad_d) = micro_batch_against_whole(&dev, trainer::Precision::Bf16)?;
            check("micro-batch bf16 loss (relative)", loss_d, 5e-2);
            check("micro-batch bf16 gradients (relative)", grad_d, 5e-2);
        }
    }

    if !dev.is_cpu() && want("fixtures") {
        // The default for training and sampling: TF32 convolutions, as PyTorch's. Its rounding
        // (10-bit mantissa products) is looser than the 1e-3 above.
        set_tf32(true);
        let eps_tf32 = model.forward_t(&io["x"], &t, Mode::Eval)?;
        check("forward eps (TF32 convolutions)", max_diff(&eps_tf32, &io["eps"])?, 2e-2);
    }
    // On the CPU these would compare the CPU kernels with themselves.
    let conv_modes: &[(&str, DType, bool, f32)] = if dev.is_cpu() || !want("conv") { &[] } else { &[("f32", DType::F32, false, 1e-4), ("tf32", DType::F32, true, 1e-2), ("bf16", DType::BF16, true, 5e-2)] };
    for &(label, dtype, tf32, tol) in conv_modes {
        set_tf32(tf32);
        for (name, d) in conv_against_cpu(&dev, dtype)? {
            check(&format!("conv {label} {name}"), d, tol);
        }
    }
    if let (false, Some((launches, failed))) = (conv_modes.is_empty(), kept_cudnn_launches()) {
        // A kept launch that fails goes the full way, so the results above would pass without
        // the kept path ever running: infinite if none ran, else the shapes whose launch failed.
        check("conv passes from kept cuDNN descriptors (failed)", if launches > 0 { failed as f32 } else { f32::INFINITY }, 0.0);
    }
    set_tf32(true);
    if !dev.is_cpu() && want("fused") {
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
            for (name, d) in fused_ops_against_cpu(&dev, dtype)? {
                check(&format!("{name} {dtype:?}"), d, tol);
            }
        }
    }
    if !dev.is_cpu() && want("fused") {
        let before = unet::conv::in_place_sums();
        // Not 0 in f32: cuDNN's weight-gradient algorithms may sum in another order each call.
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
            for (name, d) in sums_into_conv_outputs(&dev, dtype)? {
                check(&format!("{name} {dtype:?}"), d, tol);
            }
        }
        if unet::conv::in_place_sums_enabled() {
            // Falling back to `add` gives the same results: the counts say which path ran.
            let after = unet::conv::in_place_sums();
            let (done, elsewhere) = (after.0 - before.0, after.1 - before.1);
            out!("sums into convolution outputs: {done} in place, {elsewhere} through add");
            check("sums into convolution outputs not in place", if done > 0 { elsewhere as f32 } else { f32::INFINITY }, 0.0);
        }
    }
    if !dev.is_cpu() && want("adam") {
        for (name, d) in adam_against_cpu(&dev)? {
            check(&format!("adam {name}"), d, 1e-4);
        }
        for (name, d, tol) in pipelined_against_plain(&dev)? {
            check(&format!("pipelined steps: {name}"), d, tol);
        }
    }
    if !dev.is_cpu() && want("upload") {
        for (name, d) in uploads_against_cpu(&dev)? {
            check(&format!("upload {name}"), d, 0.0);
        }
    }
    if want("cuda-graph") {
        // f32 in two captures (4 images at batch 3: a chunk of 3, then of 1); a bf16 model in one.
        let half: HashMap<String, Tensor> = weights.select(false).into_iter().map(|(k, v)| Ok((k, v.to_device(&dev)?.to_dtype(DType::BF16)?))).collect::<Result<_>>()?;
        let model_bf16 = UNet::new(VarBuilder::from_tensors(half, DType::BF16, &dev), &weights.config)?;
        for (label, m, batch, tol) in [("f32, two shapes", &model, 3, 1e-4f32), ("bf16", &model_bf16, 4, 1e-3)] {
            let name = format!("sampling from CUDA graphs ({label})");
            match cuda_graph_sampling(m, &schedule, &dev, batch)? {
                Ok(d) => check(&name, d, tol),
                Err(why) => {
                    out!("{name}: {why}");
                    check(&name, f32::INFINITY, tol);
                }
            }
        }
        // Training steps: f32 whole, f32 in micro-batches of 2 (one capture holds both parts),
        // bf16 whole.
        for (label, precision, micro, tol) in [
            ("f32", trainer::Precision::F32, None, 1e-4f32),
            ("f32, micro-batches of 2", trainer::Precision::F32, Some(2), 1e-4),
            ("bf16", trainer::Precision::Bf16, None, 2e-3),
        ] {
            let name = format!("training steps from CUDA graphs ({label})");
            match cuda_graph_training(&dev, precision, micro)? {
                Ok((loss_d, weight_d)) => {
                    check(&format!("{name}: losses"), loss_d, tol);
                    check(&format!("{name}: weights"), weight_d, 10.0 * tol);
                }
                Err(why) => {
                    out!("{name}: {why}");
                    check(&name, f32::INFINITY, tol);
                }
            }
        }
    }
    let failures = checks.failures;
    if failures > 0 {
        bail!("{failures} check(s) failed on {}", a.device);
    }
    out!("self-test: all checks passed on {}", a.device);
    Ok(())
}

/// Four training steps of the tiny model (dropout 0.3, so that a seed the graph did not see
/// change would show) on new images each time, three batches of 4 then one of 3, at
/// `precision`, in parts of `micro`, plain and replayed from CUDA graphs from the same start and
/// draws (the graphs' steps pipelined as training takes them, when the pipeline is on):
/// `Ok((losses, weights))`, each the largest difference relative to the largest value, or
/// `Err(why)` when the graphs did not serve every step.
fn cuda_graph_training(dev: &Device, precision: trainer::Precision, micro: Option<usize>) -> Result<std::result::Result<(f32, f32), String>> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let mut cfg = trainer::RunConfig::reference();
        cfg.unet = unet::UNetConfig::tiny();
        cfg.unet.dropout = 0.3;
        cfg.train.precision = precision;
        cfg.train.batch_size = 4;
        cfg.train.micro_batch_size = micro;
        let s = cfg.unet.image_size;
        // New images every step (a graph that kept its first ones would show), and a last,
        // smaller batch (a second capture, as an epoch's last batch makes).
        let mut images = diffusion::NoiseRng::new(1);
        let batches = [4, 4, 4, 3].iter().map(|&b| images.randn((b, 3, s, s), &Device::Cpu)?.tanh()?.to_device(dev)).collect::<candle_core::Result<Vec<_>>>()?;
        let run = |graph: bool| -> Result<(Vec<f32>, Vec<Tensor>, trainer::CudaGraphReport)> {
            let mut engine = trainer::StepEngine::new(&cfg, dev)?;
            engine.set_cuda_graph(graph);
            let mut rng = diffusion::NoiseRng::new(3);
            let mut losses = Vec::new();
            if graph {
                // As training takes them (the next step's graph launched before the last loss is read).
                engine.train_steps(&batches, &mut rng, |_, o| {
                    losses.push(o.loss);
                    Ok(())
                })?;
            } else {
                for x0 in &batches {
                    losses.push(engine.train_step(x0, &mut rng)?.loss);
                }
            }
            let weights = engine.opt.vars().iter().map(|v| v.as_tensor().to_device(&Device::Cpu)).collect::<candle_core::Result<_>>()?;
            Ok((losses, weights, engine.cuda_graph_report()))
        };
        let (plain_losses, plain_weights, _) = run(false)?;
        let (losses, weights, report) = run(true)?;
        if let Some(why) = report.failure {
            return Ok(Err(format!("went back to plain steps: {why}")));
        }
        if report.launches != batches.len() || report.captures != 2 {
            return Ok(Err(format!("{} graph launches and {} captures for 4 steps of two shapes", report.launches, report.captures)));
        }
        let largest_loss = plain_losses.iter().fold(0f32, |m, l| m.max(l.abs())).max(f32::MIN_POSITIVE);
        let loss_d = plain_losses.iter().zip(&losses).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / largest_loss;
        let mut largest = 0f32;
        for w in &plain_weights {
            largest = largest.max(w.abs()?.flatten_all()?.max(0)?.to_scalar()?);
        }
        let mut weight_d = 0f32;
        for (a, b) in plain_weights.iter().zip(&weights) {
            weight_d = weight_d.max(max_diff(a, b)?);
        }
        return Ok(Ok((loss_d, weight_d / largest.max(f32::MIN_POSITIVE))));
    }
    let _ = (precision, micro);
    Ok(Err(format!("CUDA graphs need a CUDA build and device; this is {dev:?}")))
}

/// Four images of `model` sampled with 5 DDIM steps, `batch` at a time, by plain network calls
/// and replayed from CUDA graphs: `Ok(largest difference)`, or `Err(why)` when the graphs did
/// not serve every call (a failed capture, or no CUDA).
fn cuda_graph_sampling(model: &UNet, schedule: &Schedule, dev: &Device, batch: usize) -> Result<std::result::Result<f32, String>> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let cfg = model.config();
        let shape = (cfg.image_channels, cfg.image_size, cfg.image_size);
        let kind = diffusion::SamplerKind::Ddim { steps: 5, eta: 0.0 };
        let x_t = diffusion::NoiseRng::new(5).randn((4, shape.0, shape.1, shape.2), dev)?;
        let plain = sampler::Sampler::new(sampler::EvalModel(model), schedule, shape, dev).batch(batch).sample_from(&x_t, &kind, 7, |_, _| {})?;
        let graphed = sampler::cuda_graph::GraphedModel::new(model);
        let replayed = sampler::Sampler::new(&graphed, schedule, shape, dev).batch(batch).sample_from(&x_t, &kind, 7, |_, _| {})?;
        if let Some(why) = graphed.failure() {
            return Ok(Err(format!("went back to plain calls: {why}")));
        }
        let calls = 5 * 4usize.div_ceil(batch);
        if graphed.launches() != calls {
            return Ok(Err(format!("{} graph launches for {calls} network calls", graphed.launches())));
        }
        return Ok(Ok(max_diff(&plain, &replayed)?));
    }
    let _ = (model, schedule, batch);
    Ok(Err(format!("CUDA graphs need a CUDA build and device; this is {dev:?}")))
}

/// The values drawn on the host and uploaded every step (training noise and timesteps, the
/// sampler's per-image noise) against the same draws on the CPU, bit for bit. Then, on CUDA,
/// more noise uploads than there are kept buffers, queued behind ~200 large matmuls: every one
/// through the kept buffers, the first returning while that work still runs, a later one waiting
/// for a copy still queued behind it (with `DIFFUSION_UPLOAD=pageable`, the driver's copies, only
/// printed), and each holding its own draws: a kept page-locked buffer written again before its
/// copy ran would not.
fn uploads_against_cpu(dev: &Device) -> Result<Vec<(String, f32)>> {
    let cpu = Device::Cpu;
    let noise = |seed: u64, d: &Device| diffusion::NoiseRng::new(seed).randn((128, 3, 64, 64), d);
    let small = |d: &Device| diffusion::NoiseRng::new(2).randn(7, d);
    let steps = |d: &Device| -> candle_core::Result<Tensor> { diffusion::NoiseRng::new(3).timesteps(128, 1000, d)?.1.to_dtype(DType::F32) };
    let streams = |d: &Device| sampler::noise::ImageStreams::new(4, 0..5).randn(&[3, 16, 16], d);
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out = vec![
        ("noise [128, 3, 64, 64]".to_string(), max_diff(&noise(1, dev)?, &noise(1, &cpu)?)?),
        ("noise [7]".to_string(), max_diff(&small(dev)?, &small(&cpu)?)?),
        ("timesteps [128]".to_string(), max_diff(&steps(dev)?, &steps(&cpu)?)?),
        ("per-image noise [5, 3, 16, 16]".to_string(), max_diff(&streams(dev)?, &streams(&cpu)?)?),
    ];
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = dev {
        use candle_core::cuda_backend::WrapErr;
        use diffusion::upload::{pinned_counts, pinned_uploads, KEPT_BUFFERS};
        // Large buffers first, their copies done, so that the uploads behind the work below find
        // buffers that fit and never grow one.
        let warm = (0..KEPT_BUFFERS as u64).map(|i| noise(1000 + i, dev)).collect::<candle_core::Result<Vec<_>>>()?;
        dev.synchronize()?;
        drop(warm);
        let (uploads_before, waits_before) = pinned_counts();
        let stream = cd.cuda_stream();
        let queued = stream.context().new_event(None).w()?;
        // Small values, so that the products stay finite (and shrink to zero): ~27 TFLOP, about
        // 0.4 s in plain f32 on an H200.
        let a = Tensor::full(1e-4f32, (4096, 4096), dev)?;
        let mut x = a.clone();
        for _ in 0..200 {
            x = x.matmul(&a)?;
        }
        queued.record(&stream).w()?;
        let clock = std::time::Instant::now();
        let first = noise(100, dev)?;
        let returned_ms = clock.elapsed().as_secs_f64() * 1e3;
        let busy = !queued.is_complete();
        // More uploads than kept buffers: the later ones must wait for a copy still queued
        // behind the work (counted), and then find their buffer's old values gone.
        let mut drawn = vec![first];
        let mut waited_while_busy = false;
        for seed in 101..(101 + KEPT_BUFFERS as u64 + 4) {
            let running = !queued.is_complete();
            let (_, waits) = pinned_counts();
            drawn.push(noise(seed, dev)?);
            waited_while_busy |= running && pinned_counts().1 > waits;
        }
        let all_ms = clock.elapsed().as_secs_f64() * 1e3;
        let (uploads, waits) = pinned_counts();
        out!("upload behind queued work: the first returned after {returned_ms:.1} ms with the work {}; {} after {all_ms:.1} ms, {} of them waiting for a copy ({})",
            if busy { "still running" } else { "done" },
            drawn.len(),
            waits - waits_before,
            if pinned_uploads() { "kept page-locked buffers" } else { "DIFFUSION_UPLOAD=pageable: the driver's copies" });
        if let Some(why) = diffusion::upload::pinned_failure() {
            out!("upload: the kept page-locked buffers were given up: {why}");
        }
        if pinned_uploads() {
            out.push(("uploads not through the kept buffers".to_string(), (drawn.len() as u64).saturating_sub(uploads - uploads_before) as f32));
            out.push(("queued behind work without waiting (0 = yes)".to_string(), if busy { 0.0 } else { 1.0 }));
            out.push(("a running copy waited for, not overwritten (0 = yes)".to_string(), if waited_while_busy { 0.0 } else { 1.0 }));
        }
        let mut worst = 0f32;
        for (seed, got) in (100..).zip(&drawn) {
            worst = worst.max(max_diff(got, &noise(seed, &cpu)?)?);
        }
        out.push((format!("{} noise uploads behind queued work", drawn.len()), worst));
    }
    Ok(out)
}

/// A training step's loss and gradients in micro-batches of 2 and 1 against the whole batch of 5
/// at `precision` (the tiny model with dropout 0.3: on CUDA each part's hashed masks come from a
/// moved key), as the largest difference over the largest value.
fn micro_batch_against_whole(dev: &Device, precision: trainer::Precision) -> Result<(f32, f32)> {
    let mut cfg = trainer::RunConfig::reference();
    cfg.unet = unet::UNetConfig::tiny();
    cfg.unet.dropout = 0.3;
    cfg.train.precision = precision;
    let mut engine = trainer::StepEngine::new(&cfg, dev)?;
    let s = cfg.unet.image_size;
    let x0 = diffusion::NoiseRng::new(1).randn((5, 3, s, s), &Device::Cpu)?.tanh()?.to_device(dev)?;
    let mut step = |micro: Option<usize>| -> Result<(f32, Vec<Tensor>)> {
        engine.cfg.train.micro_batch_size = micro;
        let (loss, grads) = engine.loss_and_gradients(&x0, &mut diffusion::NoiseRng::new(3))?;
        Ok((loss.to_device(&Device::Cpu)?.to_scalar()?, grads))
    };
    let (loss, grads) = step(None)?;
    let mut largest = 0f32;
    for g in &grads {
        largest = largest.max(g.abs()?.flatten_all()?.max(0)?.to_device(&Device::Cpu)?.to_scalar()?);
    }
    let (mut loss_d, mut grad_d) = (0f32, 0f32);
    for micro in [2, 1] {
        let (l, g) = step(Some(micro))?;
        loss_d = loss_d.max((l - loss).abs() / loss.abs().max(f32::MIN_POSITIVE));
        for (a, b) in g.iter().zip(&grads) {
            grad_d = grad_d.max(max_diff(a, b)? / largest.max(f32::MIN_POSITIVE));
        }
    }
    Ok((loss_d, grad_d))
}

/// Each convolution shape of the reference model (batch 4), plus odd sizes, with its bias:
/// forward, input, weight and bias gradients on `dev` in `dtype` against the CPU kernels in f32, as the
/// largest difference over the largest CPU value.
fn conv_against_cpu(dev: &Device, dtype: DType) -> Result<Vec<(String, f32)>> {
    // (C, O, H, W, k, stride, padding)
    let shapes = [
        (3, 128, 64, 64, 3, 1, 1),
        (128, 128, 64, 64, 3, 1, 1),
        (128, 128, 64, 64, 3, 2, 1),
        (128, 256, 16, 16, 3, 1, 1),
        (128, 256, 16, 16, 1, 1, 0),
        (256, 256, 8, 8, 3, 1, 1),
        (5, 7, 9, 11, 3, 1, 1),
        (6, 4, 7, 7, 3, 2, 1),
    ];
    let mut out = Vec::new();
    for (i, &(c, o, h, w, k, stride, padding)) in shapes.iter().enumerate() {
        let cpu = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (4, c, h, w), &cpu)?;
        let wt = (Tensor::randn(0f32, 1., (o, c, k, k), &cpu)? / ((c * k * k) as f64).sqrt())?;
        let (ho, wo) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
        let bias = Tensor::randn(0f32, 0.5, o, &cpu)?;
        let r = Tensor::randn(0f32, 1., (4, o, ho, wo), &cpu)?;
        // The network's module: convolution plus bias (on CUDA the bias is added in place to
        // cuDNN's output, and its gradient is our per-channel sum).
        let run = |d: &Device, dt: DType| -> Result<[Tensor; 4]> {
            let xv = Var::from_tensor(&x.to_device(d)?.to_dtype(dt)?)?;
            let wv = Var::from_tensor(&wt.to_device(d)?.to_dtype(dt)?)?;
            let bv = Var::from_tensor(&bias.to_device(d)?.to_dtype(dt)?)?;
            let tensors = [("weight".to_string(), wv.as_tensor().clone()), ("bias".to_string(), bv.as_tensor().clone())].into();
            let conv = unet::conv::Conv2d::new(VarBuilder::from_tensors(tensors, dt, d), c, o, k, stride, padding)?;
            let y = candle_core::Module::forward(&conv, xv.as_tensor())?;
            let loss = y.to_dtype(DType::F32)?.mul(&r.to_device(d)?)?.sum_all()?;
            let g = loss.backward()?;
            let dx = g.get(xv.as_tensor()).context("no input gradient")?.clone();
            let dw = g.get(wv.as_tensor()).context("no weight gradient")?.clone();
            let db = g.get(bv.as_tensor()).context("no bias gradient")?.clone();
            Ok([y, dx, dw, db])
        };
        let want = run(&cpu, DType::F32)?;
        let got = run(dev, dtype)?;
        // Twice: a (pass, shape)'s first cuDNN call chooses its algorithm, later ones launch
        // it with the descriptors kept from the first (`conv_cudnn::Prepared`).
        let again = run(dev, dtype)?;
        let tag = format!("#{i} {c}->{o} {h}x{w} k{k} s{stride}");
        for (pass, ((g, g2), e)) in ["fwd", "dx", "dw", "db"].iter().zip(got.iter().zip(&again).zip(&want)) {
            let scale: f32 = e.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            let (d1, d2) = (max_diff(g, e)?, max_diff(g2, e)?);
            // (`f32::max` would drop a NaN.)
            let d = if d1.is_nan() || d2.is_nan() { f32::NAN } else { d1.max(d2) };
            out.push((format!("{tag} {pass}"), d / scale.max(1e-12)));
        }
    }
    Ok(out)
}

/// Three optimizer steps on `dev` and on the CPU from the same values and gradients, over 70
/// variables of the reference network's kinds of shapes (more than one multi-tensor launch
/// takes; the 589,824-value ones span many chunks), the second step clipped, with EMA: Adam,
/// AdamW and Adam with its L2 term. Gives the gradient norms against f64 sums, then per
/// optimizer the largest difference over the variables of each quantity (parameter change,
/// moments, EMA), relative to the largest CPU value; and, on CUDA, a failure (infinity) if the
/// multi-tensor kernels were not the ones that ran.
fn adam_against_cpu(dev: &Device) -> Result<Vec<(String, f32)>> {
    let cpu = Device::Cpu;
    let base: [&[usize]; 7] = [&[256, 256, 3, 3], &[64, 3, 3, 3], &[1000], &[64], &[512, 256], &[3], &[7, 5]];
    let shapes: Vec<Vec<usize>> = (0..70).map(|i| base[i % base.len()].to_vec()).collect();
    let init: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(0f32, 1., s.as_slice(), &cpu)).collect::<candle_core::Result<_>>()?;
    let grads: Vec<Vec<Tensor>> = (0..3)
        .map(|_| shapes.iter().map(|s| Tensor::randn(0f32, 1e-2, s.as_slice(), &cpu)).collect::<candle_core::Result<Vec<_>>>())
        .collect::<candle_core::Result<_>>()?;
    /// What three steps leave: the gradient norms, the variables, their EMA copies, the moments.
    struct Steps(Vec<f64>, Vec<Tensor>, Vec<Tensor>, HashMap<String, Tensor>);
    let run = |d: &Device, params: trainer::AdamParams| -> Result<Steps> {
        let vars = init.iter().enumerate().map(|(i, t)| Ok((format!("p{i:02}"), Var::from_tensor(&t.to_device(d)?)?))).collect::<Result<Vec<_>>>()?;
        let mut opt = trainer::Adam::new(vars, params)?;
        let mut ema = opt.vars().iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?;
        let mut norms = Vec::new();
        for (k, g) in grads.iter().enumerate() {
            let g = g.iter().map(|t| t.to_device(d)).collect::<candle_core::Result<Vec<_>>>()?;
            let norm = trainer::adam::global_norm(&g)?;
            norms.push(norm);
            let scale = if k == 1 { trainer::adam::clip_scale(norm, 0.5 * norm) } else { 1.0 };
            opt.step_full(&g, 1e-3, scale, Some((ema.as_mut_slice(), 0.9)))?;
        }
        Ok(Steps(norms, opt.vars().iter().map(|v| v.as_tensor().clone()).collect(), ema, opt.state_tensors()?))
    };
    let largest = |t: &Tensor| -> Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar()?) };
    let rel = |g: &Tensor, w: &Tensor| -> Result<f32> { Ok(max_diff(&g.to_device(&Device::Cpu)?, w)? / largest(w)?.max(1e-30)) };
    // A change is ~1e-3 of its variable's value, and the devices may round a step's arithmetic
    // differently (the CPU's composite AdamW and L2 order it otherwise; contracted multiply-adds
    // would too): one unit in the last place of a value near 4 is then already 1.6e-4 of the
    // parameters' change over three steps, and 1e-3 of the EMA's. So the difference is measured
    // against the change only beyond a rounding allowance of 16 units of the variable's largest
    // value (~20x what three steps and the EMA accumulated in a model of both sides); a wrong
    // update still shows from ~0.3% of the parameters' change, ~1.5% of the EMA's.
    let rel_change = |g: &Tensor, w: &Tensor, p0: &Tensor, value: &Tensor| -> Result<f32> {
        let allowance = 16.0 * f32::EPSILON * largest(value)?;
        let change = w.sub(p0)?;
        Ok((max_diff(&g.to_device(&Device::Cpu)?.sub(p0)?, &change)? - allowance).max(0.0) / largest(&change)?.max(1e-30))
    };
    let mut out = Vec::new();
    let base = trainer::AdamParams { lr: 1e-3, ..Default::default() };
    let optimizers = [
        ("Adam", base),
        ("AdamW", trainer::AdamParams { weight_decay: 0.01, decoupled: true, ..base }),
        ("Adam+L2", trainer::AdamParams { weight_decay: 0.01, ..base }),
    ];
    let used_before = trainer::adam::cuda_kernel_use();
    for (k, (label, params)) in optimizers.into_iter().enumerate() {
        let Steps(_, want_p, want_e, want_s) = run(&cpu, params)?;
        let Steps(got_n, got_p, got_e, got_s) = run(dev, params)?;
        if k == 0 {
            // The norms against f64 sums (the CPU's sums in f32 are the less accurate).
            for (t, (g, gs)) in got_n.iter().zip(&grads).enumerate() {
                let want = gs.iter().map(|t| t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()).sum::<candle_core::Result<f64>>()?.sqrt();
                out.push((format!("gradient norm, step {}", t + 1), ((g - want).abs() / want) as f32));
            }
        }
        let mut worst = [0f32; 4];
        for (i, (g, w)) in got_p.iter().zip(&want_p).enumerate() {
            // The change of each variable, not its value: the value's scale would hide an error
            // in updates 1000 times smaller.
            let p0 = &init[i];
            worst[0] = worst[0].max(rel_change(g, w, p0, w)?);
            worst[1] = worst[1].max(rel_change(&got_e[i], &want_e[i], p0, &want_e[i])?);
        }
        for (key, w) in &want_s {
            let slot = if key.starts_with("m.") { 2 } else { 3 };
            worst[slot] = worst[slot].max(rel(&got_s[key], w)?);
        }
        for (what, d) in ["change over 3 steps", "EMA after 3 steps", "first moment", "second moment"].iter().zip(worst) {
            out.push((format!("{label} {what}"), d));
        }
    }
    if dev.is_cuda() && std::env::var("TRAINER_CUDA_ADAM").map_or(true, |v| v != "candle") {
        let used = trainer::adam::cuda_kernel_use();
        let (steps, norms) = (used.0 - used_before.0, used.1 - used_before.1);
        // Three runs of three steps (and norms) on the device.
        out.push((format!("multi-tensor kernels ran ({steps} steps, {norms} norms of 9)"), if steps == 9 && norms == 9 { 0.0 } else { f32::INFINITY }));
    }
    Ok(out)
}

/// Training steps of the tiny model (dropout, EMA, clipping that scales every step) one by one,
/// and pipelined as `Trainer::step` takes them on CUDA: each update queued behind the device's
/// gate, the next step launched before the last one's loss is read. Then, with lr 1e30, a run
/// that diverges at its second step both ways: the same error, and the pipelined run's weights
/// and EMA as its first step left them (the gate skipped the update). `(check, difference,
/// tolerance)`.
fn pipelined_against_plain(dev: &Device) -> Result<Vec<(String, f32, f32)>> {
    let mut cfg = trainer::RunConfig::reference();
    cfg.unet = unet::UNetConfig::tiny();
    cfg.unet.dropout = 0.3;
    cfg.train.batch_size = 4;
    cfg.train.grad_clip = Some(1e-3);
    cfg.train.ema_decay = Some(0.9);
    let s = cfg.unet.image_size;
    let mut images = diffusion::NoiseRng::new(1);
    let batches = [4, 4, 4, 3].iter().map(|&b| images.randn((b, 3, s, s), &Device::Cpu)?.tanh()?.to_device(dev)).collect::<candle_core::Result<Vec<_>>>()?;
    let to_cpu = |ts: &[Tensor]| ts.iter().map(|t| t.to_device(&Device::Cpu)).collect::<candle_core::Result<Vec<_>>>();
    /// What a run left: each step's outcome (up to the first error), its weights and EMA, the
    /// optimizer's count, the steps gated, and the weights and EMA after the first step.
    struct Run {
        outs: Vec<std::result::Result<trainer::StepOutput, String>>,
        weights: Vec<Tensor>,
        ema: Vec<Tensor>,
        count: u64,
        gated: usize,
        first: (Vec<Tensor>, Vec<Tensor>),
    }
    let run = |cfg: &trainer::RunConfig, pipelined: bool| -> Result<Run> {
        let mut engine = trainer::StepEngine::new(cfg, dev)?;
        let mut rng = diffusion::NoiseRng::new(3);
        let mut outs = Vec::new();
        let mut first = None;
        // Keeps the first step's weights and EMA, and each outcome.
        let mut after = |e: &trainer::StepEngine, o: &trainer::StepOutput| {
            if first.is_none() {
                let copies = |ts: &[Tensor]| ts.iter().map(|t| t.to_device(&Device::Cpu)?.copy()).collect::<candle_core::Result<Vec<_>>>();
                let weights: Vec<Tensor> = e.opt.vars().iter().map(|v| v.as_tensor().clone()).collect();
                first = Some((copies(&weights)?, copies(e.ema.as_deref().unwrap_or_default())?));
            }
            outs.push(Ok(*o));
            Ok(())
        };
        let ended = if pipelined {
            // (Under TRAIN_PIPELINE=0, a way out the check script takes, both runs are plain.)
            engine.set_pipeline(trainer::StepPipeline::from_env());
            engine.train_steps(&batches, &mut rng, &mut after)
        } else {
            engine.set_pipeline(trainer::StepPipeline::Off);
            batches.iter().try_for_each(|x0| {
                let o = engine.train_step(x0, &mut rng)?;
                after(&engine, &o)
            })
        };
        if let Err(e) = ended {
            outs.push(Err(e.to_string()));
        }
        let weights: Vec<Tensor> = engine.opt.vars().iter().map(|v| v.as_tensor().clone()).collect();
        Ok(Run {
            outs,
            weights: to_cpu(&weights)?,
            ema: to_cpu(engine.ema.as_deref().unwrap_or_default())?,
            count: engine.opt.step_count(),
            gated: engine.gated_updates() as usize,
            // A run that failed at its first step has none: its checks below then fail.
            first: first.unwrap_or_default(),
        })
    };
    let largest = |ts: &[Tensor]| -> Result<f32> { ts.iter().try_fold(f32::MIN_POSITIVE, |m, t| Ok(m.max(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?))) };
    let rel = |a: &[Tensor], b: &[Tensor]| -> Result<f32> {
        let worst = a.iter().zip(b).try_fold(0f32, |m, (x, y)| Ok::<_, anyhow::Error>(m.max(max_diff(x, y)?)))?;
        Ok(if a.len() == b.len() { worst / largest(b)? } else { f32::INFINITY })
    };
    // Gated unless the multi-tensor optimizer or the pipeline is switched off.
    let expect_gated = dev.is_cuda() && std::env::var("TRAINER_CUDA_ADAM").map_or(true, |v| v != "candle") && trainer::StepPipeline::from_env() != trainer::StepPipeline::Off;
    let mut out = Vec::new();
    if expect_gated {
        // The runs below are host-bound: their copies would have landed before a read that did
        // not wait. Here the second read is asked for well before its copy can happen.
        let got = trainer::adam::cuda_gate_read_waits(dev)?;
        let want = Some([(0.5f32, 25f64), (0.25, 100.0)]);
        if got != want {
            out!("pipelined steps: the gate's reads gave {got:?}, expected {want:?}");
        }
        out.push(("the loss read back waits for its copy".to_string(), if got == want { 0.0 } else { f32::INFINITY }, 0.0));
    }
    let (plain, piped) = (run(&cfg, false)?, run(&cfg, true)?);
    let ok = |r: &Run| r.outs.iter().filter_map(|o| o.as_ref().ok().copied()).collect::<Vec<_>>();
    let (a, b) = (ok(&plain), ok(&piped));
    let all_ok = a.len() == batches.len() && b.len() == batches.len();
    let loss_d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x.loss - y.loss).abs() / x.loss.abs().max(f32::MIN_POSITIVE)));
    let norm_d = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x.grad_norm.unwrap_or(0.0) - y.grad_norm.unwrap_or(f64::NAN)).abs() / x.grad_norm.unwrap_or(1.0)));
    out.push(("losses".to_string(), if all_ok { loss_d } else { f32::INFINITY }, 1e-4));
    out.push(("gradient norms".into(), if all_ok { norm_d as f32 } else { f32::INFINITY }, 1e-4));
    out.push(("weights".into(), rel(&piped.weights, &plain.weights)?, 1e-3));
    out.push(("EMA".into(), rel(&piped.ema, &plain.ema)?, 1e-3));
    let want_gated = if expect_gated { batches.len() } else { 0 };
    out.push((format!("updates gated on the device ({} of {}, {want_gated} expected)", piped.gated, batches.len()), if piped.gated == want_gated { 0.0 } else { f32::INFINITY }, 0.0));

    let mut bad = cfg.clone();
    bad.train.lr = 1e30;
    bad.train.grad_clip = None;
    let (plain, piped) = (run(&bad, false)?, run(&bad, true)?);
    let err = |r: &Run| r.outs.last().and_then(|o| o.as_ref().err().cloned());
    let same_error = err(&plain).is_some() && err(&plain) == err(&piped) && plain.outs.len() == 2 && piped.outs.len() == 2;
    if !same_error {
        out!("pipelined steps, lr 1e30: plain {:?}, pipelined {:?}", plain.outs, piped.outs);
    }
    out.push(("lr 1e30: the same error at the second step".into(), if same_error { 0.0 } else { f32::INFINITY }, 0.0));
    out.push(("lr 1e30: steps counted".into(), (piped.count as f32 - plain.count as f32).abs() + (piped.count as f32 - 1.0).abs(), 0.0));
    let bits = |a: &[Tensor], b: &[Tensor]| -> Result<f32> {
        let flat = |ts: &[Tensor]| ts.iter().map(|t| t.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<Vec<_>>>();
        let (x, y) = (flat(a)?, flat(b)?);
        let same = x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| p.len() == q.len() && p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits()));
        Ok(if same { 0.0 } else { f32::INFINITY })
    };
    out.push(("lr 1e30: weights as the first step left them".into(), bits(&piped.weights, &piped.first.0)?, 0.0));
    out.push(("lr 1e30: EMA as the first step left it".into(), bits(&piped.ema, &piped.first.1)?, 0.0));
    Ok(out)
}

/// `Conv2d::forward_plus` (the sum written into the convolution's output buffer) against the
/// convolution followed by `broadcast_add`, on the device: a residual, a value per image and
/// channel from a narrow of a wider product (the time embedding), and one per channel. Outputs
/// and the gradients of the input, the weight, the bias and the addend, relative to the largest
/// value.
fn sums_into_conv_outputs(dev: &Device, dtype: DType) -> Result<Vec<(String, f32)>> {
    let cpu = Device::Cpu;
    let (n, c, o, h) = (3, 64, 128, 16);
    let on = |t: Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_device(dev)?.to_dtype(dtype)?)?) };
    let x = on(Tensor::randn(0f32, 1., (n, c, h, h), &cpu)?)?;
    let w = on(Tensor::randn(0f32, 0.05, (o, c, 3, 3), &cpu)?)?;
    let b = on(Tensor::randn(0f32, 0.3, o, &cpu)?)?;
    let skip = on(Tensor::randn(0f32, 1., (n, o, h, h), &cpu)?)?;
    let wide = on(Tensor::randn(0f32, 1., (n, 3 * o), &cpu)?)?;
    let row = on(Tensor::randn(0f32, 1., (1, o), &cpu)?)?;
    let dy = Tensor::randn(0f32, 1., (n, o, h, h), &cpu)?.to_device(dev)?;
    let conv = unet::conv::Conv2d::new(
        VarBuilder::from_tensors([("weight".to_string(), w.as_tensor().clone()), ("bias".to_string(), b.as_tensor().clone())].into(), dtype, dev),
        c,
        o,
        3,
        1,
        1,
    )?;
    let per_image = wide.narrow(1, o, o)?.unsqueeze(2)?.unsqueeze(3)?;
    let per_channel = row.unsqueeze(2)?.unsqueeze(3)?;
    let mut out = Vec::new();
    for (name, addend, leaf) in [("residual", skip.as_tensor().clone(), &skip), ("time embedding", per_image, &wide), ("per channel", per_channel, &row)] {
        let got = conv.forward_plus(x.as_tensor(), &addend)?;
        let want = candle_core::Module::forward(&conv, x.as_tensor())?.broadcast_add(&addend)?;
        out.push((format!("sum into conv output: {name} fwd"), rel_diff(&got, &want)?));
        let gg = got.to_dtype(DType::F32)?.mul(&dy)?.sum_all()?.backward()?;
        let gw = want.to_dtype(DType::F32)?.mul(&dy)?.sum_all()?.backward()?;
        for (what, v) in [("dx", &x), ("dw", &w), ("db", &b), ("d addend", leaf)] {
            let (a, e) = (gg.get(v.as_tensor()).context("no gradient")?, gw.get(v.as_tensor()).context("no gradient")?);
            out.push((format!("sum into conv output: {name} {what}"), rel_diff(a, e)?));
        }
    }
    Ok(out)
}

/// [`max_diff`] over the largest reference value, as `conv_against_cpu` measures.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale: f32 = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    Ok(max_diff(a, b)? / scale.max(1e-12))
}

/// GroupNorm + Hardswish + dropout (a mask, and hashed) at the reference model's 64x64 level (and
/// hashed at its 8x8 level, with the weight's gradient), the attention
/// softmax over 1024-long rows (a 32x32 attention level: longer than the reference's 16x16), and the x2 upsampling from 32x32 to 64x64 (batch 2): output and
/// input gradient on `dev` in `dtype` against
/// the CPU ops in f32, relative to the largest CPU value. In bf16 the measure is the relative
/// RMS difference instead: bf16 inputs move some values across Hardswish's kinks at +-3, where
/// its derivative jumps, and those few elements would make the largest difference meaningless.
fn fused_ops_against_cpu(dev: &Device, dtype: DType) -> Result<Vec<(String, f32)>> {
    let cpu = Device::Cpu;
    let (n, c, h) = (2, 128, 64);
    let x = Tensor::randn(0f32, 1., (n, c, h, h), &cpu)?.affine(2.0, 0.5)?;
    let w = (Tensor::randn(0f32, 0.3, c, &cpu)? + 1.0)?;
    let b = Tensor::randn(0f32, 0.3, c, &cpu)?;
    let mask = (Tensor::rand(0f32, 1., (n, c, h, h), &cpu)?.ge(0.1)?.to_dtype(DType::F32)? / 0.9)?;
    let r = Tensor::randn(0f32, 1., (n, c, h, h), &cpu)?;
    let scores = (Tensor::randn(0f32, 1., (n, 1024, 1024), &cpu)? * 8.0)?;
    let rs = Tensor::randn(0f32, 1., (n, 1024, 1024), &cpu)?;
    // The CUDA training path's dropout: the device recomputes the mask from the hash, the CPU
    // op takes it built on the host.
    let hashed = unet::norm::HashedDropout::new(999, 3, 0.1);
    // And at the 8x8 level (256 channels): maps shorter than the kernel's block take another
    // path in its backward pass (a warp per channel); with the weight's gradient, whose
    // per-image sums come out of the kernel beside dx.
    let (c8, h8) = (256, 8);
    let x8 = Tensor::randn(0f32, 1., (n, c8, h8, h8), &cpu)?.affine(2.0, 0.5)?;
    let w8 = (Tensor::randn(0f32, 0.3, c8, &cpu)? + 1.0)?;
    let b8 = Tensor::randn(0f32, 0.3, c8, &cpu)?;
    let r8 = Tensor::randn(0f32, 1., (n, c8, h8, h8), &cpu)?;
    let run = |d: &Device, dt: DType| -> Result<[Tensor; 11]> {
        let xv = Var::from_tensor(&x.to_device(d)?.to_dtype(dt)?)?;
        let tensors = [("weight".to_string(), w.to_device(d)?.to_dtype(dt)?), ("bias".to_string(), b.to_device(d)?.to_dtype(dt)?)].into();
        let gn = unet::norm::GroupNorm::new(VarBuilder::from_tensors(tensors, dt, d), 32, c, 1e-5)?;
        let y = gn.forward_hardswish_masked(xv.as_tensor(), &mask.to_device(d)?)?;
        let gx = y.to_dtype(DType::F32)?.mul(&r.to_device(d)?)?.sum_all()?.backward()?;
        let yh = gn.forward_hardswish_dropout(xv.as_tensor(), hashed)?;
        let gh = yh.to_dtype(DType::F32)?.mul(&r.to_device(d)?)?.sum_all()?.backward()?;
        let sv = Var::from_tensor(&scores.to_device(d)?.to_dtype(dt)?)?;
        let p = unet::softmax::scaled_softmax_last_dim(sv.as_tensor(), 1.0 / 16.0)?;
        let gs = p.to_dtype(DType::F32)?.mul(&rs.to_device(d)?)?.sum_all()?.backward()?;
        let uv = Var::from_tensor(&x.narrow(2, 0, h / 2)?.narrow(3, 0, h / 2)?.contiguous()?.to_device(d)?.to_dtype(dt)?)?;
        let u = unet::upsample::upsample2x(uv.as_tensor())?;
        let gu = u.to_dtype(DType::F32)?.mul(&r.to_device(d)?)?.sum_all()?.backward()?;
        let x8v = Var::from_tensor(&x8.to_device(d)?.to_dtype(dt)?)?;
        let w8v = Var::from_tensor(&w8.to_device(d)?.to_dtype(dt)?)?;
        let tensors = [("weight".to_string(), w8v.as_tensor().clone()), ("bias".to_string(), b8.to_device(d)?.to_dtype(dt)?)].into();
        let gn8 = unet::norm::GroupNorm::new(VarBuilder::from_tensors(tensors, dt, d), 32, c8, 1e-5)?;
        let y8 = gn8.forward_hardswish_dropout(x8v.as_tensor(), hashed)?;
        let g8 = y8.to_dtype(DType::F32)?.mul(&r8.to_device(d)?)?.sum_all()?.backward()?;
        Ok([
            y,
            gx.get(xv.as_tensor()).context("no GroupNorm input gradient")?.clone(),
            yh,
            gh.get(xv.as_tensor()).context("no GroupNorm (hashed dropout) input gradient")?.clone(),
            p,
            gs.get(sv.as_tensor()).context("no softmax input gradient")?.clone(),
            u,
            gu.get(uv.as_tensor()).context("no upsampling input gradient")?.clone(),
            y8,
            g8.get(x8v.as_tensor()).context("no GroupNorm (8x8) input gradient")?.clone(),
            g8.get(w8v.as_tensor()).context("no GroupNorm (8x8) weight gradient")?.clone(),
        ])
    };
    let want = run(&cpu, DType::F32)?;
    let got = run(dev, dtype)?;
    let mut out = Vec::new();
    let names = [
        "group norm+hardswish+mask fwd",
        "group norm+hardswish+mask dx",
        "group norm+hardswish+hashed dropout fwd",
        "group norm+hardswish+hashed dropout dx",
        "softmax fwd", "softmax dx", "upsample 2x fwd", "upsample 2x dx",
        "group norm+hardswish+hashed dropout 8x8 fwd",
        "group norm+hardswish+hashed dropout 8x8 dx",
        "group norm+hardswish+hashed dropout 8x8 dweight"];
    for (name, (g, e)) in names.iter().zip(got.iter().zip(&want)) {
        if dtype == DType::F32 {
            let scale: f32 = e.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            out.push((name.to_string(), max_diff(g, e)? / scale.max(1e-30)));
        } else {
            let g = g.to_device(&cpu)?.to_dtype(DType::F32)?;
            let num: f32 = g.sub(e)?.sqr()?.sum_all()?.to_scalar()?;
            let den: f32 = e.sqr()?.sum_all()?.to_scalar()?;
            out.push((format!("{name} (relative RMS)"), (num / den.max(1e-30)).sqrt()));
        }
    }
    Ok(out)
}
