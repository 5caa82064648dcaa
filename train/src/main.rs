//! `nsa-train`: trains an NSA language model with Burn's Learner (see `nsa_train::training`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use nsa_model::AttentionKind;
use nsa_train::backend::{BackendKind, DeviceList, DeviceRequest};
use nsa_train::config::{Overrides, Preset, TokenizerAlgorithm, TrainConfig};
use nsa_train::kernel_cache::{self, Workload};
use nsa_train::strategy::EndReason;
use nsa_train::training::{run, RunOptions, Start, UiMode};

/// Train a Native Sparse Attention language model.
///
/// The configuration is a preset (`--preset tiny|seed`), optionally overridden by a TOML file
/// (`--config`, same layout as assets/configs/*.toml, any subset of keys) and by the flags
/// below. Everything goes into the run directory (`--out`): config.toml, tokenizer.json,
/// checkpoints, the inference bundles best/ and last/ (for nsa-infer), metrics.csv, loss.png,
/// samples.txt. `--resume --out DIR` continues a run exactly where its last checkpoint left
/// off. In a terminal Burn's dashboard shows the progress (press q then s to stop with a
/// checkpoint); otherwise, or with --no-tui, plain log lines are printed. Ctrl-C (or SIGTERM)
/// saves a checkpoint and exits; a second Ctrl-C exits at once.
#[derive(Parser, Debug)]
#[command(name = "nsa-train", version, allow_negative_numbers = true)]
struct Cli {
    /// Base configuration: `tiny` (CPU first run) or `seed` (the original recipe) [default: seed]
    #[arg(long, value_name = "NAME")]
    preset: Option<Preset>,
    /// TOML file overriding the preset (any subset of its keys; may set `preset = "tiny"`)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Run directory [default: runs/<preset>]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint, with its saved config.toml
    #[arg(long)]
    resume: bool,
    /// Training text: a file or directory (.txt, .jsonl, .json, Wikipedia abstract .xml, each
    /// optionally .gz); repeatable [default: the embedded zh-mix corpus]
    #[arg(long, value_name = "PATH")]
    data: Vec<PathBuf>,
    /// Tokenizer: a tokenizer.json or a BERT vocab.txt [default: the embedded bert-base-chinese]
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Train a tokenizer on the corpus instead: `wordpiece` or `bpe`
    #[arg(long, value_name = "KIND")]
    train_tokenizer: Option<TokenizerAlgorithm>,
    /// Vocabulary size of a trained tokenizer
    #[arg(long, value_name = "N")]
    vocab_size: Option<usize>,
    /// Attention of every layer: `nsa` (sparse) or `full` (the dense baseline)
    #[arg(long, value_name = "KIND")]
    attention: Option<AttentionKind>,
    /// Optimizer steps
    #[arg(long, value_name = "N")]
    steps: Option<u64>,
    /// Sequences per micro-batch
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation)
    #[arg(long, value_name = "N")]
    grad_accum: Option<usize>,
    /// Peak learning rate
    #[arg(long, value_name = "LR")]
    lr: Option<f64>,
    /// Tokens per training sequence
    #[arg(long, value_name = "N")]
    seq_len: Option<usize>,
    /// Seed of initialisation, data order and samples
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Validation + checkpoint + best/last bundles every N steps
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Generate a sample every N steps (0 = never)
    #[arg(long, value_name = "N")]
    sample_every: Option<u64>,
    /// A log line every N steps
    #[arg(long, value_name = "N")]
    log_every: Option<u64>,
    /// Backend: auto, cuda, wgpu, cpu or ndarray
    #[arg(long, value_name = "NAME", default_value = "auto")]
    backend: BackendKind,
    /// Device index within the backend
    #[arg(long, value_name = "N", conflicts_with = "devices")]
    device: Option<usize>,
    /// Data-parallel training over several devices of this machine: `all` or indices such as
    /// `0,1` (the first is the main device; the global batch is split between them and the
    /// gradients averaged, so the loss curve is that of one device). On the CPU, `0,0` runs
    /// two replicas on the one device (tests the mechanism, no speed-up)
    #[arg(long, value_name = "LIST")]
    devices: Option<DeviceList>,
    /// Plain log lines even in a terminal (no dashboard)
    #[arg(long)]
    no_tui: bool,
    /// Token cache directory [default: $NSA_CACHE_DIR/tokens or ~/.cache/nsa/tokens]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Stop with a checkpoint after this step (continue later with --resume)
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// Print the resolved configuration as TOML and exit
    #[arg(long)]
    print_config: bool,
}

fn overrides(cli: &Cli) -> Overrides {
    Overrides {
        steps: cli.steps,
        batch_size: cli.batch_size,
        lr: cli.lr,
        seq_len: cli.seq_len,
        grad_accum: cli.grad_accum,
        seed: cli.seed,
        eval_every: cli.eval_every,
        sample_every: cli.sample_every,
        log_every: cli.log_every,
        attention: cli.attention,
        data: cli.data.clone(),
        tokenizer: cli.tokenizer.clone(),
        train_tokenizer: cli.train_tokenizer,
        vocab_size: cli.vocab_size,
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = overrides(&cli);
    let preset_name = cli.preset.unwrap_or_default();
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(preset_name.name()));
    let start = if cli.resume {
        if let Some(flag) = overrides.recipe_flag().or(cli
            .preset
            .map(|_| "--preset")
            .or(cli.config.as_ref().map(|_| "--config")))
        {
            bail!(
                "{flag} cannot be used with --resume: the run continues with its saved \
                 config.toml (allowed: --steps, --eval-every, --sample-every, --log-every, \
                 --backend, --device, --devices)"
            );
        }
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
    };
    let interrupter = options.interrupter.clone();
    let signals = Arc::new(AtomicUsize::new(0));
    ctrlc::set_handler(move || {
        if signals.fetch_add(1, Ordering::SeqCst) == 0 {
            interrupter.stop(Some("Ctrl-C / SIGTERM"));
            eprintln!("\nstopping: saving a checkpoint (Ctrl-C again quits at once)");
        } else {
            std::process::exit(130);
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
    nsa_train::failure::install_panic_hook("nsa-train", nsa_train::failure::TRAIN_MEMORY_HINT);
    nsa_train::backend::quiet_headless_probe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's first line names the option and the problem
            let text = e.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", nsa_train::failure::error_line(e.chain()));
            ExitCode::FAILURE
        }
    }
}
