//! `metrics.jsonl`: one JSON object per line.
//!
//! `"kind": "step"` lines come every `log.every_steps` steps (`loss` is the mean training loss
//! since the previous line); `"kind": "epoch"` lines at each epoch end (`loss`: the epoch's mean
//! training loss, `val_loss` when validation is on).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// (step, value) points.
pub type Curve = Vec<(u64, f64)>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub kind: String,
    pub step: u64,
    /// The (0-based) epoch the step belongs to, or that ended.
    pub epoch: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    pub images_per_s: f64,
    /// Seconds of training so far (all sessions).
    pub time_s: f64,
}

pub struct MetricsLog {
    path: PathBuf,
    pub records: Vec<Record>,
}

impl MetricsLog {
    /// Opens `<run>/metrics.jsonl`, keeping only the records `keep` accepts (on resume: those
    /// up to the checkpoint), and rewrites the file with them.
    pub fn open(run: &Path, keep: impl Fn(&Record) -> bool) -> Result<Self, TrainError> {
        let path = run.join(METRICS_FILE);
        let mut records = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            let mut unreadable = 0;
            for (i, line) in lines.iter().enumerate() {
                match serde_json::from_str::<Record>(line) {
                    Ok(r) if keep(&r) => records.push(r),
                    Ok(_) => {}
                    // A kill during an append leaves half a last line: expected, and dropped.
                    Err(_) if i + 1 < lines.len() => unreadable += 1,
                    Err(_) => {}
                }
            }
            if unreadable > 0 {
                tracing::warn!("{}: dropped {unreadable} unreadable line(s) while cutting it back to the checkpoint", path.display());
            }
        }
        let mut out = String::new();
        for r in &records {
            out.push_str(&serde_json::to_string(r).expect("record serialises"));
            out.push('\n');
        }
        unet::weights::write_atomic(&path, out.as_bytes()).map_err(|e| TrainError::Invalid(e.to_string()))?;
        Ok(Self { path, records })
    }

    pub fn push(&mut self, r: Record) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| TrainError::io("cannot open", &self.path, e))?;
        let line = serde_json::to_string(&r).expect("record serialises");
        writeln!(f, "{line}").map_err(|e| TrainError::io("cannot write", &self.path, e))?;
        self.records.push(r);
        Ok(())
    }

    /// (step, loss) of the step lines and (step, val_loss) of the epoch lines.
    pub fn curves(&self) -> (Curve, Curve) {
        let train = self.records.iter().filter(|r| r.kind == "step").map(|r| (r.step, r.loss)).collect();
        let val = self.records.iter().filter_map(|r| r.val_loss.map(|v| (r.step, v))).collect();
        (train, val)
    }
}
