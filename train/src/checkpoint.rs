//! Training checkpoints: the Learner's model, optimizer and scheduler records (written by
//! Burn's checkpointer through an atomic recorder) and a small JSON training state.
//!
//! ```text
//! <run>/checkpoint/model-<step>.mpk       model record (f32)
//! <run>/checkpoint/optim-<step>.mpk       AdamW state
//! <run>/checkpoint/scheduler-<step>.mpk   learning-rate schedule position
//! <run>/checkpoint/state-<step>.json      TrainState: step, best validation loss, ...
//! ```
//!
//! Checkpoints are named by the global optimizer step. Every file is written to a temporary
//! file, fsync'ed and renamed ([`AtomicRecorder`]); `state-<step>.json` is written last, once
//! the three records are on disk, so a checkpoint is complete exactly when its state file
//! exists and [`latest`] never picks a half-written one. Old checkpoints are deleted only
//! after a newer one is complete; the best one is kept.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use burn::prelude::Backend;
use burn::record::{FileRecorder, Recorder, RecorderError};
use burn::train::checkpoint::{CheckpointingAction, CheckpointingStrategy};
use burn::train::metric::store::EventStoreClient;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use nsa_runtime::bundle::atomic_write;

/// Checkpoint directory of a run.
pub fn checkpoint_dir(run: &Path) -> PathBuf {
    run.join("checkpoint")
}

/// The record names written by Burn's file checkpointer.
pub const RECORDS: [&str; 3] = ["model", "optim", "scheduler"];

/// Extension of the record files.
pub const RECORD_EXTENSION: &str = "mpk";

/// Path of a record (`model`, `optim` or `scheduler`) of step `step`, with its extension.
pub fn record_path(dir: &Path, name: &str, step: u64) -> PathBuf {
    dir.join(format!("{name}-{step}.{RECORD_EXTENSION}"))
}

/// Path of the training state of step `step`.
pub fn state_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("state-{step}.json"))
}

/// Errors of checkpoint writing and reading.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A record could not be written.
    #[error("cannot write checkpoint {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Waiting for the checkpoint writer timed out.
    #[error("checkpoint {0} was not written within 30 minutes")]
    Timeout(PathBuf),
    /// A state file is unreadable.
    #[error("{path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A record could not be loaded.
    #[error(
        "cannot load checkpoint {path}: {message}; the file may be corrupted — delete \
             this checkpoint's files (state-{step}.json first) to resume from an older one"
    )]
    Load {
        /// The file.
        path: PathBuf,
        /// The step.
        step: u64,
        /// Why.
        message: String,
    },
}

/// The training state saved next to the Learner records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done (the data position: the next batch is the one of this step).
    pub step: u64,
    /// Planned optimizer steps.
    pub total_steps: u64,
    /// Best validation loss so far (finite) and its step.
    pub best_val_loss: Option<f64>,
    /// Step of the best validation loss.
    pub best_step: Option<u64>,
    /// Validation loss of the last evaluation.
    pub last_val_loss: Option<f64>,
    /// Steps skipped because of a NaN/Inf loss or gradient.
    pub non_finite_steps: u64,
    /// Training tokens processed.
    pub tokens_seen: u64,
    /// Training wall time (seconds, validation and checkpoints excluded).
    pub train_seconds: f64,
}

impl TrainState {
    /// The state at step 0.
    pub fn new(total_steps: u64) -> Self {
        Self {
            step: 0,
            total_steps,
            best_val_loss: None,
            best_step: None,
            last_val_loss: None,
            non_finite_steps: 0,
            tokens_seen: 0,
            train_seconds: 0.0,
        }
    }

    /// Writes `state-<step>.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = state_path(dir, self.step);
        let json = serde_json::to_string_pretty(self).expect("state serialises");
        atomic_write(&path, json.as_bytes()).map_err(|e| CheckpointError::Write {
            path,
            message: e.to_string(),
        })
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let text = fs::read_to_string(path).map_err(|e| CheckpointError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| CheckpointError::State {
            path: path.to_path_buf(),
            message: format!("invalid training state: {e}"),
        })
    }
}

/// Steps of the complete checkpoints in `dir` (state file and the three records present),
/// ascending.
pub fn complete_steps(dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut steps: Vec<u64> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("state-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .filter(|&s| RECORDS.iter().all(|r| record_path(dir, r, s).is_file()))
        .collect();
    steps.sort_unstable();
    steps
}

/// The newest complete checkpoint of `dir` and its state.
pub fn latest(dir: &Path) -> Result<Option<TrainState>, CheckpointError> {
    match complete_steps(dir).last() {
        Some(&step) => TrainState::read(&state_path(dir, step)).map(Some),
        None => Ok(None),
    }
}

// ------------------------------------------------------------------------------ atomic recorder

/// Completed (or failed) writes, reported by [`AtomicRecorder`] so the training loop can wait
/// until a checkpoint is on disk.
#[derive(Debug, Clone, Default)]
pub struct SaveTracker(Arc<(Mutex<WriteResults>, Condvar)>);

/// The outcome of every write reported so far.
type WriteResults = HashMap<PathBuf, Result<(), String>>;

impl SaveTracker {
    fn report(&self, path: PathBuf, result: Result<(), String>) {
        let (lock, cvar) = &*self.0;
        lock.lock().unwrap().insert(path, result);
        cvar.notify_all();
    }

    /// Forgets earlier reports of `paths` (before they are written again).
    pub fn reset(&self, paths: &[PathBuf]) {
        let mut done = self.0 .0.lock().unwrap();
        for p in paths {
            done.remove(p);
        }
    }

    /// Waits until every path has been written; the first failure is returned.
    pub fn wait(&self, paths: &[PathBuf], timeout: Duration) -> Result<(), CheckpointError> {
        let (lock, cvar) = &*self.0;
        let deadline = std::time::Instant::now() + timeout;
        let mut done = lock.lock().unwrap();
        loop {
            for p in paths {
                if let Some(Err(message)) = done.get(p) {
                    return Err(CheckpointError::Write {
                        path: p.clone(),
                        message: message.clone(),
                    });
                }
            }
            if let Some(missing) = paths.iter().find(|p| !done.contains_key(*p)) {
                let now = std::time::Instant::now();
                if now >= deadline {
                    return Err(CheckpointError::Timeout(missing.clone()));
                }
                done = cvar.wait_timeout(done, deadline - now).unwrap().0;
            } else {
                return Ok(());
            }
        }
    }
}

/// A [`FileRecorder`] that writes like `R` but atomically: into a temporary file in the same
/// directory, fsync, rename over the target, fsync of the directory. Burn's file recorders
/// truncate the target first, so a crash while saving would destroy the previous checkpoint.
#[derive(Debug, Clone, Default)]
pub struct AtomicRecorder<R> {
    inner: R,
    tracker: SaveTracker,
}

impl<R> AtomicRecorder<R> {
    /// Wraps `inner`; completed writes are reported to `tracker`.
    pub fn new(inner: R, tracker: SaveTracker) -> Self {
        Self { inner, tracker }
    }
}

impl<B: Backend, R: FileRecorder<B>> Recorder<B> for AtomicRecorder<R> {
    type Settings = <R as Recorder<B>>::Settings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        let ext = <R as FileRecorder<B>>::file_extension();
        let target = file.with_extension(ext);
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp_base = dir.join(format!(".tmp-{}-{name}", std::process::id()));
        let tmp = tmp_base.with_extension(ext);
        let result = (|| -> Result<(), RecorderError> {
            fs::create_dir_all(&dir).map_err(|e| RecorderError::Unknown(e.to_string()))?;
            self.inner.save_item(item, tmp_base.clone())?;
            let io = |e: std::io::Error| RecorderError::Unknown(e.to_string());
            fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            fs::rename(&tmp, &target).map_err(io)?;
            if let Ok(d) = fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        self.tracker.report(
            target,
            result.as_ref().map(|_| ()).map_err(|e| e.to_string()),
        );
        result
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        self.inner.load_item(file)
    }
}

impl<B: Backend, R: FileRecorder<B>> FileRecorder<B> for AtomicRecorder<R> {
    fn file_extension() -> &'static str {
        <R as FileRecorder<B>>::file_extension()
    }
}

// ------------------------------------------------------------------------------ strategy

/// The actions the training loop wants from Burn's checkpointer at its next call.
#[derive(Debug, Clone, Default)]
pub struct CheckpointPlan(Arc<Mutex<Vec<CheckpointingAction>>>);

impl CheckpointPlan {
    /// Sets the next call's actions.
    pub fn set(&self, actions: Vec<CheckpointingAction>) {
        *self.0.lock().unwrap() = actions;
    }
}

/// A [`CheckpointingStrategy`] that does what the training loop planned: save at the end of
/// every epoch (and on interruption), delete checkpoints that are neither among the last
/// `keep_checkpoints` nor the best one — only once a newer checkpoint is complete.
pub struct PlannedCheckpointing(pub CheckpointPlan);

impl CheckpointingStrategy for PlannedCheckpointing {
    fn checkpointing(&mut self, _epoch: usize, _: &EventStoreClient) -> Vec<CheckpointingAction> {
        std::mem::take(&mut *self.0 .0.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
    type B = burn::backend::NdArray<f32>;

    #[test]
    fn atomic_recorder_writes_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let tracker = SaveTracker::default();
        let rec = AtomicRecorder::new(
            NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            tracker.clone(),
        );
        let base = dir.path().join("model-3");
        Recorder::<B>::record(&rec, 42usize, base.clone()).unwrap();
        let target = record_path(dir.path(), "model", 3);
        tracker
            .wait(std::slice::from_ref(&target), Duration::from_secs(1))
            .unwrap();
        let back: usize = Recorder::<B>::load(&rec, base, &Default::default()).unwrap();
        assert_eq!(back, 42);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["model-3.mpk"]);
        // a missing path times out
        let err = tracker
            .wait(&[dir.path().join("x")], Duration::from_millis(10))
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Timeout(_)));
    }

    #[test]
    fn only_complete_checkpoints_count() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for step in [5u64, 10, 15] {
            let mut s = TrainState::new(20);
            s.step = step;
            s.write(d).unwrap();
            for r in RECORDS {
                if !(step == 15 && r == "optim") {
                    fs::write(record_path(d, r, step), b"x").unwrap();
                }
            }
        }
        assert_eq!(complete_steps(d), [5, 10]);
        assert_eq!(latest(d).unwrap().unwrap().step, 10);
        assert!(latest(&d.join("none")).unwrap().is_none());
    }
}
