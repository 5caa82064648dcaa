//! The kernels on Burn's `Fusion<CubeBackend<..>>` (feature `fusion`).
//!
//! Fusion records tensor operations lazily and compiles runs of element-wise and reduction ops
//! into single kernels. A CubeCL launch of ours joins that stream as one custom operation: its
//! output tensors are declared up front (shape and dtype), and when the stream executes the
//! operation, the inputs arrive as `CubeTensor`s, the same launch as on the plain backend runs,
//! and its results are registered under the declared ids. The ops around it keep fusing.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::prelude::ComputeClient;

use super::launch::{
    self, BlockProblem, BlockTensors, DecodeProblem, Problem, RowProblem, SampleProblem,
    WriteProblem,
};
use super::problems::int_dtype;
use super::{KernelBackend, KernelForward, KernelGrads};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;
type Ft<R> = FusionTensor<FusionCubeRuntime<R>>;
type Handles<R> =
    HandleContainer<<FusionCubeRuntime<R> as burn_fusion::FusionRuntime>::FusionHandle>;

/// Integer or float tensor (how the stream's handle container reads and writes it).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Float,
    Int,
}

type Launch<R> = dyn Fn(Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> + Send + Sync;
/// The backend's element types, carried for the handle container's conversions.
type Elements<F, I, BT> = PhantomData<fn() -> (F, I, BT)>;

/// One launch of ours as an operation of the fusion stream.
struct CustomLaunch<R: CubeRuntime, F, I, BT> {
    desc: CustomOpIr,
    inputs: Vec<Kind>,
    outputs: Vec<Kind>,
    run: Arc<Launch<R>>,
    _types: Elements<F, I, BT>,
}

impl<R: CubeRuntime, F, I, BT> fmt::Debug for CustomLaunch<R, F, I, BT> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomLaunch")
            .field("desc", &self.desc)
            .finish()
    }
}

impl<R, F, I, BT> Operation<FusionCubeRuntime<R>> for CustomLaunch<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn execute(&self, handles: &mut Handles<R>) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .zip(&self.inputs)
            .map(|(ir, kind)| match kind {
                Kind::Float => handles.get_float_tensor::<Cb<R, F, I, BT>>(ir),
                Kind::Int => handles.get_int_tensor::<Cb<R, F, I, BT>>(ir),
            })
            .collect();
        let results = (self.run)(inputs);
        debug_assert_eq!(results.len(), self.desc.outputs.len());
        for ((ir, kind), tensor) in self.desc.outputs.iter().zip(&self.outputs).zip(results) {
            match kind {
                Kind::Float => handles.register_float_tensor::<Cb<R, F, I, BT>>(&ir.id, tensor),
                Kind::Int => handles.register_int_tensor::<Cb<R, F, I, BT>>(&ir.id, tensor),
            }
        }
    }
}

/// Registers `run` on the stream of `inputs` (the first is required; it gives the client) with
/// outputs of the given shapes and dtypes; returns the output tensors.
fn custom<R, F, I, BT>(
    name: &'static str,
    inputs: Vec<(Ft<R>, Kind)>,
    outputs: Vec<(Vec<usize>, DType, Kind)>,
    run: impl Fn(Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> + Send + Sync + 'static,
) -> Vec<Ft<R>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = inputs[0].0.client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter().map(|(t, _)| t));
    let in_kinds = inputs.iter().map(|(_, k)| *k).collect();
    let out_kinds = outputs.iter().map(|(_, _, k)| *k).collect();
    let in_ir: Vec<TensorIr> = inputs.into_iter().map(|(t, _)| t.into_ir()).collect();
    let out_ir: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype, _)| {
            TensorIr::uninit(client.create_empty_handle(), Shape::from(shape), dtype)
        })
        .collect();
    let desc = CustomOpIr::new(name, &in_ir, &out_ir);
    let op = CustomLaunch::<R, F, I, BT> {
        desc: desc.clone(),
        inputs: in_kinds,
        outputs: out_kinds,
        run: Arc::new(run),
        _types: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// The inputs of an attention launch: `q`, `k`, `v`, then the block indices and the gates when
/// given.
fn attn_inputs<R: CubeRuntime>(
    [q, k, v]: [Ft<R>; 3],
    idx: Option<Ft<R>>,
    gates: Option<Ft<R>>,
) -> Vec<(Ft<R>, Kind)> {
    let mut inputs = vec![(q, Kind::Float), (k, Kind::Float), (v, Kind::Float)];
    inputs.extend(idx.map(|t| (t, Kind::Int)));
    inputs.extend(gates.map(|t| (t, Kind::Float)));
    inputs
}

/// `q`, `k`, `v`, indices and gates back from the front of `ins`, as [`attn_inputs`] laid them
/// out.
#[allow(clippy::type_complexity)]
fn take_attn_inputs<R: CubeRuntime>(
    ins: &mut impl Iterator<Item = CubeTensor<R>>,
    has_idx: bool,
    has_gates: bool,
) -> (
    [CubeTensor<R>; 3],
    Option<CubeTensor<R>>,
    Option<CubeTensor<R>>,
) {
    let mut next = || ins.next().expect("declared input");
    let qkv = [next(), next(), next()];
    let idx = has_idx.then(&mut next);
    let gates = has_gates.then(&mut next);
    (qkv, idx, gates)
}

impl<R, F, I, BT> KernelBackend for Fusion<Cb<R, F, I, BT>>
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
        let dtype = q.dtype;
        let (has_idx, has_gates) = (idx.is_some(), gates.is_some());
        let inputs = attn_inputs([q, k, v], idx, gates);
        let mut outputs = vec![
            (vec![p.b, p.h, p.n, p.d], dtype, Kind::Float),
            (vec![p.b, p.h, p.n], DType::F32, Kind::Float),
        ];
        if let Some(s) = p.select {
            let shape = vec![p.b, p.h / s.sel_group, p.n, s.topk];
            outputs.push((shape.clone(), int_dtype::<I>(), Kind::Int));
            outputs.push((shape, dtype, Kind::Float));
        }
        let problem = p.clone();
        let mut out = custom::<R, F, I, BT>("nsa_attn_fwd", inputs, outputs, move |ins| {
            let ([q, k, v], idx, gates) =
                take_attn_inputs(&mut ins.into_iter(), has_idx, has_gates);
            let f = launch::forward(q, k, v, idx, gates, &problem, int_dtype::<I>());
            let mut res = vec![f.out, f.lse];
            if let Some((blocks, scores)) = f.selection {
                res.push(blocks);
                res.push(scores);
            }
            res
        })
        .into_iter();
        let (o, lse) = (out.next().expect("out"), out.next().expect("lse"));
        let selection = out.next().zip(out.next());
        KernelForward {
            out: o,
            lse,
            selection,
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
        let dtype = q.dtype;
        let (has_idx, has_gates) = (idx.is_some(), gates.is_some());
        let mut inputs = attn_inputs([q, k, v], idx, gates);
        inputs.extend([(out, Kind::Float), (lse, Kind::Float), (dout, Kind::Float)]);
        let mut outputs = vec![
            (vec![p.b, p.h, p.n, p.d], dtype, Kind::Float),
            (vec![p.b, p.kvh, p.nk, p.d], dtype, Kind::Float),
            (vec![p.b, p.kvh, p.nk, p.d], dtype, Kind::Float),
        ];
        if has_gates {
            let shape = vec![p.b, p.h / p.group_heads, p.n, p.count];
            outputs.push((shape, dtype, Kind::Float));
        }
        let problem = p.clone();
        let mut grads = custom::<R, F, I, BT>("nsa_attn_bwd", inputs, outputs, move |ins| {
            let mut ins = ins.into_iter();
            let ([q, k, v], idx, gates) = take_attn_inputs(&mut ins, has_idx, has_gates);
            let mut next = || ins.next().expect("declared input");
            let (out, lse, dout) = (next(), next(), next());
            let (dq, dk, dv, dgates) =
                launch::backward(q, k, v, idx, gates, out, lse, dout, &problem);
            let mut res = vec![dq, dk, dv];
            res.extend(dgates);
            res
        })
        .into_iter();
        let (dq, dk, dv) = (
            grads.next().expect("dq"),
            grads.next().expect("dk"),
            grads.next().expect("dv"),
        );
        (dq, dk, dv, grads.next())
    }

    fn top_k(x: FloatTensor<Self>, k: usize) -> (FloatTensor<Self>, IntTensor<Self>) {
        let mut shape = x.shape.to_vec();
        *shape.last_mut().expect("rank >= 1") = k;
        let dtype = x.dtype;
        let outputs = vec![
            (shape.clone(), dtype, Kind::Float),
            (shape, int_dtype::<I>(), Kind::Int),
        ];
        let mut out =
            custom::<R, F, I, BT>("nsa_top_k", vec![(x, Kind::Float)], outputs, move |ins| {
                let x = ins.into_iter().next().expect("x");
                let (values, indices) = launch::top_k(x, k, int_dtype::<I>());
                vec![values, indices]
            })
            .into_iter();
        (out.next().expect("values"), out.next().expect("indices"))
    }

    fn decode(inputs: [FloatTensor<Self>; 8], p: &DecodeProblem) -> FloatTensor<Self> {
        let dtype = inputs[0].dtype;
        let inputs = inputs.into_iter().map(|t| (t, Kind::Float)).collect();
        let outputs = vec![(vec![p.b, 1, p.h * p.d], dtype, Kind::Float)];
        let problem = p.clone();
        custom::<R, F, I, BT>("nsa_decode", inputs, outputs, move |ins| {
            let ins: [CubeTensor<R>; 8] = ins.try_into().expect("eight declared inputs");
            vec![launch::decode(ins, &problem)]
        })
        .pop()
        .expect("out")
    }

    fn row_linear(
        x: FloatTensor<Self>,
        norm_w: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
        p: &RowProblem,
    ) -> FloatTensor<Self> {
        let dtype = x.dtype;
        let mut shape = x.shape.to_vec();
        *shape.last_mut().expect("rank >= 1") = p.dout;
        let (has_norm, has_bias, has_res) = (norm_w.is_some(), bias.is_some(), residual.is_some());
        let mut inputs = vec![(x, Kind::Float), (w, Kind::Float)];
        inputs.extend(
            [norm_w, bias, residual]
                .into_iter()
                .flatten()
                .map(|t| (t, Kind::Float)),
        );
        let problem = p.clone();
        custom::<R, F, I, BT>(
            "nsa_row_linear",
            inputs,
            vec![(shape, dtype, Kind::Float)],
            move |ins| {
                let mut ins = ins.into_iter();
                let mut next = || ins.next().expect("declared input");
                let (x, w) = (next(), next());
                let norm_w = has_norm.then(&mut next);
                let bias = has_bias.then(&mut next);
                let residual = has_res.then(&mut next);
                vec![launch::row_linear(x, norm_w, w, bias, residual, &problem)]
            },
        )
        .pop()
        .expect("out")
    }

    fn decode_write(
        inputs: [FloatTensor<Self>; 3],
        buffers: [FloatTensor<Self>; 4],
        p: &WriteProblem,
    ) -> [FloatTensor<Self>; 4] {
        let dtype = inputs[0].dtype;
        let outputs = buffers
            .iter()
            .map(|t| (t.shape.to_vec(), dtype, Kind::Float))
            .collect();
        let ins = inputs
            .into_iter()
            .chain(buffers)
            .map(|t| (t, Kind::Float))
            .collect();
        let problem = p.clone();
        let out = custom::<R, F, I, BT>("nsa_decode_write", ins, outputs, move |ins| {
            let mut ins = ins.into_iter();
            let mut next = || ins.next().expect("declared input");
            let inputs = [next(), next(), next()];
            let buffers = [next(), next(), next(), next()];
            launch::decode_write(inputs, buffers, &problem).into()
        });
        out.try_into().expect("four declared outputs")
    }

    fn sample(logits: FloatTensor<Self>, p: &SampleProblem) -> IntTensor<Self> {
        let outputs = vec![(vec![p.m], int_dtype::<I>(), Kind::Int)];
        let problem = p.clone();
        custom::<R, F, I, BT>(
            "nsa_sample",
            vec![(logits, Kind::Float)],
            outputs,
            move |ins| {
                let logits = ins.into_iter().next().expect("logits");
                vec![launch::sample(logits, &problem, int_dtype::<I>())]
            },
        )
        .pop()
        .expect("ids")
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
        let dtype = x.dtype;
        let mut shape = x.shape.to_vec();
        let mut shape2 = shape.clone();
        *shape.last_mut().expect("rank >= 1") = p.dout;
        *shape2.last_mut().expect("rank >= 1") = p.second.expect("a pair").0;
        let (has_norm, has_bias, has_bias2) = (norm_w.is_some(), bias.is_some(), bias2.is_some());
        let mut inputs = vec![(x, Kind::Float), (w, Kind::Float), (w2, Kind::Float)];
        inputs.extend(
            [norm_w, bias, bias2]
                .into_iter()
                .flatten()
                .map(|t| (t, Kind::Float)),
        );
        let problem = p.clone();
        let mut out = custom::<R, F, I, BT>(
            "nsa_row_linear_pair",
            inputs,
            vec![(shape, dtype, Kind::Float), (shape2, dtype, Kind::Float)],
            move |ins| {
                let mut ins = ins.into_iter();
                let mut next = || ins.next().expect("declared input");
                let (x, w, w2) = (next(), next(), next());
                let norm_w = has_norm.then(&mut next);
                let bias = has_bias.then(&mut next);
                let bias2 = has_bias2.then(&mut next);
                let (a, b) =
                    launch::row_linear_pair(x, norm_w, w, bias, None, Some((w2, bias2)), &problem);
                vec![a, b.expect("a second output")]
            },
        )
        .into_iter();
        (out.next().expect("first"), out.next().expect("second"))
    }

    fn decode_block(
        t: BlockTensors<FloatTensor<Self>>,
        p: &BlockProblem,
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 4]) {
        let dtype = t.x.dtype;
        let mut outputs = vec![(t.x.shape.to_vec(), dtype, Kind::Float)];
        outputs.extend(
            t.buffers
                .iter()
                .map(|b| (b.shape.to_vec(), dtype, Kind::Float)),
        );
        let (inputs, layout) = t.flatten();
        let inputs = inputs.into_iter().map(|t| (t, Kind::Float)).collect();
        let problem = p.clone();
        let mut res = custom::<R, F, I, BT>("nsa_decode_block", inputs, outputs, move |ins| {
            let (out, buffers) =
                launch::decode_block(BlockTensors::unflatten(ins, &layout), &problem);
            let mut res = vec![out];
            res.extend(buffers);
            res
        })
        .into_iter();
        let out = res.next().expect("out");
        let buffers = [
            res.next().expect("k"),
            res.next().expect("v"),
            res.next().expect("k ring"),
            res.next().expect("v ring"),
        ];
        (out, buffers)
    }
}
