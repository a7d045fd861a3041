//! Import of Lightning checkpoints: the fixtures, Lightning-shaped checkpoints written here (no
//! PyTorch needed: a small pickle writer plus the zip crate), hparams.yaml, and bad inputs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::View;
use unet::lightning::{self, ConfigSource};
use unet::{ModelWeights, UNetConfig, UNetError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fresh, empty temporary folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unet-import-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sorted(w: &ModelWeights) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = w.tensors.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

// ------------------------------------------------------------------------------------------
// A small pickle writer: the opcodes torch.save (protocol 2) and newer pickles (4) use.
// ------------------------------------------------------------------------------------------

struct Pk {
    b: Vec<u8>,
    proto: u8,
    memo: u32,
    globals: HashMap<String, u32>,
}

impl Pk {
    fn new(proto: u8) -> Self {
        Self { b: vec![0x80, proto], proto, memo: 0, globals: HashMap::new() }
    }
    fn op(&mut self, o: u8) -> &mut Self {
        self.b.push(o);
        self
    }
    fn memoize(&mut self) -> u32 {
        let k = self.memo;
        if self.proto >= 4 {
            self.b.push(0x94);
        } else if k < 256 {
            self.b.extend([b'q', k as u8]);
        } else {
            self.b.push(b'r');
            self.b.extend(k.to_le_bytes());
        }
        self.memo += 1;
        k
    }
    fn get(&mut self, k: u32) {
        if k < 256 {
            self.b.extend([b'h', k as u8]);
        } else {
            self.b.push(b'j');
            self.b.extend(k.to_le_bytes());
        }
    }
    fn s(&mut self, s: &str) -> &mut Self {
        if self.proto >= 4 && s.len() < 256 {
            self.b.extend([0x8c, s.len() as u8]);
        } else {
            self.b.push(b'X');
            self.b.extend((s.len() as u32).to_le_bytes());
        }
        self.b.extend(s.as_bytes());
        self.memoize();
        self
    }
    fn int(&mut self, i: i64) -> &mut Self {
        match i {
            0..=255 => self.b.extend([b'K', i as u8]),
            256..=65535 => {
                self.b.push(b'M');
                self.b.extend((i as u16).to_le_bytes())
            }
            _ if i32::try_from(i).is_ok() => {
                self.b.push(b'J');
                self.b.extend((i as i32).to_le_bytes())
            }
            _ => {
                self.b.extend([0x8a, 8]);
                self.b.extend(i.to_le_bytes())
            }
        }
        self
    }
    fn float(&mut self, f: f64) -> &mut Self {
        self.b.push(b'G');
        self.b.extend(f.to_be_bytes());
        self
    }
    /// A class or function reference, memoised and fetched with BINGET when repeated.
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        let full = format!("{module}.{name}");
        if let Some(&k) = self.globals.get(&full) {
            self.get(k);
            return self;
        }
        if self.proto >= 4 {
            self.s(module).s(name).op(0x93);
        } else {
            self.b.push(b'c');
            self.b.extend(format!("{module}\n{name}\n").as_bytes());
        }
        let k = self.memoize();
        self.globals.insert(full, k);
        self
    }
    fn mark(&mut self) -> &mut Self {
        self.op(b'(')
    }
    fn ints(&mut self, v: &[usize]) -> &mut Self {
        match v.len() {
            0 => return self.op(b')'),
            1..=3 => {
                for &x in v {
                    self.int(x as i64);
                }
                self.op(0x84 + v.len() as u8);
            }
            _ => {
                self.mark();
                for &x in v {
                    self.int(x as i64);
                }
                self.op(b't');
            }
        }
        self.memoize();
        self
    }
    /// `collections.OrderedDict()` (no items yet).
    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b')').op(b'R');
        self.memoize();
        self
    }
    fn empty_dict(&mut self) -> &mut Self {
        self.op(b'}');
        self.memoize();
        self
    }
    /// `_rebuild_tensor_v2(('storage', torch.<cls>, key, location, numel), offset, size,
    /// stride, False, OrderedDict())`, optionally wrapped in `_rebuild_parameter(..., True,
    /// OrderedDict())` as Lightning writes nn.Parameters.
    #[allow(clippy::too_many_arguments)]
    fn tensor(&mut self, cls: &str, key: &str, loc: &str, numel: usize, offset: usize, size: &[usize], stride: &[usize], param: bool) {
        if param {
            self.global("torch._utils", "_rebuild_parameter");
        }
        self.global("torch._utils", "_rebuild_tensor_v2").mark();
        self.mark().s("storage").global("torch", cls).s(key).s(loc).int(numel as i64).op(b't');
        self.memoize();
        self.op(b'Q');
        self.memoize();
        self.int(offset as i64).ints(size).ints(stride).op(0x89).ordered_dict().op(b't');
        self.memoize();
        self.op(b'R');
        self.memoize();
        if param {
            self.op(0x88).ordered_dict().op(0x87).op(b'R');
            self.memoize();
        }
    }
    fn finish(mut self) -> Vec<u8> {
        self.b.push(b'.');
        if self.proto >= 4 {
            // One frame after PROTO, as Python writes it.
            let body = self.b.split_off(2);
            self.b.push(0x95);
            self.b.extend((body.len() as u64).to_le_bytes());
            self.b.extend(body);
        }
        self.b
    }
}

// ------------------------------------------------------------------------------------------
// Checkpoint writer
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Style {
    /// Like the fixtures: protocol 2, f32, cpu, plain dict hyper_parameters, empty loops.
    Plain,
    /// Like a GPU Lightning 2.x run: protocol 4 opcodes, cuda:0, f16/bf16/f64 and strided
    /// tensors, parameters, AttributeDict hyper_parameters, populated loops, optimizer states,
    /// callbacks, unknown classes, a state_dict with `_metadata`, non-unet entries.
    Lightning { big_endian: bool },
}

struct Spec<'a> {
    tensors: &'a [(String, Tensor)],
    hp: Option<&'a UNetConfig>,
    style: Style,
    with_state_dict: bool,
}

/// Storage bytes of `values` as `dt`, in the requested byte order.
fn storage_bytes(values: &Tensor, dt: DType, big_endian: bool) -> Vec<u8> {
    let t = values.flatten_all().unwrap().to_dtype(dt).unwrap();
    let mut b = t.data().into_owned();
    if big_endian {
        for c in b.chunks_mut(dt.size_in_bytes()) {
            c.reverse();
        }
    }
    b
}

fn storage_class(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        _ => unreachable!(),
    }
}

fn write_hp(p: &mut Pk, cfg: &UNetConfig, attribute_dict: bool) {
    if attribute_dict {
        p.global("lightning_fabric.utilities.data", "AttributeDict").op(b')').op(0x81);
        p.memoize();
    } else {
        p.empty_dict();
    }
    p.mark();
    p.s("image_size").ints(&[cfg.image_channels, cfg.image_size, cfg.image_size]);
    p.s("num_steps").int(cfg.num_steps as i64);
    p.s("ch").int(cfg.ch as i64);
    p.s("ch_mult").op(b']');
    p.memoize();
    p.mark();
    for &m in &cfg.ch_mult {
        p.int(m as i64);
    }
    p.op(b'e');
    p.s("attn").ints(&cfg.attn);
    p.s("num_res_blocks").int(cfg.num_res_blocks as i64);
    p.s("dropout").float(cfg.dropout as f64);
    p.s("lr").float(2e-4);
    if attribute_dict {
        // Extra objects Lightning users keep in hparams: a class reference, an object built by
        // copyreg._reconstructor with a __dict__.
        p.s("model_cls").global("ddpm.model", "DiffusionModel");
        p.s("sched").global("copyreg", "_reconstructor").global("my.sched", "Sched").global("builtins", "object").op(b'N').op(0x87).op(b'R');
        p.memoize();
        p.empty_dict().s("gamma").float(0.5).op(b's').op(b'b');
    }
    p.op(b'u');
    if attribute_dict {
        p.empty_dict().op(b'b'); // BUILD with an empty __dict__
    }
}

/// Zip entries: (name, bytes).
type Entries = Vec<(String, Vec<u8>)>;

/// Writes the checkpoint's entries; returns them with the tensors the import must produce.
fn build(spec: &Spec) -> (Entries, HashMap<String, Vec<f32>>) {
    let (proto, big_endian, rich) = match spec.style {
        Style::Plain => (2, false, false),
        Style::Lightning { big_endian } => (4, big_endian, true),
    };
    let loc = if rich { "cuda:0" } else { "cpu" };
    let prefix = if rich { "last/" } else { "ckpt/" };
    let mut storages: Vec<(String, Vec<u8>)> = Vec::new();
    let mut expected = HashMap::new();
    let mut p = Pk::new(proto);
    p.empty_dict().mark();
    p.s("epoch").int(41).s("global_step").int(123_456).s("pytorch-lightning_version").s(if rich { "2.1.3" } else { "1.9.5" });
    if spec.with_state_dict {
        p.s("state_dict").ordered_dict().mark();
        for (i, (name, t)) in spec.tensors.iter().enumerate() {
            let key = storages.len().to_string();
            p.s(&format!("unet.{name}"));
            let dims = t.dims().to_vec();
            let n = t.elem_count();
            let kind = if rich { i % 5 } else { 4 };
            match kind {
                0..=2 => {
                    let dt = [DType::F16, DType::BF16, DType::F64][kind];
                    let row_major: Vec<usize> = (0..dims.len()).map(|d| dims[d + 1..].iter().product()).collect();
                    p.tensor(storage_class(dt), &key, loc, n, 0, &dims, &row_major, kind == 1);
                    storages.push((key, storage_bytes(t, dt, big_endian)));
                    expected.insert(name.clone(), values(&t.to_dtype(dt).unwrap()));
                }
                3 => {
                    // Not contiguous: 1-D every other element after an offset; N-D transposed
                    // ([d0, rest] stored as [rest, d0]) after an offset.
                    let v = values(t);
                    let (storage, offset, stride): (Vec<f32>, usize, Vec<usize>) = if dims.len() <= 1 {
                        let mut s = vec![-7.0f32; 3];
                        for x in &v {
                            s.extend([*x, 99.0]);
                        }
                        (s, 3, vec![2; dims.len()])
                    } else {
                        let rest: usize = dims[1..].iter().product();
                        let tr = t.reshape((dims[0], rest)).unwrap().t().unwrap().contiguous().unwrap();
                        let mut s = vec![-7.0f32; 5];
                        s.extend(values(&tr));
                        let mut stride = vec![1usize];
                        stride.extend((1..dims.len()).map(|d| dims[d + 1..].iter().product::<usize>() * dims[0]));
                        (s, 5, stride)
                    };
                    p.tensor("FloatStorage", &key, loc, storage.len(), offset, &dims, &stride, false);
                    let len = storage.len();
                    let st = Tensor::from_vec(storage, len, &Device::Cpu).unwrap();
                    storages.push((key, storage_bytes(&st, DType::F32, big_endian)));
                    expected.insert(name.clone(), v);
                }
                _ => {
                    let row_major: Vec<usize> = (0..dims.len()).map(|d| dims[d + 1..].iter().product()).collect();
                    p.tensor("FloatStorage", &key, loc, n, 0, &dims, &row_major, rich);
                    storages.push((key, storage_bytes(t, DType::F32, big_endian)));
                    expected.insert(name.clone(), values(t));
                }
            }
        }
        if rich {
            // Entries that are not the UNet's: an EMA copy from another fork, a non-tensor.
            let key = storages.len().to_string();
            p.s("model_ema.head.weight");
            let t = &spec.tensors[0].1;
            p.tensor("FloatStorage", &key, loc, t.elem_count(), 0, &[t.elem_count()], &[1], false);
            storages.push((key, storage_bytes(t, DType::F32, big_endian)));
            p.s("unet.not_a_tensor").int(5);
        }
        p.op(b'u');
        if rich {
            // state_dict._metadata, set by BUILD on the OrderedDict.
            p.empty_dict().s("_metadata").ordered_dict().mark();
            p.s("").empty_dict().s("version").int(1).op(b's');
            p.s("unet").empty_dict().s("version").int(1).op(b's');
            p.op(b'u').op(b's').op(b'b');
        }
    }
    if rich {
        // loops: nested dicts, an enum-like object (REDUCE of an unknown class).
        p.s("loops").empty_dict().mark();
        p.s("fit_loop").empty_dict().mark();
        p.s("state_dict").empty_dict();
        p.s("epoch_progress").empty_dict().s("total").empty_dict().mark().s("ready").int(42).s("completed").int(41).op(b'u').op(b's');
        p.s("epoch_loop.state_dict").empty_dict().s("_batches_that_stepped").int(123_456).op(b's');
        p.s("stage").global("pytorch_lightning.trainer.states", "RunningStage").s("train").op(0x85).op(b'R');
        p.memoize();
        p.op(b'u').op(b'u');
        // callbacks: an unknown object with a tensor inside.
        p.s("callbacks").empty_dict().s("ModelCheckpoint{'monitor': None}").empty_dict().mark();
        p.s("best_model_path").s("/runs/last.ckpt").s("best_model_score").op(b'N');
        let key = storages.len().to_string();
        p.s("kth_value");
        p.tensor("FloatStorage", &key, loc, 1, 0, &[], &[], false);
        storages.push((key, storage_bytes(&Tensor::new(&[1.5f32], &Device::Cpu).unwrap(), DType::F32, big_endian)));
        p.s("dirpath").global("pathlib", "PosixPath").s("runs").op(0x85).op(b'R');
        p.memoize();
        p.op(b'u').op(b's');
        // optimizer_states: Adam state tensors, param_groups with tuples, None, bools.
        p.s("optimizer_states").op(b']');
        p.memoize();
        p.empty_dict().mark();
        p.s("state").empty_dict().int(0).empty_dict().mark();
        for what in ["step", "exp_avg", "exp_avg_sq"] {
            let key = storages.len().to_string();
            p.s(what);
            p.tensor("FloatStorage", &key, loc, 4, 0, &[2, 2], &[2, 1], false);
            storages.push((key, storage_bytes(&Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap(), DType::F32, big_endian)));
        }
        p.op(b'u').op(b's');
        p.s("param_groups").op(b']');
        p.memoize();
        p.empty_dict().mark();
        p.s("lr").float(2e-4).s("betas").float(0.9).float(0.999).op(0x86);
        p.memoize();
        p.s("eps").float(1e-8).s("amsgrad").op(0x89).s("foreach").op(b'N').s("params").ints(&[0, 1, 2, 3]);
        p.op(b'u').op(b'a');
        p.op(b'u').op(b'a');
        p.s("lr_schedulers").op(b']');
        p.memoize();
        p.s("hparams_name").s("kwargs");
    } else {
        p.s("loops").empty_dict().s("hparams_name").s("kwargs");
    }
    if let Some(cfg) = spec.hp {
        p.s("hyper_parameters");
        write_hp(&mut p, cfg, rich);
    }
    p.op(b'u');
    let pkl = p.finish();
    let mut entries = vec![(format!("{prefix}data.pkl"), pkl), (format!("{prefix}byteorder"), if big_endian { b"big".to_vec() } else { b"little".to_vec() })];
    entries.extend(storages.into_iter().map(|(k, b)| (format!("{prefix}data/{k}"), b)));
    entries.push((format!("{prefix}version"), b"3\n".to_vec()));
    (entries, expected)
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    for (name, data) in entries {
        // torch stores entries uncompressed; deflate data.pkl to exercise that path too.
        let method = if name.ends_with("data.pkl") { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
        z.start_file(name.as_str(), zip::write::SimpleFileOptions::default().compression_method(method)).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

fn write_ckpt(path: &Path, spec: &Spec) -> HashMap<String, Vec<f32>> {
    let (entries, expected) = build(spec);
    write_zip(path, &entries);
    expected
}

/// The error of a failed import, checked to be one line.
fn import_err(path: &Path) -> UNetError {
    let e = lightning::import(path).err().unwrap_or_else(|| panic!("{} imported but should not", path.display()));
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    e
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[test]
fn fixtures_import_with_config_and_metadata() {
    for (name, cfg) in [("seed_micro", UNetConfig::micro()), ("seed_tiny", UNetConfig::tiny())] {
        let path = fixture(&format!("{name}.ckpt"));
        let r = lightning::import_report(&path).unwrap();
        assert_eq!(r.weights.config, cfg);
        assert_eq!(r.config_source, ConfigSource::HyperParameters);
        assert!(r.defaulted.is_empty(), "{:?}", r.defaulted);
        assert!(r.ignored.is_empty(), "{:?}", r.ignored);
        let n = unet::expected_shapes(&cfg).unwrap().len();
        assert_eq!(r.weights.tensors.len(), n);
        assert_eq!(r.source_dtypes.get("f32"), Some(&n));
        assert_eq!(r.lightning_version.as_deref(), Some("1.9.5"));
        assert_eq!((r.epoch, r.global_step), (Some(0), Some(0)));
        let m = &r.weights.metadata;
        assert_eq!(m[lightning::IMPORTED_FROM_KEY], "lightning");
        assert_eq!(m[lightning::SOURCE_KEY], path.display().to_string());
        let d: serde_json::Value = serde_json::from_str(&m[lightning::DIFFUSION_CONFIG_KEY]).unwrap();
        assert_eq!(d, serde_json::json!({"num_steps": 1000, "beta": {"kind": "linear", "start": 0.0001, "end": 0.02}}));
        assert!(r.weights.tensors.values().all(|t| t.dtype() == DType::F32));
    }
}

#[test]
fn model_file_round_trip_keeps_metadata() {
    let dir = temp_dir("roundtrip");
    let w = lightning::import(&fixture("seed_micro.ckpt")).unwrap();
    let out = dir.join("m.safetensors");
    w.save(&out).unwrap();
    let back = ModelWeights::load(&out).unwrap();
    assert_eq!(back.config, w.config);
    assert_eq!(back.metadata, w.metadata);
    for (k, t) in &w.tensors {
        assert_eq!(values(t), values(&back.tensors[k]), "{k}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lightning_gpu_checkpoint_with_attribute_dict_and_half_tensors_imports() {
    let tiny = lightning::import(&fixture("seed_tiny.ckpt")).unwrap();
    let tensors = sorted(&tiny);
    let dir = temp_dir("lightning");
    for big_endian in [false, true] {
        let path = dir.join(format!("last-{big_endian}.ckpt"));
        let spec = Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Lightning { big_endian }, with_state_dict: true };
        let expected = write_ckpt(&path, &spec);
        let r = lightning::import_report(&path).unwrap();
        assert_eq!(r.weights.config, UNetConfig::tiny());
        assert_eq!(r.config_source, ConfigSource::HyperParameters);
        assert_eq!(r.lightning_version.as_deref(), Some("2.1.3"));
        assert_eq!((r.epoch, r.global_step), (Some(41), Some(123_456)));
        let mut ignored = r.ignored.clone();
        ignored.sort();
        assert_eq!(ignored, vec!["model_ema.head.weight".to_string(), "unet.not_a_tensor".to_string()]);
        for dt in ["f16", "bf16", "f64", "f32"] {
            assert!(r.source_dtypes.get(dt).copied().unwrap_or(0) > 0, "no {dt} tensor in {:?}", r.source_dtypes);
        }
        assert_eq!(r.weights.tensors.len(), tensors.len());
        for (name, want) in &expected {
            let got = &r.weights.tensors[name];
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.dims(), tiny.tensors[name].dims(), "{name}");
            assert_eq!(&values(got), want, "{name} (big endian: {big_endian})");
        }
        // Full-precision tensors are bit-identical to the fixture's.
        let f32_exact = expected.keys().filter(|k| values(&tiny.tensors[*k]) == expected[*k]).count();
        assert!(f32_exact >= tensors.len() * 2 / 5, "{f32_exact}");
        // And the imported model runs.
        let model = r.weights.build(&Device::Cpu, false).unwrap();
        let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[3u32], &Device::Cpu).unwrap();
        let eps = model.forward_t(&x, &t, unet::Mode::Eval).unwrap();
        assert!(values(&eps).iter().all(|v| v.is_finite()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hparams_yaml_beside_the_checkpoint_gives_the_config() {
    let micro = lightning::import(&fixture("seed_micro.ckpt")).unwrap();
    let tensors = sorted(&micro);
    let dir = temp_dir("yaml");
    let spec = Spec { tensors: &tensors, hp: None, style: Style::Plain, with_state_dict: true };

    // Beside it, block style.
    let path = dir.join("last.ckpt");
    write_ckpt(&path, &spec);
    let yaml = "image_size: !!python/tuple\n- 3\n- 16\n- 16\nnum_steps: 1000\nch: 32\nch_mult:\n- 1\n- 1\nattn:\n- 1\nnum_res_blocks: 1\ndropout: 0.2\nlr: 0.0002\n";
    std::fs::write(dir.join("hparams.yaml"), yaml).unwrap();
    let r = lightning::import_report(&path).unwrap();
    assert_eq!(r.weights.config, UNetConfig { dropout: 0.2, ..UNetConfig::micro() });
    assert_eq!(r.config_source, ConfigSource::HparamsYaml(dir.join("hparams.yaml")));
    assert!(r.defaulted.is_empty());

    // Lightning's layout: version_0/hparams.yaml, version_0/checkpoints/last.ckpt; flow style.
    let ckdir = dir.join("version_0/checkpoints");
    std::fs::create_dir_all(&ckdir).unwrap();
    let path = ckdir.join("last.ckpt");
    write_ckpt(&path, &spec);
    let yaml = "image_size: !!python/tuple [3, 16, 16]\nnum_steps: 1000\nch: 32\nch_mult: [1, 1]\nattn: [1]\nnum_res_blocks: 1\ndropout: 0.1\n";
    std::fs::write(dir.join("version_0/hparams.yaml"), yaml).unwrap();
    let r = lightning::import_report(&path).unwrap();
    assert_eq!(r.weights.config, UNetConfig::micro());
    assert_eq!(r.config_source, ConfigSource::HparamsYaml(dir.join("version_0/hparams.yaml")));

    // A yaml that disagrees with the tensors: the error names the tensor.
    std::fs::write(dir.join("version_0/hparams.yaml"), yaml.replace("ch_mult: [1, 1]", "ch_mult: [1, 2]")).unwrap();
    let msg = import_err(&path).to_string();
    assert!(msg.contains("downblocks.2.") && msg.contains("expected"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_hparams_the_config_is_inferred_from_the_shapes() {
    let tiny = lightning::import(&fixture("seed_tiny.ckpt")).unwrap();
    let tensors = sorted(&tiny);
    let dir = temp_dir("infer");
    let path = dir.join("last.ckpt");
    write_ckpt(&path, &Spec { tensors: &tensors, hp: None, style: Style::Plain, with_state_dict: true });
    let r = lightning::import_report(&path).unwrap();
    assert_eq!(r.config_source, ConfigSource::TensorShapes);
    // image_size and dropout leave no trace in the weights: the reference's defaults.
    assert_eq!(r.weights.config, UNetConfig { image_size: 64, ..UNetConfig::tiny() });
    assert_eq!(r.defaulted, vec!["image_size", "dropout"]);
    // The reference's trained layout (2 res blocks per level, attention at level 2) too.
    let reference = UNetConfig { ch: 32, num_steps: 10, ..UNetConfig::reference() };
    let shapes = unet::expected_shapes(&reference).unwrap();
    let tensors: Vec<(String, Tensor)> =
        shapes.iter().map(|(n, s)| (n.clone(), Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).unwrap())).collect();
    write_ckpt(&path, &Spec { tensors: &tensors, hp: None, style: Style::Plain, with_state_dict: true });
    assert_eq!(lightning::import(&path).unwrap().config, reference);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_and_non_checkpoints_are_one_line_errors() {
    let dir = temp_dir("bad");
    let good = std::fs::read(fixture("seed_tiny.ckpt")).unwrap();
    for cut in [good.len() / 2, good.len() - 10, 100] {
        let p = dir.join(format!("cut{cut}.ckpt"));
        std::fs::write(&p, &good[..cut]).unwrap();
        let msg = import_err(&p).to_string();
        assert!(msg.contains("truncated") && msg.contains(&format!("cut{cut}.ckpt")), "{msg}");
    }

    let text = dir.join("notes.ckpt");
    std::fs::write(&text, "this is not a checkpoint\n").unwrap();
    let msg = import_err(&text).to_string();
    assert!(msg.contains("notes.ckpt") && msg.contains("not a PyTorch checkpoint"), "{msg}");

    let empty = dir.join("empty.ckpt");
    std::fs::write(&empty, "").unwrap();
    assert!(import_err(&empty).to_string().contains("empty"));

    let zip = dir.join("other.zip");
    write_zip(&zip, &[("a/readme.txt".into(), b"hello".to_vec())]);
    let msg = import_err(&zip).to_string();
    assert!(msg.ends_with("other.zip: not a PyTorch checkpoint (no data.pkl)"), "{msg}");

    let missing = dir.join("nope.ckpt");
    assert!(matches!(import_err(&missing), UNetError::Io { .. }));

    // A checkpoint whose data.pkl is cut short.
    let tiny = lightning::import(&fixture("seed_tiny.ckpt")).unwrap();
    let tensors = sorted(&tiny);
    let (mut entries, _) = build(&Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: true });
    let pkl = &mut entries[0].1;
    pkl.truncate(pkl.len() / 3);
    let p = dir.join("shortpkl.ckpt");
    write_zip(&p, &entries);
    let msg = import_err(&p).to_string();
    assert!(msg.contains("data.pkl") && msg.contains("truncated"), "{msg}");

    // A storage entry missing, then one too short.
    let (mut entries, _) = build(&Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: true });
    let gone = entries.iter().position(|(n, _)| n.ends_with("data/7")).unwrap();
    entries.remove(gone);
    write_zip(&p, &entries);
    let msg = import_err(&p).to_string();
    assert!(msg.contains("ckpt/data/7") && msg.contains("missing"), "{msg}");
    let (mut entries, _) = build(&Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: true });
    let short = entries.iter().position(|(n, _)| n.ends_with("data/7")).unwrap();
    entries[short].1.truncate(8);
    write_zip(&p, &entries);
    let msg = import_err(&p).to_string();
    assert!(msg.contains(&format!("unet.{}", tensors[7].0)) && msg.contains("truncated"), "{msg}");

    // No state_dict.
    let (entries, _) = build(&Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: false });
    write_zip(&p, &entries);
    let msg = import_err(&p).to_string();
    assert!(msg.contains("no 'state_dict'"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_of_another_architecture_name_the_tensor() {
    let dir = temp_dir("arch");
    let p = dir.join("x.ckpt");
    let micro = lightning::import(&fixture("seed_micro.ckpt")).unwrap();
    let tiny = lightning::import(&fixture("seed_tiny.ckpt")).unwrap();

    // micro's tensors with tiny's hyper_parameters.
    let tensors = sorted(&micro);
    write_ckpt(&p, &Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: true });
    match import_err(&p) {
        UNetError::ShapeMismatch { name, expected, .. } => {
            assert_eq!(name, "downblocks.2.temb_proj.1.weight");
            assert_eq!(expected, vec![64, 128]);
        }
        e => panic!("wrong error: {e}"),
    }
    let msg = import_err(&p).to_string();
    assert!(msg.contains("'downblocks.2.temb_proj.1.weight'") && msg.contains("expected [64, 128]"), "{msg}");

    // A tensor removed.
    let tensors: Vec<_> = sorted(&tiny).into_iter().filter(|(n, _)| n != "middle_blocks.0.attn.proj_k.bias").collect();
    write_ckpt(&p, &Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: true });
    let msg = import_err(&p).to_string();
    assert!(msg.contains("missing tensor 'middle_blocks.0.attn.proj_k.bias'") && msg.contains("[64]"), "{msg}");

    // A tensor this architecture does not have.
    let mut tensors = sorted(&tiny);
    tensors.push(("extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()));
    write_ckpt(&p, &Spec { tensors: &tensors, hp: Some(&tiny.config), style: Style::Plain, with_state_dict: true });
    let msg = import_err(&p).to_string();
    assert!(msg.contains("'unet.extra.weight'"), "{msg}");

    // No unet.* tensors at all (another model's checkpoint).
    let tensors: Vec<_> = sorted(&tiny).into_iter().take(3).collect();
    let (mut entries, _) = build(&Spec { tensors: &tensors, hp: None, style: Style::Plain, with_state_dict: true });
    // Rename the keys inside data.pkl: 'unet.' -> 'vae..' (same length, so the pickle stays valid).
    let pkl = &mut entries[0].1;
    for i in 0..pkl.len().saturating_sub(5) {
        if &pkl[i..i + 5] == b"unet." {
            pkl[i..i + 5].copy_from_slice(b"vae..");
        }
    }
    write_zip(&p, &entries);
    let msg = import_err(&p).to_string();
    assert!(msg.contains("no 'unet.*' tensors"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "writes and reads a ~100 MB checkpoint of the trained reference size: run by hand"]
fn reference_size_checkpoint_imports() {
    let cfg = UNetConfig::reference();
    let shapes = unet::expected_shapes(&cfg).unwrap();
    let tensors: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, s)| (n.clone(), Tensor::rand(-1f32, 1f32, s.as_slice(), &Device::Cpu).unwrap()))
        .collect();
    let dir = temp_dir("full");
    let path = dir.join("last.ckpt");
    let t0 = std::time::Instant::now();
    let expected = write_ckpt(&path, &Spec { tensors: &tensors, hp: Some(&cfg), style: Style::Lightning { big_endian: false }, with_state_dict: true });
    let written = t0.elapsed();
    let t0 = std::time::Instant::now();
    let w = lightning::import(&path).unwrap();
    eprintln!("wrote in {written:?}, imported in {:?}", t0.elapsed());
    assert_eq!(w.config, cfg);
    assert_eq!(unet::parameter_counts(&cfg).unwrap().0, 25_368_963);
    for (name, want) in &expected {
        assert_eq!(&values(&w.tensors[name]), want, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A plain `torch.save(module.state_dict())`: a top-level dict of tensors, no Lightning wrapper.
fn bare_state_dict(tensors: &[(String, Tensor)], key_prefix: &str) -> Entries {
    let mut p = Pk::new(2);
    let mut storages: Vec<(String, Vec<u8>)> = Vec::new();
    p.empty_dict().mark();
    for (name, t) in tensors {
        let key = storages.len().to_string();
        p.s(&format!("{key_prefix}{name}"));
        let dims = t.dims().to_vec();
        let row_major: Vec<usize> = (0..dims.len()).map(|d| dims[d + 1..].iter().product()).collect();
        p.tensor("FloatStorage", &key, "cpu", t.elem_count(), 0, &dims, &row_major, false);
        storages.push((key, storage_bytes(t, DType::F32, false)));
    }
    p.op(b'u');
    let mut entries = vec![("sd/data.pkl".to_string(), p.finish()), ("sd/byteorder".to_string(), b"little".to_vec())];
    entries.extend(storages.into_iter().map(|(k, b)| (format!("sd/data/{k}"), b)));
    entries
}

#[test]
fn a_plain_state_dict_imports_with_or_without_the_lightning_prefix() {
    let tiny = lightning::import(&fixture("seed_tiny.ckpt")).unwrap();
    let tensors = sorted(&tiny);
    let dir = temp_dir("bare");
    for key_prefix in ["unet.", ""] {
        let path = dir.join(format!("sd{}.pt", key_prefix.len()));
        write_zip(&path, &bare_state_dict(&tensors, key_prefix));
        let r = lightning::import_report(&path).unwrap_or_else(|e| panic!("prefix '{key_prefix}': {e}"));
        assert_eq!(r.config_source, ConfigSource::TensorShapes);
        // Everything but the image size (not in any shape) comes from the tensors.
        assert_eq!(r.weights.config, UNetConfig { image_size: r.weights.config.image_size, ..UNetConfig::tiny() });
        assert_eq!(r.weights.tensors.len(), tensors.len());
        for (k, t) in &tensors {
            assert_eq!(values(&r.weights.tensors[k]), values(t), "{k}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
