//! A training run from start to end: run directory, tokenizer, token cache, split, backend,
//! the Burn Learner ([`SupervisedTraining`] with the [`NsaStrategy`] loop), the loss curve and
//! the summary. [`run`] is what the `nsa-train` binary calls.
//!
//! # The run directory
//!
//! ```text
//! <run>/config.toml         the resolved TrainConfig (what --resume continues)
//! <run>/tokenizer.json      the tokenizer (trained tokenizers are reused on --resume)
//! <run>/checkpoint/         Learner checkpoints (see crate::checkpoint)
//! <run>/best/  <run>/last/  inference bundles (model.json, tokenizer.json, model.safetensors,
//!                           checkpoint.json): best validation loss and latest evaluation
//! <run>/metrics.csv         per-step training and per-evaluation validation metrics
//! <run>/loss.png            the loss curve
//! <run>/samples.txt         generated samples
//! <run>/train.log           the log lines
//! <run>/data.json           facts about the data (tokens, split, corpus fingerprint)
//! ```
//!
//! Burn's own metric folders and log (`train/`, `valid/`, `experiment.log`) are not written.
//!
//! # Resuming
//!
//! `Start::Resume` continues from the newest checkpoint with the saved configuration; only
//! `steps`, `eval_every`, `sample_every` and `log_every` may change. `steps` must be more than
//! the steps done. The learning-rate schedule stays the one the run was planned with: when
//! `steps` changes, the planned length is recorded as `optim.schedule_steps`, the schedule
//! of those steps is kept, and steps after them run at its final learning rate.
//!
//! The token cache goes to `--cache-dir`, else `$NSA_CACHE_DIR/tokens` or the user cache
//! directory (`~/.cache/nsa/tokens`), where runs on the same corpus and tokenizer share it.

use std::io::IsTerminal;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{LearningRateMetric, LossMetric};
use burn::train::{
    Interrupter, Learner, LearningComponentsMarker, SupervisedTraining, TrainingStrategy,
};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    checkpoint_dir, latest, record_path, AtomicRecorder, CheckpointError, CheckpointPlan,
    PlannedCheckpointing, SaveTracker, TrainState,
};
use crate::config::{ConfigError, Overrides, TokenizerAlgorithm, TrainConfig};
use crate::corpus::{split, CacheOutcome, CorpusError, CorpusSource, TokenCache};
use crate::data::{unigram_entropy, validation_windows, StepCursor, TrainBatches, ValidBatches};
use crate::lm::LanguageModel;
use crate::metrics::{read_csv, CsvLog, GradNormMetric, PerplexityMetric, ThroughputMetric};
use crate::parallel::ShardPlan;
use crate::plot::write_loss_png;
pub use crate::report::RunSummary;
use crate::report::{start_notes, thousands, NoMetricFiles, QuietRenderer, Reporter};
use crate::schedule::WarmupCosine;
use crate::strategy::{is_run_dir, EndReason, FitContext, FitOutcome, NsaStrategy};
use nsa_runtime::backend::{
    dispatch_autodiff, select, select_devices, BackendChoice, BackendError, DeviceList,
    DeviceRequest, OnAutodiffBackend,
};
use nsa_runtime::bundle::{atomic_write, BundleError};
use nsa_runtime::tokenizer::{bert_base_chinese, Tokenizer, TokenizerError};

/// The optimizer of the Learner.
pub type Optim<B> = OptimizerAdaptor<AdamW, LanguageModel<B>, B>;
/// The Learner's component types.
pub type Components<B> = LearningComponentsMarker<B, WarmupCosine, LanguageModel<B>, Optim<B>>;

/// Why a run could not start or did not finish. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad or unreadable data.
    #[error("training data: {0}")]
    Corpus(#[from] CorpusError),
    /// Tokenizer problem.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// No usable backend.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Inference bundle problem.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The run directory does not fit the request (exists / nothing to resume / ...).
    #[error("{0}")]
    RunDir(String),
    /// The corpus is too short for the configuration.
    #[error("{0}")]
    TooShort(String),
    /// Training stopped on a NaN/Inf loss.
    #[error("training stopped: {0}")]
    NonFinite(String),
    /// Writing a checkpoint or bundle failed during training.
    #[error("training failed: {0}")]
    Failed(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UiMode {
    /// Burn's dashboard when stdout is a terminal (and the `tui` feature is compiled in),
    /// plain log lines otherwise.
    #[default]
    Auto,
    /// Plain log lines.
    Plain,
    /// Nothing on stdout (the log file only).
    Quiet,
}

/// A new run or the continuation of one.
#[derive(Debug, Clone)]
pub enum Start {
    /// Start from step 0 with this configuration (the run directory must not hold a run).
    New(TrainConfig),
    /// Continue the run in the directory from its newest checkpoint, with its saved
    /// configuration; only `steps` (more than the steps done; the learning-rate schedule
    /// stays, see the module documentation), `eval_every`, `sample_every` and `log_every` may
    /// be overridden.
    Resume(Overrides),
}

/// Options of [`run`].
#[derive(Clone)]
pub struct RunOptions {
    /// The run directory.
    pub out: PathBuf,
    /// New run or resume.
    pub start: Start,
    /// Backend and device.
    pub device: DeviceRequest,
    /// Data-parallel devices (`--devices`), instead of `device.index`.
    pub devices: Option<DeviceList>,
    /// Dashboard or log lines.
    pub ui: UiMode,
    /// Stop (with a checkpoint) after this step, as if interrupted.
    pub stop_at: Option<u64>,
    /// Token cache directory (default: `$NSA_CACHE_DIR/tokens`, `~/.cache/nsa/tokens`).
    pub cache_dir: Option<PathBuf>,
    /// Stops the training (Ctrl-C handler, tests).
    pub interrupter: Interrupter,
}

impl RunOptions {
    /// A new run of `config` in `out` on the default device with plain logs.
    pub fn new(out: impl Into<PathBuf>, config: TrainConfig) -> Self {
        Self {
            out: out.into(),
            start: Start::New(config),
            device: DeviceRequest::default(),
            devices: None,
            ui: UiMode::Plain,
            stop_at: None,
            cache_dir: None,
            interrupter: Interrupter::new(),
        }
    }
}

/// Facts about the data of a run (`<run>/data.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataInfo {
    /// Tokens in the stream.
    pub tokens: usize,
    /// Documents.
    pub documents: u64,
    /// Training token range.
    pub train: Range<usize>,
    /// Validation token range.
    pub valid: Range<usize>,
    /// Validation windows per evaluation.
    pub valid_windows: usize,
    /// Unigram entropy of the training split (nats).
    pub unigram_entropy: f64,
    /// Distinct tokens in the training split.
    pub distinct_tokens: usize,
    /// Hex SHA-256 fingerprint of the corpus (see `CorpusSource::fingerprint`).
    pub corpus_fingerprint: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises model initialisation: backends seed a process-wide generator, so two runs
/// initialising at once in one process (tests) would otherwise interleave their draws.
static INIT_LOCK: Mutex<()> = Mutex::new(());

struct Prepared {
    config: TrainConfig,
    out: PathBuf,
    tokenizer: Arc<Tokenizer>,
    cache: Arc<TokenCache>,
    data: DataInfo,
    valid_windows: Vec<usize>,
    state: TrainState,
    reporter: Arc<Reporter>,
    stop_at: Option<u64>,
    interrupter: Interrupter,
    dashboard: bool,
    slow_hint: String,
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

fn source_of(config: &TrainConfig) -> CorpusSource {
    if config.data.paths.is_empty() {
        CorpusSource::Default
    } else {
        CorpusSource::Paths(config.data.paths.clone())
    }
}

/// Runs (or resumes) a training run; see the module documentation.
pub fn run(options: RunOptions) -> Result<RunSummary, TrainError> {
    let started = Instant::now();
    let out = options.out.clone();
    let run_exists = is_run_dir(&out);
    // the planned steps of a resumed run (its saved config.toml)
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

    // the backend first: an unavailable one is refused before any work
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

    let dashboard =
        options.ui == UiMode::Auto && cfg!(feature = "tui") && std::io::stdout().is_terminal();
    let echo = options.ui != UiMode::Quiet && !dashboard;
    // the log file is opened once the directory is known to be ours
    let mut reporter = Reporter::new(None, echo);

    // checkpoint to resume from
    let ckpt_dir = checkpoint_dir(&out);
    let state = if resume {
        match latest(&ckpt_dir)? {
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

    // tokenizer
    let source = source_of(&config);
    let tokenizer = if resume {
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
    };
    let model_config = config.model_config(tokenizer.vocab_size())?;

    // token cache and split
    let cache_dir = options
        .cache_dir
        .clone()
        .or_else(|| nsa_runtime::kernel_cache::cache_root().map(|d| d.join("tokens")))
        .unwrap_or_else(|| out.join("cache"));
    let (cache, outcome) = TokenCache::load_or_build(&source, &tokenizer, &cache_dir)?;
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
    let data = DataInfo {
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
                if old.tokens != data.tokens || old.corpus_fingerprint != data.corpus_fingerprint {
                    reporter.line(format!(
                        "warning: the corpus changed since the run started ({} tokens, now {}): \
                         the resumed run trains on the new data",
                        old.tokens, data.tokens
                    ));
                }
            }
        }
    }

    // the run directory: everything was validated, now write
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
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
        serde_json::to_string_pretty(&data).unwrap().as_bytes(),
    )
    .map_err(io_err(&path))?;

    reporter.line(format!(
        "backend: {} on {} ({})",
        choice.kind, choice.device_name, choice.reason
    ));
    let m = &model_config;
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
    reporter.line(format!(
        "data: {} tokens ({} training, {} validation in {} windows); unigram entropy of the \
         training split {:.4} nats",
        thousands(data.tokens as u64),
        thousands(train_range.len() as u64),
        thousands(valid_range.len() as u64),
        valid_windows.len(),
        entropy
    ));
    let t = &config.train;
    let schedule = WarmupCosine::from_config(&config.optim, t.steps);
    let planned = schedule.planned_steps();
    reporter.line(format!(
        "training: {} steps of {} x {} x {} tokens, AdamW lr {:.1e} (warmup {}, cosine to {:.1e}{}), clip {}, seed {}; \
         log lines every {} steps show the mean loss of those steps (metrics.csv has every step){}",
        t.steps,
        t.batch_size,
        t.grad_accum,
        seq_len,
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
        if state.step > 0 {
            format!("; resuming at step {}", state.step)
        } else {
            String::new()
        }
    ));
    let (notes, slow_hint) = start_notes(&config, state.step, choice.kind.is_cpu());
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

    let start_step = state.step;
    let prepared = Prepared {
        out: out.clone(),
        tokenizer: Arc::new(tokenizer),
        cache: Arc::new(cache),
        data: data.clone(),
        valid_windows,
        state: state.clone(),
        reporter: Arc::new(reporter),
        stop_at: options.stop_at,
        interrupter: options.interrupter.clone(),
        dashboard,
        slow_hint,
        config: TrainConfig {
            model: model_config,
            ..config.clone()
        },
    };
    let reporter = prepared.reporter.clone();
    let fit = if start_step >= config.train.steps {
        reporter.line(format!(
            "the run is complete at step {start_step}; resume with a larger --steps to train longer"
        ));
        None
    } else {
        Some(dispatch_autodiff(&choice, TrainWork(prepared))??)
    };

    let rows = read_csv(&out.join("metrics.csv")).unwrap_or_default();
    let png = out.join("loss.png");
    if !rows.is_empty() {
        let title = format!(
            "loss (nats), {} attention, {}",
            config.model.attention,
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        if let Err(e) = write_loss_png(&png, &rows, Some(entropy), &title) {
            reporter.line(format!("warning: cannot write {}: {e}", png.display()));
        }
    }
    let (state, end, samples, train_seconds, train_tokens, last_checkpoint) = match fit {
        Some(f) => (
            f.state,
            f.end,
            f.samples,
            f.session_seconds,
            f.session_tokens,
            f.last_checkpoint,
        ),
        None => (
            state,
            EndReason::Finished,
            Vec::new(),
            0.0,
            0,
            Some(start_step),
        ),
    };
    let last_eval =
        (state.step.saturating_sub(1) / config.train.eval_every) * config.train.eval_every;
    let recent: Vec<f64> = rows
        .iter()
        .filter(|r| {
            r.split == "train" && r.step > last_eval && r.step <= state.step && r.loss.is_finite()
        })
        .map(|r| r.loss)
        .collect();
    let final_train_loss =
        (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64);
    let summary = RunSummary {
        out,
        config,
        choice,
        start_step,
        end_step: state.step,
        end: end.clone(),
        state,
        wall_seconds: started.elapsed().as_secs_f64(),
        train_seconds,
        train_tokens,
        final_train_loss,
        data,
        samples,
        dashboard,
        last_checkpoint,
    };
    for line in summary.lines() {
        reporter.line(format!("[summary] {line}"));
    }
    match end {
        EndReason::NonFinite(why) => Err(TrainError::NonFinite(why)),
        EndReason::Failed(why) => Err(TrainError::Failed(why)),
        _ => Ok(summary),
    }
}

struct TrainWork(Prepared);

impl OnAutodiffBackend for TrainWork {
    type Output = Result<FitOutcome, TrainError>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>, _: &BackendChoice) -> Self::Output {
        let p = self.0;
        let device = devices[0].clone();
        let config = &p.config;
        let t = &config.train;
        let transformer = {
            let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            B::seed(&device, t.seed);
            config
                .model
                .init::<B>(&device)
                .map_err(|e| ConfigError::Invalid {
                    key: "model",
                    flag: None,
                    message: e.to_string(),
                })?
        };
        let model = LanguageModel::new(transformer, config.optim.grad_clip);
        let o = &config.optim;
        let optim: Optim<B> = AdamWConfig::new()
            .with_beta_1(o.beta1 as f32)
            .with_beta_2(o.beta2 as f32)
            .with_epsilon(o.eps as f32)
            .with_weight_decay(o.weight_decay as f32)
            .init();
        let scheduler = WarmupCosine::from_config(o, t.steps);
        let mut learner: Learner<Components<B>> = Learner::new(model, optim, scheduler);

        let ckpt_dir = checkpoint_dir(&p.out);
        let start = p.state.step;
        if start > 0 {
            learner = load_checkpoint::<B>(learner, &ckpt_dir, start, &device)?;
        }

        let cursor = StepCursor::new(start);
        let train = TrainBatches::<B>::new(
            p.cache.clone(),
            p.data.train.clone(),
            config.data.seq_len,
            t.seed,
            t.batch_size,
            t.grad_accum,
            t.steps,
            t.eval_every,
            cursor.clone(),
            device.clone(),
        )?;
        let valid = ValidBatches::<B::InnerBackend>::new(
            p.cache.clone(),
            p.valid_windows.clone(),
            config.data.seq_len,
            t.batch_size * t.grad_accum,
            device.clone(),
        );

        let csv_path = p.out.join("metrics.csv");
        let csv = CsvLog::open(&csv_path, start).map_err(io_err(&csv_path))?;
        let tracker = SaveTracker::default();
        let plan = CheckpointPlan::default();
        let outcome = Arc::new(Mutex::new(None));
        let context = FitContext {
            config: config.clone(),
            run_dir: p.out.clone(),
            tokenizer: p.tokenizer.clone(),
            cache: p.cache.clone(),
            valid_range: p.data.valid.clone(),
            cursor,
            plan: plan.clone(),
            tracker: tracker.clone(),
            state: p.state.clone(),
            csv,
            reporter: p.reporter.clone(),
            stop_at: p.stop_at,
            slow_hint: p.slow_hint.clone(),
        };
        let strategy =
            NsaStrategy::<B>::new(devices, context, outcome.clone()).map_err(|message| {
                ConfigError::Invalid {
                    key: "train.grad_accum",
                    flag: Some("--devices"),
                    message,
                }
            })?;
        let recorder = AtomicRecorder::new(
            NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            tracker,
        );
        let mut training: SupervisedTraining<Components<B>> =
            SupervisedTraining::new(&p.out, Arc::new(train), Arc::new(valid))
                // no experiment.log, train/epoch-N/, valid/epoch-N/ (train.log, metrics.csv)
                .with_application_logger(None)
                .with_metric_logger(NoMetricFiles)
                .metric_train_numeric(LossMetric::<B::InnerBackend>::new())
                .metric_train_numeric(PerplexityMetric::new())
                .metric_train_numeric(LearningRateMetric::new())
                .metric_train_numeric(ThroughputMetric::new())
                .metric_train_numeric(GradNormMetric::new())
                .metric_valid_numeric(LossMetric::<B::InnerBackend>::new())
                .metric_valid_numeric(PerplexityMetric::new())
                .with_file_checkpointer(recorder)
                .with_checkpointing_strategy(PlannedCheckpointing(plan))
                .with_interrupter(p.interrupter.clone())
                .with_training_strategy(TrainingStrategy::Custom(Arc::new(strategy)))
                .num_epochs(t.steps.div_ceil(t.eval_every) as usize);
        #[cfg(feature = "tui")]
        if p.dashboard {
            training = training.renderer(crate::dashboard::Dashboard::new(p.interrupter.clone()));
        }
        if !p.dashboard {
            training = training.renderer(QuietRenderer);
        }
        let result = training.launch(learner);
        // dropping the renderer closes the dashboard and gives the terminal back
        drop(result);
        let outcome = outcome.lock().unwrap().take();
        outcome.ok_or_else(|| TrainError::Failed("the training loop did not report".into()))
    }
}

/// Loads the Learner records of checkpoint `step`.
fn load_checkpoint<B: AutodiffBackend>(
    mut learner: Learner<Components<B>>,
    dir: &Path,
    step: u64,
    device: &B::Device,
) -> Result<Learner<Components<B>>, CheckpointError> {
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let err = |name: &str, e: burn::record::RecorderError| CheckpointError::Load {
        path: record_path(dir, name, step),
        step,
        message: e.to_string().replace('\n', " "),
    };
    let base = |name: &str| dir.join(format!("{name}-{step}"));
    let model =
        Recorder::<B>::load(&recorder, base("model"), device).map_err(|e| err("model", e))?;
    learner.load_model(model);
    let optim =
        Recorder::<B>::load(&recorder, base("optim"), device).map_err(|e| err("optim", e))?;
    learner.load_optim(optim);
    let scheduler = Recorder::<B>::load(&recorder, base("scheduler"), device)
        .map_err(|e| err("scheduler", e))?;
    learner.load_scheduler(scheduler);
    Ok(learner)
}
