//! `cargo xtask bench`: our forward pass, training step and DDIM sampling against the PyTorch
//! reference (`scripts/bench_torch.py`, which reuses `../shared/bench/bench_cpu.py`'s timing
//! functions), same cases, same thread count, back to back in one run, with the ratio.
//!
//! Each of our cases runs in a child process of this binary so that its peak memory (VmHWM)
//! is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use diffusion::{NoiseRng, SamplerKind, Schedule};
use serde_json::{json, Value};
use unet::{Mode, UNet, UNetConfig};
use crate::common::{self, out, say};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Comma-separated cases: forward, train8, train16, reduced-forward, reduced-train, ddim50,
    /// ddpm100 (the last 100 DDPM steps, t = 99 ... 0: x10 for 1000), and for GPUs forward128,
    /// train128, ddim50x256, ddpm100x256, ddpm1000x256; `all` = the CPU set, `gpu` = the GPU set.
    #[arg(long, default_value = "all")]
    cases: String,
    /// cpu, cuda or cuda:N (both sides).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or bf16 (autocast-style: f32 master weights, bf16 compute; CUDA).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    precision: String,
    /// Timed runs per case and side (after the warm-up runs).
    #[arg(long, default_value_t = 3, value_parser = crate::common::positive)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Our training cases only: each batch goes through the network in parts of this many
    /// images, their gradients summed before the one Adam step (`train --micro-batch-size`), to
    /// measure what gradient accumulation costs in time and saves in memory. PyTorch's side
    /// accumulates the same way (`scripts/bench_torch.py --micro-batch`).
    #[arg(long, value_parser = crate::common::positive)]
    micro_batch: Option<usize>,
    /// Threads for both sides (RAYON_NUM_THREADS / torch.set_num_threads).
    #[arg(long, default_value_t = 2, value_parser = crate::common::positive)]
    threads: usize,
    /// Python with torch for the side-by-side reference; `none` to skip it.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Folder holding the PyTorch reference's bench_cpu.py and ref_unet.py.
    #[arg(long, default_value = "../shared/bench")]
    torch_bench: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/bench.json")]
    out: PathBuf,
    /// Internal: run one case in this process and print its JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
}

const ALL: [&str; 7] = ["forward", "train8", "train16", "reduced-forward", "reduced-train", "ddim50", "ddpm100"];
const GPU: [&str; 4] = ["forward128", "train128", "ddim50x256", "ddpm100x256"];

fn reduced() -> UNetConfig {
    UNetConfig { image_size: 32, ch: 32, ch_mult: vec![1, 2, 2], attn: vec![1], num_res_blocks: 1, ..UNetConfig::reference() }
}

struct Case {
    cfg: UNetConfig,
    batch: usize,
    kind: &'static str,
    /// Sampling steps for the sampling cases.
    steps: usize,
}

fn case(name: &str) -> Result<Case> {
    let full = UNetConfig::reference();
    Ok(match name {
        "forward" => Case { cfg: full, batch: 16, kind: "forward", steps: 0 },
        "train8" => Case { cfg: full, batch: 8, kind: "train", steps: 0 },
        "train16" => Case { cfg: full, batch: 16, kind: "train", steps: 0 },
        "reduced-forward" => Case { cfg: reduced(), batch: 32, kind: "forward", steps: 0 },
        "reduced-train" => Case { cfg: reduced(), batch: 32, kind: "train", steps: 0 },
        "ddim50" => Case { cfg: full, batch: 16, kind: "ddim", steps: 50 },
        // The last 100 of the 1000 DDPM steps (t = 99 ... 0) for 16 faces (a full run is ~25
        // minutes per side on 2 cores): every step is one network evaluation of the same cost,
        // so x10 is the run.
        "ddpm100" => Case { cfg: full, batch: 16, kind: "ddpm", steps: 100 },
        "forward128" => Case { cfg: full, batch: 128, kind: "forward", steps: 0 },
        "train128" => Case { cfg: full, batch: 128, kind: "train", steps: 0 },
        "ddim50x256" => Case { cfg: full, batch: 256, kind: "ddim", steps: 50 },
        "ddpm1000x256" => Case { cfg: full, batch: 256, kind: "ddpm", steps: 1000 },
        // The last 100 of the 1000 DDPM steps: per-step cost is constant, so x10 gives the full run
        // in a tenth of the GPU time.
        "ddpm100x256" => Case { cfg: full, batch: 256, kind: "ddpm", steps: 100 },
        other => bail!("unknown bench case '{other}' (known: {}, {}, ddpm1000x256)", ALL.join(", "), GPU.join(", ")),
    })
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The timed runs of a case: each run's wall time, and the host's part of it, the time until
/// `f` returned with all of the run's work queued (before the wait for the device).
struct Timings {
    runs_s: Vec<f64>,
    queued_s: Vec<f64>,
}

/// Runs `f` (which queues one run's work) `warmup` times, then `runs` timed times, each followed
/// by a wait for the device. On a GPU, a queue time well under the run's means the device was the
/// limit; one close to it, that the host was (or that the driver's launch queue was full, which
/// the card's utilisation in the check script's nvidia-smi trace tells apart). On the CPU the work
/// runs as it is queued, so the two are equal.
fn time_runs(dev: &Device, warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timings> {
    for _ in 0..warmup {
        f()?;
        sync(dev)?;
    }
    let mut t = Timings { runs_s: Vec::with_capacity(runs), queued_s: Vec::with_capacity(runs) };
    // Under `perf record -D -1 --control fifo:PATH` (the GPU check's host profile), sampling
    // covers the timed runs only, not start-up, warm-up or cuDNN's algorithm search.
    let perf_ctl = |cmd: &str| {
        if let Some(path) = std::env::var_os("XTASK_PERF_CTL") {
            use std::io::Write;
            let _ = std::fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(cmd.as_bytes()));
        }
    };
    perf_ctl("enable\n");
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        t.queued_s.push(start.elapsed().as_secs_f64());
        sync(dev)?;
        t.runs_s.push(start.elapsed().as_secs_f64());
    }
    perf_ctl("disable\n");
    #[cfg(feature = "cuda")]
    if unet::cuda_ops::profile::enabled() {
        // One more run, on its own, for the per-op GPU times (the events cost a little).
        unet::cuda_ops::profile::clear();
        let start = Instant::now();
        f()?;
        let queued_ms = start.elapsed().as_secs_f64() * 1e3;
        sync(dev)?;
        let step_ms = start.elapsed().as_secs_f64() * 1e3;
        let ops = unet::cuda_ops::profile::report()?;
        let ours: f64 = ops.iter().map(|o| o.gpu_ms).sum();
        let ours_host: f64 = ops.iter().map(|o| o.host_ms).sum();
        // The host columns say what each of our ops costs to queue (a cuDNN pass's own per-call
        // work included); the rest of `queued_ms` is candle's ops, the events and the graph.
        *PROFILE.lock().unwrap() = Some(json!({
            "run_ms": step_ms, "our_ops_ms": ours, "queued_ms": queued_ms, "our_ops_host_ms": ours_host,
            "ops": ops.iter().map(|o| json!({"op": o.name, "ms": o.gpu_ms, "host_ms": o.host_ms, "calls": o.calls})).collect::<Vec<_>>(),
        }));
    }
    Ok(t)
}

/// The per-op profile of the last run of a case, when `UNET_CUDA_PROFILE=1`.
#[cfg(feature = "cuda")]
static PROFILE: std::sync::Mutex<Option<Value>> = std::sync::Mutex::new(None);

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() { f64::NAN } else { s[s.len() / 2] }
}

/// A frozen (no-grad) copy of a freshly initialised model, in `dtype`.
fn frozen(cfg: &UNetConfig, dev: &Device, dtype: DType) -> Result<UNet> {
    let (model, varmap) = unet::new_trainable(cfg, dev, 0)?;
    let tensors = unet::weights::state_dict(&model, &varmap)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.detach().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    Ok(UNet::new(VarBuilder::from_tensors(tensors, dtype, dev), cfg)?)
}

/// Steps in the timed loop of a training case on a GPU (after one untimed step).
const LOOP_STEPS: usize = 6;

/// Seconds a step over `steps` steps taken as `Trainer::step` takes them, with the engine's
/// pipeline (`StepEngine::train_steps`), and how many of the updates were gated on the device.
/// Also the host's time a step drawing the next inputs (copies to the device included) and
/// reading the outcomes (the wait for the device), which say where the host waited.
fn training_loop(engine: &mut trainer::StepEngine, x0: &Tensor, rng: &mut NoiseRng, steps: usize) -> Result<(f64, u64, trainer::HostPhases)> {
    engine.train_step(x0, rng)?;
    sync(engine.device())?;
    let gated_before = engine.gated_updates();
    let host_before = engine.host_phases();
    let start = Instant::now();
    engine.train_steps(std::iter::repeat_n(x0, steps), rng, |_, _| Ok(()))?;
    sync(engine.device())?;
    let host = engine.host_phases().since(&host_before);
    Ok((start.elapsed().as_secs_f64() / steps as f64, engine.gated_updates() - gated_before, host))
}

/// Waits for queued GPU work so that timings cover it.
fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Peak device memory in use while a case runs, polled every 2 ms on a thread of its own
/// (`cuMemGetInfo`: total - free). The peak is reported over the baseline taken when polling
/// starts (the CUDA context and handles, before the model exists), to set beside PyTorch's
/// `max_memory_allocated`, which counts neither its context nor its allocator's cache.
#[cfg(feature = "cuda")]
struct GpuMemPoller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<usize>,
    baseline: usize,
}

#[cfg(feature = "cuda")]
impl GpuMemPoller {
    fn start(dev: &Device) -> Result<Option<Self>> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let Ok(cuda) = dev.as_cuda_device() else { return Ok(None) };
        let ctx = cuda.cuda_stream().context().clone();
        let (free, total) = ctx.mem_get_info()?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = total - free;
            while !flag.load(Ordering::Relaxed) {
                if let Ok((f, t)) = ctx.mem_get_info() {
                    peak = peak.max(t - f);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        Ok(Some(Self { stop, handle, baseline: total - free }))
    }

    /// (peak over the baseline, baseline), in MiB.
    fn finish(self) -> (f64, f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = self.handle.join().unwrap_or(self.baseline);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        (mib(peak.saturating_sub(self.baseline)), mib(self.baseline))
    }
}

fn run_child(name: &str, warmup: usize, runs: usize, device: &str, precision: &str, micro_batch: Option<usize>) -> Result<Value> {
    let c = case(name)?;
    let dev = crate::common::parse_device(device)?;
    #[cfg(feature = "cuda")]
    let poller = GpuMemPoller::start(&dev)?;
    let bf16 = match precision {
        "f32" => false,
        "bf16" => true,
        other => bail!("unknown precision '{other}': expected f32 or bf16"),
    };
    let dt = if bf16 { DType::BF16 } else { DType::F32 };
    let s = c.cfg.image_size;
    let mut rng = NoiseRng::new(0);
    let schedule = Schedule::reference();
    // Training cases: the host time of each part of a step, averaged over the timed runs (ms).
    let mut host_phases: Option<Value> = None;
    // Training cases with `TRAIN_CUDA_GRAPH=1`: how the step's CUDA graphs served the runs.
    let mut cuda_graph: Option<Value> = None;
    // Training cases on a GPU: seconds a step in a loop of steps, pipelined and not.
    let mut training_loop_s: Option<Value> = None;
    let times = match c.kind {
        "forward" => {
            let model = frozen(&c.cfg, &dev, dt)?;
            let x = rng.randn((c.batch, 3, s, s), &dev)?.to_dtype(dt)?;
            let (_, t) = rng.timesteps(c.batch, 1000, &dev)?;
            time_runs(&dev, warmup, runs, || {
                model.forward_t(&x, &t, Mode::Eval)?;
                Ok(())
            })?
        }
        "train" => {
            // The trainer's own step (`StepEngine`, as `xtask train` runs it) with the reference's
            // optimisation: Adam at 1e-4, no clipping, warm-up or EMA.
            let mut cfg = trainer::RunConfig { unet: c.cfg.clone(), ..Default::default() };
            cfg.train.seed = 0;
            cfg.train.batch_size = c.batch;
            cfg.train.micro_batch_size = micro_batch;
            cfg.train.precision = if bf16 { trainer::Precision::Bf16 } else { trainer::Precision::F32 };
            let mut engine = trainer::StepEngine::new(&cfg, &dev)?;
            let x0 = rng.randn((c.batch, 3, s, s), &dev)?.tanh()?;
            // Each call's host time per part, for the timed runs' average below.
            let mut calls: Vec<(trainer::HostPhases, f64)> = Vec::new();
            let t = time_runs(&dev, warmup, runs, || {
                let before = engine.host_phases();
                // Not read: the step is queued, and the wait for the device comes after it.
                // (Replayed from a CUDA graph with `TRAIN_CUDA_GRAPH=1`, as training does.)
                let (_loss, g) = engine.step_gradients(&x0, &mut rng)?;
                let opt_start = Instant::now();
                engine.opt.step_with(&g, 1e-4)?;
                calls.push((engine.host_phases().since(&before), opt_start.elapsed().as_secs_f64()));
                Ok(())
            })?;
            let timed = &calls[warmup.min(calls.len())..(warmup + runs).min(calls.len())];
            let n = timed.len().max(1) as f64;
            let avg = |f: fn(&(trainer::HostPhases, f64)) -> f64| 1e3 * timed.iter().map(f).sum::<f64>() / n;
            host_phases = Some(json!({
                "draws": avg(|c| c.0.draws), "casts": avg(|c| c.0.casts), "forward": avg(|c| c.0.forward),
                "backward": avg(|c| c.0.backward), "gather": avg(|c| c.0.gather), "replay": avg(|c| c.0.replay),
                "optimizer": avg(|c| c.1),
            }));
            if dev.is_cuda() {
                // Steps back to back as `xtask train` takes them (`Trainer::step`): with the
                // pipeline, the next step is queued before the last one's loss is read, so the
                // card need not wait for the host between steps; without, each step's loss is read
                // before the next is queued. (On the CPU both are the timed step.)
                let mut per_step = serde_json::Map::new();
                for (label, pipeline) in [("pipelined", engine.pipeline()), ("plain", trainer::StepPipeline::Off)] {
                    engine.set_pipeline(pipeline);
                    let (per, gated, host) = training_loop(&mut engine, &x0, &mut rng, LOOP_STEPS)?;
                    per_step.insert(label.into(), json!(per));
                    per_step.insert(format!("{label}_gated"), json!(gated));
                    per_step.insert(format!("{label}_draws_ms"), json!(1e3 * host.draws / LOOP_STEPS as f64));
                    per_step.insert(format!("{label}_outcome_ms"), json!(1e3 * host.outcome / LOOP_STEPS as f64));
                }
                engine.set_pipeline(trainer::StepPipeline::from_env());
                training_loop_s = Some(Value::Object(per_step));
            }
            let report = engine.cuda_graph_report();
            if report != trainer::CudaGraphReport::default() {
                cuda_graph = Some(json!({ "launches": report.launches, "captures": report.captures, "failure": report.failure }));
            }
            t
        }
        "ddim" | "ddpm" => {
            let model = frozen(&c.cfg, &dev, dt)?;
            // An f32 state with a bf16 model, as PyTorch's autocast runs it.
            let x_t = rng.randn((c.batch, 3, s, s), &dev)?;
            let kind = if c.kind == "ddim" {
                SamplerKind::Ddim { steps: c.steps, eta: 0.0 }
            } else {
                SamplerKind::Ddpm { variance: diffusion::Variance::BetaTilde, final_noise: Default::default() }
            };
            let t_start = if c.kind == "ddpm" { c.steps - 1 } else { schedule.num_steps() - 1 };
            // The sampler users run (per-image noise streams drawn in parallel, images back
            // on the host), one batch.
            let sampler = sampler::Sampler::for_unet(&model, &schedule).batch(c.batch);
            // One sampling run is timed, so its first-call costs (kernel compiles and loads,
            // cuDNN's choices per shape) go into one untimed model call at its batch instead;
            // bench_torch.py does the same.
            if warmup > 0 {
                model.forward_t(&x_t.to_dtype(dt)?, &Tensor::full(t_start as u32, c.batch, &dev)?, Mode::Eval)?;
                sync(&dev)?;
            }
            // (Its images come back to the host, so all of a run is queue time.)
            time_runs(&dev, 0, runs.min(1), || {
                sampler.sample_from_step(&x_t, t_start, &kind, rng.next_u64(), |_, _| {})?;
                Ok(())
            })?
        }
        _ => unreachable!(),
    };
    let med = median(&times.runs_s);
    let mut out = json!({
        "case": name, "batch": c.batch, "median_s": med, "runs_s": times.runs_s,
        "queued_s": median(&times.queued_s), "queued_runs_s": times.queued_s,
        "images_per_s": c.batch as f64 / med, "peak_rss_mb": peak_rss_mb(),
    });
    if c.kind == "train" {
        out["micro_batch"] = json!(micro_batch.map_or(c.batch, |m| m.min(c.batch)));
    }
    if let Some(h) = host_phases {
        out["host_phases_ms"] = h;
    }
    if let Some(g) = cuda_graph {
        out["train_cuda_graph"] = g;
    }
    if let Some(l) = training_loop_s {
        out["training_loop_s"] = l;
    }
    // How each convolution pass ran (its cuDNN algorithm and how it was chosen, or its graph
    // plan), and what failed.
    #[cfg(feature = "cudnn")]
    {
        out["cudnn_choices"] = json!(unet::conv_cudnn::choices());
    }
    #[cfg(feature = "cuda")]
    if let Some(p) = poller {
        let (peak, baseline) = p.finish();
        out["peak_gpu_mb"] = json!(peak);
        out["gpu_baseline_mb"] = json!(baseline);
    }
    #[cfg(feature = "cuda")]
    if let Some(p) = PROFILE.lock().unwrap().take() {
        out["profile"] = p;
    }
    Ok(out)
}

/// What a failed child said, and how it ended: its `error:` line; else a panic's message (the
/// line after "panicked at"); else its last line before any backtrace or hint (an allocation
/// failure aborts with neither).
fn child_failure(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().take_while(|l| !l.starts_with("stack backtrace:")).filter(|l| !l.trim().is_empty()).collect();
    let said = if let Some(e) = lines.iter().rev().find(|l| l.starts_with("error:")) {
        e.to_string()
    } else if let Some(i) = lines.iter().rposition(|l| l.contains("panicked at")) {
        format!("{} {}", lines[i].trim(), lines.get(i + 1).map_or("", |l| l.trim()))
    } else {
        lines.iter().rev().find(|l| !l.starts_with("note:")).unwrap_or(&"no message").to_string()
    };
    format!("{} ({})", said.trim(), o.status)
}

fn torch_case(args: &BenchArgs, name: &str) -> Result<Option<Value>> {
    if args.python == "none" {
        return Ok(None);
    }
    if !args.torch_bench.join("bench_cpu.py").exists() {
        say!("PyTorch reference not found in {} (use --torch-bench): skipping it", args.torch_bench.display());
        return Ok(None);
    }
    let script = common::repo_path(Path::new("scripts/bench_torch.py"));
    if !script.exists() {
        say!("scripts/bench_torch.py not found (run from the repository's root): skipping PyTorch's side");
        return Ok(None);
    }
    let o = Command::new(&args.python)
        .arg(&script)
        .args(["--case", name, "--runs", &args.runs.to_string(), "--warmup", &args.warmup.to_string()])
        .args(["--threads", &args.threads.to_string(), "--device", &args.device, "--precision", &args.precision])
        .args(args.micro_batch.iter().flat_map(|m| ["--micro-batch".to_string(), m.to_string()]))
        .arg("--ref-dir")
        .arg(&args.torch_bench)
        .output();
    let o = match o {
        Ok(o) => o,
        Err(e) => {
            say!("cannot run --python {} ({e}): skipping PyTorch's side", args.python);
            return Ok(None);
        }
    };
    if !o.status.success() {
        say!("PyTorch side of {name} failed (is torch installed for '{}'?): {}", args.python,
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
        return Ok(None);
    }
    // The result is the script's last line; a library may have printed before it (a warning on
    // stdout), which must not cost the row.
    let stdout = String::from_utf8_lossy(&o.stdout);
    match stdout.lines().rev().find(|l| !l.trim().is_empty()).map(serde_json::from_str::<Value>) {
        Some(Ok(v)) => Ok(Some(v)),
        _ => {
            say!("PyTorch side of {name}: no result in its output (last line: {:?}): skipping it", stdout.lines().last().unwrap_or(""));
            Ok(None)
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(name) = &args.child {
        let v = run_child(name, args.warmup, args.runs, &args.device, &args.precision, args.micro_batch)?;
        out!("{v}");
        return Ok(());
    }
    let names: Vec<String> = if args.cases == "all" {
        ALL.iter().map(|s| s.to_string()).collect()
    } else if args.cases == "gpu" {
        GPU.iter().map(|s| s.to_string()).collect()
    } else {
        args.cases.split(',').map(|s| s.trim().to_string()).collect()
    };
    // Both sides start this many threads; a typo (100000) would stall the machine.
    if args.threads > 1024 {
        bail!("--threads must be at most 1024, got {}", args.threads);
    }
    if args.precision == "bf16" && args.device == "cpu" {
        bail!("--precision bf16 needs --device cuda (candle's CPU matmul has no bf16)");
    }
    // The results are written after each case: find out now, not after an hour of runs, that they cannot be.
    if args.out.is_dir() {
        bail!("--out {} is a folder: give the JSON file to write, e.g. {}", args.out.display(), args.out.join("bench.json").display());
    }
    let out_dir = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    unet::weights::create_dir_all(out_dir)
        .and_then(|()| unet::weights::check_writable(out_dir))
        .with_context(|| format!("cannot write --out {}", args.out.display()))?;
    for n in &names {
        case(n)?;
        // Batches of 128-256 through the full model: hours on a CPU.
        if args.device == "cpu" && (GPU.contains(&n.as_str()) || n == "ddpm1000x256") {
            tracing::warn!("bench case {n} is sized for a GPU: on the CPU it takes hours");
        }
    }
    let exe = std::env::current_exe()?;
    out!("{:<16} {:>5} {:>10} {:>10} {:>8} {:>9} {:>9}", "case", "batch", "ours s", "torch s", "speedup", "ours MB", "torch MB");
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()));
    // Rewritten after every case, so that a run stopped part-way (a time limit) keeps its rows.
    let write = |rows: &Vec<Value>| -> Result<()> {
        let doc = json!({"device": args.device, "precision": args.precision, "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "cpu": cpu, "rows": rows});
        unet::weights::write_replacing(&args.out, serde_json::to_string_pretty(&doc)?.as_bytes())
            .with_context(|| format!("cannot write --out {}", args.out.display()))
    };
    for name in &names {
        // Back to back, same case: the machine's load drifts, so pairs are what compare.
        let o = Command::new(&exe)
            .args(["bench", "--child", name, "--runs", &args.runs.to_string(), "--warmup", &args.warmup.to_string()])
            .args(["--device", &args.device, "--precision", &args.precision])
            .args(args.micro_batch.iter().flat_map(|m| ["--micro-batch".to_string(), m.to_string()]))
            .env("RAYON_NUM_THREADS", args.threads.to_string())
            .output()
            .with_context(|| format!("running bench case {name}"))?;
        let ours: Result<Value> = if o.status.success() {
            serde_json::from_slice(&o.stdout).with_context(|| format!("parsing case {name} output"))
        } else {
            Err(anyhow::anyhow!("{}", child_failure(&o)))
        };
        let torch = torch_case(&args, name)?;
        // One failing case (a kernel on its first full-size run, say) must not cost the others,
        // nor PyTorch's side of this one: the row says why, and the command fails at the end.
        let ours = match ours {
            Ok(v) => v,
            Err(e) => {
                let t = torch.as_ref().and_then(|r| r["median_s"].as_f64());
                out!("{:<16} {:>5} {:>10} {:>10}  ours FAILED: {e:#}", name, "-", "-", t.map(|x| format!("{x:.3}")).unwrap_or("-".into()));
                failed.push(format!("{name} ({e:#})"));
                rows.push(json!({"case": name, "error": format!("{e:#}"), "torch": torch}));
                write(&rows)?;
                continue;
            }
        };
        let ours_s = ours["median_s"].as_f64().unwrap_or(f64::NAN);
        let t = torch.as_ref().and_then(|r| r["median_s"].as_f64());
        // On a GPU the memory columns are device memory (ours: the driver's count over the
        // context's baseline, our memory pool included; PyTorch's max_memory_allocated, and its
        // max_memory_reserved after it, the figure that counts its caching allocator as ours
        // counts our pool); on the CPU, peak resident memory.
        let gpu = ours.get("peak_gpu_mb").is_some();
        let key = if gpu { "peak_gpu_mb" } else { "peak_rss_mb" };
        let tp = torch.as_ref().and_then(|r| r[key].as_f64());
        let reserved = torch.as_ref().and_then(|r| r["peak_gpu_reserved_mb"].as_f64());
        out!(
            "{:<16} {:>5} {:>10.3} {:>10} {:>8} {:>9.0} {:>9}{}",
            name,
            ours["batch"],
            ours_s,
            t.map(|x| format!("{x:.3}")).unwrap_or("-".into()),
            t.map(|x| format!("{:.2}x", x / ours_s)).unwrap_or("-".into()),
            ours[key].as_f64().unwrap_or(f64::NAN),
            tp.map(|x| format!("{x:.0}")).unwrap_or("-".into()),
            match (gpu, reserved) {
                (true, Some(r)) => format!("  (GPU MB; torch reserved {r:.0})"),
                (true, None) => "  (GPU MB)".into(),
                _ => String::new(),
            },
        );
        if let Some(m) = ours["micro_batch"].as_u64().filter(|&m| Some(m) != ours["batch"].as_u64()) {
            let who = match torch.as_ref().map(|r| r["micro_batch"].as_u64()) {
                Some(Some(t)) if t == m => "both sides",
                Some(_) => "ours; PyTorch's side ran the whole batch at once",
                None => "ours",
            };
            out!("  in parts of {m} images (gradient accumulation): {who}");
        }
        if gpu {
            // Whether the host kept the card fed: the time to queue a run's work beside the run.
            let queued = |r: &Value| match (r["queued_s"].as_f64(), r["median_s"].as_f64()) {
                (Some(q), Some(m)) => format!("{q:.3} of {m:.3} s"),
                _ => "-".into(),
            };
            out!("  host queue time: ours {}, PyTorch {}", queued(&ours), torch.as_ref().map_or("-".into(), queued));
        }
        if let Some(h) = ours.get("host_phases_ms") {
            // On a GPU, where a host-bound step's time goes; on the CPU, the step's work.
            let ms = |k: &str| h[k].as_f64().unwrap_or(f64::NAN);
            out!(
                "  our host time by part (ms a run): draws {:.1}, bf16 casts {:.1}, forward {:.1}, backward {:.1}, gradients {:.1}, graph replay {:.1}, optimizer {:.1}",
                ms("draws"), ms("casts"), ms("forward"), ms("backward"), ms("gather"), ms("replay"), ms("optimizer")
            );
        }
        if let Some(l) = ours.get("training_loop_s") {
            // What `xtask train` gets a step, the next step queued before the last loss is read or not.
            let s = |v: &Value, k: &str| v[k].as_f64().map_or("-".into(), |x| format!("{:.1} ms", 1e3 * x));
            // The host's time a step drawing the next inputs and reading the outcome.
            let waits = |label: &str| {
                let ms = |k: &str| l[format!("{label}_{k}_ms")].as_f64().map_or("-".into(), |x| format!("{x:.1}"));
                format!("draws {} ms, outcome {} ms", ms("draws"), ms("outcome"))
            };
            let t = torch.as_ref().map(|r| &r["training_loop_s"]).filter(|v| v.is_object());
            out!(
                "  a step in a loop of {LOOP_STEPS} (as `train` runs): ours pipelined {} ({} updates gated on the device; {}), plain {} ({}); PyTorch reading each loss (as Lightning's progress bar) {}, never reading it {}",
                s(l, "pipelined"),
                l["pipelined_gated"],
                waits("pipelined"),
                s(l, "plain"),
                waits("plain"),
                t.map_or("-".into(), |v| s(v, "loss_read")),
                t.map_or("-".into(), |v| s(v, "unread"))
            );
        }
        if let Some(g) = ours.get("train_cuda_graph") {
            // TRAIN_CUDA_GRAPH=1: whether the steps came from the graph, or why not.
            out!(
                "  training steps from CUDA graphs: {} launches, {} captures{}",
                g["launches"], g["captures"], g["failure"].as_str().map_or(String::new(), |f| format!("; went back to plain steps: {f}"))
            );
        }
        if let Some(choices) = ours["cudnn_choices"].as_array().filter(|c| !c.is_empty()) {
            // Each (pass, shape)'s algorithm is in the JSON; what went wrong is worth a line.
            let found = choices.iter().filter(|c| c.as_str().is_some_and(|c| c.contains("(Find,"))).count();
            let legacy = choices.iter().filter(|c| c.as_str().is_some_and(|c| c.starts_with("conv ") && (c.contains("(Find,") || c.contains("(heuristics")))).count();
            if legacy > 0 {
                out!("  cuDNN algorithms: {found} of the {legacy} passes' choices (legacy calls) measured by Find");
            }
            let plans = choices.iter().filter(|c| c.as_str().is_some_and(|c| c.ends_with(": graph plan"))).count();
            if plans > 0 {
                out!("  cuDNN graph API: {plans} passes ran from execution plans");
            }
            for c in choices.iter().filter_map(|c| c.as_str()).filter(|c| c.starts_with("Find failed") || c.starts_with("Graph API failed") || c.starts_with("kept descriptors failed")) {
                out!("    {c}");
            }
        }
        if let Some(p) = ours.get("profile") {
            // UNET_CUDA_PROFILE=1: where our GPU time went in one more run of the case.
            let ms = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
            out!(
                "  profile of one run: {:.1} ms wall, {:.1} ms in our CUDA ops (the rest: candle's ops and launch gaps); host: {:.1} ms queueing, {:.1} of it in our ops",
                ms("run_ms"), ms("our_ops_ms"), ms("queued_ms"), ms("our_ops_host_ms")
            );
            out!("    {:>9} {:>9} {:>5}", "GPU ms", "host ms", "calls");
            for o in p["ops"].as_array().into_iter().flatten().take(25) {
                let f = |k: &str| o[k].as_f64().unwrap_or(f64::NAN);
                out!("    {:>9.2} {:>9.2} {:>5}x  {}", f("ms"), f("host_ms"), o["calls"], o["op"].as_str().unwrap_or(""));
            }
        }
        rows.push(json!({"ours": ours, "torch": torch, "speedup": t.map(|x| x / ours_s)}));
        write(&rows)?;
    }
    out!("speedup = PyTorch time / our time (above 1: we are faster); threads = {}", args.threads);
    out!("wrote {}", args.out.display());
    if !failed.is_empty() {
        bail!("{} of {} bench cases failed: {}", failed.len(), names.len(), failed.join("; "));
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{ExitStatus, Output};

    fn failed(stderr: &str, status: ExitStatus) -> String {
        super::child_failure(&Output { status, stdout: Vec::new(), stderr: stderr.as_bytes().to_vec() })
    }

    #[test]
    fn a_failed_case_says_what_its_child_said() {
        let exit1 = ExitStatus::from_raw(1 << 8);
        let exit101 = ExitStatus::from_raw(101 << 8);
        let abort = ExitStatus::from_raw(6);
        assert_eq!(failed("loading...\nerror: in CUDA op: softmax fwd: bad\n", exit1), "error: in CUDA op: softmax fwd: bad (exit status: 1)");
        // A panic: its message, not the hint that follows it.
        let panic = "\nthread 'main' panicked at src/x.rs:3:5:\nassertion failed: returned_count > 0\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(failed(panic, exit101), "thread 'main' panicked at src/x.rs:3:5: assertion failed: returned_count > 0 (exit status: 101)");
        // An abort: the last line before the backtrace.
        let oom = "memory allocation of 16777216 bytes failed\nstack backtrace:\n   0: foo\nnote: Some details are omitted\n";
        assert_eq!(failed(oom, abort), "memory allocation of 16777216 bytes failed (signal: 6 (SIGABRT))");
        assert_eq!(failed("", exit1), "no message (exit status: 1)");
    }
}
