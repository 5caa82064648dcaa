//! `nsa-infer`: run a trained NSA model on CUDA, wgpu (Vulkan/Metal/DX12) or the CPU, chosen at
//! run time. The command line is in [`nsa_infer::cli`]; see `nsa-infer --help`.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use nsa_infer::cli::{
    Cli, Command, CompareArgs, DeviceArgs, ExportArgs, GenerateArgs, ImportArgs, LogitsArgs,
    ScoreArgs, MAX_UNKNOWN_CONTEXT,
};
use nsa_infer::generate::{GenerateJob, Prompt, Prompts, Stops};
use nsa_infer::run::{LogitsJob, ScoreJob};
use nsa_model::kernels::KernelOptions;
use nsa_model::TransformerConfig;
use nsa_runtime::backend::{self, BackendChoice, BackendKind, DeviceRequest, Precision};
use nsa_runtime::bundle::{self, Bundle};
use nsa_runtime::failure::PanicHook;
use nsa_runtime::kernel_cache::{self, Workload};
use nsa_runtime::reference::{self, ReferenceArgs, ARGS_FILE};
use nsa_runtime::tokenizer::Tokenizer;

/// The panic hook, told the chosen device's buffer limit by [`select`].
static PANIC_HOOK: std::sync::OnceLock<PanicHook> = std::sync::OnceLock::new();

fn main() {
    let started = Instant::now();
    let hook = nsa_runtime::failure::install_panic_hook(
        "nsa-infer",
        nsa_runtime::failure::INFER_MEMORY_HINT,
    );
    let _ = PANIC_HOOK.set(hook);
    nsa_runtime::backend::quiet_headless_probe();
    // argument errors: clap's whole message (usage, tips, --help pointer), exit 2
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    let result = nsa_runtime::environment::check_vars(std::env::vars_os())
        .map_err(anyhow::Error::from)
        .and_then(|()| run(cli, started));
    if let Err(e) = result {
        eprintln!("{}", nsa_runtime::failure::error_line(e.chain()));
        std::process::exit(1);
    }
}

/// The backend `args` ask for, and the kernel options of the run (the `NSA_*` switches of the
/// environment and `--exact-matmul`).
fn select(args: &DeviceArgs) -> Result<(BackendChoice, KernelOptions)> {
    let choice = backend::select(DeviceRequest {
        kind: args.backend,
        index: args.device,
    })?
    .limit_buffers(args.max_buffer_mib.map(|m| m << 20));
    if let Some(hook) = PANIC_HOOK.get() {
        hook.set_buffer_limit(choice.max_tensor_bytes);
    }
    eprintln!(
        "backend: {} {} ({}), {}",
        choice.kind, choice.index, choice.device_name, choice.reason
    );
    kernel_cache::configure(Workload::Inference);
    let options = nsa_runtime::environment::kernel_options(std::env::vars_os())?;
    let options = KernelOptions {
        exact_matmul: args.exact_matmul,
        prefill_chunk: args.prefill_chunk.unwrap_or(options.prefill_chunk),
        ..options
    };
    Ok((choice, options))
}

fn read_bundle(dir: &Path) -> Result<Bundle> {
    Ok(Bundle::read(dir)?)
}

/// The text of `path`, or of stdin for `-`.
fn read_text(path: &Path, what: &str) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("{what}: reading stdin (is it UTF-8?)"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))
}

fn run(cli: Cli, started: Instant) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args, started),
        Command::Score(args) => score(args),
        Command::Logits(args) => logits(args),
        Command::Import(args) => import(args),
        Command::Export(args) => export(args),
        Command::Compare(args) => compare(args),
        Command::Devices => {
            devices();
            Ok(())
        }
    }
}

/// The prompts of `generate`: `-p`, `-f`, `--prompts`, `-i` or stdin.
fn prompts(args: &GenerateArgs) -> Result<Prompts> {
    let one = |text: String, origin: &str| {
        Prompts::Given(vec![Prompt {
            text,
            origin: origin.to_string(),
        }])
    };
    if args.interactive {
        return Ok(Prompts::Interactive);
    }
    if let Some(p) = &args.prompt {
        return Ok(one(p.clone(), "--prompt"));
    }
    if let Some(file) = &args.file {
        let text = read_text(file, "--file")?;
        let origin = format!("--file {}", file.display());
        return Ok(one(text.trim_end_matches('\n').to_string(), &origin));
    }
    if let Some(file) = &args.prompts {
        let text = read_text(file, "--prompts")?;
        let lines: Vec<Prompt> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| Prompt {
                text: l.trim().to_string(),
                origin: format!("--prompts {} line {}", file.display(), i + 1),
            })
            .collect();
        if lines.is_empty() {
            bail!("--prompts {}: no prompt in the file", file.display());
        }
        return Ok(Prompts::Given(lines));
    }
    if std::io::stdin().is_terminal() {
        bail!(
            "give --prompt TEXT, --file FILE, --prompts FILE or --interactive, or pipe the prompt \
             on stdin"
        );
    }
    let text = read_text(Path::new("-"), "the prompt")?;
    Ok(one(text.trim_end_matches('\n').to_string(), "stdin"))
}

fn generate(args: GenerateArgs, started: Instant) -> Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if args.stop.iter().any(String::is_empty) {
        bail!("--stop: an empty stop string would stop at once");
    }
    let sampling = args.sampling.sampling()?;
    let bundle = read_bundle(&args.model)?;
    let prompts = prompts(&args)?;
    // every prompt fits, before anything is loaded on a device
    if let Prompts::Given(list) = &prompts {
        for p in list {
            let ids = nsa_infer::run::prompt_ids(&bundle.tokenizer, &p.text, args.raw_prompt)
                .with_context(|| p.origin.clone())?;
            nsa_infer::run::generation_room(&bundle.config, ids.len())
                .with_context(|| p.origin.clone())?;
        }
    }
    let (choice, options) = select(&args.device)?;
    let seed = match args.seed {
        Some(seed) => seed,
        None => {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000)
                .unwrap_or(0);
            // greedy decoding draws nothing: no seed to repeat
            if sampling.temperature > 0.0 {
                eprintln!("seed: {seed} (pass --seed {seed} to repeat)");
            }
            seed
        }
    };
    let stops = Stops {
        eos: bundle.tokenizer.sep_id().filter(|_| !args.ignore_eos),
        strings: args.stop.clone(),
    };
    let job = GenerateJob {
        config: bundle.config,
        weights: bundle.weights,
        options,
        tokenizer: bundle.tokenizer,
        prompts,
        raw_prompt: args.raw_prompt,
        max_new: args.max_new_tokens,
        stops,
        sampling,
        seed,
        echo_prompt: !args.no_echo,
        json: args.json,
        started,
        stats: args.stats,
    };
    let report = backend::dispatch(&choice, args.device.precision, job)??;
    if let Some(t) = report.first_token_s {
        let special = match report.special {
            0 => String::new(),
            n => format!(" ({n} special, not printed)"),
        };
        eprintln!(
            "{} tokens{special} in {:.2} s ({:.1} tokens/s); first token {:.2} s after start",
            report.tokens,
            report.generate_s,
            report.tokens as f64 / report.generate_s.max(1e-9),
            t
        );
    }
    if let Some(m) = report.memory {
        eprintln!("{m}");
    }
    Ok(())
}

/// The context of `score` and `logits`: at most the model's, at least 1.
fn context(asked: Option<usize>, config: &TransformerConfig) -> Result<usize> {
    let context = asked.or(config.max_seq_len).unwrap_or(256);
    if context == 0 {
        bail!("--context must be at least 1");
    }
    let limit = config.max_seq_len.unwrap_or(MAX_UNKNOWN_CONTEXT);
    if context > limit {
        bail!(
            "--context {context} is longer than the model's context of {limit} tokens{}",
            if config.max_seq_len.is_some() {
                " (max_seq_len in model.json)"
            } else {
                ""
            }
        );
    }
    Ok(context)
}

fn score(args: ScoreArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let bundle = read_bundle(&args.model)?;
    let context = context(args.context, &bundle.config)?;
    let docs = if args.file == Path::new("-") {
        nsa_runtime::documents::read_documents_from(std::io::stdin().lock(), "stdin")?
    } else {
        nsa_runtime::documents::read_documents(&args.file)?
    };
    let sep = bundle.tokenizer.sep_id();
    let mut tokens = Vec::new();
    for doc in &docs {
        if let Some(sep) = sep {
            tokens.push(sep);
        }
        tokens.extend(bundle.tokenizer.encode(doc)?);
    }
    let (choice, options) = select(&args.device)?;
    let job = ScoreJob {
        config: bundle.config,
        weights: bundle.weights,
        options,
        tokens: tokens.clone(),
        context,
        batch: args.batch_size,
        per_token: args.per_token,
        stats: args.stats,
    };
    let r = backend::dispatch(&choice, args.device.precision, job)??;
    let name = args.file.display().to_string();
    if args.json {
        let per_token: Vec<serde_json::Value> = r
            .logprobs
            .iter()
            .enumerate()
            .map(|(i, lp)| {
                let id = tokens[i + 1];
                serde_json::json!({
                    "position": i + 1,
                    "id": id,
                    "token": bundle.tokenizer.id_to_token(id).unwrap_or_default(),
                    "logprob": lp,
                })
            })
            .collect();
        let mut out = serde_json::json!({
            "file": name,
            "tokens": r.tokens,
            "nll": r.nll,
            "perplexity": r.perplexity,
            "seconds": r.seconds,
            "context": context,
        });
        if let Some(m) = r.memory {
            out["memory"] = serde_json::to_value(m)?;
        }
        if args.per_token {
            out["per_token"] = serde_json::Value::Array(per_token);
        }
        println!("{out}");
        return Ok(());
    }
    if args.per_token {
        println!("position\tid\ttoken\tlogprob");
        for (i, lp) in r.logprobs.iter().enumerate() {
            let id = tokens[i + 1];
            let token = bundle.tokenizer.id_to_token(id).unwrap_or_default();
            println!("{}\t{id}\t{token}\t{lp:.6}", i + 1);
        }
    }
    println!(
        "{name}: {} tokens, mean NLL {:.4} nats/token, perplexity {:.2} ({:.1} s)",
        r.tokens, r.nll, r.perplexity, r.seconds
    );
    if let Some(m) = r.memory {
        eprintln!("{m}");
    }
    Ok(())
}

fn logits(args: LogitsArgs) -> Result<()> {
    let bundle = read_bundle(&args.model)?;
    let tokens: Vec<u32> = match (&args.tokens, &args.text) {
        (Some(path), _) => {
            let text = read_text(path, "--tokens")?;
            text.split_whitespace()
                .enumerate()
                .map(|(i, t)| {
                    let id: u32 = t.parse().with_context(|| {
                        format!("--tokens {}: entry {} `{t}` is not a token id", path.display(), i + 1)
                    })?;
                    if id as usize >= bundle.config.num_tokens {
                        bail!(
                            "--tokens {}: entry {} is id {id}, outside the model's vocabulary of {}",
                            path.display(),
                            i + 1,
                            bundle.config.num_tokens
                        );
                    }
                    Ok(id)
                })
                .collect::<Result<_>>()?
        }
        (None, Some(path)) => {
            let text = read_text(path, "--text")?;
            nsa_infer::run::prompt_ids(
                &bundle.tokenizer,
                text.trim_end_matches('\n'),
                args.raw_prompt,
            )?
        }
        (None, None) => bail!("give --tokens FILE or --text FILE"),
    };
    if tokens.is_empty() {
        bail!("no tokens to run");
    }
    nsa_infer::run::check_context(&bundle.config, tokens.len())?;
    let out = nsa_infer::logits_file::Output::from_path(&args.out)?;
    let (choice, options) = select(&args.device)?;
    let job = LogitsJob {
        config: bundle.config.clone(),
        weights: bundle.weights,
        options,
        tokens: tokens.clone(),
        selections: false,
    };
    let report = backend::dispatch(&choice, args.device.precision, job)??;
    let written = out.write(&report.logits, &tokens, bundle.config.num_tokens)?;
    eprintln!(
        "wrote {} ({} tokens × {} logits, f32)",
        written.join(" and "),
        tokens.len(),
        bundle.config.num_tokens
    );
    Ok(())
}

fn import(args: ImportArgs) -> Result<()> {
    let beside = |name: &str| args.weights.with_file_name(name);
    let args_path = match &args.args {
        Some(p) => p.clone(),
        None if beside(ARGS_FILE).is_file() => beside(ARGS_FILE),
        None => bail!(
            "--args: no args.json beside {}; give the reference's constructor arguments with \
             --args FILE",
            args.weights.display()
        ),
    };
    let ref_args = ReferenceArgs::read(&args_path)?;
    let mut config = ref_args
        .to_config()
        .with_context(|| format!("--args {}", args_path.display()))?;
    let weights = reference::read_state_dict(&args.weights)?;
    config.max_seq_len = match args.max_seq_len {
        Some(n) => Some(n),
        None => {
            let recorded = reference::recorded_config(&args.weights)?.and_then(|c| c.max_seq_len);
            match recorded {
                Some(n) => eprintln!(
                    "context: max_seq_len {n}, as recorded in {}",
                    args.weights.display()
                ),
                None => eprintln!(
                    "context: unknown (no --max-seq-len and none recorded in {}): prompts of any \
                     length are accepted",
                    args.weights.display()
                ),
            }
            recorded
        }
    };
    let (tokenizer, which) = match &args.tokenizer {
        Some(p) => (
            Tokenizer::from_file(p).with_context(|| format!("--tokenizer {}", p.display()))?,
            p.display().to_string(),
        ),
        None if beside("tokenizer.json").is_file() => {
            let p = beside("tokenizer.json");
            (
                Tokenizer::from_file(&p).with_context(|| format!("{}", p.display()))?,
                p.display().to_string(),
            )
        }
        None => (
            nsa_runtime::tokenizer::bert_base_chinese(),
            "bert-base-chinese (the default: no --tokenizer and no tokenizer.json beside the \
             weights)"
                .to_string(),
        ),
    };
    eprintln!("tokenizer: {which}, {} tokens", tokenizer.vocab_size());
    if tokenizer.vocab_size() > config.num_tokens {
        bail!(
            "the tokenizer has {} tokens but the model only {} (num_tokens); pass the matching \
             --tokenizer",
            tokenizer.vocab_size(),
            config.num_tokens
        );
    }
    if tokenizer.vocab_size() < config.num_tokens {
        eprintln!(
            "note: the tokenizer has {} tokens and the model {}: ids {}..{} have no text and are \
             shown as U+FFFD (\u{FFFD}) if generated",
            tokenizer.vocab_size(),
            config.num_tokens,
            tokenizer.vocab_size(),
            config.num_tokens - 1
        );
    }
    let device = Default::default();
    let model = bundle::build_model::<burn::backend::NdArray<f32>>(&config, weights, &device)
        .with_context(|| {
            format!(
                "{} does not match the arguments in {}",
                args.weights.display(),
                args_path.display()
            )
        })?;
    bundle::write_bundle(&args.out, &model, &tokenizer)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    if args.out.extension().is_some_and(|e| e == "safetensors") && !args.out.is_dir() {
        bail!(
            "--out {}: names a directory (export writes model.safetensors, args.json and \
             tokenizer.json into it)",
            args.out.display()
        );
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!(
            "--out {}: exists and is not a directory",
            args.out.display()
        );
    }
    let b = read_bundle(&args.model)?;
    let device = Default::default();
    let model = b.model::<burn::backend::NdArray<f32>>(&device)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let files = reference::export(&args.out, &model, &b.tokenizer)?;
    eprintln!(
        "wrote {}, {} and {} (in Python: Transformer(**json.load(open(args))).load_state_dict(\
         safetensors.torch.load_file(weights)))",
        files.weights.display(),
        files.args.display(),
        files.tokenizer.display()
    );
    Ok(())
}

fn compare(args: CompareArgs) -> Result<()> {
    let b = read_bundle(&args.model)?;
    let tokens = compare_tokens(&args, &b)?;
    let kinds = compare_kinds(&args)?;
    let mut first: Option<(BackendKind, nsa_infer::run::LogitsReport)> = None;
    let mut worst = 0.0f64;
    let mut flips = false;
    let mut rows = Vec::new();
    for kind in kinds {
        let (choice, options) = select(&DeviceArgs {
            backend: kind,
            device: None,
            precision: Precision::F32,
            exact_matmul: !args.tf32,
            max_buffer_mib: None,
            prefill_chunk: None,
        })?;
        let job = LogitsJob {
            config: b.config.clone(),
            weights: b.weights.clone(),
            options,
            tokens: tokens.clone(),
            selections: true,
        };
        let t0 = Instant::now();
        let report = backend::dispatch(&choice, Precision::F32, job)??;
        let Some((base, reference)) = &first else {
            if !reference_logits(kind, &report, b.config.num_tokens, t0) {
                worst = f64::INFINITY;
            }
            first = Some((kind, report));
            continue;
        };
        let d = nsa_infer::run::difference(reference, &report, b.config.num_tokens, args.tolerance);
        // a NaN (or infinite) difference stays the worst
        if d.max.is_nan() || d.max > worst {
            worst = d.max;
        }
        flips |= print_difference(kind, *base, &d, b.config.num_tokens, args.tolerance, t0);
        rows.push(serde_json::json!({
            "backend": kind.to_string(),
            "device": choice.device_name,
            "against": base.to_string(),
            // null when not finite (JSON has no NaN)
            "max_abs": d.max.is_finite().then_some(d.max),
            "at_position": d.at,
            "first_beyond": d.first_beyond,
            "rows_with_other_blocks": d.layers.iter().flatten().map(|l| l.flipped.len()).sum::<usize>(),
            "smallest_margin": d.layers.iter().flatten().map(|l| l.smallest_margin as f64).fold(f64::INFINITY, f64::min),
        }));
    }
    let failed = worst.is_nan() || worst > args.tolerance as f64;
    if let Some(path) = &args.json {
        write_compare_record(&args, tokens.len(), &rows, !failed, path)?;
    }
    if failed && flips && worst.is_finite() {
        eprintln!(
            "note: some queries kept other key blocks than on the first backend; where their \
             top-n margins are at rounding level, that is a near-tie of the selection, not a \
             numerical fault (see BENCHMARKS.md)"
        );
    }
    if failed {
        bail!(
            "backends differ by {worst:.2e}, more than --tolerance {}",
            args.tolerance
        );
    }
    Ok(())
}

/// The tokens `compare` runs: the prompt's, else 200 pseudo-random ids.
fn compare_tokens(args: &CompareArgs, b: &Bundle) -> Result<Vec<u32>> {
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
    nsa_infer::run::check_context(&b.config, tokens.len())?;
    Ok(tokens)
}

/// The backends `compare` runs: `--backends`, else ndarray, cpu and the GPU backends found;
/// at least two.
fn compare_kinds(args: &CompareArgs) -> Result<Vec<BackendKind>> {
    let kinds = if args.backends.is_empty() {
        let mut k = vec![BackendKind::Ndarray, BackendKind::cpu()];
        k.dedup();
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
    if kinds.len() < 2 {
        bail!(
            "--backends: {} backend(s) to compare; give at least two (e.g. --backends ndarray,cpu)",
            kinds.len()
        );
    }
    Ok(kinds)
}

/// Prints the first backend's run, the reference of the others; `false` when one of its
/// logits is not finite.
fn reference_logits(
    kind: BackendKind,
    report: &nsa_infer::run::LogitsReport,
    num_tokens: usize,
    t0: Instant,
) -> bool {
    println!(
        "{kind}: reference ({} logits, {:.2} s)",
        report.logits.len(),
        t0.elapsed().as_secs_f64()
    );
    match report.logits.iter().position(|x| !x.is_finite()) {
        Some(i) => {
            println!(
                "{kind}: non-finite logit {} at position {}",
                report.logits[i],
                i / num_tokens.max(1)
            );
            false
        }
        None => true,
    }
}

/// Prints how `kind`'s logits differ from those of `base`, and per layer whether its queries
/// selected other key blocks; returns whether some did.
fn print_difference(
    kind: BackendKind,
    base: BackendKind,
    d: &nsa_infer::run::Difference,
    num_tokens: usize,
    tolerance: f32,
    t0: Instant,
) -> bool {
    if let Some(n) = d.logits.non_finite {
        println!(
            "{kind}: non-finite logit {} at position {} ({})",
            n.value,
            n.index / num_tokens.max(1),
            match n.side {
                nsa_model::compare::Side::Ours => kind.to_string(),
                nsa_model::compare::Side::Reference => base.to_string(),
            }
        );
    }
    let beyond = match d.first_beyond {
        Some(p) => format!("; first beyond {tolerance} at position {p}"),
        None => String::new(),
    };
    println!(
        "{kind}: max |logits - {base}| = {:.2e} at position {}{beyond} ({:.2} s)",
        d.max,
        d.at,
        t0.elapsed().as_secs_f64()
    );
    let mut flips = false;
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
    flips
}

/// The `compare` record (`--json`).
fn write_compare_record(
    args: &CompareArgs,
    tokens: usize,
    rows: &[serde_json::Value],
    passed: bool,
    path: &Path,
) -> Result<()> {
    let devices: Vec<String> = rows
        .iter()
        .filter_map(|r| r["device"].as_str().map(String::from))
        .collect();
    nsa_infer::record::Record::on(
        "nsa-infer compare",
        "several",
        &devices.join(", "),
        serde_json::json!({
            "model": args.model.display().to_string(),
            "tokens": tokens,
            "tf32": args.tf32,
            "tolerance": args.tolerance,
        }),
        serde_json::json!({ "rows": rows, "passed": passed }),
    )
    .write(path)?;
    Ok(())
}

fn devices() {
    match backend::probe_cuda() {
        Ok(d) => d
            .iter()
            .enumerate()
            .for_each(|(i, n)| println!("cuda {i}: {n}")),
        Err(e) => println!("cuda: unavailable ({e})"),
    }
    match backend::probe_wgpu() {
        Ok(a) => a.iter().enumerate().for_each(|(i, a)| {
            let l = &a.limits;
            println!(
                "wgpu {i}: {}{} (largest buffer {}, storage binding {}, {} workgroups per \
                 dimension)",
                a.name,
                if a.software { " [software]" } else { "" },
                backend::mib(l.max_buffer),
                backend::mib(l.max_binding),
                l.max_groups
            )
        }),
        Err(e) => println!("wgpu: unavailable ({e})"),
    }
    if cfg!(feature = "flex") {
        println!("cpu 0: CPU (Burn's flex backend; the default CPU backend)");
    }
    if cfg!(feature = "ndarray") {
        println!("ndarray 0: CPU (Burn's ndarray backend; the reference CPU backend)");
    }
}
