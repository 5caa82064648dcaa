//! Host side of the CubeCL kernels, one file per feature: the attention kernels of training
//! and prefill, the decode step, the row projections, the sampler and the whole-block decode
//! step. Shared here: the shared-memory budget and the buffers every launch allocates.

use std::any::{Any, TypeId};
use std::sync::Mutex;
use std::thread::ThreadId;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

mod attention;
mod block;
mod by_block;
mod decode;
mod rows;
mod sample;

pub use attention::*;
pub use block::*;
pub use decode::*;
pub use rows::*;
pub use sample::*;

const THREADS: usize = 128;

/// Shared memory a kernel may use on this device: CubeCL declares shared arrays statically,
/// and CUDA caps static shared memory at 48 KiB.
fn shared_budget<R: CubeRuntime>(client: &ComputeClient<R>) -> usize {
    client
        .properties()
        .hardware
        .max_shared_memory_size
        .min(48 * 1024)
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

fn zeros_u32<R: CubeRuntime>(like: &CubeTensor<R>, len: usize) -> CubeTensor<R> {
    let buf = empty(like, vec![len.max(1)], DType::U32);
    let cube_dim = CubeDim::new_1d(256);
    let cubes = len.div_ceil(256).max(1) as u32;
    // SAFETY: one unit per element, guarded by `len`.
    unsafe {
        crate::cube::attention::fill_zero::launch_unchecked::<R>(
            &buf.client,
            CubeCount::Static(cubes, 1, 1),
            cube_dim,
            buf.clone().into_tensor_arg(),
            len,
        );
    }
    buf
}

/// Placeholder argument for an unused tensor parameter.
fn dummy<R: CubeRuntime>(like: &CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    // one per runtime, device, dtype and thread, kept for the process: a decode step passes
    // about 20 absent operands, and every allocation is a message to the runtime's server
    // thread. Kernels never touch an absent operand (comptime flags), so sharing is safe; the
    // thread in the key keeps a dummy on the stream of the thread that launches.
    type Entry = (TypeId, ThreadId, DType, Box<dyn Any + Send>);
    static DUMMIES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let (runtime, thread) = (TypeId::of::<R>(), std::thread::current().id());
    let mut dummies = DUMMIES.lock().unwrap_or_else(|e| e.into_inner());
    let found = dummies.iter().find_map(|(r, t, d, held)| {
        if (*r, *t, *d) != (runtime, thread, dtype) {
            return None;
        }
        held.downcast_ref::<CubeTensor<R>>()
            .filter(|held| held.device == like.device)
            .cloned()
    });
    found.unwrap_or_else(|| {
        let fresh = empty(like, vec![1], dtype);
        dummies.push((runtime, thread, dtype, Box::new(fresh.clone())));
        fresh
    })
}
