//! Shared helpers of the nsa-infer integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The reference fixtures (`assets/fixtures`, written by `scripts/make_fixtures.py`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/fixtures")
}

/// Writes `dir/vocab.txt`: a BERT vocabulary (special tokens and common characters) small
/// enough for the fixtures' 64-token models (at most 60 entries).
pub fn small_vocab(dir: &Path) -> PathBuf {
    let mut lines: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lines.extend(
        "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会"
            .chars()
            .map(String::from),
    );
    lines.truncate(60);
    let path = dir.join("vocab.txt");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}
