//! The model directory that training writes and inference reads: everything needed to run a
//! model, in open formats.
//!
//! ```text
//! <dir>/model.json         the TransformerConfig
//! <dir>/tokenizer.json     the tokenizer (Hugging Face `tokenizers` format)
//! <dir>/model.safetensors  f32 weights in native-sparse-attention-pytorch's state_dict naming
//! ```
//!
//! The weights use the reference's names and layouts, so `model.safetensors` loads into the
//! PyTorch `Transformer` with `load_state_dict` and a PyTorch checkpoint imports back (see
//! [`crate::reference`]). Every file is written atomically: a temporary file in the same
//! directory, fsync, then rename, so a crash never leaves a half-written file behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use nsa_model::interop::{LoadError, StateDict};
use nsa_model::{Transformer, TransformerConfig};

use crate::reference::{read_state_dict, write_weights};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Config file name.
pub const CONFIG_FILE: &str = "model.json";
/// Tokenizer file name.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Weights file name.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Why a model directory or weights file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a model directory; the hint names a model directory inside it, if there is one.
    #[error(
        "{path}: not a model directory (expected {CONFIG_FILE}, {TOKENIZER_FILE} and {WEIGHTS_FILE}){hint}"
    )]
    NotABundle {
        /// The directory.
        path: PathBuf,
        /// `"; ..."` or empty.
        hint: String,
    },
    /// Bad config.
    #[error("{path}: invalid model config: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Weights file unreadable.
    #[error("{path}: not a valid weights file ({reason}); the file may be truncated or corrupted")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Weights do not fit the config.
    #[error("{path}: weights do not match {config}: {source}")]
    Mismatch {
        /// The weights file.
        path: PathBuf,
        /// The config file.
        config: String,
        /// The mismatch.
        source: LoadError,
    },
    /// Tokenizer problem.
    #[error("{path}: {source}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The error.
        source: TokenizerError,
    },
    /// Tokenizer and model disagree.
    #[error(
        "{path}: the tokenizer has {tokenizer} tokens but the model has num_tokens = {model}; \
         use the tokenizer the model was trained with"
    )]
    VocabMismatch {
        /// Tokenizer file.
        path: PathBuf,
        /// Tokenizer vocabulary size.
        tokenizer: usize,
        /// Model vocabulary size.
        model: usize,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename, fsync of
/// the directory. An existing file is replaced only once the new one is complete.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads and validates a model config file.
pub fn read_config(path: &Path) -> Result<TransformerConfig, BundleError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let config: TransformerConfig =
        serde_json::from_str(&text).map_err(|e| BundleError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    config.validate().map_err(|e| BundleError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(config)
}

/// A model directory's contents, read from disk.
pub struct Bundle {
    /// The directory.
    pub dir: PathBuf,
    /// Model config.
    pub config: TransformerConfig,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// Weights.
    pub weights: StateDict,
}

impl Bundle {
    /// Reads `dir` and checks that config, tokenizer and weights agree.
    pub fn read(dir: &Path) -> Result<Self, BundleError> {
        if !dir.is_dir() || !dir.join(CONFIG_FILE).exists() {
            return Err(BundleError::NotABundle {
                path: dir.to_path_buf(),
                hint: not_a_bundle_hint(dir),
            });
        }
        let config = read_config(&dir.join(CONFIG_FILE))?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|source| BundleError::Tokenizer {
                path: tok_path.clone(),
                source,
            })?;
        if tokenizer.vocab_size() > config.num_tokens {
            return Err(BundleError::VocabMismatch {
                path: tok_path,
                tokenizer: tokenizer.vocab_size(),
                model: config.num_tokens,
            });
        }
        let weights = read_state_dict(&dir.join(WEIGHTS_FILE))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            weights,
        })
    }

    /// Builds the model on `device` from the weights.
    pub fn model<B: Backend>(&self, device: &B::Device) -> Result<Transformer<B>, BundleError> {
        build_model(&self.config, self.weights.clone(), device).map_err(|source| {
            BundleError::Mismatch {
                path: self.dir.join(WEIGHTS_FILE),
                config: self.dir.join(CONFIG_FILE).display().to_string(),
                source,
            }
        })
    }
}

/// What to say when `dir` is not a model directory: a training run's `best/` and `last/`
/// bundles inside it, or that it does not exist.
fn not_a_bundle_hint(dir: &Path) -> String {
    if !dir.exists() {
        return "; it does not exist".into();
    }
    let inside: Vec<String> = ["best", "last"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|d| d.join(CONFIG_FILE).exists())
        .map(|d| d.display().to_string())
        .collect();
    match inside.as_slice() {
        [] => String::new(),
        [one] => format!("; it holds a training run: did you mean {one}?"),
        [best, last] => format!(
            "; it holds a training run: did you mean {best} (best validation loss) or {last} (newest)?"
        ),
        _ => unreachable!("at most two"),
    }
}

/// `config.init` + the weights; the config was validated.
pub fn build_model<B: Backend>(
    config: &TransformerConfig,
    weights: StateDict,
    device: &B::Device,
) -> Result<Transformer<B>, LoadError> {
    config
        .init::<B>(device)
        .expect("validated config")
        .load_reference(weights)
}

/// Writes a model directory (each file atomically).
pub fn write_bundle<B: Backend>(
    dir: &Path,
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
) -> Result<(), BundleError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let config = serde_json::to_string_pretty(&model.config).expect("config serialises");
    let path = dir.join(CONFIG_FILE);
    atomic_write(&path, config.as_bytes()).map_err(io(&path))?;
    let path = dir.join(TOKENIZER_FILE);
    atomic_write(&path, tokenizer.to_json().as_bytes()).map_err(io(&path))?;
    write_weights(&dir.join(WEIGHTS_FILE), model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn tiny() -> TransformerConfig {
        let mut c = TransformerConfig::new(40, 16, 1);
        c.dim_head = 8;
        c.heads = 2;
        c.sparse.sliding_window_size = 4;
        c.sparse.compress_block_size = 4;
        c.sparse.compress_block_sliding_stride = 4;
        c.sparse.selection_block_size = 4;
        c
    }

    #[test]
    fn weights_round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let device = Default::default();
        let model = tiny().init::<B>(&device).unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        write_weights(&path, &model).unwrap();
        let back =
            build_model::<B>(&model.config, read_state_dict(&path).unwrap(), &device).unwrap();
        assert_eq!(back.reference_state(), model.reference_state());
        // no temp files left behind
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn truncated_weights_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let device = Default::default();
        let model = tiny().init::<B>(&device).unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        write_weights(&path, &model).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_state_dict(&path).unwrap_err().to_string();
        assert!(err.contains("truncated or corrupted"), "{err}");
    }

    #[test]
    fn weights_of_another_config_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let device = Default::default();
        let model = tiny().init::<B>(&device).unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        write_weights(&path, &model).unwrap();
        let mut other = tiny();
        other.dim = 32;
        let err = build_model::<B>(&other, read_state_dict(&path).unwrap(), &device)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("shape"), "{err}");
    }
}
