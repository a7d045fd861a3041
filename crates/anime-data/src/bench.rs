//! `bench-data`: our [`prepare`] against the reference's single-process Pillow
//! loop, on generated Kaggle-like JPEGs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::{prepare, DataError, PrepareOptions};

/// The reference's preprocessing loop (open, resize to 64x64 with the default filter, convert to
/// RGB, save as JPEG quality 100), timed inside Python so interpreter start-up is not counted.
pub const PIL_SCRIPT: &str = r#"
import os, sys, time
from PIL import Image
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(dst, exist_ok=True)
names = sorted(os.listdir(src))
t, c = time.perf_counter(), time.process_time()
for n in names:
    img = Image.open(os.path.join(src, n))
    img = img.resize((size, size))
    img = img.convert("RGB")
    img.save(os.path.join(dst, n), quality=100)
print(len(names), time.perf_counter() - t, time.process_time() - c)
"#;

/// What [`run_bench`] does.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Number of generated input JPEGs.
    pub n: usize,
    /// Folder for the generated inputs (cached between runs) and the outputs.
    pub workdir: PathBuf,
    /// Output size.
    pub size: u32,
    /// Timed runs of each contender; the best is reported.
    pub repeat: usize,
    /// The Python interpreter to run the reference with.
    pub python: String,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { n: 3000, workdir: "target/bench-data".into(), size: 64, repeat: 3, python: "python3".into() }
    }
}

/// Timings of one contender.
#[derive(Clone, Debug)]
pub struct Timing {
    pub label: String,
    /// Best wall time over the repeats.
    pub best: Duration,
    /// CPU time (user + system, all threads) of that run: unlike wall time, it barely depends
    /// on what else the machine is running.
    pub cpu: Duration,
    pub images: usize,
}

impl Timing {
    pub fn images_per_sec(&self) -> f64 {
        self.images as f64 / self.best.as_secs_f64().max(1e-9)
    }

    /// Images per CPU-second; NaN when the CPU time is below what the OS counts (10 ms ticks):
    /// a handful of images would otherwise read as billions a second.
    pub fn images_per_cpu_sec(&self) -> f64 {
        if self.cpu < Duration::from_millis(20) {
            return f64::NAN;
        }
        self.images as f64 / self.cpu.as_secs_f64()
    }
}

/// What [`run_bench`] measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub inputs_dir: PathBuf,
    pub n: usize,
    /// Average input file size in bytes.
    pub mean_input_bytes: u64,
    /// Whether the inputs were generated in this run (else reused from the cache).
    pub generated: bool,
    pub threads: usize,
    /// Ours with all rayon threads.
    pub ours: Timing,
    /// Ours on one thread (per-core comparison).
    pub ours_single: Timing,
    /// The reference Pillow loop, or why it was skipped.
    pub reference: Result<Timing, String>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "bench-data: {} Kaggle-like JPEGs (80-130 px, mean {:.1} KB) in {}{}",
            self.n,
            self.mean_input_bytes as f64 / 1024.0,
            self.inputs_dir.display(),
            if self.generated { " (generated now)" } else { " (cached)" }
        )?;
        writeln!(f, "  {:<52} {:>8} {:>10} {:>8} {:>12}", "", "wall", "images/s", "CPU", "images/CPU-s")?;
        let line = |f: &mut std::fmt::Formatter<'_>, t: &Timing| {
            let per_cpu = t.images_per_cpu_sec();
            writeln!(
                f,
                "  {:<52} {:>7.3}s {:>10.0} {:>7.2}s {:>12}",
                t.label,
                t.best.as_secs_f64(),
                t.images_per_sec(),
                t.cpu.as_secs_f64(),
                if per_cpu.is_nan() { "- (too short)".to_string() } else { format!("{per_cpu:.0}") }
            )
        };
        line(f, &self.ours)?;
        line(f, &self.ours_single)?;
        match &self.reference {
            Ok(r) => {
                line(f, r)?;
                let per_cpu = self.ours_single.images_per_cpu_sec() / r.images_per_cpu_sec();
                write!(
                    f,
                    "  speed-up vs reference (wall): {:.1}x ({} threads), {:.1}x (1 thread); per CPU-second: {}",
                    self.ours.images_per_sec() / r.images_per_sec(),
                    self.threads,
                    self.ours_single.images_per_sec() / r.images_per_sec(),
                    if per_cpu.is_nan() { "- (too short to time)".to_string() } else { format!("{per_cpu:.1}x") }
                )
            }
            Err(why) => write!(f, "  reference skipped: {why}"),
        }
    }
}

/// Generates `n` Kaggle-like JPEGs (quality 90, 4:2:0) in `dir` (named like the Kaggle files,
/// `<i>_<year>.jpg`), unless a complete set is already there.
/// Returns whether it generated them.
pub fn generate_inputs(dir: &Path, n: usize, seed: u64) -> Result<bool, DataError> {
    let marker = dir.with_extension("complete");
    let stamp = format!("kaggle-like v3 n={n} seed={seed}");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == stamp) {
        return Ok(false);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| DataError::io("cannot clear", dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("cannot create", dir, e))?;
    (0..n).into_par_iter().try_for_each(|i| {
        let img = kaggle_like(seed, i);
        let mut bytes = Vec::new();
        // Quality 90 with 4:2:0 subsampling, like most JPEGs found on the web.
        jpeg_encoder::Encoder::new(&mut bytes, 90)
            .encode(img.as_raw(), img.width() as u16, img.height() as u16, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| DataError::Invalid(format!("cannot encode bench image {i}: {e}")))?;
        let path = dir.join(format!("{}_{}.jpg", i + 1, 2000 + i % 19));
        std::fs::write(&path, bytes).map_err(|e| DataError::io("cannot write", &path, e))
    })?;
    std::fs::write(&marker, stamp).map_err(|e| DataError::io("cannot write", &marker, e))?;
    Ok(true)
}

/// One Kaggle-like face: a synthetic face at a random size of 80-130 px (80% square, the rest
/// up to 15% off square) with grain, so that JPEG sizes are realistic.
fn kaggle_like(seed: u64, i: usize) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    rng.set_stream(i as u64);
    let w: u32 = rng.random_range(80..=130);
    let h = if rng.random_bool(0.8) { w } else { (w as f32 * rng.random_range(0.85..1.15)) as u32 };
    let face = crate::synth::synthetic_face(seed, i as u64, w.max(h) as usize);
    let mut img = image::imageops::resize(&face, w, h, image::imageops::FilterType::Triangle);
    for p in img.pixels_mut() {
        for c in p.0.iter_mut() {
            let grain: i16 = rng.random_range(-10..=10);
            *c = (i16::from(*c) + grain).clamp(0, 255) as u8;
        }
    }
    img
}

/// CPU time (user + system) of this process, from `/proc/self/stat` (Linux; zero elsewhere).
/// Clock ticks are taken as 100 Hz (USER_HZ).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return Duration::ZERO };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    // rest starts at field 3 (state); utime=14, stime=15.
    let tick = |i: usize| f.get(i - 3).copied().unwrap_or(0);
    Duration::from_millis((tick(14) + tick(15)) * 10)
}

/// Best wall time and the CPU time of that run.
fn best_of<F: FnMut() -> Result<(), DataError>>(repeat: usize, mut f: F) -> Result<(Duration, Duration), DataError> {
    let mut best = (Duration::MAX, Duration::ZERO);
    for _ in 0..repeat.max(1) {
        let c = cpu_time();
        let t = Instant::now();
        f()?;
        let wall = t.elapsed();
        if wall < best.0 {
            best = (wall, cpu_time().saturating_sub(c));
        }
    }
    Ok(best)
}

/// Runs the reference loop once; returns its own timing of the loop, wall and CPU: both without
/// the interpreter's start-up and imports (~0.1 s of CPU, which the child's CPU time as the OS
/// counts it would add, in our favour).
fn run_pil(python: &str, src: &Path, dst: &Path, size: u32) -> Result<(Duration, Duration), String> {
    let out = Command::new(python)
        .args(["-c", PIL_SCRIPT])
        .arg(src)
        .arg(dst)
        .arg(size.to_string())
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("reference loop failed: {}", err.lines().last().unwrap_or("")));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |i: usize| -> Result<f64, String> {
        text.split_whitespace().nth(i).and_then(|s| s.parse().ok()).ok_or_else(|| format!("unexpected output from the reference loop: {text}"))
    };
    Ok((Duration::from_secs_f64(field(1)?), Duration::from_secs_f64(field(2)?)))
}

/// `python -c "import PIL"` works? Returns "Python X + Pillow Y". `none` skips the reference
/// (as `xtask bench --python none` does).
fn pillow_version(python: &str) -> Result<String, String> {
    if python == "none" {
        return Err("--python none".into());
    }
    let out = Command::new(python)
        .args(["-c", "import sys, PIL; print(sys.version.split()[0], PIL.__version__)"])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{python} -c \"import PIL\"` failed (pip install pillow to compare)"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    Ok(format!("Python {} + Pillow {}", it.next().unwrap_or("?"), it.next().unwrap_or("?")))
}

/// Generates (or reuses) the inputs, then times ours (all threads, then one thread, each with
/// `force`, best of `repeat`) and the reference Pillow loop (best of `repeat`).
pub fn run_bench(opts: &BenchOptions) -> Result<BenchReport, DataError> {
    if opts.n == 0 {
        return Err(DataError::Invalid("--n must be positive".into()));
    }
    let inputs_dir = opts.workdir.join(format!("raw-{}", opts.n));
    let generated = generate_inputs(&inputs_dir, opts.n, 2024)?;
    let total_bytes: u64 = std::fs::read_dir(&inputs_dir)
        .map_err(|e| DataError::io("cannot list", &inputs_dir, e))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();

    let mut popts = PrepareOptions::new(&inputs_dir, opts.workdir.join("out-ours"));
    popts.size = opts.size;
    popts.force = true;
    let threads = rayon::current_num_threads();
    let ours = best_of(opts.repeat, || prepare(&popts, false).map(|_| ()))?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(|e| DataError::Invalid(e.to_string()))?;
    let ours_single = best_of(opts.repeat, || pool.install(|| prepare(&popts, false).map(|_| ())))?;

    let reference = pillow_version(&opts.python).and_then(|version| {
        let dst = opts.workdir.join("out-pil");
        let mut best = (Duration::MAX, Duration::ZERO);
        for _ in 0..opts.repeat.max(1) {
            let t = run_pil(&opts.python, &inputs_dir, &dst, opts.size)?;
            if t.0 < best.0 {
                best = t;
            }
        }
        Ok(Timing { label: format!("reference ({version}, 1 process)"), best: best.0, cpu: best.1, images: opts.n })
    });

    Ok(BenchReport {
        inputs_dir,
        n: opts.n,
        mean_input_bytes: total_bytes / opts.n as u64,
        generated,
        threads,
        ours: Timing { label: format!("ours (prepare, {threads} threads)"), best: ours.0, cpu: ours.1, images: opts.n },
        ours_single: Timing { label: "ours (prepare, 1 thread)".into(), best: ours_single.0, cpu: ours_single.1, images: opts.n },
        reference,
    })
}
