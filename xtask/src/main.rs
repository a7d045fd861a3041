//! `cargo xtask`: the command line of the DDPM anime-faces pipeline.
//!
//! This binary only parses flags, sets up logging, and calls the library crates. Every
//! subcommand lives in its own module; errors become one line on stderr and exit code 1
//! (2 for bad usage, which clap handles).

// The flags' doc comments are clap's --help text, where `<out>` placeholders are meant literally.
#![allow(rustdoc::invalid_html_tags)]

use clap::{Parser, Subcommand};
use common::say;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cmd_bench;
mod cmd_data;
mod cmd_demo;
mod cmd_import;
mod cmd_sample;
mod cmd_selftest;
mod cmd_train;
mod common;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "DDPM on 64x64 anime faces: data, training, sampling", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resize the raw Kaggle images to 64x64 and pack them for training.
    PrepareData(cmd_data::PrepareDataArgs),
    /// Measure prepare-data throughput against the reference's PIL loop.
    BenchData(cmd_data::BenchDataArgs),
    /// Import the reference's PyTorch Lightning checkpoint (last.ckpt).
    ImportCheckpoint(cmd_import::ImportArgs),
    /// Train the UNet (resumable).
    Train(cmd_train::TrainArgs),
    /// Sample faces, draw the diffusion process, run the recover experiment.
    Sample(cmd_sample::SampleArgs),
    /// End-to-end demo on a generated dataset: train a tiny model a few minutes on CPU and sample.
    Demo(cmd_demo::DemoArgs),
    /// Benchmarks: training step, forward pass, sampling (ours vs the PyTorch reference).
    Bench(cmd_bench::BenchArgs),
    /// Check this build on a device (e.g. a GPU) against the PyTorch parity fixtures.
    SelfTest(cmd_selftest::SelfTestArgs),
}

/// Keep freed memory instead of returning it to the OS: a training step frees and re-allocates
/// the same few hundred MB each iteration, and re-faulting those pages cost ~15% of a CPU step.
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option before any threads are started.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Candle's CPU thread pool spins 25,000 times after each elementwise op before parking. Our
/// convolution, norm and softmax kernels run on rayon's threads in between, and on a small
/// machine that spinning takes their cores: 2,000 spins measured 5-10% faster training steps of
/// the small benchmark model on 2 cores, with less CPU time (docs/BENCHMARKS.md).
fn shorter_candle_pool_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Before any thread starts: candle reads it when its pool is first built.
        std::env::set_var(VAR, "2000");
    }
}

fn main() {
    keep_freed_memory();
    shorter_candle_pool_spin();
    common::init_logging();
    let cli = Cli::parse();
    let memory_advice = out_of_memory_advice(&cli.command);
    let result = match cli.command {
        Command::PrepareData(a) => cmd_data::prepare(a),
        Command::BenchData(a) => cmd_data::bench(a),
        Command::ImportCheckpoint(a) => cmd_import::run(a),
        Command::Train(a) => cmd_train::run(a),
        Command::Sample(a) => cmd_sample::run(a),
        Command::Demo(a) => cmd_demo::run(a),
        Command::Bench(a) => cmd_bench::run(a),
        Command::SelfTest(a) => cmd_selftest::run(a),
    };
    if let Err(err) = result {
        say!("error: {}", with_memory_advice(common::one_line(&err), memory_advice));
        std::process::exit(1);
    }
}

const OUT_OF_MEMORY: &str = "the GPU is out of memory";
const ANOTHER_PROCESS: &str = "another process may hold it (nvidia-smi lists them)";

/// The error line, with what to change when the GPU ran out of memory.
fn with_memory_advice(line: String, advice: &str) -> String {
    // A bench child's error line, quoted by its parent, already has the advice.
    if !is_device_out_of_memory(&line) || line.contains(OUT_OF_MEMORY) {
        return line;
    }
    // Full before we allocated anything: our flags would not help.
    let advice = if line.contains(common::CANNOT_OPEN_CUDA) { ANOTHER_PROCESS } else { advice };
    format!("{line} ({OUT_OF_MEMORY}: {advice})")
}

/// The CUDA libraries' own words for a failed device allocation, as cudarc prints them.
fn is_device_out_of_memory(line: &str) -> bool {
    ["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"].iter().any(|s| line.contains(s))
}

/// Which flag lowers the memory a command needs: the driver's error names none.
fn out_of_memory_advice(command: &Command) -> &'static str {
    match command {
        Command::Train(_) => "--micro-batch-size N (under the batch size) needs less for the same training; so do --precision bf16 and a smaller --batch-size",
        Command::Sample(_) => "a smaller --batch needs less",
        Command::Bench(_) => "the batch-128 and batch-256 cases need the most: pick others with --cases",
        _ => ANOTHER_PROCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::{is_device_out_of_memory, with_memory_advice};
    use crate::common::one_line;
    use anyhow::Context;

    #[test]
    fn a_device_allocation_failure_is_recognised_from_each_library() {
        // As cudarc's errors print (their Display is their Debug), behind our contexts.
        for line in [
            "training failed: step 12: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "sampling: CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
            "training failed: in CUDA op: conv2d backward-data: CudnnError(CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED)",
        ] {
            assert!(is_device_out_of_memory(line), "{line}");
        }
        for line in ["DriverError(CUDA_ERROR_LAUNCH_FAILED, \"unspecified launch failure\")", "CudnnError(CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED)", "cannot read x: out of memory"] {
            assert!(!is_device_out_of_memory(line), "{line}");
        }
    }

    #[test]
    fn error_line_leaves_out_candles_backtraces() {
        // What candle makes of an error under RUST_BACKTRACE=1.
        let with_bt = |m: &str| candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg(m.into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert!(with_bt(oom).to_string().contains("\n   0: "), "a captured backtrace has frames");
        // Behind a library error that prints its source (trainer's Candle variant) and our context.
        let e = Err::<(), _>(trainer::TrainError::from(with_bt(oom))).context("training failed after step 3").unwrap_err();
        assert_eq!(one_line(&e), format!("training failed after step 3: {oom}"));
        // Quoted in the middle of a message (cuDNN's algorithms that failed): the words after
        // each backtrace stay, and so does the advice they call for.
        let listed = anyhow::anyhow!("cuDNN: no algorithm ran ({}; {})", with_bt("Gemm: CUDNN_STATUS_NOT_SUPPORTED"), with_bt(&format!("Fft: 4096 bytes of workspace: {oom}")));
        let line = one_line(&listed);
        assert_eq!(line, format!("cuDNN: no algorithm ran (Gemm: CUDNN_STATUS_NOT_SUPPORTED; Fft: 4096 bytes of workspace: {oom})"));
        assert!(with_memory_advice(line, "a smaller --batch").ends_with("(the GPU is out of memory: a smaller --batch)"));
        // Our own line breaks stay (escaped): only frames go.
        assert_eq!(one_line(&anyhow::anyhow!("a\n  b: c")), "a\\n  b: c");
    }

    #[test]
    fn memory_advice_is_given_once_and_fits_where_memory_ran_out() {
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let step = format!("training failed after step 3: {oom}");
        assert_eq!(with_memory_advice(step.clone(), "use less"), format!("{step} (the GPU is out of memory: use less)"));
        // bench quotes its child's line, advice included.
        let child = with_memory_advice(format!("train128: {oom}"), "pick other cases");
        let parent = format!("bench: case train128 failed: {child}");
        assert_eq!(with_memory_advice(parent.clone(), "pick other cases"), parent);
        let open = format!("cannot open CUDA device 0: {oom}");
        assert!(with_memory_advice(open, "a smaller --batch-size").ends_with("(the GPU is out of memory: another process may hold it (nvidia-smi lists them))"));
        assert_eq!(with_memory_advice("no such file".into(), "x"), "no such file");
    }

    #[test]
    fn error_line_escapes_control_characters() {
        let e = anyhow::anyhow!("bad pickle opcode in \"a\nb\r\u{1b}[31m\"");
        assert_eq!(one_line(&e), "bad pickle opcode in \"a\\nb\\r\\u{1b}[31m\"");
    }

    #[test]
    fn error_line_says_each_thing_once() {
        let os = std::io::Error::from(std::io::ErrorKind::NotFound);
        let lib = trainer::TrainError::Checkpoint(format!("cannot read config mini64: {os}"));
        let e = Err::<(), _>(lib).context("cannot start the run in runs/x").unwrap_err();
        assert_eq!(one_line(&e), format!("cannot start the run in runs/x: checkpoint: cannot read config mini64: {os}"));
        // A library error that prints its source and gives it as `source()` too (thiserror's
        // `source` field): said once.
        #[derive(Debug)]
        struct Io(std::io::Error);
        impl std::fmt::Display for Io {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "cannot read config mini64: {}", self.0)
            }
        }
        impl std::error::Error for Io {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Io(std::io::Error::from(std::io::ErrorKind::IsADirectory)));
        assert_eq!(one_line(&e), format!("cannot read config mini64: {}", std::io::Error::from(std::io::ErrorKind::IsADirectory)));
        // A context ending with the path the error starts with.
        let e = Err::<(), _>(anyhow::anyhow!("a.png: not a safetensors model file")).context("loading checkpoint a.png").unwrap_err();
        assert_eq!(one_line(&e), "loading checkpoint a.png: not a safetensors model file");
        // Nothing to merge: the plain chain.
        let e = Err::<(), _>(anyhow::anyhow!("inner")).context("outer").unwrap_err();
        assert_eq!(one_line(&e), "outer: inner");
    }
}
