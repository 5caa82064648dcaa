//! Launches of the decode step's attention and cache writes.

use super::*;

/// One decode step of a layer's attention ([`crate::cube::decode::nsa_decode`]).
pub use crate::api::DecodeShape as DecodeProblem;

/// Compressed rows one cube of a decode step's compressed branch takes by default (rounded down
/// to whole selection blocks): a context with more complete blocks than that runs the branch in
/// parts ([`crate::cube::decode::nsa_decode_compressed`]).
pub const DECODE_SPAN: usize = 256;

/// How a decode step runs: the kernel's tiling, and the parts of its compressed branch (1: in
/// the one kernel).
#[derive(Clone, Copy, Debug)]
struct DecodePlan {
    t: crate::cube::decode::DecodeTiling,
    parts: usize,
}

/// The plan for `p` within the shared-memory budget, if any: parts of `span` compressed rows
/// (`0`: [`DECODE_SPAN`]).
fn decode_plan(p: &DecodeProblem, span: usize, budget: usize) -> Option<DecodePlan> {
    let span = if span == 0 { DECODE_SPAN } else { span };
    // blocks per part (and the importance logits a cube holds)
    let per_part = (span / p.per_block.max(1)).max(1);
    let parts = p.complete().div_ceil(per_part).max(1);
    let mut kc = 32;
    loop {
        let t = crate::cube::decode::DecodeTiling {
            d: p.d,
            group_heads: p.group_heads,
            kc,
            nsel: p.nsel.max(1),
            fcap: per_part,
            gated: p.gated,
            threads: THREADS,
            write: false,
            parts: parts > 1,
        };
        if t.shared() <= budget {
            return Some(DecodePlan { t, parts });
        }
        if kc <= 8 {
            return None;
        }
        kc /= 2;
    }
}

/// Whether the decode kernel covers `p` (made by `DecodeShape::of`) on this device, with parts
/// of `span` compressed rows.
pub fn decode_supported<R: CubeRuntime>(
    client: &ComputeClient<R>,
    p: &DecodeProblem,
    span: usize,
) -> bool {
    // the shapes fit together (`DecodeShape::of`); what is left is the shared memory
    decode_plan(p, span, shared_budget(client)).is_some()
}

/// Runs the decode kernel: inputs `[qkv, cos, sin, ck, cv, k, v, gate logits]` (see
/// [`super::decode`]), output `[b, 1, h * d]` in `qkv`'s dtype; the compressed branch in parts
/// of `span` rows.
pub fn decode<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 8],
    p: &DecodeProblem,
    span: usize,
) -> CubeTensor<R> {
    launch_decode(inputs.map(into_contiguous), None, p, span)
}

/// [`decode`] that first writes the new position into the caches, as [`decode_write`] (one
/// launch instead of two): inputs `[qkv, cos, sin, ck, cv]`, `buffers` `[kc, vc, tk, tv]` → the
/// output and the written buffers.
pub fn decode_writing<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 6],
    buffers: [CubeTensor<R>; 4],
    p: &DecodeProblem,
    w: &WriteProblem,
    span: usize,
) -> (CubeTensor<R>, [CubeTensor<R>; 4]) {
    let [qkv, cos, sin, ck, cv, gates] = inputs.map(into_contiguous);
    let [kc, vc, tk, tv] = buffers.map(writable);
    let out = launch_decode(
        [qkv, cos, sin, ck, cv, kc.clone(), vc.clone(), gates],
        Some(([tk.clone(), tv.clone()], w)),
        p,
        span,
    );
    (out, [kc, vc, tk, tv])
}

fn launch_decode<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 8],
    write: Option<([CubeTensor<R>; 2], &WriteProblem)>,
    p: &DecodeProblem,
    span: usize,
) -> CubeTensor<R> {
    let [qkv, cos, sin, ck, cv, k, v, gates] = inputs;
    let dtype = qkv.dtype;
    let plan =
        decode_plan(p, span, shared_budget(&qkv.client)).expect("checked by `decode_supported`");
    let client = qkv.client.clone();
    let selection_heads = p.b * p.h / p.group_heads;
    let imp_scale = (1.0 / (p.group_heads * p.per_block) as f64) as f32;
    let [stats, pacc, imp] = if plan.parts > 1 {
        let rows = p.b * p.h * plan.parts;
        let stats = empty(&qkv, vec![rows * 2], DType::F32);
        let pacc = empty(&qkv, vec![rows * p.d], DType::F32);
        let imp = empty(&qkv, vec![selection_heads * p.complete()], DType::F32);
        // SAFETY: part `y` reads compressed rows below `nc <= compressed_capacity` and writes
        // its own rows of `stats`, `pacc` and its blocks (`< complete`) of `imp`.
        unsafe {
            crate::cube::decode::nsa_decode_compressed::launch_unchecked::<R>(
                &client,
                CubeCount::Static(selection_heads as u32, plan.parts as u32, 1),
                CubeDim::new_1d(plan.t.threads as u32),
                qkv.clone().into_tensor_arg(),
                ck.clone().into_tensor_arg(),
                cv.clone().into_tensor_arg(),
                stats.clone().into_tensor_arg(),
                pacc.clone().into_tensor_arg(),
                imp.clone().into_tensor_arg(),
                p.width,
                p.h,
                p.kvh,
                p.nc,
                p.compressed_capacity,
                p.mem,
                p.per_block,
                p.scale as f32,
                imp_scale,
                plan.t,
                dtype.into(),
            );
        }
        [stats, pacc, imp]
    } else {
        [(); 3].map(|()| dummy(&qkv, DType::F32))
    };
    let mut t = plan.t;
    t.write = write.is_some();
    if plan.parts > 1 {
        // the importance logits are read from `imp`
        t.fcap = 1;
    }
    let out = empty(&qkv, vec![p.b, 1, p.h * p.d], dtype);
    let (ring, slot) = write.as_ref().map_or((0, 0), |(_, w)| (w.ring, w.slot));
    let [tk, tv] = match write {
        Some((ring, w)) => {
            debug_assert!(w.pos == p.pos && w.cap == p.cap, "one position, one cache");
            ring
        }
        None => [dummy(&qkv, dtype), dummy(&qkv, dtype)],
    };
    // SAFETY: rows read are below `nc <= compressed_capacity` (compressed) and `pos < cap` (cache); the
    // selected blocks are complete blocks before the own one; `complete <= fcap` in one kernel,
    // the parts' buffers as written above otherwise.
    unsafe {
        crate::cube::decode::nsa_decode::launch_unchecked::<R>(
            &client,
            CubeCount::Static(selection_heads as u32, 1, 1),
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
            stats.into_tensor_arg(),
            pacc.into_tensor_arg(),
            imp.into_tensor_arg(),
            plan.parts,
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
            imp_scale,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A decode step of the seed config (8 heads of 64, stride 16, blocks of 16, 4 selected)
    /// at position `pos`.
    fn seed_step(pos: usize) -> DecodeProblem {
        let nc = 1 + (pos + 1).saturating_sub(16) / 16;
        DecodeProblem {
            b: 1,
            h: 8,
            kvh: 8,
            d: 64,
            group_heads: 1,
            width: 24 * 64,
            pos,
            nc,
            compressed_capacity: nc,
            cap: pos + 1,
            mem: 1,
            per_block: 1,
            sel: 16,
            window: 16,
            topn: 4,
            nsel: 4,
            gated: false,
            scale: 0.125,
        }
    }

    #[test]
    fn long_contexts_split_the_compressed_branch_and_fit_any_length() {
        let budget = 48 * 1024;
        // up to a span of complete blocks, one kernel
        let short = decode_plan(&seed_step(4000), 0, budget).unwrap();
        assert_eq!((short.parts, short.t.parts), (1, false));
        // 100K tokens (6,250 blocks): 25 parts of 256 blocks on 25 cubes per selection head
        let long = decode_plan(&seed_step(100_000), 0, budget).unwrap();
        assert_eq!((long.parts, long.t.parts, long.t.fcap), (25, true, 256));
        // 1M tokens: one cube of one kernel held the importance of at most 7,168 blocks of
        // this shape in shared memory (115K tokens); in parts, any length fits
        let huge = decode_plan(&seed_step(1 << 20), 0, budget).unwrap();
        assert_eq!(huge.parts, 256);
        // a span of one row makes a part of each block
        let tiny = decode_plan(&seed_step(100), 1, budget).unwrap();
        assert_eq!(tiny.parts, seed_step(100).complete());
    }
}
