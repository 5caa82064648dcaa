//! `nsa-bench`: speed and memory of one attention layer (NSA with the fused kernels, NSA with
//! tensor ops, dense attention) and of a training step of the seed model, on the backend chosen
//! at run time. Prints tables and writes JSON in the format `scripts/bench_reference.py` also
//! writes, so the two can be compared row by row.
//!
//! Each measured row runs in a child process (the same binary, `--worker`): an out-of-memory
//! crash costs that row only, every row starts from an empty memory pool (so the pool's reserved
//! bytes after the row are its peak), and the child measures its own start-up time.
//!
//! Timing: warm-up runs excluded, then the median of `--runs` runs; the device is synced before
//! each clock read.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use clap::Parser;
use nsa_infer::bench_cli::{Cli, LayerArgs};
use nsa_model::interop::HostTensor;
use nsa_model::{kernels, FullAttention, TransformerConfig};
use nsa_runtime::backend::{
    self, BackendChoice, BackendKind, DeviceRequest, OnAutodiffBackend, OnBackend, Precision,
};
use nsa_runtime::kernel_cache::{self, Workload};
use serde::{Deserialize, Serialize};

/// One measured row, as written to JSON (same fields as `bench_reference.py`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Row {
    suite: String,
    /// nsa, nsa-tensor, full (ours); ref-nsa, ref-nsa-triton, sdpa (PyTorch)
    #[serde(rename = "impl")]
    imp: String,
    precision: String,
    seq: usize,
    batch: usize,
    /// fwd, fwd+bwd, train-step, check
    pass: String,
    /// ok, oom, error, timeout, skipped
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms_median: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ms_all: Vec<f64>,
    /// First (cold) run, not included in the median.
    #[serde(skip_serializing_if = "Option::is_none")]
    ms_first: Option<f64>,
    /// Bytes the device allocator reserved after the row: its peak, as pools keep their pages
    /// (compare with PyTorch's `max_memory_reserved`; CubeCL 0.10 keeps no peak of the bytes
    /// in live tensors, PyTorch's `max_memory_allocated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved_mem_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
    /// Seconds from process start to the end of the first step within 10% of the median.
    #[serde(skip_serializing_if = "Option::is_none")]
    startup_s: Option<f64>,
    /// Lower bound from the FLOP count at `flop_peak_tflops`.
    #[serde(skip_serializing_if = "Option::is_none")]
    flop_floor_ms: Option<f64>,
    /// The peak the floor assumes: the H100/H200 SXM dense tensor-core rate of the row's
    /// precision ([`peak_tflops`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    flop_peak_tflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_abs_err: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rel_err: Option<f64>,
    /// Whether every compared value was finite (JSON has no NaN or infinity: a non-finite
    /// error is written as null beside `finite: false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    finite: Option<bool>,
    /// Fused kernels were registered for the backend of the row.
    #[serde(skip_serializing_if = "Option::is_none")]
    kernels: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    note: String,
}

/// What a worker process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    suite: String,
    imp: String,
    #[serde(with = "as_string")]
    precision: Precision,
    seq: usize,
    batch: usize,
    pass: String,
    warmup: usize,
    runs: usize,
    layer: LayerArgs,
    #[serde(with = "as_string")]
    backend: BackendKind,
    device: Option<usize>,
    /// The check suite's variants.
    #[serde(default)]
    variants: Vec<String>,
}

/// Serde through `Display` / `FromStr`.
mod as_string {
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

const RESULT_TAG: &str = "NSA_BENCH_ROW ";

fn main() {
    let started = Instant::now();
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
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
    kernel_cache::configure(Workload::Training);
    let choice = backend::select(DeviceRequest {
        kind: cli.backend,
        index: cli.device,
    })?;
    eprintln!(
        "nsa-bench: {} on {} ({})",
        choice.kind, choice.device_name, choice.reason
    );
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

    let mut rows = Vec::new();
    let job = |suite: &str, imp: &str, precision: Precision, seq, batch, pass: &str| Job {
        suite: suite.into(),
        imp: imp.into(),
        precision,
        seq,
        batch,
        pass: pass.into(),
        warmup: cli.warmup,
        runs: cli.runs,
        layer: cli.layer.clone(),
        backend: choice.kind,
        device: Some(choice.index),
        variants: cli.check_variants.clone(),
    };
    let has = |s: &str| cli.suite.iter().any(|x| x == s);

    if has("check") {
        for &precision in &precisions {
            for &seq in &lengths {
                let j = job(
                    "check",
                    "nsa",
                    precision,
                    seq,
                    cli.layer.batch_size,
                    "check",
                );
                rows.push(execute(&cli, &j));
                print_row(rows.last().unwrap());
            }
        }
    }
    if has("layer") {
        for pass in &cli.passes {
            for imp in &cli.impls {
                for &precision in &precisions {
                    let mut failed_at: Option<(usize, String)> = None;
                    for &seq in &lengths {
                        let j = job("layer", imp, precision, seq, cli.layer.batch_size, pass);
                        let row = match &failed_at {
                            Some((at, why)) => Row {
                                status: "skipped".into(),
                                note: format!("{why} at {at} tokens"),
                                ..row_of(&j)
                            },
                            None => execute(&cli, &j),
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
    if has("train") {
        for shape in &cli.train_shapes {
            let (seq, batch) = parse_shape(shape)?;
            for &precision in &cli.train_precisions {
                // `--impls` picks the attention of the training rows too
                let wanted = |imp: &&str| cli.impls.iter().any(|i| i == imp);
                for imp in ["nsa", "full"].into_iter().filter(wanted) {
                    let j = job("train", imp, precision, seq, batch, "train-step");
                    let row = execute(&cli, &j);
                    print_row(&row);
                    rows.push(row);
                }
            }
        }
    }

    println!();
    print_table(&rows);
    if let Some(path) = &cli.json {
        let settings = serde_json::json!({
            "suite": cli.suite,
            "lengths": cli.lengths,
            "precisions": precisions.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "impls": cli.impls,
            "passes": cli.passes,
            "train_shapes": cli.train_shapes,
            "layer": cli.layer,
            "warmup": cli.warmup,
            "runs": cli.runs,
            "check_variants": cli.check_variants,
        });
        let record = nsa_infer::record::Record::new(
            "nsa-bench",
            &choice,
            settings,
            serde_json::json!({ "rows": rows }),
        );
        record.write(path)?;
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

fn row_of(job: &Job) -> Row {
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

/// Runs `job` in a child process (or here with `--in-process`).
fn execute(cli: &Cli, job: &Job) -> Row {
    if cli.in_process {
        return run_job(job, Instant::now());
    }
    match run_child(job, Duration::from_secs(cli.row_timeout)) {
        Ok(row) => row,
        Err(e) => Row {
            status: "error".into(),
            note: format!("{e:#}"),
            ..row_of(job)
        },
    }
}

fn run_child(job: &Job, timeout: Duration) -> Result<Row> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--worker")
        .arg(serde_json::to_string(job)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the worker")?;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut result = None;
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(json) = line.strip_prefix(RESULT_TAG) {
                result = Some(json.to_string());
            } else {
                println!("    {line}");
            }
        }
        result
    });
    // keep the tail of stderr (to recognise out-of-memory errors) and the first panic, and
    // echo it
    let err_thread = std::thread::spawn(move || {
        let mut tail = String::new();
        let mut panic = PanicWatch::default();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            eprintln!("{line}");
            panic.see(&line);
            tail.push_str(&line);
            tail.push('\n');
            if tail.len() > 16384 {
                let mut cut = tail.len() - 8192;
                while !tail.is_char_boundary(cut) {
                    cut += 1;
                }
                tail = tail.split_off(cut);
            }
        }
        (tail, panic.message())
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let result = out_thread.join().unwrap_or(None);
    // a panic on a device thread (an allocation the device refused, say) leaves the main
    // thread timing nothing: the row is an error, whatever it measured
    let (tail, panic) = err_thread.join().unwrap_or_default();
    if let Some(json) = result {
        let row: Row = serde_json::from_str(&json)?;
        return Ok(match panic {
            Some(why) if row.status == "ok" => Row {
                status: if why.to_ascii_lowercase().contains("allocate") {
                    "oom".into()
                } else {
                    "error".into()
                },
                note: format!("a device thread panicked during the row: {why}"),
                ms_median: None,
                ms_min: None,
                ms_all: Vec::new(),
                ..row
            },
            _ => row,
        });
    }
    let lower = tail.to_ascii_lowercase();
    let oom = [
        "out of memory",
        "outofmemory",
        "out_of_memory",
        "oom",
        "allocation",
    ]
    .iter()
    .any(|p| lower.contains(p));
    // what the worker said last: its first panic's message, else its last line that is not
    // Rust's backtrace boilerplate
    let boilerplate = |l: &str| {
        let l = l.trim();
        l.is_empty()
            || l.starts_with("note: ")
            || l.starts_with("stack backtrace")
            || l.starts_with("No backtrace available")
    };
    let last_line = match panic.filter(|m| !m.is_empty()) {
        Some(message) => format!("panicked: {message}"),
        None => tail
            .lines()
            .rev()
            .find(|l| !boilerplate(l))
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>(),
    };
    let last_line = match (job.suite == "check", job.variants.is_empty()) {
        (true, false) => format!("variants {}: {last_line}", job.variants.join(",")),
        _ => last_line,
    };
    Ok(Row {
        status: match status {
            None => "timeout".into(),
            Some(_) if oom => "oom".into(),
            Some(_) => "error".into(),
        },
        note: match status {
            None => format!("killed after {} s", timeout.as_secs()),
            Some(s) => format!("worker exited with {s}: {last_line}"),
        },
        ..row_of(job)
    })
}

/// The first panic in a worker's stderr: Rust prints `thread '...' panicked at FILE:LINE:`
/// and the message on the next line.
#[derive(Default)]
struct PanicWatch {
    seen: bool,
    message: Option<String>,
}

impl PanicWatch {
    fn see(&mut self, line: &str) {
        if self.message.is_some() {
            return;
        }
        if self.seen {
            self.message = Some(line.chars().take(300).collect());
        } else if line.contains("panicked at") {
            self.seen = true;
        }
    }

    /// The message, if a panic was seen (empty when its message line never came).
    fn message(&self) -> Option<String> {
        match (&self.message, self.seen) {
            (Some(m), _) => Some(m.clone()),
            (None, true) => Some(String::new()),
            (None, false) => None,
        }
    }
}

/// Runs one row in this process.
fn run_job(job: &Job, started: Instant) -> Row {
    let choice = match backend::select(DeviceRequest {
        kind: job.backend,
        index: job.device,
    }) {
        Ok(s) => s,
        Err(e) => {
            return Row {
                status: "error".into(),
                note: e.to_string(),
                ..row_of(job)
            }
        }
    };
    kernel_cache::configure(Workload::Training);
    if job.imp == "nsa-tensor" {
        kernels::set_enabled(false);
    }
    let result = if job.suite == "train" && job.precision == Precision::F32 {
        backend::dispatch_autodiff(
            &choice,
            TrainWork {
                job: job.clone(),
                started,
            },
        )
    } else {
        backend::dispatch(
            &choice,
            job.precision,
            Work {
                job: job.clone(),
                started,
            },
        )
    };
    match result {
        Ok(row) => row,
        Err(e) => Row {
            status: "skipped".into(),
            note: e.to_string(),
            ..row_of(job)
        },
    }
}

struct Work {
    job: Job,
    started: Instant,
}

impl OnBackend for Work {
    type Output = Row;
    fn run<B: Backend>(self, device: B::Device, _: &BackendChoice) -> Row {
        match self.job.suite.as_str() {
            "layer" if self.job.pass == "fwd" => layer_fwd_row::<B>(&self.job, &device),
            "layer" => layer_bwd_row::<burn::backend::Autodiff<B>>(&self.job, &device),
            "train" => train_row::<burn::backend::Autodiff<B>>(&self.job, &device, self.started),
            "check" => check_row::<burn::backend::Autodiff<B>>(&self.job, &device),
            other => Row {
                status: "error".into(),
                note: format!("unknown suite {other}"),
                ..row_of(&self.job)
            },
        }
    }
}

struct TrainWork {
    job: Job,
    started: Instant,
}

impl OnAutodiffBackend for TrainWork {
    type Output = Row;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>, _: &BackendChoice) -> Row {
        train_row::<B>(&self.job, &devices[0], self.started)
    }
}

/// Device memory held by CubeCL's allocator (`bytes_reserved`, `bytes_in_use`).
fn memory_usage<D: 'static>(device: &D) -> Option<(u64, u64)> {
    #[allow(unused_variables)]
    let any = device as &dyn std::any::Any;
    #[cfg(feature = "cuda")]
    if let Some(d) = any.downcast_ref::<burn::backend::cuda::CudaDevice>() {
        use burn::cubecl::Runtime;
        let u = burn::cubecl::cuda::CudaRuntime::client(d)
            .memory_usage()
            .ok()?;
        return Some((u.bytes_reserved, u.bytes_in_use));
    }
    #[cfg(feature = "wgpu")]
    if let Some(d) = any.downcast_ref::<burn::backend::wgpu::WgpuDevice>() {
        use burn::cubecl::Runtime;
        let u = burn::backend::wgpu::WgpuRuntime::client(d)
            .memory_usage()
            .ok()?;
        return Some((u.bytes_reserved, u.bytes_in_use));
    }
    None
}

fn sync<B: Backend>(device: &B::Device) {
    if let Err(e) = B::sync(device) {
        panic!("device sync failed: {e:?}");
    }
}

/// Median, minimum.
fn stats(times: &[f64]) -> (f64, f64) {
    let mut t = times.to_vec();
    t.sort_by(|a, b| a.total_cmp(b));
    let mid = t.len() / 2;
    let median = if t.len().is_multiple_of(2) {
        (t[mid - 1] + t[mid]) / 2.0
    } else {
        t[mid]
    };
    (median, t[0])
}

/// Forward FLOPs of one layer (matmuls only).
fn layer_flops(imp: &str, l: &LayerArgs, n: usize) -> f64 {
    let (n, h, kvh, dh, dim) = (
        n as f64,
        l.heads as f64,
        l.kv_heads as f64,
        l.dim_head as f64,
        l.dim as f64,
    );
    let proj = 2.0 * n * dim * (h + 2.0 * kvh) * dh + 2.0 * n * h * dh * dim;
    if imp == "full" {
        // causal: half of the n×n scores, QK and PV
        return proj + 2.0 * 2.0 * h * n * n * dh / 2.0;
    }
    let blocks = n / l.stride as f64;
    let hidden = (l.compress_block * l.dim_head) as f64;
    let mlp = 2.0 * 2.0 * kvh * blocks * (hidden * hidden + hidden * dh);
    let compressed = 4.0 * h * n * blocks / 2.0 * dh;
    let selected = 4.0 * h * n * (l.selected as f64 + 0.5) * l.selection_block as f64 * dh;
    let sliding = 4.0 * h * n * (l.window as f64 + 1.0) * dh;
    proj + mlp + compressed + selected + sliding
}

#[allow(clippy::large_enum_variant)]
enum Layer<B: Backend> {
    Nsa(nsa_model::SparseAttention<B>),
    Full(FullAttention<B>),
}

impl<B: Backend> Layer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Nsa(a) => a.forward(x),
            Self::Full(a) => a.forward(x),
        }
    }
}

/// The layer and a random input of the row.
fn layer_setup<B: Backend>(job: &Job, device: &B::Device) -> Result<(Layer<B>, Tensor<B, 3>)> {
    B::seed(device, 42);
    let l = &job.layer;
    let x = Tensor::<B, 3>::random(
        [job.batch, job.seq, l.dim],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let layer = if job.imp == "full" {
        Layer::Full(FullAttention::new(
            l.dim, l.dim_head, l.heads, l.kv_heads, device,
        ))
    } else {
        Layer::Nsa(l.nsa().init::<B>(device)?)
    };
    Ok((layer, x))
}

/// Times `run` (warm-up excluded) and fills the timing and memory fields of `row`.
fn time_row<B: Backend>(job: &Job, device: &B::Device, mut row: Row, run: impl Fn()) -> Row {
    row.kernels = Some(kernels::registered::<B>() && kernels::enabled());
    sync::<B>(device);
    let mut times = Vec::new();
    let mut peak = memory_usage(device).map(|m| m.0);
    for i in 0..job.warmup + job.runs {
        let t = Instant::now();
        run();
        sync::<B>(device);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            row.ms_first = Some(ms);
        }
        if i >= job.warmup {
            times.push(ms);
        }
        if let Some((reserved, _)) = memory_usage(device) {
            peak = Some(peak.unwrap_or(0).max(reserved));
        }
    }
    let (median, min) = stats(&times);
    row.ms_median = Some(median);
    row.ms_min = Some(min);
    row.ms_all = times;
    row.reserved_mem_bytes = peak;
    row.status = "ok".into();
    row
}

/// Dense tensor-core peak of an H100/H200 SXM for `precision`, TFLOP/s: bf16 and f16 989.4,
/// f32 as TF32 494.7 (NVIDIA's H100 SXM figures without sparsity; the H200 has the same
/// compute).
fn peak_tflops(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 494.7,
        _ => 989.4,
    }
}

/// The FLOP floor of `job` (ms) and the peak it assumes (TFLOP/s).
fn flop_floor(job: &Job, backward: bool) -> (f64, f64) {
    let flops = layer_flops(&job.imp, &job.layer, job.seq) * job.batch as f64;
    let flops = if backward { flops * 3.0 } else { flops };
    let peak = peak_tflops(job.precision);
    (flops / (peak * 1e12) * 1e3, peak)
}

/// Forward only (no autodiff).
fn layer_fwd_row<B: Backend>(job: &Job, device: &B::Device) -> Row {
    let row = row_of(job);
    let (layer, x) = match layer_setup::<B>(job, device) {
        Ok(s) => s,
        Err(e) => {
            return Row {
                status: "error".into(),
                note: format!("{e:#}"),
                ..row
            }
        }
    };
    let mut row = time_row::<B>(job, device, row, || drop(layer.forward(x.clone())));
    let (floor, peak) = flop_floor(job, false);
    row.flop_floor_ms = Some(floor);
    row.flop_peak_tflops = Some(peak);
    row
}

/// Forward and backward of `mean(layer(x))` (the gradients are computed and dropped).
fn layer_bwd_row<B: AutodiffBackend>(job: &Job, device: &B::Device) -> Row {
    let row = row_of(job);
    let (layer, x) = match layer_setup::<B>(job, device) {
        Ok(s) => s,
        Err(e) => {
            return Row {
                status: "error".into(),
                note: format!("{e:#}"),
                ..row
            }
        }
    };
    let mut row = time_row::<B>(job, device, row, || {
        let out = layer.forward(x.clone().require_grad());
        drop(out.mean().backward());
    });
    let (floor, peak) = flop_floor(job, true);
    row.flop_floor_ms = Some(floor);
    row.flop_peak_tflops = Some(peak);
    row
}

fn train_row<B: AutodiffBackend>(job: &Job, device: &B::Device, started: Instant) -> Row {
    let mut row = row_of(job);
    row.kernels = Some(kernels::registered::<B>() && kernels::enabled());
    B::seed(device, 42);
    let mut config = TransformerConfig::new(21128, 512, 6);
    if job.imp == "full" {
        config.attention = nsa_model::AttentionKind::Full;
    }
    let mut model = match config.init::<B>(device) {
        Ok(m) => m,
        Err(e) => {
            row.status = "error".into();
            row.note = e.to_string();
            return row;
        }
    };
    let mut optim = AdamWConfig::new().init::<B, nsa_model::Transformer<B>>();
    let ids = Tensor::<B, 2, Int>::random(
        [job.batch, job.seq + 1],
        Distribution::Uniform(0.0, 21128.0),
        device,
    );
    let mut times = Vec::new();
    let mut ends = Vec::new();
    let mut peak = None;
    for _ in 0..job.warmup + job.runs {
        sync::<B>(device);
        let t = Instant::now();
        let loss = model.loss(ids.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        sync::<B>(device);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ends.push(started.elapsed().as_secs_f64());
        if let Some((reserved, _)) = memory_usage(device) {
            peak = Some(peak.unwrap_or(0).max(reserved));
        }
    }
    let timed = &times[job.warmup..];
    let (median, min) = stats(timed);
    row.ms_first = Some(times[0]);
    row.ms_median = Some(median);
    row.ms_min = Some(min);
    row.ms_all = timed.to_vec();
    row.reserved_mem_bytes = peak;
    row.tokens_per_s = Some((job.seq * job.batch) as f64 / (median / 1e3));
    row.startup_s = times
        .iter()
        .zip(&ends)
        .find(|(t, _)| **t <= median * 1.1)
        .map(|(_, e)| *e);
    row.status = "ok".into();
    row
}

/// Kernel path vs tensor-op path on this device: one layer's output and gradients.
fn check_row<B: AutodiffBackend>(job: &Job, device: &B::Device) -> Row {
    let mut row = row_of(job);
    row.kernels = Some(kernels::registered::<B>());
    if !kernels::registered::<B>() {
        row.status = "skipped".into();
        row.note = "no fused kernels for this backend".into();
        return row;
    }
    B::seed(device, 7);
    let l = &job.layer;
    let mut worst_abs = 0.0f64;
    let mut worst_rel = 0.0f64;
    let mut notes = Vec::new();
    // the benchmark layer, a no-share GQA variant and differentiable top-k
    let mut variants = vec![("bench", l.nsa())];
    let mut c = l.nsa();
    c.query_heads_share_selected_kv = false;
    variants.push(("noshare", c));
    let mut c = l.nsa();
    c.use_diff_topk = true;
    variants.push(("difftopk", c));
    variants.retain(|(name, _)| job.variants.is_empty() || job.variants.iter().any(|v| v == name));
    if variants.len() < 3 {
        let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
        notes.push(format!("variants {}", names.join(",")));
    }
    let mut failed = false;
    for (name, config) in variants {
        let layer = match config.init::<B>(device) {
            Ok(layer) => layer,
            Err(e) => {
                // a variant that cannot be built is a failed check, not a skipped one
                notes.push(format!("{name}: {e}"));
                failed = true;
                continue;
            }
        };
        let x = Tensor::<B, 3>::random(
            [job.batch, job.seq, config.dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let w = Tensor::<B, 3>::random(
            [job.batch, job.seq, config.dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let run = |fused: bool| {
            kernels::set_enabled(fused);
            let x = x.clone().require_grad();
            let out = layer.forward(x.clone());
            let grads = (out.clone() * w.clone()).sum().backward();
            let gx = x.grad(&grads).expect("input gradient");
            let gw = layer
                .to_qkv
                .weight
                .val()
                .grad(&grads)
                .expect("qkv gradient");
            let out = HostTensor::from_tensor(out);
            let gx = HostTensor::from_tensor(gx);
            let gw = HostTensor::from_tensor(gw);
            (out, gx, gw)
        };
        let fused = run(true);
        let reference = run(false);
        kernels::set_enabled(true);
        for (what, a, r) in [
            ("out", &fused.0, &reference.0),
            ("grad(x)", &fused.1, &reference.1),
            ("grad(qkv)", &fused.2, &reference.2),
        ] {
            // the shared rule: a NaN or infinity on either side is an infinite error
            let c = match a.compare(r) {
                Ok(c) => c,
                Err(e) => {
                    notes.push(format!("{name} {what}: {e}"));
                    failed = true;
                    continue;
                }
            };
            let rel = c.relative(CHECK_FLOOR);
            println!(
                "check {:5} seq {:6} {name:8} {what:9} {c}  rel {rel:.3e}",
                job.precision, job.seq
            );
            if !c.finite() {
                notes.push(format!("{name} {what}: {c}"));
            }
            // a NaN (or infinite) error stays the worst
            if c.max_abs.is_nan() || c.max_abs > worst_abs {
                worst_abs = c.max_abs;
            }
            if rel.is_nan() || rel > worst_rel {
                worst_rel = rel;
            }
        }
    }
    row.max_abs_err = Some(worst_abs);
    row.max_rel_err = Some(worst_rel);
    row.finite = Some(worst_abs.is_finite());
    let tol = check_tolerance(job.precision);
    row.status = if !failed && worst_rel <= tol {
        "ok"
    } else {
        "mismatch"
    }
    .into();
    row.note = notes.join("; ");
    row
}

/// Floor of the check's per-tensor relative errors (`max_abs / max(max|reference|, floor)`).
const CHECK_FLOOR: f64 = 1e-6;

/// The check's tolerance on the per-tensor relative error: f32 kernels against f32 tensor ops,
/// half-precision kernels (bf16/f16 storage, f32 accumulation) against half-precision tensor ops.
fn check_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-3,
        _ => 5e-2,
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

fn print_row(r: &Row) {
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

fn print_table(rows: &[Row]) {
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
fn failures(rows: &[Row]) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_thread_panic_is_seen() {
        let mut w = PanicWatch::default();
        for line in [
            "  layer  full  bf16  fwd  seq 65536",
            "thread 'DSD-0-0' (762) panicked at cubecl-cuda/src/compute/server.rs:124:46:",
            "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 137438953472",
            "thread 'DSD-0-0' (762) panicked at cubecl-cuda/src/compute/stream.rs:101:14:",
            "Memory page 0 doesn't exist",
        ] {
            w.see(line);
        }
        assert!(w.message().unwrap().contains("can't allocate"));
        assert!(PanicWatch::default().message().is_none());
    }
}
