//! Fused kernels for Native Sparse Attention, beneath the model: CubeCL kernels for CUDA and
//! wgpu (feature `cube`, with Burn's fusion stream under `fusion`) and CPU kernels for Burn's
//! `flex` backend (feature `flex`), behind an interface of tensors and sizes ([`NsaKernels`]).
//!
//! - [`rules`]: the NSA rules every implementation shares (block counts, top-n, window,
//!   visibility, the softmax sink and validity threshold, the tie rule).
//! - [`options`]: [`KernelOptions`], the explicit choice of how kernels run.
//! - [`api`]: the [`NsaKernels`] trait and the plain inputs it takes.
//! - [`dispatch`]: the per-backend registration and the [`Kernels`] handle the model calls.
//! - `cube`: the CubeCL kernels (`attention/`, `decode`, `rows`, `sample`, their launches).
//! - `flex`: the CPU decode step and matrix-vector products.

pub mod api;
pub mod dispatch;
pub mod options;
pub mod rules;

#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "flex")]
pub mod flex;

pub use api::{
    BlockStep, CachedKv, DecodeInputs, DecodeShape, DeviceSampling, FeedForwardParams, NsaKernels,
    Projection, RowLinear, RowNorm, Selection,
};
#[cfg(feature = "cube")]
pub use cube::register_cube;
pub use dispatch::{register, registered, write_rows_with_slice_assign, Kernels};
#[cfg(feature = "flex")]
pub use flex::register_flex;
/// The switch parsers under their former name.
pub use options as switches;
pub use options::{KernelOptions, SelectedOrder, TensorCores};
