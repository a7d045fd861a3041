//! `import-checkpoint`: the reference's Lightning `last.ckpt` -> our model file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use unet::lightning::{self, Imported};
use unet::UNetError;
use crate::common::out;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The PyTorch Lightning checkpoint (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
    pub ckpt: PathBuf,
    /// Where to write the model file [default: checkpoints/<ckpt file stem>.safetensors].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `checkpoints/<stem>.safetensors`.
pub fn default_out(ckpt: &Path) -> PathBuf {
    let stem = ckpt.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "imported".into());
    PathBuf::from("checkpoints").join(format!("{stem}.safetensors"))
}

pub fn run(a: ImportArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.ckpt));
    if out.is_dir() {
        bail!("--out {} is a folder: give the file to write, e.g. {}", out.display(), out.join(default_out(&a.ckpt).file_name().unwrap_or_default()).display());
    }
    if out.exists() {
        if !a.force {
            bail!("{} already exists (pass --force to overwrite it)", out.display());
        }
        if same_file(&out, &a.ckpt) {
            bail!("--out {} is the checkpoint itself", out.display());
        }
    }
    let imported = lightning::import_report(&a.ckpt).map_err(|e| match e {
        // These name the file themselves.
        UNetError::Format { .. } | UNetError::Io { .. } => anyhow::Error::new(e),
        other => anyhow::Error::new(other).context(a.ckpt.display().to_string()),
    })?;
    for key in &imported.ignored {
        tracing::debug!("ignored state_dict entry '{key}' (not a unet.* tensor)");
    }
    imported.weights.save(&out).map_err(|e| anyhow!("cannot write the model file: {e}"))?;
    print_summary(&a.ckpt, &out, &imported)?;
    // A diverged run's weights import fine and sample black: say so now.
    let mut broken: Vec<&String> = Vec::new();
    for (name, t) in &imported.weights.tensors {
        if t.flatten_all()?.to_vec1::<f32>()?.iter().any(|v| !v.is_finite()) {
            broken.push(name);
        }
    }
    if !broken.is_empty() {
        broken.sort();
        tracing::warn!(
            "{} of the tensors hold NaN or infinite values (e.g. {}): the checkpoint is of a diverged run, and its samples will be blank",
            broken.len(),
            broken[0]
        );
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn print_summary(ckpt: &Path, out: &Path, r: &Imported) -> Result<()> {
    let c = &r.weights.config;
    let (total, trainable) = unet::parameter_counts(c)?;
    let mut origin = Vec::new();
    if let Some(v) = &r.lightning_version {
        origin.push(format!("Lightning {v}"));
    }
    if let Some(e) = r.epoch {
        origin.push(format!("epoch {e}"));
    }
    if let Some(s) = r.global_step {
        origin.push(format!("step {s}"));
    }
    let origin = if origin.is_empty() { String::new() } else { format!(" ({})", origin.join(", ")) };
    out!("imported {}{origin}", ckpt.display());
    out!(
        "  config (from {}): image {}x{}x{}, num_steps {}, ch {}, ch_mult {:?}, attn {:?}, num_res_blocks {}, dropout {}",
        r.config_source, c.image_channels, c.image_size, c.image_size, c.num_steps, c.ch, c.ch_mult, c.attn, c.num_res_blocks, c.dropout
    );
    if !r.defaulted.is_empty() {
        out!("  not in the checkpoint, reference default used: {}", r.defaulted.join(", "));
    }
    let dtypes: Vec<String> = r.source_dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
    out!(
        "  parameters: {} ({} trainable), {} tensors (stored as {}), {} other state_dict entries ignored",
        thousands(total),
        thousands(trainable),
        r.weights.tensors.len(),
        dtypes.join(", "),
        r.ignored.len()
    );
    out!("  wrote {}", out.display());
    out!("  sample from it: {} sample --checkpoint {}", crate::common::ALIAS, out.display());
    Ok(())
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
