//! The interface between the model and the fused kernels: tensors and sizes only (no model
//! type), so that the kernels are a crate of their own beneath the model.
//!
//! The model code is generic over `B: Backend` and computes every branch with tensor ops (the
//! portable path, and the test oracle). A backend with faster kernels has an [`NsaKernels`]
//! implementation; every method may answer `None` for a case it does not handle, and the model
//! then uses its tensor ops. Arguments and results are exactly those of the tensor-op function
//! each method replaces.
//!
//! Legend: `b` batch, `h` query heads, `kvh` key/value heads, `hs` selection heads, `n` query
//! positions, `d` features per head, `mem` memory slots, `nc` valid compressed rows.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;

use crate::rules::SparseSizes;

/// The blocks chosen for each query.
#[derive(Clone, Debug)]
pub struct Selection<B: Backend> {
    /// Selected block indices `[batch, sel_heads, seq, n]`.
    pub indices: Tensor<B, 4, Int>,
    /// Their probabilities `[batch, sel_heads, seq, n]` (straight-through gates with diff-topk).
    pub scores: Tensor<B, 4>,
    /// Whether each selected block may be attended ([`crate::rules::block_is_valid`]).
    pub valid: Tensor<B, 4, Bool>,
}

/// A linear layer's parameters: `weight` `[d_in, d_out]` (Burn's layout), `bias` `[d_out]`.
#[derive(Clone, Debug)]
pub struct Projection<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Tensor<B, 2>,
    /// `[d_out]`.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Projection<B> {
    /// The parameters of `layer`.
    pub fn of(layer: &Linear<B>) -> Self {
        Self {
            weight: layer.weight.val(),
            bias: layer.bias.as_ref().map(|b| b.val()),
        }
    }
}

/// An RMSNorm's scale `[dim]` and the epsilon added to the mean square.
#[derive(Clone, Debug)]
pub struct RowNorm<B: Backend> {
    /// `[dim]`.
    pub weight: Tensor<B, 1>,
    /// Added to the mean square.
    pub eps: f64,
}

/// A pre-norm feed-forward `x + fc2(gelu(fc1(norm(x))))`.
#[derive(Clone, Debug)]
pub struct FeedForwardParams<B: Backend> {
    /// The pre-norm.
    pub norm: RowNorm<B>,
    /// `dim → hidden`.
    pub fc1: Projection<B>,
    /// `hidden → dim`.
    pub fc2: Projection<B>,
}

/// Cached keys and values: buffers `[batch, kv_heads, capacity, dim_head]` whose first `len`
/// rows are valid.
#[derive(Clone, Copy, Debug)]
pub struct CachedKv<'a, B: Backend> {
    /// Keys.
    pub k: &'a Tensor<B, 4>,
    /// Values.
    pub v: &'a Tensor<B, 4>,
    /// Valid rows.
    pub len: usize,
}

/// A sampling rule as the device kernel takes it (no top-p).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    /// Arg-max only (temperature 0).
    pub greedy: bool,
    /// The top-k filter's count (the vocabulary when off).
    pub kept: usize,
    /// `1 / temperature`.
    pub inv_temp: f32,
}

/// Fused implementations of the sparse branches for one backend. Every method may answer
/// `None` for a case it does not handle; the caller then uses the tensor-op path. Arguments and
/// results are exactly those of the tensor-op function each method replaces.
pub trait NsaKernels<B: Backend>: Send + Sync {
    /// The selected branch (`nsa_model::select::selected_attention`): rotated `q` `[batch,
    /// heads, seq, dim_head]` at positions `start..start + seq`, rotated `k` and `v` `[batch,
    /// kv_heads, keys, dim_head]` at positions `0..keys` (`keys >= start + seq`: a chunk of a
    /// prompt's queries over all its keys; `start` 0 and `keys == seq` for a whole sequence),
    /// the selected blocks → `[batch, heads, seq, dim_head]`. The selection has
    /// `sizes.selection_heads()` heads, or one shared by every head (DSA's; with
    /// `share_selection`, ungated).
    #[allow(clippy::too_many_arguments)]
    fn selected_attention(
        &self,
        _q: &Tensor<B, 4>,
        _k: &Tensor<B, 4>,
        _v: &Tensor<B, 4>,
        _selection: Option<&Selection<B>>,
        _start: usize,
        _sizes: &SparseSizes,
        _scale: f64,
    ) -> Option<Tensor<B, 4>> {
        None
    }

    /// The sliding branch (`nsa_model::sliding::sliding_attention`), queries at `start..` and
    /// keys at `0..` as in [`NsaKernels::selected_attention`].
    fn sliding_attention(
        &self,
        _q: &Tensor<B, 4>,
        _k: &Tensor<B, 4>,
        _v: &Tensor<B, 4>,
        _start: usize,
        _window: usize,
        _scale: f64,
    ) -> Option<Tensor<B, 4>> {
        None
    }

    /// `topk_with_indices(k, 3)` of `x` `[batch, heads, seq, len]` without a host round trip
    /// (Burn's default sort reads the tensor back to the host). Ties: the lower index first.
    fn top_k(&self, _x: &Tensor<B, 4>, _k: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4, Int>)> {
        None
    }

    /// The compressed branch and the block selection it drives, for queries at positions
    /// `start..start + seq` (a whole sequence from 0, or a chunk of a prompt's queries over the
    /// compressed keys of the whole prompt): `q` `[batch, heads, seq, dim_head]` (not rotated), memory +
    /// compressed keys/values `ck`, `cv` `[batch, kv_heads, mem + blocks, dim_head]` → the
    /// branch output (as the model's `Compressor::attend`) and the selection (as its
    /// `select::importance` then `select::select_top`), without
    /// materialising the `[seq, blocks]` importance logits.
    #[allow(clippy::too_many_arguments)]
    fn compressed_and_selection(
        &self,
        _q: &Tensor<B, 4>,
        _ck: &Tensor<B, 4>,
        _cv: &Tensor<B, 4>,
        _start: usize,
        _num_mem: usize,
        _sizes: &SparseSizes,
        _scale: f64,
    ) -> Option<(Tensor<B, 4>, Option<Selection<B>>)> {
        None
    }

    /// DSA's token selection ([`crate::rules::dsa_selected_tokens`]) without a host round
    /// trip: the indexer's `scores` `[batch, seq, keys]` of the queries at positions
    /// `offset..offset + seq` → `[batch, seq, keys]`, `true` where the query does not attend
    /// the key (not selected, or in the future).
    fn token_blocked(
        &self,
        _scores: &Tensor<B, 3>,
        _offset: usize,
        _top_k: usize,
    ) -> Option<Tensor<B, 3, Bool>> {
        None
    }

    /// The tokens a DSA decode step attends in the global branch, without a host round trip:
    /// the indexer's `scores` `[batch, 1, keys]` of the query at `position < keys` →
    /// `[batch, min(top_k, position + 1)]`, ascending (the rule of
    /// [`crate::rules::dsa_selected_tokens`]).
    fn token_positions(
        &self,
        _scores: &Tensor<B, 3>,
        _position: usize,
        _top_k: usize,
    ) -> Option<Tensor<B, 2, Int>> {
        None
    }

    /// DSA's selection as positions, without a host round trip: the indexer's `scores`
    /// `[batch, seq, keys]` of the queries at positions `offset..offset + seq` (`offset + seq <=
    /// keys`) → `[batch, seq, top_k - 1]`, the tokens each query keeps besides its own
    /// ([`crate::rules::dsa_selected_tokens`] without the query's position), ascending, `-1`
    /// after the last (a query with fewer earlier tokens). `top_k >= 2`.
    fn token_others(
        &self,
        _scores: &Tensor<B, 3>,
        _offset: usize,
        _top_k: usize,
    ) -> Option<Tensor<B, 3, Int>> {
        None
    }

    /// `buffer` `[batch, heads, capacity, dim]` with rows `start..start + n` replaced by `rows`
    /// `[batch, heads, n, dim]` (the decode cache's writes). The default is Burn's
    /// `slice_assign`; a backend whose `slice_assign` copies the whole buffer may write in place.
    fn write_rows(&self, buffer: Tensor<B, 4>, start: usize, rows: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::dispatch::write_rows_with_slice_assign(buffer, start, rows)
    }

    /// Whether [`NsaKernels::linear_row`] can answer at all (checked before the row is
    /// reshaped for it: on a fusion backend even a reshape is an operation of the stream).
    fn has_linear_row(&self) -> bool {
        false
    }

    /// `x · weight + bias` for one row `x` `[1, d_in]`, `weight` `[d_in, d_out]`, `bias`
    /// `[d_out]` → `[1, d_out]`: the projections of a decode step, where a backend has a faster
    /// matrix-vector product than its matmul.
    fn linear_row(
        &self,
        _weight: &Tensor<B, 2>,
        _bias: Option<&Tensor<B, 1>>,
        _x: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// The attention of one decode step of an NSA layer in one operation: the compressed
    /// branch, the block selection it drives, the selected and sliding branches, and their
    /// gated mix (what `SparseAttention::step` computes with tensor ops between the projection
    /// and `combine_heads`) → `[batch, 1, heads * dim_head]`.
    fn decode_attention(&self, _inputs: &DecodeInputs<'_, B>) -> Option<Tensor<B, 3>> {
        None
    }

    /// `act(norm(x) · W + bias) + residual` ([`RowLinear`]) for `x` `[batch, seq, d_in]` with
    /// few rows (a decode step's), in one operation.
    fn row_linear(&self, _x: &Tensor<B, 3>, _spec: &RowLinear<'_, B>) -> Option<Tensor<B, 3>> {
        None
    }

    /// `norm(x) · first + bias` and `norm(x) · second + bias` (each with its own bias) for the
    /// few rows of a decode step in one operation: the NSA layer's `to_qkv` and gate
    /// projections, which read the same normed row.
    fn row_linear_pair(
        &self,
        _x: &Tensor<B, 3>,
        _norm: Option<&RowNorm<B>>,
        _first: &Projection<B>,
        _second: &Projection<B>,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
        None
    }

    /// The decode step's cache writes in one operation: from the projection row `qkv`
    /// (as in [`DecodeInputs`]), the key rotated by `cos`/`sin` and the value into row `pos` of
    /// the key/value cache, the un-rotated key and value into row `slot` of the compression
    /// ring. `buffers`: `[k cache, v cache, k ring, v ring]`, each `[batch, kv_heads, rows,
    /// dim_head]`, returned written; given back unchanged as `Err` when not handled.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn decode_write(
        &self,
        _qkv: &Tensor<B, 3>,
        _cos: &Tensor<B, 4>,
        _sin: &Tensor<B, 4>,
        buffers: [Tensor<B, 4>; 4],
        _heads: usize,
        _pos: usize,
        _slot: usize,
    ) -> Result<[Tensor<B, 4>; 4], [Tensor<B, 4>; 4]> {
        Err(buffers)
    }

    /// One decode step of an NSA block in one operation ([`BlockStep`]): the normed projection
    /// with the gate logits, the cache writes into `buffers` (`[k cache, v cache, k ring, v
    /// ring]`, as [`NsaKernels::decode_write`]), the attention, the output projection with the
    /// residual and, when given, the feed-forward with its residual → the block's output
    /// `[batch, 1, dim]` and the written buffers; the buffers back unchanged as `Err` when not
    /// handled. One operation of the backend's stream instead of six.
    #[allow(clippy::type_complexity)]
    fn decode_block(
        &self,
        _step: &BlockStep<'_, B>,
        buffers: [Tensor<B, 4>; 4],
    ) -> Result<(Tensor<B, 3>, [Tensor<B, 4>; 4]), [Tensor<B, 4>; 4]> {
        Err(buffers)
    }

    /// The next token of each row of `logits` `[rows, vocab]` under `rule`, on the device:
    /// the model's `Sampling::sample` choice for the same logits and noise key (row `r`:
    /// `r` added to the key's low 32 bits, wrapping) → token ids `[rows]`. Lets a decode loop feed the token to the next step
    /// without reading the logits back.
    fn sample_tokens(
        &self,
        _logits: &Tensor<B, 2>,
        _rule: &DeviceSampling,
        _key: u64,
    ) -> Option<Tensor<B, 1, Int>> {
        None
    }
}

/// One projection of [`NsaKernels::row_linear`]: `act(norm(x) · W + bias) + residual`.
pub struct RowLinear<'a, B: Backend> {
    /// RMSNorm of the input first.
    pub norm: Option<&'a RowNorm<B>>,
    /// The projection (its bias, if any, included).
    pub layer: &'a Projection<B>,
    /// GELU after the bias.
    pub gelu: bool,
    /// Added last, `[batch, seq, d_out]`.
    pub residual: Option<&'a Tensor<B, 3>>,
}

/// The sizes of one [`NsaKernels::decode_attention`] call, checked against each other
/// ([`DecodeShape::of`]); what every implementation of it needs besides the data.
#[derive(Clone, Debug)]
pub struct DecodeShape {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    /// Query heads per selection head (`h / kvh` when heads share their selection, else 1).
    pub group_heads: usize,
    /// Columns of the projection row (`(h + 2 kvh) * d`).
    pub width: usize,
    /// The query's position.
    pub pos: usize,
    /// Valid compressed rows (memory + blocks) and the compressed buffer's capacity.
    pub nc: usize,
    pub compressed_capacity: usize,
    /// Capacity of the key/value cache.
    pub cap: usize,
    /// Memory slots.
    pub mem: usize,
    /// Compressed slots per selection block (at least 1).
    pub per_block: usize,
    /// Selection block size.
    pub sel: usize,
    /// Sliding window.
    pub window: usize,
    /// Blocks selected at this position ([`crate::rules::selected_count`]), and at most.
    pub topn: usize,
    pub nsel: usize,
    /// Keys of selected blocks gated by their probability (`use_diff_topk`).
    pub gated: bool,
    pub scale: f64,
}

impl DecodeShape {
    /// The sizes of `s`, or `None` when its tensors do not fit together (or are not floats).
    pub fn of<B: Backend>(s: &DecodeInputs<'_, B>) -> Option<Self> {
        let (ck, cv) = (s.compressed.k, s.compressed.v);
        let (k, v) = (s.kv.k, s.kv.v);
        if s.kv.len == 0 {
            return None;
        }
        Self::new(
            s.sizes,
            s.qkv.dims(),
            s.qkv.dtype(),
            [ck, cv, k, v, s.cos, s.sin],
            s.kv.len,
            s.num_mem,
            s.compressed.len,
            s.scale,
        )
    }

    /// The sizes of a decode step from its parts: the projection row's shape and dtype, the
    /// compressed and key/value buffers and the rotation (`[ck, cv, k, v, cos, sin]`), the
    /// positions in the key/value cache with the new one (`kv_len`), the memory slots and the
    /// valid compressed rows.
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend>(
        c: &SparseSizes,
        [b, one, width]: [usize; 3],
        dtype: DType,
        [ck, cv, k, v, cos, sin]: [&Tensor<B, 4>; 6],
        kv_len: usize,
        num_mem: usize,
        nc: usize,
        scale: f64,
    ) -> Option<Self> {
        let [cb, kvh, compressed_capacity, d] = ck.dims();
        let [kb, kvh2, cap, d2] = k.dims();
        let h = c.heads;
        let same = [ck, cv, k, v, cos, sin].iter().all(|t| t.dtype() == dtype);
        if !dtype.is_float()
            || !same
            || one != 1
            || (cb, kb, kvh2, d2) != (b, b, kvh, d)
            || cv.dims() != ck.dims()
            || v.dims() != k.dims()
            || cos.dims() != [1, 1, 1, d]
            || sin.dims() != [1, 1, 1, d]
            || kvh == 0
            || d % 2 != 0
            || !h.is_multiple_of(kvh)
            || width != (h + 2 * kvh) * d
            || kv_len == 0
            || kv_len > cap
            || num_mem == 0
            || nc < num_mem
            || nc > compressed_capacity
        {
            return None;
        }
        let g = h / kvh;
        let per_block = c.per_selection();
        let complete = (nc - num_mem) / per_block;
        Some(Self {
            b,
            h,
            kvh,
            d,
            group_heads: if c.share_selection { g } else { 1 },
            width,
            pos: kv_len - 1,
            nc,
            compressed_capacity,
            cap,
            mem: num_mem,
            per_block,
            sel: c.selection_block,
            window: c.window,
            topn: c.selected(complete),
            nsel: c.num_selected,
            gated: c.diff_topk,
            scale,
        })
    }

    /// Complete selection blocks.
    pub fn complete(&self) -> usize {
        (self.nc - self.mem) / self.per_block
    }
}

/// The inputs of [`NsaKernels::decode_block`]: an NSA block's parameters and the state of its
/// decode cache for the token at row `pos`.
pub struct BlockStep<'a, B: Backend> {
    /// The block's input `[batch, 1, dim]` (the attention's residual).
    pub x: &'a Tensor<B, 3>,
    /// The attention's pre-norm.
    pub norm: Option<&'a RowNorm<B>>,
    /// `dim → (heads + 2 kv_heads) * dim_head`.
    pub to_qkv: &'a Projection<B>,
    /// The gate projection `dim → 3 * heads`.
    pub gates: &'a Projection<B>,
    /// `heads * dim_head → dim`.
    pub combine: &'a Projection<B>,
    /// The block's feed-forward, applied (with its residual) after the attention when given.
    pub ff: Option<&'a FeedForwardParams<B>>,
    /// The position's rotation (as [`DecodeInputs`]).
    pub cos: &'a Tensor<B, 4>,
    /// See `cos`.
    pub sin: &'a Tensor<B, 4>,
    /// Memory and compressed keys/values of every block that ended before the position.
    pub compressed: CachedKv<'a, B>,
    /// Memory slots at the front of `compressed`.
    pub num_mem: usize,
    /// The layer's sizes.
    pub sizes: &'a SparseSizes,
    /// Softmax scale.
    pub scale: f64,
    /// The position (its row in the key/value cache).
    pub pos: usize,
    /// Its row in the compression ring.
    pub slot: usize,
}

/// The inputs of [`NsaKernels::decode_attention`] for the token at position `kv.len() - 1`.
pub struct DecodeInputs<'a, B: Backend> {
    /// The layer's projection of the (normed) token, `[batch, 1, (heads + 2 kv_heads) *
    /// dim_head]`: un-rotated queries, then keys and values.
    pub qkv: &'a Tensor<B, 3>,
    /// The position's rotation: cosines and signed sines `[1, 1, 1, dim_head]`
    /// (the model's `rope::Rotation`).
    pub cos: &'a Tensor<B, 4>,
    /// See `cos`.
    pub sin: &'a Tensor<B, 4>,
    /// Memory and compressed keys/values of every block that ended before the position.
    pub compressed: CachedKv<'a, B>,
    /// Memory slots at the front of `compressed`.
    pub num_mem: usize,
    /// Rotated keys and values of every position up to and including this one.
    pub kv: CachedKv<'a, B>,
    /// The gate logits `[batch, 1, 3 * heads]` (column `3 * head + branch`), computed only
    /// when the kernel runs.
    pub gate_logits: &'a dyn Fn() -> Tensor<B, 3>,
    /// The layer's sizes.
    pub sizes: &'a SparseSizes,
    /// Softmax scale.
    pub scale: f64,
}
