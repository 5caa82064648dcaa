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
    checkpoint_dir, record_path, AtomicRecorder, CheckpointError, CheckpointPlan,
    PlannedCheckpointing, SaveTracker, TrainState,
};
use crate::config::{ConfigError, Overrides, TrainConfig};
use crate::corpus::{CorpusError, TokenCache};
use crate::data::{StepCursor, TrainBatches, ValidBatches};
use crate::lm::LanguageModel;
use crate::metrics::{
    read_csv, CsvLog, CsvRow, GradNormMetric, PerplexityMetric, ThroughputMetric,
};
use crate::plot::write_loss_png;
pub use crate::report::RunSummary;
use crate::report::{NoMetricFiles, QuietRenderer, Reporter};
use crate::schedule::WarmupCosine;
use crate::strategy::{EndReason, FitContext, FitOutcome, NsaStrategy};
use nsa_runtime::backend::{
    dispatch_autodiff, BackendChoice, BackendError, DeviceList, DeviceRequest, OnAutodiffBackend,
};
use nsa_runtime::bundle::BundleError;
use nsa_runtime::tokenizer::{Tokenizer, TokenizerError};

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

/// A new run or the continuation of one (made once per run: its size does not matter).
#[allow(clippy::large_enum_variant)]
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
    /// How the model runs (fused kernels, tensor cores); the binary maps the `NSA_*` switches.
    pub kernels: nsa_model::kernels::KernelOptions,
    /// The largest single buffer forced below the device's (`--max-buffer-mib`, for testing).
    pub max_buffer_bytes: Option<u64>,
    /// The binary's panic hook, told the device's buffer limit once the device is chosen.
    pub panic_hook: nsa_runtime::failure::PanicHook,
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
            kernels: Default::default(),
            max_buffer_bytes: None,
            panic_hook: Default::default(),
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
    kernels: nsa_model::kernels::KernelOptions,
    dashboard: bool,
    slow_hint: String,
}

mod setup;

use setup::{
    choose_backend, load_tokenizer, prepare_data, report_start, resolve_config, source_of,
    starting_state, write_run_files, Resolved, StartReport,
};

/// Runs (or resumes) a training run; see the module documentation.
pub fn run(options: RunOptions) -> Result<RunSummary, TrainError> {
    let started = Instant::now();
    let out = options.out.clone();
    let Resolved {
        config,
        resume,
        saved_steps,
    } = resolve_config(&options)?;
    // the backend first: an unavailable one is refused before any work
    let choice = choose_backend(&options, &config)?.limit_buffers(options.max_buffer_bytes);
    options.panic_hook.set_buffer_limit(choice.max_tensor_bytes);

    let dashboard =
        options.ui == UiMode::Auto && cfg!(feature = "tui") && std::io::stdout().is_terminal();
    let echo = options.ui != UiMode::Quiet && !dashboard;
    // the log file is opened once the directory is known to be ours
    let mut reporter = Reporter::new(None, echo);

    let state = starting_state(&out, &config, resume, saved_steps)?;
    let source = source_of(&config);
    let tokenizer = load_tokenizer(&out, &config, resume, &source, &reporter)?;
    let model_config = config.model_config(tokenizer.vocab_size())?;
    let data = prepare_data(&options, &config, resume, &source, &tokenizer, &reporter)?;

    // the run directory: everything was validated, now write
    write_run_files(&out, &config, resume, &tokenizer, &data.info, &mut reporter)?;
    let slow_hint = report_start(
        &reporter,
        &StartReport {
            out: &out,
            config: &config,
            model: &model_config,
            choice: &choice,
            data: &data,
            start_step: state.step,
            dashboard,
        },
    );

    let start_step = state.step;
    let entropy = data.info.unigram_entropy;
    let info = data.info.clone();
    let prepared = Prepared {
        out: out.clone(),
        tokenizer: Arc::new(tokenizer),
        cache: Arc::new(data.cache),
        data: data.info,
        valid_windows: data.valid_windows,
        state: state.clone(),
        reporter: Arc::new(reporter),
        stop_at: options.stop_at,
        interrupter: options.interrupter.clone(),
        kernels: options.kernels,
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
    plot_loss(&out, &config, &rows, entropy, &reporter);
    let summary = summarise(
        Finished {
            out,
            config,
            choice,
            start_step,
            state,
            data: info,
            dashboard,
            wall_seconds: started.elapsed().as_secs_f64(),
        },
        fit,
        &rows,
    );
    for line in summary.lines() {
        reporter.line(format!("[summary] {line}"));
    }
    match summary.end.clone() {
        EndReason::NonFinite(why) => Err(TrainError::NonFinite(why)),
        EndReason::Failed(why) => Err(TrainError::Failed(why)),
        _ => Ok(summary),
    }
}

/// Writes `<run>/loss.png` from the metrics rows; a failure is a warning in the log.
fn plot_loss(out: &Path, config: &TrainConfig, rows: &[CsvRow], entropy: f64, reporter: &Reporter) {
    if rows.is_empty() {
        return;
    }
    let png = out.join("loss.png");
    let title = format!(
        "loss (nats), {} attention, {}",
        config.model.attention,
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    if let Err(e) = write_loss_png(&png, rows, Some(entropy), &title) {
        reporter.line(format!("warning: cannot write {}: {e}", png.display()));
    }
}

/// What [`summarise`] needs besides the fit's outcome.
struct Finished {
    out: PathBuf,
    config: TrainConfig,
    choice: BackendChoice,
    start_step: u64,
    /// The state the session started from.
    state: TrainState,
    data: DataInfo,
    dashboard: bool,
    wall_seconds: f64,
}

/// The run's summary: the fit's outcome (`None`: the run was already complete) and the mean
/// training loss since the last evaluation, from the metrics rows.
fn summarise(f: Finished, fit: Option<FitOutcome>, rows: &[CsvRow]) -> RunSummary {
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
            f.state,
            EndReason::Finished,
            Vec::new(),
            0.0,
            0,
            Some(f.start_step),
        ),
    };
    let last_eval =
        (state.step.saturating_sub(1) / f.config.train.eval_every) * f.config.train.eval_every;
    let recent: Vec<f64> = rows
        .iter()
        .filter(|r| {
            r.split == "train" && r.step > last_eval && r.step <= state.step && r.loss.is_finite()
        })
        .map(|r| r.loss)
        .collect();
    let final_train_loss =
        (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64);
    RunSummary {
        out: f.out,
        config: f.config,
        choice: f.choice,
        start_step: f.start_step,
        end_step: state.step,
        end,
        state,
        wall_seconds: f.wall_seconds,
        train_seconds,
        train_tokens,
        final_train_loss,
        data: f.data,
        samples,
        dashboard: f.dashboard,
        last_checkpoint,
    }
}

struct TrainWork(Prepared);

impl OnAutodiffBackend for TrainWork {
    type Output = Result<FitOutcome, TrainError>;

    fn run<B: AutodiffBackend>(
        self,
        devices: Vec<B::Device>,
        choice: &BackendChoice,
    ) -> Self::Output {
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
                .with_kernel_options(p.kernels)
        };
        let model = LanguageModel::new(transformer, config.optim.grad_clip)
            .with_logits_budget(choice.max_tensor_bytes)
            .with_recompute(t.recompute)
            .with_dsa_schedule(
                t.dsa_warmup_steps(config.optim.schedule_steps.unwrap_or(t.steps)),
                t.dsa.freeze_model,
            );
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
