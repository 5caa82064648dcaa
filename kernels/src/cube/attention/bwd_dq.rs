//! The query-centric backward: `delta` of every row ([`attn_delta`]), then `dq` and the
//! gates' gradient ([`attn_bwd_dq`]).

use cubecl::prelude::*;

use super::super::mma::{acc_stride, depth, mma_tiles, tile_stride};
use super::shared::{
    add_product, add_tiles, chunk_at, chunk_count, grad_pair, load_chunk, load_rows, query_cube,
    score_tile, sees, store_rows, Keys,
};
use super::tiling::Tiling;
use super::SELECTED;

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

/// Backward, query-centric: `dq` (and `dgates` `[b, hs, n, count]` when gated). Same grid
/// as [`super::attn_fwd`].
///
/// 1. Load the cube's queries (times `scale`) and output gradients, their `lse` and `delta`.
/// 2. Per chunk of keys: load the K/V tile; the scores and `dO Vᵀ`, in register tiles or on
///    tensor cores; from them the score gradients `dS`; `dq += dS K` (the keys gated); gated
///    selected blocks: the gate's gradient `Σ dS · score` of the block.
/// 3. Write `dq` times `scale`.
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
    let group_heads = t.group_heads;
    let rows = comptime!(t.tq * t.group_heads);
    let nt = t.threads;
    let ps = comptime!(t.kc + 1);
    // tensor-core path: tile strides; scores at word 0 of `buf`, `dO Vᵀ` at `dpo`
    // (stride `as_`), each chunk's `dS K` over both (stride `os`)
    let hst = comptime!(tile_stride(t.d));
    let kf = comptime!(depth(t.tile_bytes));
    let hp = comptime!(tile_stride(t.kc));
    let as_ = comptime!(acc_stride(t.kc));
    let os = comptime!(acc_stride(t.d));
    let dpo = comptime!(t.rows() * acc_stride(t.kc));
    let qr = t.qr;
    let qk = t.qk;
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    let stiles = comptime!(if t.mma { 0 } else { t.score_tiles() });
    let accn = comptime!(t.out_tiles().div_ceil(t.threads) * t.pr * t.pd);
    let subs = comptime!(t.sel.div_ceil(t.kc));
    let tid = UNIT_POS as usize;
    let ks = Keys {
        n,
        q0: 0,
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

    let rd = comptime!(t.scalar_words(t.rows(), t.d));
    let kd = comptime!(t.scalar_words(t.kc, t.d));
    let rk = comptime!(t.scalar_words(t.rows(), t.kc));
    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut do_s = SharedMemory::<f32>::new(rd);
    let mut k_s = SharedMemory::<f32>::new(kd);
    let mut v_s = SharedMemory::<f32>::new(kd);
    let mut ds_s = SharedMemory::<f32>::new(rk);
    let mut raw_s = SharedMemory::<f32>::new(rk);
    let hq = comptime!(t.half_words(t.rows(), t.d));
    let hkv = comptime!(t.half_words(t.kc, t.d));
    let bw = comptime!(if t.mma { t.dq_words() } else { 1 });
    let mut q_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut do_h = SharedMemory::<H>::new_aligned(hq, 128usize);
    let mut k_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut v_h = SharedMemory::<H>::new_aligned(hkv, 128usize);
    let mut ds_h =
        SharedMemory::<H>::new_aligned(comptime!(t.half_words(t.rows(), t.kc)), 128usize);
    let mut buf = SharedMemory::<f32>::new_aligned(bw, 128usize);
    let mut lse_s = SharedMemory::<f32>::new(rows);
    let mut dl_s = SharedMemory::<f32>::new(rows);

    // 1. rows
    load_rows::<F, H>(q, &mut q_s, &mut q_h, t0, qc.bh0, n, scale, true, t);
    load_rows::<F, H>(dout, &mut do_s, &mut do_h, t0, qc.bh0, n, scale, false, t);
    let mut r = tid;
    while r < rows {
        let tt = t0 + r / group_heads;
        let mut l = 0.0f32;
        let mut dl = 0.0f32;
        if tt < n {
            l = lse[(qc.bh0 + r % group_heads) * n + tt];
            dl = delta[(qc.bh0 + r % group_heads) * n + tt];
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

    // 2. the chunks (packed: each key's position staged first)
    let mut kpos = SharedMemory::<u32>::new(comptime!(if t.pack > 1 { t.kc } else { 1 }));
    let chunks = chunk_count(t0, count, &ks, t);
    for ci in 0..chunks {
        let c = chunk_at::<F, I>(ci, t0, qc.sel_row, idx, gates, count, &ks, t);
        let gate = c.gate;
        load_chunk::<F, I, H>(
            k, v, idx, &mut k_s, &mut v_s, &mut k_h, &mut v_h, &mut kpos, ci, &c, &qc, count, &ks,
            t,
        );
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
                let ok = sees(r, j, t0, &c, &ks, &kpos, t);
                let dot = buf[r * as_ + j];
                let dp = buf[dpo + r * as_ + j];
                let (_, dsv) = grad_pair(dot, dp, gate, lse_s[r], dl_s[r], ok, false);
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
            add_tiles(&buf, &mut acc, &lse_s, otiles, false, t);
        }

        // scores and their gradients in `qr × qk` register tiles (as in the forward)
        let mut g = tid;
        while g < stiles {
            let rg = g / kgroups;
            let kg = g % kgroups;
            let mut dot = Array::<f32>::new(sn);
            let mut dp = Array::<f32>::new(sn);
            score_tile(&q_s, &do_s, &k_s, &v_s, rg, kg, &mut dot, &mut dp, true, t);
            #[unroll]
            for i in 0..qr {
                let r = rg * qr + i;
                #[unroll]
                for jj in 0..qk {
                    let j = kg + kgroups * jj;
                    let x = dot[i * qk + jj];
                    let ok = sees(r, j, t0, &c, &ks, &kpos, t);
                    let (_, dsv) =
                        grad_pair(x, dp[i * qk + jj], gate, lse_s[r], dl_s[r], ok, false);
                    let mut raw = 0.0f32;
                    if ok {
                        raw = x;
                    }
                    ds_s[r * ps + j] = dsv;
                    raw_s[r * ps + j] = raw;
                }
            }
            g += nt;
        }
        sync_cube();

        // dq tiles: rows `rg * pr ..`, dims `dg + dgroups * u`
        if !t.mma {
            add_product(&mut acc, &ds_s, &k_s, gate, true, t);
        }
        if t.mode == SELECTED && t.gated {
            if tid == 0 && !c.own {
                for r in 0..rows {
                    for j in 0..kc {
                        dgate += ds_s[r * ps + j] * raw_s[r * ps + j];
                    }
                }
                if ci % subs == subs - 1 {
                    dgates[qc.sel_row * count + c.slot] = F::cast_from(dgate);
                    dgate = 0.0;
                }
            }
        }
        sync_cube();
    }

    // 3. dq
    store_rows::<F>(&acc, dq, &lse_s, t0, qc.bh0, n, scale, false, t);
}
