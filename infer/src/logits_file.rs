//! The output files of `nsa-infer logits`: raw logits `[tokens, vocab]` (f32) and the token
//! ids (i64) for comparing with another implementation to the last bit.
//!
//! - `.safetensors`: tensors `logits` and `ids` (readable by `safetensors.numpy.load_file`).
//! - `.npy`: the logits; the ids go beside it as `<name>.ids.npy` (NumPy format 1.0).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};

/// Where and how to write.
pub enum Output {
    Safetensors(PathBuf),
    Npy { logits: PathBuf, ids: PathBuf },
}

impl Output {
    /// The format from the file name's extension.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            bail!("--out {}: is a directory; give a file name", path.display());
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(Self::Safetensors(path.to_path_buf())),
            Some("npy") => {
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                Ok(Self::Npy {
                    logits: path.to_path_buf(),
                    ids: path.with_file_name(format!("{stem}.ids.npy")),
                })
            }
            _ => bail!(
                "--out {}: the name must end in .safetensors or .npy",
                path.display()
            ),
        }
    }

    /// Writes `logits` `[ids.len(), vocab]` and `ids` (atomically); returns the files written.
    pub fn write(&self, logits: &[f32], ids: &[u32], vocab: usize) -> Result<Vec<String>> {
        assert_eq!(logits.len(), ids.len() * vocab, "logits of every token");
        let n = ids.len();
        let logit_bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let id_bytes: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
        match self {
            Self::Safetensors(path) => {
                let tensors = [
                    (
                        "logits",
                        TensorView::new(Dtype::F32, vec![n, vocab], &logit_bytes)?,
                    ),
                    ("ids", TensorView::new(Dtype::I64, vec![n], &id_bytes)?),
                ];
                let bytes = safetensors::serialize(tensors, None)?;
                write(path, &bytes)?;
                Ok(vec![path.display().to_string()])
            }
            Self::Npy { logits, ids } => {
                write(logits, &npy("<f4", &[n, vocab], &logit_bytes))?;
                write(ids, &npy("<i8", &[n], &id_bytes))?;
                Ok(vec![
                    logits.display().to_string(),
                    ids.display().to_string(),
                ])
            }
        }
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    nsa_runtime::bundle::atomic_write(path, bytes).with_context(|| format!("{}", path.display()))
}

/// A NumPy 1.0 file: magic, header length, the header dict padded with spaces to a multiple
/// of 64 bytes (ending in a newline), the data.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned() {
        let f = npy("<f4", &[2, 3], &[0u8; 24]);
        assert_eq!(&f[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([f[8], f[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&f[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(f.len(), 10 + len + 24);
        assert!(npy("<i8", &[5], &[]).windows(6).any(|w| w == b"(5,), "));
    }
}
