//! Sampler behaviour on tiny random models (fast: 16x16 images, few steps).

use std::path::Path;

use candle_core::{Device, Tensor};
use diffusion::{FinalStepNoise, NoiseRng, SamplerKind, Schedule, ScheduleConfig, Variance};
use sampler::{ProcessStrip, RecoverMode, Sampler};
use unet::{ModelWeights, UNet, UNetConfig};

fn tiny_weights(seed: u64) -> ModelWeights {
    weights_for(UNetConfig::tiny(), seed)
}

fn weights_for(cfg: UNetConfig, seed: u64) -> ModelWeights {
    let (model, vm) = unet::new_trainable(&cfg, &Device::Cpu, seed).unwrap();
    let tensors = unet::weights::state_dict(&model, &vm).unwrap();
    // Detach from the VarMap so later edits do not alias.
    let tensors = tensors.into_iter().map(|(k, v)| (k, v.copy().unwrap())).collect();
    ModelWeights { config: cfg, tensors, metadata: Default::default() }
}

fn tiny_unet(seed: u64) -> UNet {
    tiny_weights(seed).build(&Device::Cpu, false).unwrap()
}

/// A tiny UNet for [`short_schedule`] (a sampler refuses a schedule of another length).
fn short_unet(seed: u64) -> UNet {
    weights_for(UNetConfig { num_steps: 100, ..UNetConfig::tiny() }, seed).build(&Device::Cpu, false).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// 100 steps with betas 10x the reference's: fully noised at T, and 10x cheaper to run to the
/// end (the tiny UNet's time table has 1000 rows; any t < 100 is valid for it).
fn short_schedule() -> Schedule {
    Schedule::new(&ScheduleConfig { num_steps: 100, beta: diffusion::BetaSchedule::Linear { start: 1e-3, end: 0.2 } }).unwrap()
}

/// Batch-size invariance tolerance (values in [-1, 1]).
const TOL: f32 = 2e-3;

const DDIM10: SamplerKind = SamplerKind::Ddim { steps: 10, eta: 0.5 };

#[test]
fn same_seed_same_images_batch_does_not_matter() {
    let model = tiny_unet(0);
    let s = Schedule::reference();
    let a = Sampler::for_unet(&model, &s).batch(4).sample(4, &DDIM10, 7).unwrap();
    let b = Sampler::for_unet(&model, &s).batch(4).sample(4, &DDIM10, 7).unwrap();
    assert_eq!(a.dims(), &[4, 3, 16, 16]);
    assert_eq!(max_diff(&a, &b), 0.0, "same seed, same batch: bit-identical");
    let c = Sampler::for_unet(&model, &s).batch(8).sample(4, &DDIM10, 8).unwrap();
    assert!(max_diff(&a, &c) > 0.1, "another seed gives other images");
    // Batch 1 and 3 (a ragged last batch) give the same images, up to GEMM blocking order
    // (differences of ~1e-4 in [-1, 1], amplified by 1/sqrt(abar_t) at large t; an 8-bit
    // level is 8e-3).
    let d = Sampler::for_unet(&model, &s).batch(1).sample(4, &DDIM10, 7).unwrap();
    let e = Sampler::for_unet(&model, &s).batch(3).sample(4, &DDIM10, 7).unwrap();
    assert!(max_diff(&a, &d) < TOL, "{}", max_diff(&a, &d));
    assert!(max_diff(&a, &e) < TOL, "{}", max_diff(&a, &e));
    // Image i depends on (seed, i) only: a smaller run is a prefix of a bigger one.
    let f = Sampler::for_unet(&model, &s).sample(2, &DDIM10, 7).unwrap();
    assert!(max_diff(&a.narrow(0, 0, 2).unwrap(), &f) < TOL);
    // Stochastic DDPM too, and the free function the bench calls.
    let kind = SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper };
    let (short, short_model) = (short_schedule(), short_unet(0));
    let g = sampler::sample_grid(&short_model, &short, 2, &kind, 3, 2, &sampler::Progress::hidden()).unwrap();
    let h = sampler::sample_grid(&short_model, &short, 2, &kind, 3, 1, &sampler::Progress::hidden()).unwrap();
    assert!(max_diff(&g, &h) < TOL, "{}", max_diff(&g, &h));
    let lo = g.min_all().unwrap().to_scalar::<f32>().unwrap();
    let hi = g.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(lo >= -1.0 && hi <= 1.0);
}

#[test]
fn generate_keeps_its_signature_and_is_batch_invariant() {
    let model = tiny_unet(1);
    let s = Schedule::reference();
    let x_t = NoiseRng::new(5).randn((3, 3, 16, 16), &Device::Cpu).unwrap();
    let mut calls = 0;
    let a = sampler::generate(&model, &s, &x_t, &DDIM10, &mut NoiseRng::new(9), 3, |_, n| {
        assert_eq!(n, 10);
        calls += 1
    })
    .unwrap();
    assert_eq!(calls, 10);
    let b = sampler::generate(&model, &s, &x_t, &DDIM10, &mut NoiseRng::new(9), 2, |_, _| {}).unwrap();
    assert!(max_diff(&a, &b) < TOL);
}

#[test]
fn ddim_eta_one_all_steps_matches_ddpm_beta_tilde() {
    let s = Schedule::reference();
    // Per step: the same coefficients (see also diffusion's own test).
    for t in 1..1000 {
        let ddim = s.ddim_coefficients(t, Some(t - 1), 1.0).unwrap().as_ddpm();
        let ddpm = s.ddpm_coefficients(t, Variance::BetaTilde, FinalStepNoise::Paper).unwrap();
        let tol = if t < 10 { 2e-3 } else { 1e-4 };
        assert!(((ddim.mean_scale - ddpm.mean_scale) / ddpm.mean_scale).abs() < 1e-5, "t={t}");
        assert!(((ddim.eps_scale - ddpm.eps_scale) / ddpm.eps_scale).abs() < tol, "t={t}");
        assert!(((ddim.sigma - ddpm.sigma) / ddpm.sigma).abs() < tol, "t={t}");
    }
    // Per sample: both draw one z per step t > 0 from the same per-image stream, so with the
    // same seed the whole trajectories coincide (on a 100-step schedule, for speed).
    let model = short_unet(2);
    let s = short_schedule();
    let sampler = Sampler::for_unet(&model, &s);
    let ddim = sampler.sample(2, &SamplerKind::Ddim { steps: 100, eta: 1.0 }, 11).unwrap();
    let ddpm = sampler.sample(2, &SamplerKind::Ddpm { variance: Variance::BetaTilde, final_noise: FinalStepNoise::Paper }, 11).unwrap();
    let d = max_diff(&ddim, &ddpm);
    assert!(d < 2e-3, "DDIM(eta=1, 1000 steps) vs DDPM(beta-tilde): max |diff| {d}");
    let other = sampler.sample(2, &SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper }, 11).unwrap();
    assert!(max_diff(&other, &ddpm) > 10.0 * d, "beta differs from beta-tilde by more");
}

#[test]
fn reverse_steps_match_diffusion() {
    let s = Schedule::reference();
    for kind in [
        SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper },
        SamplerKind::Ddim { steps: 10, eta: 0.0 },
        SamplerKind::Ddim { steps: 1000, eta: 1.0 },
        SamplerKind::Ddim { steps: 7, eta: 0.0 },
    ] {
        for t_start in [0usize, 1, 99, 500, 999] {
            let steps = sampler::reverse_steps(&s, &kind, t_start).unwrap();
            assert_eq!(steps.len(), diffusion::num_evaluations(&s, &kind, t_start).unwrap());
            assert_eq!(steps[0].0, t_start);
            assert_eq!(steps.last().unwrap(), &(0, None));
            assert!(steps.windows(2).all(|w| w[0].1 == Some(w[1].0)));
        }
    }
    assert!(sampler::validate_kind(&s, &SamplerKind::Ddim { steps: 1001, eta: 0.0 }).is_err());
    assert!(sampler::validate_kind(&s, &SamplerKind::Ddim { steps: 0, eta: 0.0 }).is_err());
    let e = sampler::validate_kind(&s, &SamplerKind::Ddim { steps: 10, eta: 1.5 }).unwrap_err().to_string();
    assert!(e.contains("eta") && !e.contains('\n'), "{e}");
}

#[test]
fn recover_sdedit_at_small_t_returns_the_original() {
    let model = tiny_unet(3);
    let s = Schedule::reference();
    let sampler = Sampler::for_unet(&model, &s).batch(4);
    let originals = NoiseRng::new(1).randn((5, 3, 16, 16), &Device::Cpu).unwrap().tanh().unwrap();
    let kinds = [
        SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper },
        SamplerKind::Ddpm { variance: Variance::BetaTilde, final_noise: FinalStepNoise::Paper },
    ];
    // t = 0: nothing to undo, exactly the original.
    let r0 = sampler.recover(&originals, 0, &kinds, RecoverMode::Sdedit, 0).unwrap();
    assert_eq!(max_diff(&r0.noised, &originals), 0.0);
    for d in &r0.denoised {
        assert_eq!(max_diff(d, &originals), 0.0);
    }
    // t = 1 (step index 0): noise 0.01 z, one reverse step; error ~ 0.01 |z - eps|.
    let r1 = sampler.recover(&originals, 1, &kinds, RecoverMode::Sdedit, 0).unwrap();
    for d in &r1.denoised {
        let err = max_diff(d, &originals);
        assert!(err < 0.1, "{err}");
        let mean = d.sub(&originals).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean < 0.02, "{mean}");
    }
    // The reference's variant runs all T steps from it: the original is lost.
    let short = short_schedule();
    let short_model = short_unet(0);
    let rr = Sampler::for_unet(&short_model, &short).recover(&originals, 1, &kinds[..1], RecoverMode::Reference, 0).unwrap();
    assert!(max_diff(&rr.denoised[0], &originals) > 0.5);
    // Geometry of the written image: one row per image, original | noised | one per setting.
    let labels: Vec<String> = ["original", "t=1", "beta", "beta-tilde"].iter().map(|s| s.to_string()).collect();
    let img = r1.to_image(Some(&labels)).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 18 + 2, 5 * 18 + 2 + sampler::grid::LABEL_BAND));
    let plain = r1.to_image(None).unwrap();
    assert_eq!((plain.width(), plain.height()), (4 * 18 + 2, 5 * 18 + 2));
    assert!(sampler.recover(&originals, 1001, &kinds, RecoverMode::Sdedit, 0).is_err());
    let wrong = Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(sampler.recover(&wrong, 10, &kinds, RecoverMode::Sdedit, 0).is_err());
}

#[test]
fn recover_with_ddim_and_batching() {
    let model = tiny_unet(4);
    let s = Schedule::reference();
    let originals = NoiseRng::new(2).randn((3, 3, 16, 16), &Device::Cpu).unwrap().tanh().unwrap();
    let kinds = [DDIM10];
    let a = Sampler::for_unet(&model, &s).batch(3).recover(&originals, 500, &kinds, RecoverMode::Sdedit, 4).unwrap();
    let b = Sampler::for_unet(&model, &s).batch(2).recover(&originals, 500, &kinds, RecoverMode::Sdedit, 4).unwrap();
    assert!(max_diff(&a.noised, &b.noised) < 1e-6);
    assert!(max_diff(&a.denoised[0], &b.denoised[0]) < TOL);
    assert_eq!(a.denoised[0].dims(), &[3, 3, 16, 16]);
}

#[test]
fn file_names() {
    let beta = SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper };
    let tilde = SamplerKind::Ddpm { variance: Variance::BetaTilde, final_noise: FinalStepNoise::Reference };
    assert_eq!(sampler::sample_file_name(&beta), "sample_0.png");
    let tilde_paper = SamplerKind::Ddpm { variance: Variance::BetaTilde, final_noise: FinalStepNoise::Paper };
    assert_eq!(sampler::sample_file_name(&tilde_paper), "sample_1.png");
    // The non-default last step must not replace the default's grid.
    assert_eq!(sampler::sample_file_name(&tilde), "sample_1_final-noise.png");
    assert_eq!(sampler::process_file_name(&tilde), "process_1_final-noise.png");
    assert_eq!(sampler::kind_name(&tilde), "beta-tilde-final-noise");
    assert_eq!(sampler::kind_name(&beta), "beta");
    assert_eq!(sampler::sample_file_name(&SamplerKind::Ddim { steps: 50, eta: 0.0 }), "sample_ddim_steps=50_eta=0.png");
    assert_eq!(sampler::sample_file_name(&SamplerKind::Ddim { steps: 100, eta: 0.2 }), "sample_ddim_steps=100_eta=0.2.png");
    assert_eq!(sampler::recover_file_name(100, RecoverMode::Sdedit), "recover_t=100.png");
    assert_eq!(sampler::recover_file_name(1000, RecoverMode::Reference), "recover_reference_t=1000.png");
    assert_eq!(sampler::kind_name(&tilde_paper), "beta-tilde");
}

#[test]
fn process_strip_geometry_and_consistency() {
    let model = tiny_unet(5);
    let s = Schedule::reference();
    let sampler = Sampler::for_unet(&model, &s).batch(2);
    let kind = SamplerKind::Ddim { steps: 20, eta: 1.0 };
    let p: ProcessStrip = sampler.process(3, &kind, 6, 15).unwrap();
    assert_eq!((p.rows, p.columns), (3, 15));
    assert_eq!(p.images.dims(), &[45, 3, 16, 16]);
    assert_eq!(p.levels[0], 1000);
    assert_eq!(*p.levels.last().unwrap(), 0);
    assert!(p.levels.windows(2).all(|w| w[0] > w[1]), "{:?}", p.levels);
    // The last column is the sample itself.
    let samples = sampler.sample(3, &kind, 6).unwrap();
    let last: Vec<Tensor> = (0..3).map(|r| p.images.get(r * 15 + 14).unwrap()).collect();
    assert!(max_diff(&Tensor::stack(&last, 0).unwrap(), &samples) < TOL);
    let img = p.to_image().unwrap();
    assert_eq!((img.width(), img.height()), (15 * 18 + 2, 3 * 18 + 2 + sampler::grid::LABEL_BAND));
    // Fewer states than columns: one column per state.
    let short = sampler.process(1, &SamplerKind::Ddim { steps: 4, eta: 0.0 }, 6, 15).unwrap();
    assert_eq!(short.columns, 5);
    assert_eq!(short.levels, vec![1000, 667, 334, 1, 0]);
}

#[test]
fn process_ddpm_levels() {
    // A cheap analytic predictor: only the bookkeeping matters here.
    let s = Schedule::reference();
    let pred = |x: &Tensor, _t: &Tensor| x.affine(0.5, 0.0);
    let sampler = Sampler::new(pred, &s, (3, 4, 4), &Device::Cpu);
    let kind = SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper };
    let p = sampler.process(6, &kind, 0, 15).unwrap();
    assert_eq!(p.columns, 15);
    assert_eq!(p.levels, vec![1000, 929, 857, 786, 714, 643, 571, 500, 429, 357, 286, 214, 143, 71, 0]);
}

#[test]
fn interpolation_strip() {
    let model = tiny_unet(6);
    let s = Schedule::reference();
    let sampler = Sampler::for_unet(&model, &s).batch(8);
    let strip = sampler.interpolate(2, 5, 10, 3).unwrap();
    assert_eq!(strip.dims(), &[10, 3, 16, 16]);
    // Row 0 runs from image 0's noise to image 1's: its ends are those DDIM samples.
    let samples = sampler.sample(2, &SamplerKind::Ddim { steps: 10, eta: 0.0 }, 3).unwrap();
    assert!(max_diff(&strip.get(0).unwrap(), &samples.get(0).unwrap()) < 1e-3);
    assert!(max_diff(&strip.get(4).unwrap(), &samples.get(1).unwrap()) < 1e-3);
    assert!(max_diff(&strip.get(2).unwrap(), &samples.get(0).unwrap()) > 1e-2);
    assert!(sampler.interpolate(1, 1, 10, 3).is_err());
}

fn save(w: &ModelWeights, dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    w.save(&p).unwrap();
    p
}

#[test]
fn checkpoint_loading_and_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny_weights(7);
    // EMA weights: used by default, --no-ema picks the raw ones.
    let ema: Vec<(String, Tensor)> = w.tensors.iter().filter(|(k, _)| k != &unet::TIME_TABLE_KEY).map(|(k, v)| (format!("ema.{k}"), v.affine(0.5, 0.0).unwrap())).collect();
    w.tensors.extend(ema);
    w.metadata.insert("diffusion_config".into(), serde_json::to_string(&ScheduleConfig::default()).unwrap());
    let path = save(&w, dir.path(), "model.safetensors");
    let m = sampler::load_model(&path, &Device::Cpu, true).unwrap();
    assert!(m.ema && m.has_ema);
    assert_eq!(m.schedule.num_steps(), 1000);
    let raw = sampler::load_model(&path, &Device::Cpu, false).unwrap();
    assert!(!raw.ema);
    let a = Sampler::for_unet(&m.unet, &m.schedule).sample(1, &DDIM10, 0).unwrap();
    let b = Sampler::for_unet(&raw.unet, &raw.schedule).sample(1, &DDIM10, 0).unwrap();
    assert!(max_diff(&a, &b) > 1e-3, "EMA and raw weights differ");
    // A folder holding model.safetensors works as --checkpoint.
    assert_eq!(sampler::resolve_checkpoint(Some(dir.path()), Path::new("/nonexistent")).unwrap(), path);

    let one_line = |e: sampler::SamplerError| {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        s
    };
    // Tiny weights labelled with the micro config.
    let mut bad = tiny_weights(7);
    bad.config = UNetConfig::micro();
    let p = save(&bad, dir.path(), "mislabelled.safetensors");
    let e = one_line(sampler::load_model(&p, &Device::Cpu, true).err().unwrap());
    assert!(e.contains("shape") || e.contains("missing"), "{e}");
    // A schedule whose T disagrees with the time table.
    let mut bad = tiny_weights(7);
    bad.metadata.insert("diffusion_config".into(), r#"{"num_steps": 500}"#.into());
    let p = save(&bad, dir.path(), "steps.safetensors");
    let e = one_line(sampler::load_model(&p, &Device::Cpu, true).err().unwrap());
    assert!(e.contains("500") && e.contains("1000"), "{e}");
    // Not a model file at all.
    let p = dir.path().join("junk.safetensors");
    std::fs::write(&p, b"hello").unwrap();
    one_line(sampler::load_model(&p, &Device::Cpu, true).err().unwrap());
    // Missing path, folder without a model.
    let e = one_line(sampler::resolve_checkpoint(Some(&dir.path().join("nope.safetensors")), dir.path()).unwrap_err());
    assert!(e.contains("does not exist"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = one_line(sampler::resolve_checkpoint(Some(empty.path()), dir.path()).unwrap_err());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn default_checkpoint_search() {
    let root = tempfile::tempdir().unwrap();
    let e = sampler::resolve_checkpoint(None, root.path()).unwrap_err().to_string();
    assert!(e.contains("train") && e.contains("import-checkpoint"), "{e}");
    let w = tiny_weights(8);
    std::fs::create_dir_all(root.path().join("runs/a")).unwrap();
    std::fs::create_dir_all(root.path().join("runs/b")).unwrap();
    let a = save(&w, &root.path().join("runs/a"), "model.safetensors");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let b = save(&w, &root.path().join("runs/b"), "model.safetensors");
    assert_eq!(sampler::resolve_checkpoint(None, root.path()).unwrap(), b, "the newest run");
    let f = std::fs::File::options().write(true).open(&a).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(sampler::resolve_checkpoint(None, root.path()).unwrap(), a);
    std::fs::create_dir_all(root.path().join("checkpoints")).unwrap();
    let imported = save(&w, &root.path().join("checkpoints"), "last.safetensors");
    assert_eq!(sampler::resolve_checkpoint(None, root.path()).unwrap(), imported, "an imported checkpoint wins");
}

#[test]
fn lightning_fixture_samples() {
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR")).join("../unet/tests/fixtures/seed_tiny.ckpt");
    let m = sampler::load_model(&ckpt, &Device::Cpu, true).unwrap();
    assert!(!m.ema);
    let x = Sampler::for_unet(&m.unet, &m.schedule).sample(2, &DDIM10, 0).unwrap();
    assert_eq!(x.dims(), &[2, 3, 16, 16]);
}

#[test]
fn a_perfect_predictor_samples_its_target() {
    // eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) for a fixed x0: every sampler must end
    // exactly on x0 (DDPM's last step returns the x0 prediction; DDIM eta=0 follows it).
    let s = Schedule::reference();
    let x0 = NoiseRng::new(3).randn((1, 3, 4, 4), &Device::Cpu).unwrap().tanh().unwrap();
    let target = x0.clone();
    let sched = s.clone();
    let oracle = move |x_t: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
        let t0 = t.to_vec1::<u32>()?[0] as usize;
        let a = sched.alphas_cumprod_sqrt[t0] as f64;
        let b = sched.one_minus_alphas_cumprod_sqrt[t0] as f64;
        x_t.broadcast_sub(&target.affine(a, 0.0)?)?.affine(1.0 / b, 0.0)
    };
    let sampler = Sampler::new(oracle, &s, (3, 4, 4), &Device::Cpu).batch(2);
    let want = x0.broadcast_as((3, 3, 4, 4)).unwrap().contiguous().unwrap();
    for kind in [
        SamplerKind::Ddpm { variance: Variance::Beta, final_noise: FinalStepNoise::Paper },
        SamplerKind::Ddpm { variance: Variance::BetaTilde, final_noise: FinalStepNoise::Paper },
        SamplerKind::Ddim { steps: 50, eta: 0.0 },
        SamplerKind::Ddim { steps: 1000, eta: 1.0 },
    ] {
        let out = sampler.sample(3, &kind, 1).unwrap();
        let d = max_diff(&out, &want);
        assert!(d < 1e-3, "{kind:?}: {d}");
    }
}

#[test]
fn clip_x0_changes_only_out_of_range_predictions() {
    let s = Schedule::reference();
    let kinds = [SamplerKind::Ddim { steps: 20, eta: 0.0 }, SamplerKind::Ddpm { variance: Variance::BetaTilde, final_noise: FinalStepNoise::Paper }];
    // An oracle for an in-range x0 (tanh of noise): clipping changes nothing.
    let x0 = NoiseRng::new(3).randn((1, 3, 4, 4), &Device::Cpu).unwrap().tanh().unwrap();
    let sched = s.clone();
    let oracle = move |x_t: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
        let t0 = t.to_vec1::<u32>()?[0] as usize;
        let a = sched.alphas_cumprod_sqrt[t0] as f64;
        let b = sched.one_minus_alphas_cumprod_sqrt[t0] as f64;
        x_t.broadcast_sub(&x0.affine(a, 0.0)?)?.affine(1.0 / b, 0.0)
    };
    // A predictor of zero noise: its x0 estimate x_t / sqrt(abar_t) is far out of range, and
    // the unclipped trajectory grows with it (DDIM: x_T / sqrt(abar_T), ~150x). Clipped, every
    // step starts from an x0 in [-1, 1], so the states the network sees stay bounded.
    let largest = std::cell::Cell::new(0f32);
    let zero = |x_t: &Tensor, _t: &Tensor| {
        largest.set(largest.get().max(x_t.abs()?.max_all()?.to_scalar::<f32>()?));
        x_t.zeros_like()
    };
    for kind in &kinds {
        let run = |clip: bool| Sampler::new(&oracle, &s, (3, 4, 4), &Device::Cpu).clip_x0(clip).sample(3, kind, 5).unwrap();
        let d = run(false).sub(&run(true)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-3, "{kind:?}: clipping an in-range x0 changed the samples by {d}");
        let mut seen = [0f32; 2];
        for (i, clip) in [false, true].into_iter().enumerate() {
            largest.set(0.0);
            Sampler::new(zero, &s, (3, 4, 4), &Device::Cpu).clip_x0(clip).sample(3, kind, 5).unwrap();
            seen[i] = largest.get();
        }
        assert!(seen[0] > 20.0 && seen[1] < 6.0, "{kind:?}: largest |x_t| unclipped {} / clipped {}", seen[0], seen[1]);
    }
}

#[test]
fn a_schedule_of_another_length_and_wrong_images_are_errors() {
    let model = tiny_unet(0);
    let short = short_schedule();
    let e = Sampler::for_unet(&model, &short).sample(1, &DDIM10, 0).unwrap_err().to_string();
    assert!(e.contains("100 steps but the model was trained with 1000"), "{e}");
    let s = Schedule::reference();
    let sampler = Sampler::for_unet(&model, &s);
    // x_T of another image size, or an empty batch: named, not a shape error inside the model.
    let odd = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(sampler.sample_from(&odd, &DDIM10, 0, |_, _| {}).unwrap_err().to_string().contains("x_t must be"));
    let empty = Tensor::zeros((0, 3, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(sampler.sample_from(&empty, &DDIM10, 0, |_, _| {}).is_err());
    assert!(sampler.interpolate(0, 4, 10, 0).unwrap_err().to_string().contains("at least 1 row"));
    // An f64 x_T samples like its f32 value.
    let x = NoiseRng::new(1).randn((2, 3, 16, 16), &Device::Cpu).unwrap();
    let a = sampler.sample_from(&x, &DDIM10, 0, |_, _| {}).unwrap();
    let b = sampler.sample_from(&x.to_dtype(candle_core::DType::F64).unwrap(), &DDIM10, 0, |_, _| {}).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
}
