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

use burn::tensor::{DType, Shape};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::prelude::ComputeClient;

use super::problems::int_dtype;
use super::{Arg, CubeOp, KernelBackend, Kind, Spec};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;
type Ft<R> = FusionTensor<FusionCubeRuntime<R>>;
type Handles<R> =
    HandleContainer<<FusionCubeRuntime<R> as burn_fusion::FusionRuntime>::FusionHandle>;

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

    /// The launch as one custom operation of the stream: its outputs declared now, the launch
    /// run when the stream executes it.
    fn launch<Op: CubeOp>(op: Op, inputs: Vec<Arg<Self>>) -> Vec<Arg<Self>> {
        let int = int_dtype::<I>();
        let inputs: Vec<(Ft<R>, Kind)> = inputs
            .into_iter()
            .map(|a| match a {
                Arg::Float(t) => (t, Kind::Float),
                Arg::Int(t) => (t, Kind::Int),
            })
            .collect();
        let specs: Vec<Spec> = inputs
            .iter()
            .map(|(t, kind)| Spec {
                shape: t.shape.to_vec(),
                dtype: t.dtype,
                kind: *kind,
            })
            .collect();
        let outputs = op.outputs(&specs, int);
        let kinds: Vec<Kind> = outputs.iter().map(|o| o.kind).collect();
        let declared = outputs
            .into_iter()
            .map(|o| (o.shape, o.dtype, o.kind))
            .collect();
        custom::<R, F, I, BT>(Op::NAME, inputs, declared, move |ins| op.run(ins, int))
            .into_iter()
            .zip(kinds)
            .map(|(t, kind)| match kind {
                Kind::Float => Arg::Float(t),
                Kind::Int => Arg::Int(t),
            })
            .collect()
    }
}
