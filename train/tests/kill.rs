//! Training survives being killed: the real `nsa-train` binary is SIGKILLed at pseudo-random
//! moments (at least 10 times), each time the newest complete checkpoint loads and the run is
//! resumed from it, and the finished run's per-step losses and weights equal those of an
//! uninterrupted run with the same seed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsa_runtime::bundle::WEIGHTS_FILE;
use nsa_runtime::reference::read_state_dict;
use nsa_train::checkpoint::{checkpoint_dir, latest};
use nsa_train::metrics::read_csv;

const BIN: &str = env!("CARGO_BIN_EXE_nsa-train");

fn command(cache: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("NSA_CACHE_DIR", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    read_csv(&out.join("metrics.csv"))
        .unwrap()
        .into_iter()
        .filter(|r| r.split == "train")
        .map(|r| (r.step, r.loss))
        .collect()
}

#[test]
fn sigkill_at_random_moments_then_resume_reproduces_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = common::small_corpus(d, 400);
    let cache = d.join("cache");
    let mut config = common::tiny_config();
    config.data.paths = vec![corpus];
    config.train.steps = 24;
    config.train.eval_every = 3;
    config.train.sample_every = 0;
    let config_path = d.join("kill.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();

    // uninterrupted
    let full = d.join("full");
    let status = command(&cache)
        .arg("--config")
        .arg(&config_path)
        .arg("--no-tui")
        .arg("--out")
        .arg(&full)
        .status()
        .unwrap();
    assert!(status.success());
    let reference = train_losses(&full);
    assert_eq!(reference.len(), 24);

    // killed again and again
    let out = d.join("killed");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    let mut finished = false;
    let mut checkpoints_seen = Vec::new();
    for attempt in 0..40 {
        let started = out.join("config.toml").exists();
        let mut c = command(&cache);
        c.arg("--no-tui").arg("--out").arg(&out);
        if started {
            c.arg("--resume");
        } else {
            c.arg("--config").arg(&config_path);
        }
        let mut child = c.spawn().unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // kill 0.1 .. 1.6 s after the start, unless it finishes first
        let delay = Duration::from_millis(100 + seed % 1500);
        let t = Instant::now();
        let mut exited = None;
        while t.elapsed() < delay {
            if let Some(s) = child.try_wait().unwrap() {
                exited = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match exited {
            Some(s) => {
                assert!(s.success(), "attempt {attempt} failed: {s}");
                finished = true;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
        // the newest complete checkpoint always loads
        if let Some(c) = latest(&checkpoint_dir(&out)).unwrap() {
            checkpoints_seen.push(c.step);
        }
        if finished && kills >= 10 {
            break;
        }
        if finished {
            // start over to collect more kills
            std::fs::remove_dir_all(&out).unwrap();
            finished = false;
        }
    }
    assert!(kills >= 10, "only {kills} kills");
    if !finished {
        let status = command(&cache)
            .args(["--resume", "--no-tui", "--out"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
    }
    eprintln!("{kills} SIGKILLs; checkpoints seen after kills: {checkpoints_seen:?}");

    let losses = train_losses(&out);
    assert_eq!(losses.len(), reference.len(), "one row per step");
    for ((s1, a), (s2, b)) in reference.iter().zip(&losses) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "loss at step {s1}: {a} uninterrupted, {b} after kills"
        );
    }
    let a = read_state_dict(&full.join("last").join(WEIGHTS_FILE)).unwrap();
    let b = read_state_dict(&out.join("last").join(WEIGHTS_FILE)).unwrap();
    for (name, t) in &a {
        // infinite when either side holds a NaN or infinity
        let max = t.compare(&b[name]).expect("same shape").max_abs;
        assert!(max < 1e-5, "{name} differs by {max}");
    }
}

/// A long tiny-preset run in `d/run` (checkpoints only when stopped), started in the
/// background with its standard error in `stderr`; returns once it has logged 3 steps.
fn start_long_run(d: &Path, stderr: Stdio) -> (Child, PathBuf, PathBuf) {
    let corpus = common::small_corpus(d, 400);
    let cache = d.join("cache");
    let mut config = common::tiny_config();
    config.data.paths = vec![corpus];
    config.train.steps = 100_000;
    config.train.eval_every = 50_000;
    config.train.sample_every = 0;
    config.train.log_every = 1;
    let config_path = d.join("long.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let out = d.join("run");
    let child = command(&cache)
        .arg("--config")
        .arg(&config_path)
        .args(["--no-tui", "--out"])
        .arg(&out)
        .stderr(stderr)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        let rows = read_csv(&out.join("metrics.csv"))
            .map(|r| r.len())
            .unwrap_or(0);
        if rows >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, out, cache)
}

/// Sends `signal` (`-INT`, `-TERM`) to `child` with `kill`.
fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // a few steps logged, then SIGINT as a terminal's Ctrl-C would
    let (mut child, out, cache) = start_long_run(dir.path(), Stdio::null());
    signal(&child, "-INT");
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "interrupted runs exit with 130");
    let saved = latest(&checkpoint_dir(&out))
        .unwrap()
        .expect("a checkpoint was saved on Ctrl-C");
    assert!(saved.step >= 3, "checkpoint at step {}", saved.step);
    // and the run continues from it
    let mut c = command(&cache);
    let status = c
        .args(["--resume", "--no-tui", "--steps"])
        .arg((saved.step + 2).to_string())
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        latest(&checkpoint_dir(&out)).unwrap().unwrap().step,
        saved.step + 2
    );
}

/// One stop request that arrives twice at once, as `timeout` sends it (SIGTERM to the process,
/// then to its process group), stops the run with a checkpoint; it does not quit at once.
#[test]
fn sigterm_twice_at_once_is_one_stop_request() {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr.txt");
    let stderr = Stdio::from(std::fs::File::create(&err_path).unwrap());
    let (mut child, out, _) = start_long_run(dir.path(), stderr);
    for _ in 0..2 {
        signal(&child, "-TERM");
    }
    let code = child.wait().unwrap().code();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(
        code,
        Some(130),
        "interrupted runs exit with 130; stderr:\n{err}"
    );
    assert!(
        err.contains("stopping: saving a checkpoint") && !err.contains("stopped at once"),
        "one request, a graceful stop; stderr:\n{err}"
    );
    let saved = latest(&checkpoint_dir(&out))
        .unwrap()
        .expect("a checkpoint was saved on SIGTERM");
    assert!(saved.step >= 3, "checkpoint at step {}", saved.step);
}
