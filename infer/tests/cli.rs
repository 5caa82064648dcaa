//! Bad inputs to `nsa-infer` are refused with one clear line naming the file or option and a
//! non-zero exit code, never a panic; files already there are left untouched.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixtures, small_vocab};

fn nsa_infer(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsa-infer"))
        .args(args)
        .env(
            "NSA_CACHE_DIR",
            std::env::temp_dir().join("nsa-infer-cli-test"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    if let Some(bytes) = stdin {
        // a refusal may come before the input is read: the binary has exited by then
        if let Err(e) = child.stdin.take().unwrap().write_all(bytes) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `args` and checks the refusal: exit ≠ 0, no panic, the last stderr line is one `error:`
/// line holding every needle (a `backend: ...` line may come first).
fn refused(args: &[&str], stdin: Option<&[u8]>, needles: &[&str]) -> usize {
    let (code, _, err) = nsa_infer(args, stdin);
    assert_ne!(code, 0, "{args:?} was accepted: {err}");
    // a panic prints `panicked` (default hook) or `internal error` (the binaries' hook)
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{args:?} panicked: {err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: expected one error line, got:\n{err}"
    );
    for n in needles {
        assert!(
            errors[0].contains(n),
            "{args:?}: `{n}` missing from: {}",
            errors[0]
        );
    }
    1
}

fn import(out: &Path, vocab: &Path) {
    let f = fixtures();
    let o = Command::new(env!("CARGO_BIN_EXE_nsa-infer"))
        .arg("import")
        .arg("--weights")
        .arg(f.join("transformer_nsa.pt"))
        .arg("--args")
        .arg(f.join("transformer_nsa.args.json"))
        .arg("--tokenizer")
        .arg(vocab)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn bad_inputs_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let vocab = small_vocab(d);
    let good = d.join("good");
    import(&good, &vocab);
    let before = snapshot(&good);
    let g = good.to_str().unwrap();
    let mut n = 0;

    // the model directory
    n += refused(
        &[
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "我",
        ],
        None,
        &["/nonexistent/model"],
    );
    let truncated = d.join("truncated");
    copy_dir(&good, &truncated);
    let w = truncated.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            truncated.to_str().unwrap(),
            "--prompt",
            "我",
        ],
        None,
        &["model.safetensors"],
    );
    let corrupt = d.join("corrupt");
    copy_dir(&good, &corrupt);
    std::fs::write(
        corrupt.join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
    )
    .unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            corrupt.to_str().unwrap(),
            "--prompt",
            "我",
        ],
        None,
        &["model.safetensors"],
    );
    let missing = d.join("missing");
    copy_dir(&good, &missing);
    std::fs::remove_file(missing.join("model.safetensors")).unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            missing.to_str().unwrap(),
            "--prompt",
            "我",
        ],
        None,
        &["missing"],
    );
    // config that does not match the weights (other width)
    let mismatch = d.join("mismatch");
    copy_dir(&good, &mismatch);
    let cfg = std::fs::read_to_string(mismatch.join("model.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let dim = json["dim"].as_u64().unwrap();
    json["dim"] = serde_json::json!(dim * 2);
    std::fs::write(mismatch.join("model.json"), json.to_string()).unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            mismatch.to_str().unwrap(),
            "--prompt",
            "我",
        ],
        None,
        &["do not match model.json", "shape"],
    );
    // invalid config values
    let invalid = d.join("invalid");
    copy_dir(&good, &invalid);
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["heads"] = serde_json::json!(0);
    std::fs::write(invalid.join("model.json"), json.to_string()).unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            invalid.to_str().unwrap(),
            "--prompt",
            "我",
        ],
        None,
        &["heads"],
    );
    let garbled = d.join("garbled");
    copy_dir(&good, &garbled);
    std::fs::write(garbled.join("model.json"), "{ not json").unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            garbled.to_str().unwrap(),
            "--prompt",
            "我",
        ],
        None,
        &["model.json"],
    );
    // tokenizer whose vocabulary does not match the model
    let big_vocab = d.join("big");
    copy_dir(&good, &big_vocab);
    let bigger: Vec<String> = (0..500).map(|i| format!("t{i}")).collect();
    let vocab2 = d.join("vocab2.txt");
    std::fs::write(
        &vocab2,
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].join("\n") + "\n" + &bigger.join("\n"),
    )
    .unwrap();
    n += refused(
        &[
            "import",
            "--weights",
            fixtures().join("transformer_nsa.pt").to_str().unwrap(),
            "--args",
            fixtures()
                .join("transformer_nsa.args.json")
                .to_str()
                .unwrap(),
            "--tokenizer",
            vocab2.to_str().unwrap(),
            "--out",
            d.join("never").to_str().unwrap(),
        ],
        None,
        &["tokenizer"],
    );
    assert!(!d.join("never").exists(), "nothing written on refusal");

    // options
    n += refused(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "我",
            "--max-new-tokens",
            "0",
        ],
        None,
        &["--max-new-tokens"],
    );
    n += refused(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "我",
            "--temperature",
            "-1",
        ],
        None,
        &["temperature"],
    );
    n += refused(
        &["generate", "--model", g, "--prompt", "我", "--top-p", "1.5"],
        None,
        &["top"],
    );
    n += refused(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "我",
            "--top-k-thres",
            "2",
        ],
        None,
        &["thres"],
    );
    n += refused(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "我",
            "--backend",
            "tpu",
        ],
        None,
        &["tpu"],
    );
    n += refused(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "我",
            "--backend",
            "ndarray",
            "--precision",
            "bf16",
        ],
        None,
        &["bf16"],
    );
    n += refused(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "我",
            "--backend",
            "flex",
            "--precision",
            "f16",
        ],
        None,
        &["f16"],
    );
    n += refused(
        &["generate", "--model", g, "--prompt", "我", "--no-such-flag"],
        None,
        &["--no-such-flag"],
    );
    // a prompt longer than the trained context (max_seq_len in model.json)
    let short_ctx = d.join("short-context");
    copy_dir(&good, &short_ctx);
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["max_seq_len"] = serde_json::json!(16);
    std::fs::write(short_ctx.join("model.json"), json.to_string()).unwrap();
    let long: String = "我".repeat(40);
    n += refused(
        &[
            "generate",
            "--model",
            short_ctx.to_str().unwrap(),
            "--prompt",
            &long,
        ],
        None,
        &["prompt", "context"],
    );
    n += refused(
        &["generate", "--model", g],
        Some(b"\xff\xfe\xfd not utf-8"),
        &["UTF-8"],
    );
    // score: missing, empty, not gzip
    n += refused(
        &["score", "--model", g, "/nonexistent/text.txt"],
        None,
        &["/nonexistent/text.txt"],
    );
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    n += refused(
        &["score", "--model", g, empty.to_str().unwrap()],
        None,
        &["empty.txt"],
    );
    let fake_gz = d.join("fake.txt.gz");
    std::fs::write(&fake_gz, "plain text, not gzip").unwrap();
    n += refused(
        &["score", "--model", g, fake_gz.to_str().unwrap()],
        None,
        &["fake.txt.gz"],
    );

    // unbounded or empty values
    n += refused(
        &[
            "score",
            "--model",
            g,
            "--context",
            "18446744073709551615",
            "-",
        ],
        Some("我们".as_bytes()),
        &["--context", "context of"],
    );
    n += refused(
        &["generate", "--model", g, "--prompt", "我", "--stop", ""],
        None,
        &["--stop"],
    );
    n += refused(
        &["generate", "--model", g, "--prompt", "我", "--min-p", "2"],
        None,
        &["min-p"],
    );
    n += refused(
        &["generate", "-m", g, "-p", "我", "--repeat-penalty", "0"],
        None,
        &["repetition penalty"],
    );
    let prompts = d.join("prompts.txt");
    std::fs::write(&prompts, format!("我们\n{}\n", "我".repeat(40))).unwrap();
    n += refused(
        &[
            "generate",
            "--model",
            short_ctx.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
        ],
        None,
        &["prompts.txt line 2", "context"],
    );
    // the output files
    n += refused(
        &[
            "logits",
            "-m",
            g,
            "--text",
            "-",
            "--out",
            d.join("x.txt").to_str().unwrap(),
        ],
        Some("我们".as_bytes()),
        &[".safetensors or .npy"],
    );
    n += refused(
        &[
            "export",
            "-m",
            g,
            "--out",
            d.join("x.safetensors").to_str().unwrap(),
        ],
        None,
        &["directory"],
    );
    // nothing to compare with
    n += refused(
        &["compare", "-m", g, "--backends", "cpu"],
        None,
        &["--backends", "at least two"],
    );
    // a training run's directory instead of its bundle
    let run = d.join("run");
    copy_dir(&good, &run.join("best"));
    n += refused(
        &["generate", "--model", run.to_str().unwrap(), "-p", "我"],
        None,
        &["not a model directory", "did you mean", "best"],
    );
    // import without constructor arguments
    n += refused(
        &[
            "import",
            "--weights",
            fixtures().join("transformer_nsa.pt").to_str().unwrap(),
            "--out",
            d.join("never2").to_str().unwrap(),
        ],
        None,
        &["--args"],
    );

    assert_eq!(snapshot(&good), before, "the model directory was modified");
    eprintln!("{n} bad inputs refused");
    assert!(n >= 30);
}

/// Argument errors keep clap's whole message: what is missing or wrong, the usage line, a
/// similar argument when there is one, and the pointer to --help; exit status 2.
#[test]
fn argument_errors_say_everything_clap_knows() {
    let (code, _, err) = nsa_infer(&["generate", "--prompt", "x"], None);
    assert_eq!(code, 2, "{err}");
    for needle in [
        "required arguments were not provided",
        "--model <MODEL>",
        "Usage:",
        "--help",
    ] {
        assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
    }
    let (code, _, err) = nsa_infer(&["generate", "-m", "x", "--max-new-token", "5"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("tip") && err.contains("--max-new-tokens"),
        "{err}"
    );
    let (code, _, err) = nsa_infer(&["import", "--weights", "x"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--out <OUT>"), "{err}");
    // help and version exit 0, with examples
    let (code, out, _) = nsa_infer(&["generate", "--help"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("Examples:") && out.contains("-n, --max-new-tokens"),
        "{out}"
    );
}

/// A misspelt or invalid `NSA_*` switch is refused before anything runs.
#[test]
fn environment_switches_are_checked() {
    for (name, value, needle) in [
        ("NSA_KERNEL", "0", "unknown variable NSA_KERNEL"),
        ("NSA_MMA", "fwd,bwd", "NSA_MMA"),
        ("NSA_KERNELS", "maybe", "NSA_KERNELS"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nsa-infer"))
            .arg("devices")
            .env(name, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}={value}: {err}");
        assert!(err.contains(needle), "{name}={value}: {err}");
    }
}

fn nsa_bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nsa-bench"))
        .args(args)
        .env(
            "NSA_CACHE_DIR",
            std::env::temp_dir().join("nsa-bench-cli-test"),
        )
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nsa-bench --suite check` exits non-zero when a check did not pass, here because the CPU
/// has no fused kernels to check (a skipped check is not a passed one); a benchmark row writes
/// a record that names the commit, the device and every timed run.
#[test]
fn nsa_bench_fails_unless_every_check_passed_and_records_its_rows() {
    let small = [
        "--backend",
        "cpu",
        "--dim",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--dim-head",
        "16",
        "--compress-block",
        "8",
        "--stride",
        "8",
        "--selection-block",
        "8",
        "--selected",
        "2",
        "--window",
        "8",
        "--lengths",
        "64",
        "--runs",
        "2",
        "--warmup",
        "0",
    ];
    let (code, out, err) = nsa_bench(&[&["--suite", "check"], &small[..]].concat());
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAILED") && err.contains("check row"),
        "{out}{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("layer.json");
    let (code, out, err) = nsa_bench(
        &[
            &[
                "--suite", "layer", "--impls", "nsa", "--passes", "fwd", "--json",
            ],
            &[json.to_str().unwrap()][..],
            &small[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(record["schema"], "nsa-bench-record/1");
    assert_eq!(record["tool"], "nsa-bench");
    assert!(record["commit"].as_str().is_some_and(|c| !c.is_empty()));
    let row = &record["result"]["rows"][0];
    assert_eq!(row["status"], "ok", "{row}");
    assert_eq!(row["ms_all"].as_array().unwrap().len(), 2, "{row}");
}

/// `nsa-bench --suite decode` (decoding at batch 1 and the first token) prints its figures and
/// writes one record of the decode format; it runs alone.
#[test]
fn nsa_bench_decode_writes_its_record_and_runs_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("decode.json");
    let (code, out, err) = nsa_bench(&[
        "--suite",
        "decode",
        "--backend",
        "cpu",
        "--prompt-len",
        "4",
        "-n",
        "2",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("tokens/s warm (median of 1)"), "{out}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(record["schema"], "nsa-bench-record/1");
    assert_eq!(record["tool"], "nsa-bench decode");
    assert_eq!(record["settings"]["precision"], "f32");
    assert_eq!(record["settings"]["runs"], 1);
    assert_eq!(record["result"]["prompt_len"], 4);
    assert_eq!(record["result"]["new_tokens"], 2);
    assert!(
        record["result"]["tokens_per_s"].as_f64().is_some(),
        "{record}"
    );

    let (code, out, err) = nsa_bench(&["--suite", "decode,layer"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("runs alone"), "{err}");
}

/// A generation whose caches cannot fit where the model lives is refused before any work, with
/// one line naming what it needs, what is free and what to change; `--stats` prints the memory
/// a run held.
#[test]
fn memory_is_checked_up_front_and_reported_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let vocab = small_vocab(d);
    let good = d.join("good");
    import(&good, &vocab);
    // a model that claims a context of 2^40 tokens: 2^40 new tokens need ~2^49 bytes of caches
    let huge = d.join("huge");
    copy_dir(&good, &huge);
    let path = huge.join("model.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["max_seq_len"] = serde_json::json!(1u64 << 40);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let h = huge.to_str().unwrap();
    let n = (1u64 << 40).to_string();
    refused(
        &[
            "generate",
            "-m",
            h,
            "--backend",
            "cpu",
            "-p",
            "我",
            "-n",
            &n,
        ],
        None,
        &["the caches of", "GiB", "free", "--max-new-tokens"],
    );
    // interactive: the prompt is refused and the session goes on (ends at end of input, exit 0)
    let (code, _, err) = nsa_infer(
        &["generate", "-m", h, "--backend", "cpu", "-i", "-n", &n],
        Some("我们\n".as_bytes()),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("error: the caches of"), "{err}");

    // --stats: the memory line, on the CPU the process's peak
    let g = good.to_str().unwrap();
    let (code, _, err) = nsa_infer(
        &[
            "generate",
            "-m",
            g,
            "--backend",
            "cpu",
            "-p",
            "我们",
            "-n",
            "4",
            "--greedy",
            "--stats",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("memory:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("process peak RSS"), "{line}");
    let text = d.join("text.txt");
    std::fs::write(&text, "我们来到大地上，他们说的是中国。").unwrap();
    let (code, out, err) = nsa_infer(
        &[
            "score",
            "-m",
            g,
            "--backend",
            "cpu",
            text.to_str().unwrap(),
            "--json",
            "--stats",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        report["memory"]["peak_rss_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{out}"
    );
}
