//! The problems of the CubeCL launches: the shape and dtype checks that decide whether a kernel
//! covers a call, and the sizes it runs with (the NSA rules from [`crate::rules`]).

use burn::prelude::*;
use burn::tensor::{DType, Element};
use burn_cubecl::IntElement;

use super::attention::{COMPRESSED, SELECTED, SLIDING};
use super::launch::{
    self, BlockProblem, DecodeProblem, Problem, RowProblem, RunChoices, SelectSpec, WriteProblem,
};
use super::KernelBackend;
use crate::api::{BlockStep, DecodeInputs, Projection, RowNorm, Selection};
use crate::rules::SparseSizes;

pub(super) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the kernels can run `p` on the device of `q`.
pub(super) fn supported<B: KernelBackend>(q: &Tensor<B, 4>, p: &Problem) -> bool {
    launch::supported(&B::cube_client(&q.device()), p)
}

/// The key rows of `k` when the queries of `q` sit at `start..` and the keys at `0..` (every
/// query's own key among them), or `None`.
fn key_rows<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, start: usize) -> Option<usize> {
    let nk = k.dims()[2];
    (start + q.dims()[2] <= nk).then_some(nk)
}

/// The problem for the selected branch (queries at `start..`, keys at `0..`), or `None` when
/// the kernels do not cover it.
#[allow(clippy::too_many_arguments)]
pub(super) fn selected_problem<B: KernelBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    start: usize,
    [sel_heads, count]: [usize; 2],
    gated: bool,
    sizes: &SparseSizes,
    scale: f64,
    run: RunChoices,
) -> Option<Problem> {
    let [b, h, n, d] = q.dims();
    let kvh = k.dims()[1];
    if !is_float(q.dtype()) || k.dtype() != q.dtype() || kvh == 0 || !h.is_multiple_of(kvh) {
        return None;
    }
    let nk = key_rows(q, k, start)?;
    let hs = if sizes.share_selection { kvh } else { h };
    // a selection of one head for a layer of several: every head's (DSA), in groups of a kv head
    let shared_all = count > 0 && sel_heads == 1 && hs > 1;
    if count > 0 && sel_heads != hs && !(shared_all && sizes.share_selection && !gated) {
        return None;
    }
    let p = Problem {
        mode: SELECTED,
        b,
        h,
        kvh,
        n,
        q0: start,
        nk,
        d,
        group_heads: h / hs,
        count,
        span: 0,
        mem: 0,
        sel: sizes.selection_block,
        gated,
        shared_all,
        scale,
        select: None,
        run,
    };
    supported(q, &p).then_some(p)
}

/// The problem for the sliding branch (queries at `start..`, keys at `0..`), or `None`.
pub(super) fn sliding_problem<B: KernelBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    start: usize,
    window: usize,
    scale: f64,
    run: RunChoices,
) -> Option<Problem> {
    let [b, h, n, d] = q.dims();
    let kvh = k.dims()[1];
    if !is_float(q.dtype()) || k.dtype() != q.dtype() || kvh == 0 || !h.is_multiple_of(kvh) {
        return None;
    }
    let nk = key_rows(q, k, start)?;
    let p = Problem {
        mode: SLIDING,
        b,
        h,
        kvh,
        n,
        q0: start,
        nk,
        d,
        group_heads: h / kvh,
        count: 0,
        span: window,
        mem: 0,
        sel: 1,
        gated: false,
        shared_all: false,
        scale,
        select: None,
        run,
    };
    supported(q, &p).then_some(p)
}

/// The compressed branch over memory + compressed `ck` `[b, kvh, mem + blocks, d]` for queries
/// at `start..start + n`, with the block selection fused in when the config selects (and its
/// scores need no gradient: not with `use_diff_topk`).
pub(super) fn compressed_problem<B: KernelBackend>(
    q: &Tensor<B, 4>,
    ck: &Tensor<B, 4>,
    start: usize,
    num_mem: usize,
    sizes: &SparseSizes,
    scale: f64,
    run: RunChoices,
) -> Option<Problem> {
    let [b, h, n, d] = q.dims();
    let [_, kvh, slots, _] = ck.dims();
    if !is_float(q.dtype())
        || ck.dtype() != q.dtype()
        || kvh == 0
        || !h.is_multiple_of(kvh)
        || slots < num_mem
        || num_mem == 0
    {
        return None;
    }
    let g = h / kvh;
    let stride = sizes.stride;
    let blocks = slots - num_mem;
    let per_block = sizes.per_selection();
    let complete = sizes.selection_blocks(blocks);
    let topk = sizes.selected(complete);
    let selects = blocks > 0 && topk > 0;
    if selects && sizes.diff_topk {
        return None;
    }
    let share = sizes.share_selection && g > 1;
    let p = Problem {
        mode: COMPRESSED,
        b,
        h,
        kvh,
        n,
        q0: start,
        nk: slots,
        d,
        group_heads: g,
        count: 0,
        span: stride,
        mem: num_mem,
        sel: 1,
        gated: false,
        shared_all: false,
        scale,
        select: selects.then_some(SelectSpec {
            topk,
            complete,
            per_block,
            sel_group: if share { g } else { 1 },
            sel: sizes.selection_block,
        }),
        run,
    };
    (topk <= 64 && supported(q, &p)).then_some(p)
}

/// Selection indices with invalid blocks as `-1`, and the gates when keys are gated.
pub(super) fn selection_parts<B: Backend>(
    selection: Option<&Selection<B>>,
    sizes: &SparseSizes,
) -> (Option<Tensor<B, 4, Int>>, Option<Tensor<B, 4>>) {
    match selection {
        Some(s) => (
            Some(s.indices.clone().mask_fill(s.valid.clone().bool_not(), -1)),
            sizes.diff_topk.then(|| s.scores.clone()),
        ),
        None => (None, None),
    }
}

/// A [`Selection`] from the fused kernel's blocks (`-1`: not valid) and probabilities.
pub(super) fn selection_of<B: Backend>(
    blocks: Tensor<B, 4, Int>,
    scores: Tensor<B, 4>,
) -> Selection<B> {
    Selection {
        valid: blocks.clone().greater_equal_elem(0),
        indices: blocks.clamp_min(0),
        scores,
    }
}

pub(super) fn float_of<B: Backend>(t: &Tensor<B, 4>) -> B::FloatTensorPrimitive {
    t.clone().into_primitive().tensor()
}

pub(super) fn float3<B: Backend>(t: &Tensor<B, 3>) -> B::FloatTensorPrimitive {
    t.clone().into_primitive().tensor()
}

/// The cache writes of a projection row `[b, 1, width]` of `dtype` into `buffers`, if they fit.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_problem<B: Backend>(
    [b, one, width]: [usize; 3],
    dtype: DType,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    buffers: &[Tensor<B, 4>; 4],
    heads: usize,
    pos: usize,
    slot: usize,
) -> Option<WriteProblem> {
    let [kb, kvh, cap, d] = buffers[0].dims();
    let [_, _, ring, _] = buffers[2].dims();
    let fits = is_float(dtype)
        && one == 1
        && kb == b
        && d % 2 == 0
        && width == (heads + 2 * kvh) * d
        && buffers[1].dims() == buffers[0].dims()
        && buffers[2].dims() == [b, kvh, ring, d]
        && buffers[3].dims() == buffers[2].dims()
        && buffers.iter().all(|t| t.dtype() == dtype)
        && cos.dims() == [1, 1, 1, d]
        && sin.dims() == [1, 1, 1, d]
        && pos < cap
        && slot < ring;
    fits.then_some(WriteProblem {
        b,
        h: heads,
        kvh,
        d,
        pos,
        cap,
        ring,
        slot,
    })
}

/// A row-kernel problem for `layer` on rows `[b, n, din]` of `dtype`, if its parameters fit.
fn row_problem<B: Backend>(
    [b, n, din]: [usize; 3],
    dtype: DType,
    norm: Option<&RowNorm<B>>,
    layer: &Projection<B>,
    gelu: bool,
    residual: bool,
) -> Option<RowProblem> {
    let [win, dout] = layer.weight.dims();
    let fits = is_float(dtype)
        && layer.weight.dtype() == dtype
        && win == din
        && layer
            .bias
            .as_ref()
            .is_none_or(|b| b.dims() == [dout] && b.dtype() == dtype)
        && norm.is_none_or(|n| n.weight.dims() == [din] && n.weight.dtype() == dtype);
    fits.then_some(RowProblem {
        m: b * n,
        din,
        dout,
        norm_eps: norm.map(|n| n.eps),
        bias: layer.bias.is_some(),
        gelu,
        residual,
        second: None,
    })
}

pub(super) fn int_dtype<I: IntElement>() -> DType {
    <I as Element>::dtype()
}

pub(super) type CompressedOut<B> = (Tensor<B, 4>, Option<Selection<B>>);

/// The decode kernel's problem for `s` (the compressed branch in parts of `span` rows), or
/// `None` when it does not cover it.
pub(super) fn decode_problem<B: KernelBackend>(
    s: &DecodeInputs<'_, B>,
    span: usize,
) -> Option<DecodeProblem> {
    let p = DecodeProblem::of(s)?;
    launch::decode_supported(&B::cube_client(&s.qkv.device()), &p, span).then_some(p)
}

/// The launches of [`NsaKernels::decode_block`] for `s`, or `None` when one of them does not
/// cover it.
pub(super) fn block_problem<B: KernelBackend>(
    s: &BlockStep<'_, B>,
    buffers: &[Tensor<B, 4>; 4],
    decode_span: usize,
) -> Option<BlockProblem> {
    let c = s.sizes;
    let dims = s.x.dims();
    let dtype = s.x.dtype();
    let [b, _, dim] = dims;
    let client = B::cube_client(&s.x.device());
    let mut pair = row_problem(dims, dtype, s.norm, s.to_qkv, false, false)?;
    let gates = row_problem(dims, dtype, s.norm, s.gates, false, false)?;
    pair.second = Some((gates.dout, gates.bias));
    let width = pair.dout;
    let write = write_problem(
        [b, 1, width],
        dtype,
        s.cos,
        s.sin,
        buffers,
        c.heads,
        s.pos,
        s.slot,
    )?;
    let (ck, cv) = (s.compressed.k, s.compressed.v);
    let decode = DecodeProblem::new(
        c,
        [b, 1, width],
        dtype,
        [ck, cv, &buffers[0], &buffers[1], s.cos, s.sin],
        s.pos + 1,
        s.num_mem,
        s.compressed.len,
        s.scale,
    )?;
    let combine = row_problem(
        [b, 1, c.heads * c.dim_head],
        dtype,
        None,
        s.combine,
        false,
        true,
    )?;
    let ff = match s.ff {
        Some(ff) => {
            let fc1 = row_problem(dims, dtype, Some(&ff.norm), &ff.fc1, true, false)?;
            let fc2 = row_problem([b, 1, fc1.dout], dtype, None, &ff.fc2, false, true)?;
            Some((fc1, fc2))
        }
        None => None,
    };
    let fits = gates.dout == 3 * c.heads
        && combine.dout == dim
        && ff.as_ref().is_none_or(|(_, fc2)| fc2.dout == dim)
        && [&pair, &combine]
            .into_iter()
            .chain(ff.iter().flat_map(|(a, b)| [a, b]))
            .all(|p| launch::row_supported(&client, p))
        && launch::decode_supported(&client, &decode, decode_span);
    fits.then_some(BlockProblem {
        pair,
        write,
        decode,
        decode_span,
        combine,
        ff,
    })
}
