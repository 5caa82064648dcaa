//! A device that refuses single buffers above 64 MiB (`--max-buffer-mib 64`; on wgpu the
//! device's memory pools are built to refuse them, as a Vulkan driver or Metal with such a
//! limit does): the tiny preset trains at its default micro-batch (16 × 128 tokens, whose
//! logits alone are 165 MiB), and a model with a 4,096-token context scores and continues a
//! 4,000-token input there, with the same result as the CPU. A buffer above the limit is
//! reported as such, in one line with exit code 3.
//!
//! Runs on wgpu: software Vulkan (lavapipe) in CI, which `scripts/test.sh` installs. Without a
//! wgpu adapter the test fails: it must not pass unseen.

use std::path::{Path, PathBuf};
use std::process::Command;

const TRAIN: &str = env!("CARGO_BIN_EXE_nsa-train");
const MIB: u64 = 1 << 20;
// the logits of one micro-batch of the tiny preset (16 × 128 tokens, 21,128 words, f32) do
// not fit one buffer of the limit the test sets
const _: () = assert!(16 * 128 * 21_128 * 4 > 64 * MIB);

/// `nsa-infer`, built beside `nsa-train` by `cargo test --workspace`.
fn nsa_infer() -> PathBuf {
    let path =
        Path::new(TRAIN).with_file_name(format!("nsa-infer{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace), which build it",
        path.display()
    );
    path
}

/// Runs `program` with `args` (stdin from `input`); exit code, stdout, stderr.
fn run(program: &Path, args: &[&str], input: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env(
            "NSA_CACHE_DIR",
            std::env::temp_dir().join("nsa-device-limits-cache"),
        )
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE");
    if let Some(f) = input {
        cmd.stdin(std::fs::File::open(f).unwrap());
    }
    let out = cmd.output().expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The mean NLL `score` prints (`…, mean NLL X nats/token, …`).
fn nll(out: &str) -> f64 {
    let at = out.find("mean NLL ").expect("a score line") + "mean NLL ".len();
    out[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The start of the bundled corpus cut to at most `tokens` tokens of `tokenizer`.
fn text_of(tokenizer: &Path, tokens: usize) -> String {
    let tok = nsa_runtime::tokenizer::Tokenizer::from_file(tokenizer).unwrap();
    let all: String = nsa_train::corpus::default_corpus()
        .into_iter()
        .take(200)
        .collect::<Vec<_>>()
        .join("\n");
    let chars: Vec<char> = all.chars().collect();
    let (mut lo, mut hi) = (0, chars.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let s: String = chars[..mid].iter().collect();
        if tok.encode(&s).unwrap().len() <= tokens {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let text: String = chars[..lo].iter().collect();
    assert!(
        tok.encode(&text).unwrap().len() > tokens - 100,
        "the corpus is too short"
    );
    text
}

#[test]
fn a_64_mib_buffer_limit_trains_scores_and_generates_on_wgpu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("run");
    let out_s = out.to_str().unwrap();
    // the preset as it is (micro-batch 16 × 128) but for a shorter validation
    let config = d.join("short-validation.toml");
    std::fs::write(&config, "[data]\neval_windows = 4\n").unwrap();
    let train = |limit: &str, out: &str| {
        let args = [
            "--preset",
            "tiny",
            "--config",
            config.to_str().unwrap(),
            "--backend",
            "wgpu",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--no-tui",
            "--max-buffer-mib",
            limit,
            "--out",
            out,
        ];
        run(Path::new(TRAIN), &args, None)
    };

    // 1. a limit below the embedding table (21,128 × 128 f32 = 10.3 MiB): one clear line
    let (code, stdout, err) = train("4", d.join("refused").to_str().unwrap());
    assert_eq!(code, 3, "{stdout}\n{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "error: a 10 MiB buffer exceeds this device's 4.0 MiB limit for one buffer"
        ) && last.contains("--batch-size"),
        "{err}"
    );
    assert!(
        !err.contains("internal error") && !err.contains("aborting"),
        "{err}"
    );

    // 2. 64 MiB: two steps at the default micro-batch, whose logits do not fit one buffer
    let (code, stdout, err) = train("64", out_s);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(
        stdout.contains("vocabulary 21,128, context 128"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 steps of 16 x 1 x 128 tokens"),
        "{stdout}"
    );
    assert!(stdout.contains("step 2/2"), "{stdout}");
    let loss_at = stdout
        .find("validation after step 2: loss ")
        .expect("validation");
    let loss: f64 = stdout[loss_at + 30..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(loss.is_finite() && loss < 10.5, "{stdout}");

    // 3. the trained model with a 4,096-token context (NSA has no learned positions: the
    //    context is the model.json field alone)
    let model = out.join("last");
    let json = model.join("model.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    m["max_seq_len"] = 4096.into();
    std::fs::write(&json, m.to_string()).unwrap();
    let model_s = model.to_str().unwrap();
    let input = d.join("long.txt");
    std::fs::write(&input, text_of(&model.join("tokenizer.json"), 4000)).unwrap();
    let input_s = input.to_str().unwrap();

    // score: one window of ~4,000 tokens (logits 330 MiB), wgpu at 64 MiB against the CPU
    let score = |backend: &str, extra: &[&str]| {
        let mut args = vec![
            "score",
            "--model",
            model_s,
            input_s,
            "--context",
            "4096",
            "--backend",
            backend,
        ];
        args.extend(extra);
        let (code, stdout, err) = run(&nsa_infer(), &args, None);
        assert_eq!(code, 0, "{backend}: {stdout}\n{err}");
        nll(&stdout)
    };
    let gpu = score("wgpu", &["--max-buffer-mib", "64"]);
    let cpu = score("cpu", &[]);
    assert!(
        gpu.is_finite() && (gpu - cpu).abs() < 1e-3 * cpu,
        "wgpu {gpu} cpu {cpu}"
    );

    // generate: the same text as the prompt, four tokens
    let (code, stdout, err) = run(
        &nsa_infer(),
        &[
            "generate",
            "--model",
            model_s,
            "--backend",
            "wgpu",
            "--max-buffer-mib",
            "64",
            "--max-new-tokens",
            "4",
            "--greedy",
            "--no-echo",
        ],
        Some(&input),
    );
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(
        err.contains("--max-new-tokens reached after 4 tokens"),
        "{err}"
    );
}
