//! The indexer's loss (DeepSeek-V3.2-Exp): the KL divergence of the indexer's distribution
//! `softmax_s I(t, s)` from the attention's, `p(t, s)` = the attention probabilities summed
//! over the heads and L1-normalised, over the keys the global branch sees (every earlier token
//! in the dense warm-up, the selected ones in sparse training). The attention is a fixed
//! target (detached), and the indexer reads the layer's input detached, so the loss trains the
//! indexer alone and the language-model loss everything else.
//!
//! Dimensions: `b` batch, `kvh` key/value heads, `g` queries per kv head, `n` queries, `m`
//! keys.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::attend::MASK_VALUE;

/// `KL(p ‖ softmax(I))` per query, mean over the batch and queries → `[1]`.
///
/// - `probs`: the global branch's attention probabilities `[b, kvh, g, n, m]`;
/// - `scores`: the indexer's `I` `[b, n, m]`;
/// - `blocked`: the keys the global branch does not see, `[b, n, m]`.
pub fn indexer_kl<B: Backend>(
    probs: Tensor<B, 5>,
    scores: Tensor<B, 3>,
    blocked: Tensor<B, 3, Bool>,
) -> Tensor<B, 1> {
    let [b, kvh, g, n, m] = probs.dims();
    // 1. the target: attention probabilities, mean over the heads (blocked keys exactly 0)
    let p = probs
        .detach()
        .sum_dim(1)
        .sum_dim(2)
        .reshape([b, n, m])
        .div_scalar((kvh * g) as f64);
    // 2. the indexer's log-probabilities over the same keys
    let log_q = log_softmax(scores.mask_fill(blocked.clone(), MASK_VALUE), 2);
    // 3. Σ_s p (log p − log q) over the keys seen (p is 0 elsewhere; in f16 the mask value is
    // −inf and 0 · ∞ would be NaN: those terms are zeroed, and the clamp keeps log p finite)
    let log_p = p.clone().clamp_min(1e-30).log();
    (p * (log_p - log_q))
        .mask_fill(blocked, 0.0)
        .sum_dim(2)
        .mean()
        .reshape([1])
}
