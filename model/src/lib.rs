//! Native Sparse Attention (NSA, DeepSeek, arXiv 2502.11089) for Burn, generic over any backend,
//! and a decoder-only transformer LM built on it.
//!
//! Numerically equal to `native-sparse-attention-pytorch==0.2.3` (`SparseAttention`,
//! `causal=True`, and its `transformer.py`); see the crate's parity tests.
//!
//! One file per concern: [`compress`], [`select`] and [`sliding`] are the three branches,
//! [`gates`] mixes them, [`attend`] is the one attention core they share, [`nsa`] is the layer,
//! [`full`] the dense baseline, [`dsa`] DeepSeek sparse attention (lightning indexer + top-k
//! tokens) and [`transformer`] the LM.

pub mod attend;
pub mod cache;
pub mod compare;
pub mod compress;
pub mod config;
pub mod dsa;
pub mod full;
pub mod gates;
pub mod generate;
pub mod head_loss;
pub mod inspect;
pub mod interop;
pub mod memory;
pub mod norm;
pub mod nsa;
pub mod prefill;
pub mod recompute;
pub mod rope;
pub mod sampling;
pub mod select;
pub mod sliding;
pub mod tensor_util;
pub mod transformer;

/// The fused kernels and the interface the model calls them through (the `nsa-kernels` crate).
pub use nsa_kernels as kernels;
/// The NSA rules every implementation shares.
pub use nsa_kernels::rules;

pub use cache::Cache;
pub use compare::{CompareError, Comparison};
pub use config::{
    AttentionKind, ConfigError, DsaSettings, NsaConfig, SparseSettings, TransformerConfig,
};
pub use dsa::{DsaAttention, DsaStage, DsaTraining};
pub use full::FullAttention;
pub use generate::{GenerateError, Generated};
pub use inspect::LayerSelection;
pub use nsa::SparseAttention;
pub use sampling::{Repetition, Sampling, SamplingError, SplitMix64, TopK};
pub use transformer::{cross_entropy, Attention, Transformer};
