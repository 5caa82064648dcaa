//! Every CubeCL launch as one value ([`CubeOp`]): which tensors it takes, what it returns and
//! how it runs, written once. A [`KernelBackend`] only knows how to run an op on its own tensors
//! (directly on `CubeBackend`, as a custom operation of the stream on `Fusion`), so the two
//! backends share every launch's bookkeeping; the functions at the bottom pack and unpack the
//! backend's primitives for the callers in [`super::plain`] and [`super::tracked`].

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::launch::{
    self, BlockLayout, BlockProblem, BlockTensors, DecodeProblem, Problem, RankProblem, RowProblem,
    SampleProblem, WriteProblem,
};
use super::{KernelBackend, KernelForward, KernelGrads};

/// Float or integer tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Float,
    Int,
}

/// The shape, dtype and kind of one input or output of a launch.
#[derive(Clone, Debug)]
pub struct Spec {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: Kind,
}

impl Spec {
    fn float(shape: Vec<usize>, dtype: DType) -> Self {
        Self {
            shape,
            dtype,
            kind: Kind::Float,
        }
    }

    fn int(shape: Vec<usize>, dtype: DType) -> Self {
        Self {
            shape,
            dtype,
            kind: Kind::Int,
        }
    }

    /// This shape with the last axis `len` long.
    fn with_last(&self, len: usize) -> Vec<usize> {
        let mut shape = self.shape.clone();
        *shape.last_mut().expect("rank >= 1") = len;
        shape
    }
}

/// A tensor argument or result of a launch, as the backend holds it.
pub enum Arg<B: KernelBackend> {
    Float(FloatTensor<B>),
    Int(IntTensor<B>),
}

impl<B: KernelBackend> Arg<B> {
    fn float(self) -> FloatTensor<B> {
        match self {
            Self::Float(t) => t,
            Self::Int(_) => panic!("a float result was declared"),
        }
    }

    fn int(self) -> IntTensor<B> {
        match self {
            Self::Int(t) => t,
            Self::Float(_) => panic!("an integer result was declared"),
        }
    }
}

/// One launch: its name in a fusion stream, its outputs (from its inputs' specs and the
/// backend's integer dtype `int`) and the launch itself on CubeCL tensors.
pub trait CubeOp: Send + Sync + 'static {
    /// The operation's name in the fusion stream.
    const NAME: &'static str;

    /// The outputs, in the order [`CubeOp::run`] returns them.
    fn outputs(&self, inputs: &[Spec], int: DType) -> Vec<Spec>;

    /// The launch.
    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, int: DType) -> Vec<CubeTensor<R>>;
}

/// The next of a launch's inputs (they are declared, so present).
fn next<T>(ins: &mut impl Iterator<Item = T>) -> T {
    ins.next().expect("declared input")
}

/// The attention forward ([`launch::forward`]): inputs `q, k, v` then the block indices and
/// the gates where given; outputs `out, lse` then the selection's blocks and scores where the
/// problem selects.
struct AttnForward {
    p: Problem,
    idx: bool,
    gates: bool,
}

impl CubeOp for AttnForward {
    const NAME: &'static str = "nsa_attn_fwd";

    fn outputs(&self, inputs: &[Spec], int: DType) -> Vec<Spec> {
        let (p, dtype) = (&self.p, inputs[0].dtype);
        let mut out = vec![
            Spec::float(vec![p.b, p.h, p.n, p.d], dtype),
            Spec::float(vec![p.b, p.h, p.n], DType::F32),
        ];
        if let Some(s) = p.select {
            let shape = vec![p.b, p.h / s.sel_group, p.n, s.topk];
            out.push(Spec::int(shape.clone(), int));
            out.push(Spec::float(shape, dtype));
        }
        out
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, int: DType) -> Vec<CubeTensor<R>> {
        let mut ins = inputs.into_iter();
        let (q, k, v) = (next(&mut ins), next(&mut ins), next(&mut ins));
        let idx = self.idx.then(|| next(&mut ins));
        let gates = self.gates.then(|| next(&mut ins));
        let f = launch::forward(q, k, v, idx, gates, &self.p, int);
        let mut out = vec![f.out, f.lse];
        if let Some((blocks, scores)) = f.selection {
            out.extend([blocks, scores]);
        }
        out
    }
}

/// The attention backward ([`launch::backward`]): inputs as [`AttnForward`], then `out, lse,
/// dout`; outputs `dq, dk, dv` and the gates' gradient where gated.
struct AttnBackward {
    p: Problem,
    idx: bool,
    gates: bool,
}

impl CubeOp for AttnBackward {
    const NAME: &'static str = "nsa_attn_bwd";

    fn outputs(&self, inputs: &[Spec], _: DType) -> Vec<Spec> {
        let (p, dtype) = (&self.p, inputs[0].dtype);
        let mut out = vec![
            Spec::float(vec![p.b, p.h, p.n, p.d], dtype),
            Spec::float(vec![p.b, p.kvh, p.nk, p.d], dtype),
            Spec::float(vec![p.b, p.kvh, p.nk, p.d], dtype),
        ];
        if self.gates {
            out.push(Spec::float(
                vec![p.b, p.h / p.group_heads, p.n, p.count],
                dtype,
            ));
        }
        out
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, _: DType) -> Vec<CubeTensor<R>> {
        let mut ins = inputs.into_iter();
        let (q, k, v) = (next(&mut ins), next(&mut ins), next(&mut ins));
        let idx = self.idx.then(|| next(&mut ins));
        let gates = self.gates.then(|| next(&mut ins));
        let (out, lse, dout) = (next(&mut ins), next(&mut ins), next(&mut ins));
        let (dq, dk, dv, dgates) = launch::backward(q, k, v, idx, gates, out, lse, dout, &self.p);
        let mut res = vec![dq, dk, dv];
        res.extend(dgates);
        res
    }
}

/// Top-`k` along the last axis ([`launch::top_k`]): `x` → values, indices.
struct TopK {
    k: usize,
}

impl CubeOp for TopK {
    const NAME: &'static str = "nsa_top_k";

    fn outputs(&self, inputs: &[Spec], int: DType) -> Vec<Spec> {
        let shape = inputs[0].with_last(self.k);
        vec![
            Spec::float(shape.clone(), inputs[0].dtype),
            Spec::int(shape, int),
        ]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, int: DType) -> Vec<CubeTensor<R>> {
        let x = next(&mut inputs.into_iter());
        let (values, indices) = launch::top_k(x, self.k, int);
        vec![values, indices]
    }
}

/// The decode step's attention ([`launch::decode`]): eight inputs → `[b, 1, h * d]`.
struct Decode {
    p: DecodeProblem,
    span: usize,
}

impl CubeOp for Decode {
    const NAME: &'static str = "nsa_decode";

    fn outputs(&self, inputs: &[Spec], _: DType) -> Vec<Spec> {
        let p = &self.p;
        vec![Spec::float(vec![p.b, 1, p.h * p.d], inputs[0].dtype)]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, _: DType) -> Vec<CubeTensor<R>> {
        let inputs: [CubeTensor<R>; 8] = inputs.try_into().expect("eight declared inputs");
        vec![launch::decode(inputs, &self.p, self.span)]
    }
}

/// One or two row projections ([`launch::row_linear_pair`]): inputs `x, w`, the second matrix
/// `w2` when paired, then the norm weight, bias, second bias and residual where given; outputs
/// the first result, and the second when paired.
struct Rows {
    p: RowProblem,
    paired: bool,
    /// `[norm, bias, bias2, residual]` given.
    given: [bool; 4],
}

impl CubeOp for Rows {
    const NAME: &'static str = "nsa_rows";

    fn outputs(&self, inputs: &[Spec], _: DType) -> Vec<Spec> {
        let x = &inputs[0];
        let mut out = vec![Spec::float(x.with_last(self.p.dout), x.dtype)];
        if let Some((dout2, _)) = self.p.second {
            out.push(Spec::float(x.with_last(dout2), x.dtype));
        }
        out
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, _: DType) -> Vec<CubeTensor<R>> {
        let mut ins = inputs.into_iter();
        let (x, w) = (next(&mut ins), next(&mut ins));
        let w2 = self.paired.then(|| next(&mut ins));
        let [norm, bias, bias2, residual] = self.given.map(|g| g.then(|| next(&mut ins)));
        let second = w2.map(|w2| (w2, bias2));
        let (a, b) = launch::row_linear_pair(x, norm, w, bias, residual, second, &self.p);
        let mut out = vec![a];
        out.extend(b);
        out
    }
}

/// The decode step's cache writes ([`launch::decode_write`]): `qkv, cos, sin` and the four
/// buffers → the four buffers written.
struct DecodeWrite {
    p: WriteProblem,
}

impl CubeOp for DecodeWrite {
    const NAME: &'static str = "nsa_decode_write";

    fn outputs(&self, inputs: &[Spec], _: DType) -> Vec<Spec> {
        inputs[3..]
            .iter()
            .map(|b| Spec::float(b.shape.clone(), inputs[0].dtype))
            .collect()
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, _: DType) -> Vec<CubeTensor<R>> {
        let mut ins = inputs.into_iter();
        let inputs = [(); 3].map(|()| next(&mut ins));
        let buffers = [(); 4].map(|()| next(&mut ins));
        launch::decode_write(inputs, buffers, &self.p).into()
    }
}

/// The device sampler ([`launch::sample`]): logits `[m, v]` → token ids `[m]`.
struct Sample {
    p: SampleProblem,
}

impl CubeOp for Sample {
    const NAME: &'static str = "nsa_sample";

    fn outputs(&self, _: &[Spec], int: DType) -> Vec<Spec> {
        vec![Spec::int(vec![self.p.m], int)]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, int: DType) -> Vec<CubeTensor<R>> {
        let logits = next(&mut inputs.into_iter());
        vec![launch::sample(logits, &self.p, int)]
    }
}

/// The DSA token ranking ([`launch::rank_tokens`]): scores `[b, n, m]` → the blocked mask
/// (integers, 1: not attended).
struct RankTokens {
    p: RankProblem,
}

impl CubeOp for RankTokens {
    const NAME: &'static str = "nsa_rank_tokens";

    fn outputs(&self, _: &[Spec], int: DType) -> Vec<Spec> {
        let p = &self.p;
        vec![Spec::int(vec![p.b, p.n, p.m], int)]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, int: DType) -> Vec<CubeTensor<R>> {
        let scores = next(&mut inputs.into_iter());
        vec![launch::rank_tokens(scores, &self.p, int)]
    }
}

/// DSA's token selection as positions ([`launch::token_positions`]): scores `[b, n, m]` →
/// the kept positions `[b, n, count]`, ascending, `-1` after the last.
struct TokenPositions {
    p: RankProblem,
}

impl CubeOp for TokenPositions {
    const NAME: &'static str = "nsa_token_positions";

    fn outputs(&self, _: &[Spec], int: DType) -> Vec<Spec> {
        let p = &self.p;
        vec![Spec::int(vec![p.b, p.n, p.count()], int)]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, int: DType) -> Vec<CubeTensor<R>> {
        let scores = next(&mut inputs.into_iter());
        vec![launch::token_positions(scores, &self.p, int)]
    }
}

/// A whole decode step of an NSA block ([`launch::decode_block`]): the flattened
/// [`BlockTensors`] → the block's output and the four buffers written.
struct DecodeBlock {
    p: BlockProblem,
    layout: BlockLayout,
    /// Where the buffers start among the flattened inputs.
    buffers: usize,
}

impl CubeOp for DecodeBlock {
    const NAME: &'static str = "nsa_decode_block";

    fn outputs(&self, inputs: &[Spec], _: DType) -> Vec<Spec> {
        let dtype = inputs[0].dtype;
        let buffers = &inputs[self.buffers..self.buffers + 4];
        std::iter::once(&inputs[0])
            .chain(buffers)
            .map(|s| Spec::float(s.shape.clone(), dtype))
            .collect()
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>, _: DType) -> Vec<CubeTensor<R>> {
        let (out, buffers) =
            launch::decode_block(BlockTensors::unflatten(inputs, &self.layout), &self.p);
        let mut res = vec![out];
        res.extend(buffers);
        res
    }
}

/// The fused attention forward of `p` on backend `B`.
pub fn attn_forward<B: KernelBackend>(
    [q, k, v]: [FloatTensor<B>; 3],
    idx: Option<IntTensor<B>>,
    gates: Option<FloatTensor<B>>,
    p: &Problem,
) -> KernelForward<B> {
    let op = AttnForward {
        p: p.clone(),
        idx: idx.is_some(),
        gates: gates.is_some(),
    };
    let mut args = vec![Arg::Float(q), Arg::Float(k), Arg::Float(v)];
    args.extend(idx.map(Arg::Int));
    args.extend(gates.map(Arg::Float));
    let mut out = B::launch(op, args).into_iter();
    let (o, lse) = (next(&mut out).float(), next(&mut out).float());
    let selection = out
        .next()
        .zip(out.next())
        .map(|(b, s)| (b.int(), s.float()));
    KernelForward {
        out: o,
        lse,
        selection,
    }
}

/// The fused attention backward of `p` from `[out, lse, dout]`.
pub fn attn_backward<B: KernelBackend>(
    [q, k, v]: [FloatTensor<B>; 3],
    idx: Option<IntTensor<B>>,
    gates: Option<FloatTensor<B>>,
    [out, lse, dout]: [FloatTensor<B>; 3],
    p: &Problem,
) -> KernelGrads<B> {
    let op = AttnBackward {
        p: p.clone(),
        idx: idx.is_some(),
        gates: gates.is_some(),
    };
    let mut args = vec![Arg::Float(q), Arg::Float(k), Arg::Float(v)];
    args.extend(idx.map(Arg::Int));
    args.extend(gates.map(Arg::Float));
    args.extend([out, lse, dout].map(Arg::Float));
    let mut g = B::launch(op, args).into_iter().map(Arg::float);
    let (dq, dk, dv) = (next(&mut g), next(&mut g), next(&mut g));
    (dq, dk, dv, g.next())
}

/// Top-`k` along the last axis of `x`: values and indices.
pub fn top_k<B: KernelBackend>(x: FloatTensor<B>, k: usize) -> (FloatTensor<B>, IntTensor<B>) {
    let mut out = B::launch(TopK { k }, vec![Arg::Float(x)]).into_iter();
    (next(&mut out).float(), next(&mut out).int())
}

/// The decode step's attention: inputs `[qkv, cos, sin, ck, cv, k, v, gate logits]`; the
/// compressed branch in parts of `span` rows ([`launch::DECODE_SPAN`] for `0`).
pub fn decode<B: KernelBackend>(
    inputs: [FloatTensor<B>; 8],
    p: &DecodeProblem,
    span: usize,
) -> FloatTensor<B> {
    let args = inputs.into_iter().map(Arg::Float).collect();
    let op = Decode { p: p.clone(), span };
    next(&mut B::launch(op, args).into_iter()).float()
}

/// `act(norm(x) · w + bias) + residual`, and with `second = (w2, bias2)` also
/// `norm(x) · w2 + bias2` (`p.second` gives its sizes).
pub fn rows<B: KernelBackend>(
    x: FloatTensor<B>,
    [norm, w, bias]: [Option<FloatTensor<B>>; 3],
    residual: Option<FloatTensor<B>>,
    second: Option<(FloatTensor<B>, Option<FloatTensor<B>>)>,
    p: &RowProblem,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let w = w.expect("the matrix");
    let (w2, bias2) = match second {
        Some((w2, b2)) => (Some(w2), b2),
        None => (None, None),
    };
    let op = Rows {
        p: p.clone(),
        paired: w2.is_some(),
        given: [
            norm.is_some(),
            bias.is_some(),
            bias2.is_some(),
            residual.is_some(),
        ],
    };
    let args = [Some(x), Some(w), w2, norm, bias, bias2, residual]
        .into_iter()
        .flatten()
        .map(Arg::Float)
        .collect();
    let mut out = B::launch(op, args).into_iter().map(Arg::float);
    (next(&mut out), out.next())
}

/// The decode step's cache writes: `[qkv, cos, sin]` into `buffers`.
pub fn decode_write<B: KernelBackend>(
    inputs: [FloatTensor<B>; 3],
    buffers: [FloatTensor<B>; 4],
    p: &WriteProblem,
) -> [FloatTensor<B>; 4] {
    let args = inputs.into_iter().chain(buffers).map(Arg::Float).collect();
    let op = DecodeWrite { p: p.clone() };
    let mut out = B::launch(op, args).into_iter().map(Arg::float);
    [(); 4].map(|()| next(&mut out))
}

/// The next token of each row of `logits`.
pub fn sample<B: KernelBackend>(logits: FloatTensor<B>, p: &SampleProblem) -> IntTensor<B> {
    let op = Sample { p: p.clone() };
    next(&mut B::launch(op, vec![Arg::Float(logits)]).into_iter()).int()
}

/// The blocked mask of DSA's token selection for `scores` `[b, n, m]` (1: not attended).
pub fn rank_tokens<B: KernelBackend>(scores: FloatTensor<B>, p: &RankProblem) -> IntTensor<B> {
    let op = RankTokens { p: p.clone() };
    next(&mut B::launch(op, vec![Arg::Float(scores)]).into_iter()).int()
}

/// The positions DSA's selection keeps of `scores` `[b, n, m]` (ascending, `[b, n, count]`).
pub fn token_positions<B: KernelBackend>(scores: FloatTensor<B>, p: &RankProblem) -> IntTensor<B> {
    let op = TokenPositions { p: p.clone() };
    next(&mut B::launch(op, vec![Arg::Float(scores)]).into_iter()).int()
}

/// One decode step of an NSA block: the block's output and the written buffers.
pub fn decode_block<B: KernelBackend>(
    t: BlockTensors<FloatTensor<B>>,
    p: &BlockProblem,
) -> (FloatTensor<B>, [FloatTensor<B>; 4]) {
    let (inputs, layout) = t.flatten();
    let buffers = layout.buffers_at();
    let op = DecodeBlock {
        p: p.clone(),
        layout,
        buffers,
    };
    let args = inputs.into_iter().map(Arg::Float).collect();
    let mut out = B::launch(op, args).into_iter().map(Arg::float);
    let o = next(&mut out);
    (o, [(); 4].map(|()| next(&mut out)))
}
