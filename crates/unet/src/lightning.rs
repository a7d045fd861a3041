//! Import of the reference's PyTorch Lightning checkpoint (`last.ckpt`).
//!
//! TEMPORARY implementation on candle's pickle reader; a robust reader replaces it.

use std::path::Path;

use candle_core::pickle::{Object, Stack};

use crate::{ModelWeights, UNetConfig, UNetError};

pub fn import(path: &Path) -> Result<ModelWeights, UNetError> {
    let fmt = |reason: String| UNetError::Format { path: path.display().to_string(), reason };
    let tensors = candle_core::pickle::read_all_with_key(path, Some("state_dict")).map_err(|e| fmt(e.to_string()))?;
    let tensors = tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("unet.").map(|k| (k.to_string(), v)))
        .collect();
    // hyper_parameters
    let f = std::fs::File::open(path).map_err(|e| fmt(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| fmt(e.to_string()))?;
    let name = zip.file_names().find(|n| n.ends_with("data.pkl")).ok_or_else(|| fmt("no data.pkl".into()))?.to_string();
    let mut r = std::io::BufReader::new(zip.by_name(&name).map_err(|e| fmt(e.to_string()))?);
    let mut stack = Stack::empty();
    stack.read_loop(&mut r).map_err(|e| fmt(e.to_string()))?;
    let obj = stack.finalize().map_err(|e| fmt(e.to_string()))?;
    let Object::Dict(kv) = obj else { return Err(fmt("not a dict".into())) };
    let hp = kv.into_iter().find(|(k, _)| *k == Object::Unicode("hyper_parameters".into())).map(|(_, v)| v).ok_or_else(|| fmt("no hyper_parameters".into()))?;
    let Object::Dict(hp) = hp else { return Err(fmt("hyper_parameters not a dict".into())) };
    let get = |key: &str| hp.iter().find(|(k, _)| *k == Object::Unicode(key.into())).map(|(_, v)| v.clone());
    let int = |o: Object| -> usize { match o { Object::Int(i) => i as usize, Object::Long(i) => i as usize, _ => 0 } };
    let list = |o: Object| -> Vec<usize> { match o { Object::List(v) | Object::Tuple(v) => v.into_iter().map(int).collect(), _ => vec![] } };
    let size = get("image_size").map(list).unwrap_or(vec![3, 64, 64]);
    let config = UNetConfig {
        image_size: size[2],
        image_channels: size[0],
        num_steps: get("num_steps").map(int).unwrap_or(1000),
        ch: get("ch").map(int).unwrap_or(64),
        ch_mult: get("ch_mult").map(list).unwrap_or(vec![1, 2, 4, 4]),
        attn: get("attn").map(list).unwrap_or(vec![2]),
        num_res_blocks: get("num_res_blocks").map(int).unwrap_or(2),
        dropout: match get("dropout") { Some(Object::Float(f)) => f as f32, _ => 0.1 },
    };
    let w = ModelWeights { config, tensors, metadata: Default::default() };
    w.check()?;
    Ok(w)
}
