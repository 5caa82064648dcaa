//! [`NsaKernels`] on the autodiff backend over a [`KernelBackend`]: the forward runs the same
//! kernels and records a backward step that runs the fused backward kernels.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::TensorPrimitive;

use super::launch::Problem;
use super::problems::{
    compressed_problem, float_of, selected_problem, selection_of, selection_parts, sliding_problem,
    CompressedOut,
};
use super::{ops, CubeKernels, KernelBackend, KernelForward};
use crate::api::{NsaKernels, Selection};
use crate::rules::SparseSizes;

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
        let (dq, dk, dv, dgates) = ops::attn_backward::<B>(
            [s.q, s.k, s.v],
            s.idx,
            s.gates,
            [s.out, s.lse, grad],
            &s.problem,
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
        ops::attn_forward::<B>(
            [
                q.primitive.clone(),
                k.primitive.clone(),
                v.primitive.clone(),
            ],
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
        start: usize,
        sizes: &SparseSizes,
        scale: f64,
    ) -> Option<Tensor<Autodiff<B, C>, 4>> {
        // the backward takes whole sequences
        if start != 0 {
            return None;
        }
        let (idx, gates) = selection_parts(selection, sizes);
        let [_, sel_heads, _, count] = idx.as_ref().map_or([0; 4], |i| i.dims());
        let (q0, k0) = (inner(q), inner(k));
        let p = selected_problem(
            &q0,
            &k0,
            0,
            [sel_heads, count],
            gates.is_some(),
            sizes,
            scale,
            self.run(),
        )?;
        Some(tracked_attention(q, k, v, idx, gates, p).0)
    }

    fn sliding_attention(
        &self,
        q: &Tensor<Autodiff<B, C>, 4>,
        k: &Tensor<Autodiff<B, C>, 4>,
        v: &Tensor<Autodiff<B, C>, 4>,
        start: usize,
        window: usize,
        scale: f64,
    ) -> Option<Tensor<Autodiff<B, C>, 4>> {
        if start != 0 {
            return None;
        }
        let p = sliding_problem(&inner(q), &inner(k), 0, window, scale, self.run())?;
        Some(tracked_attention(q, k, v, None, None, p).0)
    }

    fn compressed_and_selection(
        &self,
        q: &Tensor<Autodiff<B, C>, 4>,
        ck: &Tensor<Autodiff<B, C>, 4>,
        cv: &Tensor<Autodiff<B, C>, 4>,
        start: usize,
        num_mem: usize,
        sizes: &SparseSizes,
        scale: f64,
    ) -> Option<CompressedOut<Autodiff<B, C>>> {
        if start != 0 {
            return None;
        }
        let run = self.run();
        let p = compressed_problem(&inner(q), &inner(ck), 0, num_mem, sizes, scale, run)?;
        Some(tracked_attention(q, ck, cv, None, None, p))
    }

    fn token_blocked(
        &self,
        scores: &Tensor<Autodiff<B, C>, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<Tensor<Autodiff<B, C>, 3, Bool>> {
        let blocked = self.rank(&scores.clone().inner(), offset, top_k)?;
        Some(Tensor::from_primitive(blocked.into_primitive()))
    }

    fn token_positions(
        &self,
        scores: &Tensor<Autodiff<B, C>, 3>,
        position: usize,
        top_k: usize,
    ) -> Option<Tensor<Autodiff<B, C>, 2, Int>> {
        let positions = self.positions(&scores.clone().inner(), position, top_k)?;
        Some(Tensor::from_primitive(positions.into_primitive()))
    }

    fn token_others(
        &self,
        scores: &Tensor<Autodiff<B, C>, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<Tensor<Autodiff<B, C>, 3, Int>> {
        let others = self.others(&scores.clone().inner(), offset, top_k)?;
        Some(Tensor::from_primitive(others.into_primitive()))
    }
}
