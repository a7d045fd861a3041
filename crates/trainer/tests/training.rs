//! End-to-end training tests on tiny configs and generated data (CPU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anime_data::PackedDataset;
use candle_core::{Device, Tensor};
use trainer::checkpoint::{self, MODEL_FILE, OPTIMIZER_FILE};
use trainer::{RunConfig, StepPipeline, StopReason, TrainError, TrainOptions, Trainer};

/// `n` generated `size`x`size` faces packed into `dir/packed.safetensors`.
fn dataset(dir: &Path, n: usize, size: usize) -> PathBuf {
    let imgs = anime_data::synthetic_faces(n, size, 7);
    let names = (0..n).map(|i| format!("face_{i:05}.png")).collect();
    let pixels: Vec<u8> = imgs.iter().flat_map(|im| im.as_raw().iter().copied()).collect();
    let ds = PackedDataset::from_images(names, size, pixels).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    ds.save(&dir.join("packed.safetensors")).unwrap();
    dir.to_path_buf()
}

/// The tiny preset at 8x8 with every optional feature on (EMA, clipping, warm-up, flips,
/// validation), batch 4 over 22 training images: 6 steps per epoch, the last one a batch of 2.
fn small_cfg(data: &Path) -> RunConfig {
    let mut c = RunConfig::from_name_or_path("tiny").unwrap();
    c.unet.image_size = 8;
    c.data.path = data.display().to_string();
    c.data.hflip = true;
    c.data.val_frac = 0.1;
    c.data.test_frac = 0.0;
    c.train.batch_size = 4;
    c.train.epochs = 3;
    c.train.max_steps = Some(10);
    c.train.grad_clip = Some(1.0);
    c.train.warmup_steps = 3;
    c.train.ema_decay = Some(0.99);
    c.train.lr = 1e-3;
    c.checkpoint.every_minutes = 0.0;
    c.checkpoint.every_steps = 0;
    c.checkpoint.keep_last = 3;
    c.log.every_steps = 2;
    c.log.sample_every_epochs = 0;
    c.log.tensorboard = false;
    c
}

fn run(cfg: &RunConfig, dir: &Path, opts: TrainOptions) -> Result<trainer::TrainSummary, TrainError> {
    let mut t = Trainer::new(cfg.clone(), dir, &Device::Cpu, opts)?;
    t.run(Arc::new(AtomicBool::new(false)))
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn assert_bit_equal(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    let mut names: Vec<&String> = ta.keys().collect();
    names.sort();
    assert_eq!(names.len(), tb.len(), "{} vs {}", a.display(), b.display());
    for name in names {
        let x = ta[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = tb.get(name).unwrap_or_else(|| panic!("{name} missing in {}", b.display()));
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let same = x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "tensor {name} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn resumed_runs_end_bit_for_bit_like_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 24, 8);
    let cfg = small_cfg(&data);

    // A: uninterrupted, with preview grids and TensorBoard (neither may touch the training RNG).
    let mut cfg_a = cfg.clone();
    cfg_a.log.sample_every_epochs = 1;
    cfg_a.log.sample_count = 4;
    cfg_a.log.sample_steps = 3;
    cfg_a.log.tensorboard = true;
    let a = tmp.path().join("a");
    let sa = run(&cfg_a, &a, TrainOptions::default()).unwrap();
    assert_eq!(sa.reason, StopReason::MaxSteps);
    assert_eq!(sa.steps, 10);
    assert_eq!(sa.epochs, 1, "6 steps per epoch: the run stops inside the second epoch");

    // B: stopped by the flag (Ctrl-C) after 3 steps, mid-epoch, then resumed.
    let b = tmp.path().join("b");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let opts = TrainOptions {
        on_step: Some(Box::new(move |m| {
            if m.step == 3 {
                flag.store(true, Ordering::SeqCst);
            }
        })),
        ..Default::default()
    };
    let mut t = Trainer::new(cfg.clone(), &b, &Device::Cpu, opts).unwrap();
    let sb = t.run(stop).unwrap();
    assert_eq!((sb.reason, sb.steps), (StopReason::Interrupted, 3));
    drop(t);
    let sb = run(&cfg, &b, TrainOptions { require_resume: true, ..Default::default() }).unwrap();
    assert_eq!((sb.resumed_from, sb.steps), (Some(3), 10));

    // C: periodic checkpoints every 2 steps, then a crash after step 5 (no final save): resumes
    // from step 4.
    let c = tmp.path().join("c");
    let mut cfg_c = cfg.clone();
    cfg_c.checkpoint.every_steps = 2;
    let mut t = Trainer::new(cfg_c.clone(), &c, &Device::Cpu, TrainOptions { crash_after_step: Some(5), ..Default::default() }).unwrap();
    let err = t.run(Arc::new(AtomicBool::new(false))).unwrap_err();
    assert!(matches!(err, TrainError::SimulatedCrash(5)));
    // What the command line says is kept.
    assert_eq!(t.last_checkpoint(), Some((4, checkpoint::checkpoint_dir(&c, 4).as_path())));
    drop(t);
    assert_eq!(checkpoint::list(&c).last().unwrap().0, 4);
    let sc = run(&cfg_c, &c, TrainOptions::default()).unwrap();
    assert_eq!((sc.resumed_from, sc.steps), (Some(4), 10));

    for other in [&b, &c] {
        for file in [MODEL_FILE, OPTIMIZER_FILE] {
            assert_bit_equal(&checkpoint::checkpoint_dir(&a, 10).join(file), &checkpoint::checkpoint_dir(other, 10).join(file));
        }
        let sa = checkpoint::verify(&checkpoint::checkpoint_dir(&a, 10)).unwrap();
        let so = checkpoint::verify(&checkpoint::checkpoint_dir(other, 10)).unwrap();
        assert_eq!((sa.rng, sa.epoch, sa.position), (so.rng, so.epoch, so.position));
        assert_bit_equal(&a.join(MODEL_FILE), &other.join(MODEL_FILE));
        // Byte for byte too (sorted headers), so that `sha256sum` can confirm it.
        for file in [MODEL_FILE, OPTIMIZER_FILE] {
            let read = |run: &Path| std::fs::read(checkpoint::checkpoint_dir(run, 10).join(file)).unwrap();
            assert!(read(&a) == read(other), "{file} differs in bytes from {}", other.display());
        }
    }
    // The model file is the sampler's: EMA copies and the diffusion config in its metadata.
    let w = unet::ModelWeights::load(&a.join(MODEL_FILE)).unwrap();
    assert!(w.has_ema());
    assert!(w.metadata.contains_key("diffusion_config"));
    w.build(&Device::Cpu, true).unwrap();
    // Keep-last pruning, logs and previews.
    assert!(checkpoint::list(&c).len() <= 3);
    let metrics = std::fs::read_to_string(c.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=5).map(|s| 2 * s).collect::<Vec<_>>(), "metrics after a crash are cut back to the checkpoint");
    assert!(metrics.contains("val_loss"));
    // The logged means are those of the uninterrupted run: B's window of steps 3..4 and its
    // first epoch (steps 1..6) span its stop after step 3, C's first epoch its crash after step 5
    // (back to step 4). Only the clock differs.
    let logged = |run: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for clock in ["time_s", "images_per_s"] {
                    v.as_object_mut().unwrap().remove(clock);
                }
                v
            })
            .collect()
    };
    assert_eq!(logged(&a).len(), 6, "5 step lines and 1 epoch line");
    assert_eq!(logged(&b), logged(&a));
    assert_eq!(logged(&c), logged(&a));
    assert!(a.join("loss.png").exists());
    assert!(a.join("samples/epoch_0001.png").exists());
    assert!(a.join("config.toml").exists());
    let tb: Vec<_> = std::fs::read_dir(a.join("tb")).unwrap().flatten().collect();
    assert_eq!(tb.len(), 1);
    let recs = trainer::tensorboard::parse_records(&std::fs::read(tb[0].path()).unwrap()).unwrap();
    assert!(recs.len() > 20, "{} TensorBoard records", recs.len());
}

/// A run of 4 steps in `tmp/run` on `tmp/data`, with checkpoints at steps 2 and 4.
fn four_steps_checkpointed_at_2_and_4(tmp: &Path) -> (PathBuf, RunConfig, PathBuf) {
    let data = dataset(&tmp.join("data"), 24, 8);
    let mut cfg = small_cfg(&data);
    cfg.checkpoint.every_steps = 2;
    cfg.train.max_steps = Some(4);
    let dir = tmp.join("run");
    run(&cfg, &dir, TrainOptions::default()).unwrap();
    (data, cfg, dir)
}

#[test]
fn corrupt_latest_checkpoint_falls_back_mismatch_and_divergence_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, cfg, dir) = four_steps_checkpointed_at_2_and_4(tmp.path());
    assert_eq!(checkpoint::list(&dir).iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);

    // Truncate the latest checkpoint's optimizer file: the run resumes from step 2, warning.
    let opt = checkpoint::checkpoint_dir(&dir, 4).join(OPTIMIZER_FILE);
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&opt).unwrap().set_len(len / 2).unwrap();
    let t = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert_eq!(t.steps_done(), 2);
    assert_eq!(t.warnings().len(), 1);
    assert!(t.warnings()[0].contains("step_00000004") && t.warnings()[0].contains("truncated"), "{:?}", t.warnings());
    drop(t);
    // It is moved aside, kept but no longer a checkpoint: pruning (keep 3) must not count it
    // and delete a good one instead.
    assert_eq!(checkpoint::list(&dir).iter().map(|c| c.0).collect::<Vec<_>>(), vec![2]);
    let aside = dir.join("checkpoints/step_00000004.unusable");
    assert!(aside.join(OPTIMIZER_FILE).exists());
    // Continue to step 4 again (replacing the corrupt one).
    run(&cfg, &dir, TrainOptions::default()).unwrap();
    assert!(checkpoint::verify(&checkpoint::checkpoint_dir(&dir, 4)).is_ok());

    // A different UNet on resume: one-line error naming the key.
    let mut other = cfg.clone();
    other.unet.ch = 64;
    let msg = match Trainer::new(other, &dir, &Device::Cpu, TrainOptions::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("resumed with another unet"),
    };
    assert!(msg.contains("config mismatch") && msg.contains("unet.ch"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    // Another batch size (a run moved to a GPU with less memory) resumes with a warning, from
    // the same image of the epoch: step 4 at batch 4 was 16 of the 22 training images, so one
    // step at batch 8 ends the epoch where one at batch 4 would not.
    let mut other = cfg.clone();
    other.train.batch_size = 8;
    let mut t = Trainer::new(other, &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert_eq!(t.steps_done(), 4);
    assert!(t.warnings().iter().any(|w| w.contains("train.batch_size changed on resume: 4 -> 8")), "{:?}", t.warnings());
    assert!(!t.epoch_done());
    t.step().unwrap();
    assert!(t.epoch_done(), "the step took the epoch's last 6 images");
    drop(t);

    // lr = 1e30 diverges: a clear error, and the last good checkpoint (step 4) stays the latest.
    let before = std::fs::read(checkpoint::checkpoint_dir(&dir, 4).join(MODEL_FILE)).unwrap();
    let mut bad = cfg.clone();
    bad.train.lr = 1e30;
    bad.train.grad_clip = None;
    bad.train.warmup_steps = 0;
    bad.train.max_steps = Some(20);
    let err = run(&bad, &dir, TrainOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TrainError::NonFinite(_)), "{msg}");
    assert!(msg.contains("diverged") && msg.contains("step 4"), "{msg}");
    assert_eq!(checkpoint::list(&dir).last().unwrap().0, 4);
    assert_eq!(std::fs::read(checkpoint::checkpoint_dir(&dir, 4).join(MODEL_FILE)).unwrap(), before);
    assert!(checkpoint::verify(&checkpoint::checkpoint_dir(&dir, 4)).is_ok());

    // --resume on a folder without checkpoints.
    let none = tmp.path().join("none");
    let r = Trainer::new(cfg.clone(), &none, &Device::Cpu, TrainOptions { require_resume: true, ..Default::default() });
    assert!(r.is_err());
    assert!(!none.exists(), "a failed --resume leaves nothing behind");

    // A folder holding a model but no checkpoints (deleted, or copied without them): refused,
    // and left as it was. A file as the run folder: refused.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(dir.join(MODEL_FILE), bare.join(MODEL_FILE)).unwrap();
    let model = std::fs::read(bare.join(MODEL_FILE)).unwrap();
    let err = |run: &Path| Trainer::new(cfg.clone(), run, &Device::Cpu, TrainOptions::default()).err().expect("refused").to_string();
    let e = err(&bare);
    assert!(e.contains("no checkpoint to resume from") && !e.contains('\n'), "{e}");
    assert_eq!(std::fs::read(bare.join(MODEL_FILE)).unwrap(), model);
    assert_eq!(std::fs::read_dir(&bare).unwrap().count(), 1);
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(err(&file).contains("is a file"));

    // A model of other channels than the RGB data: refused before anything is written, naming
    // the key (it used to fail at the first step with a convolution shape error).
    let mut gray = cfg.clone();
    gray.unet.image_channels = 1;
    let run_dir = tmp.path().join("gray");
    let e = Trainer::new(gray, &run_dir, &Device::Cpu, TrainOptions::default()).err().expect("refused").to_string();
    assert!(e.contains("unet.image_channels is 1") && !e.contains('\n'), "{e}");
    assert!(!run_dir.exists());
}

#[test]
fn tiny_preset_loss_falls() {
    const STEPS: u64 = 60;
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 64, 16);
    let mut cfg = RunConfig::from_name_or_path("tiny").unwrap();
    cfg.data.path = data.display().to_string();
    cfg.data.val_frac = 0.0;
    cfg.train.max_steps = Some(STEPS);
    cfg.train.batch_size = 8;
    cfg.train.lr = 2e-3;
    cfg.train.validate = false;
    cfg.log.sample_every_epochs = 0;
    cfg.log.tensorboard = false;
    let losses = Arc::new(Mutex::new(Vec::new()));
    let l2 = losses.clone();
    let opts = TrainOptions { on_step: Some(Box::new(move |m| l2.lock().unwrap().push(m.loss))), ..Default::default() };
    let s = run(&cfg, &tmp.path().join("run"), opts).unwrap();
    assert_eq!(s.steps, STEPS);
    let l = losses.lock().unwrap();
    let first: f32 = l[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = l[l.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!("tiny preset: first 10 steps {first:.4}, last 10 {last:.4}, {:.1} img/s, {:.1} s", s.images_per_s, s.session_seconds);
    assert!(last < 0.5 * first, "loss did not fall: {first} -> {last}");
}

#[test]
fn ema_does_not_keep_past_steps_alive() {
    // Each EMA update once recorded the previous EMA as its input: three parameter-sized
    // tensors a step stayed reachable, and a 64x64 CPU run was killed for memory after ~1400
    // steps. Untracked tensors carry no history.
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 22, 8);
    let cfg = small_cfg(&data);
    let mut engine = trainer::StepEngine::new(&cfg, &Device::Cpu).unwrap();
    let mut rng = diffusion::NoiseRng::new(3);
    let x0 = rng.randn((4, 3, 8, 8), &Device::Cpu).unwrap().tanh().unwrap();
    for _ in 0..3 {
        engine.train_step(&x0, &mut rng).unwrap();
    }
    let ema = engine.ema.as_ref().expect("small_cfg turns EMA on");
    assert!(!ema.is_empty());
    for (e, v) in ema.iter().zip(engine.opt.vars()) {
        assert!(!e.track_op(), "an EMA tensor is a graph node");
        // Still an average of the weights: close to them after three steps.
        let diff = (e - v.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 0.1, "EMA {diff} away from the weights");
    }
}

#[test]
fn a_run_folder_in_use_is_refused_and_freed_when_its_trainer_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 24, 8);
    let mut cfg = small_cfg(&data);
    cfg.train.max_steps = Some(2);
    let dir = tmp.path().join("run");
    let first = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    // A second trainer (a second terminal, a re-run script) would prune the first one's
    // checkpoints and interleave the metrics.
    let err = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).err().expect("second trainer refused");
    let msg = err.to_string();
    let pid = std::process::id().to_string();
    assert!(msg.contains("in use by another process") && msg.contains(&pid) && !msg.contains('\n'), "{msg}");
    drop(first);
    // A demo deletes and rewrites its folder: a second one into a folder in use is refused
    // before it touches anything.
    let demo = tmp.path().join("demo");
    let held = checkpoint::RunLock::acquire(&demo).unwrap();
    let opts = trainer::demo::DemoOptions { out: demo.clone(), minutes: 0.01, images: 8, samples: 4, progress: false, ..Default::default() };
    let e = trainer::demo::run_demo(&opts, &Device::Cpu, Arc::new(AtomicBool::new(false))).err().expect("refused").to_string();
    assert!(e.contains("in use by another process"), "{e}");
    assert_eq!(std::fs::read_dir(&demo).unwrap().count(), 1, "only the lock file");
    drop(held);
    // Nor when a trainer uses its run folder (`train --run <out>/run`).
    let held = checkpoint::RunLock::acquire(&demo.join("run")).unwrap();
    let e = trainer::demo::run_demo(&opts, &Device::Cpu, Arc::new(AtomicBool::new(false))).err().expect("refused").to_string();
    assert!(e.contains("run is in use by another process"), "{e}");
    assert!(!demo.join("data").exists(), "refused before writing its data");
    drop(held);
    // The lock file stays behind, but without its lock it blocks nothing (as after a kill -9).
    assert!(dir.join(checkpoint::LOCK_FILE).exists());
    run(&cfg, &dir, TrainOptions::default()).unwrap();
    let again = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert_eq!(again.steps_done(), 2);
}

#[test]
fn resume_repairs_a_stale_run_model_and_distrusts_a_state_json_from_another_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg, dir) = four_steps_checkpointed_at_2_and_4(tmp.path());
    let step = |n| checkpoint::checkpoint_dir(&dir, n);

    // As after a save that failed between the checkpoint and the run's model (a full disk): the
    // run's model is an older one, and a resume that has nothing left to do must still fix it.
    std::fs::copy(step(2).join(MODEL_FILE), dir.join(MODEL_FILE)).unwrap();
    let t = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert!(t.warnings().iter().any(|w| w.contains("was not the model of")), "{:?}", t.warnings());
    drop(t);
    assert_eq!(std::fs::read(dir.join(MODEL_FILE)).unwrap(), std::fs::read(step(4).join(MODEL_FILE)).unwrap());
    let t = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());
    drop(t);
    // A damaged run model with an intact header (one flipped bit in the weights): repaired too.
    let mut bytes = std::fs::read(dir.join(MODEL_FILE)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(dir.join(MODEL_FILE), &bytes).unwrap();
    let t = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert!(t.warnings().iter().any(|w| w.contains("was not the model of")), "{:?}", t.warnings());
    drop(t);
    assert_eq!(std::fs::read(dir.join(MODEL_FILE)).unwrap(), std::fs::read(step(4).join(MODEL_FILE)).unwrap());

    // The same number of images, but other ones (prepared again with another crop, say):
    // said, not silent. The same images under another path: nothing to say.
    let (names, size, mut pixels) = PackedDataset::load(&data.join("packed.safetensors")).unwrap().into_parts();
    std::fs::create_dir_all(tmp.path().join("same")).unwrap();
    PackedDataset::from_images(names.clone(), size, pixels.clone()).unwrap().save(&tmp.path().join("same/packed.safetensors")).unwrap();
    pixels[100] ^= 0x40;
    std::fs::create_dir_all(tmp.path().join("other")).unwrap();
    PackedDataset::from_images(names, size, pixels).unwrap().save(&tmp.path().join("other/packed.safetensors")).unwrap();
    for (folder, warned) in [("same", false), ("other", true)] {
        let mut moved = cfg.clone();
        moved.data.path = tmp.path().join(folder).display().to_string();
        let t = Trainer::new(moved, &dir, &Device::Cpu, TrainOptions::default()).unwrap();
        assert_eq!(t.warnings().iter().any(|w| w.contains("other images than the run was trained on")), warned, "{folder}: {:?}", t.warnings());
    }

    // A session that failed at once with a bad override (lr 1e30 diverges before any save)
    // has written it to config.toml: the next plain resume takes the checkpoint's config.
    let mut bad = cfg.clone();
    bad.train.lr = 1e30;
    std::fs::write(dir.join("config.toml"), bad.to_toml_string()).unwrap();
    assert_eq!(trainer::resolve_config(&dir, None, &[]).unwrap().train.lr, cfg.train.lr);
    let overridden = trainer::resolve_config(&dir, None, &[("train.lr".into(), "0.5".into())]).unwrap();
    assert_eq!(overridden.train.lr, 0.5);
    // Before the first checkpoint, config.toml is all there is.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("config.toml"), bad.to_toml_string()).unwrap();
    assert_eq!(trainer::resolve_config(&fresh, None, &[]).unwrap().train.lr, 1e30);

    // step_4's state.json put in step_2's place (no checksum covers it): step_2 is not trusted.
    std::fs::copy(step(4).join(checkpoint::STATE_FILE), step(2).join(checkpoint::STATE_FILE)).unwrap();
    let e = checkpoint::verify(&step(2)).unwrap_err().to_string();
    assert!(e.contains("says step 4 in the folder of step 2") && e.contains("step_"), "{e}");
    assert!(checkpoint::verify(&step(4)).is_ok());
    // Earlier builds took a negative ema_decay / grad_clip for "off"; such runs must resume.
    let text = std::fs::read_to_string(step(4).join(checkpoint::STATE_FILE)).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["config"]["train"]["ema_decay"] = (-1.0).into();
    state["config"]["train"]["grad_clip"] = (-1.0).into();
    std::fs::write(step(4).join(checkpoint::STATE_FILE), state.to_string()).unwrap();
    let resolved = trainer::resolve_config(&dir, None, &[]).unwrap();
    assert_eq!((resolved.train.ema_decay, resolved.train.grad_clip), (Some(0.0), Some(0.0)));
    assert_eq!(checkpoint::verify(&step(4)).unwrap().config.train.ema_decay, Some(0.0));
    // A position past the epoch's images would skip the rest of the epoch silently.
    let text = std::fs::read_to_string(step(4).join(checkpoint::STATE_FILE)).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["position"] = 100_000.into();
    std::fs::write(step(4).join(checkpoint::STATE_FILE), state.to_string()).unwrap();
    let e = checkpoint::verify(&step(4)).unwrap_err().to_string();
    assert!(e.contains("image 100000 of") && e.contains("impossible"), "{e}");
}

#[test]
fn a_training_step_on_a_batch_of_the_wrong_shape_is_an_error() {
    let cfg = small_cfg(Path::new("unused"));
    let mut engine = trainer::StepEngine::new(&cfg, &Device::Cpu).unwrap();
    let mut rng = diffusion::NoiseRng::new(0);
    let s = cfg.unet.image_size;
    for (dims, dtype) in [
        ((0, 3, s, s), candle_core::DType::F32),
        ((2, 3, s / 2, s / 2), candle_core::DType::F32),
        ((2, 1, s, s), candle_core::DType::F32),
        ((2, 3, s, s), candle_core::DType::F64),
    ] {
        let x = Tensor::zeros(dims, dtype, &Device::Cpu).unwrap();
        let e = engine.train_step(&x, &mut rng).unwrap_err().to_string();
        assert!(e.contains("a training batch must be f32 [B >= 1, 3,"), "{dims:?} {dtype:?}: {e}");
    }
    let x = Tensor::zeros((2, 3, s, s), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(engine.train_step(&x, &mut rng).is_ok());
}

/// Gradient accumulation is the same step: each part of the batch gets the timesteps, noise and
/// dropout masks its images get in the whole batch, so the weighted parts sum to the whole
/// batch's loss and gradients (up to float rounding), whatever the split.
#[test]
fn micro_batches_give_the_whole_batchs_loss_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 12, 8);
    let mut cfg = small_cfg(&data);
    cfg.unet.dropout = 0.3;
    // The whole batch of 5 in one pass when the micro-batch is unset.
    cfg.train.batch_size = 5;
    let ds = PackedDataset::load(&data.join("packed.safetensors")).unwrap();
    let images = anime_data::DeviceImages::new(&ds, &Device::Cpu).unwrap();
    let x0 = images.batch(&[0, 1, 2, 3, 4], None).unwrap();
    let engine = |micro: Option<usize>| {
        let mut c = cfg.clone();
        c.train.micro_batch_size = micro;
        trainer::StepEngine::new(&c, &Device::Cpu).unwrap()
    };
    let whole = engine(None);
    let mut rng = diffusion::NoiseRng::new(5);
    let (loss, grads) = whole.loss_and_gradients(&x0, &mut rng).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    let after = rng.next_u64();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let largest = grads.iter().flat_map(flat).fold(0f32, |m, v| m.max(v.abs()));
    assert!(largest > 0.0);
    // 0 is the whole batch; 9 is more than the batch.
    for micro in [Some(0), Some(1), Some(2), Some(3), Some(9)] {
        let part = engine(micro);
        let mut rng = diffusion::NoiseRng::new(5);
        let (l, g) = part.loss_and_gradients(&x0, &mut rng).unwrap();
        let l = l.to_scalar::<f32>().unwrap();
        assert!((l - loss).abs() <= 1e-5 * loss, "micro-batch {micro:?}: loss {l} against {loss}");
        assert_eq!(rng.next_u64(), after, "micro-batch {micro:?} drew from the stream differently");
        assert_eq!(g.len(), grads.len());
        for (i, (a, b)) in g.iter().zip(&grads).enumerate() {
            let d = flat(a).iter().zip(flat(b)).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(d <= 1e-5 * largest, "micro-batch {micro:?}: gradient {} differs by {d} (largest {largest})", part.opt.names()[i]);
        }
    }
    // Unset means the whole batch in one pass, whatever its size against train.batch_size:
    // the same bits as above.
    let mut c = cfg.clone();
    c.train.batch_size = 2;
    let (l, g) = trainer::StepEngine::new(&c, &Device::Cpu).unwrap().loss_and_gradients(&x0, &mut diffusion::NoiseRng::new(5)).unwrap();
    assert_eq!(l.to_scalar::<f32>().unwrap().to_bits(), loss.to_bits());
    assert!(g.iter().zip(&grads).all(|(a, b)| flat(a).iter().zip(flat(b)).all(|(p, q)| p.to_bits() == q.to_bits())), "an unset micro-batch split the batch");
    // The validation loss is computed in parts too, from the same draws.
    let val: Vec<usize> = (5..12).collect();
    let full = whole.eval_loss(&images, &val, 4, 1).unwrap();
    let parts = engine(Some(3)).eval_loss(&images, &val, 4, 1).unwrap();
    assert!((full - parts).abs() <= 1e-6 * full, "val loss {parts} in parts against {full}");
}

/// The micro-batch may change when a run resumes (a GPU with less memory), without a warning:
/// the steps stay the same.
#[test]
fn a_run_resumes_with_another_micro_batch_without_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 24, 8);
    let mut cfg = small_cfg(&data);
    cfg.train.max_steps = Some(2);
    let dir = tmp.path().join("run");
    run(&cfg, &dir, TrainOptions::default()).unwrap();
    cfg.train.max_steps = Some(3);
    cfg.train.micro_batch_size = Some(1);
    let mut t = Trainer::new(cfg.clone(), &dir, &Device::Cpu, TrainOptions::default()).unwrap();
    assert_eq!(t.resumed_from(), Some(2));
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());
    let s = t.run(Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(s.steps, 3);
    let saved = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(saved.contains("micro_batch_size = 1"), "{saved}");
}

/// Queueing the next step before reading this one's loss (what a CUDA run does by default) is
/// the same run to the bit: on the CPU, `StepPipeline::Always` computes the next step's loss and
/// gradients before a step returns, across an epoch's last (smaller) batch, a stop and resume,
/// weights loaded between steps, and a step that diverges.
#[test]
fn a_pipelined_run_is_the_same_run_to_the_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("data"), 24, 8);
    let cfg = small_cfg(&data);
    let trainer = |cfg: &RunConfig, dir: &Path, pipeline: StepPipeline, opts: TrainOptions| {
        let mut t = Trainer::new(cfg.clone(), dir, &Device::Cpu, opts).unwrap();
        t.engine_mut().set_pipeline(pipeline);
        t
    };
    let recorder = || {
        let losses = Arc::new(Mutex::new(Vec::new()));
        let l = losses.clone();
        (losses, TrainOptions { on_step: Some(Box::new(move |m| l.lock().unwrap().push(m.loss.to_bits()))), ..Default::default() })
    };

    // Whole runs (10 steps, two epochs): plain, then pipelined and stopped after step 3, then
    // resumed pipelined.
    let (plain_losses, opts) = recorder();
    let plain = tmp.path().join("plain");
    trainer(&cfg, &plain, StepPipeline::Off, opts).run(Arc::new(AtomicBool::new(false))).unwrap();
    let piped = tmp.path().join("piped");
    let (losses, mut opts) = recorder();
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, l) = (stop.clone(), losses.clone());
    opts.on_step = Some(Box::new(move |m| {
        l.lock().unwrap().push(m.loss.to_bits());
        if m.step == 3 {
            flag.store(true, Ordering::SeqCst);
        }
    }));
    let s = trainer(&cfg, &piped, StepPipeline::Always, opts).run(stop).unwrap();
    assert_eq!((s.reason, s.steps), (StopReason::Interrupted, 3));
    let (more, opts) = recorder();
    trainer(&cfg, &piped, StepPipeline::Always, opts).run(Arc::new(AtomicBool::new(false))).unwrap();
    losses.lock().unwrap().extend(more.lock().unwrap().iter());
    assert_eq!(*losses.lock().unwrap(), *plain_losses.lock().unwrap());
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        assert_bit_equal(&checkpoint::checkpoint_dir(&plain, 10).join(file), &checkpoint::checkpoint_dir(&piped, 10).join(file));
    }

    // Step by step, with the weights of step 1 loaded after step 2: the step queued ahead was
    // computed from the weights before the load, and must not be used.
    let by_steps = |pipeline: StepPipeline, dir: &Path| {
        let mut t = trainer(&cfg, dir, pipeline, TrainOptions::default());
        let mut losses = vec![t.step().unwrap().loss];
        let mut w1 = t.engine().weights(Default::default()).unwrap();
        // Copies: these are the variables themselves.
        w1.tensors = w1.tensors.iter().map(|(k, v)| (k.clone(), v.copy().unwrap())).collect();
        losses.push(t.step().unwrap().loss);
        t.engine_mut().load_weights(&w1).unwrap();
        losses.push(t.step().unwrap().loss);
        losses.push(t.step().unwrap().loss);
        (losses, t.engine().opt.vars().iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>())
    };
    let (l_plain, w_plain) = by_steps(StepPipeline::Off, &tmp.path().join("steps-plain"));
    let (l_piped, w_piped) = by_steps(StepPipeline::Always, &tmp.path().join("steps-piped"));
    assert_eq!(l_plain, l_piped);
    assert!(w_plain == w_piped, "the weights differ after a load between pipelined steps");

    // lr = 1e30 diverges at the second step: the same error, at the same step, with the step
    // queued ahead already computed; nothing of the diverged step was saved.
    let mut bad = cfg.clone();
    bad.train.lr = 1e30;
    bad.train.grad_clip = None;
    bad.train.warmup_steps = 0;
    bad.checkpoint.every_steps = 1;
    let diverge = |pipeline: StepPipeline, dir: &Path| {
        let err = trainer(&bad, dir, pipeline, TrainOptions::default()).run(Arc::new(AtomicBool::new(false))).unwrap_err();
        assert!(matches!(err, TrainError::NonFinite(_)), "{err}");
        (err.to_string(), checkpoint::list(dir).last().map(|c| c.0))
    };
    let (plain_bad, piped_bad) = (tmp.path().join("bad-plain"), tmp.path().join("bad-piped"));
    let (e_plain, last_plain) = diverge(StepPipeline::Off, &plain_bad);
    let (e_piped, last_piped) = diverge(StepPipeline::Always, &piped_bad);
    assert_eq!(e_plain.replace("bad-plain", "bad-piped"), e_piped);
    assert!(e_plain.contains("diverged"), "{e_plain}");
    assert_eq!(last_plain, last_piped);
    let last = last_plain.expect("a step before the divergence was checkpointed");
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        assert_bit_equal(&checkpoint::checkpoint_dir(&plain_bad, last).join(file), &checkpoint::checkpoint_dir(&piped_bad, last).join(file));
    }
}

/// `StepEngine::train_steps` (what the bench's loop and the GPU self-test run) takes the same
/// steps as `train_step` one by one, pipelined or not, and stops at a diverging step with the
/// same error and the same state.
#[test]
fn engine_train_steps_are_train_step_in_turn() {
    let cfg = small_cfg(Path::new("unused"));
    let mut images = diffusion::NoiseRng::new(1);
    let batches: Vec<Tensor> = [4, 4, 2, 4].iter().map(|&b| images.randn((b, 3, 8, 8), &Device::Cpu).unwrap().tanh().unwrap()).collect();
    type Outcome = (Vec<u32>, Option<String>, Vec<Vec<f32>>, u64);
    let one_by_one = |cfg: &RunConfig| -> Outcome {
        let mut e = trainer::StepEngine::new(cfg, &Device::Cpu).unwrap();
        let mut rng = diffusion::NoiseRng::new(3);
        let mut losses = Vec::new();
        let mut err = None;
        for x0 in &batches {
            match e.train_step(x0, &mut rng) {
                Ok(o) => losses.push(o.loss.to_bits()),
                Err(x) => {
                    err = Some(x.to_string());
                    break;
                }
            }
        }
        let w = e.opt.vars().iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (losses, err, w, e.opt.step_count())
    };
    let in_turn = |cfg: &RunConfig, pipeline: StepPipeline| -> Outcome {
        let mut e = trainer::StepEngine::new(cfg, &Device::Cpu).unwrap();
        e.set_pipeline(pipeline);
        let mut rng = diffusion::NoiseRng::new(3);
        let mut losses = Vec::new();
        let err = e
            .train_steps(&batches, &mut rng, |_, o| {
                losses.push(o.loss.to_bits());
                Ok(())
            })
            .err()
            .map(|x| x.to_string());
        // The bench's loop reports these: where the host waited.
        let h = e.host_phases();
        assert!(h.draws > 0.0 && h.outcome > 0.0, "{h:?}");
        let w = e.opt.vars().iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (losses, err, w, e.opt.step_count())
    };
    let mut bad = cfg.clone();
    bad.train.lr = 1e30;
    bad.train.grad_clip = None;
    bad.train.warmup_steps = 0;
    for c in [&cfg, &bad] {
        let want = one_by_one(c);
        assert_eq!(want.1.is_some(), c.train.lr > 1.0, "{:?}", want.1);
        for p in [StepPipeline::Off, StepPipeline::Device, StepPipeline::Always] {
            assert!(in_turn(c, p) == want, "lr {}, {p:?}", c.train.lr);
        }
    }
}
