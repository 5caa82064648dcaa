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

use super::rank::{boundary, RankTiling};
use super::reduce::{cube_argmax, order_key};

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

impl SampleTiling {
    /// The threshold search's shape ([`boundary`]).
    pub fn rank(&self) -> RankTiling {
        RankTiling {
            group: self.group,
            per: self.per,
        }
    }
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

    // kept: key > thr, or key == thr and index < cut (the search shared with DSA's ranking)
    let mut thr = 0u32;
    let mut cut = v;
    if t.filter {
        let rank = comptime!(t.rank());
        let (at, below) = boundary(logits, &mut red, base, v, kept, bits, rank, false);
        thr = at;
        cut = below;
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
