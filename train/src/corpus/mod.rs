//! Training data: the corpus source, the token id cache, the train/validation split and the
//! window samplers.
//!
//! Documents are read with [`nsa_runtime::documents`] (file formats, directories, gzip).
//!
//! # Token cache ([`TokenCache`])
//!
//! The corpus is tokenised once into one stream: the ids of each document followed by the
//! separator id — the tokenizer's `[SEP]` (or `</s>`, `<|endoftext|>`), else the id of `"\n"`
//! if the tokenizer encodes a newline as one token (byte-level BPE) — so every document,
//! the last included, ends with a separator. The stream is stored in a file:
//!
//! ```text
//! offset size  field (little-endian)
//!      0    8  magic "NSATOKC\0"
//!      8    4  format version (1)
//!     12    4  bytes per token: 2 (u16) when vocab_size <= 65536, else 4 (u32)
//!     16    4  vocab size
//!     20    4  separator id
//!     24    8  number of tokens
//!     32    8  number of documents
//!     40   32  SHA-256 of the tokenizer JSON
//!     72   32  corpus fingerprint (see CorpusSource::fingerprint)
//!    104   32  SHA-256 of the token data
//!    136   88  zero
//!    224   32  SHA-256 of bytes 0..224 (header checksum)
//!    256    …  tokens
//! ```
//!
//! It is written atomically (temporary file in the same directory, fsync, rename), opened
//! memory-mapped, and validated on open (magic, version, header checksum, exact file
//! length); [`TokenCache::verify`] also checks the data checksum. [`TokenCache::load_or_build`]
//! names the file after a key over the corpus fingerprint and the tokenizer hash, so a
//! changed corpus or tokenizer is tokenised anew instead of reused, and it rebuilds a cache
//! file that fails validation.
//!
//! # Splits and sampling
//!
//! [`split`] keeps the last `val_fraction` of the token stream for validation. Training
//! draws random windows of `seq_len + 1` tokens (inputs and shifted targets) with a
//! [`WindowSampler`], whose window `k` depends only on `(seed, k)`, so resuming needs only the
//! step counter (the sampler is `serde`-serialisable). Validation uses [`eval_windows`]:
//! non-overlapping windows in which every target token is predicted exactly once.

use std::io;
use std::path::{Path, PathBuf};

use nsa_runtime::documents::DocumentError;
use nsa_runtime::tokenizer::TokenizerError;

mod cache;
mod sampling;
mod source;

pub use cache::{cache_key, separator_id, CacheOutcome, TokenCache, HEADER_LEN};
pub use sampling::{eval_tail, eval_windows, split, WindowSampler};
pub use source::{default_corpus, CorpusSource, DEFAULT_CORPUS_GZ};

/// Errors of the corpus source, the token cache and the samplers. Every error about a file
/// names it.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Documents(#[from] DocumentError),
    #[error("token cache {path}: {reason}")]
    InvalidCache { path: PathBuf, reason: String },
    #[error("cannot write token cache {path}: {source}")]
    WriteCache { path: PathBuf, source: io::Error },
    #[error(
        "the tokenizer has no [SEP] (or </s>, <|endoftext|>) token and does not encode \"\\n\" \
         as a single token, so documents cannot be separated"
    )]
    NoSeparator,
    #[error("the tokenizer produced id {id}, outside its vocabulary of {vocab_size}")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("validation fraction {0} is not in [0, 1)")]
    BadFraction(f64),
    #[error("seq_len must be at least 1")]
    ZeroSeqLen,
    #[error(
        "token range {start}..{end} holds {len} tokens, fewer than one window of \
         seq_len + 1 = {window} tokens"
    )]
    RangeTooShort {
        start: usize,
        end: usize,
        len: usize,
        window: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}
