//! Device memory that lives as long as a generation or the model: allocated exactly.
//!
//! CubeCL's pools (CUDA, wgpu) serve a buffer from a page of a size class and keep a page once
//! made: on an 80 GB card a buffer of 42–332 MB takes a slice of a 1.3 GB page, one up to
//! 2.7 GB a slice of a 5.3 GB page (the classes scale with the card's memory). Short-lived
//! buffers reuse those pages; buffers that stay (the weights, the decode caches of a long
//! prompt) are better made at their own size, from the runtime's persistent pool. Elsewhere
//! (the CPU backends) the functions here are plain calls.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

use crate::transformer::Transformer;

/// Runs `make` with the device's allocations exactly sized (one buffer of its own size each,
/// from the persistent pool) and returns what it made.
///
/// Two windows: `make` in one, then a sync in another. Burn ends each of its own persistent
/// windows (a parameter's initialisation, a record's loading) by switching back to the pools,
/// also inside ours, and a lazy backend (fusion) allocates only when it runs the operations:
/// the sync in a window of its own runs what `make` queued with exact allocations.
pub fn exact_allocation<B: Backend, T: Send>(
    device: &B::Device,
    make: impl FnOnce() -> T + Send,
) -> T {
    let made = B::memory_persistent_allocations(device, make, |make| make());
    B::memory_persistent_allocations(device, (), |()| {
        let _ = B::sync(device);
    });
    made
}

/// Makes every parameter (a lazily initialised one is made now), each in its own
/// [`exact_allocation`].
struct Touch<'a, B: Backend> {
    device: &'a B::Device,
}

impl<B: Backend> ModuleVisitor<B> for Touch<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        exact_allocation::<B, _>(self.device, || param.val());
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
        exact_allocation::<B, _>(self.device, || param.val());
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        exact_allocation::<B, _>(self.device, || param.val());
    }
}

impl<B: Backend> Transformer<B> {
    /// The model with every parameter on the device in exactly sized buffers: built by `make`
    /// (random initialisation, or loading weights) within [`exact_allocation`], its lazily
    /// initialised parameters made there too. On an 80 GB card the f32 embedding and output
    /// head of a 21k vocabulary at width 512 (43 MB each) would otherwise take a 1.3 GB page.
    pub fn with_exact_weights<E: Send>(
        device: &B::Device,
        make: impl FnOnce() -> Result<Self, E> + Send,
    ) -> Result<Self, E> {
        let model = exact_allocation::<B, _>(device, make)?;
        model.visit(&mut Touch { device });
        Ok(model)
    }
}
