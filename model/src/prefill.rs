//! A long prompt's prefill a chunk of positions at a time through every block: the same
//! outputs and decode cache as the one-piece prefill ([`SparseAttention::prefill`], then the
//! block's feed-forward), in memory of the caches plus one chunk's working set.
//!
//! Legend: `b` batch, `n` prompt positions, `c` positions of a chunk starting at `s`, `dim`
//! model width, `h` query heads, `kvh` key/value heads, `d` features per head, `l`
//! compression block, `m` memory slots.
//!
//! The decode cache of every layer is allocated first, for the prompt and the tokens to come
//! ([`SparseAttention::empty_cache`], in exactly sized device buffers). Then per chunk, the
//! embedding of its tokens goes through every block ([`SparseAttention::extend_block`]):
//!
//! 1. the block's queries, keys and values of the chunk's rows; the rotated keys and the values
//!    written into the cache after the `s` rows it holds;
//! 2. the compression blocks that end in the chunk, pooled from the ring of the `l` positions
//!    before `s` (un-rotated keys and values) followed by the chunk's; the ring then holds the
//!    chunk's last `l` positions;
//! 3. the three branches with the chunk's queries at `s..s + c` over the cache (every key up to
//!    `s + c`: the layer's branches with `start = s`, the fused kernels where the backend has
//!    them), the gates, the output projection, the residual and the feed-forward → the
//!    block's output rows, the next block's input.
//!
//! What a prefill holds besides the caches is one chunk's working set: nothing grows with the
//! prompt except the caches (the logits of the positions asked for aside).

use burn::prelude::*;

use crate::cache::{KvBuffer, NsaCache};
use crate::kernels::Kernels;
use crate::memory::exact_allocation;
use crate::nsa::{ring_ending, SparseAttention};
use crate::rope::Rotation;
use crate::transformer::FeedForward;

impl<B: Backend> SparseAttention<B> {
    /// An empty decode cache with room for `capacity` positions at batch `batch`: keys and
    /// values (a whole number of selection blocks), the memory slots followed by room for
    /// every compression block of `capacity` positions, and a compression ring of zeros. The
    /// two large buffers are exactly sized ([`exact_allocation`]).
    pub fn empty_cache(
        &self,
        kernels: &Kernels<B>,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> NsaCache<B> {
        let c = &self.config;
        let (kvh, d) = (c.kv_heads(), c.dim_head);
        let shape = [batch, kvh, d];
        let sel = c.selection_block_size;
        let m = self.compress.num_mem();
        let slots = m + capacity / c.compress_block_sliding_stride + 1;
        let (kv, compressed) = exact_allocation::<B, _>(device, || {
            (
                KvBuffer::empty_aligned(shape, capacity, sel, device),
                KvBuffer::empty(shape, slots, device),
            )
        });
        let compressed = match m {
            0 => compressed,
            _ => {
                let (mk, mv) = self.compress.with_memory(batch, None);
                compressed.push(kernels, mk, mv)
            }
        };
        let ring = || Tensor::zeros([batch, kvh, c.compress_block_size, d], device);
        NsaCache {
            kv,
            compressed,
            tail_k: ring(),
            tail_v: ring(),
            gather: None,
        }
    }

    /// The block of this attention and `ff` over `x` `[b, c, dim]`, the `c` positions after
    /// the `s` that `cache` holds: the block's output `x + a + ff(x + a)` `[b, c, dim]` (`a` the
    /// attention of `x` over every position up to its own) and the cache holding `s + c`
    /// positions; `rotation` is that of positions `s..s + c` (the same for every block). A
    /// prompt's chunks through this give what [`Self::prefill`] and the feed-forward give in
    /// one piece.
    pub fn extend_block(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        ff: &FeedForward<B>,
        cache: NsaCache<B>,
        rotation: &Rotation<B>,
    ) -> (Tensor<B, 3>, NsaCache<B>) {
        let [_, n, _] = x.dims();
        let c = &self.config;
        let (l, stride) = (c.compress_block_size, c.compress_block_sliding_stride);
        let NsaCache {
            kv,
            compressed,
            tail_k,
            tail_v,
            gather,
        } = cache;
        let s = kv.len();

        // 1. queries, keys and values; the rotated keys and the values into the cache
        let normed = self.normed(x.clone());
        let qkv = self.qkv(kernels, normed.clone());
        let rotated = rotation.apply(qkv.k.clone());
        let kv = kv.push(kernels, rotated, qkv.v.clone());

        // 2. the blocks that end in the chunk, from positions `s - l..s + c` (the ring in
        //    position order: the oldest, `s - l`, sits in row `s % l`)
        let window = |ring: Tensor<B, 4>, rows: Tensor<B, 4>| {
            Tensor::cat(vec![ring.roll_dim(s % l, 2), rows], 2)
        };
        let (wk, wv) = (window(tail_k, qkv.k), window(tail_v, qkv.v));
        let (first, end) = (s / stride, (s + n) / stride);
        let compressed = match end - first {
            0 => compressed,
            count => {
                // block `first` starts at `(first + 1) * stride - l`, row `(first + 1) * stride - s`
                let at = (first + 1) * stride - s;
                let rows = wk.dims()[2] - at;
                let (nk, nv) = self.compress.pool_windows(
                    kernels,
                    wk.clone().narrow(2, at, rows),
                    wv.clone().narrow(2, at, rows),
                    count,
                );
                compressed.push(kernels, nk, nv)
            }
        };
        let (tail_k, tail_v) = (ring_ending(wk, l, s + n), ring_ending(wv, l, s + n));

        // 3. the branches of the chunk's queries over every key up to theirs, the mix, the
        //    residual and the feed-forward
        let (ck, cv) = compressed.all();
        let (keys, values) = kv.buffers();
        let kv_all = (keys, values);
        let branches = self.branches(kernels, qkv.q, (&ck, &cv), kv_all, s, rotation);
        let h = self.mix(kernels, normed, branches) + x;
        let out = ff.forward(kernels, h.clone()) + h;
        let cache = NsaCache {
            kv,
            compressed,
            tail_k,
            tail_v,
            gather,
        };
        (out, cache)
    }
}
