//! The forward kernel: a query-centric cube's rows over its chunks of keys with an online
//! softmax; writes `out` and the log-sum-exp `lse` (and, compressed, the block selection).

use cubecl::prelude::*;

use super::super::mma::{acc_stride, depth, mma_tiles, tile_stride};
use super::shared::{
    add_product, add_tiles, chunk_at, chunk_count, load_chunk, load_rows, query_cube, score_tile,
    sees, store_rows, Keys,
};
use super::tiling::Tiling;
use super::topk::{init_ranking, rank_blocks, write_selection};
use super::{NEG, NEG_HALF};

/// Forward. Grid: x = query tile (`tq` positions), y = `b * groups + group` where a group is
/// `group_heads` consecutive heads. Writes `out` and the log-sum-exp `lse` of every row. Query
/// row `i` is at position `q0 + i` (a chunk of a prompt's queries over all its keys).
///
/// 1. Load the cube's queries (times `scale`), reset the running statistics.
/// 2. Per chunk of keys: load the K/V tile; scores in register tiles of `qr × qk` (keys strided
///    over the units so that a warp reads distinct banks) or on tensor cores, masked; with
///    [`Tiling::select`] rank the chunk's selection blocks; the chunk's row maxima and sums,
///    `units_per_row` units per row ([`chunk_softmax`]); the output accumulators (`pr × pd` per unit)
///    rescaled and updated; the running statistics.
/// 3. Write the normalised output, `lse` and the selection.
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
    q0: usize,
    nk: usize,
    h: usize,
    kvh: usize,
    count: usize,
    span: usize,
    mem: usize,
    complete: usize,
    scale: f32,
    #[comptime] t: Tiling,
    #[define(F, I, H)] _dtypes: [StorageType; 3],
) {
    let d = t.d;
    let kc = t.kc;
    let rows = comptime!(t.tq * t.group_heads);
    let nt = t.threads;
    let ps = comptime!(t.ps());
    // tensor-core path: strides of the tiles (element `H`) and of `P V` in `p_s`
    let hst = comptime!(tile_stride(t.d));
    let kf = comptime!(depth(t.tile_bytes));
    let hp = comptime!(tile_stride(t.kc));
    let os = comptime!(acc_stride(t.d));
    let qr = t.qr;
    let qk = t.qk;
    let accn = comptime!(t.out_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    // the scalar score tiles (none on the tensor-core path)
    let stiles = comptime!(if t.mma { 0 } else { t.score_tiles() });
    let otiles = comptime!(t.out_tiles());
    let tid = UNIT_POS as usize;
    let ks = Keys {
        n,
        q0,
        nk,
        span,
        mem,
    };
    let qc = query_cube(h, kvh, n, t);
    let t0 = qc.t0;
    if t0 >= n {
        // a padding cube of a folded grid
        terminate!();
    }

    // f32 tiles of the scalar path (one word on the tensor-core path), tiles of element `H`
    // of the tensor-core path (one word on the scalar path)
    let mut q_s = SharedMemory::<f32>::new(comptime!(t.scalar_words(t.rows(), t.d)));
    let mut k_s = SharedMemory::<f32>::new(comptime!(t.scalar_words(t.kc, t.d)));
    let mut v_s = SharedMemory::<f32>::new(comptime!(t.scalar_words(t.kc, t.d)));
    let mut p_s = SharedMemory::<f32>::new_aligned(comptime!(t.score_words()), 128usize);
    let mut q_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.rows(), t.d)), 128usize);
    let mut k_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.kc, t.d)), 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.kc, t.d)), 128usize);
    let mut p_h = SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.rows(), t.kc)), 128usize);
    let mut m_s = SharedMemory::<f32>::new(rows);
    let mut l_s = SharedMemory::<f32>::new(rows);
    let mut a_s = SharedMemory::<f32>::new(rows);
    let mut nm_s = SharedMemory::<f32>::new(rows);
    let mut red_s = SharedMemory::<f32>::new(comptime!(t.tq * t.group_heads * t.units_per_row));
    let mut sum_s = SharedMemory::<f32>::new(comptime!(t.tq * t.group_heads * t.units_per_row));
    // selection (compressed mode): per importance row, block scores of the chunk, the running
    // top-k (descending) and the softmax normaliser (the sink slot included)
    let irows = comptime!(t.imp_rows());
    let nfb = comptime!(if t.select { t.kc / t.per_block } else { 1 });
    let kk = comptime!(if t.select { t.topk } else { 1 });
    let mut fs_s = SharedMemory::<f32>::new(comptime!(t.imp_rows() * nfb));
    let mut topv = SharedMemory::<f32>::new(comptime!(t.imp_rows() * kk));
    let mut topi = SharedMemory::<u32>::new(comptime!(t.imp_rows() * kk));
    let mut mi_s = SharedMemory::<f32>::new(irows);
    let mut zi_s = SharedMemory::<f32>::new(irows);

    // 1. queries and statistics
    if t.select {
        init_ranking(&mut topv, &mut topi, &mut mi_s, &mut zi_s, t);
    }
    load_rows::<F, H>(q, &mut q_s, &mut q_h, t0, qc.bh0, n, scale, true, t);
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

    // 2. the chunks (packed: each key's position staged first)
    let mut kpos = SharedMemory::<u32>::new(comptime!(if t.pack > 1 { t.kc } else { 1 }));
    let chunks = chunk_count(t0, count, &ks, t);
    for ci in 0..chunks {
        let c = chunk_at::<F, I>(ci, t0, qc.sel_row, idx, gates, count, &ks, t);
        load_chunk::<F, I, H>(
            k, v, idx, &mut k_s, &mut v_s, &mut k_h, &mut v_h, &mut kpos, ci, &c, &qc, count, &ks,
            t,
        );
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
                let mut s = NEG.runtime();
                if sees(r, j, t0, &c, &ks, &kpos, t) {
                    s = p_s[r * ps + j] * c.gate;
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
                #[unroll]
                for jj in 0..qk {
                    let j = kg + kgroups * jj;
                    let mut s = NEG.runtime();
                    if sees(r, j, t0, &c, &ks, &kpos, t) {
                        s = sacc[i * qk + jj] * c.gate;
                    }
                    p_s[r * ps + j] = s;
                }
            }
            g += nt;
        }
        sync_cube();

        if t.select {
            rank_blocks(
                &p_s, &mut fs_s, &mut topv, &mut topi, &mut mi_s, &mut zi_s, c.kstart, t0, &ks,
                complete, t,
            );
        }

        chunk_softmax::<H>(
            &mut p_s, &mut p_h, &m_s, &mut a_s, &mut nm_s, &mut red_s, &mut sum_s, t,
        );
        if t.mma {
            // the chunk's `P V` into `p_s` (its scores are read by now)
            mma_tiles::<H>(
                &p_h, &v_h, &mut p_s, rows, d, kc, hp, hst, os, 0usize, false, false, kf,
            );
            sync_cube();
        }

        // output tiles: rows `rg * pr ..`, dims `dg + dgroups * u`, rescaled, plus `P V`
        add_tiles(&p_s, &mut acc, &a_s, otiles, true, t);
        if !t.mma {
            add_product(&mut acc, &p_s, &v_s, 1.0f32, false, t);
        }
        // running statistics (read again only after the next chunk's barriers)
        let mut r = tid;
        while r < rows {
            let mut sum = 0.0f32;
            for u in 0..t.units_per_row {
                sum += sum_s[r * t.units_per_row + u];
            }
            l_s[r] = l_s[r] * a_s[r] + sum;
            m_s[r] = nm_s[r];
            r += nt;
        }
        sync_cube();
    }

    // 3. outputs
    store_rows::<F>(&acc, out, &l_s, t0, qc.bh0, n, scale, true, t);
    let mut r = tid;
    while r < rows {
        let tt = t0 + r / t.group_heads;
        if tt < n {
            lse[(qc.bh0 + r % t.group_heads) * n + tt] = m_s[r] + l_s[r].ln();
        }
        r += nt;
    }
    if t.select {
        write_selection::<F, I>(
            &topv, &topi, &mi_s, &zi_s, sel_idx, sel_score, t0, qc.bh0, n, t,
        );
    }
}

/// The online softmax of one chunk's scores `p_s` `[rows, kc]` (stride [`Tiling::ps`]), `units_per_row`
/// units per row: the chunk maxima into `red_s`; the new running maxima `nm_s` (from the old
/// ones `m_s`), the rescale factors `a_s`, the probabilities (into `p_s`, or as `H` into `p_h`
/// on the tensor-core path) and their partial sums `sum_s`. Ends with a barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn chunk_softmax<H: Float>(
    p_s: &mut SharedMemory<f32>,
    p_h: &mut SharedMemory<H>,
    m_s: &SharedMemory<f32>,
    a_s: &mut SharedMemory<f32>,
    nm_s: &mut SharedMemory<f32>,
    red_s: &mut SharedMemory<f32>,
    sum_s: &mut SharedMemory<f32>,
    #[comptime] t: Tiling,
) {
    let kc = t.kc;
    let rows = comptime!(t.rows());
    let ps = comptime!(t.ps());
    let hp = comptime!(tile_stride(t.kc));
    let units_per_row = t.units_per_row;
    let tid = UNIT_POS as usize;
    // chunk maxima: `units_per_row` units per row, each over the keys `sub, sub + units_per_row, ..`
    let rpp = comptime!(t.threads / t.units_per_row);
    let sub = tid % units_per_row;
    let mut r = tid / units_per_row;
    while r < rows {
        let mut mx = NEG.runtime();
        let mut j = sub;
        while j < kc {
            let s = p_s[r * ps + j];
            if s > mx {
                mx = s;
            }
            j += units_per_row;
        }
        red_s[r * units_per_row + sub] = mx;
        r += rpp;
    }
    sync_cube();
    // probabilities against the new running maximum, partial sums
    let mut r = tid / units_per_row;
    while r < rows {
        let m_old = m_s[r];
        let mut mx = m_old;
        for u in 0..units_per_row {
            let s = red_s[r * units_per_row + u];
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
            j += units_per_row;
        }
        sum_s[r * units_per_row + sub] = sum;
        if sub == 0 {
            nm_s[r] = mx;
            a_s[r] = (m_old - mx).exp();
        }
        r += rpp;
    }
    sync_cube();
}
