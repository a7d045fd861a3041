//! Model weight files: our safetensors format, shape checks against a config, and
//! deterministic PyTorch-style initialisation.
//!
//! A model file is one safetensors file whose tensors use the reference's parameter names
//! (the frozen time table included) and whose `__metadata__` carries the UNet config as JSON
//! under `unet_config`. Optional EMA weights sit beside them under the prefix `ema.`.
//! Other metadata entries (e.g. `diffusion_config`) pass through untouched.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{UNet, UNetConfig, UNetError};

pub const UNET_CONFIG_KEY: &str = "unet_config";
/// Metadata key of the diffusion schedule a model was trained with (JSON of
/// `diffusion::ScheduleConfig`: this crate stores the text, the sampler and trainer read and
/// write it).
pub const DIFFUSION_CONFIG_KEY: &str = "diffusion_config";
pub const EMA_PREFIX: &str = "ema.";

/// Weights plus the config they belong to.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub config: UNetConfig,
    pub tensors: HashMap<String, Tensor>,
    /// Free-form metadata carried in the file (besides the UNet config).
    pub metadata: BTreeMap<String, String>,
}

impl ModelWeights {
    pub fn has_ema(&self) -> bool {
        self.tensors.keys().any(|k| k.starts_with(EMA_PREFIX))
    }

    /// The plain weights, or the EMA copy of every trainable tensor when `ema` is true
    /// (constants such as the time table are shared).
    pub fn select(&self, ema: bool) -> HashMap<String, Tensor> {
        let mut out: HashMap<String, Tensor> =
            self.tensors.iter().filter(|(k, _)| !k.starts_with(EMA_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
        if ema {
            for (k, v) in &self.tensors {
                if let Some(base) = k.strip_prefix(EMA_PREFIX) {
                    out.insert(base.to_string(), v.clone());
                }
            }
        }
        out
    }

    /// Checks every tensor the config needs is present with the right shape, naming the first
    /// one that is not.
    pub fn check(&self) -> Result<(), UNetError> {
        check_tensors(&self.config, &self.select(false))?;
        if self.has_ema() {
            check_tensors(&self.config, &self.select(true))?;
        }
        Ok(())
    }

    /// Builds the network on `device` (weights become plain tensors: no gradient graph).
    pub fn build(&self, device: &Device, ema: bool) -> Result<UNet, UNetError> {
        let tensors = self.select(ema);
        check_tensors(&self.config, &tensors)?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(UNet::new(vb, &self.config)?)
    }

    pub fn load(path: &Path) -> Result<Self, UNetError> {
        let bytes = std::fs::read(path).map_err(|e| UNetError::Io { path: path.display().to_string(), source: e })?;
        Self::from_bytes(&bytes, path)
    }

    fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, UNetError> {
        let what = || path.display().to_string();
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| UNetError::Format { path: what(), reason: format!("not a safetensors model file ({e})") })?;
        let mut metadata: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        let cfg_json = metadata.remove(UNET_CONFIG_KEY).ok_or_else(|| UNetError::Format {
            path: what(),
            reason: format!("no '{UNET_CONFIG_KEY}' in its metadata: not a model file written by this toolkit (import a Lightning checkpoint with `cargo xtask import-checkpoint`)"),
        })?;
        let config: UNetConfig = serde_json::from_str(&cfg_json)
            .map_err(|e| UNetError::Format { path: what(), reason: format!("bad unet_config: {e}") })?;
        config.validate()?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| UNetError::Format { path: what(), reason: format!("unreadable tensors ({e})") })?;
        Ok(Self { config, tensors, metadata })
    }

    /// The file's bytes (what [`ModelWeights::save`] writes). A config that
    /// [`ModelWeights::load`] would refuse is refused here, before a file is written.
    pub fn to_bytes(&self) -> Result<Vec<u8>, UNetError> {
        self.config.validate()?;
        let mut meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        meta.insert(UNET_CONFIG_KEY.into(), serde_json::to_string(&self.config).expect("config serialises"));
        serialize_safetensors(&self.tensors, meta)
    }

    /// Writes atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), UNetError> {
        write_atomic(path, &self.to_bytes()?)
    }
}

/// Safetensors bytes of `tensors` (sorted by name, moved to the CPU) with `metadata`.
pub fn serialize_safetensors(tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<Vec<u8>, UNetError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let views: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|k| Ok((k.clone(), tensors[k].to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
        .map_err(|e| UNetError::Format { path: "<memory>".into(), reason: format!("cannot serialise tensors: {e}") })?;
    Ok(canonical_header(bytes))
}

/// The same file with its JSON header's keys sorted. safetensors writes the metadata from a
/// `HashMap`, in an order that changes from process to process: two identical runs would give
/// files that differ byte for byte, and `sha256sum` could not confirm a bit-exact resume.
fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let header = &bytes[8..8 + header_len];
    let parsed: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).expect("safetensors wrote valid JSON");
    let sorted: BTreeMap<String, serde_json::Value> = parsed
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::Object(m) => (k, serde_json::to_value(m.into_iter().collect::<BTreeMap<_, _>>()).expect("a map")),
            v => (k, v),
        })
        .collect();
    let mut json = serde_json::to_vec(&sorted).expect("a map serialises");
    // The data that follows stays 8-byte aligned, as safetensors pads it.
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() == header_len {
        // The usual case (the same keys, reordered): no second copy of a model-sized buffer.
        bytes[8..8 + header_len].copy_from_slice(&json);
        return bytes;
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - header_len);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + header_len..]);
    out
}

/// Serialises `tensors` with `metadata` and writes them atomically.
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<(), UNetError> {
    write_atomic(path, &serialize_safetensors(tensors, metadata)?)
}

/// `std::fs::create_dir_all`, whose "File exists" does not say that a file stands where a
/// folder of the path should be: this names it.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        // The first part of the path that exists but is no folder.
        let blocker = dir.ancestors().find(|a| !a.as_os_str().is_empty() && a.symlink_metadata().is_ok() && !a.is_dir());
        match blocker {
            Some(file) if file.is_file() => std::io::Error::new(e.kind(), format!("{} is a file, not a folder", file.display())),
            Some(link) if link.is_symlink() => std::io::Error::new(e.kind(), format!("{} is a link to a missing folder", link.display())),
            _ => e,
        }
    })
}

/// Write to a temporary beside `path` ([`temporary_path`]), fsync, rename over `path`, fsync the
/// folder: a crash leaves either the old file or the new one, never half of one. On an error the
/// temporary is removed.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), UNetError> {
    replace_file(path, data, true)
}

/// [`write_atomic`] without the fsyncs and without its sweep of dead processes' temporaries, for
/// regenerable outputs written by the thousand (sample images): a kill or a full disk still
/// leaves the old file or the new one, not half of one; only a power cut could lose the new one.
pub fn write_replacing(path: &Path, data: &[u8]) -> Result<(), UNetError> {
    replace_file(path, data, false)
}

fn replace_file(path: &Path, data: &[u8], sync: bool) -> Result<(), UNetError> {
    let io = |e| UNetError::Io { path: path.display().to_string(), source: e };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir {
        create_dir_all(dir).map_err(io)?;
    }
    // Only for the few large files written with fsync (models, checkpoints): the cleanup lists
    // the folder, which for `sample --save-individual`'s thousands of images would make every
    // write cost as much as all the earlier ones together.
    if sync {
        remove_dead_temporaries(path);
    }
    let tmp = temporary_path(path);
    // Only a left-over of a process that had our pid can be there; removing it (a link itself,
    // not its target) and then creating exclusively never writes through a link.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|_| if sync { f.sync_all() } else { Ok(()) }))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // A full disk would otherwise stay full of our half-written temporary.
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Some(d) = dir.filter(|_| sync).and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The temporary [`write_atomic`] writes before its rename: `.<name>.<pid>.tmp` beside `path`.
/// Hidden and per process, so that it is neither a name a user would pick (a user's
/// `model.safetensors.tmp` is left alone) nor one two processes share.
pub fn temporary_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Checks that files can be created in `dir` (which must exist) by creating and removing a
/// temporary of this process: for commands whose outputs come only after long work.
pub fn check_writable(dir: &Path) -> std::io::Result<()> {
    let probe = temporary_path(&dir.join(".write-test"));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Removes the temporaries of `path` left by killed processes (pid no longer running), which
/// would otherwise stay hidden beside it, each the size of the file. Linux only (`/proc`).
fn remove_dead_temporaries(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let prefix = format!(".{}.", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let pid = file.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp"));
            if pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

/// Records the name and shape of every tensor the model asks for, without allocating them.
struct ShapeRecorder(Arc<Mutex<Vec<(String, Shape)>>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.clone()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder cannot serve unchecked tensor {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        // Report the frozen table as present so that it is recorded too.
        name.ends_with(crate::TIME_TABLE_KEY)
    }
}

/// Every tensor of the reference state dict for `cfg`, in construction order, with its shape.
pub fn expected_shapes(cfg: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>, UNetError> {
    cfg.validate()?;
    let rec = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(ShapeRecorder(rec.clone())), DType::F32, Device::Cpu);
    UNet::new(vb, cfg)?;
    let v = rec.lock().unwrap().iter().map(|(n, s)| (n.clone(), s.dims().to_vec())).collect();
    Ok(v)
}

/// Total parameter count (time table included) and trainable count (without it).
pub fn parameter_counts(cfg: &UNetConfig) -> Result<(usize, usize), UNetError> {
    let shapes = expected_shapes(cfg)?;
    let total: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let frozen = cfg.num_steps * cfg.ch;
    Ok((total, total - frozen))
}

fn check_tensors(cfg: &UNetConfig, tensors: &HashMap<String, Tensor>) -> Result<(), UNetError> {
    for (name, shape) in expected_shapes(cfg)? {
        match tensors.get(&name) {
            None => return Err(UNetError::MissingTensor { name, expected: shape }),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(UNetError::ShapeMismatch { name, expected: shape, found: t.dims().to_vec() })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A fresh trainable model: the variables live in the returned `VarMap` (the frozen time table
/// does not), initialised as PyTorch's defaults do from `seed`.
pub fn new_trainable(cfg: &UNetConfig, device: &Device, seed: u64) -> Result<(UNet, VarMap), UNetError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = UNet::new(vb, cfg)?;
    init_pytorch_default(&varmap, seed)?;
    Ok((model, varmap))
}

/// Re-initialises every variable as `torch.nn` does by default, but from a seed: conv and linear
/// weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)),
/// GroupNorm weight 1 and bias 0. Names are visited in sorted order, so a seed fixes the result.
pub fn init_pytorch_default(varmap: &VarMap, seed: u64) -> Result<(), UNetError> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        } else {
            let weight_name = name.strip_suffix("bias").map(|p| format!("{p}weight"));
            let paired = weight_name.as_ref().and_then(|w| data.get(w)).map(|w| w.dims().to_vec());
            match (name.ends_with("weight"), paired) {
                (true, _) => vec![1.0; n],                       // GroupNorm scale
                (false, Some(w)) if w.len() >= 2 => {
                    let fan_in: usize = w[1..].iter().product();
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
                _ => vec![0.0; n],                               // GroupNorm shift
            }
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// The current values of a trainable model plus its frozen table: the full reference state dict.
pub fn state_dict(model: &UNet, varmap: &VarMap) -> Result<HashMap<String, Tensor>, UNetError> {
    let mut out: HashMap<String, Tensor> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    out.insert(crate::TIME_TABLE_KEY.to_string(), model.time_table().clone());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_way_of_a_folder_is_named() {
        let tmp = std::env::temp_dir().join(format!("weights_dirs_{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("f"), b"x").unwrap();
        let e = write_atomic(&tmp.join("f").join("sub").join("m.safetensors"), b"data").unwrap_err().to_string();
        assert!(e.contains(&format!("{} is a file, not a folder", tmp.join("f").display())), "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn atomic_writes_keep_to_their_own_temporaries() {
        let tmp = std::env::temp_dir().join(format!("weights_tmp_{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let path = tmp.join("m.safetensors");
        // A user's file of the old temporary's name stays as it is.
        std::fs::write(tmp.join("m.safetensors.tmp"), b"notes").unwrap();
        // A link planted where our temporary goes is replaced, not written through.
        std::fs::write(tmp.join("precious"), b"keep").unwrap();
        std::os::unix::fs::symlink(tmp.join("precious"), temporary_path(&path)).unwrap();
        // A killed process's temporary (no such pid) is cleaned; a live one's is not.
        let dead = tmp.join(".m.safetensors.4294967290.tmp");
        let live = tmp.join(".m.safetensors.1.tmp");
        std::fs::write(&dead, b"stale").unwrap();
        std::fs::write(&live, b"busy").unwrap();
        write_atomic(&path, b"model").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"model");
        assert!(!path.is_symlink());
        assert_eq!(std::fs::read(tmp.join("precious")).unwrap(), b"keep");
        assert_eq!(std::fs::read(tmp.join("m.safetensors.tmp")).unwrap(), b"notes");
        assert!(!temporary_path(&path).exists() && !temporary_path(&path).is_symlink());
        assert_eq!(dead.exists(), !cfg!(target_os = "linux"));
        assert!(live.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn serialised_bytes_do_not_depend_on_map_order() {
        let t = |v: f32| Tensor::new(&[v, v + 1.0, v + 2.0], &Device::Cpu).unwrap();
        let tensors: HashMap<String, Tensor> = (0..5).map(|i| (format!("w{i}"), t(i as f32))).collect();
        let entries: Vec<(String, String)> = (0..30).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let a: HashMap<String, String> = entries.iter().cloned().collect();
        let b: HashMap<String, String> = entries.iter().rev().cloned().collect();
        let (x, y) = (serialize_safetensors(&tensors, a).unwrap(), serialize_safetensors(&tensors, b).unwrap());
        assert_eq!(x, y);
        let header_len = u64::from_le_bytes(x[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&x).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["key17"], "value 17");
        let back = safetensors::SafeTensors::deserialize(&x).unwrap();
        let w3 = back.tensor("w3").unwrap();
        assert_eq!(w3.data(), t(3.0).to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }

    #[test]
    fn a_config_that_load_refuses_is_not_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let w = ModelWeights { config: UNetConfig { ch: 0, ..UNetConfig::tiny() }, tensors: HashMap::new(), metadata: Default::default() };
        assert!(w.save(&path).is_err());
        assert!(!path.exists());
    }
}
