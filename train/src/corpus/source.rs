//! Where the training text comes from: the corpus files given, or the default corpus
//! bundled with the crate.

use std::fs;
use std::path::PathBuf;

use nsa_runtime::documents::{append_documents, corpus_files, read_documents_from, DocumentError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{io_err, CorpusError};

/// The default corpus shipped with the crate (`assets/corpus/zh-mix.txt.gz`, see the README
/// there): a ~4 MB mix of classical poetry and prose, 1998 news and product reviews.
pub const DEFAULT_CORPUS_GZ: &[u8] = include_bytes!("../../../assets/corpus/zh-mix.txt.gz");

/// The embedded default corpus (`assets/corpus/zh-mix.txt.gz`), one string per document.
pub fn default_corpus() -> Vec<String> {
    read_documents_from(DEFAULT_CORPUS_GZ, "zh-mix.txt.gz")
        .expect("the embedded default corpus is valid gzip'd UTF-8 text")
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_corpus_is_readable() {
        let docs = default_corpus();
        assert!(docs.len() > 10_000, "{}", docs.len());
        let chars: usize = docs.iter().map(|d| d.chars().count()).sum();
        assert!(chars > 1_000_000, "{chars}");
        assert!(docs.iter().all(|d| !d.is_empty() && !d.contains('\n')));
    }
}
