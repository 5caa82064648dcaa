//! Learner metrics Burn does not have in the form a language model needs — perplexity from
//! the loss already computed (Burn's `PerplexityMetric` would recompute a log-softmax over the
//! whole `[tokens, vocabulary]` logits), tokens per second and the gradient norm — and the
//! metrics CSV (`metrics.csv`) of a run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::train::metric::{
    format_float, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};

/// Input of [`PerplexityMetric`]: a mean loss (nats) over `tokens` tokens.
pub struct PerplexityInput {
    /// Mean next-token cross-entropy.
    pub loss: f64,
    /// Tokens it was averaged over.
    pub tokens: usize,
}

/// Perplexity `exp(loss)`: per step (current) and token-weighted over the epoch (running).
#[derive(Clone)]
pub struct PerplexityMetric {
    name: MetricName,
    current: f64,
    sum_nll: f64,
    tokens: usize,
}

impl Default for PerplexityMetric {
    fn default() -> Self {
        Self::new()
    }
}

impl PerplexityMetric {
    /// A new metric.
    pub fn new() -> Self {
        Self {
            name: Arc::new("Perplexity".to_string()),
            current: f64::NAN,
            sum_nll: 0.0,
            tokens: 0,
        }
    }

    fn running(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            (self.sum_nll / self.tokens as f64).exp()
        }
    }
}

impl Metric for PerplexityMetric {
    type Input = PerplexityInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &PerplexityInput, _: &MetricMetadata) -> SerializedEntry {
        self.current = item.loss.exp();
        if item.loss.is_finite() {
            self.sum_nll += item.loss * item.tokens as f64;
            self.tokens += item.tokens;
        }
        let formatted = format!(
            "epoch {} - batch {}",
            format_float(self.running(), 2),
            format_float(self.current, 2)
        );
        SerializedEntry::new(formatted, self.current.to_string())
    }

    fn clear(&mut self) {
        *self = Self {
            name: self.name.clone(),
            ..Self::new()
        };
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: false,
        }
        .into()
    }
}

impl Numeric for PerplexityMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Value(self.current)
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Value(self.running())
    }
}

/// Input of [`ThroughputMetric`].
pub struct ThroughputInput {
    /// Tokens processed by the step.
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
}

/// Training throughput in tokens per second: of the last step (current) and over the epoch
/// (running).
#[derive(Clone)]
pub struct ThroughputMetric {
    name: MetricName,
    current: f64,
    tokens: f64,
    seconds: f64,
}

impl Default for ThroughputMetric {
    fn default() -> Self {
        Self::new()
    }
}

impl ThroughputMetric {
    /// A new metric.
    pub fn new() -> Self {
        Self {
            name: Arc::new("Tokens per Second".to_string()),
            current: f64::NAN,
            tokens: 0.0,
            seconds: 0.0,
        }
    }

    fn running(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens / self.seconds
        } else {
            f64::NAN
        }
    }
}

impl Metric for ThroughputMetric {
    type Input = ThroughputInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &ThroughputInput, _: &MetricMetadata) -> SerializedEntry {
        if item.seconds > 0.0 {
            self.current = item.tokens as f64 / item.seconds;
            self.tokens += item.tokens as f64;
            self.seconds += item.seconds;
        }
        let formatted = format!("epoch {:.0} - batch {:.0}", self.running(), self.current);
        SerializedEntry::new(formatted, self.current.to_string())
    }

    fn clear(&mut self) {
        *self = Self {
            name: self.name.clone(),
            ..Self::new()
        };
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some("tokens/s".to_string()),
            higher_is_better: true,
        }
        .into()
    }
}

impl Numeric for ThroughputMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Value(self.current)
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Value(self.running())
    }
}

/// Input of [`GradNormMetric`].
pub struct GradNormInput {
    /// Global L2 norm before clipping.
    pub norm: f64,
}

/// Global gradient norm before clipping.
#[derive(Clone)]
pub struct GradNormMetric {
    name: MetricName,
    current: f64,
    sum: f64,
    count: usize,
}

impl Default for GradNormMetric {
    fn default() -> Self {
        Self::new()
    }
}

impl GradNormMetric {
    /// A new metric.
    pub fn new() -> Self {
        Self {
            name: Arc::new("Gradient Norm".to_string()),
            current: f64::NAN,
            sum: 0.0,
            count: 0,
        }
    }

    fn running(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }
}

impl Metric for GradNormMetric {
    type Input = GradNormInput;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &GradNormInput, _: &MetricMetadata) -> SerializedEntry {
        self.current = item.norm;
        if item.norm.is_finite() {
            self.sum += item.norm;
            self.count += 1;
        }
        let formatted = format!(
            "epoch {} - batch {}",
            format_float(self.running(), 3),
            format_float(self.current, 3)
        );
        SerializedEntry::new(formatted, self.current.to_string())
    }

    fn clear(&mut self) {
        *self = Self {
            name: self.name.clone(),
            ..Self::new()
        };
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: false,
        }
        .into()
    }
}

impl Numeric for GradNormMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Value(self.current)
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Value(self.running())
    }
}

// ------------------------------------------------------------------------------ CSV

/// Header of `metrics.csv`.
pub const CSV_HEADER: &str =
    "step,split,loss,perplexity,lr,grad_norm,tokens_per_s,tokens_seen,elapsed_s,non_finite,indexer_loss";

/// One row of `metrics.csv`: a training step (`split = train`) or an evaluation
/// (`split = valid`, after the step).
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRow {
    /// Optimizer steps done.
    pub step: u64,
    /// `train` or `valid`.
    pub split: String,
    /// Mean loss (nats).
    pub loss: f64,
    /// Learning rate of the step (training rows).
    pub lr: Option<f64>,
    /// Gradient norm before clipping (training rows).
    pub grad_norm: Option<f64>,
    /// Tokens per second of the step (training rows).
    pub tokens_per_s: Option<f64>,
    /// Training tokens processed so far.
    pub tokens_seen: u64,
    /// Training wall time so far (seconds, validation excluded).
    pub elapsed_s: f64,
    /// The step's loss or gradient was NaN/Inf and it was skipped.
    pub non_finite: bool,
    /// A DSA model's indexer loss (training rows; [`crate::lm::LmOutput::indexer_loss`]).
    pub indexer_loss: Option<f64>,
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v}")).unwrap_or_default()
}

impl CsvRow {
    /// The CSV line (without newline).
    pub fn to_line(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{:.3},{},{}",
            self.step,
            self.split,
            self.loss,
            self.loss.exp(),
            opt(self.lr),
            opt(self.grad_norm),
            opt(self.tokens_per_s),
            self.tokens_seen,
            self.elapsed_s,
            self.non_finite as u8,
            opt(self.indexer_loss)
        )
    }

    /// Parses a line written by [`CsvRow::to_line`] (or of a run from before the indexer
    /// loss column: ten fields).
    pub fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 10 && f.len() != 11 {
            return None;
        }
        let num = |s: &str| -> Option<Option<f64>> {
            if s.is_empty() {
                Some(None)
            } else {
                s.parse().ok().map(Some)
            }
        };
        Some(Self {
            step: f[0].parse().ok()?,
            split: f[1].to_string(),
            loss: f[2].parse().ok()?,
            lr: num(f[4])?,
            grad_norm: num(f[5])?,
            tokens_per_s: num(f[6])?,
            tokens_seen: f[7].parse().ok()?,
            elapsed_s: f[8].parse().ok()?,
            non_finite: f[9] == "1",
            indexer_loss: match f.get(10) {
                Some(v) => num(v)?,
                None => None,
            },
        })
    }
}

/// Appends rows to `metrics.csv`.
pub struct CsvLog {
    path: PathBuf,
    file: fs::File,
}

impl CsvLog {
    /// Opens the CSV of a run that continues after step `keep_until` (0 for a new run): rows of
    /// later steps (written after that checkpoint by an interrupted run) are dropped — the
    /// file is rewritten atomically — so a resumed run's CSV equals an uninterrupted one's.
    pub fn open(path: &Path, keep_until: u64) -> std::io::Result<Self> {
        let mut text = String::from(CSV_HEADER);
        text.push('\n');
        if keep_until > 0 {
            if let Ok(old) = fs::read_to_string(path) {
                for line in old.lines().skip(1) {
                    if CsvRow::parse(line).is_some_and(|r| r.step <= keep_until) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
        }
        nsa_runtime::bundle::atomic_write(path, text.as_bytes())?;
        let file = fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends a row.
    pub fn append(&mut self, row: &CsvRow) -> std::io::Result<()> {
        writeln!(self.file, "{}", row.to_line())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every row of a metrics CSV.
pub fn read_csv(path: &Path) -> std::io::Result<Vec<CsvRow>> {
    Ok(fs::read_to_string(path)?
        .lines()
        .skip(1)
        .filter_map(CsvRow::parse)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_round_trip_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let row = |step, split: &str| CsvRow {
            step,
            split: split.to_string(),
            loss: 2.5,
            lr: (split == "train").then_some(1e-3),
            grad_norm: (split == "train").then_some(0.7),
            tokens_per_s: (split == "train").then_some(1234.5),
            tokens_seen: step * 100,
            elapsed_s: step as f64,
            non_finite: false,
            indexer_loss: (split == "train").then_some(0.25),
        };
        let mut log = CsvLog::open(&path, 0).unwrap();
        for s in 1..=6 {
            log.append(&row(s, "train")).unwrap();
            if s % 3 == 0 {
                log.append(&row(s, "valid")).unwrap();
            }
        }
        drop(log);
        let rows = read_csv(&path).unwrap();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows[3], row(3, "valid"));
        let mut log = CsvLog::open(&path, 3).unwrap();
        log.append(&row(4, "train")).unwrap();
        drop(log);
        let rows = read_csv(&path).unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows.last().unwrap(), &row(4, "train"));
    }
}
