//! Helpers shared by the integration tests: a tiny model configuration and a small corpus.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use nsa_train::config::{Preset, TrainConfig};
use nsa_train::corpus::default_corpus;

/// A configuration small enough for debug-build tests on the CPU.
pub fn tiny_config() -> TrainConfig {
    let mut c = TrainConfig::preset(Preset::Tiny);
    c.model.dim = 32;
    c.model.depth = 1;
    c.model.dim_head = 16;
    c.model.heads = 2;
    c.model.kv_heads = Some(1);
    c.model.ff_expansion_factor = 2.0;
    c.model.sparse.sliding_window_size = 8;
    c.model.sparse.compress_block_size = 8;
    c.model.sparse.compress_block_sliding_stride = 8;
    c.model.sparse.selection_block_size = 8;
    c.model.sparse.num_selected_blocks = 2;
    c.data.seq_len = 32;
    c.data.val_fraction = 0.05;
    c.data.eval_windows = 8;
    c.optim.lr = 3e-3;
    c.optim.warmup_steps = 2;
    c.train.steps = 8;
    c.train.batch_size = 2;
    c.train.grad_accum = 2;
    c.train.eval_every = 4;
    c.train.sample_every = 4;
    c.train.sample_prime = 8;
    c.train.sample_tokens = 8;
    c.train.log_every = 2;
    c.validate().unwrap();
    c
}

/// Writes the first `docs` documents of the embedded corpus to `dir/corpus.txt`.
pub fn small_corpus(dir: &Path, docs: usize) -> PathBuf {
    let path = dir.join("corpus.txt");
    let text: Vec<String> = default_corpus().into_iter().take(docs).collect();
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}
