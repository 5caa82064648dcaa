//! The steps of a run before training starts, in the order [`super::run`] takes them: the
//! configuration (new or resumed), the backend, the state to start from, the tokenizer, the
//! token cache and its split, the run directory's files and the start-up report. Everything
//! that can be refused is checked before the first file is written.

use std::ops::Range;
use std::path::{Path, PathBuf};

use nsa_model::TransformerConfig;
use nsa_runtime::backend::{select, select_devices, BackendChoice};
use nsa_runtime::bundle::atomic_write;
use nsa_runtime::kernel_cache::cache_root;
use nsa_runtime::tokenizer::{bert_base_chinese, Tokenizer, TokenizerError};

use super::{hex, io_err, DataInfo, RunOptions, Start, TrainError};
use crate::checkpoint::{checkpoint_dir, latest, TrainState};
use crate::config::{ConfigError, Overrides, TokenizerAlgorithm, TrainConfig};
use crate::corpus::{split, CacheOutcome, CorpusError, CorpusSource, TokenCache};
use crate::data::{unigram_entropy, validation_windows};
use crate::parallel::ShardPlan;
use crate::report::{start_notes, thousands, Reporter};
use crate::schedule::WarmupCosine;
use crate::strategy::is_run_dir;

/// The configuration of a run, new or resumed.
pub(super) struct Resolved {
    /// The validated configuration.
    pub config: TrainConfig,
    /// Whether the run continues one in the run directory.
    pub resume: bool,
    /// The planned steps of a resumed run (its saved config.toml).
    pub saved_steps: Option<u64>,
}

/// The configuration: the one given for a new run (whose directory must not hold a run), or
/// the run's saved one with the allowed overrides when resuming.
pub(super) fn resolve_config(options: &RunOptions) -> Result<Resolved, TrainError> {
    let out = &options.out;
    let run_exists = is_run_dir(out);
    let mut saved_steps = None;
    let (mut config, resume) = match &options.start {
        Start::New(config) => {
            if run_exists {
                return Err(TrainError::RunDir(format!(
                    "{} already holds a training run (config.toml): continue it with --resume, \
                     or choose another --out",
                    out.display()
                )));
            }
            (config.clone(), false)
        }
        Start::Resume(o) => {
            if !run_exists {
                return Err(TrainError::RunDir(format!(
                    "{}: no training run to resume (config.toml missing); start one without --resume",
                    out.display()
                )));
            }
            let mut config = TrainConfig::from_file(&out.join("config.toml"))?;
            let planned = config.train.steps;
            saved_steps = Some(planned);
            let allowed = Overrides {
                steps: o.steps,
                eval_every: o.eval_every,
                sample_every: o.sample_every,
                log_every: o.log_every,
                ..Default::default()
            };
            config.apply(&allowed);
            // a new length keeps the schedule of the steps the run was planned with
            if config.train.steps != planned && config.optim.schedule_steps.is_none() {
                config.optim.schedule_steps = Some(planned);
            }
            config.validate()?;
            (config, true)
        }
    };
    if !resume {
        config.validate()?;
        config.data.paths = canonical_paths(&config.data.paths)?;
        if let Some(p) = &config.tokenizer.path {
            if !p.is_file() {
                return Err(TrainError::Tokenizer(TokenizerError::Read {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such file (--tokenizer / tokenizer.path)",
                    ),
                }));
            }
        }
    }
    Ok(Resolved {
        config,
        resume,
        saved_steps,
    })
}

fn canonical_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TrainError> {
    paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p).map_err(|e| {
                TrainError::Corpus(CorpusError::Io {
                    path: p.clone(),
                    source: e,
                })
            })
        })
        .collect()
}

/// The backend and devices (`--devices`: the batch must split evenly over them).
pub(super) fn choose_backend(
    options: &RunOptions,
    config: &TrainConfig,
) -> Result<BackendChoice, TrainError> {
    let choice = match &options.devices {
        Some(list) => select_devices(options.device.kind, list)?,
        None => select(options.device)?,
    };
    if choice.devices.len() > 1 {
        ShardPlan::new(
            config.train.batch_size,
            config.train.grad_accum,
            choice.devices.len(),
        )
        .map_err(|message| ConfigError::Invalid {
            key: "train.grad_accum",
            flag: Some("--devices"),
            message,
        })?;
    }
    Ok(choice)
}

/// The state to start from: the newest checkpoint of a resumed run, else step 0. A resumed
/// run's new `--steps` must lie beyond the steps done.
pub(super) fn starting_state(
    out: &Path,
    config: &TrainConfig,
    resume: bool,
    saved_steps: Option<u64>,
) -> Result<TrainState, TrainError> {
    let state = if resume {
        match latest(&checkpoint_dir(out))? {
            Some(mut s) => {
                s.total_steps = config.train.steps;
                s
            }
            None => TrainState::new(config.train.steps),
        }
    } else {
        TrainState::new(config.train.steps)
    };
    if let Some(planned) = saved_steps {
        let steps = config.train.steps;
        if steps != planned && steps <= state.step {
            return Err(TrainError::RunDir(format!(
                "the run in {} is at step {}: --steps {steps} would not train it further; pass \
                 --steps with more than {} steps to train longer, or leave --steps out",
                out.display(),
                state.step,
                state.step
            )));
        }
    }
    Ok(state)
}

/// Where the training text comes from.
pub(super) fn source_of(config: &TrainConfig) -> CorpusSource {
    if config.data.paths.is_empty() {
        CorpusSource::Default
    } else {
        CorpusSource::Paths(config.data.paths.clone())
    }
}

/// The run's tokenizer: the saved one when resuming, else the file given, one trained on the
/// corpus, or bert-base-chinese.
pub(super) fn load_tokenizer(
    out: &Path,
    config: &TrainConfig,
    resume: bool,
    source: &CorpusSource,
    reporter: &Reporter,
) -> Result<Tokenizer, TrainError> {
    Ok(if resume {
        let path = out.join("tokenizer.json");
        Tokenizer::from_file(&path)?
    } else if let Some(path) = &config.tokenizer.path {
        Tokenizer::from_file(path)?
    } else if let Some(algo) = config.tokenizer.train {
        let docs = source.read()?;
        reporter.line(format!(
            "training a {algo} tokenizer of {} tokens on {} documents",
            thousands(config.tokenizer.vocab_size as u64),
            thousands(docs.len() as u64)
        ));
        match algo {
            TokenizerAlgorithm::Wordpiece => {
                Tokenizer::train_wordpiece_on(&docs, config.tokenizer.vocab_size)?
            }
            TokenizerAlgorithm::Bpe => Tokenizer::train_bpe_on(&docs, config.tokenizer.vocab_size)?,
        }
    } else {
        bert_base_chinese()
    })
}

/// The tokenised corpus and its split.
pub(super) struct PreparedData {
    /// The token cache.
    pub cache: TokenCache,
    /// Facts about it (`data.json`).
    pub info: DataInfo,
    /// The training token range.
    pub train: Range<usize>,
    /// The validation token range.
    pub valid: Range<usize>,
    /// Start offsets of the validation windows of every evaluation.
    pub valid_windows: Vec<usize>,
}

/// Tokenises the corpus (or reuses its cache) and splits it; a split shorter than one window
/// is an error. A resumed run whose corpus changed gets a warning.
pub(super) fn prepare_data(
    options: &RunOptions,
    config: &TrainConfig,
    resume: bool,
    source: &CorpusSource,
    tokenizer: &Tokenizer,
    reporter: &Reporter,
) -> Result<PreparedData, TrainError> {
    let out = &options.out;
    let cache_dir = options
        .cache_dir
        .clone()
        .or_else(|| cache_root().map(|d| d.join("tokens")))
        .unwrap_or_else(|| out.join("cache"));
    let (cache, outcome) = TokenCache::load_or_build(source, tokenizer, &cache_dir)?;
    match &outcome {
        CacheOutcome::Reused => {}
        CacheOutcome::Built => reporter.line(format!(
            "tokenised the corpus: {} tokens in {} documents -> {}",
            thousands(cache.len() as u64),
            thousands(cache.documents()),
            cache.path().display()
        )),
        CacheOutcome::Rebuilt(why) => reporter.line(format!(
            "rebuilt the token cache {} ({why})",
            cache.path().display()
        )),
    }
    let seq_len = config.data.seq_len;
    let (train_range, valid_range) = split(cache.len(), config.data.val_fraction)?;
    let window = seq_len + 1;
    if train_range.len() < window || valid_range.len() < window {
        let needed = ((window as f64 / config.data.val_fraction).ceil() as usize).max(2 * window);
        return Err(TrainError::TooShort(format!(
            "the corpus is too short: {} tokens give a training split of {} and a validation split \
             of {} tokens, but each needs at least one sequence of seq_len + 1 = {window} tokens \
             (about {} tokens in all with data.val_fraction = {}); use more data (--data) or a \
             smaller --seq-len",
            cache.len(),
            train_range.len(),
            valid_range.len(),
            thousands(needed as u64),
            config.data.val_fraction
        )));
    }
    let valid_windows = validation_windows(valid_range.clone(), seq_len, config.data.eval_windows);
    let (entropy, distinct) = unigram_entropy(&cache, train_range.clone());
    let info = DataInfo {
        tokens: cache.len(),
        documents: cache.documents(),
        train: train_range.clone(),
        valid: valid_range.clone(),
        valid_windows: valid_windows.len(),
        unigram_entropy: entropy,
        distinct_tokens: distinct,
        corpus_fingerprint: hex(&cache.corpus_fingerprint()),
    };
    if resume {
        if let Ok(text) = std::fs::read_to_string(out.join("data.json")) {
            if let Ok(old) = serde_json::from_str::<DataInfo>(&text) {
                if old.tokens != info.tokens || old.corpus_fingerprint != info.corpus_fingerprint {
                    reporter.line(format!(
                        "warning: the corpus changed since the run started ({} tokens, now {}): \
                         the resumed run trains on the new data",
                        old.tokens, info.tokens
                    ));
                }
            }
        }
    }
    Ok(PreparedData {
        cache,
        info,
        train: train_range,
        valid: valid_range,
        valid_windows,
    })
}

/// Creates the run directory and writes its files: `config.toml` and `tokenizer.json` of a
/// new run (a resumed run's `config.toml` again only when `--steps` changed it), `data.json`;
/// opens `train.log`.
pub(super) fn write_run_files(
    out: &Path,
    config: &TrainConfig,
    resume: bool,
    tokenizer: &Tokenizer,
    data: &DataInfo,
    reporter: &mut Reporter,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    reporter.set_log(&out.join("train.log"));
    if !resume {
        let path = out.join("config.toml");
        atomic_write(&path, config.to_toml().as_bytes()).map_err(io_err(&path))?;
        let path = out.join("tokenizer.json");
        atomic_write(&path, tokenizer.to_json().as_bytes()).map_err(io_err(&path))?;
    } else if config.train.steps
        != TrainConfig::from_file(&out.join("config.toml"))?
            .train
            .steps
    {
        let path = out.join("config.toml");
        atomic_write(&path, config.to_toml().as_bytes()).map_err(io_err(&path))?;
    }
    let path = out.join("data.json");
    atomic_write(
        &path,
        serde_json::to_string_pretty(data).unwrap().as_bytes(),
    )
    .map_err(io_err(&path))?;
    Ok(())
}

/// What [`report_start`] describes.
pub(super) struct StartReport<'a> {
    pub out: &'a Path,
    pub config: &'a TrainConfig,
    pub model: &'a TransformerConfig,
    pub choice: &'a BackendChoice,
    pub data: &'a PreparedData,
    pub start_step: u64,
    pub dashboard: bool,
}

/// The start-up lines: backend, model, data, training recipe and notes; returns the hint
/// for slow steps (see [`start_notes`]).
pub(super) fn report_start(reporter: &Reporter, r: &StartReport<'_>) -> String {
    let StartReport {
        out,
        config,
        model: m,
        choice,
        data,
        start_step,
        dashboard,
    } = *r;
    let seq_len = config.data.seq_len;
    reporter.line(format!(
        "backend: {} on {} ({})",
        choice.kind, choice.device_name, choice.reason
    ));
    reporter.line(format!(
        "model: {} attention, dim {}, depth {}, {} heads x {} ({} kv heads), vocabulary {}, context {}",
        m.attention,
        m.dim,
        m.depth,
        m.heads,
        m.dim_head,
        m.kv_heads(),
        thousands(m.num_tokens as u64),
        seq_len
    ));
    if m.attention == nsa_model::AttentionKind::Dsa {
        let d = &m.dsa;
        let t = &config.train;
        let global = if d.top_k >= seq_len {
            " (at least the context: the sparse stage is dense too)".to_string()
        } else {
            String::new()
        };
        reporter.line(format!(
            "dsa: {} indexer heads x {}, top-k {} tokens{global}, local window {}; dense warm-up \
             for {} of {} steps ({}), then sparse; the indexer's KL loss is logged as `indexer KL`",
            d.index_heads,
            d.index_dim_head(m.dim_head),
            d.top_k,
            d.window,
            t.dsa_warmup_steps(config.optim.schedule_steps.unwrap_or(t.steps))
                .min(t.steps),
            t.steps,
            if t.dsa.freeze_model {
                "only the indexer learns"
            } else {
                "the model learns densely beside the indexer"
            },
        ));
    }
    reporter.line(format!(
        "data: {} tokens ({} training, {} validation in {} windows); unigram entropy of the \
         training split {:.4} nats",
        thousands(data.info.tokens as u64),
        thousands(data.train.len() as u64),
        thousands(data.valid.len() as u64),
        data.valid_windows.len(),
        data.info.unigram_entropy
    ));
    let t = &config.train;
    let schedule = WarmupCosine::from_config(&config.optim, t.steps);
    let planned = schedule.planned_steps();
    reporter.line(format!(
        "training: {} steps of {} x {} x {} tokens{}, AdamW lr {:.1e} (warmup {}, cosine to {:.1e}{}), clip {}, seed {}; \
         log lines every {} steps show the mean loss of those steps (metrics.csv has every step){}",
        t.steps,
        t.batch_size,
        t.grad_accum,
        seq_len,
        if t.recompute {
            " (blocks recomputed in the backward pass)"
        } else {
            ""
        },
        config.optim.lr,
        config.optim.warmup_steps.min(planned),
        config.optim.lr * config.optim.min_lr_ratio,
        if planned != t.steps {
            format!(" at step {planned}")
        } else {
            String::new()
        },
        config.optim.grad_clip,
        t.seed,
        t.log_every,
        if start_step > 0 {
            format!("; resuming at step {start_step}")
        } else {
            String::new()
        }
    ));
    let (notes, slow_hint) = start_notes(config, start_step, choice.kind.is_cpu());
    for note in &notes {
        reporter.line(note);
        if dashboard {
            println!("{note}");
        }
    }
    if dashboard {
        reporter.line(format!(
            "dashboard: Ctrl-C, or q then s, stops with a checkpoint; log: {}",
            out.join("train.log").display()
        ));
        println!(
            "{} — starting the dashboard (Ctrl-C, or q then s, stops with a checkpoint; its \
             \"Eval interval\" is {} steps)",
            out.display(),
            config.train.eval_every
        );
    }
    slow_hint
}
