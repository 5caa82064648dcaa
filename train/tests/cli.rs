//! The `nsa-train` command line: bad inputs are refused with one clear line (argument errors
//! with clap's whole message) and a non-zero exit code, without touching what is already
//! saved; a small run trains, stops, resumes and leaves an inference bundle; a resumed run
//! keeps its recipe.

mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nsa-train");

fn nsa_train(args: &[&str]) -> (i32, String, String) {
    let cache = std::env::temp_dir().join("nsa-train-cli-test-cache");
    let out = Command::new(BIN)
        .args(args)
        .env("NSA_CACHE_DIR", cache)
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refused(args: &[&str], needles: &[&str]) {
    let (code, _, err) = nsa_train(args);
    assert_ne!(code, 0, "{args:?} was accepted");
    // a panic prints `panicked` (default hook) or `internal error` (the binaries' hook)
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{args:?} panicked: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` missing from: {err}");
    }
}

/// An argument error: clap's whole message (the problem, tips and usage where clap gives
/// them, where to get help).
fn refused_by_clap(args: &[&str], needles: &[&str]) {
    let (code, out, err) = nsa_train(args);
    assert_eq!(code, 2, "{args:?}: {out}{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("For more information, try '--help'."),
        "{args:?}: no help line in:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` missing from:\n{err}");
    }
}

fn write_config(dir: &Path) -> String {
    let path = dir.join("test.toml");
    std::fs::write(&path, common::tiny_config().to_toml()).unwrap();
    path.display().to_string()
}

#[test]
fn bad_inputs_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("run");
    let out_s = out.display().to_string();
    let config = write_config(d);

    refused(
        &["--data", "/nonexistent/corpus.txt", "--out", &out_s],
        &["/nonexistent/corpus.txt"],
    );
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    refused(
        &[
            "--config",
            &config,
            "--data",
            empty.to_str().unwrap(),
            "--out",
            &out_s,
        ],
        &["empty.txt", "no documents"],
    );
    let short = d.join("short.txt");
    std::fs::write(
        &short,
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n",
    )
    .unwrap();
    refused(
        &[
            "--config",
            &config,
            "--data",
            short.to_str().unwrap(),
            "--out",
            &out_s,
        ],
        &["too short", "--seq-len"],
    );
    // corpus files that are not what they claim: invalid UTF-8, a .gz name over plain text, a
    // gzip stream cut in half
    let text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n".repeat(400);
    let mut latin1 = text.clone().into_bytes();
    latin1.extend_from_slice(b"caf\xe9 au lait\n");
    let non_utf8 = d.join("latin1.txt");
    std::fs::write(&non_utf8, &latin1).unwrap();
    let fake_gz = d.join("fake.txt.gz");
    std::fs::write(&fake_gz, &text).unwrap();
    let truncated = d.join("cut.txt.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, text.as_bytes()).unwrap();
    let full = gz.finish().unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    for (path, needles) in [
        (
            &non_utf8,
            &["latin1.txt", "invalid UTF-8", "byte offset"][..],
        ),
        (&fake_gz, &["fake.txt.gz", "not gzip"][..]),
        (&truncated, &["cut.txt.gz"][..]),
    ] {
        refused(
            &[
                "--config",
                &config,
                "--data",
                path.to_str().unwrap(),
                "--out",
                &out_s,
            ],
            needles,
        );
    }
    let zero_heads = d.join("zero-heads.toml");
    std::fs::write(&zero_heads, "preset = \"tiny\"\n[model]\nheads = 0\n").unwrap();
    refused(
        &["--config", zero_heads.to_str().unwrap(), "--out", &out_s],
        &["heads"],
    );
    let bad_kind = d.join("bad-kind.toml");
    std::fs::write(&bad_kind, "[model]\nattention = \"dense-ish\"\n").unwrap();
    refused(
        &["--config", bad_kind.to_str().unwrap(), "--out", &out_s],
        &["bad-kind.toml", "dense-ish"],
    );
    refused(
        &["--preset", "tiny", "--lr", "-0.001", "--out", &out_s],
        &["--lr", "-0.001"],
    );
    refused(
        &["--preset", "tiny", "--steps", "0", "--out", &out_s],
        &["--steps"],
    );
    // a directory without text files lists what is read
    let no_text = d.join("no-text");
    std::fs::create_dir(&no_text).unwrap();
    std::fs::write(no_text.join("notes.bin"), "x").unwrap();
    refused(
        &[
            "--config",
            &config,
            "--data",
            no_text.to_str().unwrap(),
            "--out",
            &out_s,
        ],
        &[
            "no-text",
            "no text files",
            ".txt",
            ".jsonl",
            ".json",
            ".xml",
            ".gz",
        ],
    );
    // a wrong type in a config file names the key and the file
    let quoted = d.join("quoted-steps.toml");
    std::fs::write(&quoted, "preset = \"tiny\"\n[train]\nsteps = \"5\"\n").unwrap();
    refused(
        &["--config", quoted.to_str().unwrap(), "--out", &out_s],
        &["quoted-steps.toml", "`train.steps`", "whole number"],
    );
    refused(
        &[
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--devices",
            "0,1",
            "--out",
            &out_s,
        ],
        &["1 device", "--device 1"],
    );
    refused(
        &[
            "--config",
            &config,
            "--backend",
            "cpu",
            "--devices",
            "0,0",
            "--batch-size",
            "3",
            "--grad-accum",
            "3",
            "--out",
            &out_s,
        ],
        &["--devices", "--grad-accum", "3 × 3"],
    );
    refused(
        &["--config", "/nonexistent/x.toml"],
        &["/nonexistent/x.toml"],
    );
    refused(
        &[
            "--preset",
            "tiny",
            "--tokenizer",
            "/nonexistent/tok.json",
            "--out",
            &out_s,
        ],
        &["/nonexistent/tok.json"],
    );
    refused(
        &["--resume", "--out", &out_s],
        &["no training run to resume"],
    );
    assert!(!out.exists(), "a refused run left {} behind", out.display());

    // an existing run is not overwritten
    std::fs::create_dir_all(out.join("checkpoint")).unwrap();
    std::fs::write(out.join("config.toml"), "sentinel").unwrap();
    std::fs::write(out.join("checkpoint/state-5.json"), "sentinel").unwrap();
    refused(
        &["--preset", "tiny", "--out", &out_s],
        &["already holds a training run", "--resume"],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("config.toml")).unwrap(),
        "sentinel"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoint/state-5.json")).unwrap(),
        "sentinel"
    );
    let entries: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(entries.len(), 2);
}

#[test]
fn argument_errors_print_clap_s_whole_message() {
    refused_by_clap(&["--preset", "huge"], &["--preset", "huge", "tiny"]);
    refused_by_clap(
        &["--preset", "tiny", "--no-such-flag"],
        &["--no-such-flag", "Usage: nsa-train"],
    );
    refused_by_clap(
        &["--preset", "tiny", "--stpes", "5"],
        &["--stpes", "tip:", "--steps", "Usage: nsa-train"],
    );
    refused_by_clap(
        &["--preset", "tiny", "--attention", "sparse-ish"],
        &["--attention", "sparse-ish"],
    );
    refused_by_clap(
        &["--preset", "tiny", "--backend", "tpu"],
        &[
            "--backend",
            "tpu",
            "expected auto, cuda, wgpu, cpu or ndarray",
        ],
    );
    refused_by_clap(
        &["--preset", "tiny", "--devices", "zero"],
        &["--devices", "zero"],
    );
    refused_by_clap(&["--steps", "many"], &["--steps", "many"]);
}

#[test]
fn help_shows_examples_and_one_backend_vocabulary() {
    let (code, out, err) = nsa_train(&["--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Examples:"), "{out}");
    assert!(
        out.contains("nsa-train --preset tiny --backend cpu"),
        "{out}"
    );
    assert!(out.contains(nsa_runtime::backend::BACKEND_NAMES), "{out}");
    assert!(out.contains("Ctrl-C"), "{out}");
    for stale in ["cpu or ndarray\n", "ndarray (= cpu)", "flex,", ", flex"] {
        assert!(!out.contains(stale), "`{stale}` in:\n{out}");
    }
    // the documented commands parse
    let cmd = nsa_train::cli::command;
    for line in nsa_train::cli::EXAMPLES.lines() {
        let line = line.trim();
        if line.starts_with("nsa-train") {
            let parsed = cmd().try_get_matches_from(line.split_whitespace());
            assert!(parsed.is_ok(), "{line}: {}", parsed.unwrap_err());
        }
    }
    // `flex` is still understood, and shown as `cpu`
    assert_eq!(
        "flex"
            .parse::<nsa_runtime::backend::BackendKind>()
            .map(|k| k.to_string()),
        Ok(nsa_runtime::backend::BackendKind::cpu().to_string())
    );
}

#[test]
fn trains_stops_resumes_and_writes_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = common::small_corpus(d, 300);
    let config = write_config(d);
    let out = d.join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--config",
            config.as_str(),
            "--data",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--backend",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a = args(&["--steps", "4", "--eval-every", "2", "--stop-at", "2"]);
    let (code, stdout, err) = nsa_train(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("backend: "), "{stdout}");
    assert!(stdout.contains("validation after step 2"), "{stdout}");
    assert!(stdout.contains("unigram entropy"), "{stdout}");
    assert!(stdout.contains("--resume"), "{stdout}");
    assert!(
        stdout.contains("log lines every 2 steps show the mean loss of those steps"),
        "{stdout}"
    );

    let resume = [
        "--resume",
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "cpu",
        "--steps",
        "4",
    ];
    let (code, stdout, err) = nsa_train(&resume);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("resuming at step 2"), "{stdout}");
    assert!(stdout.contains("validation after step 4"), "{stdout}");
    assert!(stdout.contains("training finished"), "{stdout}");

    for bundle in ["best", "last"] {
        for f in [
            "model.json",
            "tokenizer.json",
            "model.safetensors",
            "checkpoint.json",
        ] {
            assert!(out.join(bundle).join(f).is_file(), "{bundle}/{f}");
        }
        nsa_runtime::bundle::Bundle::read(&out.join(bundle)).unwrap();
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().filter(|l| l.contains(",train,")).count(), 4);
    assert_eq!(csv.lines().filter(|l| l.contains(",valid,")).count(), 2);
    assert!(std::fs::read_to_string(out.join("samples.txt"))
        .unwrap()
        .contains("continuation"));

    // the finished run does not start again
    let (code, stdout, _) = nsa_train(&resume);
    assert_eq!(code, 0);
    assert!(stdout.contains("complete"), "{stdout}");

    // nothing but our own files: no Burn logger output
    for noise in ["experiment.log", "train", "valid"] {
        assert!(!out.join(noise).exists(), "{noise} in the run directory");
    }
}

#[test]
fn a_resumed_run_keeps_its_recipe_and_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = common::small_corpus(d, 300);
    let corpus_s = corpus.to_str().unwrap();
    let config = write_config(d);
    let out = d.join("run");
    let out_s = out.to_str().unwrap();
    let (code, stdout, err) = nsa_train(&[
        "--config",
        &config,
        "--data",
        corpus_s,
        "--out",
        out_s,
        "--backend",
        "cpu",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--sample-every",
        "100",
    ]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    // the time estimate after the first steps, then in the log lines
    assert!(stdout.contains("step 3/6: "), "{stdout}");
    assert!(stdout.contains("per step, ETA "), "{stdout}");
    assert!(stdout.contains("| ETA "), "{stdout}");
    // why there is no samples.txt
    assert!(!out.join("samples.txt").exists());
    assert!(
        stdout.contains("no samples: train.sample_every = 100 is more than the 6 steps"),
        "{stdout}"
    );
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();

    // fewer steps than done: refused, config.toml untouched
    refused(
        &[
            "--resume",
            "--out",
            out_s,
            "--backend",
            "cpu",
            "--steps",
            "4",
        ],
        &["at step 6", "--steps 4", "more than 6"],
    );
    // another recipe: refused, naming the difference
    refused(
        &["--resume", "--out", out_s, "--preset", "seed"],
        &[
            "--preset seed",
            "does not match",
            "in the run",
            "leave it out",
        ],
    );
    refused(
        &["--resume", "--out", out_s, "--lr", "0.1"],
        &["--lr", "optim.lr", "0.1 here"],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("config.toml")).unwrap(),
        saved
    );

    // the command that made the run, plus --resume and more steps: accepted; the schedule of
    // the 6 planned steps is kept
    let (code, stdout, err) = nsa_train(&[
        "--resume",
        "--config",
        &config,
        "--data",
        corpus_s,
        "--out",
        out_s,
        "--backend",
        "cpu",
        "--steps",
        "8",
    ]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("resuming at step 6"), "{stdout}");
    assert!(
        stdout.contains("keeps the schedule of the 6 steps it was planned with; steps 7-8 run at its final learning rate"),
        "{stdout}"
    );
    let config = nsa_train::config::TrainConfig::from_file(&out.join("config.toml")).unwrap();
    assert_eq!(config.train.steps, 8);
    assert_eq!(config.optim.schedule_steps, Some(6));
}

#[test]
fn the_gpu_recipe_on_the_cpu_is_flagged_before_the_first_step() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = common::small_corpus(d, 3000);
    let cache = std::env::temp_dir().join("nsa-train-cli-test-cache");
    let mut child = Command::new(BIN)
        .args(["--preset", "seed", "--backend", "cpu", "--data"])
        .arg(&corpus)
        .arg("--out")
        .arg(d.join("run"))
        .env("NSA_CACHE_DIR", cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut warned = false;
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        warned =
            line.starts_with("warning: this is a GPU recipe") && line.contains("--preset tiny");
        seen.push(line);
        if warned {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no warning in:\n{}", seen.join("\n"));
}
