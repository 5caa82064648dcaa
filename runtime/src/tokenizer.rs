//! Tokenizers for training and inference.
//!
//! [`Tokenizer`] wraps a Hugging Face [`tokenizers::Tokenizer`] and adds what the NSA
//! language model needs: plain `u32` ids without `[CLS]`/`[SEP]` decoration, readable
//! decoding of Chinese text and a content hash for the token cache.
//!
//! # Kinds
//!
//! * **bert-base-chinese** ([`bert_base_chinese`]): the 21,128-entry WordPiece vocabulary of
//!   Google's BERT-Base Chinese, embedded from `assets/tokenizer/vocab.txt` (see the README
//!   there). Every CJK character is one token; rarer characters and any word containing a
//!   character outside the vocabulary become `[UNK]` (id 100).
//! * **any BERT `vocab.txt`** ([`Tokenizer::from_bert_vocab`]).
//! * **a `tokenizer.json`** ([`Tokenizer::from_file`]), e.g. one written by [`Tokenizer::save`].
//! * **trained on the user's corpus**: WordPiece ([`Tokenizer::train_wordpiece`], same
//!   normalizer and pre-tokenizer as BERT) or byte-level BPE ([`Tokenizer::train_bpe`]).
//!
//! BERT-style tokenizers use the BERT normalizer with `clean_text = true`,
//! `handle_chinese_chars = true`, `strip_accents = false` and `lowercase = false` (as Hugging
//! Face's `bert-base-chinese`), the BERT pre-tokenizer (split on whitespace and punctuation)
//! and no post-processor: [`Tokenizer::encode`] never adds `[CLS]`/`[SEP]`. Note that the
//! bert-base-chinese vocabulary has no upper-case Latin letters (Google's model was trained
//! lower-cased), so without lowercasing `Hello` encodes to `[UNK]`;
//! [`Tokenizer::from_bert_vocab_with`]`(path, true)` builds the lowercasing variant.
//!
//! # Decoding
//!
//! WordPiece tokens carry no whitespace information, so [`Tokenizer::decode`] of a WordPiece
//! tokenizer rebuilds the text from the tokens: `##` continuations are glued to the previous
//! token, no space is put next to a CJK character or CJK / full-width punctuation
//! ([`is_cjk`]), none before closing punctuation (`.,!?;:)]}%`) or after an opening bracket,
//! none inside `3.14`, `1,000`, `10:30` or around `-`, `/`, `_`, `@`, `'` between letters or
//! digits (`e-mail`, `don't`), and one space elsewhere (between ASCII words). Whitespace
//! of the original next to CJK text is therefore lost, which is what one wants for Chinese.
//! Byte-level BPE tokenizers decode exactly (Hugging Face's ByteLevel decoder).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::documents::{self, DocumentError};

/// The bert-base-chinese `vocab.txt`, embedded at compile time.
pub const BERT_BASE_CHINESE_VOCAB: &str = include_str!("../../assets/tokenizer/vocab.txt");

/// Special tokens of BERT vocabularies, registered as special added tokens when present.
const BERT_SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// Special tokens of a trained WordPiece tokenizer (ids 0..5 in this order).
const TRAINED_WORDPIECE_SPECIALS: [&str; 5] = BERT_SPECIAL_TOKENS;
/// Special tokens of a trained byte-level BPE tokenizer (ids 0, 1). Byte-level BPE has no
/// unknown token: every byte is in the vocabulary.
const TRAINED_BPE_SPECIALS: [&str; 2] = ["[PAD]", "[SEP]"];

/// Errors of tokenizer construction, training and encoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A `tokenizer.json` could not be parsed.
    #[error("invalid tokenizer file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A `vocab.txt` is malformed.
    #[error("invalid WordPiece vocabulary {origin}: {message}")]
    Vocab { origin: String, message: String },
    /// `save` failed.
    #[error("cannot write tokenizer to {path}: {message}")]
    Save { path: PathBuf, message: String },
    /// Training failed.
    #[error("tokenizer training failed: {0}")]
    Train(String),
    /// Encoding failed.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The training corpus could not be read.
    #[error(transparent)]
    Corpus(#[from] DocumentError),
}

/// How ids are turned back into text.
#[derive(Clone, Debug)]
enum Decoding {
    /// Rebuild from WordPiece tokens (see the module docs).
    WordPiece { prefix: String },
    /// Use the tokenizer's own decoder (exact for byte-level BPE).
    Native,
}

/// A text tokenizer producing `u32` ids. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    decoding: Decoding,
}

/// The embedded bert-base-chinese tokenizer (21,128 tokens, `[UNK]` = 100, `[SEP]` = 102,
/// no lowercasing).
pub fn bert_base_chinese() -> Tokenizer {
    Tokenizer::from_bert_vocab_str(BERT_BASE_CHINESE_VOCAB)
        .expect("the embedded bert-base-chinese vocabulary is valid")
}

impl Tokenizer {
    /// WordPiece tokenizer from a BERT `vocab.txt` (one token per line, id = line number),
    /// without lowercasing.
    pub fn from_bert_vocab(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        Self::from_bert_vocab_with(path, false)
    }

    /// Like [`Tokenizer::from_bert_vocab`], choosing whether the normalizer lowercases.
    pub fn from_bert_vocab_with(
        path: impl AsRef<Path>,
        lowercase: bool,
    ) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::vocab_tokenizer(&text, &path.display().to_string(), lowercase)
    }

    /// WordPiece tokenizer from the contents of a BERT `vocab.txt`, without lowercasing.
    pub fn from_bert_vocab_str(vocab: &str) -> Result<Self, TokenizerError> {
        Self::vocab_tokenizer(vocab, "(in memory)", false)
    }

    /// Like [`Tokenizer::from_bert_vocab_str`], choosing whether the normalizer lowercases.
    pub fn from_bert_vocab_str_with(vocab: &str, lowercase: bool) -> Result<Self, TokenizerError> {
        Self::vocab_tokenizer(vocab, "(in memory)", lowercase)
    }

    /// Loads a `tokenizer.json`; a path ending in `.txt` is read as a BERT `vocab.txt`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
        {
            return Self::from_bert_vocab(path);
        }
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Self::wrap(inner))
    }

    /// Trains a WordPiece tokenizer (BERT normalizer and pre-tokenizer, no lowercasing) on
    /// the documents of `files` (any format [`documents::read_documents`] accepts). The special
    /// tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` get ids 0 to 4.
    pub fn train_wordpiece<P: AsRef<Path>>(
        files: &[P],
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        Self::train_wordpiece_on(&read_all(files)?, vocab_size)
    }

    /// [`Tokenizer::train_wordpiece`] on documents already in memory.
    pub fn train_wordpiece_on(docs: &[String], vocab_size: usize) -> Result<Self, TokenizerError> {
        let mut inner = tokenizers::Tokenizer::new(WordPiece::default());
        inner.with_normalizer(Some(bert_normalizer(false)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        let mut trainer: TrainerWrapper = WordPieceTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(1)
            .show_progress(show_progress())
            .special_tokens(special_tokens(&TRAINED_WORDPIECE_SPECIALS))
            .build()
            .into();
        inner
            .train(&mut trainer, docs.iter())
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        Ok(Self::wrap(inner))
    }

    /// Trains a byte-level BPE tokenizer (GPT-2 style: no normalizer, ByteLevel
    /// pre-tokenizer and decoder, no unknown token) on the documents of `files`. The special
    /// tokens `[PAD]` and `[SEP]` (document separator) get ids 0 and 1.
    pub fn train_bpe<P: AsRef<Path>>(
        files: &[P],
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        Self::train_bpe_on(&read_all(files)?, vocab_size)
    }

    /// [`Tokenizer::train_bpe`] on documents already in memory.
    pub fn train_bpe_on(docs: &[String], vocab_size: usize) -> Result<Self, TokenizerError> {
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(show_progress())
            .special_tokens(special_tokens(&TRAINED_BPE_SPECIALS))
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner
            .train(&mut trainer, docs.iter())
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        Ok(Self::wrap(inner))
    }

    /// Writes the tokenizer as a (pretty) `tokenizer.json`, loadable by [`Tokenizer::from_file`]
    /// and by Hugging Face `tokenizers`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TokenizerError> {
        let path = path.as_ref();
        self.inner
            .save(path, true)
            .map_err(|e| TokenizerError::Save {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// The tokenizer serialised as compact `tokenizer.json` text.
    pub fn to_json(&self) -> String {
        self.inner
            .to_string(false)
            .expect("a tokenizer always serialises to JSON")
    }

    /// SHA-256 of [`Tokenizer::to_json`]: changes whenever vocabulary, normalizer,
    /// pre-tokenizer or model settings change. Used as part of the token cache key.
    pub fn content_hash(&self) -> [u8; 32] {
        Sha256::digest(self.to_json().as_bytes()).into()
    }

    /// Number of ids, added tokens included (ids are `0..vocab_size()`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of `text`, without any special token added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// [`Tokenizer::encode`] of many texts, in parallel.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, TokenizerError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.inner
            .encode_batch(inputs, false)
            .map(|encs| encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids` (see the module docs). Special tokens are kept (`[SEP]`, `[UNK]`);
    /// ids outside the vocabulary (e.g. from a model whose output layer is padded past the
    /// vocabulary) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with(ids, false)
    }

    /// [`Tokenizer::decode`], optionally dropping special tokens (`[PAD]`, `[SEP]`, ...).
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let specials: HashSet<u32> = if skip_special_tokens {
            self.inner
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special)
                .map(|(id, _)| id)
                .collect()
        } else {
            HashSet::new()
        };
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !specials.contains(id))
            .collect();
        match &self.decoding {
            Decoding::WordPiece { prefix } => {
                let tokens: Vec<String> = ids
                    .iter()
                    .map(|&id| {
                        self.inner
                            .id_to_token(id)
                            .unwrap_or_else(|| "\u{FFFD}".to_string())
                    })
                    .collect();
                join_wordpiece(&tokens, prefix)
            }
            Decoding::Native => {
                let size = self.vocab_size() as u32;
                let mut out = String::new();
                let mut run: Vec<u32> = Vec::new();
                for &id in &ids {
                    if id < size {
                        run.push(id);
                    } else {
                        out.push_str(&self.inner.decode(&run, false).unwrap_or_default());
                        run.clear();
                        out.push('\u{FFFD}');
                    }
                }
                out.push_str(&self.inner.decode(&run, false).unwrap_or_default());
                out
            }
        }
    }

    /// Id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Id of the unknown token, if the model has one (WordPiece: `[UNK]`; byte-level BPE:
    /// none; other models: `[UNK]` or `<unk>` if present).
    pub fn unk_id(&self) -> Option<u32> {
        match self.inner.get_model() {
            ModelWrapper::WordPiece(wp) => self.token_to_id(&wp.unk_token),
            ModelWrapper::BPE(bpe) => bpe
                .get_unk_token()
                .as_ref()
                .and_then(|t| self.token_to_id(t)),
            _ => ["[UNK]", "<unk>"].iter().find_map(|t| self.token_to_id(t)),
        }
    }

    /// Id of the padding token (`[PAD]`, `<pad>` or `<|pad|>`), if any.
    pub fn pad_id(&self) -> Option<u32> {
        ["[PAD]", "<pad>", "<|pad|>"]
            .iter()
            .find_map(|t| self.token_to_id(t))
    }

    /// Id of the document separator: `[SEP]` if present, else `</s>` or `<|endoftext|>`.
    pub fn sep_id(&self) -> Option<u32> {
        ["[SEP]", "</s>", "<|endoftext|>"]
            .iter()
            .find_map(|t| self.token_to_id(t))
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let decoding = match inner.get_model() {
            ModelWrapper::WordPiece(wp) => Decoding::WordPiece {
                prefix: wp.continuing_subword_prefix.clone(),
            },
            _ => Decoding::Native,
        };
        Self { inner, decoding }
    }

    fn vocab_tokenizer(text: &str, origin: &str, lowercase: bool) -> Result<Self, TokenizerError> {
        let vocab = parse_vocab(text, origin)?;
        if !vocab.contains_key("[UNK]") {
            return Err(TokenizerError::Vocab {
                origin: origin.to_string(),
                message: "no [UNK] token".to_string(),
            });
        }
        let model = WordPiece::builder()
            .vocab(
                vocab
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<ahash::AHashMap<_, _>>(),
            )
            .unk_token("[UNK]".to_string())
            .continuing_subword_prefix("##".to_string())
            .build()
            .map_err(|e| TokenizerError::Vocab {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_normalizer(Some(bert_normalizer(lowercase)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        let specials: Vec<&str> = BERT_SPECIAL_TOKENS
            .into_iter()
            .filter(|t| vocab.contains_key(*t))
            .collect();
        inner.add_special_tokens(&special_tokens(&specials));
        Ok(Self::wrap(inner))
    }
}

/// Parses a BERT `vocab.txt`: one token per line (`\n`, optional `\r`), id = line number.
/// Unlike a whitespace-trimming reader, tokens such as U+2028 are kept as they are.
fn parse_vocab(text: &str, origin: &str) -> Result<HashMap<String, u32>, TokenizerError> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut vocab = HashMap::new();
    for (i, line) in text.split('\n').enumerate() {
        let token = line.strip_suffix('\r').unwrap_or(line);
        if vocab.insert(token.to_string(), i as u32).is_some() {
            return Err(TokenizerError::Vocab {
                origin: origin.to_string(),
                message: format!("token {token:?} on line {} appears twice", i + 1),
            });
        }
    }
    if vocab.is_empty() || text.is_empty() {
        return Err(TokenizerError::Vocab {
            origin: origin.to_string(),
            message: "empty vocabulary".to_string(),
        });
    }
    Ok(vocab)
}

fn bert_normalizer(lowercase: bool) -> BertNormalizer {
    // clean_text, handle_chinese_chars, strip_accents, lowercase
    BertNormalizer::new(true, true, Some(false), lowercase)
}

fn special_tokens(tokens: &[&str]) -> Vec<AddedToken> {
    tokens.iter().map(|t| AddedToken::from(*t, true)).collect()
}

fn show_progress() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn read_all<P: AsRef<Path>>(files: &[P]) -> Result<Vec<String>, TokenizerError> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(documents::read_documents(f.as_ref())?);
    }
    Ok(docs)
}

/// True for characters written without spaces around them in CJK text: CJK ideographs
/// (BERT's ranges), kana, bopomofo, CJK radicals, CJK symbols and punctuation, full-width
/// and half-width forms, CJK compatibility / vertical / small forms, enclosed CJK, general
/// punctuation (`“ ” ‘ ’ — …`) and the middle dot `·`. Hangul is not included: Korean is
/// written with spaces.
pub fn is_cjk(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0x2CEB0..=0x2EBEF
            | 0x30000..=0x3134F
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
            | 0x2E80..=0x2FDF
            | 0x3000..=0x303F
            | 0x3040..=0x30FF
            | 0x3100..=0x312F
            | 0x31A0..=0x31FF
            | 0x3200..=0x33FF
            | 0xFE10..=0xFE1F
            | 0xFE30..=0xFE6F
            | 0xFF00..=0xFFEF
            | 0x2000..=0x206F
            | 0xB7
    )
}

/// Joins WordPiece tokens into text (rules in the module docs).
fn join_wordpiece(tokens: &[String], prefix: &str) -> String {
    let mut out = String::new();
    // Last char of the previous token, and the last char before the previous token when the
    // previous token is a single character (for `3.14`, `e-mail`).
    let mut prev: Option<char> = None;
    let mut before_prev: Option<char> = None;
    for token in tokens {
        let (piece, continuation) = match token.strip_prefix(prefix) {
            Some(rest) if !prefix.is_empty() && !rest.is_empty() => (rest, true),
            _ => (token.as_str(), false),
        };
        let Some(first) = piece.chars().next() else {
            continue;
        };
        if let Some(p) = prev {
            if !continuation && needs_space(before_prev, p, first) {
                out.push(' ');
            }
        }
        out.push_str(piece);
        let mut chars = piece.chars();
        let last = chars.next_back();
        before_prev = if chars.next().is_none() { prev } else { None };
        prev = last;
    }
    out
}

/// Whether a space goes between a token ending in `a` and one starting with `b`; `z` is the
/// character before `a` when `a` is a one-character token.
fn needs_space(z: Option<char>, a: char, b: char) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if is_cjk(a) || is_cjk(b) {
        return false;
    }
    if matches!(b, '.' | ',' | '!' | '?' | ';' | ':' | ')' | ']' | '}' | '%') {
        return false;
    }
    if matches!(a, '(' | '[' | '{') {
        return false;
    }
    // joiners between letters/digits: e-mail, a/b, snake_case, x@y, don't
    if matches!(b, '-' | '/' | '_' | '@' | '\'') && alnum(a) {
        return false;
    }
    if matches!(a, '-' | '/' | '_' | '@' | '\'') && alnum(b) && z.is_some_and(alnum) {
        return false;
    }
    // number separators: 3.14, 1,000, 10:30
    if matches!(a, '.' | ',' | ':') && b.is_ascii_digit() && z.is_some_and(|c| c.is_ascii_digit()) {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const POEM: &str = "床前明月光，疑是地上霜。Hello world 2024年";

    #[test]
    fn bert_base_chinese_basics() {
        let tok = bert_base_chinese();
        assert_eq!(tok.vocab_size(), 21128);
        assert_eq!(tok.unk_id(), Some(100));
        assert_eq!(tok.pad_id(), Some(0));
        assert_eq!(tok.sep_id(), Some(102));
        assert_eq!(tok.token_to_id("[CLS]"), Some(101));
        assert_eq!(tok.token_to_id("的"), Some(4638));
        // One token per CJK character, no [CLS]/[SEP] added.
        let ids = tok.encode("静夜思").unwrap();
        assert_eq!(ids.len(), 3);
        assert!(!ids.contains(&101) && !ids.contains(&102));
    }

    #[test]
    fn vocab_file_md5() {
        use md5::{Digest as _, Md5};
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizer/vocab.txt");
        let bytes = std::fs::read(&path).unwrap();
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&Md5::digest(&bytes)),
            "3b5b76c4aef48ecf8cb3abaafe960f09"
        );
        assert_eq!(
            hex(&Md5::digest(BERT_BASE_CHINESE_VOCAB.as_bytes())),
            "3b5b76c4aef48ecf8cb3abaafe960f09"
        );
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 21128);
    }

    #[test]
    fn round_trip_mixed_sentence_lowercasing_variant() {
        let tok = Tokenizer::from_bert_vocab_str_with(BERT_BASE_CHINESE_VOCAB, true).unwrap();
        let ids = tok.encode(POEM).unwrap();
        assert!(!ids.contains(&100), "no [UNK] expected: {ids:?}");
        assert_eq!(
            tok.decode(&ids),
            "床前明月光，疑是地上霜。hello world 2024年"
        );
    }

    #[test]
    fn round_trip_mixed_sentence_default() {
        let tok = bert_base_chinese();
        // Lower-case ASCII round-trips exactly (spaces only between ASCII words) ...
        let text = "床前明月光，疑是地上霜。hello world 2024年";
        let ids = tok.encode(text).unwrap();
        assert!(!ids.contains(&100));
        assert_eq!(tok.decode(&ids), text);
        // ... while an upper-case letter makes its whole word [UNK]: the vocabulary is
        // lower-case only and this tokenizer does not lowercase.
        let ids = tok.encode(POEM).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 100).count(), 1);
        assert_eq!(
            tok.decode(&ids),
            "床前明月光，疑是地上霜。[UNK] world 2024年"
        );
        assert_eq!(
            tok.decode_with(&ids, true),
            "床前明月光，疑是地上霜。world 2024年"
        );
    }

    #[test]
    fn decoding_rules() {
        let tok = bert_base_chinese();
        for text in [
            "静夜思 李白 床前明月光，疑是地上霜。举头望明月，低头思故乡。",
            "hello, world! (test) 3.14 e-mail don't 1,000 10:30",
            "我们用python写代码，速度提高了50%。",
            "《论语》子曰：“学而时习之”",
        ] {
            let ids = tok.encode(text).unwrap();
            let expected = text.replace("静夜思 李白 ", "静夜思李白");
            // “ ” are not in the vocabulary: they come back as [UNK].
            let expected = expected.replace(['“', '”'], "[UNK]");
            assert_eq!(tok.decode(&ids), expected, "{text}");
        }
        // Out-of-vocabulary ids do not panic.
        assert_eq!(tok.decode(&[791, 30_000]), "今\u{FFFD}");
    }

    #[test]
    fn cjk_classification() {
        for c in ['中', '，', '。', '“', '…', '·', 'ア', '１', '𠀀'] {
            assert!(is_cjk(c), "{c}");
        }
        for c in ['a', 'Z', '1', ',', '.', ' ', '한'] {
            assert!(!is_cjk(c), "{c}");
        }
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tok = bert_base_chinese();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        let text = "床前明月光，疑是地上霜。Hello world 2024年 ##x [SEP]";
        assert_eq!(tok.encode(text).unwrap(), loaded.encode(text).unwrap());
        assert_eq!(loaded.vocab_size(), 21128);
        assert_eq!(loaded.unk_id(), Some(100));
        assert_eq!(tok.content_hash(), loaded.content_hash());
        assert_eq!(tok.content_hash(), bert_base_chinese().content_hash());
        // .txt is read as a vocab file
        let vocab = dir.path().join("vocab.txt");
        std::fs::write(&vocab, BERT_BASE_CHINESE_VOCAB).unwrap();
        let from_txt = Tokenizer::from_file(&vocab).unwrap();
        assert_eq!(from_txt.encode(text).unwrap(), tok.encode(text).unwrap());
        // lowercasing changes the hash
        let lower = Tokenizer::from_bert_vocab_with(&vocab, true).unwrap();
        assert_ne!(lower.content_hash(), tok.content_hash());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let err = Tokenizer::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.json"), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let err = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json"), "{err}");
        let dup = dir.path().join("dup.txt");
        std::fs::write(&dup, "[UNK]\na\na\n").unwrap();
        let err = Tokenizer::from_file(&dup).unwrap_err().to_string();
        assert!(err.contains("dup.txt") && err.contains("line 3"), "{err}");
    }

    fn tiny_corpus(dir: &Path) -> PathBuf {
        let path = dir.join("tiny.txt");
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..20 {
            writeln!(f, "床前明月光，疑是地上霜。举头望明月，低头思故乡。").unwrap();
            writeln!(f, "the quick brown fox jumps over the lazy dog").unwrap();
            writeln!(f, "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。").unwrap();
        }
        path
    }

    #[test]
    fn train_tiny_wordpiece() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_corpus(dir.path());
        let tok = Tokenizer::train_wordpiece(&[&path], 200).unwrap();
        assert!(
            tok.vocab_size() <= 200 && tok.vocab_size() > 40,
            "{}",
            tok.vocab_size()
        );
        assert_eq!(tok.pad_id(), Some(0));
        assert_eq!(tok.unk_id(), Some(1));
        assert_eq!(tok.sep_id(), Some(3));
        let text = "床前明月光，疑是地上霜。the lazy dog";
        let ids = tok.encode(text).unwrap();
        assert!(!ids.contains(&1), "{ids:?}");
        assert_eq!(tok.decode(&ids), text);
        // unseen character -> [UNK]
        assert!(tok.encode("龘").unwrap().contains(&1));
        // trained tokenizers survive save/load
        let json = dir.path().join("wp.json");
        tok.save(&json).unwrap();
        assert_eq!(
            Tokenizer::from_file(&json).unwrap().encode(text).unwrap(),
            ids
        );
    }

    #[test]
    fn train_tiny_bpe() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_corpus(dir.path());
        let tok = Tokenizer::train_bpe(&[&path], 400).unwrap();
        assert_eq!(tok.pad_id(), Some(0));
        assert_eq!(tok.sep_id(), Some(1));
        assert_eq!(tok.unk_id(), None);
        // Byte-level BPE is lossless, also for unseen characters and spacing.
        let text = "床前明月光，疑是地上霜。 The  lazy dog 龘";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids), text);
        assert!(ids.len() < text.len());
    }
}
