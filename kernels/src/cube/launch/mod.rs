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
mod rank;
mod rows;
mod sample;

pub use attention::*;
pub use block::*;
pub use decode::*;
pub use rank::*;
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

/// The device's limits on the cubes of a grid, `(x, y, z)`, each capped at `limit` where that is
/// set (`0`: the device's alone).
fn grid_limits<R: CubeRuntime>(client: &ComputeClient<R>, limit: u32) -> (usize, usize, usize) {
    let (x, y, z) = client.properties().hardware.max_cube_count;
    let cap = |m: u32| if limit > 0 { m.min(limit) } else { m }.max(1) as usize;
    (cap(x), cap(y), cap(z))
}

/// A grid of `x × y` cubes for the kernels that read their cube along x as
/// [`crate::cube::attention::grid_x`]: where `x` exceeds the device's limit (65,535 on
/// Vulkan and Metal; `limit` where set), it is folded into `x × z`, and the padding cubes
/// (`grid_x() >= x`) end at once.
fn grid<R: CubeRuntime>(client: &ComputeClient<R>, x: usize, y: usize, limit: u32) -> CubeCount {
    let (lx, _, _) = grid_limits(client, limit);
    let z = x.div_ceil(lx).max(1);
    CubeCount::Static(x.div_ceil(z).max(1) as u32, y.max(1) as u32, z as u32)
}

/// A 1-D launch of `units` units, `dim` per cube, folded into x and y within the device's
/// limits (`limit` where set): the kernels index by `ABSOLUTE_POS`, which counts across both,
/// and guard against the padding.
fn folded<R: CubeRuntime>(
    client: &ComputeClient<R>,
    units: usize,
    dim: usize,
    limit: u32,
) -> CubeCount {
    let (lx, _, _) = grid_limits(client, limit);
    let cubes = units.div_ceil(dim).max(1);
    let y = cubes.div_ceil(lx);
    CubeCount::Static(cubes.div_ceil(y) as u32, y as u32, 1)
}

fn zeros_u32<R: CubeRuntime>(like: &CubeTensor<R>, len: usize, limit: u32) -> CubeTensor<R> {
    let buf = empty(like, vec![len.max(1)], DType::U32);
    let cube_dim = CubeDim::new_1d(256);
    // SAFETY: one unit per element, guarded by `len`.
    unsafe {
        crate::cube::attention::fill_zero::launch_unchecked::<R>(
            &buf.client,
            folded(&buf.client, len, 256, limit),
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
