//! The sparse stage through the fused kernels, without any `[n, m]` attention scores: the
//! selection ranked on the device in chunks of queries, then the global branch as NSA's
//! selected attention with blocks of one token (the query's own token is the own block, the
//! `top_k - 1` others it keeps are the selected blocks) and the local branch as NSA's sliding
//! window (DSA's window `p - window ..= p` is the same rule, [`crate::kernels::rules::in_window`]).
//! Attention work and memory grow with `n · top_k`, not `n · m`; the indexer's cheap scores
//! still cover every earlier token (at most `limit` of them at once).
//!
//! The fused kernels pair a kv head with consecutive query heads; the dense layer pairs head
//! `i` with kv head `i mod kvh`: the queries are reordered into the kernels' order and back.
//!
//! Dimensions: `b` batch, `n` queries, `m` keys, `h` query heads, `kvh` key/value heads,
//! `g = h / kvh`, `d` head width, `j` indexer heads, `s = top_k - 1` selected others.

use burn::prelude::*;

/// The most values one chunk of queries of the fused path holds (indexer products `[b, j, c,
/// m]`, gathered keys of the indexer loss): 2^26, 256 MiB of f32. Larger than the tensor ops'
/// [`super::SCORE_LIMIT`] (the chunks hold no attention scores): at 64k tokens and 4 indexer
/// heads a chunk is 256 queries, 256 chunks of a few launches each.
pub const SPARSE_LIMIT: usize = 1 << 26;

use super::{kl, ungroup, DsaAttention, Keys, Rows};
use crate::kernels::rules::SparseSizes;
use crate::kernels::{Kernels, Selection};

/// `gate · local + (1 − gate) · global` of `rows` over `keys` `[b, kvh, m, d]` (sparse stage)
/// → `[b, h, n, d]` and, with `indexer_loss`, the indexer's loss over the selected tokens
/// ([`selected_kl`]); `None` where the kernels do not take the case (the caller's tensor ops
/// then do). `limit`: the most values one chunk of queries holds (indexer products `[b, j, c,
/// m]`, gathered keys).
pub(super) fn attend<B: Backend>(
    layer: &DsaAttention<B>,
    kernels: &Kernels<B>,
    rows: &Rows<B>,
    keys: &Keys<B>,
    limit: usize,
    indexer_loss: bool,
) -> Option<(Tensor<B, 4>, Option<Tensor<B, 1>>)> {
    let fused = kernels.fused()?;
    if layer.top_k < 2 {
        return None;
    }
    let [b, h, n, d] = rows.q.dims();
    let [_, kvh, m, _] = keys.k.dims();
    let j = layer.indexer.heads;
    // 1. the others each query keeps, [b, n, s], ranked in chunks of queries
    let chunk = (limit / (b * j * m).max(1)).clamp(1, n.max(1));
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let seen = (rows.offset + start + c).min(m);
        let part = rows.narrow(start, c);
        let index = keys.index.clone().narrow(1, 0, seen);
        let scores = layer.indexer.scores(kernels, &part.queries, index);
        parts.push(fused.token_others(&scores, part.offset, layer.top_k)?);
    }
    let others = Tensor::cat(parts, 1);
    let s = others.dims()[2];
    let loss = indexer_loss.then(|| selected_kl(kernels, rows, keys, others.clone(), limit));
    // 2. one selection for every head (a selection head of 1: the kernels' shared case)
    let indices = others.reshape([b, 1, n, s]);
    let selection = Selection {
        valid: indices.clone().greater_equal_elem(0),
        indices: indices.clamp_min(0),
        // not read: no gating (diff_topk off)
        scores: Tensor::<B, 4>::zeros([1, 1, 1, 1], &rows.q.device()).expand([b, 1, n, s]),
    };
    let sizes = SparseSizes {
        heads: h,
        kv_heads: kvh,
        dim_head: d,
        compress_block: 1,
        stride: 1,
        selection_block: 1,
        num_selected: s,
        window: layer.window,
        share_selection: true,
        diff_topk: false,
    };
    // 3. both branches in the kernels' head order
    let q = layer.group(rows.q.clone(), kvh).reshape([b, h, n, d]);
    let (k, v) = (&keys.k, &keys.v);
    let scale = (d as f64).powf(-0.5);
    let back = |x: Tensor<B, 4>| ungroup(x.reshape([b, kvh, h / kvh, n, d]));
    let global =
        fused.selected_attention(&q, k, v, Some(&selection), rows.offset, &sizes, scale)?;
    let local = match layer.to_gate {
        Some(_) => {
            let window = layer.window;
            Some(back(fused.sliding_attention(
                &q,
                k,
                v,
                rows.offset,
                window,
                scale,
            )?))
        }
        None => None,
    };
    Some((layer.mix(kernels, &rows.xn, local, back(global)), loss))
}

/// The indexer's loss of the sparse stage ([`kl::indexer_kl`]) over each query's selected
/// tokens only: its own and `others` `[b, n, s]` (`-1`: none), gathered in chunks of queries
/// (at most `limit` gathered values), the attention probabilities recomputed over them (the
/// global branch's, exactly: the same keys and scale) → `[1]`, mean over the queries.
fn selected_kl<B: Backend>(
    kernels: &Kernels<B>,
    rows: &Rows<B>,
    keys: &Keys<B>,
    others: Tensor<B, 3, Int>,
    limit: usize,
) -> Tensor<B, 1> {
    let [b, h, n, d] = rows.q.dims();
    let [_, kvh, m, _] = keys.k.dims();
    let [_, j, _, e] = rows.queries.q.dims();
    let s = others.dims()[2] + 1;
    let g = h / kvh;
    let device = rows.q.device();
    // every token's keys of all kv heads in one row, and its indexer key: [b * m, ..]
    let k = keys
        .k
        .clone()
        .detach()
        .swap_dims(1, 2)
        .reshape([b * m, kvh * d]);
    let index = keys.index.clone().reshape([b * m, e]);
    let per_query = s * (kvh * d + e + h + j);
    let chunk = (limit / (b * per_query).max(1)).clamp(1, n.max(1));
    let mut losses = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let part = rows.narrow(start, c);
        // 1. the selected positions, the own one last: [b, c, s]; rows of the flat keys
        let own: Vec<i64> = (0..b)
            .flat_map(|_| (0..c).map(move |i| (part.offset + i) as i64))
            .collect();
        let own = crate::tensor_util::int_tensor::<B, 3>(own, [b, c, 1], &device);
        let positions = Tensor::cat(vec![others.clone().narrow(1, start, c), own], 2);
        let blocked = positions.clone().lower_elem(0);
        let batch: Vec<i64> = (0..b as i64).map(|i| i * m as i64).collect();
        let batch = crate::tensor_util::int_tensor::<B, 3>(batch, [b, 1, 1], &device);
        let flat = (positions.clamp_min(0) + batch).reshape([b * c * s]);
        // 2. the global branch's probabilities over them: [b, kvh, g, c, s]
        let gk = k
            .clone()
            .select(0, flat.clone())
            .reshape([b, c, s, kvh, d])
            .permute([0, 1, 3, 4, 2]);
        let q = part
            .q
            .detach()
            .reshape([b, g, kvh, c, d])
            .permute([0, 3, 2, 1, 4]);
        let scale = (d as f64).powf(-0.5);
        let mask = blocked
            .clone()
            .reshape([b, c, 1, 1, s])
            .expand([b, c, kvh, g, s]);
        let scores = crate::tensor_util::matmul(kernels, q, gk)
            .mul_scalar(scale)
            .mask_fill(mask, crate::attend::MASK_VALUE);
        let probs = burn::tensor::activation::softmax(scores, 4).permute([0, 2, 3, 1, 4]);
        // 3. the indexer's scores of the same tokens: [b, c, s]
        let ik = index
            .clone()
            .select(0, flat)
            .reshape([b, c, s, e])
            .swap_dims(2, 3);
        let iq = part.queries.q.clone().swap_dims(1, 2);
        let dots = crate::tensor_util::matmul(kernels, iq, ik);
        let w = part.queries.weights.clone().unsqueeze_dim::<4>(3);
        let scores = (burn::tensor::activation::relu(dots) * w)
            .sum_dim(2)
            .reshape([b, c, s]);
        let loss = kl::indexer_kl(probs, scores, blocked);
        losses.push(loss.mul_scalar(c as f64 / n as f64));
    }
    Tensor::cat(losses, 0).sum()
}
