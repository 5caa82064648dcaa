//! Human-readable output of a training run.
//!
//! Plain mode (stdout is not a terminal, or `--no-tui`): the training loop prints one line per
//! `log_every` steps (its loss is the mean over those steps; `metrics.csv` has every step),
//! every validation, sample and checkpoint, in order, from the training thread; Burn's
//! renderer is replaced by [`QuietRenderer`] (Burn's own plain renderer prints a debug dump
//! per step). Dashboard mode: Burn's TUI owns the terminal ([`crate::dashboard`]), so these
//! lines only go to `<run>/train.log` (as they do in plain mode) and the samples and the
//! summary ([`RunSummary`]) are shown after training. Burn's own metric files and log
//! (`train/epoch-N/`, `valid/epoch-N/`, `experiment.log`) are not written
//! ([`NoMetricFiles`]): `metrics.csv` and `train.log` hold the same information.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, NumericEntry};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

use crate::checkpoint::TrainState;
use crate::config::{Preset, TrainConfig};
use crate::schedule::WarmupCosine;
use crate::strategy::{EndReason, Sample};
use crate::training::DataInfo;
use nsa_runtime::backend::BackendChoice;

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

/// A Burn metric logger that keeps nothing: registered instead of Burn's file logger, which
/// writes `train/epoch-N/` and `valid/epoch-N/` into the run directory (this crate writes
/// `metrics.csv`). Nothing in this crate reads metrics back from Burn's store.
pub struct NoMetricFiles;

impl MetricLogger for NoMetricFiles {
    fn log(&mut self, _: MetricsUpdate, _: usize, _: &Split) {}
    fn read_numeric(&mut self, _: &str, _: usize, _: &Split) -> Result<Vec<NumericEntry>, String> {
        Ok(Vec::new())
    }
    fn log_metric_definition(&mut self, _: MetricDefinition) {}
    fn log_epoch_summary(&mut self, _: EpochSummary) {}
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub out: PathBuf,
    /// The configuration used.
    pub config: TrainConfig,
    /// The backend choice.
    pub choice: BackendChoice,
    /// The step the session started from.
    pub start_step: u64,
    /// The step reached.
    pub end_step: u64,
    /// Why training ended.
    pub end: EndReason,
    /// The final training state.
    pub state: TrainState,
    /// Wall time of the whole session (seconds): setup, training, validation, checkpoints.
    pub wall_seconds: f64,
    /// Training time of this session (seconds; validation and checkpoints excluded).
    pub train_seconds: f64,
    /// Training tokens of this session.
    pub train_tokens: u64,
    /// Mean training loss over the last evaluation interval.
    pub final_train_loss: Option<f64>,
    /// Data facts.
    pub data: DataInfo,
    /// Samples generated in this session.
    pub samples: Vec<Sample>,
    /// The dashboard was used.
    pub dashboard: bool,
    /// The newest complete checkpoint.
    pub last_checkpoint: Option<u64>,
}

impl RunSummary {
    /// Training throughput of this session.
    pub fn tokens_per_second(&self) -> f64 {
        self.train_tokens as f64 / self.train_seconds.max(1e-9)
    }

    /// The summary lines printed at the end.
    pub fn lines(&self) -> Vec<String> {
        let s = &self.state;
        let end = match &self.end {
            EndReason::Finished => "finished".to_string(),
            EndReason::StoppedAt(k) => format!("stopped after step {k} as requested"),
            EndReason::Interrupted(why) => format!("interrupted ({why})"),
            EndReason::StoppedFromDashboard => "stopped from the dashboard".to_string(),
            EndReason::NonFinite(why) => format!("stopped: {why}"),
            EndReason::Failed(why) => format!("failed: {why}"),
        };
        let mut out = vec![
            format!(
                "training {end}: steps {}..{} of {} in {} ({} of training, {} tokens/s); session wall time {}",
                self.start_step,
                self.end_step,
                s.total_steps,
                duration(self.wall_seconds),
                duration(self.train_seconds),
                thousands(self.tokens_per_second().round() as u64),
                duration(self.wall_seconds),
            ),
            format!(
                "final training loss {} (mean of the last evaluation interval), validation loss {}, best {}",
                fmt_loss(self.final_train_loss),
                fmt_loss(s.last_val_loss),
                match (s.best_val_loss, s.best_step) {
                    (Some(v), Some(k)) => format!("{v:.4} at step {k}"),
                    _ => "-".into(),
                }
            ),
            format!(
                "unigram entropy of the training split: {:.4} nats ({:.3} bits, {} distinct tokens){}",
                self.data.unigram_entropy,
                self.data.unigram_entropy / std::f64::consts::LN_2,
                thousands(self.data.distinct_tokens as u64),
                match s.last_val_loss {
                    Some(v) => format!(
                        "; validation loss is {:.4} nats {} it",
                        (v - self.data.unigram_entropy).abs(),
                        if v < self.data.unigram_entropy { "below" } else { "above" }
                    ),
                    None => String::new(),
                }
            ),
        ];
        if s.non_finite_steps > 0 {
            out.push(format!(
                "{} step(s) with a NaN/Inf loss were skipped",
                s.non_finite_steps
            ));
        }
        let o = &self.out;
        let mut files = vec![format!("metrics {}", o.join("metrics.csv").display())];
        files.push(format!("loss curve {}", o.join("loss.png").display()));
        if o.join("best")
            .join(nsa_runtime::bundle::WEIGHTS_FILE)
            .is_file()
        {
            files.push(format!("best model {}", o.join("best").display()));
        }
        if o.join("last")
            .join(nsa_runtime::bundle::WEIGHTS_FILE)
            .is_file()
        {
            files.push(format!("last model {}", o.join("last").display()));
        }
        out.push(files.join(" | "));
        if !o.join("samples.txt").is_file() {
            let t = &self.config.train;
            out.push(if t.sample_every == 0 {
                "no samples: train.sample_every = 0 turns them off (--sample-every N)".to_string()
            } else {
                format!(
                    "no samples: train.sample_every = {} is more than the {} steps trained \
                     (--sample-every N samples every N steps)",
                    t.sample_every, self.end_step
                )
            });
        }
        if let Some(k) = self.last_checkpoint {
            if self.end_step < s.total_steps {
                out.push(format!(
                    "checkpoint at step {k} in {}: continue with `nsa-train --resume --out {}`",
                    crate::checkpoint::checkpoint_dir(o).display(),
                    o.display()
                ));
            }
        }
        out
    }
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
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

/// Steps of a session after which the time estimate is printed (earlier when they are slow).
pub const ETA_AFTER_STEPS: u64 = 3;
/// An estimate above this many seconds comes with a warning.
pub const SLOW_RUN_SECONDS: f64 = 24.0 * 3600.0;

/// The time estimate printed once after the first steps of a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The global step reached.
    pub step: u64,
    /// The run's steps.
    pub total: u64,
    /// Seconds per optimizer step (validation not included).
    pub per_step: f64,
}

impl Estimate {
    /// The estimate at global `step` of `total`, after `done` steps of this session that took
    /// `seconds` of training, the first of them `first` (start-up costs, left out when there
    /// are later steps): `None` before [`ETA_AFTER_STEPS`] steps (unless they took half a
    /// minute) and at the end.
    pub fn after(step: u64, total: u64, done: u64, seconds: f64, first: f64) -> Option<Self> {
        if done == 0 || step >= total || (done < ETA_AFTER_STEPS && seconds < 30.0) {
            return None;
        }
        let per_step = if done > 1 {
            (seconds - first) / (done - 1) as f64
        } else {
            seconds
        };
        Some(Self {
            step,
            total,
            per_step,
        })
    }

    /// Seconds of training left.
    pub fn remaining(&self) -> f64 {
        self.per_step * self.total.saturating_sub(self.step) as f64
    }

    /// `step k/N: x per step, ETA …`, and a warning with `hint` when that is over a day.
    pub fn lines(&self, hint: &str) -> Vec<String> {
        let left = self.remaining();
        let mut lines = vec![format!(
            "step {}/{}: {} per step, ETA {} for the remaining {} steps (validation not included)",
            self.step,
            self.total,
            per_step(self.per_step),
            eta(left),
            thousands(self.total - self.step),
        )];
        if left > SLOW_RUN_SECONDS {
            lines.push(format!(
                "warning: at this speed the run needs about {} more; {hint}",
                eta(left)
            ));
        }
        lines
    }
}

/// Tokens per micro-batch from which [`start_notes`] mentions `--recompute`.
pub const LONG_SEQUENCE_TOKENS: usize = 16_384;

/// The notes printed before the first step of a session at `step`, and what to do about a
/// slow run (the hint of [`Estimate::lines`]):
///
/// 1. a run longer than its learning-rate schedule (extended on resume) runs the extra steps
///    at the schedule's final rate; a shorter one ends before the schedule does;
/// 2. a GPU recipe (the `seed` model size, 10,000 steps or more) on the CPU is flagged at
///    once: a bare `nsa-train` on a machine without a GPU would otherwise start a run of
///    months with no word about it;
/// 3. micro-batches of [`LONG_SEQUENCE_TOKENS`] tokens or more without `--recompute` are
///    told about it.
pub fn start_notes(config: &TrainConfig, step: u64, cpu: bool) -> (Vec<String>, String) {
    let t = &config.train;
    let schedule = WarmupCosine::from_config(&config.optim, t.steps);
    let planned = schedule.planned_steps();
    let mut notes = Vec::new();
    if planned < t.steps && step < t.steps {
        notes.push(format!(
            "learning rate: the run keeps the schedule of the {planned} steps it was planned with; \
             steps {}-{} run at its final learning rate {:.2e}",
            planned + 1,
            t.steps,
            schedule.final_lr()
        ));
    } else if planned > t.steps && step < t.steps {
        notes.push(format!(
            "learning rate: the run keeps the schedule of the {planned} steps it was planned with \
             and now ends at step {}, before the schedule does",
            t.steps
        ));
    }
    let small = config.model.dim < TrainConfig::preset(Preset::Seed).model.dim;
    if cpu && !small && t.steps >= 10_000 && step < t.steps {
        notes.push(format!(
            "warning: this is a GPU recipe ({} steps of a dim-{} model) and it runs on the CPU, \
             where it takes weeks; for a first run on the CPU use --preset tiny (a time estimate \
             follows after the first steps)",
            thousands(t.steps),
            config.model.dim
        ));
    }
    if t.batch_size * config.data.seq_len >= LONG_SEQUENCE_TOKENS && !t.recompute {
        notes.push(format!(
            "memory: micro-batches of {} x {} tokens keep every block's activations for the \
             backward pass; --recompute keeps one block's (about a third more work, the same \
             gradients)",
            t.batch_size,
            thousands(config.data.seq_len as u64)
        ));
    }
    let hint = match (cpu, small) {
        (true, false) => "for a first run on the CPU use --preset tiny, or lower --steps",
        (true, true) => "lower --steps, or train on a GPU (--backend cuda or wgpu)",
        (false, _) => "lower --steps, or use a smaller model",
    };
    (notes, hint.to_string())
}

/// A time estimate in words: `45 s`, `12 min`, `3 h 20 min`, `14 days`.
pub fn eta(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=99 => format!("{s} s"),
        100..=5999 => format!("{} min", (s + 30) / 60),
        6000..=172_799 => format!("{} h {} min", s / 3600, s / 60 % 60),
        _ => format!("{} days", (s + 43_200) / 86_400),
    }
}

/// Seconds per step: `0.042 s`, `12.3 s`, `2 min 5 s`.
pub fn per_step(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{seconds:.3} s")
    } else if seconds < 100.0 {
        format!("{seconds:.1} s")
    } else {
        let s = seconds.round() as u64;
        format!("{} min {} s", s / 60, s % 60)
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
        assert_eq!(eta(45.2), "45 s");
        assert_eq!(eta(720.0), "12 min");
        assert_eq!(eta(12_000.0), "3 h 20 min");
        assert_eq!(eta(100_000.0 * 54.0), "63 days");
        assert_eq!(per_step(12.34), "12.3 s");
        assert_eq!(per_step(0.0421), "0.042 s");
    }

    #[test]
    fn time_estimates() {
        assert_eq!(Estimate::after(2, 100, 2, 10.0, 5.0), None);
        assert_eq!(Estimate::after(100, 100, 100, 10.0, 5.0), None);
        // the first step (start-up) is left out
        let e = Estimate::after(3, 100, 3, 12.0, 8.0).unwrap();
        assert_eq!(e.per_step, 2.0);
        assert_eq!(e.remaining(), 194.0);
        let lines = e.lines("use a GPU");
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("step 3/100: 2.0 s per step, ETA 3 min"),
            "{lines:?}"
        );
        // a slow first step is reported at once; the seed preset on the CPU: months
        let e = Estimate::after(1, 100_000, 1, 54.0, 54.0).unwrap();
        let lines = e.lines("for a first run on the CPU use --preset tiny");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("ETA 62 days"), "{lines:?}");
        assert!(lines[1].starts_with("warning: ") && lines[1].ends_with("--preset tiny"));

        // the seed preset on the CPU is flagged before the first step, not on a GPU
        let seed = TrainConfig::preset(Preset::Seed);
        let (notes, hint) = start_notes(&seed, 0, true);
        assert!(
            notes[0].starts_with("warning: this is a GPU recipe"),
            "{notes:?}"
        );
        assert!(hint.contains("--preset tiny"));
        assert!(start_notes(&seed, 0, false).0.is_empty());
        let tiny = TrainConfig::preset(Preset::Tiny);
        assert!(start_notes(&tiny, 0, true).0.is_empty());

        // long micro-batches are told about --recompute, unless it is on
        let mut long = TrainConfig::preset(Preset::Seed);
        long.data.seq_len = 65_536;
        long.train.batch_size = 1;
        let notes = start_notes(&long, 0, false).0;
        assert!(
            notes.len() == 1
                && notes[0].contains("1 x 65,536 tokens")
                && notes[0].contains("--recompute"),
            "{notes:?}"
        );
        long.train.recompute = true;
        assert!(start_notes(&long, 0, false).0.is_empty());
    }
}
