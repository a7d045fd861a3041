//! `cargo xtask`: the command line of the DDPM anime-faces pipeline.
//!
//! This binary only parses flags, sets up logging, and calls the library crates. Every
//! subcommand lives in its own module; errors become one line on stderr and exit code 1
//! (2 for bad usage, which clap handles).

use clap::{Parser, Subcommand};

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
        // One line: the chain of contexts joined, as ripgrep and cargo do.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
