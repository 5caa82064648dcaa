//! Which kernels a backend has, and the handle the model calls them through.
//!
//! The model is generic over `B: Backend` and must not gain a bound for every backend that has
//! fused kernels, so implementations are found by the backend's type: the binaries register a
//! constructor per backend type once at start-up ([`register`]; `register_cube`, `register_flex`
//! do it for the CubeCL and CPU kernels), and the model asks for a [`Kernels`] handle built from
//! the [`KernelOptions`] it was given. The table is the only state here; whether and how the
//! kernels run is decided by the options each call carries.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use burn::prelude::*;

use crate::api::NsaKernels;
use crate::options::KernelOptions;

/// Builds a backend's kernels for a set of options.
pub type KernelConstructor<B> = fn(&KernelOptions) -> Arc<dyn NsaKernels<B>>;

type Table = RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Registers the kernels of backend `B` (replacing an earlier registration).
pub fn register<B: Backend>(constructor: KernelConstructor<B>) {
    table()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(TypeId::of::<B>(), Box::new(constructor));
}

/// Whether kernels are registered for `B`.
pub fn registered<B: Backend>() -> bool {
    table()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&TypeId::of::<B>())
}

fn constructor<B: Backend>() -> Option<KernelConstructor<B>> {
    table()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&TypeId::of::<B>())?
        .downcast_ref::<KernelConstructor<B>>()
        .copied()
}

/// The kernels the model may call for one forward pass or decode step, with the options they
/// run under: the registered implementation when `options.fused` and one is registered for
/// `B`, else none (every branch then runs on tensor ops).
#[derive(Clone)]
pub struct Kernels<B: Backend> {
    fused: Option<Arc<dyn NsaKernels<B>>>,
    options: KernelOptions,
}

impl<B: Backend> Kernels<B> {
    /// The kernels of `B` under `options`.
    pub fn new(options: &KernelOptions) -> Self {
        let fused = options
            .fused
            .then(constructor::<B>)
            .flatten()
            .map(|make| make(options));
        Self {
            fused,
            options: *options,
        }
    }

    /// Tensor ops only.
    pub fn tensor_ops() -> Self {
        Self::new(&KernelOptions::tensor_ops())
    }

    /// The fused implementation, when there is one and the options allow it.
    pub fn fused(&self) -> Option<&dyn NsaKernels<B>> {
        self.fused.as_deref()
    }

    /// The options these kernels run under.
    pub fn options(&self) -> &KernelOptions {
        &self.options
    }

    /// `buffer` `[batch, heads, capacity, dim]` with rows `start..start + n` replaced by `rows`
    /// ([`NsaKernels::write_rows`] where fused, else `slice_assign`).
    pub fn write_rows(
        &self,
        buffer: Tensor<B, 4>,
        start: usize,
        rows: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        match self.fused() {
            Some(k) => k.write_rows(buffer, start, rows),
            None => write_rows_with_slice_assign(buffer, start, rows),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Kernels<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("fused", &self.fused.is_some())
            .field("options", &self.options)
            .finish()
    }
}

/// [`NsaKernels::write_rows`] through `slice_assign`.
pub fn write_rows_with_slice_assign<B: Backend>(
    buffer: Tensor<B, 4>,
    start: usize,
    rows: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, n, d] = rows.dims();
    buffer.slice_assign([0..b, 0..h, start..start + n, 0..d], rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    struct Nothing;
    impl NsaKernels<NdArray> for Nothing {}

    fn nothing(_: &KernelOptions) -> Arc<dyn NsaKernels<NdArray>> {
        Arc::new(Nothing)
    }

    #[test]
    fn registration_and_options_decide_the_kernels() {
        assert!(Kernels::<NdArray<f64>>::new(&KernelOptions::default())
            .fused()
            .is_none());
        register::<NdArray>(nothing);
        assert!(registered::<NdArray>());
        assert!(!registered::<NdArray<f64>>());
        let on = Kernels::<NdArray>::new(&KernelOptions::default());
        let k = on.fused().expect("registered");
        let device = Default::default();
        let q = Tensor::<NdArray, 4>::zeros([1, 1, 1, 2], &device);
        assert!(k.sliding_attention(&q, &q, &q, 0, 4, 1.0).is_none());
        assert!(Kernels::<NdArray>::new(&KernelOptions::tensor_ops())
            .fused()
            .is_none());
    }
}
