//! `nsa-infer` as a script or a person uses it, through the real binary on the reference
//! fixture checkpoint (CPU): where generation stops and why, stop strings, JSON output with
//! log-probabilities, the interactive loop, scoring from stdin per token, raw logits against
//! the reference's, and an export → import round trip that keeps the context and tokenizer.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{fixtures, small_vocab};
use safetensors::SafeTensors;

/// Runs nsa-infer with `stdin`; (exit code, stdout, stderr).
fn run(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nsa-infer"))
        .args(args)
        .env(
            "NSA_CACHE_DIR",
            std::env::temp_dir().join("nsa-infer-generate-test"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str], stdin: &[u8]) -> (String, String) {
    let (code, out, err) = run(args, stdin);
    assert_eq!(code, 0, "{args:?}: {err}");
    (out, err)
}

/// The fixture checkpoint imported with `--max-seq-len`, once per test.
fn model(dir: &Path, max_seq_len: usize) -> String {
    let vocab = small_vocab(dir);
    let out = dir.join("model");
    let f = fixtures();
    ok(
        &[
            "import",
            "--weights",
            f.join("transformer_nsa.pt").to_str().unwrap(),
            "--args",
            f.join("transformer_nsa.args.json").to_str().unwrap(),
            "--tokenizer",
            vocab.to_str().unwrap(),
            "--max-seq-len",
            &max_seq_len.to_string(),
            "--out",
            out.to_str().unwrap(),
        ],
        b"",
    );
    out.to_str().unwrap().to_string()
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn generation_stops_where_it_says() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), 200);
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            &m,
            "-p",
            "我们",
            "--backend",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (out, err) = ok(&args, b"");
        (json_lines(&out).remove(0), err)
    };
    // a seed whose continuation reaches the end-of-document token ([SEP] = 3) within 40
    let (seed, first_sep) = (1..40u64)
        .find_map(|seed| {
            let s = seed.to_string();
            let (j, _) = generate(&["-n", "40", "--ignore-eos", "-s", &s, "--no-top-k"]);
            let ids: Vec<u64> = j["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_u64().unwrap())
                .collect();
            assert_eq!(ids.len(), 40, "--ignore-eos goes on to the length");
            assert_eq!(j["stop"]["reason"], "length");
            ids.iter().position(|&id| id == 3).map(|at| (s, at))
        })
        .expect("some seed reaches [SEP]");
    let (j, err) = generate(&["-n", "40", "-s", &seed, "--no-top-k"]);
    assert_eq!(j["stop"]["reason"], "eos", "{j}");
    assert_eq!(j["tokens"].as_array().unwrap().len(), first_sep + 1);
    // every token has an id, its text and a log-probability
    for t in j["tokens"].as_array().unwrap() {
        let lp = t["logprob"].as_f64().expect("a log-probability");
        assert!(lp <= 0.0 && lp.is_finite(), "{t}");
    }
    assert!(!err.contains("seed:"), "a given seed is not printed: {err}");

    // a stop string taken from the middle of a continuation cuts it there
    let (j, _) = generate(&["-n", "30", "--ignore-eos", "-s", "5", "--no-top-k"]);
    let text: Vec<char> = j["text"].as_str().unwrap().chars().collect();
    assert!(text.len() >= 8, "{j}");
    let stop: String = text[4..6].iter().collect();
    let full: String = text.iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let (j, _) = generate(&[
        "-n",
        "30",
        "--ignore-eos",
        "-s",
        "5",
        "--no-top-k",
        "--stop",
        &stop,
    ]);
    assert_eq!(j["text"], want, "stop string {stop:?}");
    assert_eq!(j["stop"]["reason"], "stop");
    assert_eq!(j["stop"]["detail"], stop.as_str());

    // the context: a 200-token model with a 3-token prompt ([SEP] 我 们) has room for 197
    let (j, _) = generate(&["-n", "5000", "--ignore-eos", "--greedy"]);
    assert_eq!(j["stop"]["reason"], "context");
    assert_eq!(j["tokens"].as_array().unwrap().len(), 197);

    // text mode says why on stderr; greedy prints no seed line
    let (out, err) = ok(
        &[
            "generate",
            "-m",
            &m,
            "-p",
            "我们",
            "-n",
            "3",
            "--ignore-eos",
            "--greedy",
        ],
        b"",
    );
    assert!(out.starts_with("我们"), "{out}");
    assert!(err.contains("stopped: --max-new-tokens reached"), "{err}");
    assert!(!err.contains("seed:"), "{err}");
    let (_, err) = ok(&["generate", "-m", &m, "-p", "我们", "-n", "3"], b"");
    assert!(err.contains("seed:"), "a random seed is printed: {err}");
    // a backend error comes without a seed line
    let (code, _, err) = run(&["generate", "-m", &m, "-p", "我", "--backend", "tpu"], b"");
    assert_eq!(code, 2, "{err}");
}

#[test]
fn interactive_mode_answers_every_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), 64);
    // 80 tokens: longer than the context; 63 (+ [SEP]): the whole context, no room to generate
    let (long, full) = ("我".repeat(80), "我".repeat(63));
    let input = format!("我们\n\n{long}\n{full}\n你\n");
    let (out, err) = ok(
        &[
            "generate",
            "-m",
            &m,
            "-i",
            "--greedy",
            "-n",
            "4",
            "--ignore-eos",
            "--json",
        ],
        input.as_bytes(),
    );
    let lines = json_lines(&out);
    assert_eq!(
        lines.len(),
        2,
        "two prompts answered, the empty line skipped: {out}"
    );
    assert_eq!(lines[0]["prompt"], "我们");
    assert_eq!(lines[1]["prompt"], "你");
    // the over-long lines are refused and the session goes on
    assert!(err.contains("more than the model's context"), "{err}");
    assert!(err.contains("no room to generate"), "{err}");
    // the same answers as one-shot generation
    let (one, _) = ok(
        &[
            "generate",
            "-m",
            &m,
            "-p",
            "你",
            "--greedy",
            "-n",
            "4",
            "--ignore-eos",
            "--json",
        ],
        b"",
    );
    assert_eq!(json_lines(&one)[0]["text"], lines[1]["text"]);
}

#[test]
fn sampling_options_change_the_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), 200);
    let ids = |extra: &[&str]| -> Vec<u64> {
        let mut args = vec![
            "generate",
            "-m",
            &m,
            "-p",
            "我们",
            "-n",
            "24",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (out, _) = ok(&args, b"");
        json_lines(&out)[0]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect()
    };
    let greedy = ids(&["--greedy"]);
    let penalised = ids(&["--greedy", "--repeat-penalty", "5", "--repeat-last-n", "24"]);
    assert_ne!(
        greedy, penalised,
        "a strong penalty changes a greedy continuation"
    );
    // with the penalty, a token repeats less within its window
    let repeats = |v: &[u64]| v.len() - v.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        repeats(&penalised) <= repeats(&greedy),
        "{greedy:?} {penalised:?}"
    );
    // min-p 1 keeps only the most likely token: greedy whatever the seed
    assert_eq!(ids(&["--min-p", "1", "-s", "3", "--no-top-k"]), greedy);
}

#[test]
fn scoring_reads_stdin_and_gives_every_token() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), 64);
    let text = "我们来到大地上，你说的是他。".repeat(3);
    let (out, _) = ok(
        &["score", "-m", &m, "-", "--json", "--per-token"],
        text.as_bytes(),
    );
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let per: Vec<f64> = j["per_token"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    assert_eq!(per.len() as u64, j["tokens"].as_u64().unwrap());
    let mean = -per.iter().sum::<f64>() / per.len() as f64;
    assert!(
        (mean - j["nll"].as_f64().unwrap()).abs() < 1e-6,
        "{mean} vs {j}"
    );
    // tab-separated lines in text mode
    let (out, _) = ok(&["score", "-m", &m, "-", "--per-token"], text.as_bytes());
    assert_eq!(out.lines().next(), Some("position\tid\ttoken\tlogprob"));
    assert_eq!(out.lines().count(), per.len() + 2, "{out}");
}

#[test]
fn raw_logits_equal_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), 64);
    // the fixture's first sequence and the reference's logits for it
    let bytes = std::fs::read(fixtures().join("transformer_nsa.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor("input").unwrap();
    let n = input.shape()[1] - 1;
    let ids: Vec<i64> = input
        .data()
        .chunks_exact(8)
        .take(n)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let expected: Vec<f32> = st
        .tensor("output")
        .unwrap()
        .data()
        .chunks_exact(4)
        .take(n * 64)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let ids_file = tmp.path().join("ids.txt");
    let text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    std::fs::write(&ids_file, text.join(" ")).unwrap();
    let out = tmp.path().join("logits.safetensors");
    ok(
        &[
            "logits",
            "-m",
            &m,
            "--tokens",
            ids_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        b"",
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), &[n, 64]);
    let got: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let c = nsa_model::Comparison::of(&got, &expected).unwrap();
    assert!(c.within_relative(1e-4, 1e-4), "{c}");
    let back: Vec<i64> = st
        .tensor("ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(back, ids);
    // .npy: the same logits after the 64-byte-aligned header, ids beside
    let npy = tmp.path().join("logits.npy");
    ok(
        &[
            "logits",
            "-m",
            &m,
            "--tokens",
            ids_file.to_str().unwrap(),
            "--out",
            npy.to_str().unwrap(),
        ],
        b"",
    );
    let raw = std::fs::read(&npy).unwrap();
    let header = u16::from_le_bytes([raw[8], raw[9]]) as usize;
    let want: Vec<u8> = got.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(
        raw[10 + header..] == want[..],
        "the .npy holds other logits"
    );
    assert!(tmp.path().join("logits.ids.npy").is_file());
}

#[test]
fn export_then_import_keeps_the_context_and_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), 100);
    let exported = tmp.path().join("exported");
    ok(
        &["export", "-m", &m, "--out", exported.to_str().unwrap()],
        b"",
    );
    for f in ["model.safetensors", "args.json", "tokenizer.json"] {
        assert!(exported.join(f).is_file(), "{f}");
    }
    let back = tmp.path().join("back");
    let (_, err) = ok(
        &[
            "import",
            "--weights",
            exported.join("model.safetensors").to_str().unwrap(),
            "--out",
            back.to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        err.contains("max_seq_len 100") && err.contains("tokenizer.json"),
        "{err}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("model.json")).unwrap()).unwrap();
    assert_eq!(config["max_seq_len"], 100);
    assert_eq!(
        std::fs::read(back.join("tokenizer.json")).unwrap(),
        std::fs::read(Path::new(&m).join("tokenizer.json")).unwrap()
    );
    // a short vocabulary is said, with how its missing ids are shown
    let (_, err) = ok(
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
            tmp.path().join("vocab.txt").to_str().unwrap(),
            "--out",
            tmp.path().join("short").to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        err.contains("have no text") && err.contains("U+FFFD"),
        "{err}"
    );
}
