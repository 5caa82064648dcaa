//! The token selection of DSA's global branch on the device
//! ([`crate::rules::dsa_selected_tokens`] is the rule and its host implementation): the query at
//! position `t` keeps its own token and the `top_k - 1` best-scored of the earlier tokens `0..t`
//! (ties: the earlier position), without reading the indexer's scores back to the host.
//!
//! One cube per query row of `scores` `[b, n, m]` (row `r` is the query at `offset + r % n`).
//! The boundary ([`boundary`], shared with the device sampler's top-k filter,
//! [`super::sample`]): the boundary score is found over the scores' order-preserving `u32` keys,
//! by a bisection (32 counting passes) over keys held in registers where they fit, else by a
//! radix select (4 passes of 8 bits, shared histograms) over keys read again; the tie boundary
//! by a bisection over the position when the ties at the boundary are not all kept; every pass
//! is a strided count and one cube-wide sum (or histogram). A prefix no longer than `top_k - 1` is kept whole (no search). All loops with
//! barriers have bounds from scalars or comptime values (uniform control flow, as WGSL
//! requires).
//!
//! Legend: `b` batch, `n` query rows, `m` keys, `others = top_k - 1`, `len = min(t, m)` the
//! earlier tokens a row ranks.

// nested `if`s guard reads (a `#[cube]` `&&` need not short-circuit)
#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::attention::grid_x;
use super::reduce::{cube_sum, order_key};

/// Comptime shape of one [`rank_tokens`] kernel (`group²` units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RankTiling {
    /// Entries one unit sums in each of the two levels of a reduction; the cube has `group²`
    /// units (16, or 32 where the device allows 1,024 units).
    pub group: usize,
    /// Keys per unit held in registers during the search (`m <= per · group²`); 0: every pass
    /// reads the scores again.
    pub per: usize,
}

/// [`order_key`], with `-0` mapped to `+0`'s key where `zeros_equal` (DSA's rule ranks the two
/// zeros as equal; the sampler's host rule orders them).
#[cube]
fn rank_key(x: f32, #[comptime] zeros_equal: bool) -> u32 {
    let mut key = order_key(x);
    if zeros_equal && key == 0x7FFF_FFFFu32 {
        key = 0x8000_0000u32;
    }
    key
}

/// The boundary of the row at `base` (`len` ranked scores, `others` to keep, ties to the lower
/// index): `(thr, cut)`, the entry `i < len` kept when its key ([`rank_key`]) is above `thr`, or
/// equal to it and `i < cut` (a prefix no longer than `others`: every key is above 0, all
/// kept). Shared with the device sampler's top-k filter. Every unit must call it (it holds
/// barriers); `red` has a word per unit.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn boundary<F: Float>(
    scores: &Tensor<F>,
    red: &mut SharedMemory<u32>,
    base: usize,
    len: usize,
    others: u32,
    bits: u32,
    #[comptime] t: RankTiling,
    #[comptime] zeros_equal: bool,
) -> (u32, usize) {
    let tid = UNIT_POS as usize;
    let group = t.group;
    let nt = comptime!(t.group * t.group);
    // the row's keys in registers when they fit (`per` each; 0 past `len`, below every key)
    let per = comptime!(t.per.max(1));
    let mut keys = Array::<u32>::new(per);
    if t.per > 0 {
        #[unroll]
        for k in 0..per {
            let i = tid + k * nt;
            let mut key = 0u32;
            if i < len {
                key = rank_key(f32::cast_from(scores[base + i]), zeros_equal);
            }
            keys[k] = key;
        }
    }
    let mut thr = 0u32;
    let mut cut = len;
    if len > others as usize {
        // the largest threshold with at least `others` keys at or above it: a bisection over
        // the keys in registers, or a radix select over keys read again (4 reads of the row
        // instead of 32)
        if t.per > 0 {
            for b in 0..32u32 {
                let cand = thr | (0x8000_0000u32 >> b);
                let mut c = 0u32;
                #[unroll]
                for k in 0..per {
                    if keys[k] >= cand {
                        c += 1;
                    }
                }
                if cube_sum(red, c, nt, group) >= others {
                    thr = cand;
                }
            }
        } else {
            thr = radix_threshold(scores, base, len, others, t, zeros_equal);
        }
        let mut gt = 0u32;
        let mut eq = 0u32;
        if t.per > 0 {
            #[unroll]
            for k in 0..per {
                if keys[k] > thr {
                    gt += 1;
                }
                if keys[k] == thr && tid + k * nt < len {
                    eq += 1;
                }
            }
        } else {
            let mut i = tid;
            while i < len {
                let key = rank_key(f32::cast_from(scores[base + i]), zeros_equal);
                if key > thr {
                    gt += 1;
                }
                if key == thr {
                    eq += 1;
                }
                i += nt;
            }
        }
        let need = others - cube_sum(red, gt, nt, group);
        let ties = cube_sum(red, eq, nt, group);
        // the smallest `cut` with `need` ties before it (no search when every tie is kept)
        let mut steps = 0u32;
        if ties > need {
            steps = bits;
        }
        let mut lo = 0usize;
        let mut hi = len;
        for _ in 0..steps {
            let mid = (lo + hi) / 2;
            let mut c = 0u32;
            if t.per > 0 {
                #[unroll]
                for k in 0..per {
                    if keys[k] == thr && tid + k * nt < mid {
                        c += 1;
                    }
                }
            } else {
                let mut i = tid;
                while i < mid {
                    if rank_key(f32::cast_from(scores[base + i]), zeros_equal) == thr {
                        c += 1;
                    }
                    i += nt;
                }
            }
            if cube_sum(red, c, nt, group) >= need {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        cut = hi;
        if others == 0 {
            // nothing but the own token (no key is above u32::MAX)
            thr = 0xFFFF_FFFFu32;
            cut = 0;
        }
    }
    (thr, cut)
}

/// The `others`-th largest key ([`rank_key`]) of the `len > others` scores at `base`: a radix
/// select, 8 bits a pass from the top: each pass counts, in a shared histogram, the next digit
/// of the keys that share the digits found so far, then takes the digit at which the count from
/// the top (with the keys above the prefix) reaches `others`. Every unit must call it.
#[cube]
fn radix_threshold<F: Float>(
    scores: &Tensor<F>,
    base: usize,
    len: usize,
    others: u32,
    #[comptime] t: RankTiling,
    #[comptime] zeros_equal: bool,
) -> u32 {
    let tid = UNIT_POS as usize;
    let nt = comptime!(t.group * t.group);
    let hist = SharedMemory::<Atomic<u32>>::new(256usize);
    let mut found = SharedMemory::<u32>::new(2usize);
    let mut prefix = 0u32;
    // keys above the prefix's range
    let mut above = 0u32;
    #[unroll]
    for pass in 0..4u32 {
        let shift = comptime!(24u32 - 8 * pass);
        // the bits the keys must share with `prefix` (none in the first pass)
        let high = comptime!(if pass == 0 {
            0u32
        } else {
            0xFFFF_FFFFu32 << (shift + 8)
        });
        let mut i = tid;
        while i < 256 {
            hist[i].store(0u32);
            i += nt;
        }
        sync_cube();
        let mut i = tid;
        while i < len {
            let key = rank_key(f32::cast_from(scores[base + i]), zeros_equal);
            if (key & high) == prefix {
                hist[((key >> shift) & 255u32) as usize].fetch_add(1u32);
            }
            i += nt;
        }
        sync_cube();
        if tid == 0 {
            let mut cum = above;
            let mut digit = 0u32;
            let mut done = false;
            for j in 0..256u32 {
                let d = 255u32 - j;
                if !done {
                    let c = hist[d as usize].load();
                    if cum + c >= others {
                        digit = d;
                        done = true;
                    } else {
                        cum += c;
                    }
                }
            }
            found[0] = digit;
            found[1] = cum;
        }
        sync_cube();
        prefix |= found[0] << shift;
        above = found[1];
        sync_cube();
    }
    prefix
}

/// Whether the query at `pos` keeps token `i` (`len` ranked, boundary `(thr, cut)`; its own
/// token where `own`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn kept<F: Float>(
    scores: &Tensor<F>,
    base: usize,
    i: usize,
    pos: usize,
    len: usize,
    thr: u32,
    cut: usize,
    own: bool,
) -> bool {
    let mut keep = own && i == pos;
    if i < len {
        let key = rank_key(f32::cast_from(scores[base + i]), true);
        keep = key > thr || (key == thr && i < cut);
    }
    keep
}

/// `blocked` `[b, n, m]`: 0 where the query of the row selects the key, 1 elsewhere (not
/// selected, or in the future). `bits`: position bisection steps (`m < 2^bits`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rank_tokens<F: Float, I: Int>(
    scores: &Tensor<F>,
    blocked: &mut Tensor<I>,
    rows: usize,
    n: usize,
    m: usize,
    offset: usize,
    others: u32,
    bits: u32,
    #[comptime] t: RankTiling,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = grid_x();
    if row >= rows {
        terminate!();
    }
    let nt = comptime!(t.group * t.group);
    let base = row * m;
    let pos = offset + row % n;
    let mut len = m;
    if pos < m {
        len = pos;
    }
    let mut red = SharedMemory::<u32>::new(comptime!(t.group * t.group));
    let (thr, cut) = boundary(scores, &mut red, base, len, others, bits, t, true);
    let mut i = UNIT_POS as usize;
    while i < m {
        let mut out = I::cast_from(1u32);
        if kept(scores, base, i, pos, len, thr, cut, true) {
            out = I::cast_from(0u32);
        }
        blocked[base + i] = out;
        i += nt;
    }
}

/// `positions` `[rows, count]`: the tokens the query of each row of `scores` `[rows, m]` keeps
/// (row `r` is the query at `pos = offset + r % n < m`), ascending; its own token too where
/// `own` is 1, and `-1` after the last kept token. Each unit takes a contiguous segment of the
/// row; an exclusive scan of the segments' counts places them.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn token_positions<F: Float, I: Int>(
    scores: &Tensor<F>,
    positions: &mut Tensor<I>,
    rows: usize,
    n: usize,
    m: usize,
    offset: usize,
    count: usize,
    own: u32,
    others: u32,
    bits: u32,
    #[comptime] t: RankTiling,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = grid_x();
    if row >= rows {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let nt = comptime!(t.group * t.group);
    let base = row * m;
    let pos = offset + row % n;
    let with_own = own == 1;
    let mut len = m;
    if pos < m {
        len = pos;
    }
    let mut red = SharedMemory::<u32>::new(comptime!(t.group * t.group));
    let (thr, cut) = boundary(scores, &mut red, base, len, others, bits, t, true);
    // 1. the kept tokens of this unit's segment
    let seg = (m + nt - 1) / nt;
    let lo = tid * seg;
    let mut c = 0u32;
    for j in 0..seg {
        let i = lo + j;
        if i < m {
            if kept(scores, base, i, pos, len, thr, cut, with_own) {
                c += 1;
            }
        }
    }
    // 2. inclusive scan of the counts over the units (Hillis-Steele)
    red[tid] = c;
    sync_cube();
    let steps = comptime!(usize::BITS - (t.group * t.group - 1).leading_zeros());
    let mut off = 1usize;
    for _ in 0..steps {
        let mut v = red[tid];
        if tid >= off {
            v += red[tid - off];
        }
        sync_cube();
        red[tid] = v;
        sync_cube();
        off *= 2;
    }
    // 3. the segment's tokens in order from its exclusive offset, then -1 after the last
    let total = usize::cast_from(red[nt - 1]);
    let mut at = usize::cast_from(red[tid] - c);
    for j in 0..seg {
        let i = lo + j;
        if i < m {
            if kept(scores, base, i, pos, len, thr, cut, with_own) {
                if at < count {
                    positions[row * count + at] = I::cast_from(i as u32);
                }
                at += 1;
            }
        }
    }
    let mut at = total + tid;
    while at < count {
        positions[row * count + at] = I::cast_from(-1i32);
        at += nt;
    }
}
