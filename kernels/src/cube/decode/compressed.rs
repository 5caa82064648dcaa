//! The compressed branch of a decode step: over any range of compressed rows (the whole
//! branch in [`super::nsa_decode`], or one part of it), and the kernel of the parts.

#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::tiles::{chunk_scores, chunk_update, load_queries, load_tile, reset_rows};
use super::DecodeTiling;

/// Step 1 of the decode step over compressed rows `first..last` of the cube's kv head (row
/// offset `chead`): the rows' statistics `m_s`, `l_s` and accumulators `acc` (online softmax of
/// the scaled, un-rotated queries `qs`), and the importance logits of the complete selection
/// blocks (`blk < complete`) among the rows, added into `fsc[blk - blk0]`: logits averaged over
/// the cube's heads and the `per_block` slots of a block (`imp_scale`). The rows must start and
/// end at block boundaries (or at the memory slots and `nc`), so that each block is summed by
/// one call.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn compressed_rows<F: Float>(
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
    reset_rows(&mut m_s, &mut l_s, t);
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
