//! The tile steps every branch of the decode kernels repeats: queries and key chunks into
//! shared memory, a chunk's scores, the online-softmax update, a branch's end.

#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::{DecodeTiling, INVALID, UNUSED};
use crate::cube::attention::{NEG, NEG_HALF};

/// Feature `i` of key slot `j` of the tiles: element `off` of `k` and `v` when `gate >= 0`,
/// zeros for a slot that is not attended; the slot's gate into `kg` (by its feature 0).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_key<F: Float>(
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
pub(super) fn load_tile<F: Float>(
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
pub(super) fn load_selected<F: Float>(
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
pub(super) fn chunk_scores(
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
pub(super) fn chunk_update(
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
pub(super) fn finish_branch(
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
    reset_rows(m_s, l_s, t);
    sync_cube();
}

/// The queries of the cube's rows, scaled: un-rotated into `qs` (the compressed branch) and,
/// when `rotated`, rotated into `qr` (the other two).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn load_queries<F: Float>(
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

/// Every row's statistics back to "no key yet": maximum [`NEG`], sum 0.
#[cube]
pub(super) fn reset_rows(
    m_s: &mut SharedMemory<f32>,
    l_s: &mut SharedMemory<f32>,
    #[comptime] t: DecodeTiling,
) {
    let mut r = UNIT_POS as usize;
    while r < t.group_heads {
        m_s[r] = NEG;
        l_s[r] = 0.0;
        r += t.threads;
    }
}
