//! The command line of `nsa-bench` (in the library so that the tests can check the commands
//! of README.md and BENCHMARKS.md against it).

use std::path::PathBuf;

use clap::Parser;
use nsa_model::NsaConfig;
use nsa_runtime::backend::{BackendKind, Precision};
use serde::{Deserialize, Serialize};

const EXAMPLES: &str = "\
Examples:
  nsa-bench --backend cuda --suite layer --lengths 4k,64k --precisions bf16 --json layer.json
  nsa-bench --backend cuda --suite check --lengths 1k --precisions f32,bf16
  nsa-bench --backend cpu --suite train --train-shapes 256x4 --runs 3
  nsa-bench --suite decode --backend cuda
  nsa-bench --suite decode -m runs/tiny/best --backend cpu --prompt-len 512 -n 128 --json bench.json

The decode suite (decode speed at batch 1 and time to first token) runs on its own, in this
process, and writes one record (`--json`) of its own format.

Exit status: 1 when a check row is not ok (mismatch, skipped or failed) or a row ends in an
error; out-of-memory and time-outs of benchmark rows are measurements, not failures.";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "nsa-bench",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BUILD_GIT_COMMIT"), ")"),
    about = "Benchmark one NSA layer vs dense attention, training steps of the seed model, and decoding",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[arg(long, default_value = "auto", help = nsa_runtime::backend::BACKEND_HELP)]
    pub backend: BackendKind,
    /// Device index within the backend.
    #[arg(long)]
    pub device: Option<usize>,
    /// What to run: layer, train, check (comma-separated), or decode (alone).
    #[arg(long, value_delimiter = ',', default_value = "layer,train",
          value_parser = ["layer", "train", "check", "decode"])]
    pub suite: Vec<String>,
    /// Sequence lengths of the layer benchmark (k = 1024).
    #[arg(long, value_delimiter = ',', default_value = "1k,4k,16k,32k,64k,128k")]
    pub lengths: Vec<String>,
    /// Precisions of the layer benchmark (default: f32 and bf16 on CUDA, f32 and f16 on wgpu,
    /// f32 on the CPU).
    #[arg(long, value_delimiter = ',')]
    pub precisions: Vec<Precision>,
    /// Layer implementations: nsa (fused kernels where available), nsa-tensor (tensor ops
    /// only), full (dense attention), dsa (DeepSeek sparse attention, tensor ops: no kernels
    /// yet, quadratic; the default `[model.dsa]`). The training rows run nsa and/or full from
    /// this list.
    #[arg(long, value_delimiter = ',', default_value = "nsa,nsa-tensor,full",
          value_parser = ["nsa", "nsa-tensor", "full", "dsa"])]
    pub impls: Vec<String>,
    /// Passes: fwd, fwd+bwd.
    #[arg(long, value_delimiter = ',', default_value = "fwd,fwd+bwd",
          value_parser = ["fwd", "fwd+bwd"])]
    pub passes: Vec<String>,
    /// Training-step shapes as SEQxBATCH.
    #[arg(long, value_delimiter = ',', default_value = "256x16,4096x1")]
    pub train_shapes: Vec<String>,
    /// How the training step computes its loss and gradients: `plain` (unchunked logits, one
    /// graph: the published rows), `chunked` (logits a chunk at a time, as nsa-train does),
    /// `recompute` (chunked, each block recomputed in the backward pass: nsa-train
    /// --recompute).
    #[arg(long, value_delimiter = ',', default_value = "plain",
          value_parser = ["plain", "chunked", "recompute"])]
    pub train_modes: Vec<String>,
    /// Precisions of the training step (f32 is what nsa-train uses).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub train_precisions: Vec<Precision>,
    /// Warm-up runs (not timed).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs (the median is reported) [default: 5; decode: 3 warm runs after the first].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Seconds a row may take before it is killed.
    #[arg(long, default_value_t = 900)]
    pub row_timeout: u64,
    /// Run every row in this process (no isolation; an out-of-memory error ends the run).
    #[arg(long)]
    pub in_process: bool,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub layer: LayerArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// The variants of the check suite: the benchmark layer (`bench`), a selection per query
    /// head (`noshare`) and straight-through top-k (`difftopk`).
    #[arg(long, value_delimiter = ',', default_value = "bench,noshare,difftopk",
          value_parser = ["bench", "noshare", "difftopk"])]
    pub check_variants: Vec<String>,
    /// Internal: run one row described by this JSON and print its result.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

impl Cli {
    /// `--runs`, or the default of the suites run.
    pub fn runs(&self) -> usize {
        let decode = self.suite.iter().any(|s| s == "decode");
        self.runs.unwrap_or(if decode { 3 } else { 5 })
    }
}

/// The decode suite's options (decode speed at batch 1 and time to first token).
#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Decode: model directory; without it, the seed config (vocab 21128, dim 512, depth 6, 8
    /// heads, 16/16/16/4) with random weights.
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Decode: dense attention for the random-weight model.
    #[arg(long, conflicts_with = "dsa")]
    pub full: bool,
    /// Decode: DeepSeek sparse attention for the random-weight model (the default `[model.dsa]`:
    /// 4 indexer heads, top-k 2048, window 64).
    #[arg(long)]
    pub dsa: bool,
    /// Decode: prompt tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Decode: new tokens per run.
    #[arg(short = 'n', long, alias = "new-tokens", default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Decode: f32, f16 (CUDA, wgpu) or bf16 (CUDA).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Decode: f32-exact matmuls on GPUs (three tensor-core matmuls each instead of one TF32
    /// pass; slower).
    #[arg(long)]
    pub exact_matmul: bool,
}

/// The benchmark layer (defaults: the H100 reference setting).
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct LayerArgs {
    /// Model width of the layer.
    #[arg(long, default_value_t = 1024)]
    pub dim: usize,
    /// Width of one attention head.
    #[arg(long, default_value_t = 64)]
    pub dim_head: usize,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    /// Key/value heads (GQA groups).
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    /// Tokens per compression block (the compressed branch).
    #[arg(long, default_value_t = 32)]
    pub compress_block: usize,
    /// Tokens between compression block starts.
    #[arg(long, default_value_t = 16)]
    pub stride: usize,
    /// Tokens per selection block (the selected branch).
    #[arg(long, default_value_t = 64)]
    pub selection_block: usize,
    /// Selection blocks per query.
    #[arg(long, default_value_t = 16)]
    pub selected: usize,
    /// Sliding window (tokens before the query).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Sequences per layer call.
    #[arg(long, visible_alias = "batch", default_value_t = 1)]
    #[serde(rename = "batch")]
    pub batch_size: usize,
}

impl LayerArgs {
    /// The NSA layer of these settings.
    pub fn nsa(&self) -> NsaConfig {
        NsaConfig::new(
            self.dim,
            self.dim_head,
            self.heads,
            self.window,
            self.compress_block,
            self.stride,
            self.selection_block,
            self.selected,
        )
        .with_kv_heads(self.kv_heads)
    }
}
