//! Helpers shared by the subcommands: logging and device selection.

use anyhow::{bail, Context, Result};
use candle_core::Device;

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal (a log file or pipe would get escape codes), and not against
    // NO_COLOR, which tracing-subscriber honours by itself unless told explicitly, as here.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).with_writer(std::io::stderr).init();
}

/// `rel`, a path inside this repository, from the working directory when it is there, else
/// from the checkout this binary was built in (for a run from another folder).
pub fn repo_path(rel: &std::path::Path) -> std::path::PathBuf {
    if rel.exists() || rel.is_absolute() {
        return rel.to_path_buf();
    }
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    if built.exists() {
        built
    } else {
        rel.to_path_buf()
    }
}

/// Clap's parser for counts that must be at least 1 (clap's own range parser would print the
/// range as 1..18446744073709551615).
pub fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The start of the error when a GPU does not open.
pub const CANNOT_OPEN_CUDA: &str = "cannot open CUDA device";

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().with_context(|| format!("bad device '{s}': expected cuda:N"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device '{s}' requested but this binary was built without CUDA: use `cargo xtask-cuda` instead of `cargo xtask` (a CUDA toolkit and cuDNN are needed; README, \"GPU\")");
            }
            let dev = Device::new_cuda(ordinal).with_context(|| format!("{CANNOT_OPEN_CUDA} {ordinal}"))?;
            // Only speed is at stake: should the driver refuse, run with candle's defaults.
            #[cfg(feature = "cuda")]
            if let Err(e) = unet::cuda_ops::tune_device(&dev) {
                tracing::warn!("CUDA device {ordinal}: keeping candle's allocator settings ({})", one_line(&e.into()));
            }
            Ok(dev)
        }
        other => bail!("unknown device '{other}': expected cpu, cuda or cuda:N"),
    }
}

/// How a command without `--device` treats a CUDA build whose GPU does not open.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NoGpu {
    /// Go on on the CPU, with a warning (sampling: slow, but it ends).
    UseCpu,
    /// Stop with an error: a training run meant for the GPU would take months on the CPU.
    Refuse,
}

/// `--device` left out: the GPU when this binary has CUDA, else the CPU.
pub fn pick_device(spec: Option<&str>, no_gpu: NoGpu) -> Result<Device> {
    match spec {
        Some(s) => parse_device(s),
        None if candle_core::utils::cuda_is_available() => parse_device("cuda").or_else(|e| match no_gpu {
            NoGpu::UseCpu => {
                tracing::warn!("no usable CUDA device ({}): running on the CPU (--device cpu chooses it without this warning)", one_line(&e));
                Ok(Device::Cpu)
            }
            NoGpu::Refuse => Err(e.context("this CUDA build trains on the GPU unless told otherwise: pass --device cpu to train on the CPU")),
        }),
        None => Ok(Device::Cpu),
    }
}

/// The command that runs this binary, for the hints it prints.
pub const ALIAS: &str = if cfg!(feature = "cuda") { "cargo xtask-cuda" } else { "cargo xtask" };

/// The device as the logs name it: `cpu (N threads)` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => format!("cpu ({})", count(candle_core::utils::get_num_threads() as u64, "thread")),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The chain of contexts joined on one line, as ripgrep and cargo do; less what a message
/// already says: our library errors print their source themselves ("cannot read X: <os
/// error>"), and a context naming a path may precede an error that starts with it.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let full = cause.to_string();
        let text = without_backtrace(&full);
        if line.ends_with(&*text) {
            continue;
        }
        let mut rest = &*text;
        if let Some(last) = line.rsplit(' ').next().filter(|w| !w.is_empty()) {
            rest = rest.strip_prefix(last).and_then(|r| r.strip_prefix(": ")).unwrap_or(rest);
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(rest);
    }
    // Messages can quote what a bad file holds (a corrupt pickle's bytes): keep them on one line.
    line.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// candle appends a backtrace to its errors when `RUST_BACKTRACE` is set (`{inner}\n{backtrace}`),
/// and a message that quotes such errors (cuDNN's list of algorithms that failed) holds them in
/// its middle: an error line keeps the words and drops each run of frames (std's format: a
/// line `   0: <symbol>`, then `  N: <symbol>` and `      at <file>` lines).
fn without_backtrace(text: &str) -> std::borrow::Cow<'_, str> {
    const FIRST_FRAME: &str = "   0: ";
    if !text.lines().any(|l| l.starts_with(FIRST_FRAME)) {
        return text.into();
    }
    let frame = |l: &str| {
        let t = l.trim_start();
        l.len() > t.len() && (t.starts_with("at ") || t.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
    };
    // The line breaks around a run of frames are the backtrace's own: the words on either side
    // join up again.
    let mut kept = String::new();
    let (mut in_frames, mut after_frames) = (false, false);
    for (i, l) in text.lines().enumerate() {
        in_frames = l.starts_with(FIRST_FRAME) || (in_frames && frame(l));
        if in_frames {
            after_frames = true;
            continue;
        }
        if i > 0 && !after_frames {
            kept.push('\n');
        }
        kept.push_str(l);
        after_frames = false;
    }
    kept.into()
}

/// `eprintln!` that ignores a closed stderr (`... 2>&1 | head`): a lost line of report must not
/// turn a finished command into a panic (exit code 101).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use say;

/// `println!` that ignores a closed stdout, as [`say`] does for stderr.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use out;

/// `n` and the noun, singular for 1: "1 step", "3 steps".
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Installs `handler` for Ctrl-C, SIGTERM and SIGHUP (ctrlc's `termination` feature), except
/// for the signals the process was started with ignored: `nohup` (SIGHUP) and a script's
/// background jobs (SIGINT) ask not to be stopped by them, and a handler would override that.
pub fn on_stop_signal(handler: impl FnMut() + Send + 'static) -> Result<()> {
    #[cfg(unix)]
    let ignored: Vec<libc::c_int> = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
        .into_iter()
        .filter(|&sig| {
            // SAFETY: a null new action only reads the current one into `old`.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            let ok = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } == 0;
            ok && old.sa_sigaction == libc::SIG_IGN
        })
        .collect();
    ctrlc::set_handler(handler).context("cannot install the Ctrl-C handler")?;
    #[cfg(unix)]
    for sig in ignored {
        // SAFETY: setting a signal back to "ignore" has no handler to race with.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    Ok(())
}
