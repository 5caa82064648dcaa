//! `nsa-bench`: speed and memory of one attention layer (NSA with the fused kernels, NSA with
//! tensor ops, dense attention) and of a training step of the seed model, on the backend chosen
//! at run time. Prints tables and writes JSON in the format `scripts/bench_reference.py` also
//! writes, so the two can be compared row by row. The decode suite ([`decode`]) measures
//! decoding at batch 1 instead, in this process.
//!
//! Each measured row runs in a child process (the same binary, `--worker`): an out-of-memory
//! crash costs that row only, every row starts from an empty memory pool (so the pool's reserved
//! bytes after the row are its peak), and the child measures its own start-up time.
//!
//! Timing: warm-up runs excluded, then the median of `--runs` runs; the device is synced before
//! each clock read.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use nsa_infer::bench_cli::Cli;
use nsa_runtime::backend::{self, BackendChoice, BackendKind, DeviceRequest, Precision};
use nsa_runtime::kernel_cache::{self, Workload};

mod check;
mod child;
mod decode;
mod layer;
mod measure;
mod rows;
mod train;

use child::{execute, run_job, RESULT_TAG};
use rows::{failures, print_row, print_table, row_of, Job, Row};

fn main() {
    let started = Instant::now();
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    let decode = cli.suite.iter().any(|s| s == "decode");
    if decode {
        // the decode suite runs in this process: a panic is one error line, as in nsa-infer
        nsa_runtime::failure::install_panic_hook(
            "nsa-bench",
            nsa_runtime::failure::INFER_MEMORY_HINT,
        );
        nsa_runtime::backend::quiet_headless_probe();
    }
    let result = nsa_runtime::environment::check_vars(std::env::vars_os())
        .map_err(anyhow::Error::from)
        .and_then(|()| run(cli, started));
    if let Err(e) = result {
        eprintln!("{}", nsa_runtime::failure::error_line(e.chain()));
        std::process::exit(1);
    }
}

fn run(cli: Cli, started: Instant) -> Result<()> {
    nsa_runtime::backend::register_kernels();
    if let Some(spec) = &cli.worker {
        let job: Job = serde_json::from_str(spec).context("worker job")?;
        let row = run_job(&job, started);
        println!("{RESULT_TAG}{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    if cli.suite.iter().any(|s| s == "decode") {
        if cli.suite.len() > 1 {
            anyhow::bail!("--suite decode runs alone (its record has its own format)");
        }
        return decode::run(&cli, started);
    }
    kernel_cache::configure(Workload::Training);
    let choice = backend::select(DeviceRequest {
        kind: cli.backend,
        index: cli.device,
    })?;
    eprintln!(
        "nsa-bench: {} on {} ({})",
        choice.kind, choice.device_name, choice.reason
    );
    let plan = Plan::new(&cli, &choice)?;
    let has = |s: &str| cli.suite.iter().any(|x| x == s);
    let mut rows = Vec::new();
    if has("check") {
        check_suite(&plan, &mut rows);
    }
    if has("layer") {
        layer_suite(&plan, &mut rows);
    }
    if has("train") {
        train_suite(&plan, &mut rows)?;
    }

    println!();
    print_table(&rows);
    if let Some(path) = &cli.json {
        write_record(&plan, &rows, path)?;
    }
    eprintln!(
        "nsa-bench: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(why) = failures(&rows) {
        println!("FAILED: {why}");
        anyhow::bail!("{why}");
    }
    Ok(())
}

/// What the suites run: the command line, the chosen backend, its precisions and the
/// sequence lengths.
struct Plan<'a> {
    cli: &'a Cli,
    choice: &'a BackendChoice,
    /// `--precisions`, or the backend's default ones.
    precisions: Vec<Precision>,
    /// `--lengths` in tokens.
    lengths: Vec<usize>,
}

impl<'a> Plan<'a> {
    fn new(cli: &'a Cli, choice: &'a BackendChoice) -> Result<Self> {
        let precisions = if cli.precisions.is_empty() {
            match choice.kind {
                BackendKind::Cuda => vec![Precision::F32, Precision::Bf16],
                BackendKind::Wgpu => vec![Precision::F32, Precision::F16],
                _ => vec![Precision::F32],
            }
        } else {
            cli.precisions.clone()
        };
        let lengths = cli
            .lengths
            .iter()
            .map(|s| parse_len(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cli,
            choice,
            precisions,
            lengths,
        })
    }

    /// The job of one row.
    fn job(
        &self,
        suite: &str,
        imp: &str,
        precision: Precision,
        seq: usize,
        batch: usize,
        pass: &str,
    ) -> Job {
        Job {
            suite: suite.into(),
            imp: imp.into(),
            precision,
            seq,
            batch,
            pass: pass.into(),
            warmup: self.cli.warmup,
            runs: self.cli.runs(),
            layer: self.cli.layer.clone(),
            backend: self.choice.kind,
            device: Some(self.choice.index),
            variants: self.cli.check_variants.clone(),
            options: Default::default(),
        }
    }
}

/// The check suite: one row per precision and length.
fn check_suite(plan: &Plan<'_>, rows: &mut Vec<Row>) {
    let batch = plan.cli.layer.batch_size;
    for &precision in &plan.precisions {
        for &seq in &plan.lengths {
            let j = plan.job("check", "nsa", precision, seq, batch, "check");
            rows.push(execute(plan.cli, &j));
            print_row(rows.last().unwrap());
        }
    }
}

/// The layer suite: per pass, implementation and precision, the lengths in order; after an
/// out-of-memory or time-out the longer lengths are skipped.
fn layer_suite(plan: &Plan<'_>, rows: &mut Vec<Row>) {
    let cli = plan.cli;
    for pass in &cli.passes {
        for imp in &cli.impls {
            for &precision in &plan.precisions {
                let mut failed_at: Option<(usize, String)> = None;
                for &seq in &plan.lengths {
                    let j = plan.job("layer", imp, precision, seq, cli.layer.batch_size, pass);
                    let row = match &failed_at {
                        Some((at, why)) => Row {
                            status: "skipped".into(),
                            note: format!("{why} at {at} tokens"),
                            ..row_of(&j)
                        },
                        None => execute(cli, &j),
                    };
                    if matches!(row.status.as_str(), "oom" | "timeout") {
                        failed_at = Some((seq, row.status.clone()));
                    }
                    print_row(&row);
                    rows.push(row);
                }
            }
        }
    }
}

/// The train suite: per shape and precision, the attentions of `--impls` (nsa, full, dsa).
/// A DSA step is a sparse one (the dense warm-up is a dense step plus the indexer loss).
fn train_suite(plan: &Plan<'_>, rows: &mut Vec<Row>) -> Result<()> {
    let cli = plan.cli;
    for shape in &cli.train_shapes {
        let (seq, batch) = parse_shape(shape)?;
        for &precision in &cli.train_precisions {
            // `--impls` picks the attention of the training rows too
            let wanted = |imp: &&str| cli.impls.iter().any(|i| i == imp);
            for imp in ["nsa", "full", "dsa"].into_iter().filter(wanted) {
                for mode in &cli.train_modes {
                    let pass = match mode.as_str() {
                        "plain" => "train-step".to_string(),
                        other => format!("train-step-{other}"),
                    };
                    let j = plan.job("train", imp, precision, seq, batch, &pass);
                    let row = execute(cli, &j);
                    print_row(&row);
                    rows.push(row);
                }
            }
        }
    }
    Ok(())
}

/// Writes the rows as one record (`--json`).
fn write_record(plan: &Plan<'_>, rows: &[Row], path: &std::path::Path) -> Result<()> {
    let cli = plan.cli;
    let settings = serde_json::json!({
        "suite": cli.suite,
        "lengths": cli.lengths,
        "precisions": plan.precisions.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "impls": cli.impls,
        "passes": cli.passes,
        "train_shapes": cli.train_shapes,
        "train_modes": cli.train_modes,
        "layer": cli.layer,
        "warmup": cli.warmup,
        "runs": cli.runs(),
        "check_variants": cli.check_variants,
    });
    let record = nsa_infer::record::Record::new(
        "nsa-bench",
        plan.choice,
        settings,
        serde_json::json!({ "rows": rows }),
    );
    record.write(path)?;
    Ok(())
}

fn parse_len(s: &str) -> Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    Ok(match s.strip_suffix('k') {
        Some(k) => k.parse::<usize>()? * 1024,
        None => s.parse()?,
    })
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("shape `{s}`: expected SEQxBATCH"))?;
    Ok((parse_len(a)?, b.trim().parse()?))
}
