//! The CubeCL implementation of [`NsaKernels`] for `CubeBackend<R, F, I, BT>` (any CubeCL
//! runtime: CUDA, wgpu, ...) and for `Autodiff<CubeBackend<..>>`, where the forward runs the
//! same kernels and a custom backward step runs the fused backward kernels.

mod attn;
mod launch;

use std::marker::PhantomData;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{DType, Element, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use self::attn::{COMPRESSED, SELECTED, SLIDING};
pub use self::launch::force_dkdv_splits;
use self::launch::{Forward, Problem, SelectSpec};
use super::{register, NsaKernels};
use crate::config::NsaConfig;
use crate::select::Selection;

/// The CubeCL kernels for runtime `R` and element types `F`, `I`, `BT`.
pub struct CubeKernels<R, F, I, BT>(PhantomData<Types<R, F, I, BT>>);

type Types<R, F, I, BT> = fn() -> (R, F, I, BT);

impl<R, F, I, BT> Default for CubeKernels<R, F, I, BT> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// Registers the fused kernels for `CubeBackend<R, F, I, BT>` and its autodiff backend, e.g.
/// `register_cube::<CudaRuntime, f32, i32, u8>()` for `Cuda<f32>` (without burn's `fusion`
/// feature) or `register_cube::<WgpuRuntime, f32, i32, u32>()` for `Wgpu<f32>`.
pub fn register_cube<R, F, I, BT>()
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    register::<CubeBackend<R, F, I, BT>>(Arc::new(CubeKernels::<R, F, I, BT>::default()));
    register::<Autodiff<CubeBackend<R, F, I, BT>>>(Arc::new(CubeKernels::<R, F, I, BT>::default()));
}

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The problem for the selected branch, or `None` when the kernels do not cover it.
fn selected_problem<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    count: usize,
    gated: bool,
    config: &NsaConfig,
    scale: f64,
) -> Option<Problem> {
    let [b, h, n, d] = q.meta.shape().dims::<4>();
    let kvh = k.meta.shape().dims::<4>()[1];
    if !is_float(q.dtype) || k.dtype != q.dtype || kvh == 0 || !h.is_multiple_of(kvh) {
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
    launch::supported(&q.client, &p).then_some(p)
}

fn sliding_problem<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    window: usize,
    scale: f64,
) -> Option<Problem> {
    let [b, h, n, d] = q.meta.shape().dims::<4>();
    let kvh = k.meta.shape().dims::<4>()[1];
    if !is_float(q.dtype) || k.dtype != q.dtype || kvh == 0 || !h.is_multiple_of(kvh) {
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
    launch::supported(&q.client, &p).then_some(p)
}

/// The compressed branch over memory + compressed `ck` `[b, kvh, mem + blocks, d]` for queries
/// at `0..n`, with the block selection fused in when the config selects (and its scores need
/// no gradient: not with `use_diff_topk`).
fn compressed_problem<R: CubeRuntime>(
    q: &CubeTensor<R>,
    ck: &CubeTensor<R>,
    num_mem: usize,
    config: &NsaConfig,
    scale: f64,
) -> Option<Problem> {
    let [b, h, n, d] = q.meta.shape().dims::<4>();
    let [_, kvh, slots, _] = ck.meta.shape().dims::<4>();
    if !is_float(q.dtype)
        || ck.dtype != q.dtype
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
    (topk <= 64 && launch::supported(&q.client, &p)).then_some(p)
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

fn int_dtype<I: IntElement>() -> DType {
    <I as Element>::dtype()
}

impl<R, F, I, BT> NsaKernels<Cb<R, F, I, BT>> for CubeKernels<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn selected_attention(
        &self,
        q: &Tensor<Cb<R, F, I, BT>, 4>,
        k: &Tensor<Cb<R, F, I, BT>, 4>,
        v: &Tensor<Cb<R, F, I, BT>, 4>,
        selection: Option<&Selection<Cb<R, F, I, BT>>>,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<Tensor<Cb<R, F, I, BT>, 4>> {
        let (qp, kp, vp) = (float_of(q), float_of(k), float_of(v));
        let (idx, gates) = selection_parts(selection, config);
        let count = idx.as_ref().map_or(0, |i| i.dims()[3]);
        let p = selected_problem(&qp, &kp, count, gates.is_some(), config, scale)?;
        let f = launch::forward(
            qp,
            kp,
            vp,
            idx.map(|i| i.into_primitive()),
            gates.map(|g| float_of(&g)),
            &p,
            int_dtype::<I>(),
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(f.out)))
    }

    fn sliding_attention(
        &self,
        q: &Tensor<Cb<R, F, I, BT>, 4>,
        k: &Tensor<Cb<R, F, I, BT>, 4>,
        v: &Tensor<Cb<R, F, I, BT>, 4>,
        window: usize,
        scale: f64,
    ) -> Option<Tensor<Cb<R, F, I, BT>, 4>> {
        let (qp, kp, vp) = (float_of(q), float_of(k), float_of(v));
        let p = sliding_problem(&qp, &kp, window, scale)?;
        let f = launch::forward(qp, kp, vp, None, None, &p, int_dtype::<I>());
        Some(Tensor::from_primitive(TensorPrimitive::Float(f.out)))
    }

    fn top_k(
        &self,
        x: &Tensor<Cb<R, F, I, BT>, 4>,
        k: usize,
    ) -> Option<(Tensor<Cb<R, F, I, BT>, 4>, Tensor<Cb<R, F, I, BT>, 4, Int>)> {
        let xp = float_of(x);
        let len = x.dims()[3];
        if !is_float(xp.dtype) || k == 0 || k > len || k > launch::MAX_TOP_K {
            return None;
        }
        let (values, indices) = launch::top_k(xp, k, int_dtype::<I>());
        Some((
            Tensor::from_primitive(TensorPrimitive::Float(values)),
            Tensor::from_primitive(indices),
        ))
    }

    fn compressed_and_selection(
        &self,
        q: &Tensor<Cb<R, F, I, BT>, 4>,
        ck: &Tensor<Cb<R, F, I, BT>, 4>,
        cv: &Tensor<Cb<R, F, I, BT>, 4>,
        num_mem: usize,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<CompressedOut<Cb<R, F, I, BT>>> {
        let (qp, kp, vp) = (float_of(q), float_of(ck), float_of(cv));
        let p = compressed_problem(&qp, &kp, num_mem, config, scale)?;
        let f = launch::forward(qp, kp, vp, None, None, &p, int_dtype::<I>());
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

/// What the backward step keeps from the forward.
#[derive(Clone, Debug)]
struct AttnState<R: CubeRuntime> {
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    gates: Option<CubeTensor<R>>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    problem: Problem,
}

/// Backward step of the fused attention; parents `[q, k, v]` or `[q, k, v, gates]`.
#[derive(Debug)]
struct AttnBackward<const N: usize>;

impl<R, F, I, BT, const N: usize> Backward<Cb<R, F, I, BT>, N> for AttnBackward<N>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type State = AttnState<R>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Cb<R, F, I, BT>>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv, dgates) = launch::backward(
            s.q, s.k, s.v, s.idx, s.gates, s.out, s.lse, grad, &s.problem,
        );
        let mut results = [Some(dq), Some(dk), Some(dv), dgates];
        for (parent, grad) in ops.parents.iter().zip(results.iter_mut()) {
            if let (Some(node), Some(grad)) = (parent, grad.take()) {
                grads.register::<Cb<R, F, I, BT>>(node.id, grad);
            }
        }
    }
}

type Ad<R, F, I, BT, C> = Autodiff<Cb<R, F, I, BT>, C>;

/// Runs the fused forward on autodiff tensors and records the backward step: the output is
/// tracked (parents q, k, v and the gates when given); the fused selection, if any, is not.
#[allow(clippy::type_complexity)]
fn tracked_attention<R, F, I, BT, C>(
    q: &Tensor<Ad<R, F, I, BT, C>, 4>,
    k: &Tensor<Ad<R, F, I, BT, C>, 4>,
    v: &Tensor<Ad<R, F, I, BT, C>, 4>,
    idx: Option<Tensor<Ad<R, F, I, BT, C>, 4, Int>>,
    gates: Option<Tensor<Ad<R, F, I, BT, C>, 4>>,
    problem: impl FnOnce(&CubeTensor<R>, &CubeTensor<R>) -> Option<Problem>,
) -> Option<CompressedOut<Ad<R, F, I, BT, C>>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    C: CheckpointStrategy,
{
    let (q, k, v) = (float_of(q), float_of(k), float_of(v));
    let p = problem(&q.primitive, &k.primitive)?;
    let idx = idx.map(|i| i.into_primitive());
    let gates = gates.map(|g| float_of(&g));
    let run = |gp: Option<CubeTensor<R>>| -> Forward<R> {
        launch::forward(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            idx.clone(),
            gp,
            &p,
            int_dtype::<I>(),
        )
    };
    let state = |f: &Forward<R>, gp: Option<CubeTensor<R>>| AttnState {
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
        let scores = Tensor::<Cb<R, F, I, BT>, 4>::from_primitive(TensorPrimitive::Float(scores));
        selection_of(Tensor::from_primitive(blocks), Tensor::from_inner(scores))
    });
    Some((
        Tensor::from_primitive(TensorPrimitive::Float(out)),
        selection,
    ))
}

impl<R, F, I, BT, C> NsaKernels<Ad<R, F, I, BT, C>> for CubeKernels<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    C: CheckpointStrategy,
{
    fn selected_attention(
        &self,
        q: &Tensor<Ad<R, F, I, BT, C>, 4>,
        k: &Tensor<Ad<R, F, I, BT, C>, 4>,
        v: &Tensor<Ad<R, F, I, BT, C>, 4>,
        selection: Option<&Selection<Ad<R, F, I, BT, C>>>,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<Tensor<Ad<R, F, I, BT, C>, 4>> {
        let (idx, gates) = selection_parts(selection, config);
        let count = idx.as_ref().map_or(0, |i| i.dims()[3]);
        let gated = gates.is_some();
        tracked_attention(q, k, v, idx, gates, |q, k| {
            selected_problem(q, k, count, gated, config, scale)
        })
        .map(|(out, _)| out)
    }

    fn sliding_attention(
        &self,
        q: &Tensor<Ad<R, F, I, BT, C>, 4>,
        k: &Tensor<Ad<R, F, I, BT, C>, 4>,
        v: &Tensor<Ad<R, F, I, BT, C>, 4>,
        window: usize,
        scale: f64,
    ) -> Option<Tensor<Ad<R, F, I, BT, C>, 4>> {
        tracked_attention(q, k, v, None, None, |q, k| {
            sliding_problem(q, k, window, scale)
        })
        .map(|(out, _)| out)
    }

    fn compressed_and_selection(
        &self,
        q: &Tensor<Ad<R, F, I, BT, C>, 4>,
        ck: &Tensor<Ad<R, F, I, BT, C>, 4>,
        cv: &Tensor<Ad<R, F, I, BT, C>, 4>,
        num_mem: usize,
        config: &NsaConfig,
        scale: f64,
    ) -> Option<CompressedOut<Ad<R, F, I, BT, C>>> {
        tracked_attention(q, ck, cv, None, None, |q, ck| {
            compressed_problem(q, ck, num_mem, config, scale)
        })
    }
}
