//! `nsa-train`: trains an NSA language model with Burn's Learner (see `nsa_train::training`);
//! the arguments are `nsa_train::cli::Cli`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nsa_runtime::backend::DeviceRequest;
use nsa_runtime::failure::PanicHook;
use nsa_runtime::kernel_cache::{self, Workload};
use nsa_train::cli::Cli;
use nsa_train::config::{Overrides, TrainConfig};
use nsa_train::strategy::{is_run_dir, EndReason};
use nsa_train::training::{run, RunOptions, Start, UiMode};

/// Signals this close to the first stop request are that request again ([`main`]'s handler).
const SAME_REQUEST: Duration = Duration::from_secs(1);

/// Refuses `--preset`, `--config` and recipe flags given with `--resume` unless they resolve
/// to the run's saved configuration (so the command that started a run, plus `--resume`,
/// continues it).
fn check_resume_recipe(cli: &Cli, overrides: &Overrides, out: &Path) -> anyhow::Result<()> {
    let mut given: Vec<String> = Vec::new();
    if let Some(p) = cli.preset {
        given.push(format!("--preset {p}"));
    }
    if let Some(c) = &cli.config {
        given.push(format!("--config {}", c.display()));
    }
    if let Some(flag) = overrides.recipe_flag() {
        given.push(flag.to_string());
    }
    if given.is_empty() || !is_run_dir(out) {
        // nothing to compare (a missing run is reported by `run`)
        return Ok(());
    }
    let saved = TrainConfig::from_file(&out.join("config.toml"))?;
    // only the recipe: --steps and the intervals may change on resume
    let recipe = Overrides {
        steps: None,
        eval_every: None,
        sample_every: None,
        log_every: None,
        ..overrides.clone()
    };
    let mut wanted = if cli.preset.is_some() || cli.config.is_some() {
        TrainConfig::resolve(cli.preset, cli.config.as_deref(), &recipe)?
    } else {
        let mut c = saved.clone();
        c.apply(&recipe);
        c
    };
    // the saved paths are absolute
    wanted.data.paths = wanted
        .data
        .paths
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    if let Some(difference) = saved.recipe_difference(&wanted) {
        bail!(
            "{} does not match the run in {} ({difference}): a resumed run keeps its saved \
             config.toml; leave {} out (--steps, --eval-every, --sample-every, --log-every and \
             the device flags may change), or start a new run with another --out",
            given.join(" "),
            out.display(),
            if given.len() > 1 { "them" } else { "it" }
        );
    }
    Ok(())
}

fn real_main(cli: Cli, panic_hook: PanicHook) -> anyhow::Result<ExitCode> {
    let overrides = cli.overrides();
    let preset_name = cli.preset.unwrap_or_default();
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(preset_name.name()));
    let start = if cli.resume {
        check_resume_recipe(&cli, &overrides, &out)?;
        Start::Resume(overrides)
    } else {
        let config = TrainConfig::resolve(cli.preset, cli.config.as_deref(), &overrides)?;
        if cli.print_config {
            print!("{}", config.to_toml());
            return Ok(ExitCode::SUCCESS);
        }
        Start::New(config)
    };
    if cli.print_config {
        let config = TrainConfig::from_file(&out.join("config.toml"))?;
        print!("{}", config.to_toml());
        return Ok(ExitCode::SUCCESS);
    }

    kernel_cache::configure(Workload::Training);
    let options = RunOptions {
        out,
        start,
        device: DeviceRequest {
            kind: cli.backend,
            index: cli.device,
        },
        devices: cli.devices,
        ui: if cli.no_tui {
            UiMode::Plain
        } else {
            UiMode::Auto
        },
        stop_at: cli.stop_at,
        cache_dir: cli.cache_dir,
        interrupter: Default::default(),
        kernels: nsa_runtime::environment::kernel_options(std::env::vars_os())?,
        max_buffer_bytes: cli.max_buffer_mib.map(|m| m << 20),
        panic_hook,
    };
    let interrupter = options.interrupter.clone();
    // The first Ctrl-C / SIGTERM stops with a checkpoint; another one quits at once, unless it
    // comes within `SAME_REQUEST` of the first: `timeout` (and job schedulers) send SIGTERM to
    // the process and then to its process group, so one request arrives twice.
    let first_signal = Mutex::new(None::<Instant>);
    ctrlc::set_handler(move || {
        let mut first = first_signal.lock().unwrap_or_else(|e| e.into_inner());
        match *first {
            None => {
                *first = Some(Instant::now());
                interrupter.stop(Some("Ctrl-C / SIGTERM"));
                eprintln!("\nstopping: saving a checkpoint (Ctrl-C again quits at once)");
            }
            Some(at) if at.elapsed() < SAME_REQUEST => {}
            Some(_) => {
                // the dashboard may hold the terminal
                nsa_train::dashboard::restore_terminal();
                eprintln!(
                    "\nstopped at once: the run continues from its last checkpoint with --resume"
                );
                std::process::exit(130);
            }
        }
    })
    .context("cannot install the Ctrl-C handler")?;

    let summary = run(options)?;
    if summary.dashboard {
        for sample in &summary.samples {
            println!("{}\n", sample.render());
        }
        for line in summary.lines() {
            println!("{line}");
        }
    }
    Ok(match summary.end {
        EndReason::Interrupted(_) => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}

fn main() -> ExitCode {
    let panic_hook = nsa_runtime::failure::install_panic_hook(
        "nsa-train",
        nsa_runtime::failure::TRAIN_MEMORY_HINT,
    );
    nsa_runtime::backend::quiet_headless_probe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap's whole message: the problem, similar arguments, usage, where to get help
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if let Err(e) = nsa_runtime::environment::check_vars(std::env::vars_os()) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match real_main(cli, panic_hook) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", nsa_runtime::failure::error_line(e.chain()));
            ExitCode::FAILURE
        }
    }
}
