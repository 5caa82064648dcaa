//! The decode suite: decode speed at batch 1 and time to first token of a model directory (or
//! of the seed config with random weights), in this process; prints the figures and writes one
//! record (`--json`).

use nsa_model::kernels::KernelOptions;
use std::time::Instant;

use anyhow::{bail, Result};
use nsa_infer::bench_cli::Cli;
use nsa_infer::cli::MAX_UNKNOWN_CONTEXT;
use nsa_infer::record::Record;
use nsa_infer::run::BenchJob;
use nsa_model::{AttentionKind, Sampling, TransformerConfig};
use nsa_runtime::backend::{self, DeviceRequest};
use nsa_runtime::bundle::Bundle;
use nsa_runtime::kernel_cache::{self, Workload};

/// The tool name of decode records (`scripts/bench_report` reads them with the older
/// `nsa-infer bench` ones).
pub const TOOL: &str = "nsa-bench decode";

/// Runs the decode suite.
pub fn run(cli: &Cli, started: Instant) -> Result<()> {
    let args = &cli.decode;
    let runs = cli.runs();
    if args.max_new_tokens < 2 || args.prompt_len == 0 || runs == 0 {
        bail!("--max-new-tokens must be at least 2, --prompt-len and --runs at least 1");
    }
    let (config, weights) = match &args.model {
        Some(dir) => {
            let b = Bundle::read(dir)?;
            (b.config, Some(b.weights))
        }
        None => {
            let mut c = TransformerConfig::new(21128, 512, 6);
            if args.full {
                c.attention = AttentionKind::Full;
            }
            if args.dsa {
                c.attention = AttentionKind::Dsa;
            }
            (c, None)
        }
    };
    let total = args.prompt_len.saturating_add(args.max_new_tokens);
    let limit = config.max_seq_len.unwrap_or(MAX_UNKNOWN_CONTEXT);
    if total > limit {
        bail!(
            "--prompt-len {} + --max-new-tokens {} = {total} tokens, more than the model's context \
             of {limit}",
            args.prompt_len,
            args.max_new_tokens
        );
    }
    let choice = backend::select(DeviceRequest {
        kind: cli.backend,
        index: cli.device,
    })?;
    eprintln!(
        "backend: {} {} ({}), {}",
        choice.kind, choice.index, choice.device_name, choice.reason
    );
    kernel_cache::configure(Workload::Inference);
    let options = nsa_runtime::environment::kernel_options(std::env::vars_os())?;
    let job = BenchJob {
        config,
        weights,
        options: KernelOptions {
            exact_matmul: args.exact_matmul,
            ..options
        },
        prompt_len: args.prompt_len,
        new_tokens: args.max_new_tokens,
        runs,
        sampling: Sampling::default(),
        started,
    };
    let r = backend::dispatch(&choice, args.precision, job)??;
    println!(
        "{} ({}): first token {:.2} s after start (model ready at {:.2} s); \
         decode {:.1} tokens/s cold, {:.1} tokens/s warm (median of {}), prefill {} tokens {:.1} ms",
        r.device,
        args.precision,
        r.first_token_s,
        r.load_s,
        r.cold_tokens_per_s,
        r.tokens_per_s,
        runs,
        r.prompt_len,
        r.prefill_s * 1e3
    );
    println!("{} (after the timed runs)", r.memory);
    let d = &r.breakdown;
    println!(
        "per token: step call {:.0} µs, wait for the logits {:.0} µs, sampling {:.0} µs; \
         {:.1} tokens/s without a read per token",
        d.step_us, d.read_us, d.sample_us, d.pipelined_tokens_per_s
    );
    if !r.threads.is_empty() {
        let busy: Vec<String> = r
            .threads
            .iter()
            .map(|(name, us)| format!("{name} {us:.0}"))
            .collect();
        println!(
            "host threads, CPU µs per token over the warm runs ({:.0} µs wall): {}",
            r.wall_us,
            busy.join(", ")
        );
    }
    if let Some(path) = &cli.json {
        let record = Record::new(
            TOOL,
            &choice,
            serde_json::json!({
                "precision": args.precision.to_string(),
                "exact_matmul": args.exact_matmul,
                "model": args.model.as_ref().map(|m| m.display().to_string()),
                "full": args.full,
                "dsa": args.dsa,
                "runs": runs,
            }),
            serde_json::to_value(&r)?,
        );
        record.write(path)?;
    }
    Ok(())
}
