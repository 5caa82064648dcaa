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
use std::time::{Duration, Instant};

use burn::data::dataloader::Progress;
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, DeviceOps};
use burn::train::checkpoint::CheckpointingAction;
use burn::train::metric::store::EventStoreClient;
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningCheckpointer,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainOutput,
    TrainingComponents, TrainingItem, ValidLoader,
};
use nsa_model::Sampling;

use crate::checkpoint::{
    complete_steps, record_path, state_path, CheckpointError, CheckpointPlan, SaveTracker,
    TrainState, RECORDS,
};
use crate::config::{NonFinitePolicy, TrainConfig};
use crate::corpus::TokenCache;
use crate::data::{sample_prime, StepCursor};
use crate::lm::LanguageModel;
use crate::metrics::{CsvLog, CsvRow};
use crate::parallel::{DataParallel, ShardPlan};
use crate::report::{duration, thousands, Reporter};
use crate::training::Components;
use nsa_runtime::bundle::{atomic_write, write_bundle};
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
const SAVE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

struct Loop<'a, B: AutodiffBackend> {
    cx: FitContext,
    processor: SupervisedTrainingEventProcessor<Components<B>>,
    checkpointer: Option<LearningCheckpointer<Components<B>>>,
    store: &'a EventStoreClient,
    samples: Vec<Sample>,
    last_checkpoint: Option<u64>,
    /// Loss sum, count and non-finite count since the last log line.
    window: (f64, u64, u64),
    /// Seconds per step measured after the first steps of this session (for the ETA).
    per_step: Option<f64>,
}

/// How the interrupter's stop is reported.
fn interrupted(interrupter: &burn::train::Interrupter) -> EndReason {
    match interrupter.get_message() {
        Some(m) if m == crate::dashboard::DASHBOARD_STOP_MESSAGE => EndReason::StoppedFromDashboard,
        Some(m) => EndReason::Interrupted(m),
        None => EndReason::Interrupted("interrupted".into()),
    }
}

impl<B: AutodiffBackend> Loop<'_, B> {
    fn log(&self, msg: impl AsRef<str>) {
        self.cx.reporter.line(msg);
    }

    /// Prints the time estimate once, after the first steps of this session (see
    /// [`crate::report::Estimate`]).
    fn estimate(&mut self, step: u64, total: u64, done: u64, seconds: f64, first: f64) {
        if self.per_step.is_some() {
            return;
        }
        if let Some(e) = crate::report::Estimate::after(step, total, done, seconds, first) {
            self.per_step = Some(e.per_step);
            for line in e.lines(&self.cx.slow_hint) {
                self.log(line);
            }
        }
    }

    /// Saves a checkpoint of `learner` at the current step, waits until it is on disk, writes
    /// the state file, then deletes the checkpoints no longer kept.
    fn save(&mut self, learner: &Learner<Components<B>>, state: &TrainState) -> Result<(), String> {
        let Some(checkpointer) = self.checkpointer.as_mut() else {
            return Ok(());
        };
        let dir = crate::checkpoint::checkpoint_dir(&self.cx.run_dir);
        let step = state.step;
        let paths: Vec<PathBuf> = RECORDS.iter().map(|r| record_path(&dir, r, step)).collect();
        self.cx.tracker.reset(&paths);
        self.cx.plan.set(vec![CheckpointingAction::Save]);
        checkpointer.checkpoint(learner, step as usize, self.store);
        let done = self
            .cx
            .tracker
            .wait(&paths, SAVE_TIMEOUT)
            .and_then(|_| state.write(&dir));
        done.map_err(|e: CheckpointError| e.to_string())?;
        self.last_checkpoint = Some(step);

        // keep the newest `keep_checkpoints` (at least this one) and the best
        let keep = self.cx.config.train.keep_checkpoints.max(1);
        let steps = complete_steps(&dir);
        let old: Vec<u64> = steps
            .iter()
            .rev()
            .skip(keep)
            .copied()
            .filter(|&s| Some(s) != state.best_step && s != step)
            .collect();
        if !old.is_empty() {
            for &s in &old {
                // the state file goes first: a checkpoint without it is never resumed from
                let _ = std::fs::remove_file(state_path(&dir, s));
            }
            self.cx.plan.set(
                old.iter()
                    .map(|&s| CheckpointingAction::Delete(s as usize))
                    .collect(),
            );
            checkpointer.checkpoint(learner, step as usize, self.store);
        }
        Ok(())
    }

    fn write_bundle_dir(
        &self,
        model: &LanguageModel<B::InnerBackend>,
        name: &str,
        state: &TrainState,
        val_loss: Option<f64>,
    ) -> Result<(), String> {
        let dir = self.cx.run_dir.join(name);
        write_bundle(&dir, &model.transformer, &self.cx.tokenizer).map_err(|e| e.to_string())?;
        let info = serde_json::json!({
            "step": state.step,
            "total_steps": state.total_steps,
            "val_loss": val_loss,
            "tokens_seen": state.tokens_seen,
        });
        let path = dir.join("checkpoint.json");
        atomic_write(
            &path,
            serde_json::to_string_pretty(&info).unwrap().as_bytes(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn sample(&mut self, model: &LanguageModel<B::InnerBackend>, step: u64) {
        let t = &self.cx.config.train;
        let seed = t.seed;
        let prime = sample_prime(
            &self.cx.cache,
            self.cx.valid_range.clone(),
            t.sample_prime,
            seed,
            step,
        );
        let sample_seed = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match model.transformer.generate(
            &prime,
            t.sample_tokens,
            &Sampling::default(),
            sample_seed,
            |_| true,
        ) {
            Ok(tokens) => {
                let sample = Sample {
                    step,
                    prime: self.cx.tokenizer.decode(&prime),
                    continuation: self.cx.tokenizer.decode(&tokens),
                };
                let text = sample.render();
                self.log(&text);
                let path = self.cx.run_dir.join("samples.txt");
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    use std::io::Write;
                    let _ = writeln!(f, "{text}\n");
                }
                self.samples.push(sample);
            }
            Err(e) => self.log(format!("sample after step {step} failed: {e}")),
        }
    }

    /// Runs the validation epoch; `None` when interrupted.
    fn validate(
        &mut self,
        model: &LanguageModel<B::InnerBackend>,
        loader: &ValidLoader<Components<B>>,
        global: &Progress,
        interrupter: &burn::train::Interrupter,
    ) -> Option<f64> {
        let mut iter = loader.iter();
        let (mut sum, mut tokens, mut i) = (0.0, 0usize, 0usize);
        while let Some(batch) = iter.next() {
            let out = InferenceStep::step(model, batch);
            i += 1;
            sum += out.loss_value * out.tokens as f64;
            tokens += out.tokens;
            let item = TrainingItem::new(out, iter.progress(), global.clone(), Some(i), None);
            self.processor
                .process_valid(LearnerEvent::ProcessedItem(item));
            if interrupter.should_stop() {
                return None;
            }
        }
        (tokens > 0).then(|| sum / tokens as f64)
    }
}

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
        let train_loader = dataloader_train.to_device(&self.device);
        let valid_loader = dataloader_valid.to_device(self.device.inner());
        learner.fork(&self.device);
        // data parallel: Burn's multi-device train step, one worker thread per device
        let parallel = self
            .parallel
            .as_ref()
            .map(|(devices, plan)| DataParallel::<B>::new(devices.clone(), *plan));
        let interrupter = components.interrupter.clone();
        let store = components.event_store.clone();
        let mut lp = Loop::<B> {
            cx,
            processor: components.event_processor,
            checkpointer: components.checkpointer,
            store: &store,
            samples: Vec::new(),
            last_checkpoint: None,
            window: (0.0, 0, 0),
            per_step: None,
        };
        let config = lp.cx.config.clone();
        let t = &config.train;
        let total = t.steps;
        let per_epoch = t.eval_every;
        let num_epochs = total.div_ceil(per_epoch) as usize;
        let tokens_per_step = config.tokens_per_step();
        let mut state = lp.cx.state.clone();
        state.total_steps = total;
        if state.step > 0 {
            lp.last_checkpoint = Some(state.step);
        }
        let session_start_tokens = state.tokens_seen;
        let session_start_seconds = state.train_seconds;
        let session_start_step = state.step;
        let mut first_step_seconds = None;
        let mut consecutive_bad = 0u64;
        let mut end = EndReason::Finished;

        'epochs: while state.step < total {
            let epoch = (state.step / per_epoch) as usize + 1;
            let epoch_end = (epoch as u64 * per_epoch).min(total);
            let global = Progress::new(epoch, num_epochs);
            lp.cx.cursor.set(state.step);
            let mut stop: Option<EndReason> = None;
            let mut iter = train_loader.iter();
            while let Some(batch) = iter.next() {
                let started = Instant::now();
                learner.lr_step();
                let lr = learner.lr_current();
                let TrainOutput { grads, mut item } = match &parallel {
                    Some(parallel) => parallel.step(&learner.model(), batch),
                    None => learner.train_step(batch),
                };
                if item.non_finite {
                    state.non_finite_steps += 1;
                    consecutive_bad += 1;
                } else {
                    learner.optimizer_step(grads);
                    consecutive_bad = 0;
                }
                item.seconds = started.elapsed().as_secs_f64();
                state.step += 1;
                state.tokens_seen += tokens_per_step;
                state.train_seconds += item.seconds;
                let step = state.step;
                let first = *first_step_seconds.get_or_insert(item.seconds);
                lp.estimate(
                    step,
                    total,
                    step - session_start_step,
                    state.train_seconds - session_start_seconds,
                    first,
                );
                let row = CsvRow {
                    step,
                    split: "train".into(),
                    loss: item.loss_value,
                    lr: Some(lr),
                    grad_norm: item.grad_norm,
                    tokens_per_s: Some(tokens_per_step as f64 / item.seconds.max(1e-9)),
                    tokens_seen: state.tokens_seen,
                    elapsed_s: state.train_seconds,
                    non_finite: item.non_finite,
                };
                if let Err(e) = lp.cx.csv.append(&row) {
                    lp.log(format!(
                        "warning: cannot append to {}: {e}",
                        lp.cx.csv.path().display()
                    ));
                }
                if item.non_finite {
                    lp.window.2 += 1;
                } else {
                    lp.window.0 += item.loss_value;
                    lp.window.1 += 1;
                }
                if step.is_multiple_of(t.log_every) || step == total {
                    let (sum, n, bad) = std::mem::take(&mut lp.window);
                    let loss = if n > 0 { sum / n as f64 } else { f64::NAN };
                    let tps = (state.tokens_seen - session_start_tokens) as f64
                        / (state.train_seconds - session_start_seconds).max(1e-9);
                    let eta = match lp.per_step {
                        Some(p) if step < total => {
                            format!(" | ETA {}", crate::report::eta(p * (total - step) as f64))
                        }
                        _ => String::new(),
                    };
                    lp.log(format!(
                        "step {step:>w$}/{total} | loss {loss:.4} | ppl {:.1} | lr {lr:.2e} | grad {:.3} | {} tok/s | {}{eta}{}",
                        loss.exp(),
                        item.grad_norm.unwrap_or(f64::NAN),
                        thousands(tps.round() as u64),
                        duration(state.train_seconds),
                        if bad > 0 { format!(" | {bad} non-finite step(s) skipped") } else { String::new() },
                        w = total.to_string().len(),
                    ));
                }
                let non_finite = item.non_finite;
                let loss_value = item.loss_value;
                let progress = iter.progress();
                let item = TrainingItem::new(
                    item,
                    progress,
                    global.clone(),
                    Some(step as usize),
                    Some(lr),
                );
                lp.processor
                    .process_train(LearnerEvent::ProcessedItem(item));

                if non_finite {
                    let what =
                        format!("loss {loss_value} (or its gradient) is not finite at step {step}");
                    match t.on_non_finite {
                        NonFinitePolicy::Stop => {
                            stop = Some(EndReason::NonFinite(format!(
                                "{what}; stopped (train.on_non_finite = \"stop\")"
                            )));
                            break;
                        }
                        NonFinitePolicy::Skip if consecutive_bad >= t.max_non_finite => {
                            stop = Some(EndReason::NonFinite(format!(
                                "{what}; {consecutive_bad} consecutive steps skipped \
                                 (train.max_non_finite)"
                            )));
                            break;
                        }
                        NonFinitePolicy::Skip => {
                            lp.log(format!("warning: {what}; step skipped"));
                        }
                    }
                }
                if t.sample_every > 0 && step.is_multiple_of(t.sample_every) && step != epoch_end {
                    let model = learner.model().valid();
                    lp.sample(&model, step);
                }
                if interrupter.should_stop() {
                    stop = Some(interrupted(&interrupter));
                    break;
                }
                if lp.cx.stop_at == Some(step) && step != epoch_end {
                    stop = Some(EndReason::StoppedAt(step));
                    break;
                }
            }
            drop(iter);
            lp.processor.process_train(LearnerEvent::EndEpoch(epoch));

            if let Some(reason) = stop {
                if !matches!(reason, EndReason::NonFinite(_)) {
                    // mid-epoch stop: checkpoint the exact position, no validation
                    if lp.last_checkpoint != Some(state.step) {
                        match lp.save(&learner, &state) {
                            Ok(()) => lp.log(format!(
                                "checkpoint: step {} saved in {}",
                                state.step,
                                crate::checkpoint::checkpoint_dir(&lp.cx.run_dir).display()
                            )),
                            Err(e) => {
                                end = EndReason::Failed(e);
                                break 'epochs;
                            }
                        }
                        let model = learner.model().valid();
                        if let Err(e) = lp.write_bundle_dir(&model, "last", &state, None) {
                            end = EndReason::Failed(e);
                            break 'epochs;
                        }
                    }
                }
                end = reason;
                break 'epochs;
            }

            // end of epoch: validation, checkpoint, bundles, sample
            let model = learner.model().valid();
            let val = lp.validate(&model, &valid_loader, &global, &interrupter);
            lp.processor.process_valid(LearnerEvent::EndEpoch(epoch));
            let step = state.step;
            let mut improved = false;
            if let Some(v) = val {
                state.last_val_loss = Some(v).filter(|v| v.is_finite());
                let row = CsvRow {
                    step,
                    split: "valid".into(),
                    loss: v,
                    lr: None,
                    grad_norm: None,
                    tokens_per_s: None,
                    tokens_seen: state.tokens_seen,
                    elapsed_s: state.train_seconds,
                    non_finite: !v.is_finite(),
                };
                let _ = lp.cx.csv.append(&row);
                improved = v.is_finite() && state.best_val_loss.is_none_or(|b| v < b);
                if improved {
                    state.best_val_loss = Some(v);
                    state.best_step = Some(step);
                }
                lp.log(format!(
                    "validation after step {step}: loss {v:.4} | ppl {:.1}{}",
                    v.exp(),
                    if improved {
                        " | best so far".to_string()
                    } else {
                        format!(
                            " | best {:.4} at step {}",
                            state.best_val_loss.unwrap_or(f64::NAN),
                            state.best_step.unwrap_or(0)
                        )
                    }
                ));
                if !v.is_finite() {
                    lp.log("warning: the validation loss is not finite; the best model is kept");
                }
            }
            if let Err(e) = lp.save(&learner, &state) {
                end = EndReason::Failed(e);
                break 'epochs;
            }
            let bundles = lp
                .write_bundle_dir(&model, "last", &state, val)
                .and_then(|_| {
                    if improved {
                        lp.write_bundle_dir(&model, "best", &state, val)
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = bundles {
                end = EndReason::Failed(e);
                break 'epochs;
            }
            lp.log(format!(
                "checkpoint: step {step} saved; bundles: {}{}",
                lp.cx.run_dir.join("last").display(),
                if improved {
                    format!(", {}", lp.cx.run_dir.join("best").display())
                } else {
                    String::new()
                }
            ));
            if t.sample_every > 0 && step.is_multiple_of(t.sample_every) && val.is_some() {
                lp.sample(&model, step);
            }
            if val.is_none() || interrupter.should_stop() {
                end = interrupted(&interrupter);
                break;
            }
            if lp.cx.stop_at == Some(step) && step < total {
                end = EndReason::StoppedAt(step);
                break;
            }
        }

        let outcome = FitOutcome {
            session_seconds: state.train_seconds - session_start_seconds,
            session_tokens: state.tokens_seen - session_start_tokens,
            state,
            end,
            samples: std::mem::take(&mut lp.samples),
            last_checkpoint: lp.last_checkpoint,
        };
        *self.outcome.lock().unwrap() = Some(outcome);
        (learner.model(), lp.processor)
    }
}

/// `true` when `dir` holds a training run (its `config.toml`).
pub fn is_run_dir(dir: &Path) -> bool {
    dir.join("config.toml").is_file()
}
