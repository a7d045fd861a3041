//! The presets and the config plumbing.

use trainer::{Precision, RunConfig, StepEngine};

#[test]
fn anime64_preset_is_the_reference_default() {
    let c = RunConfig::from_name_or_path("anime64").unwrap();
    assert_eq!(c, RunConfig::default());
    assert_eq!(c.unet, unet::UNetConfig::reference());
    let t = &c.train;
    assert_eq!((t.batch_size, t.seed, t.epochs), (128, 999, 500));
    assert_eq!((t.lr, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay), (1e-4, 0.9, 0.999, 1e-8, 0.0));
    assert_eq!((t.grad_clip, t.ema_decay, t.warmup_steps), (None, None, 0));
    assert_eq!((c.data.val_frac, c.data.test_frac, c.data.split_seed, c.data.hflip), (0.025, 0.025, 999, false));
    assert_eq!(c.log.sample_count, 256);
    // The file on disk is the same as the one compiled in.
    let disk = RunConfig::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/anime64.toml")).unwrap();
    assert_eq!(disk, c);
}

#[test]
fn every_preset_parses_and_validates() {
    for (name, _) in trainer::config::PRESETS {
        let c = RunConfig::from_name_or_path(name).unwrap();
        c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        // Saved config.toml round-trips.
        assert_eq!(RunConfig::from_toml_str(&c.to_toml_string(), name).unwrap(), c, "{name}");
    }
    let cifar = RunConfig::from_name_or_path("cifar10").unwrap();
    assert_eq!(cifar.unet, unet::UNetConfig { image_size: 64, ..unet::UNetConfig::cifar10() });
    assert_eq!((cifar.train.ema(), cifar.train.clip(), cifar.train.warmup_steps), (Some(0.9999), Some(1.0), 5000));
}

#[test]
fn overrides_and_errors() {
    let mut c = RunConfig::default();
    c.set("train.lr", "2e-4").unwrap();
    c.set("unet.ch_mult", "[1, 2]").unwrap();
    c.set("data.path", "/tmp/some where").unwrap();
    c.set("train.grad_clip", "1").unwrap();
    assert_eq!((c.train.lr, c.unet.ch_mult.clone(), c.data.path.as_str(), c.train.clip()), (2e-4, vec![1, 2], "/tmp/some where", Some(1.0)));
    assert!(c.set("train.nope", "1").unwrap_err().to_string().contains("nope"));
    assert!(c.set("train.batch_size", "\"big\"").is_err());
    let e = RunConfig::from_toml_str("[unet]\nch = 32\n", "x.toml").unwrap_err().to_string();
    assert!(e.starts_with("config: x.toml") && !e.contains('\n'), "{e}");
    let e = RunConfig::from_name_or_path("no-such-preset").unwrap_err().to_string();
    assert!(e.contains("anime64"), "{e}");
    let mut bad = RunConfig::default();
    bad.diffusion.num_steps = 500;
    assert!(bad.validate().unwrap_err().to_string().contains("num_steps"));
    for (key, value, says) in [
        ("train.epochs", "0", "train.epochs"),
        ("train.max_steps", "0", "train.max_steps"),
        ("train.max_minutes", "-1", "train.max_minutes"),
        // Negative values used to pass as "off".
        ("train.ema_decay", "-1", "train.ema_decay"),
        ("train.grad_clip", "-1", "train.grad_clip"),
        ("train.lr", "nan", "train.lr"),
        ("train.adam_eps", "nan", "train.adam_eps"),
        ("train.adam_eps", "inf", "train.adam_eps"),
        ("train.weight_decay", "inf", "train.weight_decay"),
        ("checkpoint.every_minutes", "-1", "checkpoint.every_minutes"),
    ] {
        let mut c = RunConfig::default();
        c.set(key, value).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(says), "{key} = {value}: {e}");
    }
    // What may and may not change on resume, with the values as written (unet.dropout is an
    // f32: 0.1, not 0.10000000149011612).
    let saved = RunConfig::default();
    let mut now = saved.clone();
    now.set("train.lr", "2e-4").unwrap();
    let w = now.check_resume(&saved, std::path::Path::new("state.json")).unwrap();
    assert!(w.len() == 1 && w[0].contains("train.lr changed on resume: 0.0001 -> 0.0002"), "{w:?}");
    // What a step costs on the device may change too (a GPU with less memory), with a warning.
    let mut moved = saved.clone();
    moved.set("train.precision", "\"bf16\"").unwrap();
    moved.set("train.batch_size", "64").unwrap();
    let w = moved.check_resume(&saved, std::path::Path::new("state.json")).unwrap();
    assert!(w.len() == 2 && w.iter().any(|w| w.contains("train.precision changed on resume: \"f32\" -> \"bf16\"")), "{w:?}");
    now.set("unet.dropout", "0.2").unwrap();
    let e = now.check_resume(&saved, std::path::Path::new("state.json")).unwrap_err().to_string();
    assert!(e.contains("unet.dropout is 0.1 in state.json but 0.2 now:"), "{e}");
    // Another preset differs in many keys at once: all are counted, not only the first.
    let tiny = RunConfig::from_name_or_path("tiny").unwrap();
    let e = tiny.check_resume(&saved, std::path::Path::new("state.json")).unwrap_err().to_string();
    assert!(e.contains(" more: ") && e.contains("unet.ch,") && e.contains("resume without --config"), "{e}");
    // Digits TOML cannot hold are not taken for a string.
    let e = RunConfig::default().set("train.micro_batch_size", "99999999999999999999").unwrap_err().to_string();
    assert!(e.contains("too large") && !e.contains("string"), "{e}");
    let mut c = RunConfig::default();
    c.set("train.micro_batch_size", "32").unwrap();
    assert_eq!(c.train.micro_batch(128), 32);
    let mut bf = RunConfig::from_name_or_path("tiny").unwrap();
    bf.train.precision = Precision::Bf16;
    let e = StepEngine::new(&bf, &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("bf16") && e.contains("CUDA"), "{e}");
}

#[test]
fn a_folder_named_like_a_preset_does_not_hide_it() {
    // `prepare-data --out mini64` then `train --config mini64`, from the same folder. The working
    // directory is process-wide: no other test here reads relative paths.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("tiny")).unwrap();
    let before = std::env::current_dir().unwrap();
    std::env::set_current_dir(tmp.path()).unwrap();
    let preset = RunConfig::from_name_or_path("tiny");
    std::env::set_current_dir(before).unwrap();
    assert_eq!(preset.unwrap().unet, RunConfig::from_toml_str(trainer::config::PRESETS.iter().find(|p| p.0 == "tiny").unwrap().1, "tiny").unwrap().unet);
    // A folder that is no preset: said so, in one line.
    let e = RunConfig::from_name_or_path(&tmp.path().join("tiny").display().to_string()).unwrap_err().to_string();
    assert!(e.contains("is a folder, not a TOML file") && !e.contains('\n'), "{e}");
    // A pipe is read (`--config <(...)`), not taken for a folder.
    #[cfg(unix)]
    {
        let fifo = tmp.path().join("cfg.fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let text = trainer::config::PRESETS.iter().find(|p| p.0 == "tiny").unwrap().1;
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, text).unwrap())
        };
        let from_pipe = RunConfig::from_name_or_path(&fifo.display().to_string()).unwrap();
        writer.join().unwrap();
        assert_eq!(from_pipe.unet, RunConfig::from_toml_str(text, "tiny").unwrap().unet);
    }
}
