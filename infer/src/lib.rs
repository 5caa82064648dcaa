//! Inference for NSA language models: generation with the KV cache, perplexity scoring, decode
//! benchmarks, and conversion to and from the PyTorch reference's checkpoints. The binaries
//! (`nsa-infer`, and `nsa-bench` for the benchmarks) are thin CLIs over this.

pub mod bench_cli;
pub mod cli;
pub mod generate;
pub mod logits_file;
pub mod memory;
pub mod record;
pub mod run;
pub mod stream;
