//! Branch 2, selected attention (NSA paper §3.3.2).
//!
//! The compressed branch's logits rank the key blocks of `selection_block_size` tokens: logits
//! of the compression blocks that make up a selection block are averaged (when the stride is
//! smaller than the selection block), the query's own block is excluded, the scores go through a
//! softmax that includes a constant `-1000` slot (as in the reference), and the top
//! `num_selected_blocks` blocks are picked. Each query then attends, with rotated keys, to its
//! selected blocks plus the causal part of its own block. Blocks whose probability is ≤ 1e-10
//! (i.e. not yet visible) are masked out. With `query_heads_share_selected_kv` the importance is
//! averaged over the query heads of a GQA group so the group loads one set of blocks.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::attend::attend;
use crate::cache::KvBuffer;
use crate::config::NsaConfig;
use crate::tensor_util::{equal_mask, greater_mask, int_tensor, pad_zeros, round_up};

/// The blocks chosen for each query.
pub struct Selection<B: Backend> {
    /// Selected block indices `[batch, sel_heads, seq, n]`.
    pub indices: Tensor<B, 4, Int>,
    /// Their probabilities `[batch, sel_heads, seq, n]` (straight-through gates with diff-topk).
    pub scores: Tensor<B, 4>,
    /// Whether each selected block may be attended (`score > 1e-10`).
    pub valid: Tensor<B, 4, Bool>,
}

/// Block importance as probabilities over complete selection blocks,
/// `[batch, sel_heads, seq, fine_blocks]`, from the compressed logits
/// `[batch, heads, seq, compress_blocks]` of queries at positions `offset..offset + seq`.
/// `None` when no selection block can be selected.
pub fn importance<B: Backend>(
    logits: Tensor<B, 4>,
    config: &NsaConfig,
    offset: usize,
) -> Option<Tensor<B, 4>> {
    let [b, h, n, blocks] = logits.dims();
    let g = config.group_size();
    let mut scores = if config.query_heads_share_selected_kv && g > 1 {
        logits
            .reshape([b, h / g, g, n, blocks])
            .mean_dim(2)
            .reshape([b, h / g, n, blocks])
    } else {
        logits
    };
    let hs = scores.dims()[1];
    let per_fine = config.selection_block_size / config.compress_block_sliding_stride;
    let mut fine = blocks;
    if per_fine > 1 {
        fine = blocks / per_fine;
        if fine == 0 {
            return None;
        }
        scores = scores
            .narrow(3, 0, fine * per_fine)
            .reshape([b, hs, n, fine, per_fine])
            .mean_dim(4)
            .reshape([b, hs, n, fine]);
        // the query's own selection block is handled by the causal part of the fine branch
        // (when decoding, complete blocks all lie before the query's own block: nothing to mask)
        let sel = config.selection_block_size;
        if offset / sel < fine {
            let rows = (0..n).map(|i| ((offset + i) / sel) as i64).collect();
            let own = equal_mask::<B>(rows, (0..fine as i64).collect(), &scores.device())
                .reshape([1, 1, n, fine]);
            scores = scores.mask_fill(own.expand([b, hs, n, fine]), f32::MIN);
        }
    }
    let device = scores.device();
    let sink = Tensor::<B, 4>::full([b, hs, n, 1], -1e3, &device);
    let probs = softmax(Tensor::cat(vec![sink, scores], 3), 3).narrow(3, 1, fine);
    Some(probs)
}

/// Picks the top blocks from [`importance`] probabilities.
pub fn select_top<B: Backend>(probs: Tensor<B, 4>, config: &NsaConfig) -> Option<Selection<B>> {
    let fine = probs.dims()[3];
    let n = config.num_selected_blocks.min(fine);
    if n == 0 {
        return None;
    }
    // on GPUs a kernel: Burn's default top-k sorts on the host (a device sync per layer and
    // decode step); the kernel has no backward, so tracked (training) tensors keep Burn's
    let fused = crate::kernels::get::<B>().and_then(|k| k.top_k(&probs, n));
    let (values, indices) = fused.unwrap_or_else(|| probs.topk_with_indices(n, 3));
    let valid = values.clone().greater_elem(1e-10);
    let scores = if config.use_diff_topk {
        // straight-through: forward value 1, gradient of the probability
        values.clone() + (values.ones_like() - values).detach()
    } else {
        values
    };
    Some(Selection {
        indices,
        scores,
        valid,
    })
}

/// Fine attention of rotated `q` `[batch, heads, seq, dim_head]` over rotated `k` and `v`
/// `[batch, kv_heads, seq, dim_head]` (queries and keys at the same positions `0..seq`):
/// each query sees its selected blocks and the causal part of its own block.
/// Returns `[batch, heads, seq, dim_head]`.
pub fn fine_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    selection: Option<Selection<B>>,
    config: &NsaConfig,
    scale: f64,
) -> Tensor<B, 4> {
    if let Some(kernels) = crate::kernels::get::<B>() {
        let fused = kernels.selected_attention(&q, &k, &v, selection.as_ref(), config, scale);
        if let Some(out) = fused {
            return out;
        }
    }
    let [b, h, n, d] = q.dims();
    let kvh = k.dims()[1];
    let g = h / kvh;
    let sel = config.selection_block_size;
    let padded = round_up(n, sel);
    let nb = padded / sel;
    let device = q.device();
    let (q, k, v) = (
        pad_zeros(q, 2, 0, padded - n),
        pad_zeros(k, 2, 0, padded - n),
        pad_zeros(v, 2, 0, padded - n),
    );
    let share = config.query_heads_share_selected_kv;
    let hs = if share { kvh } else { h };
    let gq = h / hs;

    // own block: index i / sel, causal inside the block
    let own_idx: Vec<i64> = (0..padded).map(|i| (i / sel) as i64).collect();
    let own_idx =
        int_tensor::<B, 4>(own_idx, [1, 1, padded, 1], &device).expand([b, hs, padded, 1]);
    let rows = (0..padded).map(|i| (i % sel) as i64).collect();
    let own_blocked = greater_mask::<B>(rows, (0..sel as i64).collect(), &device)
        .reshape([1, 1, padded, sel])
        .expand([b, hs, padded, sel]);

    let (indices, blocked, gates) = match selection {
        Some(s) => {
            let count = s.indices.dims()[3];
            let pad_rows = padded - n;
            let indices = if pad_rows > 0 {
                Tensor::cat(
                    vec![s.indices, Tensor::zeros([b, hs, pad_rows, count], &device)],
                    2,
                )
            } else {
                s.indices
            };
            let valid = if pad_rows > 0 {
                let none = Tensor::<B, 4, Int>::zeros([b, hs, pad_rows, count], &device).bool();
                Tensor::cat(vec![s.valid, none], 2)
            } else {
                s.valid
            };
            let sel_blocked = valid
                .bool_not()
                .unsqueeze_dim::<5>(4)
                .expand([b, hs, padded, count, sel])
                .reshape([b, hs, padded, count * sel]);
            let gates = config.use_diff_topk.then(|| {
                let ones = Tensor::<B, 4>::ones([b, hs, padded, 1], &device);
                Tensor::cat(vec![pad_zeros(s.scores, 2, 0, pad_rows), ones], 3)
            });
            (
                Tensor::cat(vec![indices, own_idx], 3),
                Tensor::cat(vec![sel_blocked, own_blocked], 3),
                gates,
            )
        }
        None => (own_idx, own_blocked, None),
    };
    let blocks = indices.dims()[3];

    // gather the chosen blocks of every (batch, head, query) from a flat list of all blocks
    let kv_of_head: Vec<i64> = (0..b)
        .flat_map(|bi| (0..hs).map(move |hi| (bi * kvh + if share { hi } else { hi / g }) as i64))
        .collect();
    let base = int_tensor::<B, 4>(kv_of_head, [b, hs, 1, 1], &device)
        .mul_scalar(nb as i64)
        .expand([b, hs, padded, blocks]);
    let flat = (indices + base).reshape([b * hs * padded * blocks]);
    let gather = |x: Tensor<B, 4>| {
        x.reshape([b * kvh * nb, sel * d])
            .select(0, flat.clone())
            .reshape([b, hs, padded, blocks, sel * d])
    };
    let mut fk = gather(k);
    let fv = gather(v);
    if let Some(gates) = gates {
        fk = fk * gates.unsqueeze_dim::<5>(4);
    }
    let keys = blocks * sel;
    let fk = fk.reshape([b, hs, padded, keys, d]);
    let fv = fv.reshape([b, hs, padded, keys, d]);

    // queries of one selection group become the rows of one attention problem
    let fq = q.reshape([b, hs, gq, padded, d]).swap_dims(2, 3);
    let blocked = blocked.unsqueeze_dim::<5>(3);
    let out = attend(fq, fk, fv, Some(blocked), scale).out;
    out.swap_dims(2, 3)
        .reshape([b, h, padded, d])
        .narrow(2, 0, n)
}

/// Fine attention of the newest query `[batch, heads, 1, dim_head]` (rotated, at position
/// `kv.len() - 1`) over its selected blocks and the causal part of its own block, read from the
/// rotated key/value cache. Work is independent of the context length.
pub fn fine_attention_step<B: Backend>(
    q: Tensor<B, 4>,
    kv: &KvBuffer<B>,
    selection: Option<Selection<B>>,
    config: &NsaConfig,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, h, _, d] = q.dims();
    let pos = kv.len() - 1;
    let sel = config.selection_block_size;
    let own_start = pos - pos % sel;
    let (own_k, own_v) = kv.rows(own_start, pos + 1 - own_start);
    let kvh = own_k.dims()[1];
    let g = h / kvh;
    let share = config.query_heads_share_selected_kv;
    let hs = if share { kvh } else { h };
    let gq = h / hs;
    let device = q.device();
    // own block keys for every selection head: [b, hs, 1, own, d]
    let per_head = |t: Tensor<B, 4>| {
        let n = t.dims()[2];
        if share || g == 1 {
            t.unsqueeze_dim::<5>(2)
        } else {
            t.unsqueeze_dim::<5>(2)
                .expand([b, kvh, g, n, d])
                .reshape([b, h, n, d])
                .unsqueeze_dim::<5>(2)
        }
    };
    let (own_k, own_v) = (per_head(own_k), per_head(own_v));
    let (keys, values, blocked) = match selection {
        Some(s) => {
            let count = s.indices.dims()[3];
            let complete = own_start / sel;
            // (batch, selection head) → first block of its kv head, computed on the device
            let kv_head = Tensor::<B, 1, Int>::arange(0..(b * hs) as i64, &device)
                .div_scalar(if share { 1 } else { g as i64 });
            let base = kv_head
                .mul_scalar(complete as i64)
                .reshape([b, hs, 1, 1])
                .expand([b, hs, 1, count]);
            let flat = (s.indices + base).reshape([b * hs * count]);
            let (all_k, all_v) = kv.rows(0, complete * sel);
            let gather = |t: Tensor<B, 4>| {
                t.reshape([b * kvh * complete, sel * d])
                    .select(0, flat.clone())
                    .reshape([b, hs, 1, count, sel * d])
            };
            let mut sk = gather(all_k);
            if config.use_diff_topk {
                sk = sk * s.scores.unsqueeze_dim::<5>(4);
            }
            let sk = sk.reshape([b, hs, 1, count * sel, d]);
            let sv = gather(all_v).reshape([b, hs, 1, count * sel, d]);
            let own = own_k.dims()[3];
            let blocked = Tensor::cat(
                vec![
                    s.valid
                        .bool_not()
                        .unsqueeze_dim::<5>(4)
                        .expand([b, hs, 1, count, sel])
                        .reshape([b, hs, 1, 1, count * sel]),
                    Tensor::<B, 5, Int>::zeros([b, hs, 1, 1, own], &device).bool(),
                ],
                4,
            );
            (
                Tensor::cat(vec![sk, own_k], 3),
                Tensor::cat(vec![sv, own_v], 3),
                Some(blocked),
            )
        }
        None => (own_k, own_v, None),
    };
    let fq = q.reshape([b, hs, gq, 1, d]).swap_dims(2, 3);
    attend(fq, keys, values, blocked, scale)
        .out
        .reshape([b, h, 1, d])
}
