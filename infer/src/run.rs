//! The work `nsa-infer` does on whichever backend was chosen at run time, besides generation
//! ([`crate::generate`]): perplexity scoring, the decode benchmark and the logits of a token
//! sequence. Each job implements [`OnBackend`], so it is compiled once per backend and
//! precision.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use nsa_model::head_loss::logits_budget;
use nsa_model::interop::StateDict;
use nsa_model::kernels::KernelOptions;
use nsa_model::{LayerSelection, Sampling, SplitMix64, Transformer, TransformerConfig};
use nsa_runtime::backend::{BackendChoice, OnBackend};
use nsa_runtime::bundle::build_model;
use nsa_runtime::tokenizer::Tokenizer;
use serde::Serialize;

use crate::memory::MemoryStats;

/// Builds the model on `device` from host weights, or with random weights when `weights` is
/// `None` (benchmarks).
pub(crate) fn model<B: Backend>(
    config: &TransformerConfig,
    weights: Option<StateDict>,
    options: KernelOptions,
    device: &B::Device,
) -> Result<Transformer<B>> {
    // the weights stay for the whole run: exactly sized buffers
    let model = Transformer::with_exact_weights(device, || -> Result<Transformer<B>> {
        Ok(match weights {
            Some(w) => build_model::<B>(config, w, device)
                .context("the weights do not match model.json")?,
            None => config.init::<B>(device)?,
        })
    })?;
    Ok(model.with_kernel_options(options))
}

/// Token ids of a prompt: the document separator first (what the model saw at the start of
/// every training document) unless `raw`, then the text.
pub fn prompt_ids(tokenizer: &Tokenizer, text: &str, raw: bool) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    if !raw {
        if let Some(sep) = tokenizer.sep_id() {
            ids.push(sep);
        }
    }
    ids.extend(tokenizer.encode(text)?);
    if ids.is_empty() {
        bail!(
            "the prompt is empty and the tokenizer has no [SEP] token to start from; give --prompt"
        );
    }
    Ok(ids)
}

/// The context a prompt must fit, and where it comes from: the model's `max_seq_len`, or
/// [`crate::cli::MAX_UNKNOWN_CONTEXT`] when the model records none.
fn context_limit(config: &TransformerConfig) -> (usize, &'static str) {
    match config.max_seq_len {
        Some(ctx) => (ctx, "max_seq_len in model.json"),
        None => (
            crate::cli::MAX_UNKNOWN_CONTEXT,
            "the limit for a model that records no max_seq_len",
        ),
    }
}

/// The most tokens a generation after a prompt of `prompt_len` tokens may add: the rest of
/// the context ([`context_limit`]), at least 1, or an error when the prompt fills it.
pub fn generation_room(config: &TransformerConfig, prompt_len: usize) -> Result<usize> {
    check_context(config, prompt_len)?;
    let (ctx, _) = context_limit(config);
    if prompt_len >= ctx {
        bail!(
            "the prompt has {prompt_len} tokens and fills the model's context of {ctx}: no room \
             to generate; shorten the prompt"
        );
    }
    Ok(ctx - prompt_len)
}

/// Checks a prompt against the model's context ([`context_limit`]).
pub fn check_context(config: &TransformerConfig, prompt_len: usize) -> Result<()> {
    let (ctx, what) = context_limit(config);
    if prompt_len > ctx {
        bail!(
            "the prompt has {prompt_len} tokens, more than the model's context of {ctx} \
             ({what}); shorten the prompt"
        );
    }
    Ok(())
}

/// Perplexity of a token stream.
pub struct ScoreJob {
    /// Model config.
    pub config: TransformerConfig,
    /// Weights.
    pub weights: StateDict,
    /// How the model runs (fused kernels, exact products).
    pub options: KernelOptions,
    /// The token stream (documents joined by the separator).
    pub tokens: Vec<u32>,
    /// Window length (tokens of context per prediction window).
    pub context: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Keep every predicted token's log-probability.
    pub per_token: bool,
    /// Sample the memory held (`--stats`).
    pub stats: bool,
}

/// Result of scoring.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    /// Tokens predicted.
    pub tokens: usize,
    /// Mean negative log-likelihood in nats per token.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Seconds.
    pub seconds: f64,
    /// With `per_token`: the natural log-probability of every predicted token; entry `i` is
    /// token `i + 1` of the stream (the first token is not predicted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<f64>,
    /// The memory held, with `--stats` (sampled after every batch of windows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

impl OnBackend for ScoreJob {
    type Output = Result<ScoreReport>;

    fn run<B: Backend>(self, device: B::Device, choice: &BackendChoice) -> Result<ScoreReport> {
        let t0 = Instant::now();
        let model = model::<B>(&self.config, Some(self.weights), self.options, &device)?;
        let n = self.tokens.len();
        if n < 2 {
            bail!("the text has {n} token(s); scoring needs at least 2");
        }
        // windows of `context + 1` tokens every `context` tokens: each target predicted once;
        // all are full length but the last, which is scored on its own
        let ctx = self.context;
        let starts: Vec<usize> = (0..).map(|w| w * ctx).take_while(|&s| s + 1 < n).collect();
        let (full, tail): (Vec<usize>, Vec<usize>) = starts.iter().partition(|&&s| s + ctx < n);
        let mut total = 0.0f64;
        let mut count = 0usize;
        let mut logprobs = vec![0.0f64; if self.per_token { n - 1 } else { 0 }];
        let mut memory = self.stats.then(MemoryStats::default);
        // the logits a chunk of tokens at a time, within the device's buffer limit
        let budget = logits_budget(choice.max_tensor_bytes);
        let mut batches: Vec<(Vec<usize>, usize)> = full
            .chunks(self.batch)
            .map(|c| (c.to_vec(), ctx + 1))
            .collect();
        batches.extend(tail.into_iter().map(|s| (vec![s], n - s)));
        for (group, len) in batches {
            let b = group.len();
            let ids: Vec<i64> = group
                .iter()
                .flat_map(|&s| self.tokens[s..s + len].iter().map(|&t| t as i64))
                .collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, len]), &device);
            let picked = model.next_token_log_probs(ids, budget);
            if self.per_token {
                let values = picked
                    .clone()
                    .into_data()
                    .convert::<f64>()
                    .into_vec::<f64>()
                    .map_err(|e| anyhow::anyhow!("log-probabilities: {e:?}"))?;
                for (w, &s) in group.iter().enumerate() {
                    let row = &values[w * (len - 1)..(w + 1) * (len - 1)];
                    logprobs[s..s + len - 1].copy_from_slice(row);
                }
            }
            let sum: f64 = picked.sum().into_scalar().elem();
            total -= sum;
            count += b * (len - 1);
            if let Some(m) = memory.as_mut() {
                m.sample(&device);
            }
        }
        let nll = total / count as f64;
        Ok(ScoreReport {
            tokens: count,
            nll,
            perplexity: nll.exp(),
            seconds: t0.elapsed().as_secs_f64(),
            logprobs,
            memory,
        })
    }
}

/// Decode benchmark at batch 1.
pub struct BenchJob {
    /// Model config.
    pub config: TransformerConfig,
    /// Weights, or random ones.
    pub weights: Option<StateDict>,
    /// How the model runs (fused kernels, exact products).
    pub options: KernelOptions,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// New tokens per timed run.
    pub new_tokens: usize,
    /// Timed runs after the first.
    pub runs: usize,
    /// Sampling.
    pub sampling: Sampling,
    /// Process start.
    pub started: Instant,
}

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Backend and device.
    pub device: String,
    /// Seconds from process start until the model was on the device.
    pub load_s: f64,
    /// Seconds from process start to the first generated token (first run, cold).
    pub first_token_s: f64,
    /// Decode tokens per second of the first (cold) run.
    pub cold_tokens_per_s: f64,
    /// Median over the warm runs: prefill seconds.
    pub prefill_s: f64,
    /// Median over the warm runs: decode tokens per second (excluding the prefill).
    pub tokens_per_s: f64,
    /// Every warm run's decode tokens per second.
    pub tokens_per_s_all: Vec<f64>,
    /// Every warm run's prefill seconds.
    pub prefill_s_all: Vec<f64>,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// New tokens per run.
    pub new_tokens: usize,
    /// Where a decode step's time goes (one more run after the timed ones).
    pub breakdown: StepBreakdown,
    /// Wall microseconds per generated token over the warm runs (prefills included).
    pub wall_us: f64,
    /// The process's busiest threads over the warm runs: name and CPU microseconds per
    /// generated token (Linux; empty elsewhere). A thread near `wall_us` is what limits the
    /// decode loop on the host side.
    pub threads: Vec<(String, f64)>,
    /// The device pool after the cold and warm runs (one generation's caches alive at a time;
    /// the pool keeps what it reserved, so this is their peak) and the process's peak RSS.
    pub memory: MemoryStats,
}

/// CPU time of every thread of this process: `(thread id, name, seconds)` from
/// `/proc/self/task` (`schedstat`'s nanoseconds on the CPU; empty where there is none).
fn thread_times() -> Vec<(u64, String, f64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let id: u64 = t.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let sched = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns: f64 = sched.split_whitespace().next()?.parse().ok()?;
            Some((id, name.trim().to_string(), ns * 1e-9))
        })
        .collect()
}

/// The threads busy for at least 5 % of `wall_us` between two [`thread_times`] snapshots, in
/// CPU microseconds per token (`tokens`), busiest first.
fn busy_threads(
    before: &[(u64, String, f64)],
    after: &[(u64, String, f64)],
    tokens: f64,
    wall_us: f64,
) -> Vec<(String, f64)> {
    let mut busy: Vec<(String, f64)> = after
        .iter()
        .map(|(id, name, s)| {
            let s0 = before.iter().find(|b| b.0 == *id).map_or(0.0, |b| b.2);
            (name.clone(), (s - s0) * 1e6 / tokens)
        })
        .filter(|(_, us)| *us >= 0.05 * wall_us)
        .collect();
    busy.sort_by(|a, b| b.1.total_cmp(&a.1));
    busy.truncate(6);
    busy
}

/// Mean microseconds per token of one decode run taken apart: `step_us` is the host's call of
/// [`Transformer::step`] (recording the step's operations; the GPU backends run them
/// asynchronously), `read_us` the wait for the logits on the host (the rest of the step's
/// execution and the copy), `sample_us` the host's sampling. `pipelined_tokens_per_s`: the
/// same number of steps fed a fixed token, with one sync at the end instead of a read per
/// token (what on-device sampling could reach at most).
#[derive(Debug, Clone, Serialize)]
pub struct StepBreakdown {
    pub step_us: f64,
    pub read_us: f64,
    pub sample_us: f64,
    pub pipelined_tokens_per_s: f64,
}

/// [`StepBreakdown`] of `steps` decode steps after `prompt`.
fn step_breakdown<B: Backend>(
    model: &Transformer<B>,
    prompt: &[u32],
    steps: usize,
    sampling: &Sampling,
    device: &B::Device,
) -> Result<StepBreakdown> {
    let vocab = model.config.num_tokens;
    let steps = steps.max(1);
    let ids = |tokens: &[u32]| {
        let data: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        TensorData::new(data, [tokens.len()])
    };
    let prompt_ids = Tensor::<B, 1, Int>::from_data(ids(prompt), device).reshape([1, prompt.len()]);
    let (_, mut cache) = model.prefill_last(prompt_ids.clone(), steps);
    let mut rng = SplitMix64(99);
    let mut token = prompt[prompt.len() - 1];
    let (mut step_s, mut read_s, mut sample_s) = (0.0, 0.0, 0.0);
    for _ in 0..steps {
        let t0 = Instant::now();
        let id = Tensor::<B, 1, Int>::from_data(ids(&[token]), device);
        let (logits, c) = model.step(id, cache);
        cache = c;
        let t1 = Instant::now();
        let row = logits
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("logits: {e:?}"))?;
        let t2 = Instant::now();
        token = sampling.sample(&row[..vocab], &mut rng) as u32;
        step_s += (t1 - t0).as_secs_f64();
        read_s += (t2 - t1).as_secs_f64();
        sample_s += t2.elapsed().as_secs_f64();
    }
    // one generation's caches at a time (both prefills' would double the process's peak)
    drop(cache);
    let (_, mut cache) = model.prefill_last(prompt_ids, steps);
    let _ = B::sync(device);
    let id = Tensor::<B, 1, Int>::from_data(ids(&[token]), device);
    let t0 = Instant::now();
    let mut last = None;
    for _ in 0..steps {
        let (logits, c) = model.step(id.clone(), cache);
        cache = c;
        last = Some(logits);
    }
    drop(last.map(|l| l.into_data()));
    let pipelined = steps as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let per = |s: f64| s * 1e6 / steps as f64;
    Ok(StepBreakdown {
        step_us: per(step_s),
        read_us: per(read_s),
        sample_us: per(sample_s),
        pipelined_tokens_per_s: pipelined,
    })
}

impl OnBackend for BenchJob {
    type Output = Result<BenchReport>;

    fn run<B: Backend>(self, device: B::Device, sel: &BackendChoice) -> Result<BenchReport> {
        let model = model::<B>(&self.config, self.weights, self.options, &device)?;
        let _ = B::sync(&device);
        let load_s = self.started.elapsed().as_secs_f64();
        let mut rng = SplitMix64(1234);
        let vocab = self.config.num_tokens as u64;
        let prompt: Vec<u32> = (0..self.prompt_len)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let mut first_token_s = 0.0;
        let mut measure = |first: bool| -> Result<(f64, f64)> {
            let t0 = Instant::now();
            let mut t_first = None;
            let new = model.generate(&prompt, self.new_tokens, &self.sampling, 7, |_| {
                if t_first.is_none() {
                    t_first = Some(Instant::now());
                    if first {
                        first_token_s = self.started.elapsed().as_secs_f64();
                    }
                }
                true
            })?;
            let t_first = t_first.context("no token generated")?;
            let prefill = (t_first - t0).as_secs_f64();
            let decode = t_first.elapsed().as_secs_f64();
            Ok((prefill, (new.len() - 1) as f64 / decode.max(1e-9)))
        };
        let (_, cold) = measure(true)?;
        let mut prefills = Vec::new();
        let mut rates = Vec::new();
        let before = thread_times();
        let t_warm = Instant::now();
        for _ in 0..self.runs {
            let (p, r) = measure(false)?;
            prefills.push(p);
            rates.push(r);
        }
        let tokens = (self.runs * self.new_tokens).max(1) as f64;
        let wall_us = t_warm.elapsed().as_secs_f64() * 1e6 / tokens;
        let mut memory = MemoryStats::default();
        memory.sample(&device);
        let threads = busy_threads(&before, &thread_times(), tokens, wall_us);
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        };
        let breakdown = step_breakdown(&model, &prompt, self.new_tokens, &self.sampling, &device)?;
        Ok(BenchReport {
            device: format!("{} {}", sel.kind, sel.device_name),
            load_s,
            first_token_s,
            cold_tokens_per_s: cold,
            prefill_s: median(prefills.clone()),
            tokens_per_s: median(rates.clone()),
            tokens_per_s_all: rates,
            prefill_s_all: prefills,
            memory,
            prompt_len: self.prompt_len,
            new_tokens: self.new_tokens,
            breakdown,
            wall_us,
            threads,
        })
    }
}

/// Logits of a fixed token sequence, for comparing backends.
pub struct LogitsJob {
    /// Model config.
    pub config: TransformerConfig,
    /// Weights.
    pub weights: StateDict,
    /// How the model runs (fused kernels, exact products).
    pub options: KernelOptions,
    /// Token ids `[1, n]`.
    pub tokens: Vec<u32>,
    /// Also record every NSA layer's block selection (a second forward pass).
    pub selections: bool,
}

/// What [`LogitsJob`] computed on one backend.
pub struct LogitsReport {
    /// Logits `[n, vocab]`, row-major.
    pub logits: Vec<f32>,
    /// The block selection of every layer (`None` for dense layers), see
    /// [`Transformer::selections`].
    pub selections: Vec<Option<LayerSelection>>,
}

impl OnBackend for LogitsJob {
    type Output = Result<LogitsReport>;

    fn run<B: Backend>(self, device: B::Device, _: &BackendChoice) -> Result<LogitsReport> {
        let model = model::<B>(&self.config, Some(self.weights), self.options, &device)?;
        let n = self.tokens.len();
        let ids: Vec<i64> = self.tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let logits = model
            .forward(ids.clone())
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(LogitsReport {
            logits,
            selections: if self.selections {
                model.selections(ids)
            } else {
                Vec::new()
            },
        })
    }
}

/// How one backend's [`LogitsReport`] differs from another's.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The element-wise comparison of the logits (infinite error on a NaN or infinity).
    pub logits: nsa_model::Comparison,
    /// Largest absolute logit difference (infinite when a logit is not finite).
    pub max: f64,
    /// The position (row) where it is.
    pub at: usize,
    /// The first position whose largest difference exceeds the tolerance.
    pub first_beyond: Option<usize>,
    /// Per layer: how its block selections differ (`None` where either side has none).
    pub layers: Vec<Option<LayerDifference>>,
}

/// The selection part of a [`Difference`] for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDifference {
    /// Query rows (`batch * selection_heads * seq`).
    pub rows: usize,
    /// Rows whose kept blocks differ, with the reference's top-n margin of each (ascending).
    pub flipped: Vec<(usize, f32)>,
    /// The reference's smallest top-n margin of any row.
    pub smallest_margin: f32,
}

/// Compares `other` with `reference` (logits `[n, vocab]`).
pub fn difference(
    reference: &LogitsReport,
    other: &LogitsReport,
    vocab: usize,
    tolerance: f32,
) -> Difference {
    let vocab = vocab.max(1);
    let logits = match nsa_model::Comparison::of(&other.logits, &reference.logits) {
        Ok(c) => c,
        // a different number of logits: as far apart as can be, from the first row
        Err(_) => nsa_model::Comparison {
            len: 0,
            max_abs: f64::INFINITY,
            at: 0,
            max_reference: 0.0,
            non_finite: None,
        },
    };
    let first_beyond = other
        .logits
        .iter()
        .zip(&reference.logits)
        // `!(d <= tolerance)`: a NaN is beyond any tolerance
        .position(|(a, b)| !((a - b).abs() <= tolerance && a.is_finite() && b.is_finite()))
        .map(|i| i / vocab)
        .or((other.logits.len() != reference.logits.len()).then_some(0));
    let (max, at) = (logits.max_abs, logits.at / vocab);
    let layers = reference
        .selections
        .iter()
        .zip(&other.selections)
        .map(|(r, o)| {
            let (r, o) = (r.as_ref()?, o.as_ref()?);
            let mut flipped: Vec<(usize, f32)> = (0..r.rows.min(o.rows))
                .filter(|&i| r.row(i) != o.row(i))
                .map(|i| (i, r.margin[i]))
                .collect();
            flipped.sort_by(|a, b| a.1.total_cmp(&b.1));
            Some(LayerDifference {
                rows: r.rows,
                flipped,
                smallest_margin: r.margin.iter().copied().fold(f32::INFINITY, f32::min),
            })
        })
        .collect();
    Difference {
        logits,
        max,
        at,
        first_beyond,
        layers,
    }
}
