//! Checkpoints: atomic, checksummed, resumable.
//!
//! ```text
//! <run>/checkpoints/step_00001234/
//!     model.safetensors      ModelWeights format: trainable tensors + the frozen time table,
//!                            `ema.<name>` copies when EMA is on; metadata unet_config,
//!                            diffusion_config (JSON of diffusion::ScheduleConfig), step, epoch
//!     optimizer.safetensors  Adam moments `m.<name>`, `v.<name>`; metadata step
//!     state.json             written last: step, epoch, position in the epoch order, RNG
//!                            state, the run config, and the size + CRC-32 of both files
//! ```
//!
//! The folder is written as `step_XXXXXXXX.tmp/` (each file atomically, fsynced) and renamed
//! when complete; a checkpoint whose `state.json` is missing, unreadable, or disagrees with a
//! file's size or checksum is corrupt, and loading falls back to the previous one; a run that
//! resumes moves it aside to `step_XXXXXXXX.unusable/`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use unet::weights::write_atomic;
use unet::ModelWeights;

use crate::{RunConfig, TrainError};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const STATE_FORMAT: &str = "ddpm-anime-trainer-checkpoint/1";
pub use unet::weights::DIFFUSION_CONFIG_KEY;

/// A file of the checkpoint, as recorded in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// Where the run stands: everything besides the tensors needed to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: String,
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch in progress (0-based); after an epoch end, the next one with `position` 0.
    pub epoch: u64,
    /// Images of this epoch's order already trained on (index into `epoch_order`).
    pub position: usize,
    /// The training noise stream (flips, timesteps, noise, dropout seeds).
    pub rng: diffusion::RngState,
    /// Training images in the split (a check that the data did not change).
    pub train_images: usize,
    /// Seconds of training over all sessions.
    pub elapsed_s: f64,
    /// Why it was written: epoch, periodic, stop, max-steps, time-limit, finished.
    pub reason: String,
    /// Unix time of writing.
    pub saved_unix: u64,
    pub config: RunConfig,
    pub files: Vec<FileEntry>,
    /// Losses trained on but not yet in a mean of `metrics.jsonl` (absent in older checkpoints).
    #[serde(default)]
    pub pending_loss: PendingLoss,
    /// CRC-32 of the packed dataset's pixels: the image count alone does not show that the
    /// data changed (absent in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_crc32: Option<u32>,
}

/// Sums of training losses whose means are logged later: of the epoch in progress (its end's
/// line) and of the `log.every_steps` window (the next step line). Kept in checkpoints so that a
/// resumed run logs the same means as an uninterrupted one, not means of its own steps only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PendingLoss {
    pub epoch_sum: f64,
    pub epoch_steps: u64,
    pub window_sum: f64,
    pub window_steps: u64,
}

/// A checkpoint read back and verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: ModelWeights,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    run.join(CHECKPOINTS_DIR).join(format!("step_{step:08}"))
}

/// Serialises named tensors (sorted) with metadata into safetensors bytes.
pub fn serialize(tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<Vec<u8>, TrainError> {
    unet::weights::serialize_safetensors(tensors, metadata).map_err(|e| TrainError::Invalid(e.to_string()))
}

/// The bytes of a model file in the `unet::ModelWeights` format.
pub fn model_bytes(w: &ModelWeights) -> Result<Vec<u8>, TrainError> {
    w.to_bytes().map_err(|e| TrainError::Invalid(e.to_string()))
}

fn write(path: &Path, data: &[u8]) -> Result<(), TrainError> {
    write_atomic(path, data).map_err(|e| TrainError::Checkpoint(e.to_string()))
}

pub fn save_png_atomic(path: &Path, img: &image::RgbImage) -> Result<(), TrainError> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| TrainError::Invalid(format!("cannot encode {}: {e}", path.display())))?;
    write_atomic(path, &png).map_err(|e| TrainError::Invalid(format!("cannot write {e}")))
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes a complete checkpoint for `state` (its `files` are filled in here), refreshes
/// `<run>/model.safetensors`, and deletes all but the last `keep` checkpoints.
pub fn save(
    run: &Path,
    mut state: TrainState,
    model: &ModelWeights,
    optimizer: &HashMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let final_dir = checkpoint_dir(run, state.step);
    let tmp_dir = final_dir.with_extension("tmp");
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |e| TrainError::io(what, &p, e)
    };
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).map_err(io("cannot remove", &tmp_dir))?;
    }
    std::fs::create_dir_all(&tmp_dir).map_err(io("cannot create", &tmp_dir))?;

    let model_data = model_bytes(model)?;
    let mut opt_meta = HashMap::new();
    opt_meta.insert("step".to_string(), state.step.to_string());
    opt_meta.insert("optimizer".to_string(), "adam".to_string());
    let opt_data = serialize(optimizer, opt_meta)?;
    state.files.clear();
    let built = (|| {
        for (name, data) in [(MODEL_FILE, &model_data), (OPTIMIZER_FILE, &opt_data)] {
            write(&tmp_dir.join(name), data)?;
            state.files.push(FileEntry { name: name.into(), bytes: data.len() as u64, crc32: crc32fast::hash(data) });
        }
        let json = serde_json::to_vec_pretty(&state).expect("state serialises");
        write(&tmp_dir.join(STATE_FILE), &json)
    })();
    if let Err(e) = built {
        // On a full disk, the half-built folder would keep it full.
        let _ = std::fs::remove_dir_all(&tmp_dir);
        return Err(e);
    }
    fsync_dir(&tmp_dir);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io("cannot replace", &final_dir))?;
    }
    std::fs::rename(&tmp_dir, &final_dir).map_err(io("cannot rename", &tmp_dir))?;
    fsync_dir(final_dir.parent().expect("checkpoints folder"));
    // What `cargo xtask sample --checkpoint <run>` loads.
    write(&run.join(MODEL_FILE), &model_data)?;
    prune(run, keep);
    Ok(final_dir)
}

/// Complete checkpoint folders (`step_XXXXXXXX`, not `.tmp`), by ascending step.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run.join(CHECKPOINTS_DIR)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("step_") {
                if let Ok(step) = n.parse::<u64>() {
                    if e.path().is_dir() {
                        out.push((step, e.path()));
                    }
                }
            }
        }
    }
    out.sort();
    out
}

fn prune(run: &Path, keep: usize) {
    let all = list(run);
    let n = all.len();
    for (_, dir) in all.into_iter().take(n.saturating_sub(keep)) {
        // The new checkpoint is safe by now: an old one that will not go (a busy file on a
        // network mount, an immutable folder) costs disk space, not the run.
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("cannot delete old checkpoint {}: {e}", dir.display());
        }
    }
    // Leftovers of an interrupted save.
    if let Ok(rd) = std::fs::read_dir(run.join(CHECKPOINTS_DIR)) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The config recorded by the newest checkpoint whose `state.json` reads (files unchecked).
pub fn latest_config(run: &Path) -> Option<RunConfig> {
    list(run).iter().rev().find_map(|(_, dir)| read_state(dir).ok().map(|s| s.config))
}

/// Parses a checkpoint's `state.json`, its config in today's spelling (see
/// [`RunConfig::normalise_legacy`]).
fn read_state(dir: &Path) -> Result<TrainState, String> {
    let text = std::fs::read(dir.join(STATE_FILE)).map_err(|e| format!("no readable {STATE_FILE} ({e})"))?;
    let mut state: TrainState = serde_json::from_slice(&text).map_err(|e| format!("bad {STATE_FILE}: {e}"))?;
    state.config.normalise_legacy();
    Ok(state)
}

/// Why a checkpoint folder cannot be resumed from (a run falls back to the one before it).
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {} is unusable: {reason}", dir.display())]
pub struct UnusableCheckpoint {
    pub dir: PathBuf,
    pub reason: String,
}

/// Reads `state.json` and checks every file's size and checksum.
pub fn verify(dir: &Path) -> Result<TrainState, UnusableCheckpoint> {
    verify_reason(dir).map_err(|reason| UnusableCheckpoint { dir: dir.to_path_buf(), reason })
}

fn verify_reason(dir: &Path) -> Result<TrainState, String> {
    let state = read_state(dir)?;
    if state.format != STATE_FORMAT {
        return Err(format!("unknown checkpoint format '{}'", state.format));
    }
    // state.json has no checksum of its own: what it says must at least agree with its folder,
    // and its RNG state must be one that can be restored, or an earlier checkpoint serves.
    if let Some(named) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step_")).and_then(|n| n.parse::<u64>().ok()) {
        if named != state.step {
            return Err(format!("{STATE_FILE} says step {} in the folder of step {named}", state.step));
        }
    }
    diffusion::NoiseRng::from_state(&state.rng).map_err(|e| format!("bad RNG state in {STATE_FILE}: {e}"))?;
    // Never written otherwise: the epoch counter stops at the configured epochs, and the
    // position within an epoch at its number of images.
    if state.epoch > state.config.train.epochs || state.position > state.train_images {
        return Err(format!(
            "{STATE_FILE} says epoch {} of {}, image {} of {}: impossible",
            state.epoch, state.config.train.epochs, state.position, state.train_images
        ));
    }
    for name in [MODEL_FILE, OPTIMIZER_FILE] {
        let entry = state.files.iter().find(|f| f.name == name).ok_or_else(|| format!("{STATE_FILE} lists no {name}"))?;
        let data = std::fs::read(dir.join(name)).map_err(|e| format!("cannot read {name} ({e})"))?;
        if data.len() as u64 != entry.bytes {
            return Err(format!("{name} has {} bytes, expected {} (truncated?)", data.len(), entry.bytes));
        }
        let crc = crc32fast::hash(&data);
        if crc != entry.crc32 {
            return Err(format!("{name} checksum {crc:08x} != {:08x} (corrupt)", entry.crc32));
        }
    }
    Ok(state)
}

/// Loads one verified checkpoint.
pub fn load(dir: &Path) -> Result<Loaded, UnusableCheckpoint> {
    load_reason(dir).map_err(|reason| UnusableCheckpoint { dir: dir.to_path_buf(), reason })
}

fn load_reason(dir: &Path) -> Result<Loaded, String> {
    let state = verify_reason(dir)?;
    let model = ModelWeights::load(&dir.join(MODEL_FILE)).map_err(|e| e.to_string())?;
    let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &Device::Cpu).map_err(|e| e.to_string())?;
    Ok(Loaded { dir: dir.to_path_buf(), state, model, optimizer })
}

/// A checkpoint folder that did not verify, and the warning that says why.
pub type Unusable = (PathBuf, String);

/// The newest checkpoint that verifies, and each newer one that did not. `Ok(None)` when the run
/// has no checkpoint at all; an error when it has some but none is usable.
pub fn load_latest(run: &Path) -> Result<Option<(Loaded, Vec<Unusable>)>, TrainError> {
    let all = list(run);
    if all.is_empty() {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    for (_, dir) in all.iter().rev() {
        match load(dir) {
            Ok(l) => return Ok(Some((l, warnings))),
            Err(e) => {
                let w = format!("{e}; falling back to the previous one");
                tracing::warn!("{w}");
                warnings.push((dir.clone(), w));
            }
        }
    }
    Err(TrainError::Checkpoint(format!(
        "none of the {} checkpoints in {} is usable ({}); move the folder away to start over",
        all.len(),
        run.join(CHECKPOINTS_DIR).display(),
        warnings.iter().map(|w| w.1.as_str()).collect::<Vec<_>>().join("; ")
    )))
}

/// Renames an unusable checkpoint folder to `step_XXXXXXXX.unusable` (`.unusable.N` when taken):
/// kept for a look, but no longer listed, so that pruning counts only the good ones (it would
/// otherwise delete a good checkpoint and keep the broken one).
pub fn set_aside(dir: &Path) -> Result<PathBuf, TrainError> {
    let mut to = dir.with_extension("unusable");
    let mut n = 1;
    while to.exists() {
        to = dir.with_extension(format!("unusable.{n}"));
        n += 1;
    }
    std::fs::rename(dir, &to).map_err(|e| TrainError::io("cannot move the unusable checkpoint", dir, e))?;
    Ok(to)
}

/// Metadata of the model files: the diffusion config and where in training they come from.
pub fn model_metadata(cfg: &RunConfig, step: u64, epoch: u64) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(DIFFUSION_CONFIG_KEY.to_string(), serde_json::to_string(&cfg.diffusion).expect("config serialises"));
    m.insert("step".to_string(), step.to_string());
    m.insert("epoch".to_string(), epoch.to_string());
    m.insert("producer".to_string(), "ddpm-anime trainer".to_string());
    m
}

/// The lock file inside a run folder; it holds the trainer's process id.
pub const LOCK_FILE: &str = ".lock";

/// Exclusive use of a run folder for as long as it lives. Two trainers in one folder would
/// prune each other's checkpoints and interleave their metrics. It is an OS lock (`flock`), so a
/// crashed or killed trainer frees it, and a stale lock file never blocks a new run.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    /// Set when the filesystem cannot lock (some network mounts): training goes on unguarded.
    pub unguarded: Option<String>,
}

impl RunLock {
    /// Creates `run` if needed and locks it, or says which process holds it.
    pub fn acquire(run: &Path) -> Result<Self, TrainError> {
        use std::io::{Read, Seek, Write};
        unet::weights::create_dir_all(run).map_err(|e| TrainError::io("cannot create", run, e))?;
        let path = run.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainError::io("cannot open", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let by = if holder.is_empty() { "another process".to_string() } else { format!("another process (pid {holder})") };
                return Err(TrainError::Invalid(format!("{} is in use by {by}: wait for it to end or stop it, or use another folder", run.display())));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Ok(Self {
                    _file: file,
                    unguarded: Some(format!("cannot lock {} ({e}): nothing stops a second trainer from using this run folder", path.display())),
                });
            }
        }
        // Only a courtesy for the message above, so a failure to write it does not matter.
        let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| writeln!(file, "{}", std::process::id()));
        Ok(Self { _file: file, unguarded: None })
    }
}

/// Makes `<run>/model.safetensors` the model of the checkpoint being resumed when it is not
/// (a save that failed between the checkpoint and this copy, a damaged file, or one put there by
/// hand): otherwise `sample --checkpoint <run>` would go on with another model after the run
/// reported success. The two are written from the same bytes, so size and CRC-32 (recorded in
/// `state.json`) tell. Returns whether it had to.
pub fn refresh_run_model(run: &Path, ck: &Loaded) -> Result<bool, TrainError> {
    let path = run.join(MODEL_FILE);
    let theirs = ck.dir.join(MODEL_FILE);
    let entry = ck.state.files.iter().find(|f| f.name == MODEL_FILE);
    let same = match (entry, std::fs::metadata(&path)) {
        (Some(e), Ok(m)) if m.len() == e.bytes => std::fs::read(&path).is_ok_and(|d| crc32fast::hash(&d) == e.crc32),
        _ => false,
    };
    if same {
        return Ok(false);
    }
    let data = std::fs::read(&theirs).map_err(|e| TrainError::io("cannot read", &theirs, e))?;
    write(&path, &data)?;
    Ok(true)
}
