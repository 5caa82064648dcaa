//! Model configuration, shared by training and inference (TOML or JSON through serde).
//!
//! Every config is checked by [`TransformerConfig::validate`] / [`NsaConfig::validate`] before a
//! module is built, so that a bad value is refused with a clear message instead of a panic deep
//! inside a tensor kernel.

use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A size that must be at least one is zero.
    #[error("`{0}` must be at least 1")]
    Zero(&'static str),
    /// `heads` is not a multiple of `kv_heads`.
    #[error("`heads` ({heads}) must be a multiple of `kv_heads` ({kv_heads})")]
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// The compression stride is larger than the compression block.
    #[error(
        "`compress_block_sliding_stride` ({stride}) must not exceed `compress_block_size` ({block})"
    )]
    StrideLargerThanBlock {
        /// Compression stride.
        stride: usize,
        /// Compression block size.
        block: usize,
    },
    /// The selection block is not a multiple of the compression stride.
    #[error(
        "`selection_block_size` ({selection}) must be a multiple of `compress_block_sliding_stride` ({stride})"
    )]
    SelectionNotMultipleOfStride {
        /// Selection block size.
        selection: usize,
        /// Compression stride.
        stride: usize,
    },
    /// The indexer's heads are narrower than the rotary part they carry, or odd.
    #[error(
        "`dsa.index_dim_head` ({width}) must be even and at least `dim_head` ({dim_head}): its first `dim_head` features carry the rotary embedding"
    )]
    IndexHeadTooNarrow {
        /// The indexer's head width.
        width: usize,
        /// The model's head width.
        dim_head: usize,
    },
    /// `dim_head` must be even for the rotary embedding.
    #[error("`dim_head` ({0}) must be even (rotary embeddings rotate pairs of features)")]
    OddHeadDim(usize),
    /// A real-valued option is out of range.
    #[error("`{name}` must be {expected}, got {value}")]
    OutOfRange {
        /// Option name.
        name: &'static str,
        /// What is allowed.
        expected: &'static str,
        /// The value given.
        value: f64,
    },
}

/// Which attention every layer of the transformer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Native sparse attention: compressed + selected + sliding-window branches.
    #[default]
    Nsa,
    /// Dense causal attention (the baseline).
    Full,
    /// DeepSeek sparse attention: a lightning indexer picks each query's top-k tokens, a
    /// sliding window and a learned gate mix in ([`crate::dsa`]).
    Dsa,
}

impl std::str::FromStr for AttentionKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "nsa" | "sparse" => Ok(Self::Nsa),
            "full" | "dense" => Ok(Self::Full),
            "dsa" => Ok(Self::Dsa),
            other => Err(format!(
                "unknown attention kind `{other}`: expected `nsa`, `dsa` or `full`"
            )),
        }
    }
}

impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Nsa => "nsa",
            Self::Full => "full",
            Self::Dsa => "dsa",
        })
    }
}

/// Options of one native sparse attention layer, named as in
/// `native_sparse_attention_pytorch.SparseAttention` (causal mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsaConfig {
    /// Model width.
    pub dim: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA); `None` means `heads`.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Sliding-window branch: each query sees itself and the `sliding_window_size` keys before it.
    pub sliding_window_size: usize,
    /// Tokens pooled into one compressed key/value.
    pub compress_block_size: usize,
    /// Distance between two compression blocks (`< compress_block_size` overlaps them).
    pub compress_block_sliding_stride: usize,
    /// Tokens per selectable block (a multiple of the stride).
    pub selection_block_size: usize,
    /// Blocks each query selects, besides its own block (0 disables selection).
    pub num_selected_blocks: usize,
    /// Learned memory key/values always visible to the compressed branch.
    #[serde(default = "one")]
    pub num_compressed_mem_kv: usize,
    /// Pre-RMSNorm on the layer input.
    #[serde(default = "yes")]
    pub norm: bool,
    /// Straight-through gating of the selected blocks by their importance (differentiable top-k).
    #[serde(default)]
    pub use_diff_topk: bool,
    /// All query heads of a GQA group select the same blocks (importance averaged over the group).
    #[serde(default = "yes")]
    pub query_heads_share_selected_kv: bool,
    /// Hidden width of the compression MLP as a multiple of `compress_block_size * dim_head`.
    #[serde(default = "one_f")]
    pub compress_mlp_expand_factor: f64,
}

fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn four_f() -> f64 {
    4.0
}

impl NsaConfig {
    /// A config with the reference's defaults for the optional settings.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        dim_head: usize,
        heads: usize,
        sliding_window_size: usize,
        compress_block_size: usize,
        compress_block_sliding_stride: usize,
        selection_block_size: usize,
        num_selected_blocks: usize,
    ) -> Self {
        Self {
            dim,
            dim_head,
            heads,
            kv_heads: None,
            sliding_window_size,
            compress_block_size,
            compress_block_sliding_stride,
            selection_block_size,
            num_selected_blocks,
            num_compressed_mem_kv: 1,
            norm: true,
            use_diff_topk: false,
            query_heads_share_selected_kv: true,
            compress_mlp_expand_factor: 1.0,
        }
    }

    /// Sets `kv_heads`.
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = Some(kv_heads);
        self
    }

    /// Key/value heads (defaults to `heads`).
    pub fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads()
    }

    /// The sizes the kernels and the shared rules take ([`crate::rules`]).
    pub fn sizes(&self) -> crate::rules::SparseSizes {
        crate::rules::SparseSizes {
            heads: self.heads,
            kv_heads: self.kv_heads(),
            dim_head: self.dim_head,
            compress_block: self.compress_block_size,
            stride: self.compress_block_sliding_stride,
            selection_block: self.selection_block_size,
            num_selected: self.num_selected_blocks,
            window: self.sliding_window_size,
            share_selection: self.query_heads_share_selected_kv,
            diff_topk: self.use_diff_topk,
        }
    }

    /// Hidden width of the compression MLP (`int(factor * block * dim_head)` as in the reference).
    pub fn compress_hidden(&self) -> usize {
        (self.compress_mlp_expand_factor * (self.compress_block_size * self.dim_head) as f64)
            as usize
    }

    /// Checks every constraint; the message names the offending option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("dim", self.dim),
            ("dim_head", self.dim_head),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads()),
            ("sliding_window_size", self.sliding_window_size),
            ("compress_block_size", self.compress_block_size),
            (
                "compress_block_sliding_stride",
                self.compress_block_sliding_stride,
            ),
            ("selection_block_size", self.selection_block_size),
            ("num_compressed_mem_kv", self.num_compressed_mem_kv),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        check_heads(self.heads, self.kv_heads(), self.dim_head)?;
        if self.compress_block_sliding_stride > self.compress_block_size {
            return Err(ConfigError::StrideLargerThanBlock {
                stride: self.compress_block_sliding_stride,
                block: self.compress_block_size,
            });
        }
        if !self
            .selection_block_size
            .is_multiple_of(self.compress_block_sliding_stride)
        {
            return Err(ConfigError::SelectionNotMultipleOfStride {
                selection: self.selection_block_size,
                stride: self.compress_block_sliding_stride,
            });
        }
        if !(self.compress_mlp_expand_factor.is_finite() && self.compress_mlp_expand_factor > 0.0)
            || self.compress_hidden() == 0
        {
            return Err(ConfigError::OutOfRange {
                name: "compress_mlp_expand_factor",
                expected: "positive and large enough for a hidden width of at least 1",
                value: self.compress_mlp_expand_factor,
            });
        }
        Ok(())
    }
}

fn check_heads(heads: usize, kv_heads: usize, dim_head: usize) -> Result<(), ConfigError> {
    if heads == 0 {
        return Err(ConfigError::Zero("heads"));
    }
    if kv_heads == 0 {
        return Err(ConfigError::Zero("kv_heads"));
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(ConfigError::HeadsNotDivisible { heads, kv_heads });
    }
    if !dim_head.is_multiple_of(2) {
        return Err(ConfigError::OddHeadDim(dim_head));
    }
    Ok(())
}

/// The sparse-attention settings of a [`TransformerConfig`] (its `dim`, `dim_head` and heads come
/// from the transformer), named as the reference's `sparse_attn_kwargs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseSettings {
    /// See [`NsaConfig::sliding_window_size`].
    pub sliding_window_size: usize,
    /// See [`NsaConfig::compress_block_size`].
    pub compress_block_size: usize,
    /// See [`NsaConfig::compress_block_sliding_stride`].
    pub compress_block_sliding_stride: usize,
    /// See [`NsaConfig::selection_block_size`].
    pub selection_block_size: usize,
    /// See [`NsaConfig::num_selected_blocks`].
    pub num_selected_blocks: usize,
    /// See [`NsaConfig::num_compressed_mem_kv`].
    #[serde(default = "one")]
    pub num_compressed_mem_kv: usize,
    /// See [`NsaConfig::use_diff_topk`].
    #[serde(default)]
    pub use_diff_topk: bool,
    /// See [`NsaConfig::query_heads_share_selected_kv`].
    #[serde(default = "yes")]
    pub query_heads_share_selected_kv: bool,
    /// See [`NsaConfig::compress_mlp_expand_factor`].
    #[serde(default = "one_f")]
    pub compress_mlp_expand_factor: f64,
}

impl Default for SparseSettings {
    /// The original recipe: window, compression block, stride and selection block 16, 4 blocks.
    fn default() -> Self {
        Self {
            sliding_window_size: 16,
            compress_block_size: 16,
            compress_block_sliding_stride: 16,
            selection_block_size: 16,
            num_selected_blocks: 4,
            num_compressed_mem_kv: 1,
            use_diff_topk: false,
            query_heads_share_selected_kv: true,
            compress_mlp_expand_factor: 1.0,
        }
    }
}

/// The DeepSeek-sparse-attention settings of a [`TransformerConfig`] (`[model.dsa]`; used when
/// `attention = "dsa"`), named after DeepSeek-V3.2-Exp's `index_n_heads`, `index_head_dim` and
/// `index_topk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsaSettings {
    /// Heads of the lightning indexer (each query's own weights mix them).
    #[serde(default = "index_heads_default")]
    pub index_heads: usize,
    /// Width of one indexer head; `None` means the model's `dim_head`. Its first `dim_head`
    /// features carry the rotary embedding, the rest none (DeepSeek's rope/nope split).
    #[serde(default)]
    pub index_dim_head: Option<usize>,
    /// Tokens each query attends to in the global branch (its own token always among them).
    #[serde(default = "top_k_default")]
    pub top_k: usize,
    /// Local branch: each query also sees itself and the `window` tokens before it, mixed with
    /// the global branch by a learned sigmoid gate per head; 0 = no local branch, no gate.
    #[serde(default = "window_default")]
    pub window: usize,
}

fn index_heads_default() -> usize {
    4
}
fn top_k_default() -> usize {
    2048
}
fn window_default() -> usize {
    64
}

impl Default for DsaSettings {
    /// 4 indexer heads of the model's head width, DeepSeek's top-k of 2,048 tokens, the seed
    /// article's local window of 64.
    fn default() -> Self {
        Self {
            index_heads: index_heads_default(),
            index_dim_head: None,
            top_k: top_k_default(),
            window: window_default(),
        }
    }
}

impl DsaSettings {
    /// The indexer's head width for a model of `dim_head`.
    pub fn index_dim_head(&self, dim_head: usize) -> usize {
        self.index_dim_head.unwrap_or(dim_head)
    }

    /// Checks every constraint for a model of `dim_head`.
    pub fn validate(&self, dim_head: usize) -> Result<(), ConfigError> {
        for (name, v) in [
            ("dsa.index_heads", self.index_heads),
            ("dsa.top_k", self.top_k),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let width = self.index_dim_head(dim_head);
        if width < dim_head || !width.is_multiple_of(2) {
            return Err(ConfigError::IndexHeadTooNarrow { width, dim_head });
        }
        Ok(())
    }
}

/// A decoder-only transformer LM (the reference's `transformer.py::Transformer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Vocabulary size.
    pub num_tokens: usize,
    /// Model width.
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Width of one head.
    #[serde(default = "dim_head_default")]
    pub dim_head: usize,
    /// Query heads.
    #[serde(default = "heads_default")]
    pub heads: usize,
    /// Key/value heads (GQA); `None` means `heads`.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Feed-forward hidden width as a multiple of `dim`.
    #[serde(default = "four_f")]
    pub ff_expansion_factor: f64,
    /// Attention of every layer.
    #[serde(default)]
    pub attention: AttentionKind,
    /// Sparse-attention settings (used when `attention = "nsa"`).
    #[serde(default)]
    pub sparse: SparseSettings,
    /// DeepSeek-sparse-attention settings (used when `attention = "dsa"`).
    #[serde(default)]
    pub dsa: DsaSettings,
    /// The context the model was trained for (tokens); `None` = not recorded. The model itself
    /// runs at any length; inference refuses prompts longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
}

fn dim_head_default() -> usize {
    64
}
fn heads_default() -> usize {
    8
}

impl TransformerConfig {
    /// A config with the reference's defaults and the original recipe's sparse settings.
    pub fn new(num_tokens: usize, dim: usize, depth: usize) -> Self {
        Self {
            num_tokens,
            dim,
            depth,
            dim_head: 64,
            heads: 8,
            kv_heads: None,
            ff_expansion_factor: 4.0,
            attention: AttentionKind::Nsa,
            sparse: SparseSettings::default(),
            dsa: DsaSettings::default(),
            max_seq_len: None,
        }
    }

    /// Key/value heads (defaults to `heads`).
    pub fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// Feed-forward hidden width (`int(dim * factor)` as in the reference).
    pub fn ff_hidden(&self) -> usize {
        (self.dim as f64 * self.ff_expansion_factor) as usize
    }

    /// The per-layer sparse attention config.
    pub fn nsa(&self) -> NsaConfig {
        let s = &self.sparse;
        NsaConfig {
            dim: self.dim,
            dim_head: self.dim_head,
            heads: self.heads,
            kv_heads: self.kv_heads,
            sliding_window_size: s.sliding_window_size,
            compress_block_size: s.compress_block_size,
            compress_block_sliding_stride: s.compress_block_sliding_stride,
            selection_block_size: s.selection_block_size,
            num_selected_blocks: s.num_selected_blocks,
            num_compressed_mem_kv: s.num_compressed_mem_kv,
            norm: true,
            use_diff_topk: s.use_diff_topk,
            query_heads_share_selected_kv: s.query_heads_share_selected_kv,
            compress_mlp_expand_factor: s.compress_mlp_expand_factor,
        }
    }

    /// Checks every constraint; the message names the offending option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("num_tokens", self.num_tokens),
            ("dim", self.dim),
            ("depth", self.depth),
            ("dim_head", self.dim_head),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        check_heads(self.heads, self.kv_heads(), self.dim_head)?;
        if !(self.ff_expansion_factor.is_finite() && self.ff_expansion_factor > 0.0)
            || self.ff_hidden() == 0
        {
            return Err(ConfigError::OutOfRange {
                name: "ff_expansion_factor",
                expected: "positive and large enough for a hidden width of at least 1",
                value: self.ff_expansion_factor,
            });
        }
        if self.max_seq_len == Some(0) {
            return Err(ConfigError::Zero("max_seq_len"));
        }
        match self.attention {
            AttentionKind::Nsa => self.nsa().validate()?,
            AttentionKind::Dsa => self.dsa.validate(self.dim_head)?,
            AttentionKind::Full => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> NsaConfig {
        NsaConfig::new(32, 8, 4, 8, 8, 4, 8, 2).with_kv_heads(2)
    }

    #[test]
    fn accepts_valid() {
        ok().validate().unwrap();
        TransformerConfig::new(100, 32, 2).validate().unwrap();
    }

    #[test]
    fn refuses_invalid() {
        let mut c = ok();
        c.kv_heads = Some(3);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HeadsNotDivisible { .. })
        ));
        let mut c = ok();
        c.compress_block_sliding_stride = 16;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::StrideLargerThanBlock { .. })
        ));
        let mut c = ok();
        c.selection_block_size = 6;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SelectionNotMultipleOfStride { .. })
        ));
        let mut c = ok();
        c.heads = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("heads")));
        let mut c = ok();
        c.dim_head = 7;
        assert_eq!(c.validate(), Err(ConfigError::OddHeadDim(7)));
        let mut c = ok();
        c.compress_mlp_expand_factor = f64::NAN;
        assert!(c.validate().is_err());
        let mut t = TransformerConfig::new(100, 32, 2);
        t.depth = 0;
        assert_eq!(t.validate(), Err(ConfigError::Zero("depth")));
        let mut t = TransformerConfig::new(100, 32, 2);
        t.attention = AttentionKind::Dsa;
        t.dim_head = 16;
        t.validate().unwrap();
        t.dsa.top_k = 0;
        assert_eq!(t.validate(), Err(ConfigError::Zero("dsa.top_k")));
        t.dsa.top_k = 8;
        t.dsa.index_dim_head = Some(8);
        assert!(matches!(
            t.validate(),
            Err(ConfigError::IndexHeadTooNarrow {
                width: 8,
                dim_head: 16
            })
        ));
        t.dsa.index_dim_head = Some(17);
        assert!(t.validate().is_err());
        t.dsa.index_dim_head = Some(24);
        t.validate().unwrap();
    }

    #[test]
    fn toml_round_trip_and_unknown_fields() {
        let t = TransformerConfig::new(100, 32, 2);
        let s = serde_json::to_string(&t).unwrap();
        let back: TransformerConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(t, back);
        let bad = s.replace("\"depth\"", "\"detph\"");
        assert!(serde_json::from_str::<TransformerConfig>(&bad).is_err());
        let bad_kind = s.replace("\"nsa\"", "\"sparse-ish\"");
        assert!(serde_json::from_str::<TransformerConfig>(&bad_kind).is_err());
    }
}
