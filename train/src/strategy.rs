//! The training loop: a Burn [`SupervisedLearningStrategy`] run by
//! [`burn::train::SupervisedTraining`].
//!
//! Burn's single-device strategy is the model for this one; the differences are what exact
//! resumption and reliability need:
//!
//! * one Learner epoch is `eval_every` optimizer steps; the epoch starts at the global step of
//!   the checkpoint (the data loader's [`StepCursor`](crate::data::StepCursor)), also in the
//!   middle of an epoch after an interruption;
//! * with several devices ([`crate::parallel`]) the step's rows are split between them, the
//!   gradients averaged on the main device and clipped there (Burn's multi-device train step);
//! * one item of the training loader is one optimizer step: [`LanguageModel`]'s `TrainStep`
//!   runs the micro-batches (gradient accumulation, averaged) and clips the global gradient
//!   norm, so the learning-rate schedule advances once per optimizer step;
//! * a step whose loss or gradient is NaN/Inf is skipped or stops training
//!   ([`NonFinitePolicy`]), and never produces a checkpoint or a best model;
//! * checkpoints are named by the global step, saved at the end of every epoch and when the
//!   [`Interrupter`](burn::train::Interrupter) fires (Ctrl-C, the dashboard's stop), and
//!   waited for before old ones are deleted;
//! * after every validation the inference bundles `<run>/last/` and (when the validation loss
//!   improved) `<run>/best/` are written, and samples are generated from a validation prompt.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::{AutodiffBackend, DeviceOps};
use burn::train::{
    Learner, SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader,
    TrainingComponents, ValidLoader,
};

use crate::checkpoint::{CheckpointPlan, SaveTracker, TrainState};
use crate::config::TrainConfig;
use crate::corpus::TokenCache;
use crate::data::StepCursor;
use crate::lm::LanguageModel;
use crate::metrics::CsvLog;
use crate::parallel::{DataParallel, ShardPlan};
use crate::report::Reporter;
use crate::training::Components;
use nsa_runtime::tokenizer::Tokenizer;

/// How the training loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum EndReason {
    /// All steps done.
    Finished,
    /// Stopped at the requested step (`--stop-at`), checkpoint saved.
    StoppedAt(u64),
    /// The interrupter fired (Ctrl-C, SIGTERM, a test); checkpoint saved.
    Interrupted(String),
    /// Stopped from the dashboard (q, then s); checkpoint saved.
    StoppedFromDashboard,
    /// A NaN/Inf loss stopped training; the last good checkpoint is untouched.
    NonFinite(String),
    /// Writing a checkpoint or bundle failed.
    Failed(String),
}

/// A generated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// After this many optimizer steps.
    pub step: u64,
    /// The decoded prompt (validation text).
    pub prime: String,
    /// The decoded continuation.
    pub continuation: String,
}

impl Sample {
    /// The sample as log lines.
    pub fn render(&self) -> String {
        format!(
            "sample after step {}:\n  prime:        {}\n  continuation: {}",
            self.step,
            one_line(&self.prime),
            one_line(&self.continuation)
        )
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ⏎ ")
}

/// What the loop reports back to [`crate::training::run`].
#[derive(Debug, Clone)]
pub struct FitOutcome {
    /// The training state at the end (step, best validation loss, ...).
    pub state: TrainState,
    /// Why the loop ended.
    pub end: EndReason,
    /// Samples generated in this session.
    pub samples: Vec<Sample>,
    /// Training wall time of this session (seconds).
    pub session_seconds: f64,
    /// Tokens trained on in this session.
    pub session_tokens: u64,
    /// The step of the last complete checkpoint.
    pub last_checkpoint: Option<u64>,
}

/// Everything the loop needs besides what Burn hands it.
pub struct FitContext {
    /// The configuration.
    pub config: TrainConfig,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The tokenizer (for samples and bundles).
    pub tokenizer: Arc<Tokenizer>,
    /// The token cache.
    pub cache: Arc<TokenCache>,
    /// The validation split (sample prompts).
    pub valid_range: Range<usize>,
    /// The training loader's cursor.
    pub cursor: StepCursor,
    /// Plan for Burn's checkpointer.
    pub plan: CheckpointPlan,
    /// Completed checkpoint writes.
    pub tracker: SaveTracker,
    /// The state to start from.
    pub state: TrainState,
    /// `metrics.csv`.
    pub csv: CsvLog,
    /// Log output.
    pub reporter: Arc<Reporter>,
    /// Stop (with a checkpoint) after this step.
    pub stop_at: Option<u64>,
    /// What to do when the time estimate after the first steps is more than a day (e.g.
    /// "for a first run on the CPU use --preset tiny").
    pub slow_hint: String,
}

/// The strategy; see the module documentation.
pub struct NsaStrategy<B: AutodiffBackend> {
    /// The main device (model, optimizer, validation, samples).
    device: B::Device,
    /// All devices of a data-parallel run (the main device first), with the shard plan.
    parallel: Option<(Vec<B::Device>, ShardPlan)>,
    context: Mutex<Option<FitContext>>,
    outcome: Arc<Mutex<Option<FitOutcome>>>,
}

impl<B: AutodiffBackend> NsaStrategy<B> {
    /// A strategy on `devices` (one, or several for data parallelism, the first being the main
    /// device); the outcome is put into `outcome` when the loop ends. Fails when the global
    /// batch does not split evenly over the devices.
    pub fn new(
        devices: Vec<B::Device>,
        context: FitContext,
        outcome: Arc<Mutex<Option<FitOutcome>>>,
    ) -> Result<Self, String> {
        let device = devices.first().ok_or("no device to train on")?.clone();
        let parallel = if devices.len() > 1 {
            let t = &context.config.train;
            let plan = ShardPlan::new(t.batch_size, t.grad_accum, devices.len())?;
            Some((devices, plan))
        } else {
            None
        };
        Ok(Self {
            device,
            parallel,
            context: Mutex::new(Some(context)),
            outcome,
        })
    }
}

/// How long to wait for a checkpoint write.
mod epoch;

use epoch::{Loaders, Loop};

impl<B: AutodiffBackend> SupervisedLearningStrategy<Components<B>> for NsaStrategy<B> {
    fn fit(
        &self,
        components: TrainingComponents<Components<B>>,
        mut learner: Learner<Components<B>>,
        dataloader_train: TrainLoader<Components<B>>,
        dataloader_valid: ValidLoader<Components<B>>,
        _starting_epoch: usize,
    ) -> (
        LanguageModel<B>,
        SupervisedTrainingEventProcessor<Components<B>>,
    ) {
        let cx = self
            .context
            .lock()
            .unwrap()
            .take()
            .expect("the training loop runs once");
        learner.fork(&self.device);
        let loaders = Loaders {
            train: dataloader_train.to_device(&self.device),
            valid: dataloader_valid.to_device(self.device.inner()),
            // data parallel: Burn's multi-device train step, one worker thread per device
            parallel: self
                .parallel
                .as_ref()
                .map(|(devices, plan)| DataParallel::<B>::new(devices.clone(), *plan)),
            interrupter: components.interrupter.clone(),
        };
        let store = components.event_store.clone();
        let mut lp = Loop::<B>::new(
            cx,
            components.event_processor,
            components.checkpointer,
            &store,
        );
        let mut state = lp.starting_state();
        let end = lp.run_epochs(&mut learner, &mut state, &loaders);
        *self.outcome.lock().unwrap() = Some(lp.outcome(state, end));
        (learner.model(), lp.processor)
    }
}

/// `true` when `dir` holds a training run (its `config.toml`).
pub fn is_run_dir(dir: &Path) -> bool {
    dir.join("config.toml").is_file()
}
