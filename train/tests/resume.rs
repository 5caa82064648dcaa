//! Resuming: training N steps, stopping, and resuming for N more steps gives the same losses
//! and weights as 2N uninterrupted steps — through the real training code path (`run`).

mod common;

use std::path::Path;

use nsa_train::backend::{BackendKind, DeviceList};
use nsa_train::bundle::{read_state_dict, WEIGHTS_FILE};
use nsa_train::checkpoint::{checkpoint_dir, complete_steps, latest};
use nsa_train::config::Overrides;
use nsa_train::metrics::{read_csv, CsvRow};
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

fn max_weight_difference(a: &Path, b: &Path) -> f32 {
    let a = read_state_dict(&a.join(WEIGHTS_FILE)).unwrap();
    let b = read_state_dict(&b.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    for (name, t) in &a {
        let u = &b[name];
        assert_eq!(t.shape, u.shape, "{name}");
        for (x, y) in t.values.iter().zip(&u.values) {
            max = max.max((x - y).abs());
        }
    }
    max
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
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
    assert_eq!(s.selection.devices, vec![0, 0]);
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
