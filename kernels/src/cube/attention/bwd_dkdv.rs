//! The key-centric backward: `dk` and `dv` of a chunk of keys from batches of the queries
//! that see it ([`attn_bwd_dkdv`]; selected by block, also the queries' dq partials), and the
//! sum of the split partial results ([`sum_splits`]).

use cubecl::prelude::*;

use super::super::mma::{acc_stride, depth, mma_tiles, tile_stride};
use super::shared::{
    add_tiles, grad_pair, grid_x, load_kv, put, score_tile, unit_tile, visible, Keys,
};
use super::tiling::Tiling;
use super::{SELECTED, SLIDING};

/// The shared per-row values of a batch of rows: `lse`, `delta`, the gate, the query
/// position, whether the row is live (1) and (with the query-gradient partials) its partial's
/// row `row * slots + slot`.
#[derive(CubeType)]
struct RowStats {
    lse: SharedMemory<f32>,
    dl: SharedMemory<f32>,
    gate: SharedMemory<f32>,
    pos: SharedMemory<u32>,
    live: SharedMemory<u32>,
    dst: SharedMemory<u32>,
}

/// Backward, key-centric: `dk`, `dv` of one chunk of `kc` keys of one kv head. Grid: x = key
/// chunk (selected: `block * subs + sub`) × `splits`, y = `b * kvh + kv head`.
///
/// 1. Load the chunk's keys and values.
/// 2. Batches of rows: first (selected mode) the queries that chose the block, from `offsets`
///    / `entries` (see [`super::csr_count`]), `bwd_rows / group_heads` entries of `group_heads` heads each; then
///    the queries by position: own block (selected), window (sliding), later queries
///    (compressed), `tq` positions × `gk` heads each. Per batch: the rows' statistics, their
///    queries and output gradients, then [`accumulate_batch`].
/// 3. Write this split's partial `dk`, `dv` (`[splits, b, kvh, nk, d]`, f32).
///
/// With `dq_parts` (selected mode, ungated): also each row's share of the query gradient,
/// `scale · dS K` over this block, into `dq_part` `[b, h, n, slots, d]` at slot `slot` (entries)
/// or `slots - 1` (own block), for [`super::merge_parts`] to sum; the query-centric dq kernel
/// then does not run for the branch.
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
    dq_part: &mut Tensor<F>,
    splits: usize,
    slots: usize,
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
    #[comptime] dq_parts: bool,
    #[define(F, H)] _dtypes: [StorageType; 2],
) {
    let d = t.d;
    let kc = t.kc;
    let rows = comptime!(t.bwd_rows());
    let nt = t.threads;
    let pr = t.pr;
    let pd = t.pd;
    let dgroups = comptime!(t.d / t.pd);
    let atiles = comptime!(t.bwd_acc_tiles());
    let aper = comptime!(t.bwd_acc_tiles().div_ceil(t.threads));
    let accn = comptime!(t.bwd_acc_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let tid = UNIT_POS as usize;
    let ks = Keys {
        n,
        q0: 0,
        nk,
        span,
        mem,
    };
    let b = CUBE_POS_Y as usize / kvh;
    let kvhead = CUBE_POS_Y as usize % kvh;
    // the queries of a chunk are shared by `splits` cubes; each writes its partial sums to its
    // own slice of `dk` / `dv` (`[splits, b, kvh, nk, d]`, summed by `sum_splits`)
    let x = grid_x();
    let cid = x / splits;
    let sp = x % splits;
    let mut chunks = (nk + t.kc - 1) / t.kc;
    if t.mode == SELECTED {
        chunks = (nk + t.sel - 1) / t.sel * comptime!(t.sel.div_ceil(t.kc));
    }
    if cid >= chunks {
        // a padding cube of a folded grid
        terminate!();
    }

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
    let kd = comptime!(t.scalar_words(t.kc, t.d));
    let rd = comptime!(t.scalar_words(t.bwd_rows(), t.d));
    let rk = comptime!(t.scalar_words(t.bwd_rows(), t.kc));
    let mut k_s = SharedMemory::<f32>::new(kd);
    let mut v_s = SharedMemory::<f32>::new(kd);
    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut do_s = SharedMemory::<f32>::new(rd);
    let mut p_s = SharedMemory::<f32>::new(rk);
    let mut ds_s = SharedMemory::<f32>::new(rk);
    let hkv = comptime!(t.half_words(t.kc, t.d));
    let hq = comptime!(t.half_words(t.bwd_rows(), t.d));
    let hpn = comptime!(t.half_words(t.bwd_rows(), t.kc));
    let bw = comptime!(if t.mma { t.dkdv_words() } else { 1 });
    let mut k_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut q_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut do_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut p_h = SharedMemory::<H>::new_aligned(hpn, 128usize);
    let mut ds_h = SharedMemory::<H>::new_aligned(hpn, 128usize);
    let mut buf = SharedMemory::<f32>::new_aligned(bw, 128usize);
    let mut st = RowStats {
        lse: SharedMemory::<f32>::new(rows),
        dl: SharedMemory::<f32>::new(rows),
        gate: SharedMemory::<f32>::new(rows),
        pos: SharedMemory::<u32>::new(rows),
        live: SharedMemory::<u32>::new(rows),
        dst: SharedMemory::<u32>::new(comptime!(if dq_parts { t.bwd_rows() } else { 1 })),
    };

    // 1. keys and values
    let bkv = b * kvh + kvhead;
    load_kv::<F, H>(
        k, v, &mut k_s, &mut v_s, &mut k_h, &mut v_h, bkv, kstart, nk, true, left, t,
    );
    let mut dk_acc = Array::<f32>::new(accn);
    let mut dv_acc = Array::<f32>::new(accn);
    #[unroll]
    for i in 0..accn {
        dk_acc[i] = 0.0;
        dv_acc[i] = 0.0;
    }

    // 2a. selected mode: this split's share of the entries that chose the block, `epb`
    // entries per batch, `group_heads` rows (heads) each
    let epb = comptime!(t.bwd_rows() / t.group_heads);
    let mut start = 0usize;
    let mut end = 0usize;
    if t.mode == SELECTED {
        let nb = (nk + t.sel - 1) / t.sel;
        let mut seg = bkv * nb + block;
        if t.shared_all {
            // one list per batch for every kv head
            seg = b * nb + block;
        }
        let first = offsets[seg] as usize;
        let last = offsets[seg + 1] as usize;
        let share = (last - first + splits - 1) / splits;
        start = first + sp * share;
        end = start + share;
        if end > last {
            end = last;
        }
        if start > end {
            start = end;
        }
    }
    let sel_batches = (end - start + epb - 1) / epb;

    // 2b. queries by position, split like the entries
    let (qstart, qend) = position_range(kstart, block, sp, splits, &ks, t);
    let batches = sel_batches + (qend - qstart + t.tq - 1) / t.tq;
    for bi in 0..batches {
        sync_cube();
        let by_position = bi >= sel_batches;
        let batch = Batch {
            index: bi,
            by_position,
            selected: sel_batches,
            qstart,
            qend,
            start,
            end,
        };
        let mut r = tid;
        while r < rows {
            let (live, tt, row, slot, hsel) =
                batch_row(&batch, r, entries, &ks, b, h, kvhead, count, t);
            let mut gate = 1.0f32;
            if t.gated && live && !by_position {
                let hs = h / t.group_heads;
                gate = f32::cast_from(gates[((b * hs + hsel) * n + tt) * count + slot]);
            }
            let mut l = 0.0f32;
            let mut dl = 0.0f32;
            let mut lv = 0u32;
            if live {
                l = lse[row];
                dl = delta[row];
                lv = 1u32;
            }
            st.lse[r] = l;
            st.dl[r] = dl;
            st.gate[r] = gate;
            st.pos[r] = tt as u32;
            st.live[r] = lv;
            if dq_parts {
                let mut s = slot;
                if by_position {
                    s = slots - 1;
                }
                st.dst[r] = (row * slots + s) as u32;
            }
            r += nt;
        }
        // (the loads find their rows themselves: no barrier after the statistics)
        let mut e = tid;
        while e < rows * d {
            let r = e / d;
            let mut qv = 0.0f32;
            let mut dv = 0.0f32;
            let (live, _, row, _, _) = batch_row(&batch, r, entries, &ks, b, h, kvhead, count, t);
            if live {
                let off = row * d + e % d;
                qv = f32::cast_from(q[off]) * scale;
                dv = f32::cast_from(dout[off]);
            }
            put::<H>(&mut q_s, &mut q_h, r, e % d, qv, t);
            put::<H>(&mut do_s, &mut do_h, r, e % d, dv, t);
            e += nt;
        }
        sync_cube();
        accumulate_batch::<H>(
            &k_s,
            &v_s,
            &q_s,
            &do_s,
            &mut p_s,
            &mut ds_s,
            &k_h,
            &v_h,
            &q_h,
            &do_h,
            &mut p_h,
            &mut ds_h,
            &mut buf,
            &st,
            &mut dk_acc,
            &mut dv_acc,
            kstart,
            left,
            &ks,
            by_position,
            t,
        );
        if dq_parts {
            write_dq_part::<F, H>(&k_s, &k_h, &ds_s, &ds_h, &mut buf, &st, dq_part, scale, t);
        }
    }

    // 3. this split's dk, dv
    #[unroll]
    for it in 0..aper {
        let tile = unit_tile(it, atiles, t);
        if tile.live {
            #[unroll]
            for i in 0..pr {
                let j = tile.x0 + i;
                let p = kstart + j;
                if p < nk && j < left {
                    #[unroll]
                    for u in 0..pd {
                        let off = sp * len + (bkv * nk + p) * d + tile.dg + dgroups * u;
                        let a = tile.base + i * pd + u;
                        dk[off] = dk_acc[a];
                        dv[off] = dv_acc[a];
                    }
                }
            }
        }
    }
}

/// The batch's rows' share of the query gradient over this key chunk, `scale · dS K`, into
/// their partials' rows of `dq_part` (see [`attn_bwd_dkdv`]): on tensor cores through `buf`
/// (free after [`accumulate_batch`]), else one unit per element from the shared `dS` and `K`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_dq_part<F: Float, H: Float>(
    k_s: &SharedMemory<f32>,
    k_h: &SharedMemory<H>,
    ds_s: &SharedMemory<f32>,
    ds_h: &SharedMemory<H>,
    buf: &mut SharedMemory<f32>,
    st: &RowStats,
    dq_part: &mut Tensor<F>,
    scale: f32,
    #[comptime] t: Tiling,
) {
    let rows = comptime!(t.bwd_rows());
    let d = t.d;
    let kc = t.kc;
    let nt = t.threads;
    let tid = UNIT_POS as usize;
    if t.mma {
        let hst = comptime!(tile_stride(t.d));
        let kf = comptime!(depth(t.tile_bytes));
        let hp = comptime!(tile_stride(t.kc));
        let os = comptime!(acc_stride(t.d));
        mma_tiles::<H>(
            ds_h, k_h, buf, rows, d, kc, hp, hst, os, 0usize, false, false, kf,
        );
        sync_cube();
        let mut e = tid;
        while e < rows * d {
            let r = e / d;
            if st.live[r] == 1 {
                let at = st.dst[r] as usize * d + e % d;
                dq_part[at] = F::cast_from(buf[r * os + e % d] * scale);
            }
            e += nt;
        }
        sync_cube();
    } else {
        let ds = comptime!(t.d + 1);
        let ps = comptime!(t.kc + 1);
        let mut e = tid;
        while e < rows * d {
            let r = e / d;
            let c = e % d;
            if st.live[r] == 1 {
                let mut acc = 0.0f32;
                for j in 0..kc {
                    acc += ds_s[r * ps + j] * k_s[j * ds + c];
                }
                let at = st.dst[r] as usize * d + c;
                dq_part[at] = F::cast_from(acc * scale);
            }
            e += nt;
        }
    }
}

/// One batch of rows of the dk/dv kernel: batch `index`; the first `selected` batches take
/// the entries `start..end` that chose the block, the rest the positions `qstart..qend`.
#[derive(CubeType)]
pub(super) struct Batch {
    pub index: usize,
    pub by_position: bool,
    pub selected: usize,
    pub qstart: usize,
    pub qend: usize,
    pub start: usize,
    pub end: usize,
}

/// Row `r` of a batch: whether it is live, its position `t`, its row `(b * h + head) * n + t`
/// of `[b, h, n, ..]` tensors and, for an entry, its slot and selection head. By position:
/// `tq` positions × `gk` heads of the kv head; entries: `group_heads` heads each.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_row(
    batch: &Batch,
    r: usize,
    entries: &Tensor<u32>,
    ks: &Keys,
    b: usize,
    h: usize,
    kvhead: usize,
    count: usize,
    #[comptime] t: Tiling,
) -> (bool, usize, usize, usize, usize) {
    let n = ks.n;
    let mut live = false;
    let mut tt = 0usize;
    let mut row = 0usize;
    let mut slot = 0usize;
    let mut hsel = 0usize;
    if batch.by_position {
        tt = batch.qstart + (batch.index - batch.selected) * t.tq + r / t.gk;
        live = r < comptime!(t.tq * t.gk) && tt < batch.qend;
        row = (b * h + kvhead * t.gk + r % t.gk) * n + tt;
    } else {
        let epb = comptime!(t.bwd_rows() / t.group_heads);
        let ei = batch.start + batch.index * epb + r / t.group_heads;
        live = r < comptime!(t.bwd_rows() / t.group_heads * t.group_heads) && ei < batch.end;
        if live {
            let ent = entries[ei] as usize;
            slot = ent % count;
            tt = (ent / count) % n;
            hsel = ent / (count * n);
            if t.shared_all {
                row = (b * h + kvhead * t.gk + r % t.gk) * n + tt;
            } else {
                row = (b * h + hsel * t.group_heads + r % t.group_heads) * n + tt;
            }
        }
    }
    (live, tt, row, slot, hsel)
}

/// The query positions `[qstart, qend)` of split `sp` of `splits` that see the chunk at
/// `kstart` by position: the own block's (selected: the first split only), the window's
/// (sliding), the later queries (compressed).
#[cube]
fn position_range(
    kstart: usize,
    block: usize,
    sp: usize,
    splits: usize,
    ks: &Keys,
    #[comptime] t: Tiling,
) -> (usize, usize) {
    let mut qstart = 0usize;
    let mut qend = ks.n;
    if t.mode == SELECTED {
        qstart = block * t.sel;
        qend = qstart + t.sel;
    } else if t.mode == SLIDING {
        qstart = kstart;
        qend = kstart + t.kc + ks.span;
    } else if kstart >= ks.mem {
        qstart = (kstart + 1 - ks.mem) * ks.span;
    }
    if qend > ks.n {
        qend = ks.n;
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
    (qstart, qend)
}

/// Whether key `j` of the chunk at `kstart` (`left` keys in its block) counts for a row at
/// position `tt`: the row is live, the key exists, and, with `by_position` (own-block,
/// window or compressed rows), the query sees it (selected rows see every key of the block).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn key_ok(
    live: bool,
    tt: usize,
    j: usize,
    kstart: usize,
    left: usize,
    ks: &Keys,
    by_position: bool,
    #[comptime] t: Tiling,
) -> bool {
    let p = kstart + j;
    let mut ok = live && p < ks.nk && j < left;
    if by_position {
        ok = ok && visible(p, tt, ks.nk, ks.span, ks.mem, true, true, true, t.mode);
    }
    ok
}

/// One batch of rows against the cube's key chunk, `by_position` (own-block, window or
/// compressed rows, masked by position) or not (selected-block rows, every key of the block
/// visible). Scalar path: probabilities and score gradients into shared memory (`qr × qk`
/// register tiles), then `dk += ds · q`, `dv += p · dout` for the `pr × pd` (keys × dims)
/// tiles this unit owns. Tensor-core path: scores and `dO Vᵀ` into `buf`, probabilities and
/// score gradients as `H`, then `Pᵀ dO` and `dSᵀ Q` (the transposed operands read from the
/// `[rows, kc]` tiles) through `buf` into the unit's accumulators.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_batch<H: Float>(
    k_s: &SharedMemory<f32>,
    v_s: &SharedMemory<f32>,
    q_s: &SharedMemory<f32>,
    do_s: &SharedMemory<f32>,
    p_s: &mut SharedMemory<f32>,
    ds_s: &mut SharedMemory<f32>,
    k_h: &SharedMemory<H>,
    v_h: &SharedMemory<H>,
    q_h: &SharedMemory<H>,
    do_h: &SharedMemory<H>,
    p_h: &mut SharedMemory<H>,
    ds_h: &mut SharedMemory<H>,
    buf: &mut SharedMemory<f32>,
    st: &RowStats,
    dk_acc: &mut Array<f32>,
    dv_acc: &mut Array<f32>,
    kstart: usize,
    left: usize,
    ks: &Keys,
    by_position: bool,
    #[comptime] t: Tiling,
) {
    if t.mma {
        let rows = comptime!(t.bwd_rows());
        let kc = t.kc;
        let d = t.d;
        let nt = t.threads;
        let hst = comptime!(tile_stride(t.d));
        let kf = comptime!(depth(t.tile_bytes));
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
            let tt = st.pos[r] as usize;
            let ok = key_ok(st.live[r] == 1, tt, j, kstart, left, ks, by_position, t);
            let dot = buf[r * as_ + j];
            let dp = buf[dpo + r * as_ + j];
            let (prob, dsv) = grad_pair(dot, dp, st.gate[r], st.lse[r], st.dl[r], ok, true);
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
        add_tiles(buf, dv_acc, &st.lse, atiles, false, t);
        sync_cube();
        mma_tiles::<H>(
            ds_h, q_h, buf, kc, d, rows, hp, hst, os, 0usize, true, false, kf,
        );
        sync_cube();
        add_tiles(buf, dk_acc, &st.lse, atiles, false, t);
        sync_cube();
    } else {
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
            score_tile(q_s, do_s, k_s, v_s, rg, kg, &mut dot, &mut dp, true, t);
            #[unroll]
            for i in 0..qr {
                let r = rg * qr + i;
                let tt = st.pos[r] as usize;
                let gate = st.gate[r];
                let lse = st.lse[r];
                let dl = st.dl[r];
                let live = st.live[r] == 1;
                #[unroll]
                for jj in 0..qk {
                    let j = kg + kgroups * jj;
                    let ok = key_ok(live, tt, j, kstart, left, ks, by_position, t);
                    let (prob, dsv) =
                        grad_pair(dot[i * qk + jj], dp[i * qk + jj], gate, lse, dl, ok, true);
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
            let tile = unit_tile(it, atiles, t);
            if tile.live {
                for r in 0..rows {
                    let mut qreg = Array::<f32>::new(pd);
                    let mut oreg = Array::<f32>::new(pd);
                    #[unroll]
                    for u in 0..pd {
                        qreg[u] = q_s[r * ds + tile.dg + dgroups * u];
                        oreg[u] = do_s[r * ds + tile.dg + dgroups * u];
                    }
                    #[unroll]
                    for i in 0..pr {
                        let j = tile.x0 + i;
                        let dsv = ds_s[r * ps + j];
                        let pv = p_s[r * ps + j];
                        #[unroll]
                        for u in 0..pd {
                            dk_acc[tile.base + i * pd + u] += dsv * qreg[u];
                            dv_acc[tile.base + i * pd + u] += pv * oreg[u];
                        }
                    }
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
