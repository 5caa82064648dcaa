//! The training loop's epochs ([`Loop`]): the steps of an epoch, the log lines and metrics
//! rows they produce, non-finite steps, and the end of an epoch (validation, checkpoint,
//! bundles, samples).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::data::dataloader::Progress;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::CheckpointingAction;
use burn::train::metric::store::EventStoreClient;
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningCheckpointer,
    SupervisedTrainingEventProcessor, TrainLoader, TrainOutput, TrainingItem, ValidLoader,
};
use nsa_model::Sampling;
use nsa_runtime::bundle::{atomic_write, write_bundle};

use super::{EndReason, FitContext, FitOutcome, Sample};
use crate::checkpoint::{
    complete_steps, record_path, state_path, CheckpointError, TrainState, RECORDS,
};
use crate::config::NonFinitePolicy;
use crate::data::sample_prime;
use crate::lm::LanguageModel;
use crate::metrics::CsvRow;
use crate::parallel::DataParallel;
use crate::report::{duration, thousands};
use crate::training::Components;

const SAVE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub(super) struct Loop<'a, B: AutodiffBackend> {
    cx: FitContext,
    pub processor: SupervisedTrainingEventProcessor<Components<B>>,
    checkpointer: Option<LearningCheckpointer<Components<B>>>,
    store: &'a EventStoreClient,
    samples: Vec<Sample>,
    last_checkpoint: Option<u64>,
    /// Loss sum, count and non-finite count since the last log line.
    window: (f64, u64, u64),
    /// Sum and count of the indexer losses since the last log line (DSA models).
    indexer_window: (f64, u64),
    /// Seconds per step measured after the first steps of this session (for the ETA).
    per_step: Option<f64>,
    /// Where this session started.
    start: SessionStart,
    /// Seconds of the session's first step.
    first_step_seconds: Option<f64>,
    /// Non-finite steps in a row.
    consecutive_bad: u64,
}

/// The counters of the state this session started from.
#[derive(Debug, Clone, Copy, Default)]
struct SessionStart {
    step: u64,
    tokens: u64,
    seconds: f64,
}

/// What the epochs read from: the data loaders, the data-parallel step (several devices) and
/// the interrupter.
pub(super) struct Loaders<B: AutodiffBackend> {
    pub train: TrainLoader<Components<B>>,
    pub valid: ValidLoader<Components<B>>,
    pub parallel: Option<DataParallel<B>>,
    pub interrupter: burn::train::Interrupter,
}

/// One training step's numbers, for the CSV row and the log line.
struct StepNumbers {
    lr: f64,
    loss: f64,
    grad_norm: Option<f64>,
    seconds: f64,
    non_finite: bool,
    indexer_loss: Option<f64>,
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

impl<'a, B: AutodiffBackend> Loop<'a, B> {
    pub fn new(
        cx: FitContext,
        processor: SupervisedTrainingEventProcessor<Components<B>>,
        checkpointer: Option<LearningCheckpointer<Components<B>>>,
        store: &'a EventStoreClient,
    ) -> Self {
        Self {
            cx,
            processor,
            checkpointer,
            store,
            samples: Vec::new(),
            last_checkpoint: None,
            window: (0.0, 0, 0),
            indexer_window: (0.0, 0),
            per_step: None,
            start: SessionStart::default(),
            first_step_seconds: None,
            consecutive_bad: 0,
        }
    }

    /// The state to continue from (the checkpoint's, planned for the configured steps); notes
    /// where the session starts.
    pub fn starting_state(&mut self) -> TrainState {
        let mut state = self.cx.state.clone();
        state.total_steps = self.cx.config.train.steps;
        if state.step > 0 {
            self.last_checkpoint = Some(state.step);
        }
        self.start = SessionStart {
            step: state.step,
            tokens: state.tokens_seen,
            seconds: state.train_seconds,
        };
        state
    }

    /// The session's result.
    pub fn outcome(&mut self, state: TrainState, end: EndReason) -> FitOutcome {
        FitOutcome {
            session_seconds: state.train_seconds - self.start.seconds,
            session_tokens: state.tokens_seen - self.start.tokens,
            state,
            end,
            samples: std::mem::take(&mut self.samples),
            last_checkpoint: self.last_checkpoint,
        }
    }

    /// Trains epoch after epoch (one epoch = `eval_every` steps, the first one possibly
    /// partial after a resumption) until the planned steps are done or something stops it.
    pub fn run_epochs(
        &mut self,
        learner: &mut Learner<Components<B>>,
        state: &mut TrainState,
        loaders: &Loaders<B>,
    ) -> EndReason {
        let t = &self.cx.config.train;
        let (total, per_epoch) = (t.steps, t.eval_every);
        let num_epochs = total.div_ceil(per_epoch) as usize;
        while state.step < total {
            let epoch = (state.step / per_epoch) as usize + 1;
            let epoch_end = (epoch as u64 * per_epoch).min(total);
            let global = Progress::new(epoch, num_epochs);
            self.cx.cursor.set(state.step);
            let stop = self.train_epoch(learner, state, loaders, &global, epoch_end);
            self.processor.process_train(LearnerEvent::EndEpoch(epoch));
            if let Some(reason) = stop {
                if !matches!(reason, EndReason::NonFinite(_)) {
                    if let Err(e) = self.checkpoint_mid_epoch(learner, state) {
                        return EndReason::Failed(e);
                    }
                }
                return reason;
            }
            match self.end_epoch(learner, state, loaders, &global, epoch) {
                Err(e) => return EndReason::Failed(e),
                Ok(Some(end)) => return end,
                Ok(None) => {}
            }
        }
        EndReason::Finished
    }

    /// The training steps of one epoch, up to `epoch_end`; `Some` when training stops within
    /// it (non-finite loss, interruption, `stop_at`).
    fn train_epoch(
        &mut self,
        learner: &mut Learner<Components<B>>,
        state: &mut TrainState,
        loaders: &Loaders<B>,
        global: &Progress,
        epoch_end: u64,
    ) -> Option<EndReason> {
        let config = self.cx.config.clone();
        let t = &config.train;
        let tokens_per_step = config.tokens_per_step();
        let mut iter = loaders.train.iter();
        while let Some(batch) = iter.next() {
            let started = Instant::now();
            learner.lr_step();
            let lr = learner.lr_current();
            let TrainOutput { grads, mut item } = match &loaders.parallel {
                Some(parallel) => parallel.step(&learner.model(), batch),
                None => learner.train_step(batch),
            };
            if item.non_finite {
                state.non_finite_steps += 1;
                self.consecutive_bad += 1;
            } else {
                learner.optimizer_step(grads);
                self.consecutive_bad = 0;
            }
            item.seconds = started.elapsed().as_secs_f64();
            state.step += 1;
            state.tokens_seen += tokens_per_step;
            state.train_seconds += item.seconds;
            let step = state.step;
            let numbers = StepNumbers {
                lr,
                loss: item.loss_value,
                grad_norm: item.grad_norm,
                seconds: item.seconds,
                non_finite: item.non_finite,
                indexer_loss: item.indexer_loss,
            };
            self.record_step(state, &numbers);
            let progress = iter.progress();
            let item = TrainingItem::new(
                item,
                progress,
                global.clone(),
                Some(step as usize),
                Some(lr),
            );
            self.processor
                .process_train(LearnerEvent::ProcessedItem(item));

            if numbers.non_finite {
                if let Some(end) = self.on_non_finite(step, numbers.loss) {
                    return Some(end);
                }
            }
            if t.sample_every > 0 && step.is_multiple_of(t.sample_every) && step != epoch_end {
                let model = learner.model().valid();
                self.sample(&model, step);
            }
            if loaders.interrupter.should_stop() {
                return Some(interrupted(&loaders.interrupter));
            }
            if self.cx.stop_at == Some(step) && step != epoch_end {
                return Some(EndReason::StoppedAt(step));
            }
        }
        None
    }

    /// After a step: the time estimate, the CSV row, and every `log_every` steps the log line
    /// with the mean loss of those steps.
    fn record_step(&mut self, state: &TrainState, n: &StepNumbers) {
        let t = &self.cx.config.train;
        let (total, log_every) = (t.steps, t.log_every);
        let tokens_per_step = self.cx.config.tokens_per_step();
        let step = state.step;
        let first = *self.first_step_seconds.get_or_insert(n.seconds);
        self.estimate(
            step,
            total,
            step - self.start.step,
            state.train_seconds - self.start.seconds,
            first,
        );
        let row = CsvRow {
            step,
            split: "train".into(),
            loss: n.loss,
            lr: Some(n.lr),
            grad_norm: n.grad_norm,
            tokens_per_s: Some(tokens_per_step as f64 / n.seconds.max(1e-9)),
            tokens_seen: state.tokens_seen,
            elapsed_s: state.train_seconds,
            non_finite: n.non_finite,
            indexer_loss: n.indexer_loss,
        };
        if let Err(e) = self.cx.csv.append(&row) {
            self.log(format!(
                "warning: cannot append to {}: {e}",
                self.cx.csv.path().display()
            ));
        }
        if n.non_finite {
            self.window.2 += 1;
        } else {
            self.window.0 += n.loss;
            self.window.1 += 1;
            if let Some(kl) = n.indexer_loss {
                self.indexer_window.0 += kl;
                self.indexer_window.1 += 1;
            }
        }
        if step.is_multiple_of(log_every) || step == total {
            let (sum, count, bad) = std::mem::take(&mut self.window);
            let indexer = match std::mem::take(&mut self.indexer_window) {
                (sum, count) if count > 0 => format!(" | indexer KL {:.4}", sum / count as f64),
                _ => String::new(),
            };
            let loss = if count > 0 {
                sum / count as f64
            } else {
                f64::NAN
            };
            let tps = (state.tokens_seen - self.start.tokens) as f64
                / (state.train_seconds - self.start.seconds).max(1e-9);
            let eta = match self.per_step {
                Some(p) if step < total => {
                    format!(" | ETA {}", crate::report::eta(p * (total - step) as f64))
                }
                _ => String::new(),
            };
            self.log(format!(
                "step {step:>w$}/{total} | loss {loss:.4} | ppl {:.1}{indexer} | lr {:.2e} | grad {:.3} | {} tok/s | {}{eta}{}",
                loss.exp(),
                n.lr,
                n.grad_norm.unwrap_or(f64::NAN),
                thousands(tps.round() as u64),
                duration(state.train_seconds),
                if bad > 0 { format!(" | {bad} non-finite step(s) skipped") } else { String::new() },
                w = total.to_string().len(),
            ));
        }
    }

    /// A non-finite step under `train.on_non_finite`: `Some` stops training.
    fn on_non_finite(&mut self, step: u64, loss: f64) -> Option<EndReason> {
        let t = &self.cx.config.train;
        let what = format!("loss {loss} (or its gradient) is not finite at step {step}");
        match t.on_non_finite {
            NonFinitePolicy::Stop => Some(EndReason::NonFinite(format!(
                "{what}; stopped (train.on_non_finite = \"stop\")"
            ))),
            NonFinitePolicy::Skip if self.consecutive_bad >= t.max_non_finite => {
                Some(EndReason::NonFinite(format!(
                    "{what}; {} consecutive steps skipped (train.max_non_finite)",
                    self.consecutive_bad
                )))
            }
            NonFinitePolicy::Skip => {
                self.log(format!("warning: {what}; step skipped"));
                None
            }
        }
    }

    /// A stop within an epoch: checkpoints the exact position and writes the `last` bundle
    /// (no validation), unless that step is already saved.
    fn checkpoint_mid_epoch(
        &mut self,
        learner: &Learner<Components<B>>,
        state: &TrainState,
    ) -> Result<(), String> {
        if self.last_checkpoint == Some(state.step) {
            return Ok(());
        }
        self.save(learner, state)?;
        self.log(format!(
            "checkpoint: step {} saved in {}",
            state.step,
            crate::checkpoint::checkpoint_dir(&self.cx.run_dir).display()
        ));
        let model = learner.model().valid();
        self.write_bundle_dir(&model, "last", state, None)
    }

    /// The end of an epoch: validation, checkpoint, the `last` (and `best`) bundles, a sample;
    /// `Some` when training stops here (interrupted, `stop_at`).
    fn end_epoch(
        &mut self,
        learner: &Learner<Components<B>>,
        state: &mut TrainState,
        loaders: &Loaders<B>,
        global: &Progress,
        epoch: usize,
    ) -> Result<Option<EndReason>, String> {
        let t = self.cx.config.train.clone();
        let interrupter = &loaders.interrupter;
        let model = learner.model().valid();
        let val = self.validate(&model, &loaders.valid, global, interrupter);
        self.processor.process_valid(LearnerEvent::EndEpoch(epoch));
        let step = state.step;
        let improved = match val {
            Some(v) => self.record_validation(state, v),
            None => false,
        };
        self.save(learner, state)?;
        self.write_bundle_dir(&model, "last", state, val)?;
        if improved {
            self.write_bundle_dir(&model, "best", state, val)?;
        }
        self.log(format!(
            "checkpoint: step {step} saved; bundles: {}{}",
            self.cx.run_dir.join("last").display(),
            if improved {
                format!(", {}", self.cx.run_dir.join("best").display())
            } else {
                String::new()
            }
        ));
        if t.sample_every > 0 && step.is_multiple_of(t.sample_every) && val.is_some() {
            self.sample(&model, step);
        }
        if val.is_none() || interrupter.should_stop() {
            return Ok(Some(interrupted(interrupter)));
        }
        if self.cx.stop_at == Some(step) && step < t.steps {
            return Ok(Some(EndReason::StoppedAt(step)));
        }
        Ok(None)
    }

    /// Records the validation loss `v` (CSV row, log line, best so far); returns whether it
    /// improved on the best.
    fn record_validation(&mut self, state: &mut TrainState, v: f64) -> bool {
        let step = state.step;
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
            indexer_loss: None,
        };
        let _ = self.cx.csv.append(&row);
        let improved = v.is_finite() && state.best_val_loss.is_none_or(|b| v < b);
        if improved {
            state.best_val_loss = Some(v);
            state.best_step = Some(step);
        }
        self.log(format!(
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
            self.log("warning: the validation loss is not finite; the best model is kept");
        }
        improved
    }
}
