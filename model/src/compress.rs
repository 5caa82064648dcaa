//! Branch 1, compressed attention (NSA paper §3.3.1).
//!
//! Keys and values are cut into blocks of `compress_block_size` tokens every
//! `compress_block_sliding_stride` tokens (the first block is left-padded with zeros when blocks
//! overlap), a learned intra-block position is added, and a per-kv-head-shared MLP pools each
//! block into one key and one value. Queries (not rotated) attend to learned memory key/values
//! plus every compressed block that ended strictly before them. The scaled logits are kept: they
//! are the importance scores the selection branch ranks blocks by.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use crate::attend::{attend, Attended, MASK_VALUE};
use crate::config::NsaConfig;
use crate::kernels::Kernels;
use crate::select::{importance, select_top, Selection};
use crate::tensor_util::{greater_mask, linear, pad_zeros, windows};

/// The most scores the tensor-op branch holds at once (per chunk of query positions): 2^23
/// values, 32 MiB of f32.
const SCORE_LIMIT: usize = 1 << 23;

/// `Linear(block * dim_head → hidden) → ReLU → Linear(hidden → dim_head)`, shared by all heads.
#[derive(Module, Debug)]
pub struct CompressMlp<B: Backend> {
    /// First layer (with bias).
    pub fc1: Linear<B>,
    /// Second layer (with bias).
    pub fc2: Linear<B>,
}

impl<B: Backend> CompressMlp<B> {
    fn new(input: usize, hidden: usize, output: usize, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(input, hidden).init(device),
            fc2: LinearConfig::new(hidden, output).init(device),
        }
    }

    /// `[..., block * dim_head]` → `[..., dim_head]`.
    pub fn forward<const D: usize>(&self, kernels: &Kernels<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(kernels, &self.fc2, relu(linear(kernels, &self.fc1, x)))
    }
}

/// Parameters of the compressed branch.
#[derive(Module, Debug)]
pub struct Compressor<B: Backend> {
    /// Pools key blocks.
    pub k_compress: CompressMlp<B>,
    /// Pools value blocks.
    pub v_compress: CompressMlp<B>,
    /// Added to each key block before pooling, `[kv_heads, block, dim_head]` (zeros at init).
    pub k_intrablock_positions: Param<Tensor<B, 3>>,
    /// Added to each value block before pooling, `[kv_heads, block, dim_head]`.
    pub v_intrablock_positions: Param<Tensor<B, 3>>,
    /// Memory keys and values, `[2, kv_heads, mem, dim_head]` (zeros at init).
    pub compress_mem_kv: Param<Tensor<B, 4>>,
    /// Tokens per block.
    pub block: usize,
    /// Tokens between block starts.
    pub stride: usize,
}

/// Compressed branch output.
pub struct Compressed<B: Backend> {
    /// `[batch, heads, seq, dim_head]`
    pub out: Tensor<B, 4>,
    /// Importance logits over the compressed blocks (memory slots removed), masked causally,
    /// `[batch, heads, seq, blocks]`; `None` when no block is complete yet.
    pub importance: Option<Tensor<B, 4>>,
}

impl<B: Backend> Compressor<B> {
    /// New parameters for `config`.
    pub fn new(config: &NsaConfig, device: &B::Device) -> Self {
        let (kvh, l, d) = (
            config.kv_heads(),
            config.compress_block_size,
            config.dim_head,
        );
        let hidden = config.compress_hidden();
        Self {
            k_compress: CompressMlp::new(l * d, hidden, d, device),
            v_compress: CompressMlp::new(l * d, hidden, d, device),
            k_intrablock_positions: Param::from_tensor(Tensor::zeros([kvh, l, d], device)),
            v_intrablock_positions: Param::from_tensor(Tensor::zeros([kvh, l, d], device)),
            compress_mem_kv: Param::from_tensor(Tensor::zeros(
                [2, kvh, config.num_compressed_mem_kv, d],
                device,
            )),
            block: l,
            stride: config.compress_block_sliding_stride,
        }
    }

    /// Number of memory slots.
    pub fn num_mem(&self) -> usize {
        self.compress_mem_kv.dims()[2]
    }

    /// Pools complete blocks of `k`, `v` `[batch, kv_heads, seq, dim_head]` (un-rotated) into
    /// `[batch, kv_heads, seq / stride, dim_head]` each; `None` if no block is complete.
    pub fn compress(
        &self,
        kernels: &Kernels<B>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let count = k.dims()[2] / self.stride;
        (count > 0).then(|| self.compress_blocks(kernels, k, v, 0, count))
    }

    /// Blocks `first..first + count` of [`Self::compress`] (`[batch, kv_heads, count,
    /// dim_head]` each) from `k`, `v` `[batch, kv_heads, seq, dim_head]` (un-rotated) holding
    /// every position up to the last block's end: a long prompt's blocks a chunk at a time.
    pub fn compress_blocks(
        &self,
        kernels: &Kernels<B>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        first: usize,
        count: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let overlap = self.block - self.stride;
        // the rows from the first block's start, `first * stride - overlap` (zeros before 0)
        let from = first * self.stride;
        let lo = from.saturating_sub(overlap);
        let zeros = overlap - (from - lo);
        let rows = from - lo + count * self.stride;
        let window = |x: Tensor<B, 4>| pad_zeros(x.narrow(2, lo, rows), 2, zeros, 0);
        self.pool_windows(kernels, window(k), window(v), count)
    }

    /// `count` consecutive blocks from `k`, `v` `[batch, kv_heads, (count - 1) * stride +
    /// block, dim_head]` (un-rotated) whose row 0 is the first block's first position (zeros
    /// for positions before the sequence's start) → `[batch, kv_heads, count, dim_head]` each:
    /// the one rule of a compressed key and value, whichever part of a sequence holds them.
    pub fn pool_windows(
        &self,
        kernels: &Kernels<B>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        count: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, kvh, _, d] = k.dims();
        let rows = (count.max(1) - 1) * self.stride + self.block;
        let pool = |x: Tensor<B, 4>, pos: Tensor<B, 3>, mlp: &CompressMlp<B>| {
            let pos = pos.unsqueeze_dim::<4>(1).unsqueeze::<5>();
            let blocks = windows(x.narrow(2, 0, rows), self.block, self.stride, count) + pos;
            mlp.forward(kernels, blocks.reshape([b, kvh, count, self.block * d]))
        };
        (
            pool(k, self.k_intrablock_positions.val(), &self.k_compress),
            pool(v, self.v_intrablock_positions.val(), &self.v_compress),
        )
    }

    /// Pools one block `[batch, kv_heads, block, dim_head]` (the decode path).
    pub fn compress_one(
        &self,
        kernels: &Kernels<B>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, kvh, l, d] = k.dims();
        let pool = |x: Tensor<B, 4>, pos: Tensor<B, 3>, mlp: &CompressMlp<B>| {
            mlp.forward(kernels, (x + pos.unsqueeze()).reshape([b, kvh, 1, l * d]))
        };
        (
            pool(k, self.k_intrablock_positions.val(), &self.k_compress),
            pool(v, self.v_intrablock_positions.val(), &self.v_compress),
        )
    }

    /// Memory plus compressed keys and values `[batch, kv_heads, mem + blocks, dim_head]`.
    pub fn with_memory(
        &self,
        batch: usize,
        compressed: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, kvh, m, d] = self.compress_mem_kv.dims();
        let mem = self.compress_mem_kv.val();
        let mem_k = mem.clone().narrow(0, 0, 1).expand([batch, kvh, m, d]);
        let mem_v = mem.narrow(0, 1, 1).expand([batch, kvh, m, d]);
        match compressed {
            Some((ck, cv)) => (
                Tensor::cat(vec![mem_k, ck], 2),
                Tensor::cat(vec![mem_v, cv], 2),
            ),
            None => (mem_k, mem_v),
        }
    }

    /// [`Self::attend`] for queries at positions `start..start + seq` (a whole sequence from 0,
    /// or a chunk of a prompt's queries over the compressed keys of the whole prompt) and the
    /// block selection it drives ([`importance`], then [`select_top`]): the branch output and
    /// the selected blocks. A registered fused kernel does both without materialising the
    /// `[seq, blocks]` importance logits.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_and_select(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        ck: Tensor<B, 4>,
        cv: Tensor<B, 4>,
        start: usize,
        config: &NsaConfig,
        scale: f64,
    ) -> (Tensor<B, 4>, Option<Selection<B>>) {
        if let Some(fused) = kernels.fused() {
            let sizes = config.sizes();
            let mem = self.num_mem();
            let done = fused.compressed_and_selection(&q, &ck, &cv, start, mem, &sizes, scale);
            if let Some(done) = done {
                return done;
            }
        }
        self.attend_and_select_chunked(kernels, q, ck, cv, start, config, scale, SCORE_LIMIT)
    }

    /// [`Self::attend_and_select`] with tensor ops, in chunks of query positions whose scores
    /// `[batch, heads, chunk, slots]` hold at most `limit` values: the branch and the block
    /// importance are row by row, so any chunking gives the same result, and a long prompt's
    /// prefill stays linear in memory (unchunked, the scores and the importance grow as
    /// `seq × seq / stride`: 3.7 GB at 20k tokens for a model of width 32).
    #[allow(clippy::too_many_arguments)]
    fn attend_and_select_chunked(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        ck: Tensor<B, 4>,
        cv: Tensor<B, 4>,
        first: usize,
        config: &NsaConfig,
        scale: f64,
        limit: usize,
    ) -> (Tensor<B, 4>, Option<Selection<B>>) {
        let [b, h, n, _] = q.dims();
        let slots = ck.dims()[2];
        let rows = (limit / (b * h * slots).max(1)).clamp(1, n.max(1));
        let device = q.device();
        let sizes = config.sizes();
        let all = sizes.selection_blocks(slots - self.num_mem());
        let mut outs = Vec::new();
        let mut selections = Vec::new();
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let q = q.clone().narrow(2, start, len);
            let at = first + start;
            let (out, logits) = self.attend_visible(kernels, q, ck.clone(), cv.clone(), at, scale);
            outs.push(out);
            // the blocks the chunk's queries cannot see yet have probability zero: the
            // importance of the seen ones, padded with zeros to every complete block (whether a
            // block can be selected at all depends on the keys alone: all chunks or none)
            let seen = logits.and_then(|logits| importance(logits, config, at));
            let have = seen.as_ref().map_or(0, |p| p.dims()[3]);
            let probs = match seen {
                _ if all == 0 => None,
                Some(p) if have == all => Some(p),
                seen => {
                    let hs = sizes.selection_heads();
                    let zeros = Tensor::zeros([b, hs, len, all - have], &device);
                    Some(match seen {
                        Some(p) if have > 0 => Tensor::cat(vec![p, zeros], 3),
                        _ => zeros,
                    })
                }
            };
            selections.push(probs.and_then(|probs| select_top(kernels, probs, config)));
        }
        let cat = |parts: Vec<Tensor<B, 4>>| match parts.len() {
            1 => parts.into_iter().next().expect("one part"),
            _ => Tensor::cat(parts, 2),
        };
        let selection: Option<Vec<Selection<B>>> = selections.into_iter().collect();
        let selection = selection.map(|parts| {
            let mut indices = Vec::with_capacity(parts.len());
            let mut scores = Vec::with_capacity(parts.len());
            let mut valid = Vec::with_capacity(parts.len());
            for s in parts {
                indices.push(s.indices);
                scores.push(s.scores);
                valid.push(s.valid);
            }
            Selection {
                indices: Tensor::cat(indices, 2),
                scores: cat(scores),
                valid: Tensor::cat(valid, 2),
            }
        });
        (cat(outs), selection)
    }

    /// Attention of `q` `[batch, heads, seq, dim_head]` (rows at absolute positions
    /// `offset..offset + seq`) over memory + compressed `ck`, `cv`
    /// `[batch, kv_heads, mem + blocks, dim_head]`. Block `j` (ending at token
    /// `(j + 1) * stride - 1`) is visible to queries strictly after its end.
    pub fn attend(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        ck: Tensor<B, 4>,
        cv: Tensor<B, 4>,
        offset: usize,
        scale: f64,
    ) -> Compressed<B> {
        let [b, h, n, _] = q.dims();
        let blocks = ck.dims()[2] - self.num_mem();
        let device = q.device();
        let (out, logits) = self.attend_visible(kernels, q, ck, cv, offset, scale);
        // the blocks none of the queries sees, as masked logits
        let seen = logits.as_ref().map_or(0, |l| l.dims()[3]);
        let unseen = || Tensor::full([b, h, n, blocks - seen], MASK_VALUE, &device);
        let importance = match logits {
            _ if blocks == 0 => None,
            Some(l) if seen == blocks => Some(l),
            Some(l) => Some(Tensor::cat(vec![l, unseen()], 3)),
            None => Some(unseen()),
        };
        Compressed { out, importance }
    }

    /// [`Self::attend`] over the slots that the last query sees (the memory and the blocks
    /// ended before it): the output, and the importance logits of those blocks only
    /// `[batch, heads, seq, seen]` (`None` when it sees none). The later blocks would only
    /// be masked: left out, a chunk of queries early in a long prompt scores a fraction of the
    /// blocks, and no masked logit goes through `exp`.
    fn attend_visible(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        ck: Tensor<B, 4>,
        cv: Tensor<B, 4>,
        offset: usize,
        scale: f64,
    ) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
        let [b, h, n, d] = q.dims();
        let [_, kvh, all_slots, _] = ck.dims();
        let g = h / kvh;
        let m = self.num_mem();
        let all_blocks = all_slots - m;
        // blocks ended by the last query (`(j + 1) * stride <= t`); at least one slot
        let last = offset + n.max(1) - 1;
        let slots = (m + all_blocks.min(last / self.stride)).max(1);
        let (ck, cv) = if slots < all_slots {
            (ck.narrow(2, 0, slots), cv.narrow(2, 0, slots))
        } else {
            (ck, cv)
        };
        let blocks = slots - m.min(slots);
        // at decode time every cached block ended before the query: no mask
        let all_visible = blocks * self.stride <= offset;
        let blocked = (blocks > 0 && !all_visible).then(|| {
            // slot j (block j - m) ends at (j - m + 1) * stride: blocked while that lies beyond
            // the query; memory slots (j < m) give a value <= 0 and are always visible
            let rows = (0..n).map(|i| (offset + i) as i64).collect();
            let cols = (0..slots)
                .map(|j| (j as i64 - m as i64 + 1) * self.stride as i64)
                .collect();
            greater_mask::<B>(rows, cols, &q.device()).reshape([1, 1, 1, n, slots])
        });
        let Attended { out, sim, .. } = attend(
            kernels,
            q.reshape([b, kvh, g, n, d]),
            ck.unsqueeze_dim(2),
            cv.unsqueeze_dim(2),
            blocked,
            scale,
        );
        let logits = (blocks > 0).then(|| sim.reshape([b, h, n, slots]).narrow(3, m, blocks));
        (out.reshape([b, h, n, d]), logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    /// The branch in chunks of 1, 5 and 13 query positions (offsets that are multiples of
    /// neither the stride nor the selection block) gives the output and the selection of one
    /// chunk: the same blocks, the same validity, the same probabilities.
    #[test]
    fn chunked_queries_give_the_whole_branch_and_selection() {
        let device = Default::default();
        let kernels = Kernels::<B>::new(&crate::kernels::KernelOptions::tensor_ops());
        for (h, kvh, n, share) in [(4, 2, 77, true), (2, 1, 50, false)] {
            let mut config = NsaConfig::new(h * 8, 8, h, 4, 8, 4, 8, 2).with_kv_heads(kvh);
            config.query_heads_share_selected_kv = share;
            let comp = Compressor::<B>::new(&config, &device);
            let normal = Distribution::Normal(0.0, 1.0);
            let q = Tensor::<B, 4>::random([2, h, n, 8], normal, &device);
            let k = Tensor::<B, 4>::random([2, kvh, n, 8], normal, &device);
            let v = Tensor::<B, 4>::random([2, kvh, n, 8], normal, &device);
            let (ck, cv) = comp.with_memory(2, comp.compress(&kernels, k, v));
            let slots = ck.dims()[2];
            let scale = 8f64.powf(-0.5);
            let run = |limit: usize| {
                let (out, sel) = comp.attend_and_select_chunked(
                    &kernels,
                    q.clone(),
                    ck.clone(),
                    cv.clone(),
                    0,
                    &config,
                    scale,
                    limit,
                );
                let sel = sel.expect("blocks to select");
                let idx = sel
                    .indices
                    .into_data()
                    .convert::<i64>()
                    .into_vec::<i64>()
                    .unwrap();
                let valid = sel
                    .valid
                    .into_data()
                    .convert::<bool>()
                    .into_vec::<bool>()
                    .unwrap();
                (host(out), idx, valid, host(sel.scores))
            };
            let whole = run(usize::MAX);
            for rows in [1, 5, 13] {
                let part = run(2 * h * slots * rows);
                assert_eq!(part.1, whole.1, "h{h} n{n}: blocks in chunks of {rows}");
                assert_eq!(part.2, whole.2, "h{h} n{n}: validity in chunks of {rows}");
                for (a, b) in [(&part.0, &whole.0), (&part.3, &whole.3)] {
                    assert_eq!(a.len(), b.len());
                    for (x, y) in a.iter().zip(b.iter()) {
                        assert!((x - y).abs() <= 1e-6, "h{h} n{n} rows {rows}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
