//! The measured rows: what a worker reports and the JSON record holds (the fields of
//! `scripts/bench_reference.py`), the job a worker runs, and the printed tables.

use nsa_infer::bench_cli::LayerArgs;
use nsa_model::kernels::KernelOptions;
use nsa_runtime::backend::{BackendKind, Precision};
use serde::{Deserialize, Serialize};

/// One measured row, as written to JSON (same fields as `bench_reference.py`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Row {
    pub suite: String,
    /// nsa, nsa-tensor, full, dsa (ours); ref-nsa, ref-nsa-triton, sdpa (PyTorch)
    #[serde(rename = "impl")]
    pub imp: String,
    pub precision: String,
    pub seq: usize,
    pub batch: usize,
    /// fwd, fwd+bwd, train-step, check
    pub pass: String,
    /// ok, oom, error, timeout, skipped
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_median: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ms_all: Vec<f64>,
    /// First (cold) run, not included in the median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_first: Option<f64>,
    /// Bytes the device allocator reserved after the row: its peak, as pools keep their pages
    /// (compare with PyTorch's `max_memory_reserved`; CubeCL 0.10 keeps no peak of the bytes
    /// in live tensors, PyTorch's `max_memory_allocated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_mem_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds from process start to the end of the first step within 10% of the median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_s: Option<f64>,
    /// Lower bound from the FLOP count at `flop_peak_tflops`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flop_floor_ms: Option<f64>,
    /// The peak the floor assumes: the H100/H200 SXM dense tensor-core rate of the row's
    /// precision ([`crate::measure::peak_tflops`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flop_peak_tflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_err: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_err: Option<f64>,
    /// Whether every compared value was finite (JSON has no NaN or infinity: a non-finite
    /// error is written as null beside `finite: false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finite: Option<bool>,
    /// Fused kernels were registered for the backend of the row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// What a worker process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub suite: String,
    pub imp: String,
    #[serde(with = "as_string")]
    pub precision: Precision,
    pub seq: usize,
    pub batch: usize,
    pub pass: String,
    pub warmup: usize,
    pub runs: usize,
    pub layer: LayerArgs,
    #[serde(with = "as_string")]
    pub backend: BackendKind,
    pub device: Option<usize>,
    /// The check suite's variants.
    #[serde(default)]
    pub variants: Vec<String>,
    /// How the worker's model runs (from its environment and the implementation; not sent).
    #[serde(skip)]
    pub options: KernelOptions,
}

/// Serde through `Display` / `FromStr`.
pub mod as_string {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr<Err = String>,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

pub fn row_of(job: &Job) -> Row {
    Row {
        suite: job.suite.clone(),
        imp: job.imp.clone(),
        precision: job.precision.to_string(),
        seq: job.seq,
        batch: job.batch,
        pass: job.pass.clone(),
        ..Default::default()
    }
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

pub fn print_row(r: &Row) {
    let time = r
        .ms_median
        .map(|m| format!("{m:10.2} ms"))
        .unwrap_or_else(|| format!("{:>13}", r.status));
    let extra = match (&r.tokens_per_s, &r.max_rel_err) {
        (Some(t), _) => format!("{t:10.0} tok/s"),
        (_, Some(e)) => format!("rel err {e:.2e}"),
        _ => String::new(),
    };
    eprintln!(
        "  {:6} {:10} {:5} {:8} seq {:6} x{:<3} {time} {:>8} GiB {extra} {}",
        r.suite,
        r.imp,
        r.precision,
        r.pass,
        r.seq,
        r.batch,
        r.reserved_mem_bytes.map(gib).unwrap_or_else(|| "-".into()),
        r.note
    );
}

pub fn print_table(rows: &[Row]) {
    let layer: Vec<&Row> = rows.iter().filter(|r| r.suite == "layer").collect();
    if !layer.is_empty() {
        println!("## One attention layer");
        println!();
        println!("| impl | precision | pass | tokens | median ms | min ms | peak GiB | FLOP floor ms | note |");
        println!("|---|---|---|---:|---:|---:|---:|---:|---|");
        for r in layer {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.imp,
                r.precision,
                r.pass,
                r.seq,
                r.ms_median
                    .map(|m| format!("{m:.2}"))
                    .unwrap_or_else(|| r.status.clone()),
                r.ms_min.map(|m| format!("{m:.2}")).unwrap_or_default(),
                r.reserved_mem_bytes.map(gib).unwrap_or_default(),
                r.flop_floor_ms
                    .map(|m| format!("{m:.2}"))
                    .unwrap_or_default(),
                r.note.replace('|', "/"),
            );
        }
        println!();
    }
    let train: Vec<&Row> = rows.iter().filter(|r| r.suite == "train").collect();
    if !train.is_empty() {
        println!("## Training step (seed config)");
        println!();
        println!("| attention | precision | seq × batch | median ms | tokens/s | peak GiB | start-up s | note |");
        println!("|---|---|---|---:|---:|---:|---:|---|");
        for r in train {
            println!(
                "| {} | {} | {} × {} | {} | {} | {} | {} | {} |",
                r.imp,
                r.precision,
                r.seq,
                r.batch,
                r.ms_median
                    .map(|m| format!("{m:.1}"))
                    .unwrap_or_else(|| r.status.clone()),
                r.tokens_per_s
                    .map(|t| format!("{t:.0}"))
                    .unwrap_or_default(),
                r.reserved_mem_bytes.map(gib).unwrap_or_default(),
                r.startup_s.map(|s| format!("{s:.1}")).unwrap_or_default(),
                r.note.replace('|', "/"),
            );
        }
        println!();
    }
    let check: Vec<&Row> = rows.iter().filter(|r| r.suite == "check").collect();
    if !check.is_empty() {
        println!("## Kernels vs tensor ops");
        println!();
        println!("| precision | tokens | max abs err | max rel err | status | note |");
        println!("|---|---:|---:|---:|---|---|");
        for r in check {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                r.precision,
                r.seq,
                r.max_abs_err
                    .map(|e| format!("{e:.2e}"))
                    .unwrap_or_default(),
                r.max_rel_err
                    .map(|e| format!("{e:.2e}"))
                    .unwrap_or_default(),
                r.status,
                r.note
            );
        }
        println!();
    }
}

/// Why the run failed, if it did: a check row that is not `ok` (mismatched, skipped or not
/// run), or any row that ended in an error. Out-of-memory and time-outs of benchmark rows are
/// measurements, not failures.
pub fn failures(rows: &[Row]) -> Option<String> {
    let checks = rows
        .iter()
        .filter(|r| r.suite == "check" && r.status != "ok")
        .count();
    let errors = rows
        .iter()
        .filter(|r| r.suite != "check" && r.status == "error")
        .count();
    match (checks, errors) {
        (0, 0) => None,
        (c, e) => Some(format!(
            "{c} check row(s) not ok (mismatch, skipped or failed) and {e} benchmark row(s) \
             ended in an error"
        )),
    }
}
