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

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use nsa_runtime::documents::{append_documents, corpus_files, read_documents_from, DocumentError};
use nsa_runtime::tokenizer::{Tokenizer, TokenizerError};

/// The default corpus shipped with the crate (`assets/corpus/zh-mix.txt.gz`, see the README
/// there): a ~4 MB mix of classical poetry and prose, 1998 news and product reviews.
pub const DEFAULT_CORPUS_GZ: &[u8] = include_bytes!("../../assets/corpus/zh-mix.txt.gz");

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

/// The embedded default corpus (`assets/corpus/zh-mix.txt.gz`), one string per document.
pub fn default_corpus() -> Vec<String> {
    read_documents_from(DEFAULT_CORPUS_GZ, "zh-mix.txt.gz")
        .expect("the embedded default corpus is valid gzip'd UTF-8 text")
}

// ------------------------------------------------------------------------------ sources

/// Where the training text comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CorpusSource {
    /// The embedded default corpus ([`default_corpus`]).
    Default,
    /// Files and/or directories, read in order with [`nsa_runtime::documents::read_documents`].
    Paths(Vec<PathBuf>),
}

impl CorpusSource {
    /// All documents of the source; an error if there are none.
    pub fn read(&self) -> Result<Vec<String>, CorpusError> {
        match self {
            CorpusSource::Default => Ok(default_corpus()),
            CorpusSource::Paths(paths) => {
                let mut docs = Vec::new();
                for p in paths {
                    append_documents(p, &mut docs)?;
                }
                if docs.is_empty() {
                    return Err(DocumentError::Empty {
                        path: paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                            .into(),
                    }
                    .into());
                }
                Ok(docs)
            }
        }
    }

    /// A cheap fingerprint that changes when the corpus changes: for the default corpus the
    /// SHA-256 of its bytes, for paths a SHA-256 over every file [`corpus_files`] lists
    /// (absolute path, size, modification time in nanoseconds), without reading contents.
    pub fn fingerprint(&self) -> Result<[u8; 32], CorpusError> {
        let mut h = Sha256::new();
        match self {
            CorpusSource::Default => {
                h.update(b"default\0");
                h.update(DEFAULT_CORPUS_GZ);
            }
            CorpusSource::Paths(paths) => {
                h.update(b"paths\0");
                for p in paths {
                    for file in corpus_files(p)? {
                        let meta = fs::metadata(&file).map_err(io_err(&file))?;
                        let abs = fs::canonicalize(&file).map_err(io_err(&file))?;
                        let mtime = meta
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos());
                        h.update(abs.to_string_lossy().as_bytes());
                        h.update([0]);
                        h.update(meta.len().to_le_bytes());
                        h.update(mtime.to_le_bytes());
                    }
                    h.update(b"\0end\0");
                }
            }
        }
        Ok(h.finalize().into())
    }
}

// ------------------------------------------------------------------------------ token cache

const MAGIC: &[u8; 8] = b"NSATOKC\0";
const VERSION: u32 = 1;
/// Size of the token cache header in bytes.
pub const HEADER_LEN: usize = 256;
const HEADER_HASHED: usize = 224;
/// Documents tokenised per batch (and per progress bar tick).
const ENCODE_CHUNK: usize = 1024;

/// How [`TokenCache::load_or_build`] obtained its cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// An existing valid cache file was reused.
    Reused,
    /// No cache file existed; it was built.
    Built,
    /// A cache file existed but was invalid (the reason is given); it was rebuilt.
    Rebuilt(String),
}

/// A memory-mapped, read-only stream of token ids (format in the module docs).
#[derive(Debug)]
pub struct TokenCache {
    path: PathBuf,
    mmap: Mmap,
    width: usize,
    len: usize,
    vocab_size: u32,
    separator: u32,
    documents: u64,
    tokenizer_hash: [u8; 32],
    corpus_fingerprint: [u8; 32],
    data_hash: [u8; 32],
}

/// The document separator id for `tokenizer` (see the module docs).
pub fn separator_id(tokenizer: &Tokenizer) -> Result<u32, CorpusError> {
    if let Some(id) = tokenizer.sep_id() {
        return Ok(id);
    }
    match tokenizer.encode("\n")?.as_slice() {
        [id] => Ok(*id),
        _ => Err(CorpusError::NoSeparator),
    }
}

/// The cache key for a corpus fingerprint and a tokenizer hash.
pub fn cache_key(corpus_fingerprint: &[u8; 32], tokenizer_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(MAGIC);
    h.update(VERSION.to_le_bytes());
    h.update(corpus_fingerprint);
    h.update(tokenizer_hash);
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn progress_bar(len: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "tokenising {wide_bar} {pos}/{len} documents ({per_sec}, eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb
}

/// Removes the temporary file unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl TokenCache {
    /// Tokenises `docs` with `tokenizer` into a new cache file at `path` (replacing any file
    /// there atomically) and opens it. `corpus_fingerprint` is stored in the header (see
    /// [`CorpusSource::fingerprint`]). Shows a progress bar when stderr is a terminal.
    pub fn build(
        docs: &[String],
        tokenizer: &Tokenizer,
        path: impl AsRef<Path>,
        corpus_fingerprint: [u8; 32],
    ) -> Result<Self, CorpusError> {
        let path = path.as_ref();
        let write_err = |source| CorpusError::WriteCache {
            path: path.to_path_buf(),
            source,
        };
        let separator = separator_id(tokenizer)?;
        let vocab_size = tokenizer.vocab_size();
        let width: usize = if vocab_size <= 1 << 16 { 2 } else { 4 };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(write_err)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tokens.bin".to_string());
        let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
        let mut guard = TempGuard(Some(tmp.clone()));
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(write_err)?);
        out.write_all(&[0u8; HEADER_LEN]).map_err(write_err)?;

        let mut hasher = Sha256::new();
        let mut count: u64 = 0;
        let mut bytes = Vec::new();
        let pb = progress_bar(docs.len());
        for chunk in docs.chunks(ENCODE_CHUNK) {
            bytes.clear();
            for ids in tokenizer.encode_batch(chunk)? {
                for id in ids.into_iter().chain(std::iter::once(separator)) {
                    if id as usize >= vocab_size {
                        return Err(CorpusError::IdOutOfRange { id, vocab_size });
                    }
                    if width == 2 {
                        bytes.extend_from_slice(&(id as u16).to_le_bytes());
                    } else {
                        bytes.extend_from_slice(&id.to_le_bytes());
                    }
                    count += 1;
                }
            }
            hasher.update(&bytes);
            out.write_all(&bytes).map_err(write_err)?;
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();

        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(width as u32).to_le_bytes());
        header[16..20].copy_from_slice(&(vocab_size as u32).to_le_bytes());
        header[20..24].copy_from_slice(&separator.to_le_bytes());
        header[24..32].copy_from_slice(&count.to_le_bytes());
        header[32..40].copy_from_slice(&(docs.len() as u64).to_le_bytes());
        header[40..72].copy_from_slice(&tokenizer.content_hash());
        header[72..104].copy_from_slice(&corpus_fingerprint);
        header[104..136].copy_from_slice(&hasher.finalize());
        let check: [u8; 32] = Sha256::digest(&header[..HEADER_HASHED]).into();
        header[HEADER_HASHED..].copy_from_slice(&check);

        let mut file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(write_err)?;
        file.write_all(&header).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        drop(file);
        fs::rename(&tmp, path).map_err(write_err)?;
        guard.0 = None;
        // Persist the rename (best effort: not every platform can open a directory).
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Self::open(path)
    }

    /// Opens and validates a cache file (magic, version, header checksum, exact length).
    /// The token data checksum is checked by [`TokenCache::verify`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CorpusError> {
        let path = path.as_ref();
        let invalid = |reason: String| CorpusError::InvalidCache {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        if file_len < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "truncated: {file_len} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        // SAFETY: the file is opened read-only and cache files are only ever replaced by
        // rename, never modified in place, so the mapped bytes do not change underneath us
        // (unless another program writes into the file, which the format does not support).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let h = &mmap[..HEADER_LEN];
        if &h[0..8] != MAGIC {
            return Err(invalid("not a token cache (bad magic bytes)".to_string()));
        }
        let check: [u8; 32] = Sha256::digest(&h[..HEADER_HASHED]).into();
        if check[..] != h[HEADER_HASHED..] {
            return Err(invalid("corrupted header (checksum mismatch)".to_string()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let arr_at = |o: usize| -> [u8; 32] { h[o..o + 32].try_into().unwrap() };
        let version = u32_at(8);
        if version != VERSION {
            return Err(invalid(format!(
                "format version {version}, this build reads version {VERSION}"
            )));
        }
        let width = u32_at(12) as usize;
        if width != 2 && width != 4 {
            return Err(invalid(format!("bad token width {width}")));
        }
        let len = u64_at(24);
        let expected = len
            .checked_mul(width as u64)
            .and_then(|d| d.checked_add(HEADER_LEN as u64));
        if expected != Some(file_len) {
            return Err(invalid(format!(
                "truncated or padded: the header announces {len} tokens ({} bytes in all), \
                 the file has {file_len} bytes",
                expected.map_or("too many".to_string(), |e| e.to_string())
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            width,
            len: len as usize,
            vocab_size: u32_at(16),
            separator: u32_at(20),
            documents: u64_at(32),
            tokenizer_hash: arr_at(40),
            corpus_fingerprint: arr_at(72),
            data_hash: arr_at(104),
            mmap,
        })
    }

    /// Recomputes the checksum of the token data (reads the whole file).
    pub fn verify(&self) -> Result<(), CorpusError> {
        let got: [u8; 32] = Sha256::digest(&self.mmap[HEADER_LEN..]).into();
        if got != self.data_hash {
            return Err(CorpusError::InvalidCache {
                path: self.path.clone(),
                reason: "corrupted token data (checksum mismatch)".to_string(),
            });
        }
        Ok(())
    }

    /// Opens the cache for `source` tokenised by `tokenizer` in `cache_dir`, building it if
    /// it is missing or invalid. The file is `cache_dir/tokens-<key>.bin`, with `<key>` from
    /// [`cache_key`]: a different corpus or tokenizer gets a different file.
    pub fn load_or_build(
        source: &CorpusSource,
        tokenizer: &Tokenizer,
        cache_dir: impl AsRef<Path>,
    ) -> Result<(Self, CacheOutcome), CorpusError> {
        let fingerprint = source.fingerprint()?;
        let tok_hash = tokenizer.content_hash();
        let key = cache_key(&fingerprint, &tok_hash);
        let path = cache_dir
            .as_ref()
            .join(format!("tokens-{}.bin", hex(&key[..8])));
        let mut outcome = CacheOutcome::Built;
        if path.exists() {
            let reused = Self::open(&path).and_then(|c| {
                c.verify()?;
                if c.tokenizer_hash != tok_hash || c.corpus_fingerprint != fingerprint {
                    return Err(CorpusError::InvalidCache {
                        path: path.clone(),
                        reason: "made for another corpus or tokenizer".to_string(),
                    });
                }
                Ok(c)
            });
            match reused {
                Ok(c) => return Ok((c, CacheOutcome::Reused)),
                Err(e) => outcome = CacheOutcome::Rebuilt(e.to_string()),
            }
        }
        let docs = source.read()?;
        let cache = Self::build(&docs, tokenizer, &path, fingerprint)?;
        Ok((cache, outcome))
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the stream holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens `range` of the stream.
    ///
    /// # Panics
    /// If the range is out of bounds, like slice indexing.
    pub fn get(&self, range: Range<usize>) -> Vec<u32> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "token range {range:?} out of bounds for a cache of {} tokens",
            self.len
        );
        let bytes =
            &self.mmap[HEADER_LEN + range.start * self.width..HEADER_LEN + range.end * self.width];
        if self.width == 2 {
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect()
        } else {
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
    }

    /// The path of the cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size of the tokenizer that built the cache.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size as usize
    }

    /// The document separator id.
    pub fn separator(&self) -> u32 {
        self.separator
    }

    /// Number of documents tokenised.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// Bytes per stored token (2 or 4).
    pub fn token_width(&self) -> usize {
        self.width
    }

    /// SHA-256 of the tokenizer JSON the cache was built with.
    pub fn tokenizer_hash(&self) -> [u8; 32] {
        self.tokenizer_hash
    }

    /// Fingerprint of the corpus the cache was built from.
    pub fn corpus_fingerprint(&self) -> [u8; 32] {
        self.corpus_fingerprint
    }
}

// ------------------------------------------------------------------------------ split and sampling

/// Splits a stream of `tokens_len` tokens into training and validation ranges: validation is
/// the last `round(tokens_len * val_fraction)` tokens, training everything before it.
pub fn split(
    tokens_len: usize,
    val_fraction: f64,
) -> Result<(Range<usize>, Range<usize>), CorpusError> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(CorpusError::BadFraction(val_fraction));
    }
    let val = ((tokens_len as f64) * val_fraction).round() as usize;
    let cut = tokens_len - val.min(tokens_len);
    Ok((0..cut, cut..tokens_len))
}

/// Start offsets of the validation windows of `range`: windows of `seq_len + 1` tokens
/// starting every `seq_len` tokens (`range.start`, `range.start + seq_len`, ...), as many as
/// fit inside the range. Window `k` predicts targets `start + k·seq_len + 1 ..= start +
/// (k+1)·seq_len`, so no target is predicted twice and no window reads past `range.end`.
/// Fewer than `seq_len` targets at the end may be left over: [`eval_tail`] returns them as
/// one shorter window, so windows plus tail predict every target of the range exactly once.
pub fn eval_windows(range: Range<usize>, seq_len: usize) -> impl Iterator<Item = usize> {
    let n = full_eval_windows(&range, seq_len);
    (0..n).map(move |k| range.start + k * seq_len)
}

/// The tokens after the last [`eval_windows`] window that still hold unpredicted targets:
/// `Some(a..range.end)` (shorter than `seq_len + 1`; token `a` is context, `a+1..end` are the
/// remaining targets), or `None` when the windows cover every target.
pub fn eval_tail(range: Range<usize>, seq_len: usize) -> Option<Range<usize>> {
    if seq_len == 0 || range.len() < 2 {
        return None;
    }
    let a = range.start + full_eval_windows(&range, seq_len) * seq_len;
    (range.end - a >= 2).then_some(a..range.end)
}

fn full_eval_windows(range: &Range<usize>, seq_len: usize) -> usize {
    if seq_len == 0 || range.len() < 2 {
        0
    } else {
        (range.len() - 1) / seq_len
    }
}

/// Random training windows of `seq_len + 1` tokens inside a token range.
///
/// Window `k` starts at a uniform offset drawn from a ChaCha8 stream keyed by `seed` with
/// stream number `k`, so it depends only on `(seed, k)`: to resume training at step `k`,
/// restore the serialised sampler (or call [`WindowSampler::set_step`]) and the windows
/// continue exactly as in an uninterrupted run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SamplerState", into = "SamplerState")]
pub struct WindowSampler {
    seq_len: usize,
    range: Range<usize>,
    seed: u64,
    step: u64,
}

/// Serialised form of [`WindowSampler`] (validated when deserialised).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SamplerState {
    seq_len: usize,
    start: usize,
    end: usize,
    seed: u64,
    step: u64,
}

impl From<WindowSampler> for SamplerState {
    fn from(s: WindowSampler) -> Self {
        Self {
            seq_len: s.seq_len,
            start: s.range.start,
            end: s.range.end,
            seed: s.seed,
            step: s.step,
        }
    }
}

impl TryFrom<SamplerState> for WindowSampler {
    type Error = CorpusError;
    fn try_from(s: SamplerState) -> Result<Self, CorpusError> {
        let mut sampler = WindowSampler::new(s.start..s.end, s.seq_len, s.seed)?;
        sampler.step = s.step;
        Ok(sampler)
    }
}

impl WindowSampler {
    /// A sampler at step 0. Errors if `seq_len` is 0 or the range is shorter than
    /// `seq_len + 1` tokens.
    pub fn new(range: Range<usize>, seq_len: usize, seed: u64) -> Result<Self, CorpusError> {
        if seq_len == 0 {
            return Err(CorpusError::ZeroSeqLen);
        }
        if range.start > range.end || range.len() < seq_len + 1 {
            return Err(CorpusError::RangeTooShort {
                start: range.start,
                end: range.end,
                len: range.len(),
                window: seq_len + 1,
            });
        }
        Ok(Self {
            seq_len,
            range,
            seed,
            step: 0,
        })
    }

    /// Start of window `step`; the window is `start..start + seq_len + 1`, inside the range.
    pub fn start_at(&self, step: u64) -> usize {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(step);
        // number of valid starts: range.len() - (seq_len + 1) + 1
        let n = (self.range.len() - self.seq_len) as u128;
        // multiply-shift: uniform up to a bias below n / 2^64
        let r = ((rng.next_u64() as u128 * n) >> 64) as usize;
        self.range.start + r
    }

    /// Start of the next window; advances the step.
    pub fn next_start(&mut self) -> usize {
        let s = self.start_at(self.step);
        self.step += 1;
        s
    }

    /// Starts of the next `batch_size` windows.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        (0..batch_size).map(|_| self.next_start()).collect()
    }

    /// Number of windows drawn so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Moves to window `step` (e.g. when resuming from a checkpoint).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Tokens per window (`seq_len + 1`).
    pub fn window_len(&self) -> usize {
        self.seq_len + 1
    }

    /// The sequence length (number of predicted targets per window).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The sampled token range.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Iterator for WindowSampler {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        Some(self.next_start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsa_runtime::tokenizer::bert_base_chinese;

    #[test]
    fn default_corpus_is_readable() {
        let docs = default_corpus();
        assert!(docs.len() > 10_000, "{}", docs.len());
        let chars: usize = docs.iter().map(|d| d.chars().count()).sum();
        assert!(chars > 1_000_000, "{chars}");
        assert!(docs.iter().all(|d| !d.is_empty() && !d.contains('\n')));
    }

    fn sample_docs() -> Vec<String> {
        vec![
            "床前明月光，疑是地上霜。".to_string(),
            "举头望明月，低头思故乡。".to_string(),
            "hello world".to_string(),
        ]
    }

    #[test]
    fn token_cache_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tok = bert_base_chinese();
        let docs = sample_docs();
        let path = dir.path().join("sub/cache.bin");
        let fp = [7u8; 32];
        let cache = TokenCache::build(&docs, &tok, &path, fp).unwrap();
        let mut expected = Vec::new();
        for d in &docs {
            expected.extend(tok.encode(d).unwrap());
            expected.push(102);
        }
        assert_eq!(cache.len(), expected.len());
        assert_eq!(cache.get(0..cache.len()), expected);
        assert_eq!(cache.get(3..7), expected[3..7]);
        assert_eq!(cache.token_width(), 2);
        assert_eq!(cache.separator(), 102);
        assert_eq!(cache.documents(), 3);
        assert_eq!(cache.vocab_size(), 21128);
        assert_eq!(cache.corpus_fingerprint(), fp);
        assert_eq!(cache.tokenizer_hash(), tok.content_hash());
        cache.verify().unwrap();
        let reopened = TokenCache::open(&path).unwrap();
        assert_eq!(reopened.get(0..reopened.len()), expected);
        // no temporary file is left behind
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cache.bin"]);
    }

    #[test]
    fn token_cache_u32_width() {
        // vocabulary over 65536 entries -> 4 bytes per token
        let mut vocab = String::from("[PAD]\n[UNK]\n[SEP]\n");
        for i in 0..70_000u32 {
            vocab.push_str(&format!("w{i}\n"));
        }
        vocab.push_str("甲\n");
        let tok = Tokenizer::from_bert_vocab_str(&vocab).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.bin");
        let cache = TokenCache::build(&["甲 w69999".to_string()], &tok, &path, [0; 32]).unwrap();
        assert_eq!(cache.token_width(), 4);
        assert_eq!(cache.get(0..3), [70_003, 70_002, 2]);
        cache.verify().unwrap();
    }

    #[test]
    fn token_cache_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let tok = bert_base_chinese();
        let path = dir.path().join("c.bin");
        TokenCache::build(&sample_docs(), &tok, &path, [1; 32]).unwrap();
        let good = fs::read(&path).unwrap();

        let check = |bytes: &[u8], needle: &str| {
            fs::write(&path, bytes).unwrap();
            let err = TokenCache::open(&path)
                .and_then(|c| c.verify())
                .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, CorpusError::InvalidCache { .. }), "{msg}");
            assert!(msg.contains("c.bin") && msg.contains(needle), "{msg}");
        };
        check(&good[..100], "shorter than");
        check(&good[..good.len() - 2], "truncated");
        let mut padded = good.clone();
        padded.push(0);
        check(&padded, "padded");
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        check(&bad_magic, "magic");
        let mut bad_header = good.clone();
        bad_header[24] ^= 1; // token count
        check(&bad_header, "header");
        let mut bad_data = good.clone();
        let last = bad_data.len() - 1;
        bad_data[last] ^= 1;
        check(&bad_data, "token data");
    }

    #[test]
    fn load_or_build_reuses_and_invalidates() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        fs::write(&corpus, "床前明月光\n疑是地上霜\n").unwrap();
        let cache_dir = dir.path().join("cache");
        let source = CorpusSource::Paths(vec![corpus.clone()]);
        let tok = bert_base_chinese();

        let (c1, o1) = TokenCache::load_or_build(&source, &tok, &cache_dir).unwrap();
        assert_eq!(o1, CacheOutcome::Built);
        let (c2, o2) = TokenCache::load_or_build(&source, &tok, &cache_dir).unwrap();
        assert_eq!(o2, CacheOutcome::Reused);
        assert_eq!(c1.path(), c2.path());
        assert_eq!(c2.len(), 12);

        // another tokenizer -> another file
        let lower = Tokenizer::from_bert_vocab_str_with(
            nsa_runtime::tokenizer::BERT_BASE_CHINESE_VOCAB,
            true,
        )
        .unwrap();
        let (c3, o3) = TokenCache::load_or_build(&source, &lower, &cache_dir).unwrap();
        assert_eq!(o3, CacheOutcome::Built);
        assert_ne!(c3.path(), c1.path());

        // changed corpus (size and mtime) -> another file
        fs::write(&corpus, "床前明月光\n疑是地上霜\n举头望明月\n").unwrap();
        let (c4, o4) = TokenCache::load_or_build(&source, &tok, &cache_dir).unwrap();
        assert_eq!(o4, CacheOutcome::Built);
        assert_ne!(c4.path(), c1.path());
        assert_eq!(c4.len(), 18);

        // a corrupted cache is rebuilt
        let path = c4.path().to_path_buf();
        drop(c4);
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        fs::write(&path, bytes).unwrap();
        let (c5, o5) = TokenCache::load_or_build(&source, &tok, &cache_dir).unwrap();
        assert!(
            matches!(o5, CacheOutcome::Rebuilt(ref r) if r.contains("truncated")),
            "{o5:?}"
        );
        assert_eq!(c5.len(), 18);

        // the default corpus has a fixed fingerprint
        assert_eq!(
            CorpusSource::Default.fingerprint().unwrap(),
            CorpusSource::Default.fingerprint().unwrap()
        );
    }

    #[test]
    fn split_is_tail_validation() {
        assert_eq!(split(1000, 0.1).unwrap(), (0..900, 900..1000));
        assert_eq!(split(1000, 0.0).unwrap(), (0..1000, 1000..1000));
        assert_eq!(split(10, 0.25).unwrap(), (0..7, 7..10)); // round(2.5) = 3
        assert!(split(10, 1.0).is_err());
        assert!(split(10, -0.1).is_err());
        assert!(split(10, f64::NAN).is_err());
    }

    #[test]
    fn eval_windows_predict_every_target_once() {
        for start in [0usize, 5] {
            for len in 0..60usize {
                for seq_len in 1..12usize {
                    let range = start..start + len;
                    let mut predicted = vec![0u32; start + len];
                    for s in eval_windows(range.clone(), seq_len) {
                        assert!(
                            s >= range.start && s + seq_len < range.end,
                            "read past the end"
                        );
                        for p in &mut predicted[s + 1..=s + seq_len] {
                            *p += 1;
                        }
                    }
                    let covered: usize = predicted.iter().map(|&c| c as usize).sum();
                    let tail_targets = (len.max(1) - 1) - covered;
                    assert!(tail_targets < seq_len, "len {len} seq {seq_len}");
                    if let Some(tail) = eval_tail(range.clone(), seq_len) {
                        assert!(tail.start >= range.start && tail.end == range.end);
                        assert!(tail.len() <= seq_len, "tail is shorter than a window");
                        for p in &mut predicted[tail.start + 1..tail.end] {
                            *p += 1;
                        }
                    } else {
                        assert_eq!(tail_targets, 0);
                    }
                    for (t, &c) in predicted.iter().enumerate() {
                        let is_target = t > range.start && t < range.end;
                        assert_eq!(c, is_target as u32, "token {t} len {len} seq {seq_len}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_windows_stay_in_range() {
        for (range, seq_len) in [
            (0..9usize, 8usize),
            (100..1000, 64),
            (5..6, 0),
            (3..3000, 1),
        ] {
            let Ok(mut s) = WindowSampler::new(range.clone(), seq_len, 42) else {
                assert_eq!(seq_len, 0);
                continue;
            };
            let mut seen = std::collections::HashSet::new();
            for _ in 0..2000 {
                let start = s.next_start();
                assert!(start >= range.start && start + seq_len < range.end);
                seen.insert(start);
            }
            // the only possible start is used when the range holds exactly one window
            if range.len() == seq_len + 1 {
                assert_eq!(seen.len(), 1);
            } else {
                assert!(seen.len() > 1);
            }
        }
        let err = WindowSampler::new(10..20, 10, 0).unwrap_err().to_string();
        assert!(
            err.contains("10..20") && err.contains("10 tokens") && err.contains("11"),
            "{err}"
        );
    }

    #[test]
    fn sampler_resume_matches_uninterrupted_run() {
        let mut full = WindowSampler::new(0..100_000, 128, 7).unwrap();
        let uninterrupted: Vec<usize> = (0..50).map(|_| full.next_start()).collect();

        let mut first = WindowSampler::new(0..100_000, 128, 7).unwrap();
        let mut resumed_starts = first.next_batch(20);
        let json = serde_json::to_string(&first).unwrap();
        let mut resumed: WindowSampler = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed.step(), 20);
        resumed_starts.extend(resumed.next_batch(30));
        assert_eq!(resumed_starts, uninterrupted);

        // resuming from the step alone
        let mut by_step = WindowSampler::new(0..100_000, 128, 7).unwrap();
        by_step.set_step(33);
        assert_eq!(by_step.next_start(), uninterrupted[33]);
        assert_eq!(full.start_at(33), uninterrupted[33]);
        // another seed gives other windows
        let other = WindowSampler::new(0..100_000, 128, 8).unwrap();
        assert_ne!(
            (0..50).map(|k| other.start_at(k)).collect::<Vec<_>>(),
            uninterrupted
        );
        // invalid serialised state is rejected
        let bad = r#"{"seq_len":128,"start":0,"end":100,"seed":7,"step":0}"#;
        assert!(serde_json::from_str::<WindowSampler>(bad).is_err());
    }
}
