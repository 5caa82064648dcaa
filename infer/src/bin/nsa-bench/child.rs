//! Running a row: in a child process (`--worker`) that reports its row on stdout, or in this
//! process; the worker side dispatches the row onto the chosen backend.

use nsa_model::kernels::KernelOptions;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use nsa_infer::bench_cli::Cli;
use nsa_runtime::backend::{
    self, BackendChoice, DeviceRequest, OnAutodiffBackend, OnBackend, Precision,
};
use nsa_runtime::kernel_cache::{self, Workload};

use crate::check::check_row;
use crate::layer::{layer_bwd_row, layer_fwd_row};
use crate::rows::{row_of, Job, Row};
use crate::train::train_row;

pub const RESULT_TAG: &str = "NSA_BENCH_ROW ";

/// Runs `job` in a child process (or here with `--in-process`).
pub fn execute(cli: &Cli, job: &Job) -> Row {
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

pub fn run_child(job: &Job, timeout: Duration) -> Result<Row> {
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
pub struct PanicWatch {
    pub seen: bool,
    pub message: Option<String>,
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
pub fn run_job(job: &Job, started: Instant) -> Row {
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
    let options = match nsa_runtime::environment::kernel_options(std::env::vars_os()) {
        Ok(o) => o,
        Err(e) => {
            return Row {
                status: "error".into(),
                note: e.to_string(),
                ..row_of(job)
            }
        }
    };
    // the tensor-op rows run the same binary with the fused kernels off
    let job = &Job {
        options: KernelOptions {
            fused: options.fused && job.imp != "nsa-tensor",
            ..options
        },
        ..job.clone()
    };
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

pub struct Work {
    pub job: Job,
    pub started: Instant,
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

pub struct TrainWork {
    pub job: Job,
    pub started: Instant,
}

impl OnAutodiffBackend for TrainWork {
    type Output = Row;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>, _: &BackendChoice) -> Row {
        train_row::<B>(&self.job, &devices[0], self.started)
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
