//! `scripts/bench_report --check` passes on the committed tables and fails when a table or a
//! record changes without the other (run on a copy of the repository's files).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(dir: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .arg(root().join("scripts/bench_report"))
        .args(["--check", "--root"])
        .arg(dir)
        .output()
        .expect("python3 runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn stale_tables_fail_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for f in ["BENCHMARKS.md", "README.md"] {
        std::fs::copy(root().join(f), d.join(f)).unwrap();
    }
    let results = d.join("benchmarks/results");
    std::fs::create_dir_all(&results).unwrap();
    for e in std::fs::read_dir(root().join("benchmarks/results"))
        .into_iter()
        .flatten()
    {
        let e = e.unwrap();
        // the records (a folder beside them is not one)
        if e.path().is_file() {
            std::fs::copy(e.path(), results.join(e.file_name())).unwrap();
        }
    }
    let (ok, out) = check(d);
    assert!(ok, "the committed tables are stale:\n{out}");

    // a hand-edited figure inside a generated table
    let text = std::fs::read_to_string(d.join("BENCHMARKS.md")).unwrap();
    let edited = text.replacen(
        "<!-- report:decode -->\n",
        "<!-- report:decode -->\n| 9999 tokens/s |\n",
        1,
    );
    assert_ne!(edited, text, "BENCHMARKS.md has a decode table");
    std::fs::write(d.join("BENCHMARKS.md"), &edited).unwrap();
    let (ok, out) = check(d);
    assert!(!ok, "an edited table passed:\n{out}");
    std::fs::write(d.join("BENCHMARKS.md"), &text).unwrap();

    // a new record without regenerating the tables
    let record = serde_json::json!({
        "schema": "nsa-bench-record/1",
        "tool": "nsa-infer bench",
        "commit": "0123456789ab",
        "date": "2026-12-06T00:00:00Z",
        "backend": "cpu",
        "device": "Test CPU",
        "host_cpus": 2,
        "env": [],
        "settings": {"precision": "f32", "full": false},
        "result": {"tokens_per_s": 1.0, "first_token_s": 1.0, "prefill_s": 0.1,
                   "prompt_len": 64, "new_tokens": 256}
    });
    std::fs::write(results.join("extra.json"), record.to_string()).unwrap();
    let (ok, out) = check(d);
    assert!(!ok, "a record missing from the tables passed:\n{out}");

    // something that is not a record
    std::fs::write(results.join("extra.json"), "{\"rows\": []}").unwrap();
    let (ok, out) = check(d);
    assert!(!ok && out.contains("not a benchmark record"), "{out}");
}
