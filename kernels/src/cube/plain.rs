//! [`NsaKernels`] on a [`KernelBackend`] itself (inference, or training without autodiff):
//! each method checks its problem ([`super::problems`]) and launches.

use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::launch::{
    self, BlockTensors, FfTensors, RankProblem, RowProblem, RunChoices, SampleProblem,
};
use super::problems::{
    block_problem, compressed_problem, decode_problem, float3, float_of, is_float,
    selected_problem, selection_of, selection_parts, sliding_problem, write_problem, CompressedOut,
};
use super::{ops, CubeKernels, KernelBackend};
use crate::api::{
    BlockStep, DecodeInputs, DeviceSampling, NsaKernels, Projection, RowLinear, RowNorm, Selection,
};
use crate::rules::SparseSizes;

impl<B> CubeKernels<B> {
    /// The options of the attention launches.
    pub(super) fn run(&self) -> RunChoices {
        RunChoices::from(&self.options)
    }

    /// The ranking of `scores` `[b, n, m]` for queries from `offset`, when the kernels take it.
    fn rank_problem<K: KernelBackend>(
        &self,
        scores: &Tensor<K, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<RankProblem> {
        let [b, n, m] = scores.dims();
        let covered = is_float(scores.dtype()) && top_k > 0 && m < u32::MAX as usize / 2;
        covered.then_some(RankProblem {
            b,
            n,
            m,
            offset,
            top_k,
            own: true,
            grid_limit: self.options.grid_limit,
        })
    }

    /// [`NsaKernels::token_blocked`] on the backend's own tensors (the autodiff backend ranks
    /// the inner tensor: the selection passes no gradient).
    pub(super) fn rank<K: KernelBackend>(
        &self,
        scores: &Tensor<K, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<Tensor<K, 3, Bool>> {
        let p = self.rank_problem(scores, offset, top_k)?;
        let blocked = ops::rank_tokens::<K>(float3(scores), &p);
        Some(Tensor::<K, 3, Int>::from_primitive(blocked).equal_elem(1))
    }

    /// [`NsaKernels::token_positions`] on the backend's own tensors (one query per row).
    pub(super) fn positions<K: KernelBackend>(
        &self,
        scores: &Tensor<K, 3>,
        position: usize,
        top_k: usize,
    ) -> Option<Tensor<K, 2, Int>> {
        let p = self.rank_problem(scores, position, top_k)?;
        if p.n != 1 || position >= p.m {
            return None;
        }
        let positions = ops::token_positions::<K>(float3(scores), &p);
        Some(Tensor::<K, 3, Int>::from_primitive(positions).reshape([p.b, p.count()]))
    }

    /// [`NsaKernels::token_others`] on the backend's own tensors.
    pub(super) fn others<K: KernelBackend>(
        &self,
        scores: &Tensor<K, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<Tensor<K, 3, Int>> {
        let p = RankProblem {
            own: false,
            ..self.rank_problem(scores, offset, top_k)?
        };
        if top_k < 2 || offset + p.n > p.m {
            return None;
        }
        Some(Tensor::from_primitive(ops::token_positions::<K>(
            float3(scores),
            &p,
        )))
    }
}

impl<B: KernelBackend> NsaKernels<B> for CubeKernels<B> {
    fn selected_attention(
        &self,
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        selection: Option<&Selection<B>>,
        start: usize,
        sizes: &SparseSizes,
        scale: f64,
    ) -> Option<Tensor<B, 4>> {
        let (idx, gates) = selection_parts(selection, sizes);
        let [_, sel_heads, _, count] = idx.as_ref().map_or([0; 4], |i| i.dims());
        let run = self.run();
        let p = selected_problem(
            q,
            k,
            start,
            [sel_heads, count],
            gates.is_some(),
            sizes,
            scale,
            run,
        )?;
        let f = ops::attn_forward::<B>(
            [float_of(q), float_of(k), float_of(v)],
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
        start: usize,
        window: usize,
        scale: f64,
    ) -> Option<Tensor<B, 4>> {
        let p = sliding_problem(q, k, start, window, scale, self.run())?;
        let f = ops::attn_forward::<B>([float_of(q), float_of(k), float_of(v)], None, None, &p);
        Some(Tensor::from_primitive(TensorPrimitive::Float(f.out)))
    }

    fn top_k(&self, x: &Tensor<B, 4>, k: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4, Int>)> {
        let len = x.dims()[3];
        if !is_float(x.dtype()) || k == 0 || k > len || k > launch::MAX_TOP_K {
            return None;
        }
        let (values, indices) = ops::top_k::<B>(float_of(x), k);
        Some((
            Tensor::from_primitive(TensorPrimitive::Float(values)),
            Tensor::from_primitive(indices),
        ))
    }

    fn token_blocked(
        &self,
        scores: &Tensor<B, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<Tensor<B, 3, Bool>> {
        self.rank(scores, offset, top_k)
    }

    fn token_positions(
        &self,
        scores: &Tensor<B, 3>,
        position: usize,
        top_k: usize,
    ) -> Option<Tensor<B, 2, Int>> {
        self.positions(scores, position, top_k)
    }

    fn token_others(
        &self,
        scores: &Tensor<B, 3>,
        offset: usize,
        top_k: usize,
    ) -> Option<Tensor<B, 3, Int>> {
        self.others(scores, offset, top_k)
    }

    fn row_linear(&self, x: &Tensor<B, 3>, spec: &RowLinear<'_, B>) -> Option<Tensor<B, 3>> {
        let [b, n, din] = x.dims();
        let w = spec.layer.weight.clone();
        let [win, dout] = w.dims();
        let bias = spec.layer.bias.clone();
        let norm_w = spec.norm.map(|n| n.weight.clone());
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
        let (out, _) = ops::rows::<B>(
            float3(x),
            [
                norm_w.map(f1),
                Some(w.into_primitive().tensor()),
                bias.map(f1),
            ],
            spec.residual.map(float3),
            None,
            &p,
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn row_linear_pair(
        &self,
        x: &Tensor<B, 3>,
        norm: Option<&RowNorm<B>>,
        first: &Projection<B>,
        second: &Projection<B>,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
        let [b, n, din] = x.dims();
        let dtype = x.dtype();
        let parts = |l: &Projection<B>| {
            let w = l.weight.clone();
            let bias = l.bias.clone();
            let [win, dout] = w.dims();
            let fits = w.dtype() == dtype
                && win == din
                && bias
                    .as_ref()
                    .is_none_or(|b| b.dims() == [dout] && b.dtype() == dtype);
            fits.then_some((w, bias, dout))
        };
        let ((w, bias, dout), (w2, bias2, dout2)) = (parts(first)?, parts(second)?);
        let norm_w = norm.map(|n| n.weight.clone());
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
        let (a, c) = ops::rows::<B>(
            float3(x),
            [
                norm_w.map(f1),
                Some(w.into_primitive().tensor()),
                bias.map(f1),
            ],
            None,
            Some((w2.into_primitive().tensor(), bias2.map(f1))),
            &p,
        );
        let c = c.expect("a second output");
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
        let out = ops::decode_write::<B>(
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
        match block_problem(s, &buffers, self.options.decode_span) {
            Some(p) => {
                let f1 = |t: Tensor<B, 1>| t.into_primitive().tensor();
                let f2 = |t: Tensor<B, 2>| t.into_primitive().tensor();
                let bias = |l: &Projection<B>| l.bias.clone().map(f1);
                let t = BlockTensors {
                    x: float3(s.x),
                    norm: s.norm.map(|n| f1(n.weight.clone())),
                    w_qkv: f2(s.to_qkv.weight.clone()),
                    b_qkv: bias(s.to_qkv),
                    w_gates: f2(s.gates.weight.clone()),
                    b_gates: bias(s.gates),
                    cos: float_of(s.cos),
                    sin: float_of(s.sin),
                    buffers: buffers.map(|t| t.into_primitive().tensor()),
                    ck: float_of(s.compressed.k),
                    cv: float_of(s.compressed.v),
                    w_comb: f2(s.combine.weight.clone()),
                    b_comb: bias(s.combine),
                    ff: s.ff.map(|ff| FfTensors {
                        norm: f1(ff.norm.weight.clone()),
                        w1: f2(ff.fc1.weight.clone()),
                        b1: bias(&ff.fc1),
                        w2: f2(ff.fc2.weight.clone()),
                        b2: bias(&ff.fc2),
                    }),
                };
                let (out, written) = ops::decode_block::<B>(t, &p);
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
        rule: &DeviceSampling,
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
        let ids = ops::sample::<B>(logits.clone().into_primitive().tensor(), &p);
        Some(Tensor::from_primitive(ids))
    }

    fn decode_attention(&self, s: &DecodeInputs<'_, B>) -> Option<Tensor<B, 3>> {
        let p = decode_problem(s, self.options.decode_span)?;
        let (ck, cv) = (s.compressed.k, s.compressed.v);
        let (k, v) = (s.kv.k, s.kv.v);
        let gates = (s.gate_logits)();
        let out = ops::decode::<B>(
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
            self.options.decode_span,
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn compressed_and_selection(
        &self,
        q: &Tensor<B, 4>,
        ck: &Tensor<B, 4>,
        cv: &Tensor<B, 4>,
        start: usize,
        num_mem: usize,
        sizes: &SparseSizes,
        scale: f64,
    ) -> Option<CompressedOut<B>> {
        let p = compressed_problem(q, ck, start, num_mem, sizes, scale, self.run())?;
        let f = ops::attn_forward::<B>([float_of(q), float_of(ck), float_of(cv)], None, None, &p);
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
