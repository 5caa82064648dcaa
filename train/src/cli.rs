//! The `nsa-train` command line: the arguments ([`Cli`]) and their help. The binary
//! (`src/main.rs`) turns them into [`crate::training::RunOptions`]; tests check documented
//! commands against [`command`] (`command().try_get_matches_from(...)`).

use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use nsa_model::AttentionKind;

use crate::config::{Overrides, Preset, TokenizerAlgorithm};
use nsa_runtime::backend::{BackendKind, DeviceList, BACKEND_HELP};

/// Examples at the end of `nsa-train --help`.
pub const EXAMPLES: &str = "\
Examples:
  nsa-train --preset tiny --backend cpu
      a first run on the CPU: a small model on the embedded corpus, in runs/tiny
  nsa-train --preset tiny --steps 200 --out runs/first --no-tui
      200 steps with plain log lines instead of the dashboard
  nsa-train --preset seed --backend cuda --out runs/seed
      the original recipe on an NVIDIA GPU
  nsa-train --preset tiny --data corpus/ --train-tokenizer bpe --vocab-size 4000
      your own text (a file or directory of .txt/.jsonl/.json/.xml[.gz]) with a new tokenizer
  nsa-train --config my.toml --print-config
      show the configuration a TOML file resolves to, without training
  nsa-train --resume --out runs/tiny
      continue a stopped run from its newest checkpoint
  nsa-train --resume --out runs/tiny --steps 5000
      train a finished run longer (its learning-rate schedule is kept; the extra steps run at
      its final learning rate)";

/// Train a Native Sparse Attention language model.
///
/// The configuration is a preset (`--preset tiny|seed`), optionally overridden by a TOML file
/// (`--config`, same layout as assets/configs/*.toml, any subset of keys) and by the flags
/// below. Everything goes into the run directory (`--out`): config.toml, tokenizer.json,
/// checkpoints, the inference bundles best/ and last/ (for nsa-infer), metrics.csv, loss.png,
/// samples.txt, train.log. `--resume --out DIR` continues a run exactly where its last
/// checkpoint left off. In a terminal Burn's dashboard shows the progress (its "Eval interval"
/// is `--eval-every` steps; press q then s to stop with a checkpoint); otherwise, or with
/// --no-tui, plain log lines are printed. Ctrl-C (or SIGTERM) saves a checkpoint and exits; a
/// second Ctrl-C exits at once.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nsa-train",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BUILD_GIT_COMMIT"), ")"),
    allow_negative_numbers = true,
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Base configuration: `tiny` (CPU first run) or `seed` (the original recipe, for a GPU)
    /// [default: seed]
    #[arg(long, value_name = "NAME")]
    pub preset: Option<Preset>,
    /// TOML file overriding the preset (any subset of its keys; may set `preset = "tiny"`)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run directory [default: runs/<preset>]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint, with its saved config.toml
    /// (--preset, --config and recipe flags are accepted when they match it)
    #[arg(long)]
    pub resume: bool,
    /// Training text: a file or directory (.txt, .text, .jsonl, .json, Wikipedia abstract
    /// .xml, each optionally .gz); repeatable [default: the embedded zh-mix corpus]
    #[arg(long, value_name = "PATH")]
    pub data: Vec<PathBuf>,
    /// Tokenizer: a tokenizer.json or a BERT vocab.txt [default: the embedded bert-base-chinese]
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Train a tokenizer on the corpus instead: `wordpiece` or `bpe`
    #[arg(long, value_name = "KIND")]
    pub train_tokenizer: Option<TokenizerAlgorithm>,
    /// Vocabulary size of a trained tokenizer
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<usize>,
    /// Attention of every layer: `nsa` (sparse), `dsa` (DeepSeek sparse attention) or `full`
    /// (the dense baseline)
    #[arg(long, value_name = "KIND")]
    pub attention: Option<AttentionKind>,
    /// Optimizer steps (with --resume: the new total, more than the steps done)
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
    /// Sequences per micro-batch
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation)
    #[arg(long, value_name = "N")]
    pub grad_accum: Option<usize>,
    /// Recompute each block's activations in the backward pass (activation checkpointing):
    /// one block's memory instead of the whole model's, about a third more work, same
    /// gradients; for long sequences (`train.recompute`)
    #[arg(long)]
    pub recompute: bool,
    /// Peak learning rate
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Tokens per training sequence
    #[arg(long, value_name = "N")]
    pub seq_len: Option<usize>,
    /// Seed of initialisation, data order and samples
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Validation + checkpoint + best/last bundles every N steps
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Generate a sample every N steps (0 = never)
    #[arg(long, value_name = "N")]
    pub sample_every: Option<u64>,
    /// A log line every N steps (its loss is the mean over those N steps)
    #[arg(long, value_name = "N")]
    pub log_every: Option<u64>,
    #[arg(long, value_name = "NAME", default_value = "auto", help = BACKEND_HELP)]
    pub backend: BackendKind,
    /// Device index within the backend
    #[arg(long, value_name = "N", conflicts_with = "devices")]
    pub device: Option<usize>,
    /// Data-parallel training over several devices of this machine: `all` or indices such as
    /// `0,1` (the first is the main device; the global batch is split between them and the
    /// gradients averaged, so the loss curve is that of one device). On the CPU, `0,0` runs
    /// two replicas on the one device (tests the mechanism, no speed-up)
    #[arg(long, value_name = "LIST")]
    pub devices: Option<DeviceList>,
    /// Plain log lines even in a terminal (no dashboard)
    #[arg(long)]
    pub no_tui: bool,
    /// Token cache directory [default: $NSA_CACHE_DIR/tokens or ~/.cache/nsa/tokens]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Stop with a checkpoint after this step (continue later with --resume)
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<u64>,
    /// Treat the device as refusing any single buffer above N MiB, as many Vulkan drivers and
    /// Apple's Metal do at 128-256 MiB whatever the free memory (on wgpu the device is set up
    /// to refuse them): shows that a run stays within such a limit on any machine
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_buffer_mib: Option<u64>,
    /// Print the resolved configuration as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

impl Cli {
    /// The configuration values given as flags.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            seq_len: self.seq_len,
            grad_accum: self.grad_accum,
            recompute: self.recompute,
            seed: self.seed,
            eval_every: self.eval_every,
            sample_every: self.sample_every,
            log_every: self.log_every,
            attention: self.attention,
            data: self.data.clone(),
            tokenizer: self.tokenizer.clone(),
            train_tokenizer: self.train_tokenizer,
            vocab_size: self.vocab_size,
        }
    }
}

/// The clap command of `nsa-train` (help, parsing of argument lists).
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn the_examples_parse() {
        let lines = EXAMPLES
            .lines()
            .filter(|l| l.trim_start().starts_with("nsa-train"));
        let mut n = 0;
        for line in lines {
            let args = line.split_whitespace();
            if let Err(e) = command().try_get_matches_from(args) {
                panic!("{line}: {e}");
            }
            n += 1;
        }
        assert!(n >= 5);
    }

    #[test]
    fn help_lists_the_backends_once() {
        let help = command().render_help().to_string();
        assert!(help.contains("auto, cuda, wgpu, cpu or ndarray"), "{help}");
        assert!(!help.contains("flex,"), "{help}");
        assert!(help.contains("Examples:"), "{help}");
    }
}
