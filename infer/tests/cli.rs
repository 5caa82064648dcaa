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
        child.stdin.take().unwrap().write_all(bytes).unwrap();
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

    assert_eq!(snapshot(&good), before, "the model directory was modified");
    eprintln!("{n} bad inputs refused");
    assert!(n >= 20);
}

/// The README's `cargo run -p nsa-infer -- ...` commands (its main command among them) run the
/// CLI: the package has two binaries, so it needs `default-run` (without it cargo refuses to
/// choose), or the command must name `--bin`.
#[test]
fn the_readme_commands_run_the_cli() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../README.md")).expect("README.md");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let default_run = manifest.contains("default-run = \"nsa-infer\"");
    let commands: Vec<&str> = readme
        .lines()
        .flat_map(|l| l.split("&&"))
        .filter(|c| c.contains("cargo run") && c.contains("-p nsa-infer"))
        .collect();
    assert!(!commands.is_empty(), "the README runs nsa-infer with cargo");
    for c in commands {
        assert!(
            default_run || c.contains("--bin"),
            "`{}` needs `--bin` or `default-run` in infer/Cargo.toml",
            c.trim()
        );
    }
}
