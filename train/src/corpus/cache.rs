//! The token cache: the corpus tokenised once into a checked, memory-mapped file (format in
//! the [module docs](super)).

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use nsa_runtime::tokenizer::Tokenizer;
use sha2::{Digest, Sha256};

use super::{io_err, CorpusError, CorpusSource};

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

#[cfg(test)]
mod tests {
    use super::*;
    use nsa_runtime::tokenizer::bert_base_chinese;

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
}
