//! `cargo xtask demo`: the README's first command (no download, CPU, a few minutes).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::common;
use crate::common::{say, out};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Training time budget in minutes.
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    minutes: f64,
    /// Generated training images.
    #[arg(long, default_value_t = 512, value_parser = common::positive)]
    images: usize,
    /// Images in the sample grid.
    #[arg(long, default_value_t = 64, value_parser = common::positive)]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: DemoArgs) -> Result<()> {
    anyhow::ensure!(a.minutes.is_finite() && a.minutes > 0.0, "--minutes must be a number > 0, got {}", a.minutes);
    let device = common::parse_device(&a.device)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    common::on_stop_signal(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        say!("\nCtrl-C: stopping training early, then sampling (press again to quit)");
    })?;
    let opts = trainer::demo::DemoOptions {
        out: a.out.clone(),
        minutes: a.minutes,
        images: a.images,
        samples: a.samples,
        seed: a.seed,
        progress: true,
    };
    let r = trainer::demo::run_demo(&opts, &device, stop).context("demo failed")?;
    let s = &r.summary;
    say!(
        "trained {} ({}) in {:.0} s, {:.1} images/s; loss {} -> {}",
        common::count(s.steps, "step"),
        common::count(s.epochs, "epoch"),
        s.session_seconds,
        s.images_per_s,
        r.first_loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "-".into()),
        r.last_loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "-".into()),
    );
    out!("samples:       {}", r.samples.display());
    out!("training data: {}", r.data_grid.display());
    out!("loss curve:    {}", r.loss.display());
    out!("run folder:    {}  ({} sample --checkpoint {})", r.run_dir.display(), common::ALIAS, r.run_dir.display());
    Ok(())
}
