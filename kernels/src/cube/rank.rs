//! The token selection of DSA's global branch on the device
//! ([`crate::rules::dsa_selected_tokens`] is the rule and its host implementation): the query at
//! position `t` keeps its own token and the `top_k - 1` best-scored of the earlier tokens `0..t`
//! (ties: the earlier position), without reading the indexer's scores back to the host.
//!
//! One cube per query row of `scores` `[b, n, m]` (row `r` is the query at `offset + r % n`).
//! As the device sampler ([`super::sample`]) does for its top-k filter: the boundary score is
//! found by a bisection over the scores' order-preserving `u32` keys (32 counting passes, over
//! keys held in registers where they fit), the tie boundary by a bisection over the position
//! when the ties at the boundary are not all kept; every pass is a strided count and one
//! cube-wide sum. A prefix no longer than `top_k - 1` is kept whole (no search). All loops with
//! barriers have bounds from scalars or comptime values (uniform control flow, as WGSL
//! requires).
//!
//! Legend: `b` batch, `n` query rows, `m` keys, `others = top_k - 1`, `len = min(t, m)` the
//! earlier tokens a row ranks.

#![allow(unused_assignments, clippy::manual_div_ceil)]

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

/// [`order_key`] with `-0` mapped to `+0`'s key: the rule ranks the two zeros as equal.
#[cube]
fn token_key(x: f32) -> u32 {
    let mut key = order_key(x);
    if key == 0x7FFF_FFFFu32 {
        key = 0x8000_0000u32;
    }
    key
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
    let tid = UNIT_POS as usize;
    let group = t.group;
    let nt = comptime!(t.group * t.group);
    let base = row * m;
    let pos = offset + row % n;
    // 1. the earlier tokens this row ranks
    let mut len = m;
    if pos < m {
        len = pos;
    }
    let mut red = SharedMemory::<u32>::new(comptime!(t.group * t.group));

    // the row's keys in registers when they fit (`per` each; 0 past `len`, below every key)
    let per = comptime!(t.per.max(1));
    let mut keys = Array::<u32>::new(per);
    if t.per > 0 {
        #[unroll]
        for k in 0..per {
            let i = tid + k * nt;
            let mut key = 0u32;
            if i < len {
                key = token_key(f32::cast_from(scores[base + i]));
            }
            keys[k] = key;
        }
    }

    // 2. kept: key > thr, or key == thr and position < cut (a short prefix: every key > 0)
    let mut thr = 0u32;
    let mut cut = len;
    if len > others as usize {
        // the largest threshold with at least `others` keys at or above it
        for b in 0..32u32 {
            let cand = thr | (0x8000_0000u32 >> b);
            let mut c = 0u32;
            if t.per > 0 {
                #[unroll]
                for k in 0..per {
                    if keys[k] >= cand {
                        c += 1;
                    }
                }
            } else {
                let mut i = tid;
                while i < len {
                    if token_key(f32::cast_from(scores[base + i])) >= cand {
                        c += 1;
                    }
                    i += nt;
                }
            }
            if cube_sum(&mut red, c, nt, group) >= others {
                thr = cand;
            }
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
                let key = token_key(f32::cast_from(scores[base + i]));
                if key > thr {
                    gt += 1;
                }
                if key == thr {
                    eq += 1;
                }
                i += nt;
            }
        }
        let need = others - cube_sum(&mut red, gt, nt, group);
        let ties = cube_sum(&mut red, eq, nt, group);
        // 3. the smallest `cut` with `need` ties before it (no search when every tie is kept)
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
                    if token_key(f32::cast_from(scores[base + i])) == thr {
                        c += 1;
                    }
                    i += nt;
                }
            }
            if cube_sum(&mut red, c, nt, group) >= need {
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

    // 4. the mask: the kept earlier tokens and the own token
    let mut i = tid;
    while i < m {
        let mut keep = i == pos;
        if i < len {
            let key = token_key(f32::cast_from(scores[base + i]));
            keep = key > thr || (key == thr && i < cut);
        }
        let mut out = I::cast_from(1u32);
        if keep {
            out = I::cast_from(0u32);
        }
        blocked[base + i] = out;
        i += nt;
    }
}
