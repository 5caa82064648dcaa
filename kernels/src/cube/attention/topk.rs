//! Ranking: the forward's fused block selection (compressed mode: a running top-k of the
//! selection blocks per importance row, folded chunk by chunk) and the stand-alone [`top_k`]
//! kernel.

use cubecl::prelude::*;

use super::shared::Keys;
use super::tiling::Tiling;
use super::{NEG, NEG_HALF};

/// The selection softmax's constant slot ([`crate::rules::SINK_LOGIT`]).
const SINK: f32 = crate::rules::SINK_LOGIT;
/// [`crate::rules::VALID_PROBABILITY`].
const VALID: f32 = crate::rules::VALID_PROBABILITY;

/// Resets the running top-k (`topv` [`NEG`], `topi` 0) and the softmax statistics of every
/// importance row (`mi_s` the sink's logit, `zi_s` its 1).
#[cube]
pub fn init_ranking(
    topv: &mut SharedMemory<f32>,
    topi: &mut SharedMemory<u32>,
    mi_s: &mut SharedMemory<f32>,
    zi_s: &mut SharedMemory<f32>,
    #[comptime] t: Tiling,
) {
    let nt = t.threads;
    let kk = t.topk;
    let irows = comptime!(t.imp_rows());
    let mut ir = UNIT_POS as usize;
    while ir < irows {
        mi_s[ir] = SINK;
        zi_s[ir] = 1.0;
        for i in 0..kk {
            topv[ir * kk + i] = NEG;
            topi[ir * kk + i] = 0;
        }
        ir += nt;
    }
}

/// Selection (compressed forward): scores of the selection blocks that lie in this chunk of
/// compressed slots (logits in `p_s`, averaged over the `sel_group` heads of a selection group and
/// the `per_block` slots of a block), folded into each importance row's top-k and softmax normaliser.
/// Block `j` competes for the query at position `t` (row `t0 + ..` plus `ks.q0`) when it ends
/// at or before `t` (`(j + 1) * sel <= t`;
/// the query's own block and later ones have probability zero in the reference).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn rank_blocks(
    p_s: &SharedMemory<f32>,
    fs_s: &mut SharedMemory<f32>,
    topv: &mut SharedMemory<f32>,
    topi: &mut SharedMemory<u32>,
    mi_s: &mut SharedMemory<f32>,
    zi_s: &mut SharedMemory<f32>,
    kstart: usize,
    t0: usize,
    ks: &Keys,
    complete: usize,
    #[comptime] t: Tiling,
) {
    let n = ks.n;
    let mem = ks.mem;
    let nt = t.threads;
    let tid = UNIT_POS as usize;
    let per_block = t.per_block;
    let sel_group = t.sel_group;
    let kk = t.topk;
    let ns = comptime!(t.group_heads / t.sel_group);
    let nfb = comptime!(t.kc / t.per_block);
    let irows = comptime!(t.imp_rows());
    let inv = comptime!(1.0f32 / (t.sel_group * t.per_block) as f32);
    let ps = comptime!(t.ps());
    if kstart >= mem {
        let first = (kstart - mem) / per_block;
        let mut e = tid;
        while e < irows * nfb {
            let ir = e / nfb;
            let fb = e % nfb;
            let r0 = (ir / ns) * t.group_heads + (ir % ns) * sel_group;
            let mut sum = 0.0f32;
            for hh in 0..sel_group {
                for c in 0..per_block {
                    sum += p_s[(r0 + hh) * ps + fb * per_block + c];
                }
            }
            fs_s[e] = sum * inv;
            e += nt;
        }
        sync_cube();
        let mut ir = tid;
        while ir < irows {
            let tt = t0 + ir / ns;
            // the row's position
            let pos = ks.q0 + tt;
            for fb in 0..nfb {
                let j = first + fb;
                if tt < n && j < complete && (j + 1) * t.sel <= pos {
                    let s = fs_s[ir * nfb + fb];
                    let mo = mi_s[ir];
                    if s > mo {
                        zi_s[ir] = zi_s[ir] * (mo - s).exp() + 1.0;
                        mi_s[ir] = s;
                    } else {
                        zi_s[ir] += (s - mo).exp();
                    }
                    let base = ir * kk;
                    if s > topv[base + kk - 1] {
                        let mut pos = (kk - 1).runtime();
                        loop {
                            if pos == 0 {
                                break;
                            }
                            let prev = topv[base + pos - 1];
                            if prev >= s {
                                break;
                            }
                            topv[base + pos] = prev;
                            topi[base + pos] = topi[base + pos - 1];
                            pos -= 1;
                        }
                        topv[base + pos] = s;
                        topi[base + pos] = j as u32;
                    }
                }
            }
            ir += nt;
        }
        sync_cube();
    }
}

/// Writes the kept blocks `sel_idx` and their probabilities `sel_score` `[b, hs, n, topk]`
/// of the cube's importance rows (`group_heads / sel_group` selection heads per position, the first at head
/// row `bh0 / sel_group`; blocks not above the validity threshold as `-1`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn write_selection<F: Float, I: Int>(
    topv: &SharedMemory<f32>,
    topi: &SharedMemory<u32>,
    mi_s: &SharedMemory<f32>,
    zi_s: &SharedMemory<f32>,
    sel_idx: &mut Tensor<I>,
    sel_score: &mut Tensor<F>,
    t0: usize,
    bh0: usize,
    n: usize,
    #[comptime] t: Tiling,
) {
    let nt = t.threads;
    let kk = t.topk;
    let irows = comptime!(t.imp_rows());
    let ns = comptime!(t.group_heads / t.sel_group);
    let mut ir = UNIT_POS as usize;
    while ir < irows {
        let tt = t0 + ir / ns;
        if tt < n {
            let hrow = bh0 / t.sel_group + ir % ns;
            let m = mi_s[ir];
            let z = zi_s[ir];
            for i in 0..kk {
                let s = topv[ir * kk + i];
                let mut prob = 0.0f32;
                if s > NEG_HALF {
                    prob = (s - m).exp() / z;
                }
                let mut blk = i32::cast_from(topi[ir * kk + i]);
                if prob <= VALID {
                    blk = -1;
                }
                let at = (hrow * n + tt) * kk + i;
                sel_idx[at] = I::cast_from(blk);
                sel_score[at] = F::cast_from(prob);
            }
        }
        ir += nt;
    }
}

/// Top-`k` of each row of `x` `[rows, len]`, descending (ties: the lower index first), one unit
/// per row with a running insertion list; `values`, `indices` `[rows, k]`. Rows with fewer than
/// `k` entries pad with [`NEG`] and index 0.
#[cube(launch_unchecked)]
pub fn top_k<F: Float, I: Int>(
    x: &Tensor<F>,
    values: &mut Tensor<F>,
    indices: &mut Tensor<I>,
    rows: usize,
    len: usize,
    #[comptime] k: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = ABSOLUTE_POS;
    if row < rows {
        let mut topv = Array::<f32>::new(k);
        let mut topi = Array::<u32>::new(k);
        #[unroll]
        for i in 0..k {
            topv[i] = NEG;
            topi[i] = 0;
        }
        for j in 0..len {
            let s = f32::cast_from(x[row * len + j]);
            if s > topv[k - 1] {
                let mut pos = (k - 1).runtime();
                loop {
                    if pos == 0 {
                        break;
                    }
                    let prev = topv[pos - 1];
                    if prev >= s {
                        break;
                    }
                    topv[pos] = prev;
                    topi[pos] = topi[pos - 1];
                    pos -= 1;
                }
                topv[pos] = s;
                topi[pos] = j as u32;
            }
        }
        #[unroll]
        for i in 0..k {
            values[row * k + i] = F::cast_from(topv[i]);
            indices[row * k + i] = I::cast_from(topi[i]);
        }
    }
}
