//! Writes the exact token stream of a training run, so that another implementation (the
//! PyTorch reference, `scripts/reference_train.py`) trains on the same batches and is
//! evaluated on the same validation windows.
//!
//! ```text
//! cargo run --release -p nsa-train --example export_stream -- CONFIG.toml STEPS OUT_DIR
//! ```
//!
//! `CONFIG.toml` is a training configuration as `nsa-train --config` takes it (any subset of
//! keys over its `preset`). OUT_DIR receives `tokens.u16` (the whole token cache, little-endian
//! u16), `train_starts.u32` (`STEPS × batch_size × grad_accum` window starts, step-major, the
//! rows of one step in micro-batch order), `valid_starts.u32` and `stream.json` (shapes and the
//! optimisation settings).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use nsa_runtime::tokenizer::bert_base_chinese;
use nsa_train::config::TrainConfig;
use nsa_train::corpus::{split, CorpusSource, TokenCache, WindowSampler};
use nsa_train::data::validation_windows;

fn write_all(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    f.write_all(bytes)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        bail!("usage: export_stream CONFIG.toml STEPS OUT_DIR");
    }
    let config = TrainConfig::resolve(None, Some(args[0].as_ref()), &Default::default())?;
    let steps: u64 = args[1].parse().context("STEPS")?;
    let out = PathBuf::from(&args[2]);
    std::fs::create_dir_all(&out)?;
    if config.tokenizer.path.is_some() || config.tokenizer.train.is_some() {
        bail!("export_stream supports the embedded bert-base-chinese tokenizer only");
    }
    let tokenizer = bert_base_chinese();
    let source = if config.data.paths.is_empty() {
        CorpusSource::Default
    } else {
        CorpusSource::Paths(config.data.paths.clone())
    };
    let cache_dir = std::env::temp_dir().join("nsa-export-stream");
    let (cache, _) = TokenCache::load_or_build(&source, &tokenizer, &cache_dir)?;
    let cache = Arc::new(cache);
    let seq_len = config.data.seq_len;
    let (train_range, valid_range) = split(cache.len(), config.data.val_fraction)?;
    let t = &config.train;
    let rows = (t.batch_size * t.grad_accum) as u64;
    let sampler = WindowSampler::new(train_range.clone(), seq_len, t.seed)?;
    let starts: Vec<u8> = (0..steps * rows)
        .flat_map(|k| (sampler.start_at(k) as u32).to_le_bytes())
        .collect();
    let valid: Vec<u8> = validation_windows(valid_range.clone(), seq_len, config.data.eval_windows)
        .into_iter()
        .flat_map(|s| (s as u32).to_le_bytes())
        .collect();
    let tokens = cache.get(0..cache.len());
    if tokenizer.vocab_size() > u16::MAX as usize + 1 {
        bail!("vocabulary too large for u16 tokens");
    }
    let token_bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| (t as u16).to_le_bytes())
        .collect();
    write_all(&out.join("tokens.u16"), &token_bytes)?;
    write_all(&out.join("train_starts.u32"), &starts)?;
    write_all(&out.join("valid_starts.u32"), &valid)?;
    let o = &config.optim;
    let m = &config.model;
    let info = serde_json::json!({
        "num_tokens": tokenizer.vocab_size(),
        "dim": m.dim, "depth": m.depth, "dim_head": m.dim_head, "heads": m.heads,
        "kv_heads": m.kv_heads.unwrap_or(m.heads),
        "ff_expansion_factor": m.ff_expansion_factor,
        "attention": m.attention.to_string(),
        "sparse": {
            "sliding_window_size": m.sparse.sliding_window_size,
            "compress_block_size": m.sparse.compress_block_size,
            "compress_block_sliding_stride": m.sparse.compress_block_sliding_stride,
            "selection_block_size": m.sparse.selection_block_size,
            "num_selected_blocks": m.sparse.num_selected_blocks,
        },
        "seq_len": seq_len, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "steps": steps, "eval_every": t.eval_every, "seed": t.seed,
        "lr": o.lr, "min_lr_ratio": o.min_lr_ratio, "warmup_steps": o.warmup_steps,
        "weight_decay": o.weight_decay, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
        "grad_clip": o.grad_clip,
        "tokens": cache.len(), "train_range": [train_range.start, train_range.end],
        "valid_range": [valid_range.start, valid_range.end],
    });
    write_all(
        &out.join("stream.json"),
        serde_json::to_string_pretty(&info)?.as_bytes(),
    )?;
    println!(
        "{} tokens, {} training windows, {} validation windows -> {}",
        cache.len(),
        steps * rows,
        valid.len() / 4,
        out.display()
    );
    Ok(())
}
