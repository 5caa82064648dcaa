//! Human-readable output of a training run.
//!
//! Plain mode (stdout is not a terminal, or `--no-tui`): the training loop prints one line per
//! `log_every` steps, every validation, sample and checkpoint, in order, from the training
//! thread; Burn's renderer is replaced by [`QuietRenderer`] (Burn's own plain renderer prints
//! a debug dump per step). Dashboard mode: Burn's TUI owns the terminal, so these lines only
//! go to `<run>/train.log` (as they do in plain mode) and the samples are shown after
//! training.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::train::metric::MetricDefinition;
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

/// Writes run messages to `<run>/train.log` and, in plain mode, to stdout.
pub struct Reporter {
    echo: bool,
    file: Mutex<Option<File>>,
    path: Option<PathBuf>,
}

impl Reporter {
    /// Appends to `log` (when given); prints to stdout when `echo`.
    pub fn new(log: Option<&Path>, echo: bool) -> Self {
        let file = log.and_then(|p| {
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            OpenOptions::new().create(true).append(true).open(p).ok()
        });
        Self {
            echo,
            file: Mutex::new(file),
            path: log.map(Path::to_path_buf),
        }
    }

    /// A reporter that only prints.
    pub fn stdout() -> Self {
        Self::new(None, true)
    }

    /// Whether lines are printed.
    pub fn echoes(&self) -> bool {
        self.echo
    }

    /// The log file.
    pub fn log_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// One message (may span several lines).
    pub fn line(&self, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{msg}");
            let _ = out.flush();
        }
        if let Some(f) = self.file.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{msg}");
        }
    }

    /// Switches to another log file (once the run directory is known).
    pub fn set_log(&mut self, log: &Path) {
        let fresh = Self::new(Some(log), self.echo);
        *self = fresh;
    }
}

/// A Burn renderer that draws nothing (plain mode: the training loop prints the log lines).
pub struct QuietRenderer;

impl MetricsRendererTraining for QuietRenderer {
    fn update_train(&mut self, _: MetricState) {}
    fn update_valid(&mut self, _: MetricState) {}
    fn render_train(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
    fn render_valid(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
}

impl MetricsRendererEvaluation for QuietRenderer {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for QuietRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _: MetricDefinition) {}
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `83.4` seconds → `1:23`, `3723` → `1:02:03`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(duration(83.4), "1:23");
        assert_eq!(duration(3723.0), "1:02:03");
    }
}
