//! Checkpoints of the PyTorch reference (`native_sparse_attention_pytorch.transformer.Transformer`,
//! v0.2.3): its constructor arguments as JSON, and its `state_dict` as `.pt` or safetensors.
//!
//! ```text
//! import:  state_dict (.pt | .safetensors) + args.json + tokenizer  →  model directory
//! export:  model directory  →  model.safetensors + args.json (load_state_dict-ready)
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use nsa_model::{AttentionKind, SparseSettings, TransformerConfig};
use serde::{Deserialize, Serialize};

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
}

impl ReferenceArgs {
    /// Our config for these arguments.
    pub fn to_config(&self) -> Result<TransformerConfig> {
        if !self.causal {
            bail!("causal = false is not supported: only causal language models can be imported");
        }
        let mut c = TransformerConfig::new(self.num_tokens, self.dim, self.depth);
        c.dim_head = self.dim_head;
        c.heads = self.heads;
        c.kv_heads = self.kv_heads;
        c.ff_expansion_factor = self.ff_expansion_factor;
        if self.use_sparse_attn {
            let k = self
                .sparse_attn_kwargs
                .as_ref()
                .context("use_sparse_attn = true needs sparse_attn_kwargs")?;
            if !k.norm {
                bail!("sparse_attn_kwargs.norm = false is not supported by the transformer import");
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
        }
    }

    /// Reads the arguments from a JSON file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not valid reference Transformer arguments",
                path.display()
            )
        })
    }
}
