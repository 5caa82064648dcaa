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
mod ops;
mod plain;
mod problems;
mod rank;
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

pub use self::launch::PACK_BELOW;
pub use self::ops::{Arg, CubeOp, Kind, Spec};
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

/// A backend whose tensors the CubeCL kernels run on: it runs a [`CubeOp`] on its own tensors.
pub trait KernelBackend: Backend {
    /// The CubeCL runtime the tensors live on.
    type Runtime: CubeRuntime;

    /// The CubeCL client of `device` (for the kernels' shared-memory budget).
    fn cube_client(device: &Self::Device) -> ComputeClient<Self::Runtime>;

    /// Runs `op` on `inputs` → its outputs ([`CubeOp::outputs`]).
    fn launch<Op: CubeOp>(op: Op, inputs: Vec<Arg<Self>>) -> Vec<Arg<Self>>;
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

    /// The launch itself: float and integer tensors are both `CubeTensor`s here.
    fn launch<Op: CubeOp>(op: Op, inputs: Vec<Arg<Self>>) -> Vec<Arg<Self>> {
        let int = int_dtype::<I>();
        let (specs, tensors): (Vec<Spec>, Vec<_>) = inputs
            .into_iter()
            .map(|a| {
                let (t, kind) = match a {
                    Arg::Float(t) => (t, Kind::Float),
                    Arg::Int(t) => (t, Kind::Int),
                };
                let spec = Spec {
                    shape: t.meta.shape.to_vec(),
                    dtype: t.dtype,
                    kind,
                };
                (spec, t)
            })
            .unzip();
        let outputs = op.outputs(&specs, int);
        let results = op.run(tensors, int);
        debug_assert_eq!(results.len(), outputs.len());
        results
            .into_iter()
            .zip(outputs)
            .map(|(t, spec)| match spec.kind {
                Kind::Float => Arg::Float(t),
                Kind::Int => Arg::Int(t),
            })
            .collect()
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
