//! Import of the reference's PyTorch Lightning checkpoint (`last.ckpt`).
//!
//! A Lightning checkpoint is a `torch.save` zip: `<prefix>/data.pkl` (a pickle of the checkpoint
//! dict) plus one entry `<prefix>/data/<key>` per tensor storage (and `<prefix>/byteorder`).
//! This module reads it with its own small unpickler (see [`pickle`]) that never fails on
//! classes it does not know: any global becomes a class reference, and calling or instantiating
//! an unknown class yields an opaque object that still records the items, elements and state
//! later pickled into it. So Lightning's `AttributeDict` hyper-parameters, `OrderedDict` state
//! dicts carrying `_metadata`, populated `loops`, optimizer states and callback objects all load,
//! where a strict reader (candle's) gives up.
//!
//! From the checkpoint only `state_dict` is taken: every `unet.*` tensor, prefix stripped. Other
//! entries (e.g. an EMA copy from another fork, non-tensors) are reported in [`Imported::ignored`].
//! A plain `torch.save(state_dict)` (no Lightning wrapper) is read the same way, its keys with
//! the `unet.` prefix (the Lightning module's) or without it (the bare UNet's).
//! Tensors may be f32, f16, bf16 or f64 (any integer storage too), at any storage offset and with
//! any strides, in either byte order; they are made contiguous f32. Storage locations (`cpu`,
//! `cuda:0`, ...) are ignored.
//!
//! The UNet config comes from, in order of precedence: the checkpoint's `hyper_parameters`
//! (keys `image_size`, `num_steps`, `ch`, `ch_mult`, `attn`, `num_res_blocks`, `dropout`), an
//! `hparams.yaml` beside the checkpoint or one folder up (Lightning's
//! `version_N/{hparams.yaml,checkpoints/last.ckpt}` layout), the tensor shapes (everything but
//! `image_size` and `dropout` can be inferred), and last the reference's defaults. A field missing
//! from one source is taken from the next. The config must then fit the tensors exactly: a
//! missing, mismatched or unexpected tensor is an error naming it (and its expected shape).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{expected_shapes, ModelWeights, UNetConfig, UNetError, TIME_TABLE_KEY};

use pickle::{Id, Node, Pickle, StorageDType, TensorRef};

/// The state-dict prefix of the UNet inside the reference's `LightningModule`.
pub const STATE_DICT_PREFIX: &str = "unet.";
/// Metadata key: where the model file came from (the checkpoint path).
pub const SOURCE_KEY: &str = "source";
/// Metadata key: the kind of checkpoint it was imported from (`"lightning"`).
pub const IMPORTED_FROM_KEY: &str = "imported_from";
pub use crate::weights::DIFFUSION_CONFIG_KEY;

/// Where the config was read from (the first source that had any of its keys).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// The checkpoint's `hyper_parameters`.
    HyperParameters,
    /// An `hparams.yaml` file next to the checkpoint.
    HparamsYaml(PathBuf),
    /// Inferred from the tensor shapes.
    TensorShapes,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::HyperParameters => write!(f, "the checkpoint's hyper_parameters"),
            ConfigSource::HparamsYaml(p) => write!(f, "{}", p.display()),
            ConfigSource::TensorShapes => write!(f, "the tensor shapes"),
        }
    }
}

/// The imported weights plus what the import found along the way.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Weights (f32, CPU), config, and metadata (`source`, `imported_from`, `diffusion_config`).
    pub weights: ModelWeights,
    pub config_source: ConfigSource,
    /// Config fields found in no source, set to the reference's default (e.g. `image_size`
    /// when the config was inferred from the shapes).
    pub defaulted: Vec<&'static str>,
    /// `state_dict` entries not imported: keys without the `unet.` prefix, and non-tensors.
    pub ignored: Vec<String>,
    /// Stored element type of the imported tensors (`f32`, `f16`, ...) and how many had it.
    pub source_dtypes: BTreeMap<String, usize>,
    pub lightning_version: Option<String>,
    pub epoch: Option<i64>,
    pub global_step: Option<i64>,
}

/// Reads a Lightning checkpoint into model weights (checked against their config).
pub fn import(path: &Path) -> Result<ModelWeights, UNetError> {
    Ok(import_report(path)?.weights)
}

/// [`import`], also returning where the config came from and what was skipped.
pub fn import_report(path: &Path) -> Result<Imported, UNetError> {
    let fail = |reason: String| UNetError::Format { path: path.display().to_string(), reason };
    let mut ckpt = TorchZip::open(path)?;
    let pk = ckpt.read_pickle()?;

    let root = pk.root();
    let top = pk.as_dict(root).ok_or_else(|| {
        fail(format!("data.pkl holds {}, not a dict: not a Lightning checkpoint", pk.describe(root)))
    })?;
    let lookup = |key: &str| top.iter().find(|(k, _)| pk.as_str(*k) == Some(key)).map(|(_, v)| *v);
    let is_tensor = |v: &Id| matches!(pk.node(*v), Node::Tensor(_));
    let (sd_items, prefix) = match lookup("state_dict") {
        Some(sd) => (pk.as_dict(sd).ok_or_else(|| fail(format!("'state_dict' is {}, not a dict", pk.describe(sd))))?, STATE_DICT_PREFIX),
        // A plain `torch.save(module.state_dict())`: the Lightning module's (`unet.*` keys) or
        // the bare UNet's (no prefix).
        None if top.iter().any(|(_, v)| is_tensor(v)) => {
            let lightning = top.iter().any(|(k, v)| is_tensor(v) && pk.as_str(*k).is_some_and(|k| k.starts_with(STATE_DICT_PREFIX)));
            (top, if lightning { STATE_DICT_PREFIX } else { "" })
        }
        None => {
            let keys: Vec<String> = top.iter().filter_map(|(k, _)| pk.as_str(*k)).take(8).map(|k| format!("'{k}'")).collect();
            return Err(fail(format!(
                "no 'state_dict' and no tensors in the checkpoint (top-level keys: {}): not a Lightning checkpoint or a state dict",
                keys.join(", ")
            )));
        }
    };

    // Select the UNet's tensors.
    let mut ignored = Vec::new();
    let mut refs: Vec<(String, TensorRef)> = Vec::new();
    for (k, v) in sd_items {
        let key = match pk.as_str(*k) {
            Some(s) => s.to_string(),
            None => {
                ignored.push(format!("<non-string key: {}>", pk.describe(*k)));
                continue;
            }
        };
        match (key.strip_prefix(prefix), pk.node(*v)) {
            (Some(name), Node::Tensor(t)) => {
                if refs.iter().any(|(n, _)| n == name) {
                    return Err(fail(format!("state_dict has '{key}' twice")));
                }
                refs.push((name.to_string(), t.clone()))
            }
            _ => ignored.push(key),
        }
    }
    if refs.is_empty() {
        let example = ignored.first().map(|k| format!(", e.g. '{k}'")).unwrap_or_default();
        return Err(fail(format!(
            "state_dict has no '{prefix}*' tensors ({} entries{example}): not a checkpoint of the reference DDPM model",
            sd_items.len()
        )));
    }

    // Config: hyper_parameters, hparams.yaml, tensor shapes, defaults.
    let shapes: HashMap<String, Vec<usize>> = refs.iter().map(|(n, t)| (n.clone(), t.size.clone())).collect();
    let from_hp = match lookup("hyper_parameters") {
        Some(hp) => PartialConfig::from_pickle(&pk, hp).map_err(|e| fail(format!("hyper_parameters: {e}")))?,
        None => PartialConfig::default(),
    };
    let yaml = if from_hp.is_empty() { find_hparams_yaml(path) } else { None };
    let from_yaml = match &yaml {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| UNetError::Io { path: p.display().to_string(), source: e })?;
            PartialConfig::from_yaml(&text)
                .map_err(|e| UNetError::Format { path: p.display().to_string(), reason: e })?
        }
        None => PartialConfig::default(),
    };
    let inferred = infer_config(&shapes);
    let config_source = if !from_hp.is_empty() {
        ConfigSource::HyperParameters
    } else if let (false, Some(p)) = (from_yaml.is_empty(), &yaml) {
        ConfigSource::HparamsYaml(p.clone())
    } else {
        ConfigSource::TensorShapes
    };
    let (config, defaulted) = from_hp.or(from_yaml).or(inferred).resolve();
    config.validate().map_err(|e| fail(format!("config from {config_source}: {e}")))?;

    // The config must fit the tensors exactly (checked before reading any tensor data).
    let expected = expected_shapes(&config)?;
    for (name, shape) in &expected {
        match shapes.get(name) {
            None => return Err(UNetError::MissingTensor { name: name.clone(), expected: shape.clone() }),
            Some(s) if s != shape => {
                return Err(UNetError::ShapeMismatch { name: name.clone(), expected: shape.clone(), found: s.clone() })
            }
            Some(_) => {}
        }
    }
    if let Some((name, t)) = refs.iter().find(|(n, _)| !expected.iter().any(|(e, _)| e == n)) {
        return Err(fail(format!(
            "checkpoint has tensor '{prefix}{name}' {:?} that the config from {config_source} does not: it is not a checkpoint of this architecture/config",
            t.size
        )));
    }

    // Tensor data, one storage at a time.
    let big_endian = ckpt.big_endian()?;
    refs.sort_by(|a, b| a.1.storage.key.cmp(&b.1.storage.key).then_with(|| a.0.cmp(&b.0)));
    let mut tensors = HashMap::new();
    let mut source_dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut i = 0;
    while i < refs.len() {
        let key = refs[i].1.storage.key.clone();
        let bytes = ckpt.read_storage(&key)?;
        while i < refs.len() && refs[i].1.storage.key == key {
            let (name, t) = &refs[i];
            let values = decode_tensor(t, &bytes, big_endian)
                .map_err(|e| fail(format!("tensor '{prefix}{name}' (storage data/{key}): {e}")))?;
            tensors.insert(name.clone(), Tensor::from_vec(values, t.size.clone(), &Device::Cpu)?);
            *source_dtypes.entry(t.storage.dtype.name().to_string()).or_default() += 1;
            i += 1;
        }
    }

    let mut metadata = BTreeMap::new();
    metadata.insert(SOURCE_KEY.to_string(), path.display().to_string());
    metadata.insert(IMPORTED_FROM_KEY.to_string(), "lightning".to_string());
    metadata.insert(DIFFUSION_CONFIG_KEY.to_string(), reference_diffusion_config(config.num_steps));
    let weights = ModelWeights { config, tensors, metadata };
    weights.check()?;

    let int = |key: &str| lookup(key).and_then(|v| pk.as_i64(v));
    Ok(Imported {
        weights,
        config_source,
        defaulted,
        ignored,
        source_dtypes,
        lightning_version: lookup("pytorch-lightning_version").and_then(|v| pk.as_str(v)).map(str::to_string),
        epoch: int("epoch"),
        global_step: int("global_step"),
    })
}

/// The reference's schedule as `diffusion::ScheduleConfig` JSON: linear betas 1e-4 .. 0.02.
pub fn reference_diffusion_config(num_steps: usize) -> String {
    serde_json::json!({"num_steps": num_steps, "beta": {"kind": "linear", "start": 0.0001, "end": 0.02}}).to_string()
}

/// `hparams.yaml` beside the checkpoint, or one folder up.
fn find_hparams_yaml(ckpt: &Path) -> Option<PathBuf> {
    let dir = ckpt.parent()?;
    let here = dir.join("hparams.yaml");
    if here.is_file() {
        return Some(here);
    }
    let up = dir.parent()?.join("hparams.yaml");
    up.is_file().then_some(up)
}

// ------------------------------------------------------------------------------------------
// The zip container
// ------------------------------------------------------------------------------------------

struct TorchZip {
    path: PathBuf,
    zip: zip::ZipArchive<BufReader<std::fs::File>>,
    /// Folder holding `data.pkl`, with its trailing `/` (or empty).
    prefix: String,
}

impl TorchZip {
    fn fail(&self, reason: String) -> UNetError {
        UNetError::Format { path: self.path.display().to_string(), reason }
    }

    fn open(path: &Path) -> Result<Self, UNetError> {
        let fail = |reason: String| UNetError::Format { path: path.display().to_string(), reason };
        let io = |e| UNetError::Io { path: path.display().to_string(), source: e };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut head = Vec::with_capacity(4);
        (&mut f).take(4).read_to_end(&mut head).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(fail("empty file: not a PyTorch checkpoint".into()));
        }
        let is_zip = head.starts_with(b"PK");
        if !is_zip && head.first() == Some(&0x80) {
            return Err(fail(
                "legacy (non-zip) torch.save format: not supported, re-save it with PyTorch >= 1.6 (torch.save(torch.load(f), f))".into(),
            ));
        }
        if !is_zip {
            return Err(fail("not a PyTorch checkpoint (not a zip archive)".into()));
        }
        let zip = zip::ZipArchive::new(BufReader::new(f))
            .map_err(|e| fail(format!("truncated or corrupt checkpoint: unreadable zip archive ({e})")))?;
        let pkl = zip
            .file_names()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .min_by_key(|n| (n.matches('/').count(), n.to_string()))
            .map(str::to_string)
            .ok_or_else(|| fail("not a PyTorch checkpoint (no data.pkl)".into()))?;
        let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();
        Ok(Self { path: path.to_path_buf(), zip, prefix })
    }

    fn read_entry(&mut self, name: &str) -> Result<Option<Vec<u8>>, UNetError> {
        let path = self.path.display().to_string();
        let fail = |e: &dyn fmt::Display| UNetError::Format {
            path: path.clone(),
            reason: format!("truncated or corrupt checkpoint: cannot read {name} ({e})"),
        };
        let mut file = match self.zip.by_name(name) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(fail(&e)),
        };
        let mut buf = Vec::with_capacity(file.size().min(1 << 30) as usize);
        file.read_to_end(&mut buf).map_err(|e| fail(&e))?;
        Ok(Some(buf))
    }

    fn read_pickle(&mut self) -> Result<Pickle, UNetError> {
        let name = format!("{}data.pkl", self.prefix);
        let bytes = self.read_entry(&name)?.ok_or_else(|| self.fail("not a PyTorch checkpoint (no data.pkl)".into()))?;
        pickle::parse(&bytes).map_err(|e| self.fail(format!("{name}: {e}")))
    }

    fn big_endian(&mut self) -> Result<bool, UNetError> {
        let name = format!("{}byteorder", self.prefix);
        match self.read_entry(&name)? {
            None => Ok(false),
            Some(b) => match String::from_utf8_lossy(&b).trim() {
                "little" => Ok(false),
                "big" => Ok(true),
                other => Err(self.fail(format!("{name}: unknown byte order '{other}'"))),
            },
        }
    }

    fn read_storage(&mut self, key: &str) -> Result<Vec<u8>, UNetError> {
        let name = format!("{}data/{key}", self.prefix);
        self.read_entry(&name)?.ok_or_else(|| self.fail(format!("truncated or corrupt checkpoint: storage entry {name} is missing")))
    }
}

// ------------------------------------------------------------------------------------------
// Tensor data
// ------------------------------------------------------------------------------------------

/// The elements of `t` in row-major order, as f32.
fn decode_tensor(t: &TensorRef, bytes: &[u8], big_endian: bool) -> Result<Vec<f32>, String> {
    let dt = t.storage.dtype;
    let width = dt.size().ok_or_else(|| format!("unsupported storage type {}", dt.name()))?;
    if t.size.len() != t.stride.len() {
        return Err(format!("size {:?} and stride {:?} differ in rank", t.size, t.stride));
    }
    let numel = t.size.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).ok_or("element count overflows")?;
    let available = bytes.len() / width;
    if numel > 0 {
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |a, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| x.checked_add(a)))
            .ok_or("strides overflow")?;
        if last >= available {
            return Err(format!(
                "needs element {last} of its storage but the entry holds {available} ({} bytes): truncated or corrupt checkpoint",
                bytes.len()
            ));
        }
    }
    let contiguous = {
        let mut expect = 1usize;
        let mut ok = true;
        for (&s, &st) in t.size.iter().zip(&t.stride).rev() {
            if s != 1 && st != expect {
                ok = false;
            }
            expect = expect.saturating_mul(s);
        }
        ok
    };
    let index: Box<dyn Iterator<Item = usize>> =
        if contiguous { Box::new(t.offset..t.offset + numel) } else { Box::new(StridedIndex::new(t.offset, &t.size, &t.stride)) };
    let el = |i: usize| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(&bytes[i * width..(i + 1) * width]);
        if big_endian {
            b[..width].reverse();
        }
        b
    };
    let out: Vec<f32> = match dt {
        StorageDType::F32 => index.map(|i| f32::from_le_bytes(el(i)[..4].try_into().unwrap())).collect(),
        StorageDType::F64 => index.map(|i| f64::from_le_bytes(el(i)) as f32).collect(),
        StorageDType::F16 => index.map(|i| f16_to_f32(u16::from_le_bytes(el(i)[..2].try_into().unwrap()))).collect(),
        StorageDType::BF16 => index.map(|i| bf16_to_f32(u16::from_le_bytes(el(i)[..2].try_into().unwrap()))).collect(),
        StorageDType::I64 => index.map(|i| i64::from_le_bytes(el(i)) as f32).collect(),
        StorageDType::I32 => index.map(|i| i32::from_le_bytes(el(i)[..4].try_into().unwrap()) as f32).collect(),
        StorageDType::I16 => index.map(|i| i16::from_le_bytes(el(i)[..2].try_into().unwrap()) as f32).collect(),
        StorageDType::I8 => index.map(|i| el(i)[0] as i8 as f32).collect(),
        StorageDType::U8 | StorageDType::Bool => index.map(|i| el(i)[0] as f32).collect(),
        StorageDType::Other(_) => unreachable!("rejected above: no element size"),
    };
    Ok(out)
}

/// Storage indices of a strided view, in row-major order.
struct StridedIndex {
    next: Option<usize>,
    pos: Vec<usize>,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl StridedIndex {
    fn new(offset: usize, size: &[usize], stride: &[usize]) -> Self {
        let empty = size.contains(&0);
        Self { next: (!empty).then_some(offset), pos: vec![0; size.len()], size: size.to_vec(), stride: stride.to_vec() }
    }
}

impl Iterator for StridedIndex {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let cur = self.next?;
        let mut idx = cur;
        let mut d = self.size.len();
        loop {
            if d == 0 {
                self.next = None;
                break;
            }
            d -= 1;
            self.pos[d] += 1;
            idx += self.stride[d];
            if self.pos[d] < self.size[d] {
                self.next = Some(idx);
                break;
            }
            idx -= self.stride[d] * self.pos[d];
            self.pos[d] = 0;
        }
        Some(cur)
    }
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // Subnormal: mant * 2^-24, exact in f32.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 112) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

// ------------------------------------------------------------------------------------------
// Config sources
// ------------------------------------------------------------------------------------------

/// Config fields as found in one source.
#[derive(Debug, Clone, Default, PartialEq)]
struct PartialConfig {
    image_size: Option<usize>,
    image_channels: Option<usize>,
    num_steps: Option<usize>,
    ch: Option<usize>,
    ch_mult: Option<Vec<usize>>,
    attn: Option<Vec<usize>>,
    num_res_blocks: Option<usize>,
    dropout: Option<f32>,
}

/// Architecture keys in hyper_parameters / hparams.yaml.
const HP_KEYS: [&str; 7] = ["image_size", "num_steps", "ch", "ch_mult", "attn", "num_res_blocks", "dropout"];

/// A hyper-parameter value, whichever file it came from.
#[derive(Debug, Clone)]
enum HpValue {
    Int(i64),
    Float(f64),
    List(Vec<HpValue>),
    Other(String),
}

impl HpValue {
    fn describe(&self) -> String {
        match self {
            HpValue::Int(i) => format!("{i}"),
            // `{:?}` keeps the ".0" of a float that holds a whole number (1e9 -> 1000000000.0).
            HpValue::Float(f) => format!("the float {f:?}"),
            HpValue::List(_) => "a list".into(),
            HpValue::Other(s) => s.clone(),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, String> {
        match self {
            HpValue::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(format!("'{key}' must be a non-negative integer, found {}", self.describe())),
        }
    }
    fn usize_list(&self, key: &str) -> Result<Vec<usize>, String> {
        match self {
            HpValue::List(v) => v.iter().map(|x| x.usize(key)).collect(),
            HpValue::Int(_) => Ok(vec![self.usize(key)?]),
            _ => Err(format!("'{key}' must be a list of integers, found {}", self.describe())),
        }
    }
}

impl PartialConfig {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn from_values(get: impl Fn(&str) -> Option<HpValue>) -> Result<Self, String> {
        let mut c = Self::default();
        if let Some(v) = get("image_size") {
            let dims = v.usize_list("image_size")?;
            let (channels, side) = match dims.as_slice() {
                [s] => (None, *s),
                [h, w] if h == w => (None, *h),
                [c, h, w] if h == w => (Some(*c), *h),
                _ => return Err(format!("'image_size' must be N, [H, W] or [C, H, W] with square images, found {dims:?}")),
            };
            c.image_size = Some(side);
            c.image_channels = channels;
        }
        let num = |k: &str| get(k).map(|v| v.usize(k)).transpose();
        let list = |k: &str| get(k).map(|v| v.usize_list(k)).transpose();
        c.num_steps = num("num_steps")?;
        c.ch = num("ch")?;
        c.ch_mult = list("ch_mult")?;
        c.attn = list("attn")?;
        c.num_res_blocks = num("num_res_blocks")?;
        c.dropout = match get("dropout") {
            None => None,
            Some(HpValue::Float(f)) => Some(f as f32),
            Some(HpValue::Int(i)) => Some(i as f32),
            Some(v) => return Err(format!("'dropout' must be a number, found {}", v.describe())),
        };
        Ok(c)
    }

    /// From the checkpoint's `hyper_parameters` (a dict, an `AttributeDict`, or an object with a
    /// `__dict__` such as an argparse `Namespace`); keys one level down are found too.
    fn from_pickle(pk: &Pickle, hp: Id) -> Result<Self, String> {
        let Some(items) = pk.as_dict(hp) else { return Ok(Self::default()) };
        let find = |key: &str| -> Option<Id> {
            if let Some((_, v)) = items.iter().find(|(k, _)| pk.as_str(*k) == Some(key)) {
                return Some(*v);
            }
            items.iter().filter_map(|(_, v)| pk.as_dict(*v)).find_map(|inner| {
                inner.iter().find(|(k, _)| pk.as_str(*k) == Some(key)).map(|(_, v)| *v)
            })
        };
        fn value(pk: &Pickle, id: Id, depth: usize) -> HpValue {
            match pk.node(id) {
                Node::Int(i) => HpValue::Int(*i),
                Node::Bool(b) => HpValue::Other(format!("{b}")),
                Node::Float(f) => HpValue::Float(*f),
                Node::List(v) | Node::Tuple(v) if depth < 2 => HpValue::List(v.iter().map(|x| value(pk, *x, depth + 1)).collect()),
                // e.g. torch.Size((3, 64, 64))
                Node::Object { elems, .. } if depth < 2 && !elems.is_empty() => {
                    HpValue::List(elems.iter().map(|x| value(pk, *x, depth + 1)).collect())
                }
                _ => HpValue::Other(pk.describe(id)),
            }
        }
        Self::from_values(|k| find(k).map(|id| value(pk, id, 0)))
    }

    /// From Lightning's `hparams.yaml`: top-level `key: value` lines; values are numbers, flow
    /// lists (`[1, 2]`) or block lists (`- 1` lines), optionally tagged (`!!python/tuple`).
    fn from_yaml(text: &str) -> Result<Self, String> {
        let mut values: HashMap<String, HpValue> = HashMap::new();
        let lines: Vec<&str> = text.lines().map(|l| strip_yaml_comment(l).trim_end()).collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            i += 1;
            if line.is_empty() || line.starts_with([' ', '\t', '-', '#']) || line == "---" {
                continue;
            }
            let Some((key, rest)) = line.split_once(':') else { continue };
            let key = key.trim().trim_matches(['\'', '"']);
            if !HP_KEYS.contains(&key) {
                continue;
            }
            let mut rest = rest.trim();
            if rest.starts_with("!!") {
                rest = rest.split_once(' ').map(|(_, r)| r.trim()).unwrap_or("");
            }
            let v = if rest.is_empty() {
                // Block sequence: following "- item" lines (indented or not).
                let mut items = Vec::new();
                while i < lines.len() {
                    let l = lines[i].trim_start();
                    if lines[i].trim().is_empty() {
                        i += 1;
                        continue;
                    }
                    let Some(item) = l.strip_prefix('-') else { break };
                    items.push(yaml_scalar(item.trim()));
                    i += 1;
                }
                HpValue::List(items)
            } else if let Some(inner) = rest.strip_prefix('[') {
                let inner = inner.strip_suffix(']').ok_or_else(|| format!("'{key}': unterminated flow list '{rest}'"))?;
                HpValue::List(inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(yaml_scalar).collect())
            } else {
                yaml_scalar(rest)
            };
            values.insert(key.to_string(), v);
        }
        Self::from_values(|k| values.get(k).cloned()).map_err(|e| format!("hparams: {e}"))
    }

    fn or(self, o: Self) -> Self {
        Self {
            image_size: self.image_size.or(o.image_size),
            image_channels: self.image_channels.or(o.image_channels),
            num_steps: self.num_steps.or(o.num_steps),
            ch: self.ch.or(o.ch),
            ch_mult: self.ch_mult.or(o.ch_mult),
            attn: self.attn.or(o.attn),
            num_res_blocks: self.num_res_blocks.or(o.num_res_blocks),
            dropout: self.dropout.or(o.dropout),
        }
    }

    /// Fills what is still missing with the reference's defaults, naming those fields.
    fn resolve(self) -> (UNetConfig, Vec<&'static str>) {
        let d = UNetConfig::reference();
        let mut defaulted = Vec::new();
        let mut pick = |name: &'static str, v: Option<_>, default| match v {
            Some(v) => v,
            None => {
                defaulted.push(name);
                default
            }
        };
        let image_size = pick("image_size", self.image_size.map(|v| vec![v]), vec![d.image_size])[0];
        let image_channels = pick("image_channels", self.image_channels.map(|v| vec![v]), vec![d.image_channels])[0];
        let num_steps = pick("num_steps", self.num_steps.map(|v| vec![v]), vec![d.num_steps])[0];
        let ch = pick("ch", self.ch.map(|v| vec![v]), vec![d.ch])[0];
        let ch_mult = pick("ch_mult", self.ch_mult, d.ch_mult.clone());
        let attn = pick("attn", self.attn, d.attn.clone());
        let num_res_blocks = pick("num_res_blocks", self.num_res_blocks.map(|v| vec![v]), vec![d.num_res_blocks])[0];
        let dropout = match self.dropout {
            Some(p) => p,
            None => {
                defaulted.push("dropout");
                d.dropout
            }
        };
        (UNetConfig { image_size, image_channels, num_steps, ch, ch_mult, attn, num_res_blocks, dropout }, defaulted)
    }
}

fn strip_yaml_comment(line: &str) -> &str {
    match line.find(" #") {
        Some(i) => &line[..i],
        None if line.trim_start().starts_with('#') => "",
        None => line,
    }
}

fn yaml_scalar(s: &str) -> HpValue {
    let s = s.trim().trim_matches(['\'', '"']);
    if let Ok(i) = s.parse::<i64>() {
        HpValue::Int(i)
    } else if let Ok(f) = s.parse::<f64>() {
        HpValue::Float(f)
    } else {
        HpValue::Other(format!("'{s}'"))
    }
}

/// Reads the architecture back from the state dict's names and shapes. `image_size` and
/// `dropout` leave no trace in the tensors and stay unknown.
fn infer_config(shapes: &HashMap<String, Vec<usize>>) -> PartialConfig {
    let mut c = PartialConfig::default();
    if let Some([ch, cin, ..]) = shapes.get("head.weight").map(Vec::as_slice) {
        c.ch = Some(*ch);
        c.image_channels = Some(*cin);
    }
    if let Some([t, _]) = shapes.get(TIME_TABLE_KEY).map(Vec::as_slice) {
        c.num_steps = Some(*t);
    }
    let Some(ch) = c.ch.filter(|&ch| ch > 0) else { return c };
    // Down path: ResBlocks per level, separated by DownSamples.
    let mut levels: Vec<(usize, usize, bool)> = Vec::new(); // (mult, res blocks, attention)
    let mut cur: Option<(usize, usize, bool)> = None;
    for i in 0.. {
        let p = format!("downblocks.{i}.");
        if shapes.contains_key(&format!("{p}net.weight")) {
            match cur.take() {
                Some(l) => levels.push(l),
                None => return c,
            }
        } else if let Some(w) = shapes.get(&format!("{p}block1.2.weight")) {
            let cout = w[0];
            if !cout.is_multiple_of(ch) {
                return c;
            }
            let attn = shapes.contains_key(&format!("{p}attn.proj.weight"));
            match &mut cur {
                Some((m, n, a)) if *m == cout / ch && *a == attn => *n += 1,
                Some(_) => return c,
                None => cur = Some((cout / ch, 1, attn)),
            }
        } else {
            break;
        }
    }
    if let Some(l) = cur {
        levels.push(l);
    }
    if levels.is_empty() || levels.iter().any(|l| l.1 != levels[0].1) {
        return c;
    }
    c.ch_mult = Some(levels.iter().map(|l| l.0).collect());
    c.attn = Some(levels.iter().enumerate().filter(|(_, l)| l.2).map(|(i, _)| i).collect());
    c.num_res_blocks = Some(levels[0].1);
    c
}

// ------------------------------------------------------------------------------------------
// The unpickler
// ------------------------------------------------------------------------------------------

/// A small unpickler for what `torch.save` and Lightning write (protocols 0-5, no out-of-band
/// buffers). It never imports anything: globals are names, and calling one that is not a known
/// container or torch tensor rebuild function gives an opaque [`Node::Object`].
///
/// Values live in an arena and are referred to by [`Id`], so the memo shares objects as Python
/// does (a dict memoised while empty and filled later is seen filled through every reference).
pub mod pickle {
    use std::collections::HashMap;
    use std::fmt;

    pub type Id = usize;

    /// Element type of a torch storage class (`torch.FloatStorage` ...).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum StorageDType {
        F32,
        F64,
        F16,
        BF16,
        I64,
        I32,
        I16,
        I8,
        U8,
        Bool,
        /// A storage class this reader cannot decode (complex, quantised, ...).
        Other(&'static str),
    }

    impl StorageDType {
        fn from_class(name: &str) -> Self {
            match name {
                "FloatStorage" | "float32" | "float" => Self::F32,
                "DoubleStorage" | "float64" | "double" => Self::F64,
                "HalfStorage" | "float16" | "half" => Self::F16,
                "BFloat16Storage" | "bfloat16" => Self::BF16,
                "LongStorage" | "int64" | "long" => Self::I64,
                "IntStorage" | "int32" | "int" => Self::I32,
                "ShortStorage" | "int16" | "short" => Self::I16,
                "CharStorage" | "int8" => Self::I8,
                "ByteStorage" | "UntypedStorage" | "uint8" => Self::U8,
                "BoolStorage" | "bool" => Self::Bool,
                _ => Self::Other("unsupported"),
            }
        }
        /// Bytes per element, `None` when unsupported.
        pub fn size(&self) -> Option<usize> {
            Some(match self {
                Self::F64 | Self::I64 => 8,
                Self::F32 | Self::I32 => 4,
                Self::F16 | Self::BF16 | Self::I16 => 2,
                Self::I8 | Self::U8 | Self::Bool => 1,
                Self::Other(_) => return None,
            })
        }
        pub fn name(&self) -> &'static str {
            match self {
                Self::F32 => "f32",
                Self::F64 => "f64",
                Self::F16 => "f16",
                Self::BF16 => "bf16",
                Self::I64 => "i64",
                Self::I32 => "i32",
                Self::I16 => "i16",
                Self::I8 => "i8",
                Self::U8 => "u8",
                Self::Bool => "bool",
                Self::Other(s) => s,
            }
        }
    }

    /// A storage persistent id: `('storage', <class>, key, location, numel)`.
    #[derive(Debug, Clone, PartialEq)]
    pub struct StorageRef {
        pub dtype: StorageDType,
        /// Storage class as pickled, e.g. `torch.FloatStorage`.
        pub class: String,
        pub key: String,
        pub location: String,
        pub numel: usize,
    }

    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    #[derive(Debug, Clone, PartialEq)]
    pub struct TensorRef {
        pub storage: StorageRef,
        pub offset: usize,
        pub size: Vec<usize>,
        pub stride: Vec<usize>,
    }

    #[derive(Debug, Clone)]
    pub enum Node {
        None,
        Bool(bool),
        Int(i64),
        /// An integer beyond i64 (its byte length).
        BigInt(usize),
        Float(f64),
        Str(String),
        Bytes(Vec<u8>),
        List(Vec<Id>),
        Tuple(Vec<Id>),
        Set(Vec<Id>),
        Dict(Vec<(Id, Id)>),
        /// A class or function reference (`GLOBAL` / `STACK_GLOBAL`).
        Global { module: String, name: String },
        /// An instance of, or the result of calling, something unknown: its items (`SETITEMS`),
        /// elements (`APPENDS`) and state (`BUILD`) are kept.
        Object { class: Id, args: Id, state: Option<Id>, items: Vec<(Id, Id)>, elems: Vec<Id> },
        /// A persistent id that is not a storage.
        PersId(Id),
        Storage(StorageRef),
        Tensor(TensorRef),
    }

    #[derive(Debug)]
    pub struct PickleError {
        pub pos: usize,
        pub msg: String,
    }

    impl fmt::Display for PickleError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} (at byte {})", self.msg, self.pos)
        }
    }

    /// A parsed pickle: the arena and the root value.
    pub struct Pickle {
        nodes: Vec<Node>,
        root: Id,
    }

    impl Pickle {
        pub fn root(&self) -> Id {
            self.root
        }
        pub fn node(&self, id: Id) -> &Node {
            &self.nodes[id]
        }
        pub fn as_str(&self, id: Id) -> Option<&str> {
            match &self.nodes[id] {
                Node::Str(s) => Some(s),
                _ => None,
            }
        }
        pub fn as_i64(&self, id: Id) -> Option<i64> {
            match &self.nodes[id] {
                Node::Int(i) => Some(*i),
                _ => None,
            }
        }
        /// The items of a dict, of a dict subclass instance (`AttributeDict`, `OrderedDict`
        /// built by `NEWOBJ`), or else of an object's `__dict__` state.
        pub fn as_dict(&self, id: Id) -> Option<&[(Id, Id)]> {
            match &self.nodes[id] {
                Node::Dict(items) => Some(items),
                Node::Object { items, state, .. } => {
                    if !items.is_empty() {
                        return Some(items);
                    }
                    match state.map(|s| &self.nodes[s]) {
                        Some(Node::Dict(st)) if !st.is_empty() => Some(st),
                        // (state, slotstate) pairs
                        Some(Node::Tuple(t)) if t.len() == 2 => match &self.nodes[t[0]] {
                            Node::Dict(st) => Some(st),
                            _ => Some(items),
                        },
                        _ => Some(items),
                    }
                }
                _ => None,
            }
        }
        /// A short description for error messages.
        pub fn describe(&self, id: Id) -> String {
            match &self.nodes[id] {
                Node::None => "None".into(),
                Node::Bool(b) => format!("{b}"),
                Node::Int(i) => format!("{i}"),
                Node::BigInt(_) => "a big integer".into(),
                Node::Float(f) => format!("{f}"),
                Node::Str(s) => format!("'{}'", s.chars().take(40).collect::<String>()),
                Node::Bytes(b) => format!("{} bytes", b.len()),
                Node::List(v) => format!("a list of {}", v.len()),
                Node::Tuple(v) => format!("a tuple of {}", v.len()),
                Node::Set(v) => format!("a set of {}", v.len()),
                Node::Dict(v) => format!("a dict of {}", v.len()),
                Node::Global { module, name } => format!("{module}.{name}"),
                Node::Object { class, .. } => match &self.nodes[*class] {
                    Node::Global { module, name } => format!("a {module}.{name} object"),
                    _ => "an object".into(),
                },
                Node::PersId(_) => "a persistent id".into(),
                Node::Storage(s) => format!("a {} storage", s.class),
                Node::Tensor(t) => format!("a tensor {:?}", t.size),
            }
        }
    }

    struct Parser<'a> {
        data: &'a [u8],
        pos: usize,
        /// Position of the opcode being executed, for errors.
        op_pos: usize,
        nodes: Vec<Node>,
        stack: Vec<Id>,
        marks: Vec<usize>,
        memo: HashMap<u64, Id>,
        call_depth: usize,
    }

    /// Parses a whole pickle (up to its `STOP`).
    pub fn parse(data: &[u8]) -> Result<Pickle, PickleError> {
        let mut p = Parser { data, pos: 0, op_pos: 0, nodes: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), call_depth: 0 };
        let root = p.run()?;
        Ok(Pickle { nodes: p.nodes, root })
    }

    impl<'a> Parser<'a> {
        fn err<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
            Err(PickleError { pos: self.op_pos, msg: msg.into() })
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
            if n > self.data.len() - self.pos {
                return Err(PickleError { pos: self.pos, msg: "truncated pickle: unexpected end of data".into() });
            }
            let s = &self.data[self.pos..self.pos + n];
            self.pos += n;
            Ok(s)
        }
        fn u8(&mut self) -> Result<u8, PickleError> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> Result<u16, PickleError> {
            Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
        }
        fn u32(&mut self) -> Result<u32, PickleError> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
        }
        fn u64(&mut self) -> Result<u64, PickleError> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn len64(&mut self) -> Result<usize, PickleError> {
            let n = self.u64()?;
            usize::try_from(n).or_else(|_| self.err("length overflows"))
        }
        fn line(&mut self) -> Result<&'a str, PickleError> {
            let rest = &self.data[self.pos..];
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                return Err(PickleError { pos: self.pos, msg: "truncated pickle: unterminated line".into() });
            };
            self.pos += end + 1;
            let l = &rest[..end];
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            std::str::from_utf8(l).or_else(|_| self.err("non-UTF-8 text line"))
        }

        fn push(&mut self, n: Node) {
            self.nodes.push(n);
            self.stack.push(self.nodes.len() - 1);
        }
        fn pop(&mut self) -> Result<Id, PickleError> {
            let floor = self.marks.last().copied().unwrap_or(0);
            if self.stack.len() <= floor {
                return self.err("stack underflow (malformed pickle)");
            }
            Ok(self.stack.pop().unwrap())
        }
        fn top(&self) -> Result<Id, PickleError> {
            match self.stack.last() {
                Some(&t) => Ok(t),
                None => self.err("stack underflow (malformed pickle)"),
            }
        }
        fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
            let Some(m) = self.marks.pop() else { return self.err("no MARK on the stack (malformed pickle)") };
            Ok(self.stack.split_off(m))
        }
        fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
            let t = self.top()?;
            self.memo.insert(key, t);
            Ok(())
        }
        fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
            match self.memo.get(&key) {
                Some(&id) => {
                    self.stack.push(id);
                    Ok(())
                }
                None => self.err(format!("memo key {key} not found (malformed pickle)")),
            }
        }

        fn run(&mut self) -> Result<Id, PickleError> {
            loop {
                self.op_pos = self.pos;
                let op = self.u8()?;
                match op {
                    0x80 => {
                        self.u8()?; // PROTO
                    }
                    0x95 => {
                        self.u64()?; // FRAME: framing is only a hint to buffered readers
                    }
                    b'.' => {
                        // STOP
                        return match self.stack.pop() {
                            Some(r) => Ok(r),
                            None => self.err("empty stack at STOP"),
                        };
                    }
                    // --- memo / stack
                    b'q' => {
                        let k = self.u8()? as u64;
                        self.memo_put(k)?
                    }
                    b'r' => {
                        let k = self.u32()? as u64;
                        self.memo_put(k)?
                    }
                    b'p' => {
                        let k = self.line()?.trim().parse::<u64>().or_else(|_| self.err("bad PUT index"))?;
                        self.memo_put(k)?
                    }
                    0x94 => {
                        let k = self.memo.len() as u64; // MEMOIZE
                        self.memo_put(k)?
                    }
                    b'h' => {
                        let k = self.u8()? as u64;
                        self.memo_get(k)?
                    }
                    b'j' => {
                        let k = self.u32()? as u64;
                        self.memo_get(k)?
                    }
                    b'g' => {
                        let k = self.line()?.trim().parse::<u64>().or_else(|_| self.err("bad GET index"))?;
                        self.memo_get(k)?
                    }
                    b'(' => self.marks.push(self.stack.len()),
                    b'0' => {
                        self.pop()?;
                    }
                    b'1' => {
                        self.pop_mark()?;
                    }
                    b'2' => {
                        let t = self.top()?;
                        self.stack.push(t)
                    }
                    // --- constants and scalars
                    b'N' => self.push(Node::None),
                    0x88 => self.push(Node::Bool(true)),
                    0x89 => self.push(Node::Bool(false)),
                    b'K' => {
                        let v = self.u8()? as i64;
                        self.push(Node::Int(v))
                    }
                    b'M' => {
                        let v = self.u16()? as i64;
                        self.push(Node::Int(v))
                    }
                    b'J' => {
                        let v = self.u32()? as i32 as i64;
                        self.push(Node::Int(v))
                    }
                    0x8a => {
                        let n = self.u8()? as usize;
                        let b = self.take(n)?;
                        self.push(long_le(b))
                    }
                    0x8b => {
                        let n = self.u32()? as usize;
                        let b = self.take(n)?;
                        self.push(long_le(b))
                    }
                    b'G' => {
                        let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                        self.push(Node::Float(v))
                    }
                    b'I' => {
                        let l = self.line()?.trim();
                        let n = match l {
                            "00" => Node::Bool(false),
                            "01" => Node::Bool(true),
                            _ => Node::Int(l.parse().or_else(|_| self.err("bad INT"))?),
                        };
                        self.push(n)
                    }
                    b'L' => {
                        let l = self.line()?.trim().trim_end_matches('L');
                        let n = l.parse().map(Node::Int).unwrap_or(Node::BigInt(l.len()));
                        self.push(n)
                    }
                    b'F' => {
                        let v = self.line()?.trim().parse().or_else(|_| self.err("bad FLOAT"))?;
                        self.push(Node::Float(v))
                    }
                    // --- strings and bytes
                    b'X' => {
                        let n = self.u32()? as usize;
                        let s = self.utf8(n)?;
                        self.push(Node::Str(s))
                    }
                    0x8c => {
                        let n = self.u8()? as usize;
                        let s = self.utf8(n)?;
                        self.push(Node::Str(s))
                    }
                    0x8d => {
                        let n = self.len64()?;
                        let s = self.utf8(n)?;
                        self.push(Node::Str(s))
                    }
                    b'T' => {
                        let n = self.u32()? as usize;
                        let b = self.take(n)?;
                        self.push(Node::Str(b.iter().map(|&c| c as char).collect()))
                    }
                    b'U' => {
                        let n = self.u8()? as usize;
                        let b = self.take(n)?;
                        self.push(Node::Str(b.iter().map(|&c| c as char).collect()))
                    }
                    b'V' => {
                        let s = self.line()?.to_string();
                        self.push(Node::Str(s))
                    }
                    b'S' => {
                        let s = self.line()?.trim();
                        let s = s.get(1..s.len().saturating_sub(1)).unwrap_or("").to_string();
                        self.push(Node::Str(s))
                    }
                    b'B' => {
                        let n = self.u32()? as usize;
                        let b = self.take(n)?.to_vec();
                        self.push(Node::Bytes(b))
                    }
                    b'C' => {
                        let n = self.u8()? as usize;
                        let b = self.take(n)?.to_vec();
                        self.push(Node::Bytes(b))
                    }
                    0x8e | 0x96 => {
                        let n = self.len64()?;
                        let b = self.take(n)?.to_vec();
                        self.push(Node::Bytes(b))
                    }
                    0x97 | 0x98 => return self.err("out-of-band pickle buffers are not supported"),
                    // --- containers
                    b'}' => self.push(Node::Dict(Vec::new())),
                    b']' => self.push(Node::List(Vec::new())),
                    b')' => self.push(Node::Tuple(Vec::new())),
                    0x8f => self.push(Node::Set(Vec::new())),
                    b't' => {
                        let v = self.pop_mark()?;
                        self.push(Node::Tuple(v))
                    }
                    0x85..=0x87 => {
                        let n = (op - 0x84) as usize;
                        let floor = self.marks.last().copied().unwrap_or(0);
                        if self.stack.len() < floor + n {
                            return self.err("stack underflow (malformed pickle)");
                        }
                        let v = self.stack.split_off(self.stack.len() - n);
                        self.push(Node::Tuple(v))
                    }
                    b'l' => {
                        let v = self.pop_mark()?;
                        self.push(Node::List(v))
                    }
                    b'd' => {
                        let v = self.pop_mark()?;
                        let Some(items) = pairs(&v) else { return self.err("DICT with an odd number of items") };
                        self.push(Node::Dict(items))
                    }
                    0x91 => {
                        let v = self.pop_mark()?;
                        self.push(Node::Set(v))
                    }
                    b'a' => {
                        let v = self.pop()?;
                        let target = self.top()?;
                        self.extend(target, vec![v]);
                    }
                    b'e' | 0x90 => {
                        let v = self.pop_mark()?;
                        let target = self.top()?;
                        self.extend(target, v);
                    }
                    b's' => {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        let target = self.top()?;
                        self.set_items(target, vec![(k, v)]);
                    }
                    b'u' => {
                        let v = self.pop_mark()?;
                        let items = match pairs(&v) {
                            Some(i) => i,
                            None => return self.err("SETITEMS with an odd number of items"),
                        };
                        let target = self.top()?;
                        self.set_items(target, items);
                    }
                    // --- classes, calls, objects
                    b'c' => {
                        let module = self.line()?.to_string();
                        let name = self.line()?.to_string();
                        self.push(Node::Global { module, name })
                    }
                    0x93 => {
                        let name = self.pop()?;
                        let module = self.pop()?;
                        let (Node::Str(m), Node::Str(n)) = (&self.nodes[module], &self.nodes[name]) else {
                            return self.err("STACK_GLOBAL needs two strings");
                        };
                        let g = Node::Global { module: m.clone(), name: n.clone() };
                        self.push(g)
                    }
                    0x82..=0x84 => {
                        let code = match op {
                            0x82 => self.u8()? as u32,
                            0x83 => self.u16()? as u32,
                            _ => self.u32()?,
                        };
                        self.push(Node::Global { module: "copyreg.extension".into(), name: code.to_string() })
                    }
                    b'R' => {
                        let args = self.pop()?;
                        let func = self.pop()?;
                        let r = self.call(func, args)?;
                        self.push(r)
                    }
                    0x81 => {
                        let args = self.pop()?;
                        let cls = self.pop()?;
                        let r = self.call(cls, args)?;
                        self.push(r)
                    }
                    0x92 => {
                        let _kwargs = self.pop()?;
                        let args = self.pop()?;
                        let cls = self.pop()?;
                        let r = self.call(cls, args)?;
                        self.push(r)
                    }
                    b'i' => {
                        let module = self.line()?.to_string();
                        let name = self.line()?.to_string();
                        let v = self.pop_mark()?;
                        self.nodes.push(Node::Global { module, name });
                        let cls = self.nodes.len() - 1;
                        self.nodes.push(Node::Tuple(v));
                        let args = self.nodes.len() - 1;
                        let r = self.call(cls, args)?;
                        self.push(r)
                    }
                    b'o' => {
                        let mut v = self.pop_mark()?;
                        if v.is_empty() {
                            return self.err("OBJ without a class");
                        }
                        let cls = v.remove(0);
                        self.nodes.push(Node::Tuple(v));
                        let args = self.nodes.len() - 1;
                        let r = self.call(cls, args)?;
                        self.push(r)
                    }
                    b'b' => {
                        let state = self.pop()?;
                        let target = self.top()?;
                        if let Node::Object { state: s, .. } = &mut self.nodes[target] {
                            *s = Some(state);
                        }
                        // BUILD on anything else (an OrderedDict's `_metadata`, a Parameter's
                        // hooks state) only sets attributes we have no use for.
                    }
                    b'Q' => {
                        let pid = self.pop()?;
                        let r = self.persistent(pid);
                        self.push(r)
                    }
                    b'P' => {
                        let s = self.line()?.to_string();
                        self.nodes.push(Node::Str(s));
                        let pid = self.nodes.len() - 1;
                        let r = self.persistent(pid);
                        self.push(r)
                    }
                    other => return self.err(format!("unknown pickle opcode 0x{other:02x}")),
                }
            }
        }

        fn utf8(&mut self, n: usize) -> Result<String, PickleError> {
            let b = self.take(n)?;
            // Python writes surrogates with surrogatepass; replace rather than fail.
            Ok(String::from_utf8_lossy(b).into_owned())
        }

        fn extend(&mut self, target: Id, v: Vec<Id>) {
            match &mut self.nodes[target] {
                Node::List(l) | Node::Set(l) => l.extend(v),
                Node::Object { elems, .. } => elems.extend(v),
                _ => {}
            }
        }

        fn set_items(&mut self, target: Id, items: Vec<(Id, Id)>) {
            match &mut self.nodes[target] {
                Node::Dict(d) => d.extend(items),
                Node::Object { items: d, .. } => d.extend(items),
                _ => {}
            }
        }

        fn seq(&self, id: Id) -> Option<&[Id]> {
            match &self.nodes[id] {
                Node::Tuple(v) | Node::List(v) | Node::Set(v) => Some(v),
                _ => None,
            }
        }

        fn usize_of(&self, id: Id, what: &str) -> Result<usize, PickleError> {
            match &self.nodes[id] {
                Node::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => self.err(format!("tensor {what} is not a non-negative integer")),
            }
        }

        fn usizes_of(&self, id: Id, what: &str) -> Result<Vec<usize>, PickleError> {
            let items = match &self.nodes[id] {
                Node::Object { elems, .. } => elems.as_slice(), // torch.Size built by NEWOBJ
                _ => self.seq(id).ok_or(()).or_else(|_| self.err(format!("tensor {what} is not a tuple")))?,
            };
            items.iter().map(|&x| self.usize_of(x, what)).collect()
        }

        /// BINPERSID: torch storages, anything else kept opaque.
        fn persistent(&self, pid: Id) -> Node {
            if let Some(v) = self.seq(pid) {
                if v.len() >= 5 && matches!(&self.nodes[v[0]], Node::Str(s) if s == "storage") {
                    let class = match &self.nodes[v[1]] {
                        Node::Global { module, name } => Some((format!("{module}.{name}"), name.clone())),
                        _ => None,
                    };
                    let key = match &self.nodes[v[2]] {
                        Node::Str(s) => Some(s.clone()),
                        Node::Int(i) => Some(i.to_string()),
                        _ => None,
                    };
                    let location = match &self.nodes[v[3]] {
                        Node::Str(s) => s.clone(),
                        _ => String::new(),
                    };
                    let numel = match &self.nodes[v[4]] {
                        Node::Int(i) if *i >= 0 => Some(*i as usize),
                        _ => None,
                    };
                    if let (Some((class, name)), Some(key), Some(numel)) = (class, key, numel) {
                        let dtype = StorageDType::from_class(&name);
                        return Node::Storage(StorageRef { dtype, class, key, location, numel });
                    }
                }
            }
            Node::PersId(pid)
        }

        /// REDUCE / NEWOBJ: known containers and torch rebuild functions are evaluated, anything
        /// else becomes an opaque object.
        fn call(&mut self, func: Id, args: Id) -> Result<Node, PickleError> {
            let (module, name) = match &self.nodes[func] {
                Node::Global { module, name } => (module.as_str(), name.as_str()),
                _ => ("", ""),
            };
            let argv: Vec<Id> = self.seq(args).map(<[Id]>::to_vec).unwrap_or_default();
            let builtins = matches!(module, "builtins" | "__builtin__");
            match (module, name) {
                ("collections", "OrderedDict") | ("collections", "defaultdict") | (_, "dict") if builtins || module == "collections" => {
                    // OrderedDict(), OrderedDict([(k, v), ...]); defaultdict(factory)
                    let mut items = Vec::new();
                    if name != "defaultdict" {
                        if let Some(&a) = argv.first() {
                            match &self.nodes[a] {
                                Node::Dict(d) => items = d.clone(),
                                Node::List(l) | Node::Tuple(l) => {
                                    for &p in l {
                                        if let Some([k, v]) = self.seq(p).map(<[Id]>::to_vec).as_deref() {
                                            items.push((*k, *v));
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Ok(Node::Dict(items))
                }
                (_, "list" | "tuple" | "set" | "frozenset") if builtins => {
                    let v = argv.first().and_then(|&a| self.seq(a)).map(<[Id]>::to_vec).unwrap_or_default();
                    Ok(match name {
                        "list" => Node::List(v),
                        "tuple" => Node::Tuple(v),
                        _ => Node::Set(v),
                    })
                }
                ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
                    if argv.len() < 4 {
                        return self.err(format!("{module}.{name} with {} arguments", argv.len()));
                    }
                    let mut storage = match &self.nodes[argv[0]] {
                        Node::Storage(s) => s.clone(),
                        _ => return self.err(format!("{name}: first argument is not a storage persistent id")),
                    };
                    let offset = self.usize_of(argv[1], "storage offset")?;
                    let size = self.usizes_of(argv[2], "size")?;
                    let stride = self.usizes_of(argv[3], "stride")?;
                    if name == "_rebuild_tensor_v3" {
                        // (..., requires_grad, hooks, dtype, metadata) over an untyped storage
                        if let Some(Node::Global { name: dt, .. }) = argv.get(6).map(|&d| &self.nodes[d]) {
                            storage.dtype = StorageDType::from_class(dt);
                            if let Some(w) = storage.dtype.size() {
                                storage.numel /= w;
                            }
                        }
                    }
                    if size.len() != stride.len() {
                        return self.err(format!("tensor size {size:?} and stride {stride:?} differ in rank"));
                    }
                    Ok(Node::Tensor(TensorRef { storage, offset, size, stride }))
                }
                ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state" | "_rebuild_parameter_v2") => {
                    match argv.first() {
                        Some(&t) => Ok(self.nodes[t].clone()),
                        None => self.err(format!("{name} without arguments")),
                    }
                }
                ("torch._tensor", "_rebuild_from_type" | "_rebuild_from_type_v2") if argv.len() >= 3 => {
                    // (func, new_type, args, state): a tensor subclass; rebuild the tensor.
                    if self.call_depth > 8 {
                        return self.err(format!("{name} nested too deeply"));
                    }
                    self.call_depth += 1;
                    let r = self.call(argv[0], argv[2]);
                    self.call_depth -= 1;
                    r
                }
                ("copyreg", "_reconstructor") if !argv.is_empty() => {
                    Ok(Node::Object { class: argv[0], args, state: None, items: Vec::new(), elems: Vec::new() })
                }
                ("torch", "Size") => {
                    let v = argv.first().and_then(|&a| self.seq(a)).map(<[Id]>::to_vec).unwrap_or_default();
                    Ok(Node::Tuple(v))
                }
                _ => Ok(Node::Object { class: func, args, state: None, items: Vec::new(), elems: Vec::new() }),
            }
        }
    }

    fn pairs(v: &[Id]) -> Option<Vec<(Id, Id)>> {
        v.len().is_multiple_of(2).then(|| v.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    /// LONG1 / LONG4: little-endian two's complement.
    fn long_le(b: &[u8]) -> Node {
        if b.is_empty() {
            return Node::Int(0);
        }
        if b.len() > 8 {
            let ext = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
            if b[8..].iter().any(|&x| x != ext) {
                return Node::BigInt(b.len());
            }
        }
        let n = b.len().min(8);
        let fill = if b[n - 1] & 0x80 != 0 { 0xff } else { 0 };
        let mut buf = [fill; 8];
        buf[..n].copy_from_slice(&b[..n]);
        Node::Int(i64::from_le_bytes(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::pickle::{parse, Node};
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8400), -(2f32.powi(-14)));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc040), -3.0);
    }

    #[test]
    fn strided_index_walks_row_major() {
        // A transposed 2x3 view of a 3x2 storage, at offset 1.
        let idx: Vec<usize> = StridedIndex::new(1, &[2, 3], &[1, 2]).collect();
        assert_eq!(idx, vec![1, 3, 5, 2, 4, 6]);
        assert_eq!(StridedIndex::new(0, &[], &[]).collect::<Vec<_>>(), vec![0]);
        assert!(StridedIndex::new(0, &[2, 0], &[1, 1]).next().is_none());
        assert_eq!(StridedIndex::new(4, &[3], &[0]).collect::<Vec<_>>(), vec![4, 4, 4]);
    }

    #[test]
    fn long_and_memo_sharing() {
        // PROTO 2, EMPTY_DICT, BINPUT 0, BINGET 0 (same dict), MARK, 'a', LONG1 -2, SETITEMS,
        // TUPLE2, STOP: both tuple elements are the one filled dict.
        let mut b = vec![0x80, 2, b'}', b'q', 0, b'h', 0, b'('];
        b.extend([0x8c, 1, b'a', 0x8a, 1, 0xfe, b'u', 0x86, b'.']);
        let p = parse(&b).unwrap();
        let Node::Tuple(t) = p.node(p.root()) else { panic!() };
        assert_eq!(t[0], t[1]);
        let d = p.as_dict(t[0]).unwrap();
        assert_eq!(p.as_i64(d[0].1), Some(-2));
    }

    #[test]
    fn nested_rebuild_from_type_is_bounded() {
        // f = torch._tensor._rebuild_from_type_v2; args = (f, None, args, None) nested 50 deep.
        let mut b = vec![0x80, 2, b'c'];
        b.extend(b"torch._tensor\n_rebuild_from_type_v2\n");
        b.extend([b'q', 0, b')']);
        for _ in 0..50 {
            // stack: ..., inner_args  ->  (f, None, inner_args, None)
            b.extend([b'q', 1, b'0', b'(', b'h', 0, b'N', b'h', 1, b'N', b't']);
        }
        b.extend([b'q', 1, b'0', b'h', 0, b'h', 1, b'R', b'.']);
        let e = parse(&b).err().expect("must fail");
        assert!(e.to_string().contains("nested too deeply"), "{e}");
    }

    #[test]
    fn malformed_pickles_are_errors() {
        for bad in [&b""[..], b"\x80\x02}", b"\x80\x02u.", b"\x80\x02\xff.", b"\x80\x02X\xff\xff\xff\x7fab", b"\x80\x02h\x05."] {
            let e = parse(bad).err().expect("malformed pickle must fail");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn yaml_block_and_flow_styles() {
        let block = "image_size: !!python/tuple\n- 3\n- 64\n- 64\nnum_steps: 1000\nch: 64\nch_mult:\n- 1\n- 2\n- 4\n- 4\nattn:\n  - 2\nnum_res_blocks: 2\ndropout: 0.1 # comment\nlr: 0.0002\n";
        let flow = "# hparams\nimage_size: !!python/tuple [3, 64, 64]\nnum_steps: 1000\nch: 64\nch_mult: [1, 2, 4, 4]\nattn: [2]\nnum_res_blocks: 2\ndropout: 0.1\nlr: 2.0e-4\n";
        for text in [block, flow] {
            let (cfg, defaulted) = PartialConfig::from_yaml(text).unwrap().resolve();
            assert_eq!(cfg, UNetConfig::reference());
            assert!(defaulted.is_empty(), "{defaulted:?}");
        }
        assert!(PartialConfig::from_yaml("ch: sixty-four\n").unwrap_err().contains("'ch'"));
    }
}
