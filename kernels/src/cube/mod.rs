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
mod plain;
mod problems;
mod reduce;
mod rows;
mod sample;
mod tracked;

use std::marker::PhantomData;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::ComputeClient;

use self::launch::{
    BlockProblem, BlockTensors, DecodeProblem, Problem, RowProblem, SampleProblem, WriteProblem,
};
use self::problems::int_dtype;
use crate::api::NsaKernels;
use crate::dispatch::register;
use crate::options::KernelOptions;

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

/// The CubeCL kernels for backend `B`, under the options they were built with.
pub struct CubeKernels<B> {
    options: KernelOptions,
    backend: PhantomData<fn() -> B>,
}

impl<B> CubeKernels<B> {
    /// The kernels under `options`.
    pub fn new(options: &KernelOptions) -> Self {
        Self {
            options: *options,
            backend: PhantomData,
        }
    }
}

fn plain<B: KernelBackend>(options: &KernelOptions) -> Arc<dyn NsaKernels<B>> {
    Arc::new(CubeKernels::<B>::new(options))
}

fn tracked<B: KernelBackend>(options: &KernelOptions) -> Arc<dyn NsaKernels<Autodiff<B>>> {
    Arc::new(CubeKernels::<B>::new(options))
}

fn register_for<B: KernelBackend>() {
    register::<B>(plain::<B>);
    register::<Autodiff<B>>(tracked::<B>);
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
