//! `nsa-infer`: run a trained NSA model on CUDA, wgpu (Vulkan/Metal/DX12) or the CPU, chosen at
//! run time. See `nsa-infer --help`.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nsa_infer::reference::ReferenceArgs;
use nsa_infer::run::{BenchJob, GenerateJob, ScoreJob};
use nsa_model::{Sampling, TopK, TransformerConfig};
use nsa_train::backend::{self, BackendKind, DeviceRequest, Precision, Selection};
use nsa_train::bundle::{self, Bundle};
use nsa_train::kernel_cache::{self, Workload};
use nsa_train::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(
    name = "nsa-infer",
    version,
    about = "Generate with, score and convert NSA language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streamed, KV-cached).
    Generate(GenerateArgs),
    /// Mean negative log-likelihood and perplexity of a text file.
    Score(ScoreArgs),
    /// Decode speed at batch 1 and time to first token.
    Bench(BenchArgs),
    /// Convert a PyTorch reference checkpoint into a model directory.
    Import(ImportArgs),
    /// Write a model directory's weights for the PyTorch reference.
    Export(ExportArgs),
    /// List the backends and devices this binary can use here.
    Devices,
    /// Run the same model and tokens on several backends and compare their logits.
    Compare(CompareArgs),
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// auto (CUDA, else wgpu, else CPU), cuda, wgpu or ndarray (= cpu).
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Device index within the backend.
    #[arg(long)]
    device: Option<usize>,
    /// f32, f16 (CUDA, wgpu) or bf16 (CUDA).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// f32-exact matmuls on GPUs (three tensor-core matmuls each instead of one TF32 pass;
    /// logits then match the CPU to ~1e-5 instead of ~2e-3, decoding is slower).
    #[arg(long)]
    exact_matmul: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// Model directory written by nsa-train (model.json, tokenizer.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; without it (and without --prompts) the prompt is read from stdin.
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A file with one prompt per line (a batch of prompts).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seed for sampling (default: random, printed so the output can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Do not start the prompt with the document separator the model was trained with.
    #[arg(long)]
    raw_prompt: bool,
    /// Do not print the prompt before the continuation.
    #[arg(long)]
    no_echo: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct SamplingArgs {
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    greedy: bool,
    /// Top-k as the reference's `thres`: keep the top ceil((1 - thres) * vocab) tokens.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    top_k_thres: f64,
    /// Top-k as a count (overrides --top-k-thres).
    #[arg(long)]
    top_k: Option<usize>,
    /// No top-k filter.
    #[arg(long, conflicts_with_all = ["top_k"])]
    no_top_k: bool,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
}

impl SamplingArgs {
    fn sampling(&self) -> Result<Sampling> {
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
        };
        s.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(s)
    }
}

#[derive(Args)]
struct ScoreArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Text to score: a file or directory (.txt, .gz, JSON lines, Wikipedia abstract XML).
    file: PathBuf,
    /// Tokens of context per window (default: the model's trained context, else 256).
    #[arg(long)]
    context: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Model directory; without it, the seed config (vocab 21128, dim 512, depth 6, 8 heads,
    /// 16/16/16/4) with random weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Use dense attention for the random-weight model.
    #[arg(long)]
    full: bool,
    /// Prompt tokens.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// New tokens per run.
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Warm runs to time after the first.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct ImportArgs {
    /// The reference's state_dict: `.pt`/`.pth` (torch.save) or `.safetensors`.
    #[arg(long)]
    weights: PathBuf,
    /// JSON of the reference `Transformer(...)` constructor arguments.
    #[arg(long)]
    args: PathBuf,
    /// Tokenizer (tokenizer.json or BERT vocab.txt); default: bert-base-chinese.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The context the model was trained for, recorded in model.json.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct CompareArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Text to run (default: 200 pseudo-random tokens).
    #[arg(long)]
    prompt: Option<String>,
    /// Backends to compare with the first one (default: every available one, CPU first).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<BackendKind>,
    /// Fail (exit 1) when a backend differs from the first by more than this.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// Keep the GPUs' TF32 tensor-core matmuls (default: f32-exact, see --exact-matmul).
    #[arg(long)]
    tf32: bool,
}

#[derive(Args)]
struct ExportArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Output safetensors file (the constructor arguments go beside it as `<name>.args.json`).
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    let started = Instant::now();
    nsa_train::failure::install_panic_hook("nsa-infer", nsa_train::failure::INFER_MEMORY_HINT);
    nsa_train::backend::quiet_headless_probe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                std::process::exit(if e.use_stderr() { 2 } else { 0 });
            }
            // clap's first line names the option and the problem
            let text = e.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli, started) {
        eprintln!("{}", nsa_train::failure::error_line(e.chain()));
        std::process::exit(1);
    }
}

fn select(args: &DeviceArgs) -> Result<Selection> {
    let selection = backend::select(DeviceRequest {
        kind: args.backend,
        index: args.device,
    })?;
    eprintln!(
        "backend: {} {} ({}), {}",
        selection.kind, selection.index, selection.device_name, selection.reason
    );
    Ok(selection)
}

fn read_bundle(dir: &Path) -> Result<Bundle> {
    Ok(Bundle::read(dir)?)
}

fn run(cli: Cli, started: Instant) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            if args.max_new_tokens == 0 {
                bail!("--max-new-tokens must be at least 1");
            }
            let sampling = args.sampling.sampling()?;
            let prompts = match (&args.prompt, &args.prompts) {
                (Some(p), _) => vec![p.clone()],
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file)
                        .with_context(|| format!("--prompts {}", file.display()))?;
                    let lines: Vec<String> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect();
                    if lines.is_empty() {
                        bail!("--prompts {}: no prompt in the file", file.display());
                    }
                    lines
                }
                (None, None) => {
                    if std::io::stdin().is_terminal() {
                        bail!("give --prompt TEXT, --prompts FILE, or pipe the prompt on stdin");
                    }
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading the prompt from stdin (is it UTF-8?)")?;
                    vec![text.trim_end_matches('\n').to_string()]
                }
            };
            let bundle = read_bundle(&args.model)?;
            let seed = args.seed.unwrap_or_else(|| {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64 % 1_000_000)
                    .unwrap_or(0);
                eprintln!("seed: {seed} (pass --seed {seed} to repeat)");
                seed
            });
            kernel_cache::configure(Workload::Inference);
            let selection = select(&args.device)?;
            nsa_model::tensor_util::set_exact_matmul(args.device.exact_matmul);
            let job = GenerateJob {
                config: bundle.config,
                weights: bundle.weights,
                tokenizer: bundle.tokenizer,
                prompts,
                raw_prompt: args.raw_prompt,
                max_new: args.max_new_tokens,
                sampling,
                seed,
                echo_prompt: !args.no_echo,
                started,
            };
            let report = backend::dispatch(&selection, args.device.precision, job)??;
            if let Some(t) = report.first_token_s {
                eprintln!(
                    "{} tokens in {:.2} s ({:.1} tokens/s); first token {:.2} s after start",
                    report.tokens,
                    report.generate_s,
                    report.tokens as f64 / report.generate_s.max(1e-9),
                    t
                );
            }
        }
        Command::Score(args) => {
            if args.batch_size == 0 {
                bail!("--batch-size must be at least 1");
            }
            let bundle = read_bundle(&args.model)?;
            let context = args.context.or(bundle.config.max_seq_len).unwrap_or(256);
            if context == 0 {
                bail!("--context must be at least 1");
            }
            let docs = nsa_train::corpus::read_documents(&args.file)?;
            let sep = bundle.tokenizer.sep_id();
            let mut tokens = Vec::new();
            for doc in &docs {
                if let Some(sep) = sep {
                    tokens.push(sep);
                }
                tokens.extend(bundle.tokenizer.encode(doc)?);
            }
            kernel_cache::configure(Workload::Inference);
            let selection = select(&args.device)?;
            nsa_model::tensor_util::set_exact_matmul(args.device.exact_matmul);
            let job = ScoreJob {
                config: bundle.config,
                weights: bundle.weights,
                tokens,
                context,
                batch: args.batch_size,
            };
            let r = backend::dispatch(&selection, args.device.precision, job)??;
            println!(
                "{}: {} tokens, mean NLL {:.4} nats/token, perplexity {:.2} ({:.1} s)",
                args.file.display(),
                r.tokens,
                r.nll,
                r.perplexity,
                r.seconds
            );
        }
        Command::Bench(args) => {
            if args.new_tokens < 2 || args.prompt_len == 0 {
                bail!("--new-tokens must be at least 2 and --prompt-len at least 1");
            }
            let (config, weights) = match &args.model {
                Some(dir) => {
                    let b = read_bundle(dir)?;
                    (b.config, Some(b.weights))
                }
                None => {
                    let mut c = TransformerConfig::new(21128, 512, 6);
                    if args.full {
                        c.attention = nsa_model::AttentionKind::Full;
                    }
                    (c, None)
                }
            };
            kernel_cache::configure(Workload::Inference);
            let selection = select(&args.device)?;
            nsa_model::tensor_util::set_exact_matmul(args.device.exact_matmul);
            let job = BenchJob {
                config,
                weights,
                prompt_len: args.prompt_len,
                new_tokens: args.new_tokens,
                runs: args.runs,
                sampling: Sampling::default(),
                started,
            };
            let r = backend::dispatch(&selection, args.device.precision, job)??;
            println!(
                "{} ({}): first token {:.2} s after start (model ready at {:.2} s); \
                 decode {:.1} tokens/s cold, {:.1} tokens/s warm (median of {}), prefill {} tokens {:.1} ms",
                r.device,
                args.device.precision,
                r.first_token_s,
                r.load_s,
                r.cold_tokens_per_s,
                r.tokens_per_s,
                args.runs,
                r.prompt_len,
                r.prefill_s * 1e3
            );
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
            if let Some(path) = args.json {
                let json = serde_json::to_string_pretty(&r)?;
                bundle::atomic_write(&path, json.as_bytes())
                    .with_context(|| format!("{}", path.display()))?;
            }
        }
        Command::Import(args) => {
            let ref_args = ReferenceArgs::read(&args.args)?;
            let mut config = ref_args
                .to_config()
                .with_context(|| format!("--args {}", args.args.display()))?;
            config.max_seq_len = args.max_seq_len;
            let tokenizer = match &args.tokenizer {
                Some(p) => Tokenizer::from_file(p)
                    .with_context(|| format!("--tokenizer {}", p.display()))?,
                None => nsa_train::tokenizer::bert_base_chinese(),
            };
            if tokenizer.vocab_size() > config.num_tokens {
                bail!(
                    "the tokenizer has {} tokens but the model only {} (num_tokens); pass the matching --tokenizer",
                    tokenizer.vocab_size(),
                    config.num_tokens
                );
            }
            let weights = bundle::read_state_dict(&args.weights)?;
            let device = Default::default();
            let model =
                bundle::build_model::<burn::backend::NdArray<f32>>(&config, weights, &device)
                    .with_context(|| {
                        format!(
                            "{} does not match the arguments in {}",
                            args.weights.display(),
                            args.args.display()
                        )
                    })?;
            bundle::write_bundle(&args.out, &model, &tokenizer)?;
            eprintln!("wrote {}", args.out.display());
        }
        Command::Export(args) => {
            let b = read_bundle(&args.model)?;
            let device = Default::default();
            let model = b.model::<burn::backend::NdArray<f32>>(&device)?;
            bundle::write_weights(&args.out, &model)?;
            let args_path = args.out.with_extension("args.json");
            let json = serde_json::to_string_pretty(&ReferenceArgs::from_config(&b.config))?;
            bundle::atomic_write(&args_path, json.as_bytes())
                .with_context(|| format!("{}", args_path.display()))?;
            eprintln!(
                "wrote {} and {} (Transformer(**json.load(args)).load_state_dict(safetensors.torch.load_file(weights)))",
                args.out.display(),
                args_path.display()
            );
        }
        Command::Compare(args) => {
            let b = read_bundle(&args.model)?;
            let tokens = match &args.prompt {
                Some(p) => b.tokenizer.encode(p)?,
                None => {
                    let mut rng = nsa_model::SplitMix64(5);
                    (0..200)
                        .map(|_| (rng.next_u64() % b.config.num_tokens as u64) as u32)
                        .collect()
                }
            };
            if tokens.is_empty() {
                bail!("--prompt gives no tokens");
            }
            let kinds = if args.backends.is_empty() {
                let mut k = vec![BackendKind::cpu()];
                if backend::probe_cuda().is_ok() {
                    k.push(BackendKind::Cuda);
                }
                if backend::probe_wgpu().is_ok() {
                    k.push(BackendKind::Wgpu);
                }
                k
            } else {
                args.backends.clone()
            };
            kernel_cache::configure(Workload::Inference);
            nsa_model::tensor_util::set_exact_matmul(!args.tf32);
            let mut first: Option<(BackendKind, nsa_infer::run::LogitsReport)> = None;
            let mut worst = 0.0f32;
            let mut flips = false;
            for kind in kinds {
                let selection = select(&DeviceArgs {
                    backend: kind,
                    device: None,
                    precision: Precision::F32,
                    exact_matmul: !args.tf32,
                })?;
                let job = nsa_infer::run::LogitsJob {
                    config: b.config.clone(),
                    weights: b.weights.clone(),
                    tokens: tokens.clone(),
                };
                let t0 = Instant::now();
                let report = backend::dispatch(&selection, Precision::F32, job)??;
                let Some((base, reference)) = &first else {
                    println!(
                        "{kind}: reference ({} logits, {:.2} s)",
                        report.logits.len(),
                        t0.elapsed().as_secs_f64()
                    );
                    first = Some((kind, report));
                    continue;
                };
                let d = nsa_infer::run::difference(
                    reference,
                    &report,
                    b.config.num_tokens,
                    args.tolerance,
                );
                worst = worst.max(d.max);
                let beyond = match d.first_beyond {
                    Some(p) => format!("; first beyond {} at position {p}", args.tolerance),
                    None => String::new(),
                };
                println!(
                    "{kind}: max |logits - {base}| = {:.2e} at position {}{beyond} ({:.2} s)",
                    d.max,
                    d.at,
                    t0.elapsed().as_secs_f64()
                );
                for (layer, l) in d.layers.iter().enumerate() {
                    let Some(l) = l else { continue };
                    let margins: Vec<String> = l
                        .flipped
                        .iter()
                        .take(4)
                        .map(|(_, m)| format!("{m:.1e}"))
                        .collect();
                    let flipped = if l.flipped.is_empty() {
                        "same blocks in every row".to_string()
                    } else {
                        flips = true;
                        format!(
                            "{} of {} rows kept other blocks (their top-n margins on {base}: {})",
                            l.flipped.len(),
                            l.rows,
                            margins.join(", ")
                        )
                    };
                    println!(
                        "  layer {layer}: {flipped}; smallest margin of any row {:.1e}",
                        l.smallest_margin
                    );
                }
            }
            if worst > args.tolerance && flips {
                eprintln!(
                    "note: some queries kept other key blocks than on the first backend; where \
                     their top-n margins are at rounding level, that is a near-tie of the \
                     selection, not a numerical fault (see BENCHMARKS.md)"
                );
            }
            if worst > args.tolerance {
                bail!(
                    "backends differ by {worst:.2e}, more than --tolerance {}",
                    args.tolerance
                );
            }
        }
        Command::Devices => {
            match backend::probe_cuda() {
                Ok(d) => d
                    .iter()
                    .enumerate()
                    .for_each(|(i, n)| println!("cuda {i}: {n}")),
                Err(e) => println!("cuda: unavailable ({e})"),
            }
            match backend::probe_wgpu() {
                Ok(a) => a.iter().enumerate().for_each(|(i, a)| {
                    println!(
                        "wgpu {i}: {}{}",
                        a.name,
                        if a.software { " [software]" } else { "" }
                    )
                }),
                Err(e) => println!("wgpu: unavailable ({e})"),
            }
            if cfg!(feature = "ndarray") {
                println!("ndarray 0: CPU");
            }
        }
    }
    Ok(())
}
