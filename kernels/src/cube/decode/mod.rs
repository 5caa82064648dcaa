//! One decode step of an NSA layer's attention in one kernel: for the newest query of every
//! sequence, the compressed branch with the block importance it yields, the top-n block
//! selection, the selected branch (chosen blocks + the causal part of the own block), the
//! sliding window, and the gated mix of the three.
//!
//! The tensor-op decode step (`SparseAttention::step`) is about 130 Burn operations per layer
//! for these parts, each a few microseconds of GPU work and ≈ 15 µs of host-side dispatch: the
//! step was launch-bound. This kernel is one operation.
//!
//! Grid: one cube per `(batch, selection head)`; a cube holds the `group_heads` query heads that share
//! the selection (all heads of a kv head with `query_heads_share_selected_kv`, else one head).
//! Every branch is the same loop over chunks of `kc` keys: load the K/V tile into shared
//! memory, scores of the `group_heads` rows, online-softmax update of the rows' statistics and of the
//! output accumulators in registers. Barriers sit only in control flow that is uniform over
//! the cube (loop bounds from scalars), as WGSL requires.
//!
//! Long contexts: the compressed branch grows with the context (`pos / stride` keys) while the
//! other two do not, and one cube per selection head leaves most of a GPU idle. There
//! [`nsa_decode_compressed`] runs it first in parts of a few hundred keys, one cube per
//! `(batch, selection head, part)`, and writes each part's row statistics, unnormalised
//! accumulators and block-importance logits; [`nsa_decode`] (with [`DecodeTiling::parts`])
//! merges the parts as one online softmax and ranks the blocks from the logits in global memory.
//! The importance logits do not depend on the softmax, so a part's are final; parts end at
//! selection-block boundaries, so no block is split.
//!
//! Parts: `stats` `[b, h, parts, 2]` (row maximum, row sum), `pacc` `[b, h, parts, d]`, `imp`
//! `[b, h / group_heads, complete]` (f32).
//!
//! Tensors (contiguous): `qkv` `[b, 1, width]` (queries of head `i` at `i * d`, un-rotated),
//! `cos`, `sin` `[d]` (the position's rotation, as `rope::Rotation`), compressed `ck`, `cv`
//! `[b, kvh, compressed_capacity, d]` (memory slots then blocks, `nc` valid), the rotated key/value cache `kc`,
//! `vc` `[b, kvh, cap, d]` (`pos + 1` valid, the new token's included, or written by the kernel
//! with [`DecodeTiling::write`], with the ring `tk`, `tv` `[b, kvh, ring, d]`), gate logits `gl`
//! `[b, 1, 3 h]` (column `3 head + branch`), `out` `[b, h, 1, d]`.

#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::attention::NEG;
use super::reduce::{cube_argmax, cube_max, cube_sum};

mod compressed;
mod tiles;

use compressed::compressed_rows;
pub use compressed::nsa_decode_compressed;
use tiles::{
    chunk_scores, chunk_update, finish_branch, load_queries, load_selected, load_tile, reset_rows,
};

/// Marks a selected slot whose block may not be attended ([`crate::rules::block_is_valid`]).
const INVALID: u32 = 0xFFFF_FFFF;
/// The constant slot of the selection softmax ([`crate::rules::SINK_LOGIT`]).
const SINK: f32 = crate::rules::SINK_LOGIT;
/// [`crate::rules::VALID_PROBABILITY`].
const VALID: f32 = crate::rules::VALID_PROBABILITY;
/// Below every score (start of an arg-max).
const LOWEST: f32 = -3.0e38;
/// Above every score (the rank before the first).
const HIGHEST: f32 = 3.0e38;
/// The gate of a key slot that is not attended.
const UNUSED: f32 = -1.0;

/// Comptime shape of one decode kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeTiling {
    /// Head dimension.
    pub d: usize,
    /// Query heads per cube.
    pub group_heads: usize,
    /// Keys per chunk.
    pub kc: usize,
    /// Most blocks selected (`num_selected_blocks`, at least 1).
    pub nsel: usize,
    /// Selection-block scores the cube holds in shared memory: every complete block in one
    /// kernel, a part's blocks in [`nsa_decode_compressed`] (1 when unused).
    pub fcap: usize,
    /// Keys of selected blocks are gated by their probability (`use_diff_topk`).
    pub gated: bool,
    /// Units per cube.
    pub threads: usize,
    /// Write the new position's key and value into the caches first (the cube's kv head).
    pub write: bool,
    /// The compressed branch was computed in parts by [`nsa_decode_compressed`]: combine its
    /// partial results and rank the blocks from its importance logits in global memory.
    pub parts: bool,
}

impl DecodeTiling {
    /// Shared memory of the kernel in bytes.
    pub fn shared(&self) -> usize {
        4 * (2 * self.kc * (self.d + 1)
            + self.kc
            + 3 * self.group_heads * self.d
            + self.group_heads * self.kc * (1 + self.split())
            + 3 * self.group_heads
            + 3 * self.group_heads
            + self.fcap
            + 2 * self.nsel
            + 2 * self.threads)
    }

    /// Units that share one score's dot product (a divisor of `d`): the cube's idle units
    /// when `group_heads · kc < threads`.
    pub fn split(&self) -> usize {
        let mut sp = (self.threads / (self.group_heads * self.kc).max(1)).clamp(1, 8);
        while sp > 1 && !self.d.is_multiple_of(sp) {
            sp /= 2;
        }
        sp
    }
}

/// Entries one unit folds in the first level of the cube's reductions ([`super::reduce`]).
const LANE: usize = 16;

/// The importance logit of block `j`: from the parts' `imp` (at `at`) with
/// [`DecodeTiling::parts`], else from the cube's shared `fsc`.
#[cube]
fn block_logit(
    fsc: &SharedMemory<f32>,
    imp: &Tensor<f32>,
    at: usize,
    j: usize,
    #[comptime] t: DecodeTiling,
) -> f32 {
    let mut s = 0.0f32;
    if t.parts {
        s = imp[at];
    } else {
        s = fsc[j];
    }
    s
}

/// The decode step's attention; see the module documentation for the layout.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nsa_decode<F: Float>(
    qkv: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    ck: &Tensor<F>,
    cv: &Tensor<F>,
    kc: &mut Tensor<F>,
    vc: &mut Tensor<F>,
    gl: &Tensor<F>,
    out: &mut Tensor<F>,
    tk: &mut Tensor<F>,
    tv: &mut Tensor<F>,
    stats: &Tensor<f32>,
    pacc: &Tensor<f32>,
    imp: &Tensor<f32>,
    parts: usize,
    ring: usize,
    slot: usize,
    width: usize,
    h: usize,
    kvh: usize,
    pos: usize,
    nc: usize,
    compressed_capacity: usize,
    cap: usize,
    mem: usize,
    per_block: usize,
    sel: usize,
    window: usize,
    topn: usize,
    scale: f32,
    imp_scale: f32,
    #[comptime] t: DecodeTiling,
    #[define(F)] _dtype: StorageType,
) {
    let d = t.d;
    let group_heads = t.group_heads;
    let kchunk = t.kc;
    let nt = t.threads;
    let rows_d = comptime!(t.group_heads * t.d);
    let accn = comptime!((t.group_heads * t.d).div_ceil(t.threads));
    let tid = UNIT_POS as usize;
    let hs = h / group_heads;
    let b = CUBE_POS_X as usize / hs;
    let head0 = (CUBE_POS_X as usize % hs) * group_heads;
    let kvhead = head0 / (h / kvh);

    let mut qs = SharedMemory::<f32>::new(rows_d);
    let mut qr = SharedMemory::<f32>::new(rows_d);
    let mut os = SharedMemory::<f32>::new(rows_d);
    let mut ks = SharedMemory::<f32>::new(comptime!(t.kc * (t.d + 1)));
    let mut vs = SharedMemory::<f32>::new(comptime!(t.kc * (t.d + 1)));
    let mut kg = SharedMemory::<f32>::new(t.kc);
    let mut ps = SharedMemory::<f32>::new(comptime!(t.group_heads * t.kc));
    let mut pp = SharedMemory::<f32>::new(comptime!(t.group_heads * t.kc * t.split()));
    let mut m_s = SharedMemory::<f32>::new(group_heads);
    let mut l_s = SharedMemory::<f32>::new(group_heads);
    let mut a_s = SharedMemory::<f32>::new(group_heads);
    let mut gs = SharedMemory::<f32>::new(comptime!(t.group_heads * 3));
    let mut fsc = SharedMemory::<f32>::new(t.fcap);
    let mut chosen = SharedMemory::<u32>::new(t.nsel);
    let mut cgate = SharedMemory::<f32>::new(t.nsel);
    let mut rv = SharedMemory::<f32>::new(nt);
    let mut ri = SharedMemory::<u32>::new(nt);

    // queries: un-rotated for the compressed branch, rotated for the other two, both scaled
    load_queries::<F>(
        qkv, cos, sin, &mut qs, &mut qr, b, width, head0, scale, true, t,
    );
    let mut e = tid;
    while e < rows_d {
        os[e] = 0.0;
        e += nt;
    }
    let mut e = tid;
    while e < comptime!(t.group_heads * 3) {
        let x = f32::cast_from(gl[b * 3 * h + head0 * 3 + e]);
        gs[e] = 1.0f32 / (1.0f32 + (-x).exp());
        e += nt;
    }
    let mut j = tid;
    while j < t.fcap {
        fsc[j] = 0.0;
        j += nt;
    }
    reset_rows(&mut m_s, &mut l_s, t);
    let mut acc = Array::<f32>::new(accn);
    #[unroll]
    for it in 0..accn {
        acc[it] = 0.0;
    }
    if t.write {
        // the new position's key (rotated) and value into the cache, un-rotated into row
        // `slot` of the compression ring, as `rows::decode_write`; every cube of a kv head
        // writes the same values, so each reads its own writes after the barrier
        let mut i = tid;
        while i < d {
            let kcol = b * width + (h + kvhead) * d;
            let k = f32::cast_from(qkv[kcol + i]);
            let partner = f32::cast_from(qkv[kcol + i + 1 - (i % 2) * 2]);
            let v = qkv[b * width + (h + kvh + kvhead) * d + i];
            let rot = k * f32::cast_from(cos[i]) + partner * f32::cast_from(sin[i]);
            let at = ((b * kvh + kvhead) * cap + pos) * d + i;
            kc[at] = F::cast_from(rot);
            vc[at] = v;
            let at = ((b * kvh + kvhead) * ring + slot) * d + i;
            tk[at] = F::cast_from(k);
            tv[at] = v;
            i += nt;
        }
        sync_storage();
    }
    sync_cube();

    // 1. compressed: memory and every complete block (all of them ended before `pos`), and the
    //    selection blocks' importance; in parts (computed before), merged here
    let complete = (nc - mem) / per_block;
    if t.parts {
        let mut e = tid;
        while e < rows_d {
            let r = e / d;
            let row = (b * h + head0 + r) * parts;
            let mut mx = NEG.runtime();
            for u in 0..parts {
                let m = stats[(row + u) * 2];
                if m > mx {
                    mx = m;
                }
            }
            let mut l = 0.0f32;
            let mut x = 0.0f32;
            for u in 0..parts {
                let w = (stats[(row + u) * 2] - mx).exp();
                l += stats[(row + u) * 2 + 1] * w;
                x += pacc[(row + u) * d + e % d] * w;
            }
            os[e] += gs[r * 3] * (x / l);
            e += nt;
        }
        sync_cube();
    } else {
        let chead = (b * kvh + kvhead) * compressed_capacity;
        compressed_rows::<F>(
            ck, cv, &qs, &mut ks, &mut vs, &mut kg, &mut ps, &mut pp, &mut m_s, &mut l_s, &mut a_s,
            &mut acc, &mut fsc, chead, 0usize, nc, mem, per_block, 0usize, complete, imp_scale, t,
        );
        finish_branch(&mut os, &gs, &mut m_s, &mut l_s, &mut acc, 0usize, t);
    }

    // top-n blocks by importance (ties: the lower index); probability from a softmax that
    // includes the constant sink slot, blocks at or below the validity threshold are not
    // attended. Slot `n` takes the best block ranked after slot `n - 1`'s in the order (logit
    // descending, index ascending), so nothing is marked as taken.
    let ib = CUBE_POS_X as usize * complete;
    let mut mx = NEG.runtime();
    let mut j = tid;
    while j < complete {
        let s = block_logit(&fsc, imp, ib + j, j, t);
        if s > mx {
            mx = s;
        }
        j += nt;
    }
    let m = cube_max(&mut rv, mx, SINK.runtime(), nt, LANE);
    let mut sum = 0.0f32;
    let mut j = tid;
    while j < complete {
        let s = block_logit(&fsc, imp, ib + j, j, t);
        sum += (s - m).exp();
        j += nt;
    }
    let z = (SINK - m).exp() + cube_sum(&mut rv, sum, nt, LANE);
    let mut prev = HIGHEST.runtime();
    let mut prev_at = 0u32;
    for slot in 0..topn {
        let mut bv = LOWEST.runtime();
        let mut bi = 0u32;
        let mut j = tid;
        while j < complete {
            let s = block_logit(&fsc, imp, ib + j, j, t);
            let after = s < prev || (s == prev && j as u32 > prev_at);
            if after && s > bv {
                bv = s;
                bi = j as u32;
            }
            j += nt;
        }
        let (best, at) = cube_argmax(&mut rv, &mut ri, bv, bi, LOWEST.runtime(), nt, LANE);
        if tid == 0 {
            let prob = (best - m).exp() / z;
            let mut blk = at;
            if prob <= VALID {
                blk = INVALID;
            }
            chosen[slot] = blk;
            // the straight-through gate's forward value, as the tensor ops form it
            cgate[slot] = prob + (1.0f32 - prob);
        }
        prev = best;
        prev_at = at;
        sync_cube();
    }

    // 2. selected blocks one after the other, then the causal part of the own block (rotated
    //    queries and keys), `kc` keys a chunk
    let khead = (b * kvh + kvhead) * cap;
    let own = pos / sel;
    let chunks = ((topn + 1) * sel + kchunk - 1) / kchunk;
    for ci in 0..chunks {
        load_selected::<F>(
            kc,
            vc,
            &mut ks,
            &mut vs,
            &mut kg,
            &chosen,
            &cgate,
            khead,
            ci * kchunk,
            sel,
            topn,
            own,
            pos,
            t,
        );
        chunk_scores(&qr, &ks, &kg, &mut ps, &mut pp, t);
        chunk_update(&vs, &mut ps, &mut m_s, &mut l_s, &mut a_s, &mut acc, t);
    }
    finish_branch(&mut os, &gs, &mut m_s, &mut l_s, &mut acc, 1usize, t);

    // 3. sliding window: keys `pos - window ..= pos`
    let mut lo = 0usize;
    if pos > window {
        lo = pos - window;
    }
    let chunks = (pos + 1 - lo + kchunk - 1) / kchunk;
    for ci in 0..chunks {
        let first = lo + ci * kchunk;
        let mut valid = pos + 1 - first;
        if valid > kchunk {
            valid = kchunk;
        }
        load_tile::<F>(kc, vc, &mut ks, &mut vs, &mut kg, khead, first, valid, t);
        chunk_scores(&qr, &ks, &kg, &mut ps, &mut pp, t);
        chunk_update(&vs, &mut ps, &mut m_s, &mut l_s, &mut a_s, &mut acc, t);
    }
    finish_branch(&mut os, &gs, &mut m_s, &mut l_s, &mut acc, 2usize, t);

    let mut e = tid;
    while e < rows_d {
        let r = e / d;
        out[(b * h + head0 + r) * d + e % d] = F::cast_from(os[e]);
        e += nt;
    }
}
