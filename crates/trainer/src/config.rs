//! The run configuration: one TOML file (`configs/*.toml`), one struct per concern.
//!
//! Every value the trainer uses comes from [`RunConfig`]. The defaults are the PyTorch
//! Lightning reference (`configs/anime64.toml`); command-line flags override single keys
//! (`RunConfig::set("train.lr", "2e-4")`), and the resolved config is saved in the run folder
//! as `config.toml`, which a resumed run is checked against.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// The reference preset (`configs/anime64.toml`).
pub const PRESET_ANIME64: &str = include_str!("../../../configs/anime64.toml");
/// A small 16x16 model for tests.
pub const PRESET_TINY: &str = include_str!("../../../configs/tiny.toml");
/// The CPU demo (`cargo xtask demo`).
pub const PRESET_DEMO: &str = include_str!("../../../configs/demo.toml");
/// The DDPM paper's CIFAR-10 recipe (35.7M UNet, EMA, clipping, warm-up, flips), on 64x64 faces.
pub const PRESET_CIFAR10: &str = include_str!("../../../configs/cifar10.toml");
/// A 64x64 model small enough to train a few minutes on a CPU (the hand-run smoke test).
pub const PRESET_MINI64: &str = include_str!("../../../configs/mini64.toml");

/// Names accepted by [`RunConfig::from_name_or_path`] besides file paths.
pub const PRESETS: &[(&str, &str)] = &[
    ("anime64", PRESET_ANIME64),
    ("tiny", PRESET_TINY),
    ("demo", PRESET_DEMO),
    ("cifar10", PRESET_CIFAR10),
    ("mini64", PRESET_MINI64),
];

/// Everything a training run depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub unet: unet::UNetConfig,
    #[serde(default)]
    pub diffusion: diffusion::ScheduleConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub log: LogConfig,
}

impl Default for RunConfig {
    /// The reference run.
    fn default() -> Self {
        Self {
            unet: unet::UNetConfig::reference(),
            diffusion: diffusion::ScheduleConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            checkpoint: CheckpointConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Where the images come from and how they are split (`[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Folder written by `cargo xtask prepare-data` (holding `packed.safetensors`), or the file.
    pub path: String,
    /// Seed of the train/val/test split (the reference: 999).
    pub split_seed: u64,
    pub val_frac: f64,
    pub test_frac: f64,
    /// Random horizontal flips of training images (off in the reference; on in the DDPM paper).
    pub hflip: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: "dataset/anime/processed".into(),
            split_seed: anime_data::REFERENCE_SEED,
            val_frac: anime_data::REFERENCE_VAL_FRAC,
            test_frac: anime_data::REFERENCE_TEST_FRAC,
            hflip: false,
        }
    }
}

/// Numeric precision of the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 compute from f32 master weights (autocast-style), on CUDA only.
    Bf16,
}

/// The optimisation (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: u64,
    pub batch_size: usize,
    /// Gradient accumulation: each step's batch goes through the network this many images at a
    /// time, and their gradients are summed before the one optimizer step, so a GPU with less
    /// memory runs the same training (same noise, timesteps and dropout masks per image; equal
    /// up to float rounding). Absent or 0: the whole batch at once.
    pub micro_batch_size: Option<usize>,
    /// Seed of the weight init, the epoch order and the training noise stream.
    pub seed: u64,
    pub lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// 0 in the reference (torch.optim.Adam's default).
    pub weight_decay: f64,
    /// `true`: AdamW (decoupled decay `p -= lr * wd * p`); `false`: Adam's L2 term `g += wd * p`.
    pub decoupled_weight_decay: bool,
    /// Clip the global gradient norm to this value (the DDPM paper: 1.0). Absent or 0: off.
    pub grad_clip: Option<f64>,
    /// Linear learning-rate warm-up over this many steps (the DDPM paper: 5000). 0: off.
    pub warmup_steps: u64,
    /// Exponential moving average of the weights with this decay (the DDPM paper: 0.9999),
    /// warmed up as `min(decay, (1 + step) / (10 + step))`. Absent or 0: off.
    pub ema_decay: Option<f64>,
    pub precision: Precision,
    /// Stop (with a checkpoint) after this many optimizer steps in total.
    pub max_steps: Option<u64>,
    /// Stop (with a checkpoint) after this many minutes of this session.
    pub max_minutes: Option<f64>,
    /// Validation loss on the val split after every epoch (fixed seed: comparable across epochs).
    pub validate: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 500,
            batch_size: 128,
            micro_batch_size: None,
            seed: 999,
            lr: 1e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            grad_clip: None,
            warmup_steps: 0,
            ema_decay: None,
            precision: Precision::F32,
            max_steps: None,
            max_minutes: None,
            validate: true,
        }
    }
}

impl TrainConfig {
    pub fn ema(&self) -> Option<f64> {
        self.ema_decay.filter(|&d| d > 0.0)
    }
    /// How many images of a batch of `batch` go through the network at once: the micro-batch,
    /// or the whole batch when it is unset, 0 or larger.
    pub fn micro_batch(&self, batch: usize) -> usize {
        self.micro_batch_size.filter(|&m| m > 0).map_or(batch, |m| m.min(batch)).max(1)
    }
    pub fn clip(&self) -> Option<f64> {
        self.grad_clip.filter(|&c| c > 0.0)
    }
}

/// When checkpoints are written (`[checkpoint]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many minutes (besides every epoch end). 0: only at epoch ends.
    pub every_minutes: f64,
    /// Save every this many steps as well (0: off).
    pub every_steps: u64,
    /// Complete checkpoints kept (older ones are deleted).
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_minutes: 15.0, every_steps: 0, keep_last: 3 }
    }
}

/// What the user sees (`[log]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A line in `metrics.jsonl` (and TensorBoard) every this many steps.
    pub every_steps: u64,
    /// A sample grid every this many epochs (the reference: 20). 0: never.
    pub sample_every_epochs: u64,
    /// Images in the grid (the reference: 256 = 16x16).
    pub sample_count: usize,
    /// DDIM steps of the preview sampler.
    pub sample_steps: usize,
    /// Seed of the fixed preview noise.
    pub sample_seed: u64,
    /// Sample from the EMA weights when EMA is on.
    pub sample_ema: bool,
    /// Clip the predicted x_0 to [-1, 1] at each DDIM step (see `trainer::preview`); false:
    /// plain `sampler::generate`.
    pub sample_clip: bool,
    /// Write TensorBoard event files in `<run>/tb/`.
    pub tensorboard: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every_steps: 50,
            sample_every_epochs: 20,
            sample_count: 256,
            sample_steps: 50,
            sample_seed: 999,
            sample_ema: true,
            sample_clip: true,
            tensorboard: true,
        }
    }
}

/// Keys a resumed run may change: how long it runs, how often it saves and logs, where the data
/// lives; and, with a warning, since the run then differs from an uninterrupted one, the
/// learning-rate settings and what a step costs on the device (batch size and precision), so
/// that a run can move to a GPU with less memory. The checkpoint holds f32 weights and moments
/// and the epoch position in images, so neither depends on them. Everything else must match
/// the run's `config.toml`. The micro-batch changes neither the step nor what is saved (only
/// the rounding of the gradient sums), so it may change without a warning.
const RESUMABLE_KEYS: &[&str] = &[
    "data.path",
    "train.epochs",
    "train.micro_batch_size",
    "train.max_steps",
    "train.max_minutes",
    "train.validate",
    "checkpoint",
    "log",
];
const RESUMABLE_WITH_WARNING: &[&str] = &["train.lr", "train.warmup_steps", "train.grad_clip", "train.batch_size", "train.precision"];

impl RunConfig {
    /// The reference run (same as `configs/anime64.toml`).
    pub fn reference() -> Self {
        Self::default()
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, TrainError> {
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| TrainError::Config(format!("{origin}: {}", one_line(&e.to_string()))))?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("cannot read config", path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// A preset name (`anime64`, `tiny`, `demo`, `cifar10`, `mini64`) or a TOML file path. A
    /// file of a preset's name is read (a TOML file need not end in .toml); a folder is not.
    pub fn from_name_or_path(spec: &str) -> Result<Self, TrainError> {
        let p = Path::new(spec);
        // Not `is_file`: `--config <(...)` and /dev/stdin are pipes.
        if p.exists() && !p.is_dir() {
            return Self::load(p);
        }
        // A folder may well share a preset's name (`prepare-data --out mini64`).
        if let Some((name, text)) = PRESETS.iter().find(|(n, _)| *n == spec) {
            return Self::from_toml_str(text, &format!("preset {name}"));
        }
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        if p.exists() {
            return Err(TrainError::Config(format!("'{spec}' is a folder, not a TOML file (presets: {})", names.join(", "))));
        }
        Err(TrainError::Config(format!("no config file '{spec}' (and it is not a preset: {})", names.join(", "))))
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// Overrides one key, e.g. `set("train.lr", "2e-4")` or `set("unet.ch_mult", "[1, 2]")`. The
    /// value is parsed as TOML (a bare word that is not valid TOML is taken as a string).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), TrainError> {
        let mut root = toml::Value::try_from(&*self).map_err(|e| TrainError::Config(e.to_string()))?;
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t.remove("v").expect("parsed key"),
            // Digits TOML cannot hold would otherwise be taken as a string, and the error would
            // say "invalid type: string".
            Err(_) if is_integer_literal(value) => {
                return Err(TrainError::Config(format!("--set {key}={value}: the number is too large (integers are 64-bit)")))
            }
            Err(_) => toml::Value::String(value.to_string()),
        };
        let parts: Vec<&str> = key.split('.').collect();
        let mut cur = &mut root;
        for (i, part) in parts.iter().enumerate() {
            let table = cur.as_table_mut().ok_or_else(|| TrainError::Config(format!("bad key '{key}'")))?;
            if i + 1 == parts.len() {
                table.insert(part.to_string(), parsed.clone());
                break;
            }
            cur = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        }
        *self = root
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(format!("--set {key}={value}: {}", one_line(&e.to_string()))))?;
        Ok(())
    }

    /// Checks values the types do not: ranges, and that the parts agree with each other.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        self.unet.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        diffusion::Schedule::new(&self.diffusion).map_err(|e| TrainError::Config(e.to_string()))?;
        if self.unet.num_steps != self.diffusion.num_steps {
            return bad(format!(
                "unet.num_steps ({}) must equal diffusion.num_steps ({})",
                self.unet.num_steps, self.diffusion.num_steps
            ));
        }
        let t = &self.train;
        if t.batch_size == 0 {
            return bad("train.batch_size must be positive".into());
        }
        // Zero would "train" nothing and still write a checkpoint of untrained weights.
        if t.epochs == 0 || t.max_steps == Some(0) {
            return bad("train.epochs and train.max_steps must be at least 1".into());
        }
        if t.max_minutes.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
            return bad(format!("train.max_minutes must be a number > 0, got {}", t.max_minutes.unwrap_or_default()));
        }
        // 0 would spend the run's time and write checkpoints of unchanged weights.
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad(format!("train.lr must be a finite number > 0, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return bad(format!("Adam betas must be in [0, 1), got {} and {}", t.adam_beta1, t.adam_beta2));
        }
        if !(t.adam_eps.is_finite() && t.adam_eps > 0.0 && t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(format!("train.adam_eps must be a finite number > 0 and train.weight_decay one >= 0, got {} and {}", t.adam_eps, t.weight_decay));
        }
        if let Some(d) = t.ema_decay {
            if !(0.0..1.0).contains(&d) {
                return bad(format!("train.ema_decay must be in [0, 1) (0: off), got {d}"));
            }
        }
        if let Some(c) = t.grad_clip {
            if !(c.is_finite() && c >= 0.0) {
                return bad(format!("train.grad_clip must be a number >= 0 (0: off), got {c}"));
            }
        }
        let d = &self.data;
        if !(d.val_frac >= 0.0 && d.test_frac >= 0.0 && d.val_frac + d.test_frac < 1.0) {
            return bad(format!("data.val_frac + data.test_frac must be in [0, 1), got {} + {}", d.val_frac, d.test_frac));
        }
        let every = self.checkpoint.every_minutes;
        if !(every.is_finite() && every >= 0.0) {
            return bad(format!("checkpoint.every_minutes must be a number >= 0 (0: only at epoch ends), got {every}"));
        }
        if self.checkpoint.keep_last == 0 {
            return bad("checkpoint.keep_last must be at least 1".into());
        }
        if self.log.sample_every_epochs > 0 {
            if self.log.sample_count == 0 {
                return bad("log.sample_count must be positive (or set log.sample_every_epochs = 0)".into());
            }
            diffusion::ddim_timesteps(self.diffusion.num_steps, self.log.sample_steps)
                .map_err(|e| TrainError::Config(format!("log.sample_steps: {e}")))?;
        }
        Ok(())
    }

    /// Compares with the config a run was started with. Errors (one line) on the first key that
    /// may not change on resume; returns warnings for keys that may.
    /// What earlier builds accepted and meant as "off", in today's spelling: negative
    /// `ema_decay` and `grad_clip` became 0. Applied to configs read from checkpoints, so runs
    /// started with `--ema-decay -1` still resume.
    pub fn normalise_legacy(&mut self) {
        for v in [&mut self.train.ema_decay, &mut self.train.grad_clip].into_iter().flatten() {
            if *v < 0.0 {
                *v = 0.0;
            }
        }
    }

    pub fn check_resume(&self, saved: &RunConfig, saved_path: &Path) -> Result<Vec<String>, TrainError> {
        let a = serde_json::to_value(saved).expect("config serialises");
        let b = serde_json::to_value(self).expect("config serialises");
        let mut diffs = Vec::new();
        diff_values("", &a, &b, &mut diffs);
        let mut warnings = Vec::new();
        let mut refused = Vec::new();
        for (key, old, new) in diffs {
            let under = |list: &[&str]| list.iter().any(|k| key == *k || key.starts_with(&format!("{k}.")));
            if under(RESUMABLE_KEYS) {
                continue;
            }
            if under(RESUMABLE_WITH_WARNING) {
                warnings.push(format!("{key} changed on resume: {old} -> {new} (the run no longer matches an uninterrupted one)"));
                continue;
            }
            refused.push((key, old, new));
        }
        if let Some((key, old, new)) = refused.first() {
            // All of them, so that another --config (every key at once) reads as such and not
            // as one stray override.
            const LISTED: usize = 6;
            let more = match refused.len() - 1 {
                0 => String::new(),
                n => {
                    let names: Vec<&str> = refused[1..].iter().take(LISTED).map(|(k, _, _)| k.as_str()).collect();
                    format!(" (and {n} more: {}{})", names.join(", "), if n > LISTED { ", ..." } else { "" })
                }
            };
            return Err(TrainError::ConfigMismatch(format!(
                "{key} is {old} in {} but {new} now{more}: a run cannot change it on resume (resume without --config or the override, or use another --run folder)",
                saved_path.display()
            )));
        }
        Ok(warnings)
    }
}

fn is_integer_literal(v: &str) -> bool {
    let digits = v.trim().trim_start_matches(['+', '-']).replace('_', "");
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

fn diff_values(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<(String, String, String)>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                diff_values(&key, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if a != b => out.push((prefix.to_string(), show(a), show(b))),
        _ => {}
    }
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "unset".into(),
        // An f32 field (unet.dropout) reaches JSON widened to f64: 0.1 would show as
        // 0.10000000149011612. Shown as the f32 it is.
        serde_json::Value::Number(n) if n.is_f64() && n.as_f64().is_some_and(|f| f64::from(f as f32) == f) => format!("{}", n.as_f64().unwrap() as f32),
        other => other.to_string(),
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
