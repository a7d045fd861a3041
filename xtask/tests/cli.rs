//! The command line as a user meets it: exit codes, and one-line errors for bad input.

use std::path::Path;
use std::process::{Command, Output};

fn xtask(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(cwd).output().expect("run xtask")
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].contains(needle), "'{}' does not mention '{needle}'", lines[0]);
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/unet/tests/fixtures")
}

#[test]
fn prepare_data_missing_folder_is_one_line_with_the_dataset_url() {
    let dir = tempfile::tempdir().unwrap();
    let out = xtask(&["prepare-data", "--raw", "nope/images", "--out", "processed"], dir.path());
    assert_one_line_error(&out, "kaggle.com/datasets/splcher/animefacedataset");
}

#[test]
fn prepare_data_skips_bad_files_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let faces = anime_data::synthetic_faces(6, 96, 1);
    anime_data::write_images(&raw, &faces, "jpg").unwrap();
    std::fs::write(raw.join("broken.jpg"), b"not a jpeg").unwrap();
    std::fs::write(raw.join("empty.jpg"), b"").unwrap();
    let args = ["prepare-data", "--raw", "raw", "--out", "processed"];
    let out = xtask(&args, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let packed = anime_data::PackedDataset::load(&dir.path().join("processed/packed.safetensors")).unwrap();
    assert_eq!((packed.len(), packed.size()), (6, 64));
    let skipped = std::fs::read_to_string(dir.path().join("processed/skipped.txt")).unwrap();
    assert!(skipped.contains("broken.jpg") && skipped.contains("empty.jpg"), "{skipped}");
    let before = std::fs::read(dir.path().join("processed/packed.safetensors")).unwrap();
    let again = xtask(&args, dir.path());
    assert!(again.status.success());
    assert_eq!(before, std::fs::read(dir.path().join("processed/packed.safetensors")).unwrap());
}

#[test]
fn import_and_sample_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let out = xtask(&["import-checkpoint", "notes.txt", "--out", "m.safetensors"], dir.path());
    assert_one_line_error(&out, "not a PyTorch checkpoint");
    let out = xtask(&["sample", "--checkpoint", "missing.safetensors"], dir.path());
    assert_one_line_error(&out, "missing.safetensors");
    let out = xtask(&["train", "--config", "no-such-config"], dir.path());
    assert_one_line_error(&out, "no-such-config");
    // A flag and a --set of one key: neither silently wins.
    let out = xtask(&["train", "--config", "tiny", "--lr", "1e-3", "--set", "train.lr=2e-3"], dir.path());
    assert_one_line_error(&out, "train.lr is given twice");
    let out = xtask(&["train", "--config", "tiny", "--set", "train.lr=1e-3", "--set", "train.lr=2e-3"], dir.path());
    assert_one_line_error(&out, "train.lr is given twice, by --set");
    let out = xtask(&["train", "--config", "tiny", "--set", "train.lr=0"], dir.path());
    assert_one_line_error(&out, "train.lr must be a finite number > 0");
    // Checked before any sampling: a process strip too large to hold.
    let out = xtask(&["sample", "--what", "process", "--process-rows", "100000000"], dir.path());
    assert_one_line_error(&out, "at most 100,000 images");
    let out = xtask(&["bench", "--precision", "bf16", "--cases", "reduced-forward"], dir.path());
    assert_one_line_error(&out, "needs --device cuda");
    let out = xtask(&["bench", "--threads", "100000"], dir.path());
    assert_one_line_error(&out, "--threads must be at most 1024");
}

#[test]
fn a_cpu_build_asked_for_cuda_names_the_alias_that_builds_one() {
    let config = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cargo/config.toml")).unwrap();
    assert!(config.lines().any(|l| l.starts_with("xtask-cuda = ") && l.contains("--features cudnn")), "{config}");
    if cfg!(feature = "cuda") {
        eprintln!("skipped the error check: this test binary was built with CUDA");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for args in [&["self-test", "--device", "cuda"][..], &["train", "--config", "tiny", "--device", "cuda:1"]] {
        let out = xtask(args, dir.path());
        assert_one_line_error(&out, "use `cargo xtask-cuda` instead of `cargo xtask`");
    }
}

#[test]
fn import_then_sample_a_small_grid() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixtures().join("seed_micro.ckpt");
    let out = xtask(&["import-checkpoint", ckpt.to_str().unwrap(), "--out", "micro.safetensors"], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = xtask(
        &["sample", "--checkpoint", "micro.safetensors", "--grid", "2x2", "--sampler", "ddim", "--steps", "5", "--variance", "beta", "--out", "gen", "--device", "cpu"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let produced: Vec<_> = std::fs::read_dir(dir.path().join("gen")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!produced.is_empty());
    let out = xtask(&["sample", "--checkpoint", "micro.safetensors", "--grid", "0x2"], dir.path());
    assert_one_line_error(&out, "grid");

    // Individual images: a smaller second run into the same folder leaves exactly its own set
    // (an FID folder must not mix runs), and the user's other files alone.
    let individual = |grid: &str| {
        let args = ["sample", "--checkpoint", "micro.safetensors", "--grid", grid, "--sampler", "ddim", "--steps", "2", "--out", "ind", "--save-individual"];
        let out = xtask(&args, dir.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    individual("3x3");
    let folder = std::fs::read_dir(dir.path().join("ind/individual")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(folder.join("notes.txt"), b"mine").unwrap();
    individual("2x2");
    let mut names: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["00000.png", "00001.png", "00002.png", "00003.png", "notes.txt"]);
}

#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    // `... 2>&1 | head -1`: the reader has gone before the command writes. println!/eprintln!
    // panic on the broken pipe (exit code 101); the command's own result must stand.
    let dir = tempfile::tempdir().unwrap();
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .current_dir(dir.path())
            .stdout(closed())
            .stderr(closed())
            .status()
            .expect("run xtask")
    };
    // An error line to stderr: still exit code 1.
    assert_eq!(run(&["sample", "--grid", "0x4"]).code(), Some(1));
    // A report to stdout and stderr, then success.
    let ckpt = fixtures().join("seed_tiny.ckpt");
    assert_eq!(run(&["import-checkpoint", ckpt.to_str().unwrap(), "--out", "m.safetensors"]).code(), Some(0));
    assert!(dir.path().join("m.safetensors").exists());
}

#[cfg(unix)]
#[test]
fn a_termination_signal_saves_a_checkpoint_like_ctrl_c() {
    // `timeout`, `docker stop`, a scheduler's pre-emption and a closed terminal send SIGTERM or
    // SIGHUP; without a handler those lost everything since the last checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let faces = anime_data::synthetic_faces(24, 16, 3);
    let names = (0..faces.len()).map(|i| format!("f{i}.png")).collect();
    let pixels = faces.iter().flat_map(|f| f.as_raw().iter().copied()).collect();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    anime_data::PackedDataset::from_images(names, 16, pixels).unwrap().save(&data.join("packed.safetensors")).unwrap();
    // Under nohup, SIGHUP is ignored from the start and must stay so (a closed terminal must
    // not stop the run); SIGTERM still stops it. GNU `timeout` sends its SIGTERM twice at once
    // (to the trainer, then to its process group): that is still one request, not "quit now".
    for (signal, nohup, twice) in [("TERM", false, false), ("HUP", false, false), ("TERM", true, false), ("TERM", false, true)] {
        let run = format!("run_{signal}_{nohup}_{twice}");
        let mut child = if nohup { Command::new("nohup") } else { Command::new(env!("CARGO_BIN_EXE_xtask")) };
        if nohup {
            child.arg(env!("CARGO_BIN_EXE_xtask"));
        }
        let mut child = child
            .args(["train", "--config", "tiny", "--data", "data", "--run", &run, "--max-steps", "1000000", "--device", "cpu"])
            .args(["--log-every", "1", "--sample-every", "0", "--checkpoint-minutes", "1000", "--no-progress"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let metrics = dir.path().join(&run).join("metrics.jsonl");
        let started = std::time::Instant::now();
        while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
            if child.try_wait().unwrap().is_some() {
                let out = child.wait_with_output().unwrap();
                panic!("the run ended before its first step: {}", String::from_utf8_lossy(&out.stderr));
            }
            assert!(started.elapsed().as_secs() < 300, "no training step within 5 minutes");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if nohup {
            assert!(Command::new("kill").args(["-HUP".to_string(), child.id().to_string()]).status().unwrap().success());
            std::thread::sleep(std::time::Duration::from_millis(1500));
            assert!(child.try_wait().unwrap().is_none(), "nohup: SIGHUP stopped the run");
        }
        let pid = child.id().to_string();
        // The second as SIGHUP: the kernel merges two pending signals of one kind into one, so
        // only two kinds make sure that both requests arrive, as timeout's two often do.
        let kills = if twice { format!("kill -{signal} {pid}; kill -HUP {pid}") } else { format!("kill -{signal} {pid}") };
        assert!(Command::new("sh").args(["-c", &kills]).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "SIG{signal}: {err}");
        assert!(err.contains("stop requested"), "{err}");
        // The run says where it stopped and which checkpoint holds that step (an epoch end may
        // have saved it already); that checkpoint must be the newest.
        let line = err.lines().find(|l| l.contains("stopped (stop) at step")).unwrap_or_else(|| panic!("SIG{signal}: {err}"));
        let ckpt = line.rsplit("checkpoint ").next().unwrap().trim();
        let mut saved: Vec<_> = std::fs::read_dir(dir.path().join(&run).join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
        saved.sort();
        assert!(saved.last().expect("a checkpoint").ends_with(ckpt), "SIG{signal}: {ckpt} is not the newest of {saved:?}");
    }
}

/// PyTorch's side of `bench` is a child whose result is its last output line: a line a library
/// printed before it must not cost the row, and output with no result skips PyTorch's side of
/// that case, not the bench.
#[cfg(unix)]
#[test]
fn bench_reads_the_pytorch_result_from_its_last_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ref")).unwrap();
    std::fs::write(dir.path().join("ref/bench_cpu.py"), "").unwrap();
    let fake = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let chatty = fake("chatty.sh", "echo 'UserWarning: something'\necho '{\"median_s\": 4.25, \"peak_rss_mb\": 7}'");
    let junk = fake("junk.sh", "echo 'not a result'");
    let run = |python: &Path| {
        xtask(
            &["bench", "--cases", "reduced-forward", "--runs", "1", "--warmup", "0", "--threads", "1", "--torch-bench", "ref", "--python", python.to_str().unwrap(), "--out", "b.json"],
            dir.path(),
        )
    };
    let out = run(&chatty);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("reduced-forward") && l.contains("4.250")), "{stdout}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("b.json")).unwrap()).unwrap();
    assert_eq!(json["rows"][0]["torch"]["median_s"], 4.25);
    // Our side's host queue time: part of each run (on the CPU, all but the no-op wait).
    let ours = &json["rows"][0]["ours"];
    let (queued, whole) = (ours["queued_runs_s"][0].as_f64().unwrap(), ours["runs_s"][0].as_f64().unwrap());
    assert!(queued > 0.0 && queued <= whole && ours["queued_s"].as_f64() == Some(queued), "{ours}");
    let out = run(&junk);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no result in its output"), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("b.json")).unwrap()).unwrap();
    assert!(json["rows"][0]["torch"].is_null() && json["rows"][0]["ours"]["median_s"].is_number(), "{json}");
}

/// `bench --micro-batch`: our training step in parts (the trainer's gradient accumulation),
/// said in the row and the JSON, and holding less memory than the whole batch at once.
#[test]
fn bench_measures_a_training_step_in_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], out: &str| {
        let mut args = vec!["bench", "--cases", "reduced-train", "--runs", "1", "--warmup", "0", "--threads", "1", "--python", "none", "--out", out];
        args.extend_from_slice(extra);
        let o = xtask(&args, dir.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(out)).unwrap()).unwrap();
        (String::from_utf8_lossy(&o.stdout).to_string(), json["rows"][0]["ours"].clone())
    };
    let (said, whole) = run(&[], "whole.json");
    assert_eq!(whole["micro_batch"], 32, "{whole}");
    assert!(!said.contains("in parts of"), "{said}");
    // The host time of each part of the step: on the CPU, the work itself, so the parts add up
    // to nearly the run, and the forward and backward passes hold most of it.
    assert!(said.contains("our host time by part (ms a run): draws "), "{said}");
    let h = &whole["host_phases_ms"];
    let ms = |k: &str| h[k].as_f64().unwrap_or_else(|| panic!("{k} in {h}"));
    let parts: f64 = ["draws", "casts", "forward", "backward", "gather", "optimizer"].iter().map(|k| ms(k)).sum();
    let run_ms = 1e3 * whole["median_s"].as_f64().unwrap();
    assert!(parts <= run_ms * 1.01 && parts >= 0.8 * run_ms, "parts {parts} ms, run {run_ms} ms: {h}");
    assert!(ms("forward") + ms("backward") > 0.8 * parts && ms("casts") < 0.05, "{h}");
    let (said, parts) = run(&["--micro-batch", "8"], "parts.json");
    assert_eq!(parts["micro_batch"], 8, "{parts}");
    assert!(said.contains("in parts of 8 images (gradient accumulation): ours"), "{said}");
    // The activations of 8 images instead of 32: about 230 MB against 530 in a release build.
    let peak = |r: &serde_json::Value| r["peak_rss_mb"].as_f64().unwrap();
    assert!(peak(&parts) < 0.8 * peak(&whole), "{parts} {whole}");
    let o = xtask(&["bench", "--cases", "reduced-train", "--micro-batch", "0", "--python", "none"], dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn self_test_runs_the_groups_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixtures();
    let run = |only: &str| xtask(&["self-test", "--device", "cpu", "--fixtures", fixtures.to_str().unwrap(), "--only", only], dir.path());
    let out = run("micro-batch");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("micro-batch loss") && !said.contains("forward eps"), "{said}");
    // Asked for, the CUDA-graph check cannot pass on the CPU, and says why.
    let out = run("cuda-graph");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("CUDA graphs need a CUDA build and device") && said.contains("FAIL"), "{said}");
    // Sampling (2 checks) and training steps (3).
    assert!(said.contains("sampling from CUDA graphs") && said.contains("training steps from CUDA graphs"), "{said}");
    assert_one_line_error(&out, "5 check(s) failed on cpu");
    // The default leaves it out.
    let out = xtask(&["self-test", "--device", "cpu", "--fixtures", fixtures.to_str().unwrap()], dir.path());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("forward eps") && !said.contains("CUDA graphs"), "{said}");
    let out = run("gradients");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
