//! Cube-wide reductions of one value per unit, in two levels, shared by the decode step's
//! kernels: every unit writes its value to `rv[UNIT_POS]` (`threads` entries), units
//! `g < ceil(threads / lane)` fold entries `g · lane ..` into entry `g · lane`, then every unit
//! folds those partial results and returns the answer. Each ends with a barrier, so `rv` may be
//! written again right after; all units must call it (it holds barriers).

use cubecl::prelude::*;

/// The sum of every unit's `v`.
#[cube]
pub fn cube_sum<N: Numeric>(
    rv: &mut SharedMemory<N>,
    v: N,
    #[comptime] threads: usize,
    #[comptime] lane: usize,
) -> N {
    let tid = UNIT_POS as usize;
    let groups = comptime!(threads.div_ceil(lane));
    rv[tid] = v;
    sync_cube();
    if tid < groups {
        let mut s = N::from_int(0);
        for u in 0..lane {
            let at = tid * lane + u;
            if at < threads {
                s += rv[at];
            }
        }
        rv[tid * lane] = s;
    }
    sync_cube();
    let mut s = N::from_int(0);
    for g in 0..groups {
        s += rv[g * lane];
    }
    sync_cube();
    s
}

/// The largest of every unit's `v` and `floor`.
#[cube]
pub fn cube_max(
    rv: &mut SharedMemory<f32>,
    v: f32,
    floor: f32,
    #[comptime] threads: usize,
    #[comptime] lane: usize,
) -> f32 {
    let tid = UNIT_POS as usize;
    let groups = comptime!(threads.div_ceil(lane));
    rv[tid] = v;
    sync_cube();
    if tid < groups {
        let mut m = rv[tid * lane];
        for u in 1..lane {
            let at = tid * lane + u;
            if at < threads {
                let s = rv[at];
                if s > m {
                    m = s;
                }
            }
        }
        rv[tid * lane] = m;
    }
    sync_cube();
    let mut m = floor;
    for g in 0..groups {
        let s = rv[g * lane];
        if s > m {
            m = s;
        }
    }
    sync_cube();
    m
}

/// The largest of every unit's `(v, i)` (ties: the lower `i`), with `floor` below every value.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn cube_argmax(
    rv: &mut SharedMemory<f32>,
    ri: &mut SharedMemory<u32>,
    v: f32,
    i: u32,
    floor: f32,
    #[comptime] threads: usize,
    #[comptime] lane: usize,
) -> (f32, u32) {
    let tid = UNIT_POS as usize;
    let groups = comptime!(threads.div_ceil(lane));
    rv[tid] = v;
    ri[tid] = i;
    sync_cube();
    if tid < groups {
        let mut m = rv[tid * lane];
        let mut mi = ri[tid * lane];
        for u in 1..lane {
            let at = tid * lane + u;
            if at < threads {
                let s = rv[at];
                let j = ri[at];
                if s > m || (s == m && j < mi) {
                    m = s;
                    mi = j;
                }
            }
        }
        rv[tid * lane] = m;
        ri[tid * lane] = mi;
    }
    sync_cube();
    let mut m = floor;
    let mut mi = 0u32;
    for g in 0..groups {
        let s = rv[g * lane];
        let j = ri[g * lane];
        if s > m || (s == m && j < mi) {
            m = s;
            mi = j;
        }
    }
    sync_cube();
    (m, mi)
}

/// The bits of `x` mapped so that unsigned order is float order (`-0` below `+0`); NaN maps to
/// `-inf`'s key, `0x007F_FFFF`, so no key is 0 (a bisection's floor lies below every key).
#[cube]
pub fn order_key(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let mut key = bits | 0x8000_0000u32;
    if bits >= 0x8000_0000u32 {
        key = !bits;
    }
    if (bits & 0x7FFF_FFFFu32) > 0x7F80_0000u32 {
        key = 0x007F_FFFFu32;
    }
    key
}
