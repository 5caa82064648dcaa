//! The command line of `nsa-infer`: every command, option and help text, in one place so that
//! the tests can check the README's commands against it (`Cli::command()`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nsa_model::{Repetition, Sampling, SamplingError, TopK};
use nsa_runtime::backend::{BackendKind, Precision};

/// The most tokens one generation may ask for when the model does not say its context
/// (`max_seq_len`): the KV cache is sized for the whole sequence up front.
pub const MAX_UNKNOWN_CONTEXT: usize = 1 << 17;

const EXAMPLES: &str = "\
Examples:
  nsa-infer generate -m runs/tiny/best -p \"床前明月光\" -n 64 -s 1
  nsa-infer generate -m runs/tiny/best -i
  nsa-infer score -m runs/tiny/best text.txt
  nsa-infer devices";

/// Generate with, score and convert NSA language models on CUDA, wgpu (Vulkan/Metal/DX12) or
/// the CPU, chosen at run time.
#[derive(Parser, Debug)]
#[command(
    name = "nsa-infer",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BUILD_GIT_COMMIT"), ")"),
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt (streamed, KV-cached).
    #[command(after_help = GENERATE_EXAMPLES)]
    Generate(GenerateArgs),
    /// Mean negative log-likelihood and perplexity of a text, optionally per token.
    #[command(after_help = SCORE_EXAMPLES)]
    Score(ScoreArgs),
    /// Write the raw logits of a token sequence (safetensors or .npy), for comparing with
    /// another implementation.
    #[command(after_help = LOGITS_EXAMPLES)]
    Logits(LogitsArgs),
    /// Convert a PyTorch reference checkpoint into a model directory.
    #[command(after_help = IMPORT_EXAMPLES)]
    Import(ImportArgs),
    /// Write a model directory's weights for the PyTorch reference (a directory of
    /// model.safetensors, args.json and tokenizer.json).
    #[command(after_help = EXPORT_EXAMPLES)]
    Export(ExportArgs),
    /// List the backends and devices this binary can use here.
    Devices,
    /// Run the same model and tokens on several backends and compare their logits.
    #[command(after_help = COMPARE_EXAMPLES)]
    Compare(CompareArgs),
}

const GENERATE_EXAMPLES: &str = "\
Examples:
  nsa-infer generate -m runs/tiny/best -p \"床前明月光\" -n 64 -s 1
  nsa-infer generate -m runs/tiny/best -f prompt.txt --greedy --stop 。
  echo \"你好\" | nsa-infer generate -m runs/tiny/best --json
  nsa-infer generate -m runs/tiny/best -i --temperature 0.8 --min-p 0.05 --repeat-penalty 1.1

Generation stops at the end-of-document token ([SEP]) unless --ignore-eos, at a --stop string
(not printed), after --max-new-tokens tokens (special tokens count but are not printed), or when
the model's context (max_seq_len) is full; the last stderr line says which.";

const SCORE_EXAMPLES: &str = "\
Examples:
  nsa-infer score -m runs/tiny/best text.txt
  cat text.txt | nsa-infer score -m runs/tiny/best - --per-token
  nsa-infer score -m runs/tiny/best corpus/ --json";

const LOGITS_EXAMPLES: &str = "\
Examples:
  nsa-infer logits -m runs/tiny/best --text prompt.txt --out logits.safetensors
  nsa-infer logits -m runs/tiny/best --tokens ids.txt --out logits.npy

The safetensors file holds `logits` (f32 [tokens, vocab]) and `ids` (i64 [tokens]); a .npy
file holds the logits, with the ids beside it in <name>.ids.npy.";

const IMPORT_EXAMPLES: &str = "\
Examples:
  nsa-infer import --weights model.pt --args args.json --tokenizer vocab.txt --out models/ref
  nsa-infer import --weights exported/model.safetensors --out models/back

--args defaults to args.json beside the weights; --tokenizer to tokenizer.json beside them
(what `export` writes), else bert-base-chinese (said on stderr); --max-seq-len to the one
recorded in an exported file.";

const EXPORT_EXAMPLES: &str = "\
Example:
  nsa-infer export -m runs/tiny/best --out exported
  # in Python:
  # Transformer(**json.load(open('exported/args.json'))).load_state_dict(
  #     safetensors.torch.load_file('exported/model.safetensors'))";

const COMPARE_EXAMPLES: &str = "\
Examples:
  nsa-infer compare -m runs/tiny/best
  nsa-infer compare -m runs/tiny/best --backends cpu,cuda,wgpu --tolerance 1e-4";

/// Where and how a command runs.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    #[arg(long, default_value = "auto", help = nsa_runtime::backend::BACKEND_HELP)]
    pub backend: BackendKind,
    /// Device index within the backend.
    #[arg(long)]
    pub device: Option<usize>,
    /// f32, f16 (CUDA, wgpu) or bf16 (CUDA).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// f32-exact matmuls on GPUs (three tensor-core matmuls each instead of one TF32 pass;
    /// logits then match the CPU to ~1e-5 instead of ~2e-3, decoding is slower).
    #[arg(long)]
    pub exact_matmul: bool,
    /// Treat the device as refusing any single buffer above N MiB, as many Vulkan drivers and
    /// Apple's Metal do at 128-256 MiB whatever the free memory (on wgpu the device is set up
    /// to refuse them): shows that a command stays within such a limit on any machine.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_buffer_mib: Option<u64>,
    /// Prefill a prompt longer than N tokens N query positions at a time (0: in one piece;
    /// default 2048). Each chunk attends to every earlier token, with the same result; memory
    /// then grows with the prompt by little more than the decode cache (a 100K-token prompt in
    /// one piece holds a dozen activations of the whole prompt per layer).
    #[arg(long, value_name = "N")]
    pub prefill_chunk: Option<usize>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory written by nsa-train or import (model.json, tokenizer.json,
    /// model.safetensors).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Prompt text; without it (and without -f, --prompts or -i) the prompt is read from stdin.
    #[arg(short, long, conflicts_with_all = ["file", "prompts", "interactive"])]
    pub prompt: Option<String>,
    /// A file whose whole text is the prompt.
    #[arg(short, long, conflicts_with_all = ["prompts", "interactive"])]
    pub file: Option<PathBuf>,
    /// A file with one prompt per line (a batch of prompts).
    #[arg(long, conflicts_with = "interactive")]
    pub prompts: Option<PathBuf>,
    /// Interactive: read a prompt per line from stdin and answer each with the model kept
    /// loaded, until end of input (Ctrl-D).
    #[arg(short, long)]
    pub interactive: bool,
    /// New tokens per prompt, at most (special tokens count but are not printed).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Stop when the continuation contains this text (repeatable; the text is not printed).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Go on past the end-of-document token ([SEP]) instead of stopping there.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Seed for sampling (default: random, printed so the output can be repeated).
    #[arg(short, long)]
    pub seed: Option<u64>,
    /// Do not start the prompt with the document separator the model was trained with.
    #[arg(long)]
    pub raw_prompt: bool,
    /// Do not print the prompt before the continuation.
    #[arg(long)]
    pub no_echo: bool,
    /// One JSON object per prompt on stdout (text, every token with its id and
    /// log-probability, why it stopped) instead of the streamed text.
    #[arg(long)]
    pub json: bool,
    /// Print the memory the run held at the end (device pool, process peak RSS).
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    /// Top-k as the reference's `thres`: keep the top ceil((1 - thres) * vocab) tokens.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub top_k_thres: f64,
    /// Top-k as a count (overrides --top-k-thres).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// No top-k filter.
    #[arg(long, conflicts_with_all = ["top_k"])]
    pub no_top_k: bool,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Min-p: keep the tokens at least this fraction as likely as the most likely one.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f64>,
    /// Repetition penalty (> 1 discourages tokens seen in the last --repeat-last-n tokens;
    /// 1 = off).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub repeat_penalty: f64,
    /// How many recent tokens (prompt included) the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
}

impl SamplingArgs {
    /// The sampling rule these options give, checked.
    pub fn sampling(&self) -> Result<Sampling, SamplingError> {
        let s = Sampling {
            temperature: if self.greedy { 0.0 } else { self.temperature },
            top_k: if self.no_top_k {
                None
            } else if let Some(k) = self.top_k {
                Some(TopK::Count(k))
            } else {
                Some(TopK::Threshold(self.top_k_thres))
            },
            top_p: self.top_p,
            min_p: self.min_p,
            repetition: Some(Repetition {
                penalty: self.repeat_penalty,
                last_n: self.repeat_last_n,
            })
            .filter(|r| r.penalty != 1.0),
        };
        s.validate()?;
        Ok(s)
    }
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Model directory.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Text to score: a file or directory (.txt, .gz, JSON lines, Wikipedia abstract XML), or
    /// `-` for stdin (plain text).
    pub file: PathBuf,
    /// Tokens of context per window (default: the model's trained context, else 256).
    #[arg(long)]
    pub context: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Also give every token's log-probability (tab-separated lines: position, id, token,
    /// log-probability; or in the JSON).
    #[arg(long)]
    pub per_token: bool,
    /// The result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print the memory the run held at the end (device pool, process peak RSS).
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model directory.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Token ids, whitespace-separated, in a file (`-` for stdin).
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    pub tokens: Option<PathBuf>,
    /// A text file to tokenize (`-` for stdin), preceded by the document separator unless
    /// --raw-prompt.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Do not start the text with the document separator.
    #[arg(long)]
    pub raw_prompt: bool,
    /// Output file: `.safetensors` (logits and ids) or `.npy` (logits; ids in <name>.ids.npy).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The reference's state_dict: `.pt`/`.pth` (torch.save) or `.safetensors`.
    #[arg(long)]
    pub weights: PathBuf,
    /// JSON of the reference `Transformer(...)` constructor arguments [default: args.json
    /// beside the weights].
    #[arg(long)]
    pub args: Option<PathBuf>,
    /// Tokenizer (tokenizer.json or BERT vocab.txt) [default: tokenizer.json beside the
    /// weights, else bert-base-chinese].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The context the model was trained for, recorded in model.json [default: the one in an
    /// exported weights file].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Model directory.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Text to run (default: 200 pseudo-random tokens).
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Backends to compare with the first one (default: every available one, CPU first).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<BackendKind>,
    /// Fail (exit 1) when a backend differs from the first by more than this.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
    /// Keep the GPUs' TF32 tensor-core matmuls (default: f32-exact, see --exact-matmul).
    #[arg(long)]
    pub tf32: bool,
    /// Also write the result as a benchmark record (benchmarks/results format) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model directory.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Output directory: model.safetensors (the reference's naming), args.json (its
    /// constructor arguments) and tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
