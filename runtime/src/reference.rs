//! Files of the PyTorch reference (`native_sparse_attention_pytorch.transformer.Transformer`,
//! v0.2.3), in one place for `nsa-infer import`/`export` and for the model directory (whose
//! weights use the reference's names): its constructor arguments as JSON ([`ReferenceArgs`],
//! `args.json`), and its `state_dict` as `.pt` or safetensors ([`read_state_dict`],
//! [`write_weights`]). The tensor-level conversion (names, layouts) is
//! `nsa_model::interop`.
//!
//! ```text
//! import:  state_dict (.pt | .safetensors) + args.json + tokenizer  →  model directory
//! export:  model directory  →  model.safetensors + args.json (load_state_dict-ready)
//! ```

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use nsa_model::interop::{HostTensor, StateDict};
use nsa_model::{
    AttentionKind, ConfigError, DsaSettings, SparseSettings, Transformer, TransformerConfig,
};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::bundle::{atomic_write, io, BundleError, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::tokenizer::Tokenizer;

/// The reference's constructor arguments file that `export` writes and `import` looks for
/// beside the weights.
pub const ARGS_FILE: &str = "args.json";

/// Why reference constructor arguments could not be read or converted.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not the reference's arguments.
    #[error("{path}: not valid reference Transformer arguments: {source}")]
    Args {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// `causal = false`.
    #[error("causal = false is not supported: only causal language models can be imported")]
    NotCausal,
    /// `use_sparse_attn` without its settings.
    #[error("use_sparse_attn = true needs sparse_attn_kwargs")]
    MissingSparseKwargs,
    /// Both `use_sparse_attn` and `dsa_kwargs`.
    #[error("use_sparse_attn = true and dsa_kwargs are two attention kinds: give one")]
    TwoKinds,
    /// `sparse_attn_kwargs.norm = false`.
    #[error("sparse_attn_kwargs.norm = false is not supported by the transformer import")]
    NoNorm,
    /// The arguments give an invalid config.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// `sparse_attn_kwargs` of the reference `Transformer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseKwargs {
    /// Sliding window.
    pub sliding_window_size: usize,
    /// Compression block.
    pub compress_block_size: usize,
    /// Compression stride.
    pub compress_block_sliding_stride: usize,
    /// Selection block.
    pub selection_block_size: usize,
    /// Selected blocks.
    pub num_selected_blocks: usize,
    /// Memory slots.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub num_compressed_mem_kv: usize,
    /// Straight-through gating.
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_diff_topk: bool,
    /// Group-shared selection.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub query_heads_share_selected_kv: bool,
    /// Compression MLP width factor.
    #[serde(default = "one_f", skip_serializing_if = "is_one_f")]
    pub compress_mlp_expand_factor: f64,
    /// Pre-norm (the transformer always uses it).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub norm: bool,
    /// Accepted for compatibility; kernels do not change the numbers.
    #[serde(default, skip_serializing)]
    pub use_triton_kernel: bool,
}

fn one() -> usize {
    1
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn one_f() -> f64 {
    1.0
}
fn is_one_f(v: &f64) -> bool {
    *v == 1.0
}
fn yes() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn dim_head() -> usize {
    64
}
fn heads() -> usize {
    8
}
fn four() -> f64 {
    4.0
}

/// Constructor arguments of the reference `Transformer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceArgs {
    /// Vocabulary.
    pub num_tokens: usize,
    /// Width.
    pub dim: usize,
    /// Layers.
    pub depth: usize,
    /// Head width.
    #[serde(default = "dim_head")]
    pub dim_head: usize,
    /// Query heads.
    #[serde(default = "heads")]
    pub heads: usize,
    /// Key/value heads.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Feed-forward factor.
    #[serde(default = "four")]
    pub ff_expansion_factor: f64,
    /// Sparse (NSA) or full attention.
    #[serde(default)]
    pub use_sparse_attn: bool,
    /// Must be true: only causal language models are supported.
    #[serde(default = "yes")]
    pub causal: bool,
    /// Accepted for compatibility (flex attention gives the same numbers).
    #[serde(default, skip_serializing)]
    pub use_flex_sliding_window: bool,
    /// Accepted for compatibility.
    #[serde(default, skip_serializing)]
    pub use_flex_fine_selection: bool,
    /// Accepted for compatibility.
    #[serde(default, skip_serializing)]
    pub use_triton_fine_selection: bool,
    /// Sparse settings (required when `use_sparse_attn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_attn_kwargs: Option<SparseKwargs>,
    /// DSA layers (ours, not the reference's: `scripts/dsa_reference.py` builds that model from
    /// the other arguments and these settings, `index_heads`, `index_dim_head`, `top_k`,
    /// `window`); with `use_sparse_attn = false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsa_kwargs: Option<DsaSettings>,
}

impl ReferenceArgs {
    /// Our config for these arguments.
    pub fn to_config(&self) -> Result<TransformerConfig, ReferenceError> {
        if !self.causal {
            return Err(ReferenceError::NotCausal);
        }
        let mut c = TransformerConfig::new(self.num_tokens, self.dim, self.depth);
        c.dim_head = self.dim_head;
        c.heads = self.heads;
        c.kv_heads = self.kv_heads;
        c.ff_expansion_factor = self.ff_expansion_factor;
        if let Some(dsa) = &self.dsa_kwargs {
            if self.use_sparse_attn {
                return Err(ReferenceError::TwoKinds);
            }
            c.attention = AttentionKind::Dsa;
            c.dsa = dsa.clone();
        } else if self.use_sparse_attn {
            let k = self
                .sparse_attn_kwargs
                .as_ref()
                .ok_or(ReferenceError::MissingSparseKwargs)?;
            if !k.norm {
                return Err(ReferenceError::NoNorm);
            }
            c.attention = AttentionKind::Nsa;
            c.sparse = SparseSettings {
                sliding_window_size: k.sliding_window_size,
                compress_block_size: k.compress_block_size,
                compress_block_sliding_stride: k.compress_block_sliding_stride,
                selection_block_size: k.selection_block_size,
                num_selected_blocks: k.num_selected_blocks,
                num_compressed_mem_kv: k.num_compressed_mem_kv,
                use_diff_topk: k.use_diff_topk,
                query_heads_share_selected_kv: k.query_heads_share_selected_kv,
                compress_mlp_expand_factor: k.compress_mlp_expand_factor,
            };
        } else {
            c.attention = AttentionKind::Full;
        }
        c.validate()?;
        Ok(c)
    }

    /// The reference arguments for our config.
    pub fn from_config(c: &TransformerConfig) -> Self {
        let s = &c.sparse;
        Self {
            num_tokens: c.num_tokens,
            dim: c.dim,
            depth: c.depth,
            dim_head: c.dim_head,
            heads: c.heads,
            kv_heads: c.kv_heads,
            ff_expansion_factor: c.ff_expansion_factor,
            use_sparse_attn: c.attention == AttentionKind::Nsa,
            causal: true,
            use_flex_sliding_window: false,
            use_flex_fine_selection: false,
            use_triton_fine_selection: false,
            sparse_attn_kwargs: (c.attention == AttentionKind::Nsa).then_some(SparseKwargs {
                sliding_window_size: s.sliding_window_size,
                compress_block_size: s.compress_block_size,
                compress_block_sliding_stride: s.compress_block_sliding_stride,
                selection_block_size: s.selection_block_size,
                num_selected_blocks: s.num_selected_blocks,
                num_compressed_mem_kv: s.num_compressed_mem_kv,
                use_diff_topk: s.use_diff_topk,
                query_heads_share_selected_kv: s.query_heads_share_selected_kv,
                compress_mlp_expand_factor: s.compress_mlp_expand_factor,
                norm: true,
                use_triton_kernel: false,
            }),
            dsa_kwargs: (c.attention == AttentionKind::Dsa).then(|| c.dsa.clone()),
        }
    }

    /// Reads the arguments from a JSON file.
    pub fn read(path: &Path) -> Result<Self, ReferenceError> {
        let text = fs::read_to_string(path).map_err(|source| ReferenceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ReferenceError::Args {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The arguments as pretty-printed JSON (the contents of [`ARGS_FILE`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the arguments serialise")
    }
}

/// Serialises a state dict as safetensors (f32) with `metadata`.
pub fn state_dict_bytes(
    dict: &StateDict,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = dict
        .iter()
        .map(|(k, t)| {
            let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), bytes, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                    .expect("sizes match"),
            )
        })
        .collect();
    safetensors::serialize(views, metadata)
}

/// Reads a weights file: safetensors (any float dtype, converted to f32) or a PyTorch `.pt` /
/// `.pth` / `.bin` checkpoint (a `state_dict`, possibly under a `state_dict` / `model` key).
pub fn read_state_dict(path: &Path) -> Result<StateDict, BundleError> {
    let bad = |reason: String| BundleError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(io(path))?;
    if bytes.starts_with(b"PK\x03\x04")
        || path
            .extension()
            .is_some_and(|e| e == "pt" || e == "pth" || e == "bin")
    {
        return read_pytorch(path).map_err(bad);
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut dict = StateDict::new();
    for (name, view) in st.tensors() {
        let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                view.dtype()
            ))
        })?;
        dict.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(dict)
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| burn::tensor::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| burn::tensor::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn read_pytorch(path: &Path) -> Result<StateDict, String> {
    use burn_store::pytorch::PytorchReader;
    let reader = PytorchReader::new(path)
        .or_else(|_| PytorchReader::with_top_level_key(path, "state_dict"))
        .or_else(|_| PytorchReader::with_top_level_key(path, "model"))
        .map_err(|e| e.to_string())?;
    let mut dict = StateDict::new();
    for (name, snapshot) in reader.into_tensors() {
        let data = snapshot
            .to_data()
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let shape = data.shape.to_vec();
        let values = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| format!("tensor `{name}`: {e:?}"))?;
        dict.insert(name, HostTensor { shape, values });
    }
    Ok(dict)
}

/// The model config an exported weights file records in its safetensors metadata
/// (`nsa_config`, written by [`write_weights`]); `None` for other files.
pub fn recorded_config(path: &Path) -> Result<Option<TransformerConfig>, BundleError> {
    if path.extension().is_none_or(|e| e != "safetensors") {
        return Ok(None);
    }
    let bytes = fs::read(path).map_err(io(path))?;
    let Ok((_, meta)) = SafeTensors::read_metadata(&bytes) else {
        return Ok(None);
    };
    Ok(meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("nsa_config"))
        .and_then(|json| serde_json::from_str(json).ok()))
}

/// Writes the weights of `model` as safetensors in the reference's naming (atomically).
pub fn write_weights<B: Backend>(path: &Path, model: &Transformer<B>) -> Result<(), BundleError> {
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "nsa_config".to_string(),
            serde_json::to_string(&model.config).expect("config"),
        ),
    ]);
    let bytes = state_dict_bytes(&model.reference_state(), Some(metadata)).map_err(|e| {
        BundleError::Weights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    atomic_write(path, &bytes).map_err(io(path))
}

/// The files [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The state_dict as safetensors ([`WEIGHTS_FILE`]).
    pub weights: PathBuf,
    /// The constructor arguments ([`ARGS_FILE`]).
    pub args: PathBuf,
    /// The tokenizer ([`TOKENIZER_FILE`]).
    pub tokenizer: PathBuf,
}

/// Writes `model` for the reference into the existing directory `out`: its `state_dict`
/// ([`write_weights`]), its constructor arguments and `tokenizer`, each atomically. In Python:
/// `Transformer(**json.load(open(args))).load_state_dict(safetensors.torch.load_file(weights))`.
pub fn export<B: Backend>(
    out: &Path,
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
) -> Result<Exported, BundleError> {
    let files = Exported {
        weights: out.join(WEIGHTS_FILE),
        args: out.join(ARGS_FILE),
        tokenizer: out.join(TOKENIZER_FILE),
    };
    write_weights(&files.weights, model)?;
    let args = ReferenceArgs::from_config(&model.config).to_json();
    atomic_write(&files.args, args.as_bytes()).map_err(io(&files.args))?;
    atomic_write(&files.tokenizer, tokenizer.to_json().as_bytes()).map_err(io(&files.tokenizer))?;
    Ok(files)
}
