//! The selected forward by key block ("KV-major"): one cube takes one selection block of one
//! kv head and the queries that chose it, so the block's keys and values are read once for all
//! of them ([`attn_fwd_blocks`]); each (query row, slot) gets a partial output normalised over
//! that block alone and its log-sum-exp, which [`merge_parts`] combines per row. No float
//! atomics: every partial has one writer, and the merge reads them in slot order.
//!
//! Dimensions as in [`super`], plus `slots = count + 1` (the selected blocks, then the own
//! block). Partials: `part_out` `[b, h, n, slots, d]` (the storage type), `part_lse`
//! `[b, h, n, slots]` (f32). The query-centric forward ([`super::attn_fwd`]) reads each
//! query's `count + 1` blocks itself (`group_heads` rows per cube); by block, a batch holds
//! `tq × gk` rows, which fill tensor-core fragments.
//!
//! The merge of partials `(o_s, l_s)` of one row is the log-sum-exp rule:
//! `lse = log Σ_s exp(l_s)`, `out = Σ_s exp(l_s − lse) · o_s`, over the valid slots.

use cubecl::prelude::*;

use super::super::mma::{acc_stride, depth, mma_tiles, tile_stride};
use super::bwd_dkdv::{batch_row, key_ok, Batch};
use super::fwd::chunk_softmax;
use super::shared::{add_product, add_tiles, grid_x, load_kv, put, score_tile, unit_tile, Keys};
use super::tiling::Tiling;
use super::NEG;

/// Forward of the selected branch by key block. Grid: x = block × `splits`, y = `b * kvh +
/// kv head`. Needs `kc == sel` (one chunk per block) and `group_heads == gk`, so that a batch of
/// `tq` entries or own-block positions is `rows = tq × gk` rows.
///
/// 1. The split's share of the block's entries (from `offsets` / `entries`, see
///    [`super::csr_count`]) and, in the first split, the own block's query positions; nothing
///    to do: no loads.
/// 2. Load the block's keys and values.
/// 3. Per batch of rows: their queries (times `scale`), gates and destinations; the scores
///    (register tiles or tensor cores), masked ([`key_ok`]) and gated; the block's softmax
///    ([`chunk_softmax`] from a fresh maximum); `P V`; the partial output divided by the row's
///    sum, and `max + ln(sum)`, into slot `slot` (entries) or `count` (own block).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd_blocks<F: Float, H: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    gates: &Tensor<F>,
    offsets: &Tensor<u32>,
    entries: &Tensor<u32>,
    part_out: &mut Tensor<F>,
    part_lse: &mut Tensor<f32>,
    splits: usize,
    n: usize,
    nk: usize,
    h: usize,
    kvh: usize,
    count: usize,
    scale: f32,
    #[comptime] t: Tiling,
    #[define(F, H)] _dtypes: [StorageType; 2],
) {
    let d = t.d;
    let kc = t.kc;
    let rows = comptime!(t.rows());
    let nt = t.threads;
    let ps = comptime!(t.ps());
    let hst = comptime!(tile_stride(t.d));
    let kf = comptime!(depth(t.tile_bytes));
    let hp = comptime!(tile_stride(t.kc));
    let os = comptime!(acc_stride(t.d));
    let qr = t.qr;
    let qk = t.qk;
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    let stiles = comptime!(if t.mma { 0 } else { t.score_tiles() });
    let otiles = comptime!(t.out_tiles());
    let accn = comptime!(t.out_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let dgroups = comptime!(t.d / t.pd);
    let tid = UNIT_POS as usize;
    // (the window and the memory slots do not enter the selected mode's visibility)
    let ks = Keys {
        n,
        q0: 0,
        nk,
        span: n,
        mem: n,
    };
    let b = CUBE_POS_Y as usize / kvh;
    let kvhead = CUBE_POS_Y as usize % kvh;
    let bkv = b * kvh + kvhead;
    let x = grid_x();
    let block = x / splits;
    let sp = x % splits;
    if block * kc >= nk {
        // a padding cube of a folded grid
        terminate!();
    }
    let kstart = block * kc;
    let slots = count + 1;

    let mut q_s = SharedMemory::<f32>::new(comptime!(t.scalar_words(t.rows(), t.d)));
    let mut k_s = SharedMemory::<f32>::new(comptime!(t.scalar_words(t.kc, t.d)));
    let mut v_s = SharedMemory::<f32>::new(comptime!(t.scalar_words(t.kc, t.d)));
    let mut p_s = SharedMemory::<f32>::new_aligned(comptime!(t.score_words()), 128usize);
    let mut q_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.rows(), t.d)), 128usize);
    let mut k_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.kc, t.d)), 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.kc, t.d)), 128usize);
    let mut p_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.rows(), t.kc)), 128usize);
    let mut m_s = SharedMemory::<f32>::new(rows);
    let mut a_s = SharedMemory::<f32>::new(rows);
    let mut nm_s = SharedMemory::<f32>::new(rows);
    let mut red_s = SharedMemory::<f32>::new(comptime!(t.rows() * t.units_per_row));
    let mut sum_s = SharedMemory::<f32>::new(comptime!(t.rows() * t.units_per_row));
    let mut gate_s = SharedMemory::<f32>::new(rows);
    let mut pos_s = SharedMemory::<u32>::new(rows);
    let mut live_s = SharedMemory::<u32>::new(rows);
    let mut dst_s = SharedMemory::<u32>::new(rows);

    // 1. the split's entries, then (first split) the own block's positions
    let epb = comptime!(t.rows() / t.group_heads);
    let nb = (nk + kc - 1) / kc;
    let seg = bkv * nb + block;
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
    let sel_batches = (end - start + epb - 1) / epb;
    let qstart = kstart;
    let mut qend = qstart + kc;
    if qend > n {
        qend = n;
    }
    if sp > 0 || qstart > qend {
        qend = qstart;
    }
    let batches = sel_batches + (qend - qstart + t.tq - 1) / t.tq;

    if batches > 0 {
        // 2. the block's keys and values; a fresh maximum for every batch
        load_kv::<F, H>(
            k, v, &mut k_s, &mut v_s, &mut k_h, &mut v_h, bkv, kstart, nk, true, kc, t,
        );
        let mut r = tid;
        while r < rows {
            m_s[r] = NEG;
            r += nt;
        }

        // 3. the batches
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
                let mut s = slot;
                if by_position {
                    s = count;
                }
                gate_s[r] = gate;
                pos_s[r] = tt as u32;
                let mut lv = 0u32;
                if live {
                    lv = 1u32;
                }
                live_s[r] = lv;
                dst_s[r] = (row * slots + s) as u32;
                r += nt;
            }
            let mut e = tid;
            while e < rows * d {
                let r = e / d;
                let (live, _, row, _, _) =
                    batch_row(&batch, r, entries, &ks, b, h, kvhead, count, t);
                let mut qv = 0.0f32;
                if live {
                    qv = f32::cast_from(q[row * d + e % d]) * scale;
                }
                put::<H>(&mut q_s, &mut q_h, r, e % d, qv, t);
                e += nt;
            }
            sync_cube();

            // scores, masked and gated
            if t.mma {
                mma_tiles::<H>(
                    &q_h, &k_h, &mut p_s, rows, kc, d, hst, hst, ps, 0usize, false, true, kf,
                );
                sync_cube();
                let mut e = tid;
                while e < rows * kc {
                    let r = e / kc;
                    let j = e % kc;
                    let live = live_s[r] == 1;
                    let ok = key_ok(live, pos_s[r] as usize, j, kstart, kc, &ks, by_position, t);
                    let mut s = NEG.runtime();
                    if ok {
                        s = p_s[r * ps + j] * gate_s[r];
                    }
                    p_s[r * ps + j] = s;
                    e += nt;
                }
            }
            let mut g = tid;
            while g < stiles {
                let rg = g / kgroups;
                let kg = g % kgroups;
                let mut sacc = Array::<f32>::new(sn);
                let mut unused = Array::<f32>::new(1usize);
                score_tile(
                    &q_s,
                    &q_s,
                    &k_s,
                    &k_s,
                    rg,
                    kg,
                    &mut sacc,
                    &mut unused,
                    false,
                    t,
                );
                #[unroll]
                for i in 0..qr {
                    let r = rg * qr + i;
                    let live = live_s[r] == 1;
                    #[unroll]
                    for jj in 0..qk {
                        let j = kg + kgroups * jj;
                        let ok =
                            key_ok(live, pos_s[r] as usize, j, kstart, kc, &ks, by_position, t);
                        let mut s = NEG.runtime();
                        if ok {
                            s = sacc[i * qk + jj] * gate_s[r];
                        }
                        p_s[r * ps + j] = s;
                    }
                }
                g += nt;
            }
            sync_cube();

            // the block's softmax, then `P V`
            chunk_softmax::<H>(
                &mut p_s, &mut p_h, &m_s, &mut a_s, &mut nm_s, &mut red_s, &mut sum_s, t,
            );
            let mut acc = Array::<f32>::new(accn);
            #[unroll]
            for i in 0..accn {
                acc[i] = 0.0;
            }
            if t.mma {
                mma_tiles::<H>(
                    &p_h, &v_h, &mut p_s, rows, d, kc, hp, hst, os, 0usize, false, false, kf,
                );
                sync_cube();
            }
            add_tiles(&p_s, &mut acc, &a_s, otiles, false, t);
            if !t.mma {
                add_product(&mut acc, &p_s, &v_s, 1.0f32, false, t);
            }

            // the partials of the live rows
            #[unroll]
            for it in 0..comptime!(t.out_tiles().div_ceil(t.threads)) {
                let tile = unit_tile(it, otiles, t);
                if tile.live {
                    #[unroll]
                    for i in 0..t.pr {
                        let r = tile.x0 + i;
                        if live_s[r] == 1 {
                            let mut sum = 0.0f32;
                            for u in 0..t.units_per_row {
                                sum += sum_s[r * t.units_per_row + u];
                            }
                            let inv = 1.0f32 / sum;
                            let base = dst_s[r] as usize * d;
                            #[unroll]
                            for u in 0..t.pd {
                                let dim = tile.dg + dgroups * u;
                                part_out[base + dim] =
                                    F::cast_from(acc[tile.base + i * t.pd + u] * inv);
                            }
                        }
                    }
                }
            }
            let mut r = tid;
            while r < rows {
                if live_s[r] == 1 {
                    let mut sum = 0.0f32;
                    for u in 0..t.units_per_row {
                        sum += sum_s[r * t.units_per_row + u];
                    }
                    part_lse[dst_s[r] as usize] = nm_s[r] + sum.ln();
                }
                r += nt;
            }
        }
    }
}

/// Combines per-slot partials into `out` `[b, h, n, d]`: one unit per output element, over the
/// row's valid slots (`idx` `[b, hs, n, count]` `>= 0`, and the own block's, always valid), in
/// slot order. `weighted` (the forward's, from [`attn_fwd_blocks`]): the log-sum-exp rule, also
/// writing `lse` `[b, h, n]`; else the plain sum (the query gradient's partials from the dk/dv
/// kernel; `part_lse` and `lse` unused).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn merge_parts<F: Float, I: Int>(
    idx: &Tensor<I>,
    part_out: &Tensor<F>,
    part_lse: &Tensor<f32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    total: usize,
    n: usize,
    h: usize,
    count: usize,
    #[comptime] d: usize,
    #[comptime] group_heads: usize,
    #[comptime] weighted: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let at = ABSOLUTE_POS;
    if at < total {
        let row = at / d;
        let dim = at % d;
        let tt = row % n;
        let bh = row / n;
        let head = bh % h;
        let b = bh / h;
        let hs = h / group_heads;
        let sel_row = ((b * hs + head / group_heads) * n + tt) * count;
        let slots = count + 1;
        let mut m = NEG.runtime();
        if weighted {
            for s in 0..slots {
                let mut ok = true;
                if s < count {
                    ok = i32::cast_from(idx[sel_row + s]) >= 0;
                }
                if ok {
                    let l = part_lse[row * slots + s];
                    if l > m {
                        m = l;
                    }
                }
            }
        }
        let mut z = 0.0f32;
        let mut acc = 0.0f32;
        for s in 0..slots {
            let mut ok = true;
            if s < count {
                ok = i32::cast_from(idx[sel_row + s]) >= 0;
            }
            if ok {
                let mut w = 1.0f32;
                if weighted {
                    w = (part_lse[row * slots + s] - m).exp();
                }
                z += w;
                acc += w * f32::cast_from(part_out[(row * slots + s) * d + dim]);
            }
        }
        if weighted {
            out[at] = F::cast_from(acc / z);
            if dim == 0 {
                lse[row] = m + z.ln();
            }
        } else {
            out[at] = F::cast_from(acc);
        }
    }
}
