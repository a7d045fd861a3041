//! Finding and loading a model file for sampling: weights (EMA by default), UNet config and
//! the diffusion schedule stored beside them.

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffusion::{Schedule, ScheduleConfig};
use unet::{ModelWeights, UNet, UNetConfig};

use crate::{Result, SamplerError};

pub use unet::weights::DIFFUSION_CONFIG_KEY;
/// What `cargo xtask import-checkpoint` writes by default.
pub const IMPORTED_CHECKPOINT: &str = "checkpoints/last.safetensors";
/// The model file inside a run folder (refreshed at each checkpoint by the trainer).
pub const RUN_MODEL_FILE: &str = "model.safetensors";

fn invalid(msg: String) -> SamplerError {
    SamplerError::Invalid(msg)
}

/// The model file to use.
///
/// * `Some(path)`: a model `.safetensors` file, a Lightning `.ckpt` (imported on the fly), or
///   a folder holding `model.safetensors` (a run folder).
/// * `None`: `<root>/checkpoints/last.safetensors` if present, else the most recently modified
///   `<root>/runs/*/model.safetensors`, else an error saying how to get one.
pub fn resolve_checkpoint(arg: Option<&Path>, root: &Path) -> Result<PathBuf> {
    if let Some(p) = arg {
        if p.is_dir() {
            let f = p.join(RUN_MODEL_FILE);
            if !f.is_file() {
                return Err(invalid(format!("checkpoint folder {} has no {RUN_MODEL_FILE}", p.display())));
            }
            return Ok(f);
        }
        if !p.exists() {
            return Err(invalid(format!("checkpoint {} does not exist", p.display())));
        }
        return Ok(p.to_path_buf());
    }
    let imported = root.join(IMPORTED_CHECKPOINT);
    if imported.is_file() {
        return Ok(imported);
    }
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(root.join("runs")) {
        for e in entries.flatten() {
            let f = e.path().join(RUN_MODEL_FILE);
            if let Ok(m) = std::fs::metadata(&f).and_then(|m| m.modified()) {
                if newest.as_ref().is_none_or(|(t, _)| m > *t) {
                    newest = Some((m, f));
                }
            }
        }
    }
    newest.map(|(_, f)| f).ok_or_else(|| {
        invalid(format!(
            "no checkpoint found ({IMPORTED_CHECKPOINT} or runs/*/{RUN_MODEL_FILE}): train one with `cargo xtask train`, import the reference's with `cargo xtask import-checkpoint last.ckpt`, or pass --checkpoint"
        ))
    })
}

/// The schedule recorded in a model file's `diffusion_config` metadata (the reference's linear
/// 1000-step schedule when absent), checked against the UNet's time table.
pub fn schedule_for(weights: &ModelWeights) -> Result<Schedule> {
    let cfg = match weights.metadata.get(DIFFUSION_CONFIG_KEY) {
        Some(json) => serde_json::from_str::<ScheduleConfig>(json).map_err(|e| invalid(format!("bad {DIFFUSION_CONFIG_KEY} metadata: {e}")))?,
        None => ScheduleConfig::default(),
    };
    if cfg.num_steps != weights.config.num_steps {
        return Err(invalid(format!(
            "{DIFFUSION_CONFIG_KEY} has {} steps but the UNet's time table has {}: the file's configs disagree",
            cfg.num_steps, weights.config.num_steps
        )));
    }
    Ok(Schedule::new(&cfg)?)
}

/// A network ready to sample, and what it was built from.
pub struct LoadedModel {
    pub unet: UNet,
    pub schedule: Schedule,
    pub config: UNetConfig,
    /// Whether the EMA weights were used.
    pub ema: bool,
    /// Whether the file had EMA weights at all.
    pub has_ema: bool,
    pub path: PathBuf,
}

/// Loads `path` (our `.safetensors` model file, or a Lightning `.ckpt`) and builds the network
/// on `device`, from the EMA weights when `prefer_ema` and the file has them.
pub fn load_model(path: &Path, device: &Device, prefer_ema: bool) -> Result<LoadedModel> {
    let weights = if path.extension().is_some_and(|e| e == "ckpt") {
        unet::lightning::import(path)?
    } else {
        ModelWeights::load(path)?
    };
    let schedule = schedule_for(&weights)?;
    let has_ema = weights.has_ema();
    let ema = prefer_ema && has_ema;
    let unet = weights.build(device, ema)?;
    Ok(LoadedModel { unet, schedule, config: weights.config.clone(), ema, has_ema, path: path.to_path_buf() })
}
