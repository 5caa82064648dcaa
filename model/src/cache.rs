//! Decode-time state: key/value caches for every layer, so that generating token `t + 1`
//! costs work independent of `t` for the sliding-window and selection branches (the compressed
//! branch grows as `t / stride`, full attention as `t`).
//!
//! Buffers are preallocated with spare capacity and written in place
//! ([`Kernels::write_rows`]: `slice_assign` on a uniquely owned tensor), doubling when full, so
//! appending is amortised O(1).

use burn::prelude::*;

use crate::config::{AttentionKind, TransformerConfig};
use crate::kernels::{CachedKv, Kernels};
use crate::rope::RopeTable;

/// Bytes of the caches of a `tokens`-token generation (prompt and new tokens together) at
/// batch `batch`, `elem_bytes` per value, as the prefill sizes them: every layer keeps the
/// keys and values of every position (NSA: rounded up to whole selection blocks), and NSA also
/// its compressed keys and values (the memory slots and one per stride, and one more) and the
/// ring of the last compression block; DSA also the indexer's key of every position. The
/// prefill's working set comes on top.
pub fn cache_bytes(
    config: &TransformerConfig,
    batch: usize,
    tokens: usize,
    elem_bytes: usize,
) -> u64 {
    // in u128: a request may ask for any number of tokens
    let row = (batch * config.kv_heads() * config.dim_head * elem_bytes) as u128;
    let tokens = tokens as u128;
    let s = &config.sparse;
    let rows = match config.attention {
        AttentionKind::Full | AttentionKind::Dsa => tokens,
        AttentionKind::Nsa => {
            let sel = s.selection_block_size.max(1) as u128;
            let stride = s.compress_block_sliding_stride.max(1) as u128;
            tokens.max(1).div_ceil(sel) * sel
                + s.num_compressed_mem_kv as u128
                + tokens / stride
                + 1
                + s.compress_block_size as u128
        }
    };
    // DSA: the indexer's key of every position
    let index = match config.attention {
        AttentionKind::Dsa => {
            let width = config.dsa.index_dim_head(config.dim_head);
            (batch * width * elem_bytes) as u128 * tokens
        }
        _ => 0,
    };
    // keys and values
    let bytes = (2 * row * rows + index) * config.depth as u128;
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Keys and values along the sequence axis, `[batch, kv_heads, capacity, dim_head]`, of which
/// the first `len` rows are valid.
#[derive(Debug, Clone)]
pub struct KvBuffer<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
    /// The capacity is always a multiple of this (so the buffer reshapes into whole blocks).
    align: usize,
}

fn grow<B: Backend>(t: Tensor<B, 4>, extra: usize) -> Tensor<B, 4> {
    if extra == 0 {
        return t;
    }
    let mut shape = t.dims();
    shape[2] = extra;
    let device = t.device();
    Tensor::cat(vec![t, Tensor::zeros(shape, &device)], 2)
}

impl<B: Backend> KvBuffer<B> {
    /// A buffer holding `k`, `v` `[batch, kv_heads, n, dim_head]` with room for `extra` more rows.
    pub fn new(k: Tensor<B, 4>, v: Tensor<B, 4>, extra: usize) -> Self {
        Self::aligned(k, v, extra, 1)
    }

    /// As [`Self::new`], with a capacity that is always a multiple of `align` rows (at least
    /// `n + extra`), so that [`Self::blocks`] can view the buffer as blocks of `align` rows.
    pub fn aligned(k: Tensor<B, 4>, v: Tensor<B, 4>, extra: usize, align: usize) -> Self {
        let len = k.dims()[2];
        let align = align.max(1);
        let extra = (len + extra).max(1).div_ceil(align) * align - len;
        Self {
            k: grow(k, extra),
            v: grow(v, extra),
            len,
            align,
        }
    }

    /// An empty buffer with room for `capacity` rows.
    pub fn empty(shape: [usize; 3], capacity: usize, device: &B::Device) -> Self {
        let [b, h, d] = shape;
        let shape = [b, h, capacity.max(1), d];
        Self {
            k: Tensor::zeros(shape, device),
            v: Tensor::zeros(shape, device),
            len: 0,
            align: 1,
        }
    }

    /// An empty buffer with room for `capacity` rows rounded up to a multiple of `align`, which
    /// its capacity stays a multiple of ([`Self::aligned`]).
    pub fn empty_aligned(
        shape: [usize; 3],
        capacity: usize,
        align: usize,
        device: &B::Device,
    ) -> Self {
        let align = align.max(1);
        Self {
            align,
            ..Self::empty(shape, capacity.max(1).div_ceil(align) * align, device)
        }
    }

    /// Key/value heads.
    pub fn heads(&self) -> usize {
        self.k.dims()[1]
    }

    /// Rows the buffer holds before it must grow.
    pub fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// The whole buffer (valid rows and the spare capacity after them) as blocks of `block`
    /// rows: `[batch * kv_heads * capacity / block, block * dim_head]` for keys and values,
    /// block `j` of kv head `h` (of batch `b`) at row `(b * kv_heads + h) * capacity / block +
    /// j`. A reshape of the buffer, no copy; `None` unless `block` divides the alignment.
    pub fn blocks(&self, block: usize) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        if block == 0 || !self.align.is_multiple_of(block) {
            return None;
        }
        let [b, h, cap, d] = self.k.dims();
        let shape = [b * h * cap / block, block * d];
        Some((self.k.clone().reshape(shape), self.v.clone().reshape(shape)))
    }

    /// The whole key and value buffers `[batch, kv_heads, capacity, dim_head]` (valid rows
    /// first).
    pub fn buffers(&self) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        (&self.k, &self.v)
    }

    /// Valid rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no row is valid.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` `[batch, kv_heads, n, dim_head]`.
    pub fn push(self, kernels: &Kernels<B>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let n = k.dims()[2];
        let (buffer, ()) = self.append_with(n, |buf_k, buf_v, at| {
            let written = (
                kernels.write_rows(buf_k, at, k),
                kernels.write_rows(buf_v, at, v),
            );
            (written, ())
        });
        buffer
    }

    /// Appends `n` rows that `write` puts in: it gets the key and value buffers (grown if they
    /// had no room) and the first row to write, and returns the buffers with whatever else it
    /// made, which comes back beside the new buffer.
    #[allow(clippy::type_complexity)]
    pub fn append_with<R>(
        self,
        n: usize,
        write: impl FnOnce(Tensor<B, 4>, Tensor<B, 4>, usize) -> ((Tensor<B, 4>, Tensor<B, 4>), R),
    ) -> (Self, R) {
        let cap = self.k.dims()[2];
        let extra = if self.len + n > cap {
            (self.len + n).max(2 * cap).div_ceil(self.align) * self.align - cap
        } else {
            0
        };
        let ((k, v), made) = write(grow(self.k, extra), grow(self.v, extra), self.len);
        let buffer = Self {
            k,
            v,
            len: self.len + n,
            align: self.align,
        };
        (buffer, made)
    }

    /// The buffers and valid rows as the fused kernels take them.
    pub fn cached(&self) -> CachedKv<'_, B> {
        CachedKv {
            k: &self.k,
            v: &self.v,
            len: self.len,
        }
    }

    /// Rows `start..start + n`, `[batch, kv_heads, n, dim_head]` each.
    pub fn rows(&self, start: usize, n: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            self.k.clone().narrow(2, start, n),
            self.v.clone().narrow(2, start, n),
        )
    }

    /// All valid rows.
    pub fn all(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        self.rows(0, self.len)
    }
}

/// Cache of one sparse-attention layer.
#[derive(Debug, Clone)]
pub struct NsaCache<B: Backend> {
    /// Rotated keys and values of every position so far (selection and sliding window).
    pub kv: KvBuffer<B>,
    /// The memory key/values followed by the compressed keys and values of every complete
    /// compression block.
    pub compressed: KvBuffer<B>,
    /// Un-rotated keys and values of the last `compress_block_size` positions (zeros before the
    /// start), the input of the next compression block, as a ring: position `p` in row
    /// `p % compress_block_size`, `[batch, kv_heads, block, dim_head]` each. One row is written
    /// per decoded token; the ring is put in order only when a block is pooled.
    pub tail_k: Tensor<B, 4>,
    /// See `tail_k`.
    pub tail_v: Tensor<B, 4>,
    /// Index and mask tensors of the decode step's block gather, kept on the device between
    /// tokens (built when the cache's capacity or the number of gathered blocks changes).
    pub gather: Option<GatherTables<B>>,
}

/// Device-side constants of [`crate::select::selected_attention_step`] for one cache capacity and
/// block count: uploading them every token cost more than the step's arithmetic on a GPU.
#[derive(Debug, Clone)]
pub struct GatherTables<B: Backend> {
    /// Cache capacity (rows) the tables were built for.
    pub capacity: usize,
    /// Gathered blocks per selection head (selected + own).
    pub total: usize,
    /// First block-view row of each selection head's kv head, `[batch, sel_heads, 1, total]`.
    pub first: Tensor<B, 4, Int>,
    /// Row `r`: the gathered key rows a query at offset `r` of its own block may not see (the
    /// own block's rows after it), `[selection_block, total * selection_block]`.
    pub beyond: Tensor<B, 2, Bool>,
}

/// Cache of one dense-attention layer: rotated keys and values of every position so far.
#[derive(Debug, Clone)]
pub struct FullCache<B: Backend> {
    /// Keys and values.
    pub kv: KvBuffer<B>,
}

/// Cache of one DeepSeek-sparse-attention layer.
#[derive(Debug, Clone)]
pub struct DsaCache<B: Backend> {
    /// Rotated keys and values of every position so far.
    pub kv: KvBuffer<B>,
    /// The indexer's key of every position so far, `[batch, len, index width]` (appended with
    /// a copy per token: the indexer reads all of them anyway).
    pub index_keys: Tensor<B, 3>,
}

/// Cache of one layer.
#[derive(Debug, Clone)]
pub enum LayerCache<B: Backend> {
    /// Sparse attention.
    Nsa(NsaCache<B>),
    /// Dense attention.
    Full(FullCache<B>),
    /// DeepSeek sparse attention.
    Dsa(DsaCache<B>),
}

/// Decode state of a whole model.
#[derive(Debug, Clone)]
pub struct Cache<B: Backend> {
    /// One per layer.
    pub layers: Vec<LayerCache<B>>,
    /// Tokens seen so far (the position of the next token).
    pub len: usize,
    /// Rotations of the coming positions, kept on the device.
    pub rope: RopeTable<B>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    /// Bytes of every buffer a prefill's cache holds (the oracle of [`cache_bytes`]).
    fn held(cache: &Cache<B>) -> u64 {
        let bytes = |t: &Tensor<B, 4>| t.shape().num_elements() as u64 * 4;
        let kv = |b: &KvBuffer<B>| {
            let (k, v) = b.buffers();
            bytes(k) + bytes(v)
        };
        cache
            .layers
            .iter()
            .map(|l| match l {
                LayerCache::Nsa(c) => {
                    kv(&c.kv) + kv(&c.compressed) + bytes(&c.tail_k) + bytes(&c.tail_v)
                }
                LayerCache::Full(c) => kv(&c.kv),
                LayerCache::Dsa(c) => kv(&c.kv) + c.index_keys.shape().num_elements() as u64 * 4,
            })
            .sum()
    }

    #[test]
    fn the_cache_estimate_covers_what_the_prefill_allocates() {
        let device = Default::default();
        for attention in [AttentionKind::Nsa, AttentionKind::Full, AttentionKind::Dsa] {
            let mut c = TransformerConfig::new(40, 32, 2);
            c.dim_head = 8;
            c.heads = 4;
            c.kv_heads = Some(2);
            c.attention = attention;
            let s = &mut c.sparse;
            s.compress_block_size = 8;
            s.compress_block_sliding_stride = 4;
            s.selection_block_size = 8;
            s.sliding_window_size = 8;
            s.num_selected_blocks = 2;
            let model = c.init::<B>(&device).unwrap();
            for (n, extra) in [(1, 3), (37, 11), (200, 56)] {
                let ids: Vec<i64> = (0..n).map(|i| (i % 40) as i64).collect();
                let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
                let (_, cache) = model.prefill(ids, extra);
                let mut real = held(&cache);
                if attention == AttentionKind::Dsa {
                    // the indexer keys of the new tokens are appended as they come
                    real += (extra * c.dim_head * 4 * c.depth) as u64;
                }
                let estimate = cache_bytes(&c, 1, n + extra, 4);
                // at most a few rows per layer above (rounding of the compressed capacity)
                let row = 2 * 2 * 8 * 4 * 2;
                assert!(
                    estimate >= real && estimate - real <= 4 * row,
                    "{attention:?} {n}+{extra}: estimate {estimate}, held {real}"
                );
            }
        }
        // the seed model's 100K-token caches in f32: 2.5 GB of keys and values, 0.15 GB compressed
        let seed = TransformerConfig::new(21128, 512, 6);
        let gb = cache_bytes(&seed, 1, 100_256, 4) as f64 / 1e9;
        assert!((2.4..2.7).contains(&gb), "{gb}");
    }
}
