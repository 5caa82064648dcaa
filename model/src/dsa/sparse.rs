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

use super::{ungroup, DsaAttention, Keys, Rows};
use crate::kernels::rules::SparseSizes;
use crate::kernels::{Kernels, Selection};

/// `gate · local + (1 − gate) · global` of `rows` over `keys` `[b, kvh, m, d]` (sparse stage)
/// → `[b, h, n, d]`, or `None` where the kernels do not take the case (the caller's tensor ops
/// then do). `limit`: the most indexer products `[b, j, c, m]` of one chunk of queries.
pub(super) fn attend<B: Backend>(
    layer: &DsaAttention<B>,
    kernels: &Kernels<B>,
    rows: &Rows<B>,
    keys: &Keys<B>,
    limit: usize,
) -> Option<Tensor<B, 4>> {
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
    // 2. the selection of every kv head (one for all heads of the token)
    let indices = others.reshape([b, 1, n, s]).expand([b, kvh, n, s]);
    let selection = Selection {
        valid: indices.clone().greater_equal_elem(0),
        indices: indices.clamp_min(0),
        // not read: no gating (diff_topk off)
        scores: Tensor::<B, 4>::zeros([1, 1, 1, 1], &rows.q.device()).expand([b, kvh, n, s]),
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
    Some(layer.mix(kernels, &rows.xn, local, back(global)))
}
