//! A long prompt's prefill in chunks of query positions, in memory linear in the prompt with a
//! small constant: the same outputs and decode cache as the one-piece prefill
//! ([`SparseAttention::prefill`], then the block's feed-forward).
//!
//! Legend: `b` batch, `n` prompt positions, `c` positions per chunk, `dim` model width, `h`
//! query heads, `kvh` key/value heads, `d` features per head.
//!
//! Per NSA block, with `x` `[b, n, dim]` the block's input:
//!
//! 1. keys and values, a chunk of rows at a time: rotated keys and values into the decode
//!    cache (allocated once, for the prompt and the tokens to come), un-rotated keys into a
//!    scratch buffer `[b, kvh, n, d]`;
//! 2. the compressed keys and values of every complete block, a chunk of blocks at a time
//!    (the scratch buffer and the cached values are their input), then the scratch buffer is
//!    dropped;
//! 3. per chunk of `c` query positions starting at `s`: the queries again (one more product of
//!    the chunk's rows), the three branches with the queries at `s..s + c` over every key of
//!    the prompt (the layer's branches with `start = s`: the fused kernels where the backend
//!    has them),
//!    the gates, the output projection, the residual and the feed-forward → the block's
//!    output rows `s..s + c`.
//!
//! What one block holds besides the caches: its input and output `[b, n, dim]` (the output
//! written a chunk of rows at a time), the scratch keys `[b, kvh, n, d]` (steps 1–2 only), and
//! one chunk's working set.

use burn::prelude::*;

use crate::cache::{KvBuffer, NsaCache};
use crate::kernels::Kernels;
use crate::nsa::{decode_ring, SparseAttention};
use crate::rope::Rotation;
use crate::transformer::FeedForward;

impl<B: Backend> SparseAttention<B> {
    /// The block of this attention and `ff` over a prompt `x` `[batch, seq, dim]`, `chunk`
    /// query positions at a time (at least 1): the block's output `x + a + ff(x + a)` (`a` the
    /// attention of `x`) `[batch, seq, dim]` and the layer's decode cache with room for
    /// `extra` more tokens, as [`Self::prefill`] and the feed-forward give them in one piece.
    pub fn prefill_block_chunked(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        ff: &FeedForward<B>,
        extra: usize,
        chunk: usize,
    ) -> (Tensor<B, 3>, NsaCache<B>) {
        let [b, n, _] = x.dims();
        let c = &self.config;
        let (kvh, d) = (c.kv_heads(), c.dim_head);
        let chunk = chunk.clamp(1, n.max(1));
        let spans = || (0..n).step_by(chunk).map(move |s| (s, chunk.min(n - s)));
        let device = x.device();
        let scale = self.scale();

        // 1. keys and values into the cache (rotated keys) and the scratch (un-rotated keys)
        let sel = c.selection_block_size;
        let capacity = (n + extra).max(1).div_ceil(sel) * sel;
        let mut kv = KvBuffer::empty_aligned([b, kvh, d], capacity, sel, &device);
        let mut raw_k = Tensor::zeros([b, kvh, n, d], &device);
        for (s, len) in spans() {
            let xs = self.normed(x.clone().narrow(1, s, len));
            let qkv = self.qkv(kernels, xs);
            let rotated = Rotation::new(d, s, len, &device).apply(qkv.k.clone());
            kv = kv.push(kernels, rotated, qkv.v);
            raw_k = kernels.write_rows(raw_k, s, qkv.k);
        }
        let (_, values) = kv.all();

        // 2. compressed keys and values, `chunk` positions' blocks at a time
        let stride = c.compress_block_sliding_stride;
        let blocks = n / stride;
        let per = (chunk / stride).max(1);
        let mut parts = Vec::new();
        for first in (0..blocks).step_by(per) {
            let count = per.min(blocks - first);
            let (k, v) = (raw_k.clone(), values.clone());
            parts.push(self.compress.compress_blocks(kernels, k, v, first, count));
        }
        let compressed = (!parts.is_empty()).then(|| {
            let (ks, vs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
            (Tensor::cat(ks, 2), Tensor::cat(vs, 2))
        });
        let l = c.compress_block_size;
        let (tail_k, tail_v) = (decode_ring(raw_k, l), decode_ring(values, l));
        let (ck, cv) = self.compress.with_memory(b, compressed);

        // 3. the queries a chunk at a time over every key
        // (the output's rows written in place: `[b, 1, n, dim]`)
        let (keys, vals) = kv.buffers();
        let dim = x.dims()[2];
        let mut out = Tensor::zeros([b, 1, n, dim], &device);
        for (s, len) in spans() {
            let xs = x.clone().narrow(1, s, len);
            let normed = self.normed(xs.clone());
            let q = self.qkv(kernels, normed.clone()).q;
            let branches = self.branches(kernels, q, (&ck, &cv), (keys, vals), s, scale);
            let h = self.mix(kernels, normed, branches) + xs;
            let rows = ff.forward(kernels, h.clone()) + h;
            out = kernels.write_rows(out, s, rows.unsqueeze_dim(1));
        }
        let out = out.reshape([b, n, dim]);
        let cache = NsaCache {
            kv,
            compressed: KvBuffer::new(ck, cv, extra / stride + 1),
            tail_k,
            tail_v,
            gather: None,
        };
        (out, cache)
    }
}
