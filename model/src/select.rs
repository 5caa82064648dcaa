//! Branch 2, selected attention (NSA paper §3.3.2).
//!
//! The compressed branch's logits rank the key blocks of `selection_block_size` tokens: logits
//! of the compression blocks that make up a selection block are averaged (when the stride is
//! smaller than the selection block), the query's own block is excluded, the scores go through a
//! softmax that includes a constant sink slot ([`rules::SINK_LOGIT`], as in the reference), and
//! the top `num_selected_blocks` blocks are picked. Each query then attends, with rotated keys,
//! to its selected blocks plus the causal part of its own block. Blocks whose probability is
//! not above [`rules::VALID_PROBABILITY`] (i.e. not yet visible) are masked out. With `query_heads_share_selected_kv` the importance is
//! averaged over the query heads of a GQA group so the group loads one set of blocks.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::attend::attend;
use crate::cache::{GatherTables, KvBuffer};
use crate::config::NsaConfig;
use crate::kernels::Kernels;
pub use crate::kernels::Selection;
use crate::rules;
use crate::tensor_util::{bool_tensor, equal_mask, greater_mask, int_tensor, pad_zeros, round_up};

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
    let sizes = config.sizes();
    let per_fine = sizes.per_selection();
    let complete = sizes.selection_blocks(blocks);
    if per_fine > 1 {
        if complete == 0 {
            return None;
        }
        scores = scores
            .narrow(3, 0, complete * per_fine)
            .reshape([b, hs, n, complete, per_fine])
            .mean_dim(4)
            .reshape([b, hs, n, complete]);
        // the query's own selection block is handled by the causal part of the selected branch
        // (when decoding, complete blocks all lie before the query's own block: nothing to mask)
        let sel = config.selection_block_size;
        if rules::own_block(offset, sel) < complete {
            let rows = (0..n)
                .map(|i| rules::own_block(offset + i, sel) as i64)
                .collect();
            let own = equal_mask::<B>(rows, (0..complete as i64).collect(), &scores.device())
                .reshape([1, 1, n, complete]);
            scores = scores.mask_fill(own.expand([b, hs, n, complete]), f32::MIN);
        }
    }
    let device = scores.device();
    let sink = Tensor::<B, 4>::full([b, hs, n, 1], rules::SINK_LOGIT, &device);
    let probs = softmax(Tensor::cat(vec![sink, scores], 3), 3).narrow(3, 1, complete);
    Some(probs)
}

/// Picks the top blocks from [`importance`] probabilities.
///
/// **Ties**: blocks are ranked by descending importance, and of two blocks with exactly the
/// same importance the one with the lower index ranks first. Every implementation applies this
/// rule: [`top_blocks`] here, and the kernels (the `top_k`, compressed-and-selection and decode
/// kernels on CUDA/wgpu, the CPU decode step), which rank the logits before the softmax: the
/// same order, except that two different logits whose probabilities round to the same float
/// are a tie here and ordered by logit there. The reference (`torch.topk`) leaves the order of
/// ties unspecified; on the CPU it keeps whichever tied blocks its partial sort lands on, often
/// not the lowest indices, so a config with exact ties (e.g. compression and selection blocks
/// of one token over repeated tokens) may select other blocks than the reference does.
pub fn select_top<B: Backend>(
    kernels: &Kernels<B>,
    probs: Tensor<B, 4>,
    config: &NsaConfig,
) -> Option<Selection<B>> {
    let complete = probs.dims()[3];
    let n = rules::selected_count(config.num_selected_blocks, complete);
    if n == 0 {
        return None;
    }
    // on GPUs a kernel (Burn's default top-k sorts on the host: a device sync per layer and
    // decode step); the kernel has no backward, so tracked (training) tensors take the host's
    let fused = kernels.fused().and_then(|k| k.top_k(&probs, n));
    let (values, indices) = fused.unwrap_or_else(|| top_blocks(probs, n));
    let valid = values.clone().greater_elem(rules::VALID_PROBABILITY);
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

/// The `n` largest values of every row of `x` `[batch, heads, seq, len]` and their indices,
/// largest first, exact ties broken by the lower index ([`select_top`]'s rule) →
/// (`[batch, heads, seq, n]`, `[batch, heads, seq, n]`). Ranked on the host in f64 (exact for
/// every float type), the values gathered from `x` so that they stay differentiable. Burn's
/// `topk_with_indices` leaves the order of ties to an unstable sort.
pub fn top_blocks<B: Backend>(x: Tensor<B, 4>, n: usize) -> (Tensor<B, 4>, Tensor<B, 4, Int>) {
    let [b, h, s, len] = x.dims();
    let n = n.min(len);
    let host = x
        .to_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("f64 data after convert");
    let mut indices = Vec::with_capacity(b * h * s * n);
    let mut order: Vec<usize> = Vec::with_capacity(len);
    for row in host.chunks_exact(len.max(1)) {
        order.clear();
        order.extend(0..len);
        // [`rules::ranks_before`] as a total order (f64 holds every float type exactly); the
        // first `n` found in linear time, then sorted (a full sort of every row made a long
        // prompt's prefill `seq × blocks × log blocks`)
        let before = |&i: &usize, &j: &usize| row[j].total_cmp(&row[i]).then(i.cmp(&j));
        if n > 0 && n < len {
            order.select_nth_unstable_by(n - 1, before);
        }
        order[..n].sort_by(before);
        indices.extend(order[..n].iter().map(|&i| i as i64));
    }
    let device = x.device();
    let indices = Tensor::<B, 4, Int>::from_data(TensorData::new(indices, [b, h, s, n]), &device);
    (x.gather(3, indices.clone()), indices)
}

/// Selected attention of rotated `q` `[batch, heads, seq, dim_head]` at positions
/// `start..start + seq` over rotated `k` and `v` `[batch, kv_heads, keys, dim_head]` at
/// positions `0..keys` (`keys >= start + seq`; `start` 0 and `keys == seq` for a whole sequence,
/// else a chunk of a prompt's queries over its keys): each query sees its selected blocks and
/// the causal part of its own block. Returns `[batch, heads, seq, dim_head]`.
#[allow(clippy::too_many_arguments)]
pub fn selected_attention<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    selection: Option<Selection<B>>,
    start: usize,
    config: &NsaConfig,
    scale: f64,
) -> Tensor<B, 4> {
    if let Some(fused) = kernels.fused() {
        let sizes = config.sizes();
        let out = fused.selected_attention(&q, &k, &v, selection.as_ref(), start, &sizes, scale);
        if let Some(out) = out {
            return out;
        }
    }
    let limit = GATHER_LIMIT;
    selected_attention_tensor_ops(kernels, q, k, v, selection, start, config, scale, limit)
}

/// The most values the tensor-op selected attention gathers at once (per keys and per values):
/// 2^28, 1 GiB of f32. The gathered keys hold `(n + 1) × selection_block × dim_head` values
/// per query and selection head: unchunked, the benchmark layer (16 heads selecting 16 blocks
/// of 64) passes 2^32 values near 4k tokens, where CubeCL's u32 indexing fails.
const GATHER_LIMIT: usize = 1 << 28;

/// [`selected_attention`] with tensor ops, in chunks of query positions whose gathered keys hold
/// at most `limit` values (rows are independent: any chunking gives the same result).
#[allow(clippy::too_many_arguments)]
fn selected_attention_tensor_ops<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    selection: Option<Selection<B>>,
    start: usize,
    config: &NsaConfig,
    scale: f64,
    limit: usize,
) -> Tensor<B, 4> {
    let [b, h, n, d] = q.dims();
    let [_, kvh, keys, _] = k.dims();
    let g = h / kvh;
    let sel = config.selection_block_size;
    // the queries from the start of the first one's block: `lead` zero rows in front, so that
    // row `i` sits at position `first + i` with `first` a multiple of the block
    let lead = start % sel;
    let first = start - lead;
    let padded = round_up(lead + n, sel);
    let key_rows = round_up(keys, sel);
    let nb = key_rows / sel;
    let device = q.device();
    let (q, k, v) = (
        pad_zeros(q, 2, lead, padded - lead - n),
        pad_zeros(k, 2, 0, key_rows - keys),
        pad_zeros(v, 2, 0, key_rows - keys),
    );
    let share = config.query_heads_share_selected_kv;
    let hs = if share { kvh } else { h };
    let gq = h / hs;

    // own block, causal inside the block
    let own_idx: Vec<i64> = (0..padded)
        .map(|i| rules::own_block(first + i, sel) as i64)
        .collect();
    let own_idx =
        int_tensor::<B, 4>(own_idx, [1, 1, padded, 1], &device).expand([b, hs, padded, 1]);
    let rows = (0..padded).map(|i| (i % sel) as i64).collect();
    let own_blocked = greater_mask::<B>(rows, (0..sel as i64).collect(), &device)
        .reshape([1, 1, padded, sel])
        .expand([b, hs, padded, sel]);

    let (indices, blocked, gates) = match selection {
        Some(s) => {
            let count = s.indices.dims()[3];
            let pad_rows = padded - lead - n;
            // the padding rows (in front and behind) select block 0, not valid
            let around = |x: Tensor<B, 4, Int>| {
                let mut parts = Vec::with_capacity(3);
                if lead > 0 {
                    parts.push(Tensor::zeros([b, hs, lead, count], &device));
                }
                parts.push(x);
                if pad_rows > 0 {
                    parts.push(Tensor::zeros([b, hs, pad_rows, count], &device));
                }
                Tensor::cat(parts, 2)
            };
            let (indices, valid) = if lead + pad_rows > 0 {
                (around(s.indices), around(s.valid.int()).bool())
            } else {
                (s.indices, s.valid)
            };
            let sel_blocked = valid
                .bool_not()
                .unsqueeze_dim::<5>(4)
                .expand([b, hs, padded, count, sel])
                .reshape([b, hs, padded, count * sel]);
            let gates = config.use_diff_topk.then(|| {
                let ones = Tensor::<B, 4>::ones([b, hs, padded, 1], &device);
                Tensor::cat(vec![pad_zeros(s.scores, 2, lead, pad_rows), ones], 3)
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
    let base = int_tensor::<B, 4>(kv_of_head, [b, hs, 1, 1], &device).mul_scalar(nb as i64);
    let (k, v) = (
        k.reshape([b * kvh * nb, sel * d]),
        v.reshape([b * kvh * nb, sel * d]),
    );
    // queries of one selection group become the rows of one attention problem
    let fq = q.reshape([b, hs, gq, padded, d]).swap_dims(2, 3);
    let keys = blocks * sel;
    let rows = (limit / (b * hs * keys * d).max(1)).clamp(1, padded);
    let part = |start: usize, len: usize| {
        let picked = indices.clone().narrow(2, start, len);
        let flat =
            (picked + base.clone().expand([b, hs, len, blocks])).reshape([b * hs * len * blocks]);
        let gather = |x: Tensor<B, 2>| {
            x.select(0, flat.clone())
                .reshape([b, hs, len, blocks, sel * d])
        };
        let mut fk = gather(k.clone());
        let fv = gather(v.clone());
        if let Some(gates) = &gates {
            fk = fk * gates.clone().narrow(2, start, len).unsqueeze_dim::<5>(4);
        }
        let fk = fk.reshape([b, hs, len, keys, d]);
        let fv = fv.reshape([b, hs, len, keys, d]);
        let fq = fq.clone().narrow(2, start, len);
        let blocked = blocked.clone().narrow(2, start, len).unsqueeze_dim::<5>(3);
        attend(kernels, fq, fk, fv, Some(blocked), scale).out
    };
    let parts: Vec<_> = (0..padded)
        .step_by(rows)
        .map(|start| part(start, rows.min(padded - start)))
        .collect();
    let out = if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        Tensor::cat(parts, 2)
    };
    out.swap_dims(2, 3)
        .reshape([b, h, padded, d])
        .narrow(2, lead, n)
}

/// Selected attention of the newest query `[batch, heads, 1, dim_head]` (rotated, at position
/// `kv.len() - 1`) over its selected blocks and the causal part of its own block, read from the
/// rotated key/value cache. Work is independent of the context length: the selected blocks and
/// the own block are one gather from the cache viewed as blocks (no copy of the cache).
/// `tables` keeps the step's index and mask tensors on the device between calls.
pub fn selected_attention_step<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 4>,
    kv: &KvBuffer<B>,
    selection: Option<Selection<B>>,
    config: &NsaConfig,
    scale: f64,
    tables: &mut Option<GatherTables<B>>,
) -> Tensor<B, 4> {
    let sel = config.selection_block_size;
    let Some((key_blocks, value_blocks)) = kv.blocks(sel) else {
        // a cache not aligned to the selection block (not one `prefill` made): align a copy
        let (k, v) = kv.all();
        let aligned = KvBuffer::aligned(k, v, 0, sel);
        return selected_attention_step(kernels, q, &aligned, selection, config, scale, &mut None);
    };
    let [b, h, _, d] = q.dims();
    let pos = kv.len() - 1;
    let own = rules::own_block(pos, sel);
    let kvh = kv.heads();
    let g = h / kvh;
    let share = config.query_heads_share_selected_kv;
    let hs = if share { kvh } else { h };
    let gq = h / hs;
    let device = q.device();
    // block index of every (batch, selection head, block): the selected blocks (-1: not
    // valid), then the own block
    let own_idx = Tensor::<B, 4, Int>::full([b, hs, 1, 1], own as i64, &device);
    let (blocks, gates) = match selection {
        Some(s) => {
            let idx = s.indices.mask_fill(s.valid.bool_not(), -1);
            let gates = config.use_diff_topk.then(|| {
                let ones = Tensor::<B, 4>::ones([b, hs, 1, 1], &device);
                Tensor::cat(vec![s.scores, ones], 3)
            });
            (Tensor::cat(vec![idx, own_idx], 3), gates)
        }
        None => (own_idx, None),
    };
    let total = blocks.dims()[3];
    let capacity = kv.capacity();
    let current = tables
        .as_ref()
        .is_some_and(|t| t.capacity == capacity && t.total == total && t.first.dims()[0] == b);
    if !current {
        // rows of the block view: kv head `(b, head)` starts at `(b * kvh + head) * per_head`
        let per_head = capacity / sel;
        let first: Vec<i64> = (0..b)
            .flat_map(|bi| {
                (0..hs)
                    .map(move |hi| ((bi * kvh + if share { hi } else { hi / g }) * per_head) as i64)
            })
            .collect();
        let first = int_tensor::<B, 4>(first, [b, hs, 1, 1], &device).expand([b, hs, 1, total]);
        let beyond: Vec<bool> = (0..sel)
            .flat_map(|r| (0..total * sel).map(move |j| j > (total - 1) * sel + r))
            .collect();
        *tables = Some(GatherTables {
            capacity,
            total,
            first,
            beyond: bool_tensor::<B, 2>(beyond, [sel, total * sel], &device),
        });
    }
    let t = tables.as_ref().expect("built above");
    let first = t.first.clone();
    let invalid = blocks.clone().lower_elem(0);
    let flat = (blocks.clamp_min(0) + first).reshape([b * hs * total]);
    let gather = |t: Tensor<B, 2>| {
        t.select(0, flat.clone())
            .reshape([b, hs, 1, total, sel * d])
    };
    let mut keys = gather(key_blocks);
    if let Some(gates) = gates {
        keys = keys * gates.unsqueeze_dim::<5>(4);
    }
    let keys = keys.reshape([b, hs, 1, total * sel, d]);
    let values = gather(value_blocks).reshape([b, hs, 1, total * sel, d]);
    // blocked: invalid blocks, and the rows of the own block after the query
    let beyond = t
        .beyond
        .clone()
        .narrow(0, pos % sel, 1)
        .reshape([1, 1, 1, 1, total * sel])
        .expand([b, hs, 1, 1, total * sel]);
    let blocked = invalid
        .unsqueeze_dim::<5>(4)
        .expand([b, hs, 1, total, sel])
        .reshape([b, hs, 1, 1, total * sel])
        .bool_or(beyond);
    let fq = q.reshape([b, hs, gq, 1, d]).swap_dims(2, 3);
    attend(kernels, fq, keys, values, Some(blocked), scale)
        .out
        .reshape([b, h, 1, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    /// The tensor-op selected attention in chunks of query rows equals it in one piece, with and
    /// without per-head selection and with straight-through gates.
    #[test]
    fn chunked_gathers_give_the_unchunked_result() {
        type B = NdArray;
        let device = Default::default();
        for (share, diff) in [(true, false), (false, false), (true, true)] {
            let (b, h, kvh, n, d) = (2, 4, 2, 45, 8);
            let mut config = NsaConfig::new(h * d, d, h, 4, 4, 4, 8, 2).with_kv_heads(kvh);
            config.query_heads_share_selected_kv = share;
            config.use_diff_topk = diff;
            let rand = |dims: [usize; 4]| {
                Tensor::<B, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device)
            };
            let (q, k, v) = (
                rand([b, h, n, d]),
                rand([b, kvh, n, d]),
                rand([b, kvh, n, d]),
            );
            let hs = if share { kvh } else { h };
            let logits = rand([b, hs, n, n / 8]);
            let probs = softmax(logits, 3);
            let kernels = Kernels::tensor_ops();
            let selection =
                || select_top(&kernels, probs.clone(), &config).expect("blocks to select");
            let whole = selected_attention_tensor_ops(
                &kernels,
                q.clone(),
                k.clone(),
                v.clone(),
                Some(selection()),
                0,
                &config,
                0.3,
                usize::MAX,
            );
            // 7 query rows per chunk (48 padded rows: six chunks of 7 and one of 6)
            let rows = b * hs * 3 * 8 * d * 7;
            let chunked = selected_attention_tensor_ops(
                &kernels,
                q.clone(),
                k.clone(),
                v.clone(),
                Some(selection()),
                0,
                &config,
                0.3,
                rows,
            );
            // queries 13..29 (not block-aligned at either end) over all the keys: those rows
            let (from, len) = (13, 16);
            let part_of = |x: Selection<B>| Selection {
                indices: x.indices.narrow(2, from, len),
                scores: x.scores.narrow(2, from, len),
                valid: x.valid.narrow(2, from, len),
            };
            let rows_of = selected_attention_tensor_ops(
                &kernels,
                q.clone().narrow(2, from, len),
                k.clone(),
                v.clone(),
                Some(part_of(selection())),
                from,
                &config,
                0.3,
                usize::MAX,
            );
            let expected: Vec<f32> = whole
                .clone()
                .narrow(2, from, len)
                .into_data()
                .to_vec()
                .unwrap();
            let got: Vec<f32> = rows_of.into_data().to_vec().unwrap();
            assert_eq!(got.len(), expected.len());
            for (x, y) in got.iter().zip(&expected) {
                // (a NaN fails the comparison)
                assert!(
                    (x - y).abs() <= 1e-6,
                    "share {share} diff {diff}: {x} vs {y}"
                );
            }
            let whole: Vec<f32> = whole.into_data().to_vec().unwrap();
            let chunked: Vec<f32> = chunked.into_data().to_vec().unwrap();
            let worst = whole
                .iter()
                .zip(&chunked)
                .map(|(a, b)| {
                    if a.is_finite() && b.is_finite() {
                        (a - b).abs()
                    } else {
                        f32::INFINITY
                    }
                })
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "share {share} diff {diff}: {worst}");
        }
    }

    /// Exact ties in rows longer than 20 (where Burn's unstable host sort stops being an
    /// insertion sort and returned tied indices in any order): the lower index first.
    #[test]
    fn ties_keep_the_lower_index() {
        let device = Default::default();
        let len = 40;
        // five distinct levels, eight blocks each: 0.5 at 0, 5, 10, ...; 0.9 at 3, 8, 13, ...
        let row: Vec<f32> = (0..len).map(|i| [0.5, 0.1, 0.2, 0.9, 0.3][i % 5]).collect();
        let x = Tensor::<NdArray, 4>::from_data(TensorData::new(row, [1, 1, 1, len]), &device);
        let config = NsaConfig::new(16, 4, 1, 4, 4, 4, 4, 11);
        let s = select_top(&Kernels::tensor_ops(), x, &config).expect("blocks to select");
        let indices: Vec<i64> = s.indices.into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(indices, vec![3, 8, 13, 18, 23, 28, 33, 38, 0, 5, 10]);
        let values: Vec<f32> = s.scores.into_data().to_vec().unwrap();
        assert_eq!(&values[7..9], &[0.9, 0.5]);
    }
}
