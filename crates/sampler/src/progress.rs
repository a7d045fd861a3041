//! Progress reporting for long sampling runs: an indicatif bar (steps/s and ETA) or nothing.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes. One "step" is one network evaluation of one batch; the library sets
/// the total when it knows how many there will be.
#[derive(Clone, Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
}

impl Progress {
    /// No output (tests, benchmarks).
    pub fn hidden() -> Self {
        Self { bar: None, label: String::new() }
    }

    /// A bar on stderr (hidden automatically when stderr is not a terminal), prefixed by `label`.
    pub fn stderr(label: impl Into<String>) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>14} {wide_bar} {pos}/{len} steps, {per_sec}, ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let label = label.into();
        bar.set_prefix(label.clone());
        Self { bar: Some(bar), label }
    }

    /// The same kind of output (bar or nothing) with another label.
    pub fn relabel(&self, label: impl Into<String>) -> Self {
        match self.bar {
            Some(_) => Self::stderr(label),
            None => Self::hidden(),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn begin(&self, total: usize) {
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
            b.set_position(0);
            b.reset_eta();
        }
    }

    pub(crate) fn inc(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
