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

use super::attention::{NEG, NEG_HALF};
use super::reduce::{cube_argmax, cube_max, cube_sum};

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

/// Feature `i` of key slot `j` of the tiles: element `off` of `k` and `v` when `gate >= 0`,
/// zeros for a slot that is not attended; the slot's gate into `kg` (by its feature 0).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_key<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    ks: &mut SharedMemory<f32>,
    vs: &mut SharedMemory<f32>,
    kg: &mut SharedMemory<f32>,
    j: usize,
    i: usize,
    off: usize,
    gate: f32,
    #[comptime] t: DecodeTiling,
) {
    let ds = comptime!(t.d + 1);
    let mut kv = 0.0f32;
    let mut vv = 0.0f32;
    if gate >= 0.0 {
        kv = f32::cast_from(k[off]);
        vv = f32::cast_from(v[off]);
    }
    ks[j * ds + i] = kv;
    vs[j * ds + i] = vv;
    if i == 0 {
        kg[j] = gate;
    }
}

/// Loads rows `first..first + valid` of head `base` (a row offset) of `k` and `v` into the
/// tiles (row stride `d + 1`), zeros for the rest of the chunk; key gates `kg` 1 for the loaded
/// rows, -1 (not attended) for the rest.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    ks: &mut SharedMemory<f32>,
    vs: &mut SharedMemory<f32>,
    kg: &mut SharedMemory<f32>,
    base: usize,
    first: usize,
    valid: usize,
    #[comptime] t: DecodeTiling,
) {
    let d = t.d;
    let mut e = UNIT_POS as usize;
    while e < comptime!(t.kc * t.d) {
        let j = e / d;
        let i = e % d;
        let mut gate = UNUSED.runtime();
        if j < valid {
            gate = 1.0;
        }
        store_key(k, v, ks, vs, kg, j, i, (base + first + j) * d + i, gate, t);
        e += t.threads;
    }
    sync_cube();
}

/// Loads keys `g0..g0 + kc` of the selected branch, the selected blocks one after the other
/// (`sel` keys each, slot `s < topn` block `chosen[s]` gated by `cgate[s]` when `gated`) and
/// then the own block `own` up to `pos`: rows of head `base` into the tiles, their gates into
/// `kg` (-1: not attended, zeros loaded).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_selected<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    ks: &mut SharedMemory<f32>,
    vs: &mut SharedMemory<f32>,
    kg: &mut SharedMemory<f32>,
    chosen: &SharedMemory<u32>,
    cgate: &SharedMemory<f32>,
    base: usize,
    g0: usize,
    sel: usize,
    topn: usize,
    own: usize,
    pos: usize,
    #[comptime] t: DecodeTiling,
) {
    let d = t.d;
    let mut e = UNIT_POS as usize;
    while e < comptime!(t.kc * t.d) {
        let j = e / d;
        let i = e % d;
        let g = g0 + j;
        let slot = g / sel;
        let mut row = own * sel + g % sel;
        let mut gate = 1.0f32;
        let mut ok = slot <= topn;
        if slot < topn {
            let c = chosen[slot];
            ok = c != INVALID;
            row = usize::cast_from(c) * sel + g % sel;
            if t.gated {
                gate = cgate[slot];
            }
        } else if row > pos {
            ok = false;
        }
        if !ok {
            gate = UNUSED.runtime();
        }
        store_key(k, v, ks, vs, kg, j, i, (base + row) * d + i, gate, t);
        e += t.threads;
    }
    sync_cube();
}

/// Scores of the cube's rows against the tile: `ps[r * kc + j] = (q_r · k_j) · kg[j]` for the
/// keys with a gate `kg[j] >= 0`, [`NEG`] for the rest. `q` holds scaled queries `[group_heads, d]`;
/// [`DecodeTiling::split`] units share each dot product (partial sums through `pp`).
#[cube]
fn chunk_scores(
    q: &SharedMemory<f32>,
    ks: &SharedMemory<f32>,
    kg: &SharedMemory<f32>,
    ps: &mut SharedMemory<f32>,
    pp: &mut SharedMemory<f32>,
    #[comptime] t: DecodeTiling,
) {
    let d = t.d;
    let kc = t.kc;
    let ds = comptime!(t.d + 1);
    let sp = comptime!(t.split());
    let seg = comptime!(t.d / t.split());
    let pairs = comptime!(t.group_heads * t.kc);
    let mut g = UNIT_POS as usize;
    while g < comptime!(t.group_heads * t.kc * t.split()) {
        // pairs fastest: the units of a plane read different key rows (stride `d + 1`)
        let pr = g % pairs;
        let part = g / pairs;
        let r = pr / kc;
        let j = pr % kc;
        let mut dot = 0.0f32;
        if kg[j] >= 0.0 {
            let i0 = part * seg;
            #[unroll]
            for i in 0..seg {
                dot += q[r * d + i0 + i] * ks[j * ds + i0 + i];
            }
        }
        pp[g] = dot;
        g += t.threads;
    }
    sync_cube();
    let mut g = UNIT_POS as usize;
    while g < pairs {
        let j = g % kc;
        let mut s = NEG.runtime();
        let gate = kg[j];
        if gate >= 0.0 {
            let mut dot = 0.0f32;
            #[unroll]
            for u in 0..sp {
                dot += pp[u * pairs + g];
            }
            s = dot * gate;
        }
        ps[g] = s;
        g += t.threads;
    }
    sync_cube();
}

/// Online-softmax update of the rows' maxima `m_s`, sums `l_s` and the accumulators `acc`
/// (unit-owned elements `UNIT_POS + it * threads` of `[group_heads, d]`) with the chunk's scores `ps`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_update(
    vs: &SharedMemory<f32>,
    ps: &mut SharedMemory<f32>,
    m_s: &mut SharedMemory<f32>,
    l_s: &mut SharedMemory<f32>,
    a_s: &mut SharedMemory<f32>,
    acc: &mut Array<f32>,
    #[comptime] t: DecodeTiling,
) {
    let d = t.d;
    let kc = t.kc;
    let ds = comptime!(t.d + 1);
    let accn = comptime!((t.group_heads * t.d).div_ceil(t.threads));
    let tid = UNIT_POS as usize;
    // the rows' new maxima and rescale factors, the probabilities (every unit), the sums
    let mut r = tid;
    while r < t.group_heads {
        let m_old = m_s[r];
        let mut mx = m_old;
        for j in 0..kc {
            let s = ps[r * kc + j];
            if s > mx {
                mx = s;
            }
        }
        a_s[r] = (m_old - mx).exp();
        m_s[r] = mx;
        r += t.threads;
    }
    sync_cube();
    let mut g = tid;
    while g < comptime!(t.group_heads * t.kc) {
        let s = ps[g];
        let mut p = 0.0f32;
        if s > NEG_HALF {
            p = (s - m_s[g / kc]).exp();
        }
        ps[g] = p;
        g += t.threads;
    }
    sync_cube();
    let mut r = tid;
    while r < t.group_heads {
        let mut sum = 0.0f32;
        for j in 0..kc {
            sum += ps[r * kc + j];
        }
        l_s[r] = l_s[r] * a_s[r] + sum;
        r += t.threads;
    }
    #[unroll]
    for it in 0..accn {
        let e = tid + it * t.threads;
        if e < comptime!(t.group_heads * t.d) {
            let r = e / d;
            let i = e % d;
            let mut x = acc[it] * a_s[r];
            for j in 0..kc {
                x += ps[r * kc + j] * vs[j * ds + i];
            }
            acc[it] = x;
        }
    }
    sync_cube();
}

/// Adds branch `branch`'s normalised output, weighted by its gate, to `os` and resets the
/// accumulators and row statistics for the next branch.
#[cube]
fn finish_branch(
    os: &mut SharedMemory<f32>,
    gs: &SharedMemory<f32>,
    m_s: &mut SharedMemory<f32>,
    l_s: &mut SharedMemory<f32>,
    acc: &mut Array<f32>,
    branch: usize,
    #[comptime] t: DecodeTiling,
) {
    let d = t.d;
    let accn = comptime!((t.group_heads * t.d).div_ceil(t.threads));
    let tid = UNIT_POS as usize;
    #[unroll]
    for it in 0..accn {
        let e = tid + it * t.threads;
        if e < comptime!(t.group_heads * t.d) {
            let r = e / d;
            os[e] += gs[r * 3 + branch] * (acc[it] / l_s[r]);
            acc[it] = 0.0;
        }
    }
    sync_cube();
    let mut r = tid;
    while r < t.group_heads {
        m_s[r] = NEG;
        l_s[r] = 0.0;
        r += t.threads;
    }
    sync_cube();
}

/// Step 1 of the decode step over compressed rows `first..last` of the cube's kv head (row
/// offset `chead`): the rows' statistics `m_s`, `l_s` and accumulators `acc` (online softmax of
/// the scaled, un-rotated queries `qs`), and the importance logits of the complete selection
/// blocks (`blk < complete`) among the rows, added into `fsc[blk - blk0]`: logits averaged over
/// the cube's heads and the `per_block` slots of a block (`imp_scale`). The rows must start and
/// end at block boundaries (or at the memory slots and `nc`), so that each block is summed by
/// one call.
#[cube]
#[allow(clippy::too_many_arguments)]
fn compressed_rows<F: Float>(
    ck: &Tensor<F>,
    cv: &Tensor<F>,
    qs: &SharedMemory<f32>,
    ks: &mut SharedMemory<f32>,
    vs: &mut SharedMemory<f32>,
    kg: &mut SharedMemory<f32>,
    ps: &mut SharedMemory<f32>,
    pp: &mut SharedMemory<f32>,
    m_s: &mut SharedMemory<f32>,
    l_s: &mut SharedMemory<f32>,
    a_s: &mut SharedMemory<f32>,
    acc: &mut Array<f32>,
    fsc: &mut SharedMemory<f32>,
    chead: usize,
    first: usize,
    last: usize,
    mem: usize,
    per_block: usize,
    blk0: usize,
    complete: usize,
    imp_scale: f32,
    #[comptime] t: DecodeTiling,
) {
    let kchunk = t.kc;
    let nt = t.threads;
    let tid = UNIT_POS as usize;
    let chunks = (last - first + kchunk - 1) / kchunk;
    for ci in 0..chunks {
        let k0 = first + ci * kchunk;
        let mut valid = last - k0;
        if valid > kchunk {
            valid = kchunk;
        }
        load_tile::<F>(ck, cv, ks, vs, kg, chead, k0, valid, t);
        chunk_scores(qs, ks, kg, ps, pp, t);
        let end = k0 + valid;
        if end > mem {
            let mut lo = 0usize;
            if k0 > mem {
                lo = (k0 - mem) / per_block;
            }
            let mut hi = (end - mem - 1) / per_block + 1;
            if hi > complete {
                hi = complete;
            }
            let mut blk = lo + tid;
            while blk < hi {
                let mut s = 0.0f32;
                for u in 0..per_block {
                    let slot = mem + blk * per_block + u;
                    if slot >= k0 && slot < end {
                        for rr in 0..t.group_heads {
                            s += ps[rr * kchunk + slot - k0];
                        }
                    }
                }
                fsc[blk - blk0] += s * imp_scale;
                blk += nt;
            }
        }
        sync_cube();
        chunk_update(vs, ps, m_s, l_s, a_s, acc, t);
    }
}

/// The queries of the cube's rows, scaled: un-rotated into `qs` (the compressed branch) and,
/// when `rotated`, rotated into `qr` (the other two).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_queries<F: Float>(
    qkv: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    qs: &mut SharedMemory<f32>,
    qr: &mut SharedMemory<f32>,
    b: usize,
    width: usize,
    head0: usize,
    scale: f32,
    #[comptime] rotated: bool,
    #[comptime] t: DecodeTiling,
) {
    let d = t.d;
    let mut e = UNIT_POS as usize;
    while e < comptime!(t.group_heads * t.d) {
        let r = e / d;
        let i = e % d;
        let base = b * width + (head0 + r) * d;
        let x = f32::cast_from(qkv[base + i]);
        qs[e] = x * scale;
        if rotated {
            // the partner of feature `i` in its rotation pair
            let partner = i + 1 - (i % 2) * 2;
            let xp = f32::cast_from(qkv[base + partner]);
            qr[e] = (x * f32::cast_from(cos[i]) + xp * f32::cast_from(sin[i])) * scale;
        }
        e += t.threads;
    }
}

/// Step 1 of [`nsa_decode`] for long contexts, one part of the compressed rows per cube: grid
/// `(b · h / group_heads, parts)`; part `y` takes the complete blocks `y · fcap ..` (`fcap` of
/// them), part 0 also the memory slots and the last part also the rows after the last complete
/// block. Writes the part's row statistics, unnormalised accumulators and importance logits
/// (layouts in the module documentation).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nsa_decode_compressed<F: Float>(
    qkv: &Tensor<F>,
    ck: &Tensor<F>,
    cv: &Tensor<F>,
    stats: &mut Tensor<f32>,
    pacc: &mut Tensor<f32>,
    imp: &mut Tensor<f32>,
    width: usize,
    h: usize,
    kvh: usize,
    nc: usize,
    compressed_capacity: usize,
    mem: usize,
    per_block: usize,
    scale: f32,
    imp_scale: f32,
    #[comptime] t: DecodeTiling,
    #[define(F)] _dtype: StorageType,
) {
    let d = t.d;
    let group_heads = t.group_heads;
    let nt = t.threads;
    let rows_d = comptime!(t.group_heads * t.d);
    let accn = comptime!((t.group_heads * t.d).div_ceil(t.threads));
    let tid = UNIT_POS as usize;
    let hs = h / group_heads;
    let cube = CUBE_POS_X as usize;
    let b = cube / hs;
    let head0 = (cube % hs) * group_heads;
    let kvhead = head0 / (h / kvh);
    let parts = CUBE_COUNT_Y as usize;
    let part = CUBE_POS_Y as usize;

    let mut qs = SharedMemory::<f32>::new(rows_d);
    let mut qr = SharedMemory::<f32>::new(1usize);
    let mut ks = SharedMemory::<f32>::new(comptime!(t.kc * (t.d + 1)));
    let mut vs = SharedMemory::<f32>::new(comptime!(t.kc * (t.d + 1)));
    let mut kg = SharedMemory::<f32>::new(t.kc);
    let mut ps = SharedMemory::<f32>::new(comptime!(t.group_heads * t.kc));
    let mut pp = SharedMemory::<f32>::new(comptime!(t.group_heads * t.kc * t.split()));
    let mut m_s = SharedMemory::<f32>::new(group_heads);
    let mut l_s = SharedMemory::<f32>::new(group_heads);
    let mut a_s = SharedMemory::<f32>::new(group_heads);
    let mut fsc = SharedMemory::<f32>::new(t.fcap);

    load_queries::<F>(
        qkv, qkv, qkv, &mut qs, &mut qr, b, width, head0, scale, false, t,
    );
    let mut j = tid;
    while j < t.fcap {
        fsc[j] = 0.0;
        j += nt;
    }
    let mut r = tid;
    while r < group_heads {
        m_s[r] = NEG;
        l_s[r] = 0.0;
        r += nt;
    }
    let mut acc = Array::<f32>::new(accn);
    #[unroll]
    for it in 0..accn {
        acc[it] = 0.0;
    }
    let complete = (nc - mem) / per_block;
    let blk0 = part * t.fcap;
    let mut blk1 = blk0 + t.fcap;
    if blk1 > complete {
        blk1 = complete;
    }
    let mut first = 0usize;
    if part > 0 {
        first = mem + blk0 * per_block;
    }
    let mut last = nc;
    if part + 1 < parts {
        last = mem + blk1 * per_block;
    }
    sync_cube();

    let chead = (b * kvh + kvhead) * compressed_capacity;
    compressed_rows::<F>(
        ck, cv, &qs, &mut ks, &mut vs, &mut kg, &mut ps, &mut pp, &mut m_s, &mut l_s, &mut a_s,
        &mut acc, &mut fsc, chead, first, last, mem, per_block, blk0, complete, imp_scale, t,
    );

    let mut r = tid;
    while r < group_heads {
        let at = ((b * h + head0 + r) * parts + part) * 2;
        stats[at] = m_s[r];
        stats[at + 1] = l_s[r];
        r += nt;
    }
    #[unroll]
    for it in 0..accn {
        let e = tid + it * nt;
        if e < rows_d {
            let r = e / d;
            pacc[((b * h + head0 + r) * parts + part) * d + e % d] = acc[it];
        }
    }
    let mut j = blk0 + tid;
    while j < blk1 {
        imp[cube * complete + j] = fsc[j - blk0];
        j += nt;
    }
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
    let mut r = tid;
    while r < group_heads {
        m_s[r] = NEG;
        l_s[r] = 0.0;
        r += nt;
    }
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
        let mut s = 0.0f32;
        if t.parts {
            s = imp[ib + j];
        } else {
            s = fsc[j];
        }
        if s > mx {
            mx = s;
        }
        j += nt;
    }
    let m = cube_max(&mut rv, mx, SINK.runtime(), nt, LANE);
    let mut sum = 0.0f32;
    let mut j = tid;
    while j < complete {
        let mut s = 0.0f32;
        if t.parts {
            s = imp[ib + j];
        } else {
            s = fsc[j];
        }
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
            let mut s = 0.0f32;
            if t.parts {
                s = imp[ib + j];
            } else {
                s = fsc[j];
            }
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
