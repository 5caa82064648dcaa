//! The one attention core every branch shares: masked, scaled softmax attention over explicit
//! key sets. Branches differ only in which keys each query sees; they express that by shaping
//! `q`, `k`, `v` and the mask, then call [`attend`]. A fused GPU kernel can replace a branch
//! without touching this file.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::kernels::Kernels;
use crate::tensor_util::matmul;

/// Fill value for blocked logits: the reference's `-finfo.max / 10` (finite, so a mean over
/// blocked logits stays finite, and `f16` saturates to `-inf`, which softmax also handles).
pub const MASK_VALUE: f32 = f32::MIN / 10.0;

/// Output of [`attend`].
pub struct Attended<B: Backend> {
    /// `[b, a, x, i, d]`
    pub out: Tensor<B, 5>,
    /// Scaled logits after masking, `[b, a, x, i, j]` (for importance scores).
    pub sim: Tensor<B, 5>,
    /// The attention probabilities, softmax of `sim` (DSA's indexer loss reads them).
    pub probs: Tensor<B, 5>,
}

/// Scaled dot-product attention with five dimensions: two batch-like (`b`, `a`: usually batch
/// and kv head), a group `x` (queries of one group share one key set), `i` query rows, `j` keys.
///
/// - `q`: `[b, a, x, i, d]`
/// - `k`, `v`: `[b', a', x', j, d]` broadcastable to `q`'s leading dims
/// - `blocked`: optional mask broadcastable to `[b, a, x, i, j]`, `true` = may not attend.
///   Every row must keep at least one key.
pub fn attend<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 5>,
    k: Tensor<B, 5>,
    v: Tensor<B, 5>,
    blocked: Option<Tensor<B, 5, Bool>>,
    scale: f64,
) -> Attended<B> {
    let mut sim = matmul(kernels, q, k.swap_dims(3, 4)).mul_scalar(scale);
    if let Some(mask) = blocked {
        let shape = sim.shape();
        sim = sim.mask_fill(mask.expand(shape), MASK_VALUE);
    }
    let probs = softmax(sim.clone(), 4);
    Attended {
        out: matmul(kernels, probs.clone(), v),
        sim,
        probs,
    }
}
