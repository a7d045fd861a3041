//! `prepare`: raw images -> `<out>/images/*` (size x size RGB) + `<out>/packed.safetensors`.
//!
//! * Inputs are the regular files of the raw folder, sorted by name. Files whose extension is
//!   not an image extension ([`IMAGE_EXTENSIONS`]) are skipped with a reason; `limit` takes the
//!   first N image files.
//! * Output names: `.jpg`/`.jpeg` inputs keep their name and are written as JPEG quality 100
//!   with 4:2:0 chroma subsampling, as the reference's Pillow `save(quality=100)` does; every
//!   other input (`.png`, `.webp`, `.bmp`, `.gif`, `.tif`) is written as lossless PNG named
//!   `<stem>.png`. When two inputs map to one output name, the one already named so wins and the
//!   other is skipped. The format of an input is sniffed from its content, not its name.
//! * Every output is written to a hidden temporary name in the same folder and renamed, so no
//!   reader ever sees a half-written file; stale temporaries of a killed run are removed.
//! * Re-running reuses an output that exists, is not older than its input and decodes to
//!   size x size (unless `force`, or the size/crop settings changed since the last run, which
//!   `<out>/prepare.json` records); the packed file is always rebuilt from all outputs.
//! * The packed pixels are the pixels of the output files as decoded (for JPEG outputs, the
//!   encoded bytes are decoded back in memory), so a fresh run and a re-run give the same file.
//! * Bad inputs never stop the run: each is skipped with a reason (also written to
//!   `<out>/skipped.txt`); a panic in a decoder is caught and becomes a skip reason. Only I/O
//!   errors on the output side stop the run.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::imaging::{decode_rgb, extension, process_bytes, Crop, OutputFormat, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS};
use crate::packed::{write_small_atomic, PackedDataset};
use crate::DataError;

/// File name of the packed dataset inside the output folder.
pub const PACKED_FILE: &str = "packed.safetensors";
/// File name of the list of skipped inputs inside the output folder.
pub const SKIPPED_FILE: &str = "skipped.txt";
/// File name of the settings stamp inside the output folder.
pub const SETTINGS_FILE: &str = "prepare.json";

/// What [`prepare`] does.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Folder with the raw images (not searched recursively).
    pub raw: PathBuf,
    /// Output folder: receives `images/`, `packed.safetensors`, `skipped.txt`, `prepare.json`.
    pub out: PathBuf,
    /// Side of the square outputs.
    pub size: u32,
    /// Redo every output even when a valid one exists.
    pub force: bool,
    /// How non-square inputs become square.
    pub crop: Crop,
    /// Only the first N image files (in sorted order).
    pub limit: Option<usize>,
    /// Inputs with more pixels than this are skipped without being decoded.
    pub max_pixels: u64,
}

impl PrepareOptions {
    /// Defaults: size 64, no crop, no force, no limit, 40 MP limit.
    pub fn new(raw: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        PrepareOptions {
            raw: raw.into(),
            out: out.into(),
            size: 64,
            force: false,
            crop: Crop::None,
            limit: None,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// One input that was not turned into an output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The input's name (file name, or parquet file and row).
    pub name: String,
    pub reason: String,
}

/// What [`prepare`] did.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    /// Input files looked at (image files and others).
    pub inputs: usize,
    /// Outputs written in this run.
    pub processed: usize,
    /// Valid outputs of an earlier run that were kept.
    pub reused: usize,
    /// Of the processed, how many were smaller than size x size (on either axis).
    pub upscaled: usize,
    /// Skipped inputs, with reasons, in name order.
    pub skipped: Vec<Skipped>,
    /// Images in the packed file.
    pub packed: usize,
    pub size: u32,
    pub out: PathBuf,
    pub packed_path: PathBuf,
    /// `<out>/skipped.txt` when anything was skipped.
    pub skipped_path: Option<PathBuf>,
    /// Wall time of the whole run (including writing the packed file).
    pub elapsed: Duration,
    /// Of which, writing the packed file.
    pub pack_time: Duration,
    /// Files in `<out>/images` that no input of this run made (left by an earlier run over
    /// other inputs, or a larger --limit): not in the packed file. Reported, never deleted.
    pub stale: usize,
}

impl PrepareReport {
    /// Inputs handled per second over the whole run.
    pub fn images_per_sec(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How many skipped files the summary names.
pub const SUMMARY_SKIPPED: usize = 20;

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = self.packed as f64 * f64::from(self.size * self.size * 3) / 1e6;
        writeln!(
            f,
            "prepared {} image{} of {s}x{s} in {} ({}: {})",
            self.packed,
            if self.packed == 1 { "" } else { "s" },
            self.out.join("images").display(),
            self.packed_path.display(),
            match mb {
                _ if mb < 1.0 => format!("{:.0} KB", mb * 1e3),
                _ if mb < 10.0 => format!("{mb:.1} MB"),
                _ => format!("{mb:.0} MB"),
            },
            s = self.size
        )?;
        write!(
            f,
            "  {} inputs: processed {} ({} upscaled), reused {}, skipped {}; {:.2} s, {:.0} images/s",
            self.inputs,
            self.processed,
            self.upscaled,
            self.reused,
            self.skipped.len(),
            self.elapsed.as_secs_f64(),
            self.images_per_sec()
        )?;
        if !self.skipped.is_empty() {
            let shown = self.skipped.len().min(SUMMARY_SKIPPED);
            write!(f, "\n  skipped")?;
            if shown < self.skipped.len() {
                write!(f, " (first {shown} of {})", self.skipped.len())?;
            }
            if let Some(p) = &self.skipped_path {
                write!(f, ", all listed in {}", p.display())?;
            }
            write!(f, ":")?;
            for s in &self.skipped[..shown] {
                write!(f, "\n    {}: {}", s.name, s.reason)?;
            }
        }
        if self.stale > 0 {
            write!(
                f,
                "\n  {} file(s) in {} come from no input of this run (an earlier run's?): not packed; delete them if unwanted",
                self.stale,
                self.out.join("images").display()
            )?;
        }
        Ok(())
    }
}

/// Where the bytes of one input come from.
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
pub(crate) enum SourceData {
    File { path: PathBuf },
    Bytes(Vec<u8>),
}

/// One input and the output it becomes.
pub(crate) struct Source {
    /// Name in messages (the input file name, or `file.parquet#row`).
    pub input: String,
    /// Output file name (inside `<out>/images`).
    pub output: String,
    pub data: SourceData,
}

enum Outcome {
    Processed { upscaled: bool },
    Reused,
    Skipped(String),
}

/// Output name for an input name: `.jpg`/`.jpeg` unchanged, everything else `<stem>.png`.
pub fn output_name(input: &str) -> String {
    match OutputFormat::for_name(input) {
        OutputFormat::Jpeg => input.to_string(),
        OutputFormat::Png => match input.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() && ext.eq_ignore_ascii_case("png") => input.to_string(),
            Some((stem, _)) if !stem.is_empty() => format!("{stem}.png"),
            _ => format!("{input}.png"),
        },
    }
}

/// Runs the preparation of a raw folder: see the module documentation. `progress` shows an
/// indicatif bar on stderr (drawn only when stderr is a terminal).
pub fn prepare(opts: &PrepareOptions, progress: bool) -> Result<PrepareReport, DataError> {
    let start = Instant::now();
    let (sources, mut pre_skipped, inputs) = list_raw(opts)?;
    refuse_to_overwrite_raw(opts)?;
    run(sources, &mut pre_skipped, inputs, opts, progress, start)
}

/// The resized images go to `out/images`: were that the raw folder itself (`--out` its parent,
/// as with the Kaggle layout `raw/images`), they would replace the originals.
fn refuse_to_overwrite_raw(opts: &PrepareOptions) -> Result<(), DataError> {
    let img_dir = opts.out.join("images");
    let (Ok(raw), Ok(dst)) = (opts.raw.canonicalize(), img_dir.canonicalize()) else { return Ok(()) };
    if raw == dst || same_folder(&raw, &dst) {
        return Err(DataError::Invalid(format!(
            "--out {} would write the resized images over the raw ones in {}: choose another --out",
            opts.out.display(),
            opts.raw.display()
        )));
    }
    Ok(())
}

/// The same folder under two paths that canonicalising does not unite (a bind mount, as with
/// Docker volumes `-v data/raw:/raw -v data:/out`).
#[cfg(unix)]
fn same_folder(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_folder(_: &Path, _: &Path) -> bool {
    false
}

/// Lists the raw folder: image files become sources, others are skipped with a reason.
fn list_raw(opts: &PrepareOptions) -> Result<(Vec<Source>, Vec<Skipped>, usize), DataError> {
    let raw = &opts.raw;
    let entries = match std::fs::read_dir(raw) {
        Ok(e) => e,
        Err(_) if raw.is_file() => {
            return Err(DataError::Invalid(format!("--raw {} is a file: give the folder that holds the raw images", raw.display())))
        }
        // NotADirectory: a parent in the path is a file, so the folder is not there either.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(DataError::RawMissing { path: raw.clone() })
        }
        Err(e) => return Err(DataError::io("cannot list", raw, e)),
    };
    // (display name, path): the path keeps the exact OS name, which need not be UTF-8.
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut subdirs = Vec::new();
    let mut unreadable = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io("cannot list", raw, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Follow symlinks.
        match std::fs::metadata(entry.path()) {
            Ok(m) if m.is_file() => files.push((name, entry.path())),
            Ok(m) if m.is_dir() => subdirs.push(name),
            Ok(_) => unreadable.push(Skipped { name, reason: "not a regular file (a device, socket or pipe)".into() }),
            Err(e) => {
                let reason = if entry.path().symlink_metadata().is_ok_and(|m| m.is_symlink()) {
                    "a broken link: its target is missing".to_string()
                } else {
                    format!("cannot read: {e}")
                };
                unreadable.push(Skipped { name, reason });
            }
        }
    }
    files.sort();
    subdirs.sort();
    let (mut images, other_files): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|(n, _)| extension(n).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())));
    let mut other: Vec<String> = other_files.into_iter().map(|(n, _)| n).collect();
    if images.is_empty() {
        let mut hint = String::new();
        if let Some(d) = subdirs.first() {
            hint = format!(" (it has a subfolder '{d}': did you mean --raw {}?)", raw.join(d).display());
        } else if let Some(o) = other.first() {
            hint = format!(" (only {} other file(s), e.g. '{o}')", other.len());
        } else if let Some(u) = unreadable.first() {
            hint = format!(" ({} entries could not be read, e.g. '{}': {})", unreadable.len(), u.name, u.reason);
        }
        return Err(DataError::RawEmpty { path: raw.clone(), hint });
    }
    if let Some(limit) = opts.limit {
        images.truncate(limit);
        // With a limit, other files are reported only if they sort before the last image taken.
        let last = images.last().map(|(n, _)| n.clone()).unwrap_or_default();
        other.retain(|o| *o <= last);
        subdirs.retain(|d| *d <= last);
        unreadable.retain(|u| u.name <= last);
    }
    let mut skipped: Vec<Skipped> = other
        .iter()
        .map(|n| Skipped {
            name: n.clone(),
            reason: match extension(n) {
                Some(e) => format!("not an image file (extension .{e})"),
                None => "not an image file (no extension)".into(),
            },
        })
        .collect();
    // Listed so that images left in subfolders are not missed without a word.
    skipped.extend(subdirs.into_iter().map(|name| Skipped { name, reason: "a folder: prepare-data does not look into subfolders".into() }));
    skipped.extend(unreadable);
    let inputs = images.len() + skipped.len();
    let sources = images
        .into_iter()
        .map(|(n, path)| Source { output: output_name(&n), data: SourceData::File { path }, input: n })
        .collect();
    Ok((sources, skipped, inputs))
}

/// Settings that make earlier outputs unusable when they change.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct Settings {
    size: u32,
    crop: String,
}

/// The shared second half: dedupe output names, process in parallel, pack, report.
pub(crate) fn run(
    sources: Vec<Source>,
    skipped: &mut Vec<Skipped>,
    inputs: usize,
    opts: &PrepareOptions,
    progress: bool,
    start: Instant,
) -> Result<PrepareReport, DataError> {
    if opts.size == 0 || opts.size > 4096 {
        return Err(DataError::Invalid(format!("--size must be in 1..=4096, got {}", opts.size)));
    }
    let out = &opts.out;
    let img_dir = out.join("images");
    if let Some(file) = img_dir.ancestors().find(|a| a.is_file()) {
        return Err(DataError::Invalid(format!("--out {}: {} is a file, not a folder", out.display(), file.display())));
    }
    // `create_dir_all` on a link to a missing folder fails with a bare "File exists".
    if let Some(link) = img_dir.ancestors().find(|a| a.symlink_metadata().is_ok_and(|m| m.is_symlink()) && !a.exists()) {
        return Err(DataError::Invalid(format!("--out {}: {} is a link to a missing folder", out.display(), link.display())));
    }
    std::fs::create_dir_all(&img_dir).map_err(|e| DataError::io("cannot create", &img_dir, e))?;
    remove_stale_temporaries(&img_dir);

    // Settings stamp: a change of size or crop invalidates earlier outputs.
    let settings = Settings { size: opts.size, crop: opts.crop.to_string() };
    let settings_path = out.join(SETTINGS_FILE);
    let mut force = opts.force;
    if let Ok(text) = std::fs::read_to_string(&settings_path) {
        match serde_json::from_str::<Settings>(&text) {
            Ok(old) if old == settings => {}
            old => {
                if !force {
                    let was = old.map_or_else(|_| "unknown settings".to_string(), |o| format!("size {} crop {}", o.size, o.crop));
                    tracing::info!(
                        "the outputs in {} were made with {was}, now size {} crop {}: redoing every output",
                        out.display(),
                        settings.size,
                        settings.crop
                    );
                }
                force = true;
            }
        }
    }

    let sources = dedupe_outputs(sources, skipped);
    let s = opts.size as usize;
    let stride = s * s * 3;
    let mut pixels = vec![0u8; sources.len() * stride];

    let bar = if progress { ProgressBar::with_draw_target(Some(sources.len() as u64), ProgressDrawTarget::stderr()) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} images, {per_sec}, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );

    let outcomes: Vec<Outcome> = sources
        .par_iter()
        .zip(pixels.par_chunks_mut(stride))
        .map(|(src, slot)| {
            let out_path = img_dir.join(&src.output);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| handle(src, &out_path, slot, opts, force)));
            bar.inc(1);
            match result {
                Ok(r) => r,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Ok(Outcome::Skipped(format!("decoder panicked: {msg}")))
                }
            }
        })
        .collect::<Result<_, _>>()?;
    bar.finish_and_clear();

    // Compact the pixel buffer to the images that made it, in name order.
    let (mut processed, mut reused, mut upscaled) = (0, 0, 0);
    let mut names = Vec::with_capacity(sources.len());
    for (i, (src, outcome)) in sources.iter().zip(outcomes).enumerate() {
        match outcome {
            Outcome::Skipped(reason) => {
                skipped.push(Skipped { name: src.input.clone(), reason });
                // Do not leave an output of an earlier run that the packed file no longer has.
                let _ = std::fs::remove_file(img_dir.join(&src.output));
                continue;
            }
            Outcome::Processed { upscaled: up } => {
                processed += 1;
                upscaled += usize::from(up);
            }
            Outcome::Reused => reused += 1,
        }
        let j = names.len();
        if i != j {
            pixels.copy_within(i * stride..(i + 1) * stride, j * stride);
        }
        names.push(src.output.clone());
    }
    pixels.truncate(names.len() * stride);
    skipped.sort_by(|a, b| a.name.cmp(&b.name));

    let skipped_path = out.join(SKIPPED_FILE);
    if skipped.is_empty() {
        let _ = std::fs::remove_file(&skipped_path);
    } else {
        let text: String = skipped.iter().map(|s| format!("{}\t{}\n", s.name, s.reason)).collect();
        write_small_atomic(&skipped_path, text.as_bytes()).map_err(|e| DataError::io("cannot write", &skipped_path, e))?;
    }
    if names.is_empty() {
        return Err(DataError::NothingToPack { total: inputs, skipped: skipped.len(), skipped_file: skipped_path });
    }

    let pack_start = Instant::now();
    let made: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let stale = std::fs::read_dir(&img_dir)
        .map(|rd| rd.flatten().filter(|e| e.path().is_file() && !made.contains(e.file_name().to_string_lossy().as_ref())).count())
        .unwrap_or(0);
    let packed_path = out.join(PACKED_FILE);
    let packed = names.len();
    PackedDataset::from_images(names, s, pixels)?.save(&packed_path)?;
    let pack_time = pack_start.elapsed();
    let stamp = serde_json::to_string(&settings).expect("serialises");
    write_small_atomic(&settings_path, stamp.as_bytes()).map_err(|e| DataError::io("cannot write", &settings_path, e))?;

    Ok(PrepareReport {
        inputs,
        processed,
        reused,
        upscaled,
        skipped_path: (!skipped.is_empty()).then_some(skipped_path),
        skipped: std::mem::take(skipped),
        packed,
        size: opts.size,
        out: out.clone(),
        packed_path,
        elapsed: start.elapsed(),
        pack_time,
        stale,
    })
}

/// Keeps one source per output name: the one whose input is already named so, else the first.
fn dedupe_outputs(mut sources: Vec<Source>, skipped: &mut Vec<Skipped>) -> Vec<Source> {
    sources.sort_by(|a, b| a.output.cmp(&b.output).then_with(|| a.input.cmp(&b.input)));
    let mut winner: HashMap<&str, usize> = HashMap::new();
    for (i, s) in sources.iter().enumerate() {
        match winner.get(s.output.as_str()) {
            None => {
                winner.insert(&s.output, i);
            }
            Some(&w) if sources[w].input != sources[w].output && s.input == s.output => {
                winner.insert(&s.output, i);
            }
            Some(_) => {}
        }
    }
    let keep: Vec<bool> = (0..sources.len()).map(|i| winner.get(sources[i].output.as_str()) == Some(&i)).collect();
    let mut kept = Vec::with_capacity(sources.len());
    let owners: HashMap<String, String> =
        winner.iter().map(|(out, &i)| (out.to_string(), sources[i].input.clone())).collect();
    for (s, k) in sources.into_iter().zip(keep) {
        if k {
            kept.push(s);
        } else {
            let reason = format!("output name {} already taken by {}", s.output, owners[&s.output]);
            skipped.push(Skipped { name: s.input, reason });
        }
    }
    kept
}

/// Removes `.<name>.<pid>.tmp` files left by a killed run.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// One input: reuse a valid output, or decode/resize/encode/write. Writes the packed pixels
/// into `slot`. `Err` only for failures to write the output.
fn handle(src: &Source, out_path: &Path, slot: &mut [u8], opts: &PrepareOptions, force: bool) -> Result<Outcome, DataError> {
    let size = opts.size;
    if !force {
        let fresh = match &src.data {
            SourceData::File { path } => match (mtime(out_path), mtime(path)) {
                (Some(o), Some(i)) => o >= i,
                _ => false,
            },
            SourceData::Bytes(_) => out_path.exists(),
        };
        if fresh {
            if let Ok(bytes) = std::fs::read(out_path) {
                if let Ok(img) = decode_rgb(&bytes, opts.max_pixels) {
                    if img.dimensions() == (size, size) {
                        slot.copy_from_slice(img.as_raw());
                        return Ok(Outcome::Reused);
                    }
                }
            }
        }
    }
    let owned;
    let bytes: &[u8] = match &src.data {
        SourceData::File { path } => match std::fs::read(path) {
            Ok(b) => {
                owned = b;
                &owned
            }
            Err(e) => return Ok(Outcome::Skipped(format!("cannot read: {e}"))),
        },
        SourceData::Bytes(b) => b,
    };
    let format = OutputFormat::for_name(&src.output);
    match process_bytes(bytes, size, opts.crop, format, opts.max_pixels) {
        Err(reason) => Ok(Outcome::Skipped(reason)),
        Ok(p) => {
            write_small_atomic(out_path, &p.encoded).map_err(|e| DataError::io("cannot write", out_path, e))?;
            slot.copy_from_slice(&p.pixels);
            Ok(Outcome::Processed { upscaled: p.upscaled })
        }
    }
}
