//! Launches of the decode step's attention and cache writes.

use super::*;

/// One decode step of a layer's attention ([`crate::cube::decode::nsa_decode`]).
pub use crate::api::DecodeShape as DecodeProblem;

/// The decode kernel's tiling for `p` within the shared-memory budget, if any.
fn decode_tiling(p: &DecodeProblem, budget: usize) -> Option<crate::cube::decode::DecodeTiling> {
    let mut kc = 32;
    loop {
        let mut t = crate::cube::decode::DecodeTiling {
            d: p.d,
            group_heads: p.group_heads,
            kc,
            nsel: p.nsel.max(1),
            fcap: 1,
            gated: p.gated,
            threads: THREADS,
            write: false,
        };
        let fixed = t.shared();
        // the rest holds the selection-block scores, in steps of 1024 (each a compiled kernel)
        let room = budget.saturating_sub(fixed) / 4 / 1024 * 1024;
        if room >= 1024 {
            t.fcap = room.min(8192);
            return Some(t);
        }
        if kc <= 8 {
            return None;
        }
        kc /= 2;
    }
}

/// Whether the decode kernel covers `p` (made by `DecodeShape::of`) on this device.
pub fn decode_supported<R: CubeRuntime>(client: &ComputeClient<R>, p: &DecodeProblem) -> bool {
    // the shapes fit together (`DecodeShape::of`); what is left is the shared memory
    decode_tiling(p, shared_budget(client)).is_some_and(|t| p.complete() <= t.fcap)
}

/// Runs the decode kernel: inputs `[qkv, cos, sin, ck, cv, k, v, gate logits]` (see
/// [`super::decode`]), output `[b, 1, h * d]` in `qkv`'s dtype.
pub fn decode<R: CubeRuntime>(inputs: [CubeTensor<R>; 8], p: &DecodeProblem) -> CubeTensor<R> {
    launch_decode(inputs.map(into_contiguous), None, p)
}

/// [`decode`] that first writes the new position into the caches, as [`decode_write`] (one
/// launch instead of two): inputs `[qkv, cos, sin, ck, cv]`, `buffers` `[kc, vc, tk, tv]` → the
/// output and the written buffers.
pub fn decode_writing<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 6],
    buffers: [CubeTensor<R>; 4],
    p: &DecodeProblem,
    w: &WriteProblem,
) -> (CubeTensor<R>, [CubeTensor<R>; 4]) {
    let [qkv, cos, sin, ck, cv, gates] = inputs.map(into_contiguous);
    let [kc, vc, tk, tv] = buffers.map(writable);
    let out = launch_decode(
        [qkv, cos, sin, ck, cv, kc.clone(), vc.clone(), gates],
        Some(([tk.clone(), tv.clone()], w)),
        p,
    );
    (out, [kc, vc, tk, tv])
}

fn launch_decode<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 8],
    write: Option<([CubeTensor<R>; 2], &WriteProblem)>,
    p: &DecodeProblem,
) -> CubeTensor<R> {
    let [qkv, cos, sin, ck, cv, k, v, gates] = inputs;
    let dtype = qkv.dtype;
    let mut t =
        decode_tiling(p, shared_budget(&qkv.client)).expect("checked by `decode_supported`");
    t.write = write.is_some();
    let out = empty(&qkv, vec![p.b, 1, p.h * p.d], dtype);
    let (ring, slot) = write.as_ref().map_or((0, 0), |(_, w)| (w.ring, w.slot));
    let [tk, tv] = match write {
        Some((ring, w)) => {
            debug_assert!(w.pos == p.pos && w.cap == p.cap, "one position, one cache");
            ring
        }
        None => [dummy(&qkv, dtype), dummy(&qkv, dtype)],
    };
    let client = qkv.client.clone();
    // SAFETY: rows read are below `nc <= compressed_capacity` (compressed) and `pos < cap` (cache); the
    // selected blocks are complete blocks before the own one; `complete <= fcap`.
    unsafe {
        crate::cube::decode::nsa_decode::launch_unchecked::<R>(
            &client,
            CubeCount::Static((p.b * p.h / p.group_heads) as u32, 1, 1),
            CubeDim::new_1d(t.threads as u32),
            qkv.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            ck.into_tensor_arg(),
            cv.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            gates.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            tk.into_tensor_arg(),
            tv.into_tensor_arg(),
            ring,
            slot,
            p.width,
            p.h,
            p.kvh,
            p.pos,
            p.nc,
            p.compressed_capacity,
            p.cap,
            p.mem,
            p.per_block,
            p.sel,
            p.window,
            p.topn,
            p.scale as f32,
            (1.0 / (p.group_heads * p.per_block) as f64) as f32,
            t,
            dtype.into(),
        );
    }
    out
}

/// A [`crate::cube::rows::decode_write`] launch.
#[derive(Clone, Debug)]
pub struct WriteProblem {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    pub pos: usize,
    pub cap: usize,
    pub ring: usize,
    pub slot: usize,
}

/// A buffer the write may change: itself when nothing else holds it, else a copy.
fn writable<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.can_mut() && t.is_contiguous() {
        t
    } else {
        into_contiguous(t.copy())
    }
}

/// The decode step's cache writes from the projection row: inputs `[qkv, cos, sin]`, buffers
/// `[k cache, v cache, k ring, v ring]` (changed in place where nothing else holds them) → the
/// four buffers.
pub fn decode_write<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 3],
    buffers: [CubeTensor<R>; 4],
    p: &WriteProblem,
) -> [CubeTensor<R>; 4] {
    let [qkv, cos, sin] = inputs.map(into_contiguous);
    let [kc, vc, tk, tv] = buffers.map(writable);
    let dtype = qkv.dtype;
    let total = p.b * p.kvh * p.d;
    let client = qkv.client.clone();
    // SAFETY: one unit per `(batch, kv head, feature)`, guarded by `total`; `pos < cap`,
    // `slot < ring`.
    unsafe {
        crate::cube::rows::decode_write::launch_unchecked::<R>(
            &client,
            CubeCount::Static(total.div_ceil(64) as u32, 1, 1),
            CubeDim::new_1d(64),
            qkv.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            kc.clone().into_tensor_arg(),
            vc.clone().into_tensor_arg(),
            tk.clone().into_tensor_arg(),
            tv.clone().into_tensor_arg(),
            total,
            (p.h + 2 * p.kvh) * p.d,
            p.h,
            p.kvh,
            p.pos,
            p.cap,
            p.ring,
            p.slot,
            p.d,
            dtype.into(),
        );
    }
    [kc, vc, tk, tv]
}
