//! Fused kernels for the sparse branches, looked up at run time per backend.
//!
//! The model code is generic over `B: Backend` and computes every branch with tensor ops (the
//! portable path, and the test oracle). A backend that has faster kernels registers an
//! [`NsaKernels`] implementation for its type; the branch functions ask [`get`] first and fall
//! back to tensor ops when nothing is registered or a method answers `None` (an unsupported
//! case). Nothing else in the model changes, and no `Backend` bound gains a requirement.
//!
//! With the cargo feature `kernels`, [`register_cube`] registers the CubeCL kernels of
//! `cube` for `CubeBackend<R, F, I, BT>` (CUDA and wgpu share the sources) and for
//! `Autodiff<CubeBackend<..>>` (forward through the same kernels, backward through fused
//! backward kernels). With the feature `fusion` it also registers them for Burn's
//! `Fusion<CubeBackend<..>>` (what the `Cuda<F>` and `Wgpu<F>` aliases are when Burn's `fusion`
//! feature is on, as in the binaries) and its autodiff: each launch is then a custom operation
//! of the fusion stream, and the tensor ops around it still fuse.
//!
//! With the feature `flex`, [`register_flex`] registers a multi-threaded matrix-vector product
//! for Burn's `flex` CPU backend (the projections of a decode step).
//!
//! [`set_enabled`] (or `NSA_KERNELS=0` in the environment) turns every registered kernel off, so
//! one binary can time and check both paths.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use burn::prelude::*;

use burn::nn::Linear;
use burn::tensor::DType;

use crate::cache::KvBuffer;
use crate::config::NsaConfig;
use crate::norm::RmsNorm;
use crate::select::Selection;

#[cfg(feature = "kernels")]
pub mod cube;

#[cfg(feature = "kernels")]
pub use cube::{force_dkdv_splits, register_cube};

pub mod switches;

#[cfg(feature = "flex")]
pub mod flex;
#[cfg(feature = "flex")]
mod flex_decode;

#[cfg(feature = "flex")]
pub use flex::register_flex;

/// Fused implementations of the sparse branches for one backend. Every method may answer
/// `None` for a case it does not handle; the caller then uses the tensor-op path. Arguments and
/// results are exactly those of the tensor-op function each method replaces.
pub trait NsaKernels<B: Backend>: Send + Sync {
    /// [`crate::select::fine_attention`]: rotated `q` `[batch, heads, seq, dim_head]`, rotated
    /// `k` and `v` `[batch, kv_heads, seq, dim_head]`, the selected blocks → `[batch, heads, seq,
    /// dim_head]`.
    fn selected_attention(
        &self,
        _q: &Tensor<B, 4>,
        _k: &Tensor<B, 4>,
        _v: &Tensor<B, 4>,
        _selection: Option<&Selection<B>>,
        _config: &NsaConfig,
        _scale: f64,
    ) -> Option<Tensor<B, 4>> {
        None
    }

    /// [`crate::sliding::sliding_attention`].
    fn sliding_attention(
        &self,
        _q: &Tensor<B, 4>,
        _k: &Tensor<B, 4>,
        _v: &Tensor<B, 4>,
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

    /// The compressed branch and the block selection it drives, for a whole sequence (queries
    /// at positions `0..seq`): `q` `[batch, heads, seq, dim_head]` (not rotated), memory +
    /// compressed keys/values `ck`, `cv` `[batch, kv_heads, mem + blocks, dim_head]` → the
    /// branch output (as [`crate::compress::Compressor::attend`]) and the selection (as
    /// [`crate::select::importance`] then [`crate::select::select_top`]), without
    /// materialising the `[seq, blocks]` importance logits.
    fn compressed_and_selection(
        &self,
        _q: &Tensor<B, 4>,
        _ck: &Tensor<B, 4>,
        _cv: &Tensor<B, 4>,
        _num_mem: usize,
        _config: &NsaConfig,
        _scale: f64,
    ) -> Option<(Tensor<B, 4>, Option<Selection<B>>)> {
        None
    }

    /// `buffer` `[batch, heads, capacity, dim]` with rows `start..start + n` replaced by `rows`
    /// `[batch, heads, n, dim]` (the decode cache's writes). The default is Burn's
    /// `slice_assign`; a backend whose `slice_assign` copies the whole buffer may write in place.
    fn write_rows(&self, buffer: Tensor<B, 4>, start: usize, rows: Tensor<B, 4>) -> Tensor<B, 4> {
        write_rows_with_slice_assign(buffer, start, rows)
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
        _norm: Option<&RmsNorm<B>>,
        _first: &Linear<B>,
        _second: &Linear<B>,
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
    /// [`crate::sampling::Sampling::sample`]'s choice for the same logits and noise key (row `r`:
    /// `r` added to the key's low 32 bits, wrapping) → token ids `[rows]`. Lets a decode loop feed the token to the next step
    /// without reading the logits back.
    fn sample_tokens(
        &self,
        _logits: &Tensor<B, 2>,
        _rule: &crate::sampling::DeviceSampling,
        _key: u64,
    ) -> Option<Tensor<B, 1, Int>> {
        None
    }
}

/// One projection of [`NsaKernels::row_linear`]: `act(norm(x) · W + bias) + residual`.
pub struct RowLinear<'a, B: Backend> {
    /// RMSNorm of the input first.
    pub norm: Option<&'a RmsNorm<B>>,
    /// The projection (its bias, if any, included).
    pub layer: &'a Linear<B>,
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
    pub gq: usize,
    /// Columns of the projection row (`(h + 2 kvh) * d`).
    pub width: usize,
    /// The query's position.
    pub pos: usize,
    /// Valid compressed rows (memory + blocks) and the compressed buffer's capacity.
    pub nc: usize,
    pub capc: usize,
    /// Capacity of the key/value cache.
    pub cap: usize,
    /// Memory slots.
    pub mem: usize,
    /// Compressed slots per selection block (at least 1).
    pub pf: usize,
    /// Selection block size.
    pub sel: usize,
    /// Sliding window.
    pub window: usize,
    /// Blocks selected at this position (`min(nsel, complete blocks)`), and at most.
    pub topn: usize,
    pub nsel: usize,
    /// Keys of selected blocks gated by their probability (`use_diff_topk`).
    pub gated: bool,
    pub scale: f64,
}

impl DecodeShape {
    /// The sizes of `s`, or `None` when its tensors do not fit together (or are not floats).
    pub fn of<B: Backend>(s: &DecodeInputs<'_, B>) -> Option<Self> {
        let (ck, cv) = s.compressed.buffers();
        let (k, v) = s.kv.buffers();
        if s.kv.is_empty() {
            return None;
        }
        Self::new(
            s.config,
            s.qkv.dims(),
            s.qkv.dtype(),
            [ck, cv, k, v, s.cos, s.sin],
            s.kv.len(),
            s.num_mem,
            s.compressed.len(),
            s.scale,
        )
    }

    /// The sizes of a decode step from its parts: the projection row's shape and dtype, the
    /// compressed and key/value buffers and the rotation (`[ck, cv, k, v, cos, sin]`), the
    /// positions in the key/value cache with the new one (`kv_len`), the memory slots and the
    /// valid compressed rows.
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend>(
        c: &NsaConfig,
        [b, one, width]: [usize; 3],
        dtype: DType,
        [ck, cv, k, v, cos, sin]: [&Tensor<B, 4>; 6],
        kv_len: usize,
        num_mem: usize,
        nc: usize,
        scale: f64,
    ) -> Option<Self> {
        let [cb, kvh, capc, d] = ck.dims();
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
            || nc > capc
        {
            return None;
        }
        let g = h / kvh;
        let pf = (c.selection_block_size / c.compress_block_sliding_stride).max(1);
        let fine = (nc - num_mem) / pf;
        Some(Self {
            b,
            h,
            kvh,
            d,
            gq: if c.query_heads_share_selected_kv {
                g
            } else {
                1
            },
            width,
            pos: kv_len - 1,
            nc,
            capc,
            cap,
            mem: num_mem,
            pf,
            sel: c.selection_block_size,
            window: c.sliding_window_size,
            topn: c.num_selected_blocks.min(fine),
            nsel: c.num_selected_blocks,
            gated: c.use_diff_topk,
            scale,
        })
    }

    /// Complete selection blocks.
    pub fn fine(&self) -> usize {
        (self.nc - self.mem) / self.pf
    }
}

/// The inputs of [`NsaKernels::decode_block`]: an NSA block's parameters and the state of its
/// decode cache for the token at row `pos`.
pub struct BlockStep<'a, B: Backend> {
    /// The block's input `[batch, 1, dim]` (the attention's residual).
    pub x: &'a Tensor<B, 3>,
    /// The attention's pre-norm.
    pub norm: Option<&'a RmsNorm<B>>,
    /// `dim → (heads + 2 kv_heads) * dim_head`.
    pub to_qkv: &'a Linear<B>,
    /// The gate projection `dim → 3 * heads`.
    pub gates: &'a Linear<B>,
    /// `heads * dim_head → dim`.
    pub combine: &'a Linear<B>,
    /// The block's feed-forward, applied (with its residual) after the attention when given.
    pub ff: Option<&'a crate::transformer::FeedForward<B>>,
    /// The position's rotation (as [`DecodeInputs`]).
    pub cos: &'a Tensor<B, 4>,
    /// See `cos`.
    pub sin: &'a Tensor<B, 4>,
    /// Memory and compressed keys/values of every block that ended before the position.
    pub compressed: &'a KvBuffer<B>,
    /// Memory slots at the front of `compressed`.
    pub num_mem: usize,
    /// The layer's settings.
    pub config: &'a NsaConfig,
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
    /// ([`crate::rope::Rotation`]).
    pub cos: &'a Tensor<B, 4>,
    /// See `cos`.
    pub sin: &'a Tensor<B, 4>,
    /// Memory and compressed keys/values of every block that ended before the position.
    pub compressed: &'a KvBuffer<B>,
    /// Memory slots at the front of `compressed`.
    pub num_mem: usize,
    /// Rotated keys and values of every position up to and including this one.
    pub kv: &'a KvBuffer<B>,
    /// The gate logits `[batch, 1, 3 * heads]` (column `3 * head + branch`), computed only
    /// when the kernel runs.
    pub gate_logits: &'a dyn Fn() -> Tensor<B, 3>,
    /// The layer's settings.
    pub config: &'a NsaConfig,
    /// Softmax scale.
    pub scale: f64,
}

/// [`NsaKernels::write_rows`] through `slice_assign`.
pub fn write_rows_with_slice_assign<B: Backend>(
    buffer: Tensor<B, 4>,
    start: usize,
    rows: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, n, d] = rows.dims();
    buffer.slice_assign([0..b, 0..h, start..start + n, 0..d], rows)
}

/// [`NsaKernels::write_rows`] of the kernels registered for `B`, else `slice_assign`.
pub fn write_rows<B: Backend>(
    buffer: Tensor<B, 4>,
    start: usize,
    rows: Tensor<B, 4>,
) -> Tensor<B, 4> {
    match get::<B>() {
        Some(k) => k.write_rows(buffer, start, rows),
        None => write_rows_with_slice_assign(buffer, start, rows),
    }
}

type Registry = RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

// 0 = not decided yet (read NSA_KERNELS), 1 = on, 2 = off
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Turns the registered kernels on or off for the whole process (default: on, unless the
/// environment has `NSA_KERNELS=0`, `off` or `false`).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether registered kernels are used.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // an invalid value (refused by the binaries at start-up) leaves the default
            let on = std::env::var("NSA_KERNELS")
                .ok()
                .and_then(|v| switches::parse_flag("NSA_KERNELS", &v).ok())
                .unwrap_or(true);
            set_enabled(on);
            on
        }
    }
}

/// Whether a decode step may run a whole NSA block as one operation
/// ([`NsaKernels::decode_block`]); `NSA_DECODE_BLOCK=0` keeps the operation-by-operation step
/// (for comparing the two in one binary).
pub fn block_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("NSA_DECODE_BLOCK")
            .ok()
            .and_then(|v| switches::parse_flag("NSA_DECODE_BLOCK", &v).ok())
            .unwrap_or(true)
    })
}

/// Registers `kernels` for backend `B` (replacing an earlier registration).
pub fn register<B: Backend>(kernels: Arc<dyn NsaKernels<B>>) {
    registry()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(TypeId::of::<B>(), Box::new(kernels));
}

/// Whether kernels are registered for `B` (regardless of [`enabled`]).
pub fn registered<B: Backend>() -> bool {
    registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&TypeId::of::<B>())
}

/// The kernels registered for `B`, if any and if [`enabled`].
pub fn get<B: Backend>() -> Option<Arc<dyn NsaKernels<B>>> {
    if !enabled() {
        return None;
    }
    registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&TypeId::of::<B>())?
        .downcast_ref::<Arc<dyn NsaKernels<B>>>()
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    struct Nothing;
    impl NsaKernels<NdArray> for Nothing {}

    #[test]
    fn registry_round_trip() {
        assert!(get::<NdArray<f64>>().is_none());
        register::<NdArray>(Arc::new(Nothing));
        assert!(registered::<NdArray>());
        assert!(!registered::<NdArray<f64>>());
        let k = get::<NdArray>().expect("registered");
        let device = Default::default();
        let q = Tensor::<NdArray, 4>::zeros([1, 1, 1, 2], &device);
        assert!(k.sliding_attention(&q, &q, &q, 4, 1.0).is_none());
    }
}
