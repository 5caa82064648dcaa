//! The next token chosen on the device, so that a decode loop need not read the logits back
//! every token (the model's `sampling` module is the same rule on the host):
//!
//! - greedy: the first index of the largest logit;
//! - otherwise the `kept` largest logits (ties at the boundary: the lower indices, as the host's
//!   selection), scaled by `1 / temperature`, plus Gumbel noise that is a hash of `(key, index)`
//!   (the model's `sampling::gumbel_noise`); the arg-max wins (ties: the lower index).
//!
//! One cube per row of `logits` `[m, v]`. The `kept`-th largest logit is found by a bisection
//! over the logits' order-preserving `u32` keys (32 counting passes, over keys held in registers
//! where they fit), the tie boundary by a bisection over the index when ties at the threshold
//! are not all kept; every pass is a strided count and one cube-wide sum. All loops
//! with barriers have bounds from scalars or comptime values (uniform control flow, as WGSL
//! requires).

#![allow(unused_assignments, clippy::manual_div_ceil)]

use cubecl::prelude::*;

use super::reduce::{cube_argmax, cube_sum, order_key};

/// Below every score (start of an arg-max).
const LOWEST: f32 = -3.0e38;

/// Comptime shape of one [`sample_rows`] kernel (`group²` units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleTiling {
    /// Entries one unit sums in each of the two levels of a reduction; the cube has `group²`
    /// units (16 or 32: a cube of 256 units runs everywhere, 1024 where the device allows).
    pub group: usize,
    /// Arg-max of the logits only.
    pub greedy: bool,
    /// Keep only the `kept` largest logits (`kept < v`).
    pub filter: bool,
    /// Logits per unit held in registers during the threshold search (`v <= per · group²`),
    /// 0: every pass reads the logits again.
    pub per: usize,
}

/// Murmur3's 32-bit finaliser.
#[cube]
fn mix32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16u32;
    h *= 0x85EB_CA6Bu32;
    h ^= h >> 13u32;
    h *= 0xC2B2_AE35u32;
    h ^= h >> 16u32;
    h
}

/// Gumbel noise `-ln(-ln(u))` of token `i` under the key `(lo, hi)`; `u` in `(0, 1)` from 24
/// hashed bits.
#[cube]
fn gumbel(lo: u32, hi: u32, i: u32) -> f32 {
    let h = mix32(mix32((i * 0x9E37_79B9u32) ^ lo) ^ hi);
    let u = (f32::cast_from(h >> 8u32) + 0.5f32) / 16_777_216.0f32;
    let e = -u.ln();
    -e.ln()
}

/// Tokens `out` `[m]` for the logits `[m, v]`: see the module. `key_lo`, `key_hi`: the key of
/// row 0; row `r` uses `key_lo + r`. `bits`: index bisection steps (`v < 2^bits`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn sample_rows<F: Float, I: Int>(
    logits: &Tensor<F>,
    out: &mut Tensor<I>,
    v: usize,
    kept: u32,
    bits: u32,
    inv_temp: f32,
    key_lo: u32,
    key_hi: u32,
    #[comptime] t: SampleTiling,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X as usize;
    let tid = UNIT_POS as usize;
    let group = t.group;
    let nt = comptime!(t.group * t.group);
    let base = row * v;
    let mut red = SharedMemory::<u32>::new(comptime!(t.group * t.group));
    let mut bv = SharedMemory::<f32>::new(comptime!(t.group * t.group));
    let mut bi = SharedMemory::<u32>::new(comptime!(t.group * t.group));

    // the row's keys in registers when they fit (`per` each): the passes then read no memory
    let per = comptime!(t.per.max(1));
    let mut keys = Array::<u32>::new(per);
    if t.per > 0 {
        #[unroll]
        for k in 0..per {
            let i = tid + k * nt;
            let mut key = 0u32;
            if i < v {
                key = order_key(f32::cast_from(logits[base + i]));
            }
            keys[k] = key;
        }
    }

    // kept: key > thr, or key == thr and index < cut
    let mut thr = 0u32;
    let mut cut = v;
    if t.filter {
        // the largest threshold with at least `kept` keys at or above it (the padding keys 0
        // are below every candidate)
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
                while i < v {
                    if order_key(f32::cast_from(logits[base + i])) >= cand {
                        c += 1;
                    }
                    i += nt;
                }
            }
            if cube_sum(&mut red, c, nt, group) >= kept {
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
                if keys[k] == thr && tid + k * nt < v {
                    eq += 1;
                }
            }
        } else {
            let mut i = tid;
            while i < v {
                let key = order_key(f32::cast_from(logits[base + i]));
                if key > thr {
                    gt += 1;
                }
                if key == thr {
                    eq += 1;
                }
                i += nt;
            }
        }
        let need = kept - cube_sum(&mut red, gt, nt, group);
        let ties = cube_sum(&mut red, eq, nt, group);
        // the smallest `cut` with `need` keys equal to `thr` below it; when every tie is kept
        // (`need == ties`, the usual case) no search (the bound is the same on every unit)
        let mut steps = 0u32;
        if ties > need {
            steps = bits;
        }
        let mut lo = 0usize;
        let mut hi = v;
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
                    if order_key(f32::cast_from(logits[base + i])) == thr {
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
    }

    let mut best = LOWEST.runtime();
    let mut besti = 0u32;
    let mut i = tid;
    while i < v {
        let x = f32::cast_from(logits[base + i]);
        let mut keep = true;
        if t.filter {
            let key = order_key(x);
            keep = key > thr || (key == thr && i < cut);
        }
        if keep {
            let mut s = x;
            if !t.greedy {
                s = x * inv_temp + gumbel(key_lo + row as u32, key_hi, i as u32);
            }
            if s > best {
                best = s;
                besti = i as u32;
            }
        }
        i += nt;
    }
    // arg-max over the units (ties: the lower index)
    let (_, at) = cube_argmax(&mut bv, &mut bi, best, besti, LOWEST.runtime(), nt, group);
    if tid == 0 {
        out[row] = I::cast_from(at);
    }
}
