//! Resuming: training N steps, stopping, and resuming for N more steps gives the same losses
//! and weights as 2N uninterrupted steps — through the real training code path (`run`); a
//! run extended with more steps keeps its learning-rate schedule.

mod common;

use std::path::Path;

use nsa_runtime::backend::{BackendKind, DeviceList};
use nsa_runtime::bundle::WEIGHTS_FILE;
use nsa_runtime::reference::read_state_dict;
use nsa_train::checkpoint::{checkpoint_dir, complete_steps, latest};
use nsa_train::config::{Overrides, TrainConfig};
use nsa_train::metrics::{read_csv, CsvRow};
use nsa_train::schedule::WarmupCosine;
use nsa_train::strategy::EndReason;
use nsa_train::training::{run, RunOptions, Start, UiMode};

fn options(out: &Path, cache: &Path, corpus: &Path, stop_at: Option<u64>) -> RunOptions {
    let mut config = common::tiny_config();
    config.data.paths = vec![corpus.to_path_buf()];
    let mut o = RunOptions::new(out, config);
    o.cache_dir = Some(cache.to_path_buf());
    o.ui = UiMode::Quiet;
    o.stop_at = stop_at;
    o
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    read_csv(&out.join("metrics.csv"))
        .unwrap()
        .into_iter()
        .filter(|r: &CsvRow| r.split == "train")
        .map(|r| (r.step, r.loss))
        .collect()
}

/// The tests of this file run one at a time: the backends draw from a process-wide
/// generator, so two runs training at once would not reproduce each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn max_weight_difference(a: &Path, b: &Path) -> f32 {
    let a = read_state_dict(&a.join(WEIGHTS_FILE)).unwrap();
    let b = read_state_dict(&b.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    for (name, t) in &a {
        let u = &b[name];
        assert_eq!(t.shape, u.shape, "{name}");
        // infinite when either side holds a NaN or infinity
        let d = t.compare(u).expect("same shape").max_abs as f32;
        if d.is_nan() || d > max {
            max = d;
        }
    }
    max
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = common::small_corpus(d, 400);
    let cache = d.join("cache");

    // uninterrupted: 8 steps, evaluation every 4
    let full = d.join("full");
    let s = run(options(&full, &cache, &corpus, None)).unwrap();
    assert_eq!(s.end, EndReason::Finished);
    assert_eq!(s.end_step, 8);
    let reference = train_losses(&full);
    assert_eq!(reference.len(), 8);
    assert!(reference.iter().all(|(_, l)| l.is_finite()));

    // stopped after N = 4 (an evaluation boundary) or N = 3 (inside an epoch), then resumed
    for n in [4u64, 3] {
        let out = d.join(format!("split-{n}"));
        let first = run(options(&out, &cache, &corpus, Some(n))).unwrap();
        assert_eq!(first.end, EndReason::StoppedAt(n));
        assert_eq!(latest(&checkpoint_dir(&out)).unwrap().unwrap().step, n);

        let mut resume = options(&out, &cache, &corpus, None);
        resume.start = Start::Resume(Overrides::default());
        let second = run(resume).unwrap();
        assert_eq!(second.end, EndReason::Finished);
        assert_eq!((second.start_step, second.end_step), (n, 8));

        let losses = train_losses(&out);
        assert_eq!(losses.len(), 8, "one row per step, none duplicated");
        for ((s1, a), (s2, b)) in reference.iter().zip(&losses) {
            assert_eq!(s1, s2);
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "N = {n}: loss at step {s1}: {a} uninterrupted, {b} resumed"
            );
        }
        // the first step after the resume in particular
        assert!((reference[n as usize].1 - losses[n as usize].1).abs() <= 1e-5);

        let diff = max_weight_difference(&full.join("last"), &out.join("last"));
        assert!(diff < 1e-5, "N = {n}: final weights differ by {diff}");
        let diff = max_weight_difference(&full.join("best"), &out.join("best"));
        assert!(diff < 1e-5, "N = {n}: best weights differ by {diff}");
        let (a, b) = (
            latest(&checkpoint_dir(&full)).unwrap().unwrap(),
            latest(&checkpoint_dir(&out)).unwrap().unwrap(),
        );
        assert_eq!(a.step, b.step);
        assert_eq!(a.best_step, b.best_step);
        let (va, vb) = (a.best_val_loss.unwrap(), b.best_val_loss.unwrap());
        assert!((va - vb).abs() <= 1e-5 * va, "{va} {vb}");
    }

    // data parallel (`--devices 0,0`: Burn's multi-device step with two replicas on the CPU
    // device): the global batch is split and the gradients averaged, so the curve is the same
    let parallel = d.join("parallel");
    let mut o = options(&parallel, &cache, &corpus, None);
    o.device.kind = BackendKind::cpu();
    o.devices = Some(DeviceList::Indices(vec![0, 0]));
    let s = run(o).unwrap();
    assert_eq!(s.end, EndReason::Finished);
    assert_eq!(s.choice.devices, vec![0, 0]);
    let losses = train_losses(&parallel);
    assert_eq!(losses.len(), 8);
    for ((step, a), (_, b)) in reference.iter().zip(&losses) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "loss at step {step}: {a} on one device, {b} on two"
        );
    }
    let diff = max_weight_difference(&full.join("last"), &parallel.join("last"));
    assert!(diff < 1e-4, "data parallel: final weights differ by {diff}");

    // the same seed gives the same curve; checkpoints are pruned to the kept ones
    let again = d.join("again");
    run(options(&again, &cache, &corpus, None)).unwrap();
    assert_eq!(train_losses(&again), reference);
    assert_eq!(complete_steps(&checkpoint_dir(&full)), [4, 8]);
    assert!(full.join("loss.png").is_file());
    assert!(full.join("samples.txt").is_file());
}

/// `(step, lr)` of the training rows.
fn train_lrs(out: &Path) -> Vec<(u64, f64)> {
    read_csv(&out.join("metrics.csv"))
        .unwrap()
        .into_iter()
        .filter(|r| r.split == "train")
        .map(|r| (r.step, r.lr.unwrap()))
        .collect()
}

#[test]
fn extending_a_run_keeps_its_learning_rate_schedule() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = common::small_corpus(d, 300);
    let cache = d.join("cache");

    // warmup 2 (a cosine to the end), and a warmup longer than the run (capped at its steps)
    for warmup in [2u64, 100] {
        let out = d.join(format!("warmup-{warmup}"));
        let mut o = options(&out, &cache, &corpus, None);
        if let Start::New(c) = &mut o.start {
            c.train.steps = 6;
            c.train.eval_every = 3;
            c.train.sample_every = 0;
            c.optim.warmup_steps = warmup;
        }
        assert_eq!(run(o).unwrap().end_step, 6);

        // 4 more steps
        let mut resume = options(&out, &cache, &corpus, None);
        resume.start = Start::Resume(Overrides {
            steps: Some(10),
            ..Default::default()
        });
        let s = run(resume).unwrap();
        assert_eq!((s.start_step, s.end_step), (6, 10));
        let config = TrainConfig::from_file(&out.join("config.toml")).unwrap();
        assert_eq!(config.train.steps, 10);
        assert_eq!(config.optim.schedule_steps, Some(6));

        // the original schedule up to step 6, its final learning rate after
        let o = &config.optim;
        let plan = WarmupCosine::new(o.lr, o.min_lr_ratio, o.warmup_steps, 6);
        let lrs = train_lrs(&out);
        assert_eq!(lrs.len(), 10);
        for &(step, lr) in &lrs {
            let expected = plan.lr_at(step.min(6) - 1);
            assert!(
                (lr - expected).abs() <= 1e-12 * expected,
                "warmup {warmup}, step {step}: lr {lr}, planned {expected}"
            );
        }
        let last = plan.lr_at(5);
        assert!(lrs[6..].iter().all(|&(_, lr)| lr == last));
        if warmup == 100 {
            // warmup capped at the 6 planned steps: the peak from step 6 on
            assert!((last - o.lr).abs() <= 1e-12 * o.lr, "{last}");
        } else {
            assert!(last < o.lr);
        }

        // fewer steps than done: refused, config.toml untouched
        let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
        let mut shorter = options(&out, &cache, &corpus, None);
        shorter.start = Start::Resume(Overrides {
            steps: Some(4),
            ..Default::default()
        });
        let err = run(shorter).unwrap_err().to_string();
        assert!(
            err.contains("at step 10") && err.contains("--steps"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(
            std::fs::read_to_string(out.join("config.toml")).unwrap(),
            saved
        );
    }
}
