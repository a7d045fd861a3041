//! `cargo xtask train`: flags -> config overrides -> `trainer::Trainer`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use trainer::{StopReason, TrainOptions, Trainer};

use crate::common;
use crate::common::say;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Config: a TOML file or a preset (anime64 = the reference, cifar10, tiny, mini64, demo).
    /// Default when resuming: the config of the run's last checkpoint (or its config.toml before
    /// the first checkpoint); for a new run, anime64.
    #[arg(long)]
    config: Option<String>,
    /// Prepared data: the prepare-data output folder (or its packed.safetensors).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder (checkpoints, logs, samples). Default: runs/<config name>.
    #[arg(long)]
    run: Option<PathBuf>,
    /// Require an existing checkpoint to continue from (a run folder with checkpoints is
    /// resumed even without this flag).
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N [default: cuda if this binary has CUDA (an error if no GPU opens), else cpu]
    #[arg(long)]
    device: Option<String>,
    /// Epochs to train in total (the reference: 500).
    #[arg(long)]
    epochs: Option<u64>,
    /// Images per step (the reference: 128).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Images through the network at a time: gradients accumulate over the batch's parts, for
    /// the same step with less GPU memory (0 = the whole batch).
    #[arg(long)]
    micro_batch_size: Option<usize>,
    /// Adam's learning rate (the reference: 1e-4).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Seed of the initial weights and of every training random stream: epoch order, flips,
    /// timesteps, noise, dropout, validation noise (the reference: 999).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop (with a checkpoint) after this many steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Stop (with a checkpoint) after this many minutes of this session (a re-run trains as long
    /// again; --max-steps counts in total).
    #[arg(long, allow_negative_numbers = true)]
    max_minutes: Option<f64>,
    /// Checkpoint every M minutes (and at every epoch end); 0: only at epoch ends.
    #[arg(long, allow_negative_numbers = true)]
    checkpoint_minutes: Option<f64>,
    /// Keep the last K checkpoints.
    #[arg(long)]
    keep_last: Option<usize>,
    /// EMA decay of the weights (0 = off; the DDPM paper: 0.9999).
    #[arg(long, allow_negative_numbers = true)]
    ema_decay: Option<f64>,
    /// Clip the global gradient norm (0 = off; the DDPM paper: 1.0).
    #[arg(long, allow_negative_numbers = true)]
    grad_clip: Option<f64>,
    /// Linear learning-rate warm-up steps (the DDPM paper: 5000).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Random horizontal flips (true/false).
    #[arg(long)]
    hflip: Option<bool>,
    /// Validation loss each epoch (true/false).
    #[arg(long)]
    validate: Option<bool>,
    /// A sample grid every N epochs (0 = never).
    #[arg(long)]
    sample_every: Option<u64>,
    /// Images in the sample grid.
    #[arg(long)]
    sample_count: Option<usize>,
    /// DDIM steps of the preview sampler.
    #[arg(long)]
    sample_steps: Option<usize>,
    /// A metrics line every N steps (0 is taken as 1).
    #[arg(long)]
    log_every: Option<u64>,
    /// f32, or bf16 (CUDA only: bf16 compute from f32 master weights).
    #[arg(long, value_parser = ["f32", "bf16"])]
    precision: Option<String>,
    /// Any other config key, e.g. --set unet.dropout=0.0 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
}

/// A float as TOML writes it: Rust's `NaN`/`inf` are TOML's `nan`/`inf`, so that such a flag
/// meets the config's own check (and its message) rather than a TOML syntax error.
fn toml_float(v: f64) -> String {
    match v {
        v if v.is_nan() => "nan".into(),
        v if v.is_infinite() => (if v > 0.0 { "inf" } else { "-inf" }).into(),
        // + 0.0: -0 is 0.
        v => format!("{:?}", v + 0.0),
    }
}

fn default_run_name(config: Option<&str>) -> String {
    match config {
        None => "anime64".into(),
        Some(c) => Path::new(c).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "run".into()),
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let run_dir = a.run.clone().unwrap_or_else(|| PathBuf::from("runs").join(default_run_name(a.config.as_deref())));
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            overrides.push((k.to_string(), v));
        }
    };
    // Paths and strings as TOML strings.
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    put("data.path", a.data.as_ref().map(|p| quote(&p.display().to_string())));
    put("train.epochs", a.epochs.map(|v| v.to_string()));
    put("train.batch_size", a.batch_size.map(|v| v.to_string()));
    put("train.micro_batch_size", a.micro_batch_size.map(|v| v.to_string()));
    put("train.lr", a.lr.map(toml_float));
    put("train.seed", a.seed.map(|v| v.to_string()));
    put("train.max_steps", a.max_steps.map(|v| v.to_string()));
    put("train.max_minutes", a.max_minutes.map(toml_float));
    put("checkpoint.every_minutes", a.checkpoint_minutes.map(toml_float));
    put("checkpoint.keep_last", a.keep_last.map(|v| v.to_string()));
    put("train.ema_decay", a.ema_decay.map(toml_float));
    put("train.grad_clip", a.grad_clip.map(toml_float));
    put("train.warmup_steps", a.warmup_steps.map(|v| v.to_string()));
    put("data.hflip", a.hflip.map(|v| v.to_string()));
    put("train.validate", a.validate.map(|v| v.to_string()));
    put("log.sample_every_epochs", a.sample_every.map(|v| v.to_string()));
    put("log.sample_count", a.sample_count.map(|v| v.to_string()));
    put("log.sample_steps", a.sample_steps.map(|v| v.to_string()));
    put("log.every_steps", a.log_every.map(|v| v.to_string()));
    put("train.precision", a.precision.as_deref().map(quote));
    let from_flags = overrides.len();
    for kv in &a.set {
        let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        let k = k.trim();
        // One of the two would silently win.
        if let Some(i) = overrides.iter().position(|(f, _)| f == k) {
            let by = if i < from_flags { "by its own flag and by --set" } else { "by --set" };
            anyhow::bail!("{k} is given twice, {by}: keep one");
        }
        overrides.push((k.to_string(), v.trim().to_string()));
    }
    let cfg = trainer::resolve_config(&run_dir, a.config.as_deref(), &overrides)?;
    let device = common::pick_device(a.device.as_deref(), common::NoGpu::Refuse)?;
    tracing::info!("device {}", common::device_name(&device));

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut first_request: Option<std::time::Instant> = None;
    common::on_stop_signal(move || {
        // GNU `timeout` (without --foreground) signals the trainer and then its whole process
        // group, so one stop arrives twice within microseconds: only a request a second or more
        // after the first is a user's "quit now".
        if let Some(first) = first_request {
            if first.elapsed() < std::time::Duration::from_secs(1) {
                return;
            }
            say!("\nsecond stop request: quitting without saving (the last checkpoint is kept)");
            std::process::exit(130);
        }
        first_request = Some(std::time::Instant::now());
        flag.store(true, Ordering::SeqCst);
        // Also SIGTERM and SIGHUP (`timeout`, `docker stop`, a scheduler's pre-emption, a
        // closed terminal), which would otherwise lose everything since the last checkpoint.
        say!("\nstop requested (Ctrl-C or a termination signal): saving a checkpoint after this step (a second stop signal quits at once)");
    })?;

    let opts = TrainOptions { progress: !a.no_progress, require_resume: a.resume, ..Default::default() };
    let mut t = Trainer::new(cfg, &run_dir, &device, opts).with_context(|| format!("cannot start the run in {}", run_dir.display()))?;
    if t.resumed_from().is_some() && !a.resume {
        say!("{} already had checkpoints: resuming it (use another --run to start a new run)", run_dir.display());
    }
    let s = match t.run(stop) {
        Ok(s) => s,
        // A divergence names its last good checkpoint itself.
        Err(e @ trainer::TrainError::NonFinite(_)) => return Err(anyhow::Error::new(e).context("training failed")),
        Err(e) => {
            let kept = match t.last_checkpoint() {
                Some((step, dir)) => format!("checkpoint of step {step} kept in {}: the same command resumes from it", dir.display()),
                None => "no checkpoint written yet".into(),
            };
            return Err(anyhow::Error::new(e).context(format!("training failed after step {} ({kept})", t.steps_done())));
        }
    };
    let how = match s.reason {
        StopReason::Finished => "finished",
        StopReason::MaxSteps => "reached --max-steps",
        StopReason::TimeLimit => "reached the time limit",
        StopReason::Interrupted => "interrupted",
    };
    say!(
        "{how}: {} ({} complete) in total; this session {} in {:.0} s ({:.1} images/s); last loss {}",
        common::count(s.steps, "step"),
        common::count(s.epochs, "epoch"),
        common::count(s.session_steps, "step"),
        s.session_seconds,
        s.images_per_s,
        s.last_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
    );
    if let Some(c) = &s.last_checkpoint {
        say!("checkpoint: {}", c.display());
    }
    say!("model:      {}  ({} sample --checkpoint {})", run_dir.join("model.safetensors").display(), common::ALIAS, run_dir.display());
    // The curve is best effort (a failed redraw is only a warning): name it only if it is there.
    let loss_png = run_dir.join("loss.png");
    let curve = if loss_png.is_file() { format!(" , {}", loss_png.display()) } else { String::new() };
    say!("logs:       {}{curve} , tensorboard --logdir {}", run_dir.join("metrics.jsonl").display(), run_dir.display());
    match s.reason {
        StopReason::Finished => {}
        StopReason::MaxSteps => say!("continue:   the same command with a larger --max-steps (it overrides train.max_steps)"),
        StopReason::TimeLimit | StopReason::Interrupted => say!("continue:   the same command (or add --resume)"),
    }
    Ok(())
}
