//! CubeCL kernels: masked attention of query rows over chunks of keys with an online softmax
//! (forward), and its backward: query-centric for `dq` (and the gates), key-centric for `dk`
//! and `dv`, so that every gradient element has one owner and no float atomics are needed.
//!
//! One source serves the three branches through the comptime `mode` of [`Tiling`]:
//!
//! - [`SELECTED`]: one query position per cube with the `gq` heads that share its selection;
//!   the keys are its selected blocks (gated, invalid ones skipped) and the causal part of its
//!   own block.
//! - [`SLIDING`]: `tq` consecutive query positions × `gq` heads of one kv head; the query at `t`
//!   sees keys `t - window ..= t`.
//! - [`COMPRESSED`]: `tq` query positions × `gq` heads over memory + compressed slots; slot
//!   `j >= mem` is visible from position `(j - mem + 1) * stride` on.
//!
//! The rows of a cube are `(query tl, head hl)` pairs, `r = tl * gq + hl`. Scores are computed
//! in f32 whatever the storage type; [`NEG`] stands for minus infinity (WGSL has no infinity
//! literal). Threads stride over the work items of each phase.
//!
//! Shared key/value tiles have a row stride of `d + 1` words: threads that take consecutive
//! keys of one dot product then read different banks (with a stride of `d` = 64 all 32 lanes
//! of a warp hit one bank).
//!
//! Tensors are contiguous: `q`, `out`, `dout` `[b, h, n, d]`, `k`, `v` `[b, kvh, nk, d]`,
//! `lse`, `delta` `[b, h, n]` (f32), `idx`, `gates` `[b, hs, n, count]` (`idx < 0`: invalid).

// `#[cube]` expands `let mut x = ..; if .. { x = .. }` into code rustc sees as dead stores;
// runtime `usize::div_ceil` has no CubeCL expansion.
#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::mma::{acc_stride, depth, mma_tiles, tile_stride};

/// Mode: selected blocks + own block.
pub const SELECTED: u32 = 0;
/// Mode: sliding window.
pub const SLIDING: u32 = 1;
/// Mode: compressed slots.
pub const COMPRESSED: u32 = 2;

/// A finite stand-in for minus infinity.
pub const NEG: f32 = -1.0e30;
/// Scores below this are masked.
pub(crate) const NEG_HALF: f32 = -5.0e29;

/// Shape and mode of one launch (comptime: one compiled kernel per distinct value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiling {
    /// [`SELECTED`], [`SLIDING`] or [`COMPRESSED`].
    pub mode: u32,
    /// Head dimension.
    pub d: usize,
    /// Keys per chunk.
    pub kc: usize,
    /// Query positions per row batch (1 for [`SELECTED`] forward and dq).
    pub tq: usize,
    /// Heads per row group of the query-centric kernels (selected: heads sharing a selection).
    pub gq: usize,
    /// Query heads per kv head.
    pub gk: usize,
    /// Selection block size ([`SELECTED`]).
    pub sel: usize,
    /// Keys are gated per selected block ([`SELECTED`]).
    pub gated: bool,
    /// Units per cube.
    pub threads: usize,
    /// [`COMPRESSED`] forward: also rank the selection blocks and keep the top `topk`.
    pub select: bool,
    /// Blocks kept per query ([`Tiling::select`]).
    pub topk: usize,
    /// Compressed slots per selection block ([`Tiling::select`]; divides `kc`).
    pub pf: usize,
    /// Heads per selection group ([`Tiling::select`]; divides `gq`).
    pub sg: usize,
    /// Register tiles. Forward and dq ([`Tiling::with_register_tiles`]): `qr × qk` rows × keys
    /// of the scores each unit computes, `pr × pd` rows × dims of the output it accumulates,
    /// `tpr` units per row of the softmax statistics. dk/dv ([`Tiling::with_dkdv_tiles`]):
    /// `qr × qk` rows × keys of the scores, `pr × pd` keys × dims of the accumulators.
    pub qr: usize,
    pub qk: usize,
    pub pr: usize,
    pub pd: usize,
    pub tpr: usize,
    /// Products on tensor cores ([`super::mma`]; the host sets it where the device has the
    /// fragments of the storage type and rows, keys and dims are multiples of 16).
    pub mma: bool,
    /// Bytes of a tensor-core tile element `H`: 2 (bf16 / f16 storage), 4 (tf32 for f32).
    pub hb: usize,
}

/// Largest `(a, b)` with `a` from `a_max` down and `b` from `b_max` down (powers of two,
/// dividing `x` and `y`) such that the `(x / a) * (y / b)` tiles still give every unit one;
/// `b` shrinks first.
fn tile_pair(x: usize, y: usize, a_max: usize, b_max: usize, units: usize) -> (usize, usize) {
    let fit = |v: usize, m: usize| {
        let mut t = m;
        while t > 1 && !v.is_multiple_of(t) {
            t /= 2;
        }
        t
    };
    let (mut a, mut b) = (fit(x, a_max), fit(y, b_max));
    while (x / a) * (y / b) < units && (a > 1 || b > 1) {
        if b > 1 {
            b /= 2;
        } else {
            a /= 2;
        }
    }
    (a, b)
}

impl Tiling {
    /// Chooses the forward's register tiles for the current shape: each unit computes a
    /// `qr × qk` block of scores (`qr + qk` shared loads per `qr · qk` multiply-adds instead
    /// of two per product) and accumulates a `pr × pd` block of the output; `tpr` units share
    /// the softmax statistics of one row.
    pub fn with_register_tiles(mut self) -> Self {
        let rows = self.rows();
        (self.qr, self.qk) = tile_pair(rows, self.kc, 4, 4, self.threads);
        (self.pr, self.pd) = tile_pair(rows, self.d, 4, 8, self.threads);
        let mut tpr = 1;
        while tpr * 2 * rows <= self.threads && tpr * 2 <= self.kc {
            tpr *= 2;
        }
        self.tpr = tpr;
        self
    }

    /// The dk/dv kernel's register tiles: `qr × qk` (rows × keys) of the probabilities and
    /// score gradients, `pr × pd` (keys × dims) of the dk/dv accumulators.
    pub fn with_dkdv_tiles(mut self) -> Self {
        let rows = self.bwd_rows();
        (self.qr, self.qk) = tile_pair(rows, self.kc, 4, 4, self.threads);
        (self.pr, self.pd) = tile_pair(self.kc, self.d, 4, 8, self.threads);
        self
    }

    /// Work items of the dk/dv kernel: score tiles, accumulator tiles.
    fn bwd_score_tiles(&self) -> usize {
        (self.bwd_rows() / self.qr) * (self.kc / self.qk)
    }

    fn bwd_acc_tiles(&self) -> usize {
        (self.kc / self.pr) * (self.d / self.pd)
    }

    /// Units' work items of the score tiles, of the output tiles.
    fn score_tiles(&self) -> usize {
        (self.rows() / self.qr) * (self.kc / self.qk)
    }

    fn out_tiles(&self) -> usize {
        (self.rows() / self.pr) * (self.d / self.pd)
    }

    /// Rows of a query-centric cube.
    pub fn rows(&self) -> usize {
        self.tq * self.gq
    }

    /// Rows of one key-centric batch.
    pub fn bwd_rows(&self) -> usize {
        (self.tq * self.gk).max(self.gq)
    }

    /// Importance rows of a selecting forward cube: `tq` positions × selection heads.
    pub fn imp_rows(&self) -> usize {
        if self.select {
            self.tq * (self.gq / self.sg)
        } else {
            1
        }
    }

    /// Row stride of the forward's f32 score tile.
    pub fn ps(&self) -> usize {
        if self.mma {
            acc_stride(self.kc)
        } else {
            self.kc + 1
        }
    }

    /// Words of the forward's f32 score tile (on the tensor-core path it also takes each
    /// chunk's `P V`).
    pub fn score_words(&self) -> usize {
        if self.mma {
            self.rows() * self.ps().max(acc_stride(self.d))
        } else {
            self.rows() * self.ps()
        }
    }

    /// Shared memory (bytes) of the forward kernel.
    pub fn fwd_shared(&self) -> usize {
        let r = self.rows();
        let imp = if self.select {
            let ir = self.imp_rows();
            ir * (self.kc / self.pf) + 2 * ir * self.topk + 2 * ir
        } else {
            0
        };
        let stats = 4 * r + 2 * r * self.tpr;
        let tiles = if self.mma {
            // tensor-core tiles of q, k, v, p and the three unused f32 tiles
            let halves = r * tile_stride(self.d) + 2 * self.kc * tile_stride(self.d);
            ((halves + r * tile_stride(self.kc)) * self.hb).div_ceil(4) + 3
        } else {
            r * (self.d + 1) + 2 * self.kc * (self.d + 1)
        };
        4 * (tiles + self.score_words() + stats + imp)
    }

    /// Words of the dq kernel's f32 tile: scores and `dO Vᵀ` (two `[rows, kc]` tiles) on the
    /// tensor-core path, where each chunk's `dS K` reuses it.
    pub fn dq_words(&self) -> usize {
        let r = self.rows();
        if self.mma {
            (2 * r * acc_stride(self.kc)).max(r * acc_stride(self.d))
        } else {
            2 * r * (self.kc + 1)
        }
    }

    /// Shared memory (bytes) of the dq kernel.
    pub fn dq_shared(&self) -> usize {
        let r = self.rows();
        let tiles = if self.mma {
            // tensor-core tiles of q, dout, k, v, dS and the four unused f32 tiles
            let halves = 2 * r * tile_stride(self.d) + 2 * self.kc * tile_stride(self.d);
            ((halves + r * tile_stride(self.kc)) * self.hb).div_ceil(4) + 4
        } else {
            2 * r * (self.d + 1) + 2 * self.kc * (self.d + 1)
        };
        4 * (tiles + self.dq_words() + 2 * r)
    }

    /// Words of the dk/dv kernel's f32 tile on the tensor-core path: a batch's scores and
    /// `dO Vᵀ`, then its `Pᵀ dO` and `dSᵀ Q` (`[kc, d]` each, one after the other).
    pub fn dkdv_words(&self) -> usize {
        let r = self.bwd_rows();
        (2 * r * acc_stride(self.kc)).max(self.kc * acc_stride(self.d))
    }

    /// Shared memory (bytes) of the dk/dv kernel.
    pub fn dkdv_shared(&self) -> usize {
        let r = self.bwd_rows();
        if self.mma {
            // tensor-core tiles of q, dout, k, v, p, dS and the six unused f32 tiles
            let halves = 2 * r * tile_stride(self.d) + 2 * self.kc * tile_stride(self.d);
            let halves = halves + 2 * r * tile_stride(self.kc);
            return 4 * ((halves * self.hb).div_ceil(4) + 6 + self.dkdv_words() + 6 * r);
        }
        4 * (2 * r * (self.d + 1) + 2 * self.kc * (self.d + 1) + 2 * r * (self.kc + 1) + 6 * r)
    }
}

/// Whether the key at position `p` is visible to the query at `t`. `slot_ok`: the chunk's
/// block is valid, `in_block`: the key lies inside it, `own`: it is the query's own block
/// (selected mode).
#[cube]
#[allow(clippy::too_many_arguments)]
fn visible(
    p: usize,
    t: usize,
    nk: usize,
    span: usize,
    mem: usize,
    own: bool,
    slot_ok: bool,
    in_block: bool,
    #[comptime] mode: u32,
) -> bool {
    let mut ok = p < nk && in_block;
    if mode == SELECTED {
        ok = ok && slot_ok;
        if own {
            ok = ok && p <= t;
        }
    } else if mode == SLIDING {
        ok = ok && p <= t && p + span >= t;
    } else if p >= mem {
        ok = ok && (p + 1 - mem) * span <= t;
    }
    ok
}

/// First key position a sliding/compressed cube starting at query `t0` visits.
#[cube]
fn first_key(t0: usize, span: usize, #[comptime] mode: u32) -> usize {
    let mut lo = 0usize;
    if mode == SLIDING && t0 > span {
        lo = t0 - span;
    }
    lo
}

/// Number of key chunks a query-centric cube visits (`t0`: its first query position).
#[cube]
fn chunk_count(
    t0: usize,
    n: usize,
    nk: usize,
    count: usize,
    span: usize,
    mem: usize,
    #[comptime] t: Tiling,
) -> usize {
    let kc = t.kc;
    let mut last = t0 + t.tq;
    if last > n {
        last = n;
    }
    last -= 1;
    let mut chunks = 0usize;
    if t.mode == SELECTED {
        let subs = comptime!(t.sel.div_ceil(t.kc));
        chunks = (count + 1) * subs;
    } else if t.mode == SLIDING {
        let lo = first_key(t0, span, t.mode);
        chunks = (last + 1 - lo + kc - 1) / kc;
    } else {
        // memory chunks, then chunks of compressed blocks (aligned to selection blocks)
        let mut vis = mem + last / span;
        if vis > nk {
            vis = nk;
        }
        chunks = (mem + kc - 1) / kc + (vis - mem + kc - 1) / kc;
    }
    chunks
}

/// Where chunk `ci` of a query-centric cube lies: `(key start, slot valid, own block, gate,
/// keys left in the block, slot index)`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_at<F: Float, I: Int>(
    ci: usize,
    t0: usize,
    sel_row: usize,
    idx: &Tensor<I>,
    gates: &Tensor<F>,
    count: usize,
    span: usize,
    mem: usize,
    #[comptime] t: Tiling,
) -> (usize, bool, bool, f32, usize, usize) {
    let kc = t.kc;
    let mut kstart = 0usize;
    let mut slot_ok = true;
    let mut own = false;
    let mut gate = 1.0f32;
    let mut left = kc.runtime();
    let mut slot = 0usize;
    if t.mode == SELECTED {
        let sel = t.sel;
        let subs = comptime!(t.sel.div_ceil(t.kc));
        slot = ci / subs;
        let sub = ci % subs;
        left = sel - sub * kc;
        if slot < count {
            let at = sel_row * count + slot;
            let blk = i32::cast_from(idx[at]);
            slot_ok = blk >= 0;
            let mut base = 0usize;
            if slot_ok {
                base = usize::cast_from(blk) * sel;
            }
            kstart = base + sub * kc;
            if t.gated {
                gate = f32::cast_from(gates[at]);
            }
        } else {
            own = true;
            kstart = (t0 / sel) * sel + sub * kc;
        }
    } else if t.mode == SLIDING {
        kstart = first_key(t0, span, t.mode) + ci * kc;
    } else {
        let mem_chunks = (mem + kc - 1) / kc;
        if ci < mem_chunks {
            kstart = ci * kc;
            left = mem - kstart;
        } else {
            kstart = mem + (ci - mem_chunks) * kc;
        }
    }
    (kstart, slot_ok, own, gate, left, slot)
}

/// Forward. Grid: x = query tile (`tq` positions), y = `b * groups + group` where a group is
/// `gq` consecutive heads. Writes `out` and the log-sum-exp `lse` of every row.
///
/// Per chunk of keys: load the K/V tile; scores in register tiles of `qr × qk` (keys strided
/// over the units so that a warp reads distinct banks); the chunk's row maxima and sums, `tpr`
/// units per row; the output accumulators (`pr × pd` per unit) rescaled and updated.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd<F: Float, I: Int, H: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    idx: &Tensor<I>,
    gates: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    sel_idx: &mut Tensor<I>,
    sel_score: &mut Tensor<F>,
    n: usize,
    nk: usize,
    h: usize,
    kvh: usize,
    count: usize,
    span: usize,
    mem: usize,
    fine: usize,
    scale: f32,
    #[comptime] t: Tiling,
    #[define(F, I, H)] _dtypes: [StorageType; 3],
) {
    let d = t.d;
    let kc = t.kc;
    let gq = t.gq;
    let rows = comptime!(t.tq * t.gq);
    let nt = t.threads;
    // row strides of the shared tiles (padded by one word against bank conflicts)
    let ds = comptime!(t.d + 1);
    let ps = comptime!(t.ps());
    // tensor-core path: strides of the tiles (element `H`) and of `P V` in `p_s`
    let hst = comptime!(tile_stride(t.d));
    let kf = comptime!(depth(t.hb));
    let hp = comptime!(tile_stride(t.kc));
    let os = comptime!(acc_stride(t.d));
    let qr = t.qr;
    let qk = t.qk;
    let pr = t.pr;
    let pd = t.pd;
    let tpr = t.tpr;
    let accn = comptime!(t.out_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    let dgroups = comptime!(t.d / t.pd);
    // the scalar score tiles (none on the tensor-core path)
    let stiles = comptime!(if t.mma { 0 } else { t.score_tiles() });
    let otiles = comptime!(t.out_tiles());
    let oper = comptime!(t.out_tiles().div_ceil(t.threads));
    let tid = UNIT_POS as usize;
    let t0 = CUBE_POS_X as usize * t.tq;
    let groups = h / gq;
    let b = CUBE_POS_Y as usize / groups;
    let hg = CUBE_POS_Y as usize % groups;
    let kvhead = (hg * gq) / t.gk;
    let sel_row = (b * groups + hg) * n + t0;

    // f32 tiles of the scalar path (one word on the tensor-core path), tiles of element `H`
    // of the tensor-core path (one word on the scalar path)
    let mut q_s = SharedMemory::<f32>::new(comptime!(if t.mma { 1 } else { t.rows() * (t.d + 1) }));
    let mut k_s = SharedMemory::<f32>::new(comptime!(if t.mma { 1 } else { t.kc * (t.d + 1) }));
    let mut v_s = SharedMemory::<f32>::new(comptime!(if t.mma { 1 } else { t.kc * (t.d + 1) }));
    let mut p_s = SharedMemory::<f32>::new_aligned(comptime!(t.score_words()), 128usize);
    let hq = comptime!(if t.mma {
        t.rows() * tile_stride(t.d)
    } else {
        1
    });
    let hkv = comptime!(if t.mma { t.kc * tile_stride(t.d) } else { 1 });
    let hpn = comptime!(if t.mma {
        t.rows() * tile_stride(t.kc)
    } else {
        1
    });
    let mut q_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut k_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut p_h = SharedMemory::<H>::new_aligned(hpn, 128usize);
    let mut m_s = SharedMemory::<f32>::new(rows);
    let mut l_s = SharedMemory::<f32>::new(rows);
    let mut a_s = SharedMemory::<f32>::new(rows);
    let mut nm_s = SharedMemory::<f32>::new(rows);
    let mut red_s = SharedMemory::<f32>::new(comptime!(t.tq * t.gq * t.tpr));
    let mut sum_s = SharedMemory::<f32>::new(comptime!(t.tq * t.gq * t.tpr));
    // selection (compressed mode): per importance row, block scores of the chunk, the running
    // top-k (descending) and the softmax normaliser (the sink at -1000 included)
    let irows = comptime!(t.imp_rows());
    let nfb = comptime!(if t.select { t.kc / t.pf } else { 1 });
    let kk = comptime!(if t.select { t.topk } else { 1 });
    let mut fs_s = SharedMemory::<f32>::new(comptime!(t.imp_rows() * nfb));
    let mut topv = SharedMemory::<f32>::new(comptime!(t.imp_rows() * kk));
    let mut topi = SharedMemory::<u32>::new(comptime!(t.imp_rows() * kk));
    let mut mi_s = SharedMemory::<f32>::new(irows);
    let mut zi_s = SharedMemory::<f32>::new(irows);
    if t.select {
        let mut ir = tid;
        while ir < irows {
            mi_s[ir] = -1000.0;
            zi_s[ir] = 1.0;
            for i in 0..kk {
                topv[ir * kk + i] = NEG;
                topi[ir * kk + i] = 0;
            }
            ir += nt;
        }
    }

    let mut e = tid;
    while e < rows * d {
        let r = e / d;
        let tt = t0 + r / gq;
        let head = hg * gq + r % gq;
        let mut val = 0.0f32;
        if tt < n {
            val = f32::cast_from(q[((b * h + head) * n + tt) * d + e % d]) * scale;
        }
        if t.mma {
            q_h[r * hst + e % d] = H::cast_from(val);
        } else {
            q_s[r * ds + e % d] = val;
        }
        e += nt;
    }
    let mut r = tid;
    while r < rows {
        m_s[r] = NEG;
        l_s[r] = 0.0;
        r += nt;
    }
    let mut acc = Array::<f32>::new(accn);
    #[unroll]
    for i in 0..accn {
        acc[i] = 0.0;
    }
    sync_cube();

    let chunks = chunk_count(t0, n, nk, count, span, mem, t);
    for ci in 0..chunks {
        let (kstart, slot_ok, own, gate, left, _slot) =
            chunk_at::<F, I>(ci, t0, sel_row, idx, gates, count, span, mem, t);

        let mut e = tid;
        while e < kc * d {
            let j = e / d;
            let p = kstart + j;
            let mut kv = 0.0f32;
            let mut vv = 0.0f32;
            if p < nk && slot_ok && j < left {
                let off = ((b * kvh + kvhead) * nk + p) * d + e % d;
                kv = f32::cast_from(k[off]);
                vv = f32::cast_from(v[off]);
            }
            if t.mma {
                k_h[j * hst + e % d] = H::cast_from(kv);
                v_h[j * hst + e % d] = H::cast_from(vv);
            } else {
                k_s[j * ds + e % d] = kv;
                v_s[j * ds + e % d] = vv;
            }
            e += nt;
        }
        sync_cube();

        if t.mma {
            // scores `Q Kᵀ` on tensor cores (K read as the transposed operand), then masked
            mma_tiles::<H>(
                &q_h, &k_h, &mut p_s, rows, kc, d, hst, hst, ps, 0usize, false, true, kf,
            );
            sync_cube();
            let mut e = tid;
            while e < rows * kc {
                let r = e / kc;
                let j = e % kc;
                let tt = t0 + r / gq;
                let mut s = NEG.runtime();
                if tt < n
                    && visible(
                        kstart + j,
                        tt,
                        nk,
                        span,
                        mem,
                        own,
                        slot_ok,
                        j < left,
                        t.mode,
                    )
                {
                    s = p_s[r * ps + j] * gate;
                }
                p_s[r * ps + j] = s;
                e += nt;
            }
        }

        // scores: unit tile `g` holds rows `rg * qr ..` and keys `kg + kgroups * jj`
        let mut g = tid;
        while g < stiles {
            let rg = g / kgroups;
            let kg = g % kgroups;
            let mut sacc = Array::<f32>::new(sn);
            #[unroll]
            for i in 0..sn {
                sacc[i] = 0.0;
            }
            for dd in 0..d {
                let mut kreg = Array::<f32>::new(qk);
                #[unroll]
                for jj in 0..qk {
                    kreg[jj] = k_s[(kg + kgroups * jj) * ds + dd];
                }
                #[unroll]
                for i in 0..qr {
                    let qv = q_s[(rg * qr + i) * ds + dd];
                    #[unroll]
                    for jj in 0..qk {
                        sacc[i * qk + jj] += qv * kreg[jj];
                    }
                }
            }
            #[unroll]
            for i in 0..qr {
                let r = rg * qr + i;
                let tt = t0 + r / gq;
                #[unroll]
                for jj in 0..qk {
                    let j = kg + kgroups * jj;
                    let mut s = NEG.runtime();
                    if tt < n
                        && visible(
                            kstart + j,
                            tt,
                            nk,
                            span,
                            mem,
                            own,
                            slot_ok,
                            j < left,
                            t.mode,
                        )
                    {
                        s = sacc[i * qk + jj] * gate;
                    }
                    p_s[r * ps + j] = s;
                }
            }
            g += nt;
        }
        sync_cube();

        if t.select {
            rank_blocks(
                &p_s, &mut fs_s, &mut topv, &mut topi, &mut mi_s, &mut zi_s, kstart, t0, n, mem,
                fine, t,
            );
        }

        // chunk maxima: `tpr` units per row, each over the keys `sub, sub + tpr, ..`
        let rpp = comptime!(t.threads / t.tpr);
        let sub = tid % tpr;
        let mut r = tid / tpr;
        while r < rows {
            let mut mx = NEG.runtime();
            let mut j = sub;
            while j < kc {
                let s = p_s[r * ps + j];
                if s > mx {
                    mx = s;
                }
                j += tpr;
            }
            red_s[r * tpr + sub] = mx;
            r += rpp;
        }
        sync_cube();
        // probabilities against the new running maximum, partial sums
        let mut r = tid / tpr;
        while r < rows {
            let m_old = m_s[r];
            let mut mx = m_old;
            for u in 0..tpr {
                let s = red_s[r * tpr + u];
                if s > mx {
                    mx = s;
                }
            }
            let mut sum = 0.0f32;
            let mut j = sub;
            while j < kc {
                let s = p_s[r * ps + j];
                let mut pj = 0.0f32;
                if s > NEG_HALF {
                    pj = (s - mx).exp();
                }
                if t.mma {
                    p_h[r * hp + j] = H::cast_from(pj);
                } else {
                    p_s[r * ps + j] = pj;
                }
                sum += pj;
                j += tpr;
            }
            sum_s[r * tpr + sub] = sum;
            if sub == 0 {
                nm_s[r] = mx;
                a_s[r] = (m_old - mx).exp();
            }
            r += rpp;
        }
        sync_cube();
        if t.mma {
            // the chunk's `P V` into `p_s` (its scores are read by now)
            mma_tiles::<H>(
                &p_h, &v_h, &mut p_s, rows, d, kc, hp, hst, os, 0usize, false, false, kf,
            );
            sync_cube();
        }

        // output tiles: rows `rg * pr ..`, dims `dg + dgroups * u`
        #[unroll]
        for it in 0..oper {
            let g = tid + it * nt;
            if g < otiles {
                let rg = g / dgroups;
                let dg = g % dgroups;
                let base = it * pr * pd;
                #[unroll]
                for i in 0..pr {
                    let a = a_s[rg * pr + i];
                    #[unroll]
                    for u in 0..pd {
                        let mut add = 0.0f32;
                        if t.mma {
                            add = p_s[(rg * pr + i) * os + dg + dgroups * u];
                        }
                        acc[base + i * pd + u] = acc[base + i * pd + u] * a + add;
                    }
                }
                let kv_steps = comptime!(if t.mma { 0 } else { t.kc });
                for j in 0..kv_steps {
                    let mut vreg = Array::<f32>::new(pd);
                    #[unroll]
                    for u in 0..pd {
                        vreg[u] = v_s[j * ds + dg + dgroups * u];
                    }
                    #[unroll]
                    for i in 0..pr {
                        let pv = p_s[(rg * pr + i) * ps + j];
                        #[unroll]
                        for u in 0..pd {
                            acc[base + i * pd + u] += pv * vreg[u];
                        }
                    }
                }
            }
        }
        // running statistics (read again only after the next chunk's barriers)
        let mut r = tid;
        while r < rows {
            let mut sum = 0.0f32;
            for u in 0..tpr {
                sum += sum_s[r * tpr + u];
            }
            l_s[r] = l_s[r] * a_s[r] + sum;
            m_s[r] = nm_s[r];
            r += nt;
        }
        sync_cube();
    }

    #[unroll]
    for it in 0..oper {
        let g = tid + it * nt;
        if g < otiles {
            let rg = g / dgroups;
            let dg = g % dgroups;
            let base = it * pr * pd;
            #[unroll]
            for i in 0..pr {
                let r = rg * pr + i;
                let tt = t0 + r / gq;
                let head = hg * gq + r % gq;
                if tt < n {
                    let inv = 1.0f32 / l_s[r];
                    #[unroll]
                    for u in 0..pd {
                        let dd = dg + dgroups * u;
                        out[((b * h + head) * n + tt) * d + dd] =
                            F::cast_from(acc[base + i * pd + u] * inv);
                    }
                }
            }
        }
    }
    let mut r = tid;
    while r < rows {
        let tt = t0 + r / gq;
        let head = hg * gq + r % gq;
        if tt < n {
            lse[(b * h + head) * n + tt] = m_s[r] + l_s[r].ln();
        }
        r += nt;
    }

    if t.select {
        // selection heads of this cube: `gq / sg` per position
        let ns = comptime!(t.gq / t.sg);
        let hs = h / t.sg;
        let mut ir = tid;
        while ir < irows {
            let tt = t0 + ir / ns;
            if tt < n {
                let hsel = (hg * gq) / t.sg + ir % ns;
                let m = mi_s[ir];
                let z = zi_s[ir];
                for i in 0..kk {
                    let s = topv[ir * kk + i];
                    let mut prob = 0.0f32;
                    if s > NEG_HALF {
                        prob = (s - m).exp() / z;
                    }
                    let mut blk = i32::cast_from(topi[ir * kk + i]);
                    if prob <= 1.0e-10 {
                        blk = -1;
                    }
                    let at = ((b * hs + hsel) * n + tt) * kk + i;
                    sel_idx[at] = I::cast_from(blk);
                    sel_score[at] = F::cast_from(prob);
                }
            }
            ir += nt;
        }
    }
}

/// Selection (compressed forward): scores of the selection blocks that lie in this chunk of
/// compressed slots (logits in `p_s`, averaged over the `sg` heads of a selection group and
/// the `pf` slots of a block), folded into each importance row's top-k and softmax normaliser.
/// Block `j` competes for the query at `t` when it ends at or before `t` (`(j + 1) * sel <= t`;
/// the query's own block and later ones have probability zero in the reference).
#[cube]
#[allow(clippy::too_many_arguments)]
fn rank_blocks(
    p_s: &SharedMemory<f32>,
    fs_s: &mut SharedMemory<f32>,
    topv: &mut SharedMemory<f32>,
    topi: &mut SharedMemory<u32>,
    mi_s: &mut SharedMemory<f32>,
    zi_s: &mut SharedMemory<f32>,
    kstart: usize,
    t0: usize,
    n: usize,
    mem: usize,
    fine: usize,
    #[comptime] t: Tiling,
) {
    let nt = t.threads;
    let tid = UNIT_POS as usize;
    let pf = t.pf;
    let sg = t.sg;
    let kk = t.topk;
    let ns = comptime!(t.gq / t.sg);
    let nfb = comptime!(t.kc / t.pf);
    let irows = comptime!(t.imp_rows());
    let inv = comptime!(1.0f32 / (t.sg * t.pf) as f32);
    let ps = comptime!(t.ps());
    if kstart >= mem {
        let first = (kstart - mem) / pf;
        let mut e = tid;
        while e < irows * nfb {
            let ir = e / nfb;
            let fb = e % nfb;
            let r0 = (ir / ns) * t.gq + (ir % ns) * sg;
            let mut sum = 0.0f32;
            for hh in 0..sg {
                for c in 0..pf {
                    sum += p_s[(r0 + hh) * ps + fb * pf + c];
                }
            }
            fs_s[e] = sum * inv;
            e += nt;
        }
        sync_cube();
        let mut ir = tid;
        while ir < irows {
            let tt = t0 + ir / ns;
            for fb in 0..nfb {
                let j = first + fb;
                if tt < n && j < fine && (j + 1) * t.sel <= tt {
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

/// `delta = rowsum(dout * out)` in f32, one unit per row `[b, h, n]`.
#[cube(launch_unchecked)]
pub fn attn_delta<F: Float>(
    out: &Tensor<F>,
    dout: &Tensor<F>,
    delta: &mut Tensor<f32>,
    rows: usize,
    #[comptime] d: usize,
    #[define(F)] _dtype: StorageType,
) {
    let r = ABSOLUTE_POS;
    if r < rows {
        let mut s = 0.0f32;
        for dd in 0..d {
            s += f32::cast_from(out[r * d + dd]) * f32::cast_from(dout[r * d + dd]);
        }
        delta[r] = s;
    }
}

/// One unit's register tile of the two score products of the backward: `dot = q · kᵀ` and
/// `dp = dout · vᵀ` for rows `rg * qr ..` and keys `kg + kgroups * jj` (shared tiles with row
/// stride `d + 1`). `dot` and `dp` hold `qr × qk` values, row-major.
#[cube]
#[allow(clippy::too_many_arguments)]
fn dual_score_tile(
    q_s: &SharedMemory<f32>,
    do_s: &SharedMemory<f32>,
    k_s: &SharedMemory<f32>,
    v_s: &SharedMemory<f32>,
    rg: usize,
    kg: usize,
    dot: &mut Array<f32>,
    dp: &mut Array<f32>,
    #[comptime] t: Tiling,
) {
    let d = t.d;
    let ds = comptime!(t.d + 1);
    let qr = t.qr;
    let qk = t.qk;
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    #[unroll]
    for i in 0..sn {
        dot[i] = 0.0;
        dp[i] = 0.0;
    }
    for dd in 0..d {
        let mut kreg = Array::<f32>::new(qk);
        let mut vreg = Array::<f32>::new(qk);
        #[unroll]
        for jj in 0..qk {
            kreg[jj] = k_s[(kg + kgroups * jj) * ds + dd];
            vreg[jj] = v_s[(kg + kgroups * jj) * ds + dd];
        }
        #[unroll]
        for i in 0..qr {
            let qv = q_s[(rg * qr + i) * ds + dd];
            let ov = do_s[(rg * qr + i) * ds + dd];
            #[unroll]
            for jj in 0..qk {
                dot[i * qk + jj] += qv * kreg[jj];
                dp[i * qk + jj] += ov * vreg[jj];
            }
        }
    }
}

/// Backward, query-centric: `dq` (and `dgates` `[b, hs, n, count]` when gated). Same grid
/// as [`attn_fwd`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd_dq<F: Float, I: Int, H: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    idx: &Tensor<I>,
    gates: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    dgates: &mut Tensor<F>,
    n: usize,
    nk: usize,
    h: usize,
    kvh: usize,
    count: usize,
    span: usize,
    mem: usize,
    scale: f32,
    #[comptime] t: Tiling,
    #[define(F, I, H)] _dtypes: [StorageType; 3],
) {
    let d = t.d;
    let kc = t.kc;
    let gq = t.gq;
    let rows = comptime!(t.tq * t.gq);
    let nt = t.threads;
    let ds = comptime!(t.d + 1);
    let ps = comptime!(t.kc + 1);
    // tensor-core path: tile strides; scores at word 0 of `buf`, `dO Vᵀ` at `dpo`
    // (stride `as_`), each chunk's `dS K` over both (stride `os`)
    let hst = comptime!(tile_stride(t.d));
    let kf = comptime!(depth(t.hb));
    let hp = comptime!(tile_stride(t.kc));
    let as_ = comptime!(acc_stride(t.kc));
    let os = comptime!(acc_stride(t.d));
    let dpo = comptime!(t.rows() * acc_stride(t.kc));
    let qr = t.qr;
    let qk = t.qk;
    let pr = t.pr;
    let pd = t.pd;
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    let dgroups = comptime!(t.d / t.pd);
    let stiles = comptime!(if t.mma { 0 } else { t.score_tiles() });
    let otiles = comptime!(t.out_tiles());
    let oper = comptime!(t.out_tiles().div_ceil(t.threads));
    let accn = comptime!(t.out_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let subs = comptime!(t.sel.div_ceil(t.kc));
    let tid = UNIT_POS as usize;
    let t0 = CUBE_POS_X as usize * t.tq;
    let groups = h / gq;
    let b = CUBE_POS_Y as usize / groups;
    let hg = CUBE_POS_Y as usize % groups;
    let kvhead = (hg * gq) / t.gk;
    let sel_row = (b * groups + hg) * n + t0;

    let rd = comptime!(if t.mma { 1 } else { t.rows() * (t.d + 1) });
    let kd = comptime!(if t.mma { 1 } else { t.kc * (t.d + 1) });
    let rk = comptime!(if t.mma { 1 } else { t.rows() * (t.kc + 1) });
    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut do_s = SharedMemory::<f32>::new(rd);
    let mut k_s = SharedMemory::<f32>::new(kd);
    let mut v_s = SharedMemory::<f32>::new(kd);
    let mut ds_s = SharedMemory::<f32>::new(rk);
    let mut raw_s = SharedMemory::<f32>::new(rk);
    let hq = comptime!(if t.mma {
        t.rows() * tile_stride(t.d)
    } else {
        1
    });
    let hkv = comptime!(if t.mma { t.kc * tile_stride(t.d) } else { 1 });
    let hpn = comptime!(if t.mma {
        t.rows() * tile_stride(t.kc)
    } else {
        1
    });
    let bw = comptime!(if t.mma { t.dq_words() } else { 1 });
    let mut q_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut do_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut k_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut ds_h = SharedMemory::<H>::new_aligned(hpn, 128usize);
    let mut buf = SharedMemory::<f32>::new_aligned(bw, 128usize);
    let mut lse_s = SharedMemory::<f32>::new(rows);
    let mut dl_s = SharedMemory::<f32>::new(rows);

    let mut e = tid;
    while e < rows * d {
        let r = e / d;
        let tt = t0 + r / gq;
        let head = hg * gq + r % gq;
        let mut qv = 0.0f32;
        let mut dv = 0.0f32;
        if tt < n {
            let off = ((b * h + head) * n + tt) * d + e % d;
            qv = f32::cast_from(q[off]) * scale;
            dv = f32::cast_from(dout[off]);
        }
        if t.mma {
            q_h[r * hst + e % d] = H::cast_from(qv);
            do_h[r * hst + e % d] = H::cast_from(dv);
        } else {
            q_s[r * ds + e % d] = qv;
            do_s[r * ds + e % d] = dv;
        }
        e += nt;
    }
    let mut r = tid;
    while r < rows {
        let tt = t0 + r / gq;
        let head = hg * gq + r % gq;
        let mut l = 0.0f32;
        let mut dl = 0.0f32;
        if tt < n {
            l = lse[(b * h + head) * n + tt];
            dl = delta[(b * h + head) * n + tt];
        }
        lse_s[r] = l;
        dl_s[r] = dl;
        r += nt;
    }
    let mut acc = Array::<f32>::new(accn);
    #[unroll]
    for i in 0..accn {
        acc[i] = 0.0;
    }
    let mut dgate = 0.0f32;
    sync_cube();

    let chunks = chunk_count(t0, n, nk, count, span, mem, t);
    for ci in 0..chunks {
        let (kstart, slot_ok, own, gate, left, slot) =
            chunk_at::<F, I>(ci, t0, sel_row, idx, gates, count, span, mem, t);

        let mut e = tid;
        while e < kc * d {
            let j = e / d;
            let p = kstart + j;
            let mut kv = 0.0f32;
            let mut vv = 0.0f32;
            if p < nk && slot_ok && j < left {
                let off = ((b * kvh + kvhead) * nk + p) * d + e % d;
                kv = f32::cast_from(k[off]);
                vv = f32::cast_from(v[off]);
            }
            if t.mma {
                k_h[j * hst + e % d] = H::cast_from(kv);
                v_h[j * hst + e % d] = H::cast_from(vv);
            } else {
                k_s[j * ds + e % d] = kv;
                v_s[j * ds + e % d] = vv;
            }
            e += nt;
        }
        sync_cube();

        if t.mma {
            // scores and `dO Vᵀ` on tensor cores, then `dS · gate` as `H`
            mma_tiles::<H>(
                &q_h, &k_h, &mut buf, rows, kc, d, hst, hst, as_, 0usize, false, true, kf,
            );
            mma_tiles::<H>(
                &do_h, &v_h, &mut buf, rows, kc, d, hst, hst, as_, dpo, false, true, kf,
            );
            sync_cube();
            let mut e = tid;
            while e < rows * kc {
                let r = e / kc;
                let j = e % kc;
                let tt = t0 + r / gq;
                let mut dsv = 0.0f32;
                if tt < n
                    && visible(
                        kstart + j,
                        tt,
                        nk,
                        span,
                        mem,
                        own,
                        slot_ok,
                        j < left,
                        t.mode,
                    )
                {
                    let p = (buf[r * as_ + j] * gate - lse_s[r]).exp();
                    dsv = p * (buf[dpo + r * as_ + j] - dl_s[r]);
                }
                ds_h[r * hp + j] = H::cast_from(dsv * gate);
                e += nt;
            }
            sync_cube();
            // the chunk's `dS K` over the scores (read by now)
            mma_tiles::<H>(
                &ds_h, &k_h, &mut buf, rows, d, kc, hp, hst, os, 0usize, false, false, kf,
            );
            sync_cube();
            let otiles = comptime!(t.out_tiles());
            add_tiles(&buf, &mut acc, otiles, t);
        }

        // scores and their gradients in `qr × qk` register tiles (as in the forward)
        let mut g = tid;
        while g < stiles {
            let rg = g / kgroups;
            let kg = g % kgroups;
            let mut dot = Array::<f32>::new(sn);
            let mut dp = Array::<f32>::new(sn);
            dual_score_tile(&q_s, &do_s, &k_s, &v_s, rg, kg, &mut dot, &mut dp, t);
            #[unroll]
            for i in 0..qr {
                let r = rg * qr + i;
                let tt = t0 + r / gq;
                #[unroll]
                for jj in 0..qk {
                    let j = kg + kgroups * jj;
                    let mut dsv = 0.0f32;
                    let mut raw = 0.0f32;
                    if tt < n
                        && visible(
                            kstart + j,
                            tt,
                            nk,
                            span,
                            mem,
                            own,
                            slot_ok,
                            j < left,
                            t.mode,
                        )
                    {
                        let p = (dot[i * qk + jj] * gate - lse_s[r]).exp();
                        dsv = p * (dp[i * qk + jj] - dl_s[r]);
                        raw = dot[i * qk + jj];
                    }
                    ds_s[r * ps + j] = dsv;
                    raw_s[r * ps + j] = raw;
                }
            }
            g += nt;
        }
        sync_cube();

        // dq tiles: rows `rg * pr ..`, dims `dg + dgroups * u`
        #[unroll]
        for it in 0..oper {
            let g = tid + it * nt;
            if g < otiles {
                let rg = g / dgroups;
                let dg = g % dgroups;
                let base = it * pr * pd;
                let kv_steps = comptime!(if t.mma { 0 } else { t.kc });
                for j in 0..kv_steps {
                    let mut kreg = Array::<f32>::new(pd);
                    #[unroll]
                    for u in 0..pd {
                        kreg[u] = k_s[j * ds + dg + dgroups * u] * gate;
                    }
                    #[unroll]
                    for i in 0..pr {
                        let dsv = ds_s[(rg * pr + i) * ps + j];
                        #[unroll]
                        for u in 0..pd {
                            acc[base + i * pd + u] += dsv * kreg[u];
                        }
                    }
                }
            }
        }
        if t.mode == SELECTED && t.gated {
            if tid == 0 && !own {
                for r in 0..rows {
                    for j in 0..kc {
                        dgate += ds_s[r * ps + j] * raw_s[r * ps + j];
                    }
                }
                if ci % subs == subs - 1 {
                    dgates[sel_row * count + slot] = F::cast_from(dgate);
                    dgate = 0.0;
                }
            }
        }
        sync_cube();
    }

    #[unroll]
    for it in 0..oper {
        let g = tid + it * nt;
        if g < otiles {
            let rg = g / dgroups;
            let dg = g % dgroups;
            #[unroll]
            for i in 0..pr {
                let r = rg * pr + i;
                let tt = t0 + r / gq;
                let head = hg * gq + r % gq;
                if tt < n {
                    #[unroll]
                    for u in 0..pd {
                        let a = it * pr * pd + i * pd + u;
                        dq[((b * h + head) * n + tt) * d + dg + dgroups * u] =
                            F::cast_from(acc[a] * scale);
                    }
                }
            }
        }
    }
}

/// Backward, key-centric: `dk`, `dv` of one chunk of `kc` keys of one kv head. Grid: x = key
/// chunk (selected: `block * subs + sub`), y = `b * kvh + kv head`.
///
/// Selected mode reads the queries that chose each block from `offsets` / `entries` (see
/// [`csr_count`]); the own-block, sliding and compressed queries follow from the positions.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd_dkdv<F: Float, H: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    gates: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    offsets: &Tensor<u32>,
    entries: &Tensor<u32>,
    dk: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    splits: usize,
    len: usize,
    n: usize,
    nk: usize,
    h: usize,
    kvh: usize,
    count: usize,
    span: usize,
    mem: usize,
    scale: f32,
    #[comptime] t: Tiling,
    #[define(F, H)] _dtypes: [StorageType; 2],
) {
    let d = t.d;
    let kc = t.kc;
    let rows = comptime!(t.bwd_rows());
    let nt = t.threads;
    let ds = comptime!(t.d + 1);
    let pr = t.pr;
    let pd = t.pd;
    let dgroups = comptime!(t.d / t.pd);
    let atiles = comptime!(t.bwd_acc_tiles());
    let aper = comptime!(t.bwd_acc_tiles().div_ceil(t.threads));
    let accn = comptime!(t.bwd_acc_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let tid = UNIT_POS as usize;
    let b = CUBE_POS_Y as usize / kvh;
    let kvhead = CUBE_POS_Y as usize % kvh;
    // the queries of a chunk are shared by `splits` cubes; each writes its partial sums to its
    // own slice of `dk` / `dv` (`[splits, b, kvh, nk, d]`, summed by `sum_splits`)
    let cid = CUBE_POS_X as usize / splits;
    let sp = CUBE_POS_X as usize % splits;

    let mut kstart = cid * kc;
    let mut left = kc.runtime();
    let mut block = 0usize;
    if t.mode == SELECTED {
        let subs = comptime!(t.sel.div_ceil(t.kc));
        block = cid / subs;
        let sub = cid % subs;
        kstart = block * t.sel + sub * kc;
        left = t.sel - sub * kc;
    }

    // f32 tiles of the scalar path, ones of element `H` of the tensor-core path (one word
    // each on the other path)
    let hst = comptime!(tile_stride(t.d));
    let kd = comptime!(if t.mma { 1 } else { t.kc * (t.d + 1) });
    let rd = comptime!(if t.mma { 1 } else { t.bwd_rows() * (t.d + 1) });
    let rk = comptime!(if t.mma { 1 } else { t.bwd_rows() * (t.kc + 1) });
    let mut k_s = SharedMemory::<f32>::new(kd);
    let mut v_s = SharedMemory::<f32>::new(kd);
    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut do_s = SharedMemory::<f32>::new(rd);
    let mut p_s = SharedMemory::<f32>::new(rk);
    let mut ds_s = SharedMemory::<f32>::new(rk);
    let hkv = comptime!(if t.mma { t.kc * tile_stride(t.d) } else { 1 });
    let hq = comptime!(if t.mma {
        t.bwd_rows() * tile_stride(t.d)
    } else {
        1
    });
    let hpn = comptime!(if t.mma {
        t.bwd_rows() * tile_stride(t.kc)
    } else {
        1
    });
    let bw = comptime!(if t.mma { t.dkdv_words() } else { 1 });
    let mut k_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut q_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut do_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut p_h = SharedMemory::<H>::new_aligned(hpn, 128usize);
    let mut ds_h = SharedMemory::<H>::new_aligned(hpn, 128usize);
    let mut buf = SharedMemory::<f32>::new_aligned(bw, 128usize);
    let mut lse_s = SharedMemory::<f32>::new(rows);
    let mut dl_s = SharedMemory::<f32>::new(rows);
    let mut gate_s = SharedMemory::<f32>::new(rows);
    // query position of each row, and whether the row is live
    let mut pos_s = SharedMemory::<u32>::new(rows);
    let mut live_s = SharedMemory::<u32>::new(rows);
    // selected phase: the row's `(b * h + head) * n + tt`, decoded once from its entry
    let mut row_s = SharedMemory::<u32>::new(rows);

    let mut e = tid;
    while e < kc * d {
        let j = e / d;
        let p = kstart + j;
        let mut kv = 0.0f32;
        let mut vv = 0.0f32;
        if p < nk && j < left {
            let off = ((b * kvh + kvhead) * nk + p) * d + e % d;
            kv = f32::cast_from(k[off]);
            vv = f32::cast_from(v[off]);
        }
        if t.mma {
            k_h[j * hst + e % d] = H::cast_from(kv);
            v_h[j * hst + e % d] = H::cast_from(vv);
        } else {
            k_s[j * ds + e % d] = kv;
            v_s[j * ds + e % d] = vv;
        }
        e += nt;
    }
    let mut dk_acc = Array::<f32>::new(accn);
    let mut dv_acc = Array::<f32>::new(accn);
    #[unroll]
    for i in 0..accn {
        dk_acc[i] = 0.0;
        dv_acc[i] = 0.0;
    }

    // 1. selected mode: the queries that chose this block
    if t.mode == SELECTED {
        let nb = (nk + t.sel - 1) / t.sel;
        let hs = h / t.gq;
        let seg = (b * kvh + kvhead) * nb + block;
        let first = offsets[seg] as usize;
        let last = offsets[seg + 1] as usize;
        let share = (last - first + splits - 1) / splits;
        let mut start = first + sp * share;
        let mut end = start + share;
        if end > last {
            end = last;
        }
        if start > end {
            start = end;
        }
        // `epb` entries per batch, `gq` rows (heads) each
        let epb = comptime!(t.bwd_rows() / t.gq);
        let batches = (end - start + epb - 1) / epb;
        for bi in 0..batches {
            sync_cube();
            let e0 = start + bi * epb;
            let mut r = tid;
            while r < rows {
                let ei = e0 + r / t.gq;
                let live = r < comptime!(t.bwd_rows() / t.gq * t.gq) && ei < end;
                let mut l = 0.0f32;
                let mut dl = 0.0f32;
                let mut gate = 1.0f32;
                let mut tt = 0usize;
                let mut row = 0usize;
                if live {
                    let ent = entries[ei] as usize;
                    let slot = ent % count;
                    tt = (ent / count) % n;
                    let hsel = ent / (count * n);
                    let head = hsel * t.gq + r % t.gq;
                    row = (b * h + head) * n + tt;
                    l = lse[row];
                    dl = delta[row];
                    if t.gated {
                        gate = f32::cast_from(gates[((b * hs + hsel) * n + tt) * count + slot]);
                    }
                }
                lse_s[r] = l;
                dl_s[r] = dl;
                gate_s[r] = gate;
                pos_s[r] = tt as u32;
                let mut lv = 0u32;
                if live {
                    lv = 1u32;
                }
                live_s[r] = lv;
                row_s[r] = row as u32;
                r += nt;
            }
            sync_cube();
            let mut e = tid;
            while e < rows * d {
                let r = e / d;
                let mut qv = 0.0f32;
                let mut dv = 0.0f32;
                if live_s[r] == 1 {
                    let off = (row_s[r] as usize) * d + e % d;
                    qv = f32::cast_from(q[off]) * scale;
                    dv = f32::cast_from(dout[off]);
                }
                if t.mma {
                    q_h[r * hst + e % d] = H::cast_from(qv);
                    do_h[r * hst + e % d] = H::cast_from(dv);
                } else {
                    q_s[r * ds + e % d] = qv;
                    do_s[r * ds + e % d] = dv;
                }
                e += nt;
            }
            sync_cube();
            if t.mma {
                accumulate_batch_mma::<H>(
                    &k_h,
                    &v_h,
                    &q_h,
                    &do_h,
                    &mut p_h,
                    &mut ds_h,
                    &mut buf,
                    &lse_s,
                    &dl_s,
                    &gate_s,
                    &pos_s,
                    &live_s,
                    &mut dk_acc,
                    &mut dv_acc,
                    kstart,
                    left,
                    nk,
                    span,
                    mem,
                    false,
                    t,
                );
            } else {
                accumulate_batch(
                    &k_s,
                    &v_s,
                    &q_s,
                    &do_s,
                    &mut p_s,
                    &mut ds_s,
                    &lse_s,
                    &dl_s,
                    &gate_s,
                    &pos_s,
                    &live_s,
                    &mut dk_acc,
                    &mut dv_acc,
                    kstart,
                    left,
                    nk,
                    span,
                    mem,
                    false,
                    t,
                );
            }
        }
    }

    // 2. queries by position: own block (selected), window (sliding), later queries
    // (compressed); `tq` positions × `gk` heads per batch
    let gk = t.gk;
    let mut qstart = 0usize;
    let mut qend = n;
    if t.mode == SELECTED {
        qstart = block * t.sel;
        qend = qstart + t.sel;
    } else if t.mode == SLIDING {
        qstart = kstart;
        qend = kstart + kc + span;
    } else if kstart >= mem {
        qstart = (kstart + 1 - mem) * span;
    }
    if qend > n {
        qend = n;
    }
    if qstart > qend {
        qstart = qend;
    }
    if t.mode == SELECTED {
        // the own block's queries: the first split only
        if sp > 0 {
            qend = qstart;
        }
    } else {
        let share = (qend - qstart + splits - 1) / splits;
        let lo = qstart + sp * share;
        let mut hi = lo + share;
        if hi > qend {
            hi = qend;
        }
        qstart = lo;
        if qstart > hi {
            qstart = hi;
        }
        qend = hi;
    }
    let batches = (qend - qstart + t.tq - 1) / t.tq;
    for bi in 0..batches {
        sync_cube();
        let tb = qstart + bi * t.tq;
        let mut r = tid;
        while r < rows {
            let tt = tb + r / gk;
            let head = kvhead * gk + r % gk;
            let live = r < comptime!(t.tq * t.gk) && tt < qend;
            let mut l = 0.0f32;
            let mut dl = 0.0f32;
            if live {
                l = lse[(b * h + head) * n + tt];
                dl = delta[(b * h + head) * n + tt];
            }
            lse_s[r] = l;
            dl_s[r] = dl;
            gate_s[r] = 1.0;
            pos_s[r] = tt as u32;
            let mut lv = 0u32;
            if live {
                lv = 1u32;
            }
            live_s[r] = lv;
            r += nt;
        }
        let mut e = tid;
        while e < rows * d {
            let r = e / d;
            let tt = tb + r / gk;
            let mut qv = 0.0f32;
            let mut dv = 0.0f32;
            if r < comptime!(t.tq * t.gk) && tt < qend {
                let head = kvhead * gk + r % gk;
                let off = ((b * h + head) * n + tt) * d + e % d;
                qv = f32::cast_from(q[off]) * scale;
                dv = f32::cast_from(dout[off]);
            }
            if t.mma {
                q_h[r * hst + e % d] = H::cast_from(qv);
                do_h[r * hst + e % d] = H::cast_from(dv);
            } else {
                q_s[r * ds + e % d] = qv;
                do_s[r * ds + e % d] = dv;
            }
            e += nt;
        }
        sync_cube();
        if t.mma {
            accumulate_batch_mma::<H>(
                &k_h,
                &v_h,
                &q_h,
                &do_h,
                &mut p_h,
                &mut ds_h,
                &mut buf,
                &lse_s,
                &dl_s,
                &gate_s,
                &pos_s,
                &live_s,
                &mut dk_acc,
                &mut dv_acc,
                kstart,
                left,
                nk,
                span,
                mem,
                true,
                t,
            );
        } else {
            accumulate_batch(
                &k_s,
                &v_s,
                &q_s,
                &do_s,
                &mut p_s,
                &mut ds_s,
                &lse_s,
                &dl_s,
                &gate_s,
                &pos_s,
                &live_s,
                &mut dk_acc,
                &mut dv_acc,
                kstart,
                left,
                nk,
                span,
                mem,
                true,
                t,
            );
        }
    }

    #[unroll]
    for it in 0..aper {
        let g = tid + it * nt;
        if g < atiles {
            let kg = g / dgroups;
            let dg = g % dgroups;
            #[unroll]
            for i in 0..pr {
                let j = kg * pr + i;
                let p = kstart + j;
                if p < nk && j < left {
                    #[unroll]
                    for u in 0..pd {
                        let off = sp * len + ((b * kvh + kvhead) * nk + p) * d + dg + dgroups * u;
                        let a = it * pr * pd + i * pd + u;
                        dk[off] = dk_acc[a];
                        dv[off] = dv_acc[a];
                    }
                }
            }
        }
    }
}

/// One batch of rows against the cube's key chunk: probabilities and score gradients into
/// shared memory (`qr × qk` register tiles), then `dk += ds · q`, `dv += p · dout` for the
/// `pr × pd` (keys × dims) tiles this unit owns.
/// `by_position`: rows are own-block / window / compressed queries (masked by position);
/// otherwise selected-block rows (every key of the block is visible).
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_batch(
    k_s: &SharedMemory<f32>,
    v_s: &SharedMemory<f32>,
    q_s: &SharedMemory<f32>,
    do_s: &SharedMemory<f32>,
    p_s: &mut SharedMemory<f32>,
    ds_s: &mut SharedMemory<f32>,
    lse_s: &SharedMemory<f32>,
    dl_s: &SharedMemory<f32>,
    gate_s: &SharedMemory<f32>,
    pos_s: &SharedMemory<u32>,
    live_s: &SharedMemory<u32>,
    dk_acc: &mut Array<f32>,
    dv_acc: &mut Array<f32>,
    kstart: usize,
    left: usize,
    nk: usize,
    span: usize,
    mem: usize,
    by_position: bool,
    #[comptime] t: Tiling,
) {
    let rows = comptime!(t.bwd_rows());
    let nt = t.threads;
    let ds = comptime!(t.d + 1);
    let ps = comptime!(t.kc + 1);
    let qr = t.qr;
    let qk = t.qk;
    let pr = t.pr;
    let pd = t.pd;
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    let dgroups = comptime!(t.d / t.pd);
    let stiles = comptime!(t.bwd_score_tiles());
    let atiles = comptime!(t.bwd_acc_tiles());
    let aper = comptime!(t.bwd_acc_tiles().div_ceil(t.threads));
    let tid = UNIT_POS as usize;

    // scores and score gradients: unit tile `g` = rows `rg * qr ..`, keys `kg + kgroups * jj`
    let mut g = tid;
    while g < stiles {
        let rg = g / kgroups;
        let kg = g % kgroups;
        let mut dot = Array::<f32>::new(sn);
        let mut dp = Array::<f32>::new(sn);
        dual_score_tile(q_s, do_s, k_s, v_s, rg, kg, &mut dot, &mut dp, t);
        #[unroll]
        for i in 0..qr {
            let r = rg * qr + i;
            let tt = pos_s[r] as usize;
            let gate = gate_s[r];
            let lse = lse_s[r];
            let dl = dl_s[r];
            let live = live_s[r] == 1;
            #[unroll]
            for jj in 0..qk {
                let j = kg + kgroups * jj;
                let p = kstart + j;
                let mut ok = live && p < nk && j < left;
                if by_position {
                    ok = ok && visible(p, tt, nk, span, mem, true, true, true, t.mode);
                }
                let mut prob = 0.0f32;
                let mut dsv = 0.0f32;
                if ok {
                    prob = (dot[i * qk + jj] * gate - lse).exp();
                    dsv = prob * (dp[i * qk + jj] - dl) * gate;
                }
                p_s[r * ps + j] = prob;
                ds_s[r * ps + j] = dsv;
            }
        }
        g += nt;
    }
    sync_cube();

    // accumulators: unit tile = keys `kg * pr ..`, dims `dg + dgroups * u`
    #[unroll]
    for it in 0..aper {
        let g = tid + it * nt;
        if g < atiles {
            let kg = g / dgroups;
            let dg = g % dgroups;
            let base = it * pr * pd;
            for r in 0..rows {
                let mut qreg = Array::<f32>::new(pd);
                let mut oreg = Array::<f32>::new(pd);
                #[unroll]
                for u in 0..pd {
                    qreg[u] = q_s[r * ds + dg + dgroups * u];
                    oreg[u] = do_s[r * ds + dg + dgroups * u];
                }
                #[unroll]
                for i in 0..pr {
                    let j = kg * pr + i;
                    let dsv = ds_s[r * ps + j];
                    let pv = p_s[r * ps + j];
                    #[unroll]
                    for u in 0..pd {
                        dk_acc[base + i * pd + u] += dsv * qreg[u];
                        dv_acc[base + i * pd + u] += pv * oreg[u];
                    }
                }
            }
        }
    }
}

/// [`accumulate_batch`] on tensor cores: scores and `dO Vᵀ` into `buf`, probabilities and
/// score gradients as `H`, then `Pᵀ dO` and `dSᵀ Q` (the transposed operands read
/// from the `[rows, kc]` tiles) through `buf` into the unit's accumulators.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_batch_mma<H: Float>(
    k_h: &SharedMemory<H>,
    v_h: &SharedMemory<H>,
    q_h: &SharedMemory<H>,
    do_h: &SharedMemory<H>,
    p_h: &mut SharedMemory<H>,
    ds_h: &mut SharedMemory<H>,
    buf: &mut SharedMemory<f32>,
    lse_s: &SharedMemory<f32>,
    dl_s: &SharedMemory<f32>,
    gate_s: &SharedMemory<f32>,
    pos_s: &SharedMemory<u32>,
    live_s: &SharedMemory<u32>,
    dk_acc: &mut Array<f32>,
    dv_acc: &mut Array<f32>,
    kstart: usize,
    left: usize,
    nk: usize,
    span: usize,
    mem: usize,
    by_position: bool,
    #[comptime] t: Tiling,
) {
    let rows = comptime!(t.bwd_rows());
    let kc = t.kc;
    let d = t.d;
    let nt = t.threads;
    let hst = comptime!(tile_stride(t.d));
    let kf = comptime!(depth(t.hb));
    let hp = comptime!(tile_stride(t.kc));
    let as_ = comptime!(acc_stride(t.kc));
    let os = comptime!(acc_stride(t.d));
    let dpo = comptime!(t.bwd_rows() * acc_stride(t.kc));
    let tid = UNIT_POS as usize;

    mma_tiles::<H>(
        q_h, k_h, buf, rows, kc, d, hst, hst, as_, 0usize, false, true, kf,
    );
    mma_tiles::<H>(
        do_h, v_h, buf, rows, kc, d, hst, hst, as_, dpo, false, true, kf,
    );
    sync_cube();
    let mut e = tid;
    while e < rows * kc {
        let r = e / kc;
        let j = e % kc;
        let p = kstart + j;
        let tt = pos_s[r] as usize;
        let gate = gate_s[r];
        let mut ok = live_s[r] == 1 && p < nk && j < left;
        if by_position {
            ok = ok && visible(p, tt, nk, span, mem, true, true, true, t.mode);
        }
        let mut prob = 0.0f32;
        let mut dsv = 0.0f32;
        if ok {
            prob = (buf[r * as_ + j] * gate - lse_s[r]).exp();
            dsv = prob * (buf[dpo + r * as_ + j] - dl_s[r]) * gate;
        }
        p_h[r * hp + j] = H::cast_from(prob);
        ds_h[r * hp + j] = H::cast_from(dsv);
        e += nt;
    }
    sync_cube();
    // dv += Pᵀ dO, then dk += dSᵀ Q, each `[kc, d]` through `buf`
    let atiles = comptime!(t.bwd_acc_tiles());
    mma_tiles::<H>(
        p_h, do_h, buf, kc, d, rows, hp, hst, os, 0usize, true, false, kf,
    );
    sync_cube();
    add_tiles(buf, dv_acc, atiles, t);
    sync_cube();
    mma_tiles::<H>(
        ds_h, q_h, buf, kc, d, rows, hp, hst, os, 0usize, true, false, kf,
    );
    sync_cube();
    add_tiles(buf, dk_acc, atiles, t);
    sync_cube();
}

/// `acc += buf` for the unit's `pr × pd` register tiles of a `[x, d]` product in `buf`
/// (stride `acc_stride(d)`): tile `g` holds rows `(g / dgroups) * pr ..` and dims
/// `g % dgroups + dgroups * u`, `tiles` tiles strided over the units.
#[cube]
fn add_tiles(
    buf: &SharedMemory<f32>,
    acc: &mut Array<f32>,
    #[comptime] tiles: usize,
    #[comptime] t: Tiling,
) {
    let nt = t.threads;
    let os = comptime!(acc_stride(t.d));
    let pr = t.pr;
    let pd = t.pd;
    let dgroups = comptime!(t.d / t.pd);
    let per = comptime!(tiles.div_ceil(t.threads));
    let tid = UNIT_POS as usize;
    #[unroll]
    for it in 0..per {
        let g = tid + it * nt;
        if g < tiles {
            let x = g / dgroups;
            let dg = g % dgroups;
            let base = it * pr * pd;
            #[unroll]
            for i in 0..pr {
                #[unroll]
                for u in 0..pd {
                    acc[base + i * pd + u] += buf[(x * pr + i) * os + dg + dgroups * u];
                }
            }
        }
    }
}

/// `out[i] = sum over s of part[s * len + i]`, cast to the storage type: the dk/dv partial
/// sums of the split key chunks.
#[cube(launch_unchecked)]
pub fn sum_splits<F: Float>(
    part: &Tensor<f32>,
    out: &mut Tensor<F>,
    len: usize,
    splits: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < len {
        let mut s = 0.0f32;
        for sp in 0..splits {
            s += part[sp * len + i];
        }
        out[i] = F::cast_from(s);
    }
}

/// Fills a u32 buffer with zeros.
#[cube(launch_unchecked)]
pub fn fill_zero(buf: &mut Tensor<u32>, len: usize) {
    if ABSOLUTE_POS < len {
        buf[ABSOLUTE_POS] = 0;
    }
}

/// Counts, per `(batch, kv head, block)`, the valid selections `idx` `[b, hs, n, count]` point
/// at (`gq` query heads per selection head, `gk` per kv head, `nb` blocks).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn csr_count<I: Int>(
    idx: &Tensor<I>,
    counts: &mut Tensor<Atomic<u32>>,
    total: usize,
    n: usize,
    hs: usize,
    kvh: usize,
    count: usize,
    nb: usize,
    #[comptime] gq: usize,
    #[comptime] gk: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = ABSOLUTE_POS;
    if at < total {
        let blk = i32::cast_from(idx[at]);
        if blk >= 0 {
            let hsel = (at / (count * n)) % hs;
            let b = at / (count * n * hs);
            let kvhead = (hsel * gq) / gk;
            counts[(b * kvh + kvhead) * nb + usize::cast_from(blk)].fetch_add(1u32);
        }
    }
}

/// Exclusive prefix sum of `counts` (`len` values) into `offsets` (`len + 1`), one cube.
#[cube(launch_unchecked)]
pub fn csr_scan(
    counts: &Tensor<u32>,
    offsets: &mut Tensor<u32>,
    len: usize,
    #[comptime] threads: usize,
) {
    let tid = UNIT_POS as usize;
    let mut part = SharedMemory::<u32>::new(threads);
    let per = (len + threads - 1) / threads;
    let start = tid * per;
    let mut s = 0u32;
    for i in 0..per {
        if start + i < len {
            s += counts[start + i];
        }
    }
    part[tid] = s;
    sync_cube();
    if tid == 0 {
        let mut run = 0u32;
        for i in 0..threads {
            let c = part[i];
            part[i] = run;
            run += c;
        }
        offsets[len] = run;
    }
    sync_cube();
    let mut run = part[tid];
    for i in 0..per {
        if start + i < len {
            offsets[start + i] = run;
            run += counts[start + i];
        }
    }
}

/// Writes, for every valid selection, its entry `(hsel * n + t) * count + slot` into the
/// segment of its `(batch, kv head, block)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn csr_fill<I: Int>(
    idx: &Tensor<I>,
    offsets: &Tensor<u32>,
    cursor: &mut Tensor<Atomic<u32>>,
    entries: &mut Tensor<u32>,
    total: usize,
    n: usize,
    hs: usize,
    kvh: usize,
    count: usize,
    nb: usize,
    #[comptime] gq: usize,
    #[comptime] gk: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = ABSOLUTE_POS;
    if at < total {
        let blk = i32::cast_from(idx[at]);
        if blk >= 0 {
            let hsel = (at / (count * n)) % hs;
            let b = at / (count * n * hs);
            let kvhead = (hsel * gq) / gk;
            let seg = (b * kvh + kvhead) * nb + usize::cast_from(blk);
            let slot = cursor[seg].fetch_add(1u32);
            let base = offsets[seg];
            entries[(base + slot) as usize] = (at % (count * n * hs)) as u32;
        }
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
