//! The CubeCL implementation of [`NsaKernels`], for every backend that can hand its tensors to
//! CubeCL kernels ([`KernelBackend`]): `CubeBackend<R, F, I, BT>` (any CubeCL runtime: CUDA,
//! wgpu, ...), Burn's `Fusion` over it (feature `fusion`: each kernel launch is a custom
//! operation of the fusion stream, so the tensor ops around it still fuse), and the autodiff
//! backend over either, where the forward runs the same kernels and a custom backward step runs
//! the fused backward kernels.

mod attention;
mod decode;
#[cfg(feature = "fusion")]
mod fusion;
mod launch;
mod mma;
mod reduce;
mod rows;
mod sample;

use std::marker::PhantomData;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, TensorPrimitive};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::ComputeClient;

use self::attention as attn;
use self::attn::{COMPRESSED, SELECTED, SLIDING};
pub use self::launch::force_dkdv_splits;
use self::launch::{
    BlockProblem, BlockTensors, DecodeProblem, FfTensors, Problem, RowProblem, SampleProblem,
    SelectSpec, WriteProblem,
};
use super::{register, BlockStep, DecodeInputs, NsaKernels, RowLinear};
use burn::nn::Linear;

use crate::config::NsaConfig;
use crate::norm::RmsNorm;
use crate::select::Selection;

/// What the fused forward returns, as primitives of backend `B`.
pub struct KernelForward<B: Backend> {
    /// `[b, h, n, d]`
    pub out: FloatTensor<B>,
    /// Log-sum-exp of every row, `[b, h, n]` (f32).
    pub lse: FloatTensor<B>,
    /// Compressed mode with selection: the kept blocks `[b, hs, n, topk]` (`-1`: not valid)
    /// and their probabilities.
    pub selection: Option<(IntTensor<B>, FloatTensor<B>)>,
}

/// Gradients `(dq, dk, dv, dgates)` of the fused backward.
pub type KernelGrads<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
);

/// A backend whose tensors the CubeCL kernels run on: the launches of [`launch`] at the level
/// of the backend's primitives.
pub trait KernelBackend: Backend {
    /// The CubeCL runtime the tensors live on.
    type Runtime: CubeRuntime;

    /// The CubeCL client of `device` (for the kernels' shared-memory budget).
    fn cube_client(device: &Self::Device) -> ComputeClient<Self::Runtime>;

    /// The fused attention forward of `p`.
    fn attn_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        gates: Option<FloatTensor<Self>>,
        p: &Problem,
    ) -> KernelForward<Self>;

    /// The fused attention backward of `p` from the output gradient `dout`.
    #[allow(clippy::too_many_arguments)]
    fn attn_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        gates: Option<FloatTensor<Self>>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        p: &Problem,
    ) -> KernelGrads<Self>;

    /// Top-`k` along the last axis: values and indices.
    fn top_k(x: FloatTensor<Self>, k: usize) -> (FloatTensor<Self>, IntTensor<Self>);

    /// The decode step's attention ([`launch::decode`]): inputs `[qkv, cos, sin, ck, cv, k,
    /// v, gate logits]` → `[b, 1, h * d]`.
    fn decode(inputs: [FloatTensor<Self>; 8], p: &DecodeProblem) -> FloatTensor<Self>;

    /// [`launch::row_linear`]; the output has `x`'s leading dims and `p.dout` columns.
    fn row_linear(
        x: FloatTensor<Self>,
        norm_w: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
        p: &RowProblem,
    ) -> FloatTensor<Self>;

    /// [`launch::decode_write`].
    fn decode_write(
        inputs: [FloatTensor<Self>; 3],
        buffers: [FloatTensor<Self>; 4],
        p: &WriteProblem,
    ) -> [FloatTensor<Self>; 4];

    /// [`launch::sample`].
    fn sample(logits: FloatTensor<Self>, p: &SampleProblem) -> IntTensor<Self>;

    /// [`launch::decode_block`].
    #[allow(clippy::type_complexity)]
    fn decode_block(
        t: BlockTensors<FloatTensor<Self>>,
        p: &BlockProblem,
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 4]);

    /// [`launch::row_linear_pair`] with both matrices (no GELU or residual).
    #[allow(clippy::too_many_arguments)]
    fn row_linear_pair(
        x: FloatTensor<Self>,
        norm_w: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        w2: FloatTensor<Self>,
        bias2: Option<FloatTensor<Self>>,
        p: &RowProblem,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

impl<R, F, I, BT> KernelBackend for Cb<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type Runtime = R;

    fn cube_client(device: &Self::Device) -> ComputeClient<R> {
        R::client(device)
    }

    fn attn_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        gates: Option<FloatTensor<Self>>,
        p: &Problem,
    ) -> KernelForward<Self> {
        let f = launch::forward(q, k, v, idx, gates, p, int_dtype::<I>());
        KernelForward {
            out: f.out,
            lse: f.lse,
            selection: f.selection,
        }
    }

    fn attn_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        gates: Option<FloatTensor<Self>>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        p: &Problem,
    ) -> KernelGrads<Self> {
        launch::backward(q, k, v, idx, gates, out, lse, dout, p)
    }

    fn top_k(x: FloatTensor<Self>, k: usize) -> (FloatTensor<Self>, IntTensor<Self>) {
        launch::top_k(x, k, int_dtype::<I>())
    }

    fn decode(inputs: [FloatTensor<Self>; 8], p: &DecodeProblem) -> FloatTensor<Self> {
        launch::decode(inputs, p)
    }

    fn row_linear(
        x: FloatTensor<Self>,
        norm_w: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
        p: &RowProblem,
    ) -> FloatTensor<Self> {
        launch::row_linear(x, norm_w, w, bias, residual, p)
    }

    fn decode_write(
        inputs: [FloatTensor<Self>; 3],
        buffers: [FloatTensor<Self>; 4],
        p: &WriteProblem,
    ) -> [FloatTensor<Self>; 4] {
        launch::decode_write(inputs, buffers, p)
    }

    fn sample(logits: FloatTensor<Self>, p: &SampleProblem) -> IntTensor<Self> {
        launch::sample(logits, p, int_dtype::<I>())
    }

    fn decode_block(
        t: BlockTensors<FloatTensor<Self>>,
        p: &BlockProblem,
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 4]) {
        launch::decode_block(t, p)
    }

    fn row_linear_pair(
        x: FloatTensor<Self>,
        norm_w: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        w2: FloatTensor<Self>,
        bias2: Option<FloatTensor<Self>>,
        p: &RowProblem,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (a, b) = launch::row_linear_pair(x, norm_w, w, bias, None, Some((w2, bias2)), p);
        (a, b.expect("a second output"))
    }
}

/// The CubeCL kernels for backend `B`.
pub struct CubeKernels<B>(PhantomData<fn() -> B>);

impl<B> Default for CubeKernels<B> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn register_for<B: KernelBackend>() {
    register::<B>(Arc::new(CubeKernels::<B>::default()));
    register::<Autodiff<B>>(Arc::new(CubeKernels::<B>::default()));
}

/// Registers the fused kernels for `CubeBackend<R, F, I, BT>`, for Burn's `Fusion` over it (with
/// the feature `fusion`) and for their autodiff backends, e.g.
/// `register_cube::<CudaRuntime, f32, i32, u8>()` for `Cuda<f32>` or
/// `register_cube::<WgpuRuntime, f32, i32, u32>()` for `Wgpu<f32>`, with or without Burn's
/// `fusion` feature.
pub fn register_cube<R, F, I, BT>()
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    register_for::<Cb<R, F, I, BT>>();
    #[cfg(feature = "fusion")]
    register_for::<burn_fusion::Fusion<Cb<R, F, I, BT>>>();
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the kernels can run `p` on the device of `q`.
fn supported<B: KernelBackend>(q: &Tensor<B, 4>, p: &Problem) -> bool {
    launch::supported(&B::cube_client(&q.device()), p)
}

/// The problem for the selected branch, or `None` when the kernels do not cover it.
fn selected_problem<B: KernelBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    count: usize,
    gated: bool,
    config: &NsaConfig,
    scale: f64,
) -> Option<Problem> {
    let [b, h, n, d] = q.dims();
    let kvh = k.dims()[1];
    if !is_float(q.dtype()) || k.dtype() != q.dtype() || kvh == 0 || !h.is_multiple_of(kvh) {
        return None;
    }
    let hs = if config.query_heads_share_selected_kv {
        kvh
    } else {
        h
    };
    let p = Problem {
        mode: SELECTED,
        b,
        h,
        kvh,
        n,
        nk: n,
        d,
        gq: h / hs,
        count,
        span: 0,
        mem: 0,
        sel: config.selection_block_size,
        gated,
        scale,
        select: None,
    };
    supported(q, &p).then_some(p)
}

fn sliding_problem<B: KernelBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    window: usize,
    scale: f64,
) -> Option<Problem> {
    let [b, h, n, d] = q.dims();
    let kvh = k.dims()[1];
    if !is_float(q.dtype()) || k.dtype() != q.dtype() || kvh == 0 || !h.is_multiple_of(kvh) {
        return None;
    }
    let p = Problem {
        mode: SLIDING,
        b,
        h,
        kvh,
        n,
        nk: n,
        d,
        gq: h / kvh,
        count: 0,
        span: window,
        mem: 0,
        sel: 1,
        gated: false,
        scale,
        select: None,
    };
    supported(q, &p).then_some(p)
}

/// The compressed branch over memory + compressed `ck` `[b, kvh, mem + blocks, d]` for queries
/// at `0..n`, with the block selection fused in when the config selects (and its scores need
/// no gradient: not with `use_diff_topk`).
fn compressed_problem<B: KernelBackend>(
    q: &Tensor<B, 4>,
    ck: &Tensor<B, 4>,
    num_mem: usize,
    config: &NsaConfig,
    scale: f64,
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
    let stride = config.compress_block_sliding_stride;
    let blocks = slots - num_mem;
    // as `select::importance` and `select::select_top`
    let pf = config.selection_block_size / stride;
    let fine = if pf > 1 { blocks / pf } else { blocks };
    let topk = config.num_selected_blocks.min(fine);
    let selects = blocks > 0 && topk > 0;
    if selects && config.use_diff_topk {
        return None;
    }
    let share = config.query_heads_share_selected_kv && g > 1;
    let p = Problem {
        mode: COMPRESSED,
        b,
        h,
        kvh,
        n,
        nk: slots,
        d,
        gq: g,
        count: 0,
        span: stride,
        mem: num_mem,
        sel: 1,
        gated: false,
        scale,
        select: selects.then_some(SelectSpec {
            topk,
            fine,
            pf: pf.max(1),
            sg: if share { g } else { 1 },
            sel: config.selection_block_size,
        }),
    };
    (topk <= 64 && supported(q, &p)).then_some(p)
}

/// Selection indices with invalid blocks as `-1`, and the gates when keys are gated.
fn selection_parts<B: Backend>(
    selection: Option<&Selection<B>>,
    config: &NsaConfig,
) -> (Option<Tensor<B, 4, Int>>, Option<Tensor<B, 4>>) {
    match selection {
        Some(s) => (
            Some(s.indices.clone().mask_fill(s.valid.clone().bool_not(), -1)),
            config.use_diff_topk.then(|| s.scores.clone()),
        ),
        None => (None, None),
    }
}

/// A [`Selection`] from the fused kernel's blocks (`-1`: not valid) and probabilities.
fn selection_of<B: Backend>(blocks: Tensor<B, 4, Int>, scores: Tensor<B, 4>) -> Selection<B> {
    Selection {
        valid: blocks.clone().greater_equal_elem(0),
        indices: blocks.clamp_min(0),
        scores,
    }
}

fn float_of<B: Backend>(t: &Tensor<B, 4>) -> B::FloatTensorPrimitive {
    t.clone().into_primitive().tensor()
}

fn float3<B: Backend>(t: &Tensor<B, 3>) -> B::FloatTensorPrimitive {
    t.clone().into_primitive().tensor()
}

/// The cache writes of a projection row `[b, 1, width]` of `dtype` into `buffers`, if they fit.
#[allow(clippy::too_many_arguments)]
fn write_problem<B: Backend>(
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
    norm: Option<&RmsNorm<B>>,
    layer: &Linear<B>,
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

fn int_dtype<I: IntElement>() -> DType {
    <I as Element>::dtype()
}

impl<B: KernelBackend> NsaKernels<B> for CubeKernels<B> {
    fn selected_attention(
        &self,
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        selection: Option<&Selection<B>>,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<Tensor<B, 4>> {
        let (idx, gates) = selection_parts(selection, config);
        let count = idx.as_ref().map_or(0, |i| i.dims()[3]);
        let p = selected_problem(q, k, count, gates.is_some(), config, scale)?;
        let f = B::attn_forward(
            float_of(q),
            float_of(k),
            float_of(v),
            idx.map(|i| i.into_primitive()),
            gates.map(|g| float_of(&g)),
            &p,
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(f.out)))
    }

    fn sliding_attention(
        &self,
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        window: usize,
        scale: f64,
    ) -> Option<Tensor<B, 4>> {
        let p = sliding_problem(q, k, window, scale)?;
        let f = B::attn_forward(float_of(q), float_of(k), float_of(v), None, None, &p);
        Some(Tensor::from_primitive(TensorPrimitive::Float(f.out)))
    }

    fn top_k(&self, x: &Tensor<B, 4>, k: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4, Int>)> {
        let len = x.dims()[3];
        if !is_float(x.dtype()) || k == 0 || k > len || k > launch::MAX_TOP_K {
            return None;
        }
        let (values, indices) = B::top_k(float_of(x), k);
        Some((
            Tensor::from_primitive(TensorPrimitive::Float(values)),
            Tensor::from_primitive(indices),
        ))
    }

    fn row_linear(&self, x: &Tensor<B, 3>, spec: &RowLinear<'_, B>) -> Option<Tensor<B, 3>> {
        let [b, n, din] = x.dims();
        let w = spec.layer.weight.val();
        let [win, dout] = w.dims();
        let bias = spec.layer.bias.as_ref().map(|b| b.val());
        let norm_w = spec.norm.map(|n| n.weight.val());
        let dtype = x.dtype();
        if !is_float(dtype)
            || w.dtype() != dtype
            || win != din
            || bias
                .as_ref()
                .is_some_and(|b| b.dims() != [dout] || b.dtype() != dtype)
            || norm_w
                .as_ref()
                .is_some_and(|w| w.dims() != [din] || w.dtype() != dtype)
            || spec
                .residual
                .is_some_and(|r| r.dims() != [b, n, dout] || r.dtype() != dtype)
        {
            return None;
        }
        let p = RowProblem {
            m: b * n,
            din,
            dout,
            norm_eps: spec.norm.map(|n| n.eps),
            bias: bias.is_some(),
            gelu: spec.gelu,
            residual: spec.residual.is_some(),
            second: None,
        };
        if !launch::row_supported(&B::cube_client(&x.device()), &p) {
            return None;
        }
        let f1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
        let out = B::row_linear(
            float3(x),
            norm_w.map(f1),
            w.into_primitive().tensor(),
            bias.map(f1),
            spec.residual.map(float3),
            &p,
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn row_linear_pair(
        &self,
        x: &Tensor<B, 3>,
        norm: Option<&RmsNorm<B>>,
        first: &Linear<B>,
        second: &Linear<B>,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
        let [b, n, din] = x.dims();
        let dtype = x.dtype();
        let parts = |l: &Linear<B>| {
            let w = l.weight.val();
            let bias = l.bias.as_ref().map(|b| b.val());
            let [win, dout] = w.dims();
            let fits = w.dtype() == dtype
                && win == din
                && bias
                    .as_ref()
                    .is_none_or(|b| b.dims() == [dout] && b.dtype() == dtype);
            fits.then_some((w, bias, dout))
        };
        let ((w, bias, dout), (w2, bias2, dout2)) = (parts(first)?, parts(second)?);
        let norm_w = norm.map(|n| n.weight.val());
        if !is_float(dtype)
            || norm_w
                .as_ref()
                .is_some_and(|w| w.dims() != [din] || w.dtype() != dtype)
        {
            return None;
        }
        let p = RowProblem {
            m: b * n,
            din,
            dout,
            norm_eps: norm.map(|n| n.eps),
            bias: bias.is_some(),
            gelu: false,
            residual: false,
            second: Some((dout2, bias2.is_some())),
        };
        if !launch::row_supported(&B::cube_client(&x.device()), &p) {
            return None;
        }
        let f1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
        let (a, c) = B::row_linear_pair(
            float3(x),
            norm_w.map(f1),
            w.into_primitive().tensor(),
            bias.map(f1),
            w2.into_primitive().tensor(),
            bias2.map(f1),
            &p,
        );
        let f3 = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
        Some((f3(a), f3(c)))
    }

    fn decode_write(
        &self,
        qkv: &Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        buffers: [Tensor<B, 4>; 4],
        heads: usize,
        pos: usize,
        slot: usize,
    ) -> Result<[Tensor<B, 4>; 4], [Tensor<B, 4>; 4]> {
        let Some(p) = write_problem(
            qkv.dims(),
            qkv.dtype(),
            cos,
            sin,
            &buffers,
            heads,
            pos,
            slot,
        ) else {
            return Err(buffers);
        };
        let out = B::decode_write(
            [float3(qkv), float_of(cos), float_of(sin)],
            buffers.map(|t| t.into_primitive().tensor()),
            &p,
        );
        Ok(out.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t))))
    }

    fn decode_block(
        &self,
        s: &BlockStep<'_, B>,
        buffers: [Tensor<B, 4>; 4],
    ) -> Result<(Tensor<B, 3>, [Tensor<B, 4>; 4]), [Tensor<B, 4>; 4]> {
        match block_problem(s, &buffers) {
            Some(p) => {
                let f1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
                let f2 = |t: Tensor<B, 2>| t.into_primitive().tensor();
                let bias = |l: &Linear<B>| l.bias.as_ref().map(|b| f1(b.val()));
                let (ck, cv) = s.compressed.buffers();
                let t = BlockTensors {
                    x: float3(s.x),
                    norm: s.norm.map(|n| f1(n.weight.val())),
                    w_qkv: f2(s.to_qkv.weight.val()),
                    b_qkv: bias(s.to_qkv),
                    w_gates: f2(s.gates.weight.val()),
                    b_gates: bias(s.gates),
                    cos: float_of(s.cos),
                    sin: float_of(s.sin),
                    buffers: buffers.map(|t| t.into_primitive().tensor()),
                    ck: float_of(ck),
                    cv: float_of(cv),
                    w_comb: f2(s.combine.weight.val()),
                    b_comb: bias(s.combine),
                    ff: s.ff.map(|ff| FfTensors {
                        norm: f1(ff.norm.weight.val()),
                        w1: f2(ff.fc1.weight.val()),
                        b1: bias(&ff.fc1),
                        w2: f2(ff.fc2.weight.val()),
                        b2: bias(&ff.fc2),
                    }),
                };
                let (out, written) = B::decode_block(t, &p);
                let f4 = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
                Ok((
                    Tensor::from_primitive(TensorPrimitive::Float(out)),
                    written.map(f4),
                ))
            }
            None => Err(buffers),
        }
    }

    fn sample_tokens(
        &self,
        logits: &Tensor<B, 2>,
        rule: &crate::sampling::DeviceSampling,
        key: u64,
    ) -> Option<Tensor<B, 1, Int>> {
        let [m, v] = logits.dims();
        if m == 0 || v == 0 || v > u32::MAX as usize / 2 {
            return None;
        }
        let p = SampleProblem {
            m,
            v,
            rule: *rule,
            key,
        };
        let ids = B::sample(logits.clone().into_primitive().tensor(), &p);
        Some(Tensor::from_primitive(ids))
    }

    fn decode_attention(&self, s: &DecodeInputs<'_, B>) -> Option<Tensor<B, 3>> {
        let p = decode_problem(s)?;
        let (ck, cv) = s.compressed.buffers();
        let (k, v) = s.kv.buffers();
        let gates = (s.gate_logits)();
        let out = B::decode(
            [
                float3(s.qkv),
                float_of(s.cos),
                float_of(s.sin),
                float_of(ck),
                float_of(cv),
                float_of(k),
                float_of(v),
                float3(&gates),
            ],
            &p,
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn compressed_and_selection(
        &self,
        q: &Tensor<B, 4>,
        ck: &Tensor<B, 4>,
        cv: &Tensor<B, 4>,
        num_mem: usize,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<CompressedOut<B>> {
        let p = compressed_problem(q, ck, num_mem, config, scale)?;
        let f = B::attn_forward(float_of(q), float_of(ck), float_of(cv), None, None, &p);
        let selection = f.selection.map(|(blocks, scores)| {
            selection_of(
                Tensor::from_primitive(blocks),
                Tensor::from_primitive(TensorPrimitive::Float(scores)),
            )
        });
        Some((
            Tensor::from_primitive(TensorPrimitive::Float(f.out)),
            selection,
        ))
    }
}

type CompressedOut<B> = (Tensor<B, 4>, Option<Selection<B>>);

/// The decode kernel's problem for `s`, or `None` when it does not cover it.
fn decode_problem<B: KernelBackend>(s: &DecodeInputs<'_, B>) -> Option<DecodeProblem> {
    let p = DecodeProblem::of(s)?;
    launch::decode_supported(&B::cube_client(&s.qkv.device()), &p).then_some(p)
}

/// The launches of [`NsaKernels::decode_block`] for `s`, or `None` when one of them does not
/// cover it.
fn block_problem<B: KernelBackend>(
    s: &BlockStep<'_, B>,
    buffers: &[Tensor<B, 4>; 4],
) -> Option<BlockProblem> {
    let c = s.config;
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
    let (ck, cv) = s.compressed.buffers();
    let decode = DecodeProblem::new(
        c,
        [b, 1, width],
        dtype,
        [ck, cv, &buffers[0], &buffers[1], s.cos, s.sin],
        s.pos + 1,
        s.num_mem,
        s.compressed.len(),
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
        && launch::decode_supported(&client, &decode);
    fits.then_some(BlockProblem {
        pair,
        write,
        decode,
        combine,
        ff,
    })
}

/// What the backward step keeps from the forward.
#[derive(Clone, Debug)]
struct AttnState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    idx: Option<IntTensor<B>>,
    gates: Option<FloatTensor<B>>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    problem: Problem,
}

/// Backward step of the fused attention; parents `[q, k, v]` or `[q, k, v, gates]`.
#[derive(Debug)]
struct AttnBackward<const N: usize>;

impl<B: KernelBackend, const N: usize> Backward<B, N> for AttnBackward<N> {
    type State = AttnState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv, dgates) = B::attn_backward(
            s.q, s.k, s.v, s.idx, s.gates, s.out, s.lse, grad, &s.problem,
        );
        let mut results = [Some(dq), Some(dk), Some(dv), dgates];
        for (parent, grad) in ops.parents.iter().zip(results.iter_mut()) {
            if let (Some(node), Some(grad)) = (parent, grad.take()) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// Runs the fused forward on autodiff tensors and records the backward step: the output is
/// tracked (parents q, k, v and the gates when given); the fused selection, if any, is not.
fn tracked_attention<B, C>(
    q: &Tensor<Autodiff<B, C>, 4>,
    k: &Tensor<Autodiff<B, C>, 4>,
    v: &Tensor<Autodiff<B, C>, 4>,
    idx: Option<Tensor<Autodiff<B, C>, 4, Int>>,
    gates: Option<Tensor<Autodiff<B, C>, 4>>,
    p: Problem,
) -> CompressedOut<Autodiff<B, C>>
where
    B: KernelBackend,
    C: CheckpointStrategy,
{
    let (q, k, v) = (float_of(q), float_of(k), float_of(v));
    let idx = idx.map(|i| i.into_primitive());
    let gates = gates.map(|g| float_of(&g));
    let run = |gp: Option<FloatTensor<B>>| -> KernelForward<B> {
        B::attn_forward(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            idx.clone(),
            gp,
            &p,
        )
    };
    let state = |f: &KernelForward<B>, gp: Option<FloatTensor<B>>| AttnState::<B> {
        q: q.primitive.clone(),
        k: k.primitive.clone(),
        v: v.primitive.clone(),
        idx: idx.clone(),
        gates: gp,
        out: f.out.clone(),
        lse: f.lse.clone(),
        problem: p.clone(),
    };
    let (out, selection) = match gates {
        Some(g) => {
            let nodes = [
                q.node.clone(),
                k.node.clone(),
                v.node.clone(),
                g.node.clone(),
            ];
            let gp = g.primitive.clone();
            match AttnBackward::<4>
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let f = run(Some(gp.clone()));
                    let st = state(&f, Some(gp));
                    (prep.finish(st, f.out), f.selection)
                }
                OpsKind::UnTracked(prep) => {
                    let f = run(Some(gp));
                    (prep.finish(f.out), f.selection)
                }
            }
        }
        None => {
            let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
            match AttnBackward::<3>
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let f = run(None);
                    let st = state(&f, None);
                    (prep.finish(st, f.out), f.selection)
                }
                OpsKind::UnTracked(prep) => {
                    let f = run(None);
                    (prep.finish(f.out), f.selection)
                }
            }
        }
    };
    let selection = selection.map(|(blocks, scores)| {
        let scores = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(scores));
        selection_of(Tensor::from_primitive(blocks), Tensor::from_inner(scores))
    });
    (
        Tensor::from_primitive(TensorPrimitive::Float(out)),
        selection,
    )
}

/// The inner-backend view of an autodiff tensor (for the shape and device checks).
fn inner<B: KernelBackend, C: CheckpointStrategy>(t: &Tensor<Autodiff<B, C>, 4>) -> Tensor<B, 4> {
    t.clone().inner()
}

impl<B, C> NsaKernels<Autodiff<B, C>> for CubeKernels<B>
where
    B: KernelBackend,
    C: CheckpointStrategy,
{
    fn selected_attention(
        &self,
        q: &Tensor<Autodiff<B, C>, 4>,
        k: &Tensor<Autodiff<B, C>, 4>,
        v: &Tensor<Autodiff<B, C>, 4>,
        selection: Option<&Selection<Autodiff<B, C>>>,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<Tensor<Autodiff<B, C>, 4>> {
        let (idx, gates) = selection_parts(selection, config);
        let count = idx.as_ref().map_or(0, |i| i.dims()[3]);
        let p = selected_problem(&inner(q), &inner(k), count, gates.is_some(), config, scale)?;
        Some(tracked_attention(q, k, v, idx, gates, p).0)
    }

    fn sliding_attention(
        &self,
        q: &Tensor<Autodiff<B, C>, 4>,
        k: &Tensor<Autodiff<B, C>, 4>,
        v: &Tensor<Autodiff<B, C>, 4>,
        window: usize,
        scale: f64,
    ) -> Option<Tensor<Autodiff<B, C>, 4>> {
        let p = sliding_problem(&inner(q), &inner(k), window, scale)?;
        Some(tracked_attention(q, k, v, None, None, p).0)
    }

    fn compressed_and_selection(
        &self,
        q: &Tensor<Autodiff<B, C>, 4>,
        ck: &Tensor<Autodiff<B, C>, 4>,
        cv: &Tensor<Autodiff<B, C>, 4>,
        num_mem: usize,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<CompressedOut<Autodiff<B, C>>> {
        let p = compressed_problem(&inner(q), &inner(ck), num_mem, config, scale)?;
        Some(tracked_attention(q, ck, cv, None, None, p))
    }
}
