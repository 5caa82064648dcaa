//! The `#[cube]` helpers the three attention kernels share: which keys a query sees, which
//! chunks of keys a query-centric cube visits, the loads of the shared tiles, the scalar score
//! tiles, the softmax gradient of one score, and the units' output tiles.
//!
//! Every helper keeps the arithmetic of the code it replaced, operation for operation, on the
//! scalar and on the tensor-core path alike.

use cubecl::prelude::*;

use super::super::mma::{acc_stride, tile_stride};
use super::tiling::Tiling;
use super::{SELECTED, SLIDING};

/// The runtime key range of a launch: `n` query rows, the first of them at position `q0`
/// (a chunk of a prompt's queries over all its keys; 0 for a whole sequence), `nk` keys, the
/// window or compression stride `span`, `mem` memory slots ([`super::COMPRESSED`]).
#[derive(CubeType, Clone, Copy)]
pub struct Keys {
    pub n: usize,
    pub q0: usize,
    pub nk: usize,
    pub span: usize,
    pub mem: usize,
}

/// One chunk of keys of a query-centric cube (see [`chunk_at`]).
#[derive(CubeType, Clone, Copy)]
pub struct Chunk {
    /// Position of its first key.
    pub kstart: usize,
    /// Its selected block is valid ([`SELECTED`]; otherwise true).
    pub slot_ok: bool,
    /// It is part of the query's own block ([`SELECTED`]).
    pub own: bool,
    /// The gate of its block (1 unless gated).
    pub gate: f32,
    /// Keys left in its block from `kstart` on (`kc` or more where blocks do not matter).
    pub left: usize,
    /// Its selection slot ([`SELECTED`]).
    pub slot: usize,
}

/// Where a query-centric cube (forward, dq) sits. Grid: x = query tile (`tq` positions),
/// y = `b * groups + group`, a group being `group_heads` consecutive heads.
#[derive(CubeType, Clone, Copy)]
pub struct QueryCube {
    /// First query position.
    pub t0: usize,
    /// Row `(b * h + first head of the group)` of `[b, h, ..]` tensors.
    pub bh0: usize,
    /// Row `(b * kvh + kv head)` of `[b, kvh, ..]` tensors.
    pub bkv: usize,
    /// Row `(b * groups + group) * n + t0` of the selection tensors `[b, hs, n, count]` (`b * n
    /// + t0` with [`Tiling::shared_all`]).
    pub sel_row: usize,
}

/// The cube's index along x of a grid that the launch may have folded into x and z (see
/// `launch::grid`: grids longer than the device allows along one dimension).
#[cube]
pub fn grid_x() -> usize {
    CUBE_POS_X as usize + CUBE_POS_Z as usize * CUBE_COUNT_X as usize
}

/// The cube's [`QueryCube`] for `h` query heads, `kvh` kv heads, `n` positions (a padding cube
/// of a folded grid has `t0 >= n`).
#[cube]
pub fn query_cube(h: usize, kvh: usize, n: usize, #[comptime] t: Tiling) -> QueryCube {
    let group_heads = t.group_heads;
    let t0 = grid_x() * t.tq;
    let groups = h / group_heads;
    let b = CUBE_POS_Y as usize / groups;
    let hg = CUBE_POS_Y as usize % groups;
    let kvhead = (hg * group_heads) / t.gk;
    let mut sel_row = (b * groups + hg) * n + t0;
    if t.shared_all {
        sel_row = b * n + t0;
    }
    QueryCube {
        t0,
        bh0: b * h + hg * group_heads,
        bkv: b * kvh + kvhead,
        sel_row,
    }
}

/// Whether the key at position `p` is visible to the query at `t`. `slot_ok`: the chunk's
/// block is valid, `in_block`: the key lies inside it, `own`: it is the query's own block
/// (selected mode).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn visible(
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

/// Whether row `r` of a query-centric cube (query row `t0 + r / group_heads`, at position
/// `q0` further) sees key `j` of chunk `c`.
///
/// Packed selected chunks ([`Tiling::pack`] `> 1`): the key's position staged in `kpos`
/// ([`gather_keys`]; [`NO_KEY`] where it is not seen).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn sees(
    r: usize,
    j: usize,
    t0: usize,
    c: &Chunk,
    ks: &Keys,
    kpos: &SharedMemory<u32>,
    #[comptime] t: Tiling,
) -> bool {
    let tt = t0 + r / t.group_heads;
    if t.pack > 1 {
        tt < ks.n && kpos[j] != NO_KEY
    } else {
        tt < ks.n
            && visible(
                c.kstart + j,
                ks.q0 + tt,
                ks.nk,
                ks.span,
                ks.mem,
                c.own,
                c.slot_ok,
                j < c.left,
                t.mode,
            )
    }
}

/// The position of a key a packed chunk does not see.
pub const NO_KEY: u32 = u32::MAX;

/// Packed selected chunks ([`Tiling::pack`] `> 1`: blocks of `sel` keys, `pack` of them to a
/// chunk, one query position per cube at `pos`): stages the position of every key of chunk
/// `ci` in `kpos` — slot `ci · pack + j / sel`, key `j mod sel` of its block: a selected block
/// from `idx` (row `sel_row`), slot `count` the query's own block (keys up to `pos`), later
/// slots and invalid blocks [`NO_KEY`]. The caller syncs before reading.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn gather_keys<I: Int>(
    kpos: &mut SharedMemory<u32>,
    ci: usize,
    sel_row: usize,
    idx: &Tensor<I>,
    count: usize,
    pos: usize,
    nk: usize,
    #[comptime] t: Tiling,
) {
    let sel = t.sel;
    let mut j = UNIT_POS as usize;
    while j < t.kc {
        let slot = ci * t.pack + j / sel;
        let within = j % sel;
        let mut p = NO_KEY.runtime();
        if slot < count {
            let blk = i32::cast_from(idx[sel_row * count + slot]);
            if blk >= 0 {
                p = u32::cast_from(blk) * sel as u32 + within as u32;
            }
        } else if slot == count {
            let own = (pos / sel) * sel + within;
            if own <= pos {
                p = own as u32;
            }
        }
        if p != NO_KEY && p as usize >= nk {
            p = NO_KEY;
        }
        kpos[j] = p;
        j += t.threads;
    }
}

/// [`load_kv`] for a packed chunk: key `j` from the position staged in `kpos`, zeros where it
/// is [`NO_KEY`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_kv_gathered<F: Float, H: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    k_s: &mut SharedMemory<f32>,
    v_s: &mut SharedMemory<f32>,
    k_h: &mut SharedMemory<H>,
    v_h: &mut SharedMemory<H>,
    kpos: &SharedMemory<u32>,
    bkv: usize,
    nk: usize,
    #[comptime] t: Tiling,
) {
    let mut e = UNIT_POS as usize;
    while e < t.kc * t.d {
        let p = kpos[e / t.d];
        put_pair::<F, H>(
            k,
            v,
            k_s,
            v_s,
            k_h,
            v_h,
            e,
            bkv * nk + p as usize,
            p != NO_KEY,
            t,
        );
        e += t.threads;
    }
}

/// The keys and values of chunk `ci` (`c`) of a query-centric cube into their tiles: a packed
/// chunk stages its keys' positions first ([`gather_keys`]). The caller syncs before reading.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_chunk<F: Float, I: Int, H: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    idx: &Tensor<I>,
    k_s: &mut SharedMemory<f32>,
    v_s: &mut SharedMemory<f32>,
    k_h: &mut SharedMemory<H>,
    v_h: &mut SharedMemory<H>,
    kpos: &mut SharedMemory<u32>,
    ci: usize,
    c: &Chunk,
    qc: &QueryCube,
    count: usize,
    ks: &Keys,
    #[comptime] t: Tiling,
) {
    if t.pack > 1 {
        gather_keys::<I>(kpos, ci, qc.sel_row, idx, count, ks.q0 + qc.t0, ks.nk, t);
        sync_cube();
        load_kv_gathered::<F, H>(k, v, k_s, v_s, k_h, v_h, kpos, qc.bkv, ks.nk, t);
    } else {
        load_kv::<F, H>(
            k, v, k_s, v_s, k_h, v_h, qc.bkv, c.kstart, ks.nk, c.slot_ok, c.left, t,
        );
    }
}

/// First key position a sliding/compressed cube whose first query is at position `t0` visits.
#[cube]
fn first_key(t0: usize, span: usize, #[comptime] mode: u32) -> usize {
    let mut lo = 0usize;
    if mode == SLIDING && t0 > span {
        lo = t0 - span;
    }
    lo
}

/// Number of key chunks a query-centric cube visits (`t0`: its first query row).
#[cube]
pub fn chunk_count(t0: usize, count: usize, ks: &Keys, #[comptime] t: Tiling) -> usize {
    let kc = t.kc;
    let mut last = t0 + t.tq;
    if last > ks.n {
        last = ks.n;
    }
    // the position of the cube's last query
    last = last - 1 + ks.q0;
    let mut chunks = 0usize;
    if t.mode == SELECTED {
        if t.pack > 1 {
            chunks = (count + 1 + t.pack - 1) / t.pack;
        } else {
            let subs = comptime!(t.sel.div_ceil(t.kc));
            chunks = (count + 1) * subs;
        }
    } else if t.mode == SLIDING {
        let lo = first_key(ks.q0 + t0, ks.span, t.mode);
        chunks = (last + 1 - lo + kc - 1) / kc;
    } else {
        // memory chunks, then chunks of compressed blocks (aligned to selection blocks)
        let mut vis = ks.mem + last / ks.span;
        if vis > ks.nk {
            vis = ks.nk;
        }
        chunks = (ks.mem + kc - 1) / kc + (vis - ks.mem + kc - 1) / kc;
    }
    chunks
}

/// Where chunk `ci` of a query-centric cube (first query row `t0`) lies (selected: its block from `idx` and its gate
/// from `gates`, both `[b, hs, n, count]`, at row `sel_row`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn chunk_at<F: Float, I: Int>(
    ci: usize,
    t0: usize,
    sel_row: usize,
    idx: &Tensor<I>,
    gates: &Tensor<F>,
    count: usize,
    ks: &Keys,
    #[comptime] t: Tiling,
) -> Chunk {
    let kc = t.kc;
    let mut kstart = 0usize;
    let mut slot_ok = true;
    let mut own = false;
    let mut gate = 1.0f32;
    let mut left = kc.runtime();
    let mut slot = 0usize;
    if t.mode == SELECTED && t.pack > 1 {
        // the keys' positions come from `gather_keys`
        slot = ci * t.pack;
    } else if t.mode == SELECTED {
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
            kstart = ((ks.q0 + t0) / sel) * sel + sub * kc;
        }
    } else if t.mode == SLIDING {
        kstart = first_key(ks.q0 + t0, ks.span, t.mode) + ci * kc;
    } else {
        let mem_chunks = (ks.mem + kc - 1) / kc;
        if ci < mem_chunks {
            kstart = ci * kc;
            left = ks.mem - kstart;
        } else {
            kstart = ks.mem + (ci - mem_chunks) * kc;
        }
    }
    Chunk {
        kstart,
        slot_ok,
        own,
        gate,
        left,
        slot,
    }
}

/// Stores `val` at row `r`, column `c` of a `[rows, d]` tile: into the f32 tile `s` (row
/// stride `d + 1`) on the scalar path, into the `H` tile `hm` (row stride
/// [`tile_stride`]`(d)`) on the tensor-core path.
#[cube]
pub fn put<H: Float>(
    s: &mut SharedMemory<f32>,
    hm: &mut SharedMemory<H>,
    r: usize,
    c: usize,
    val: f32,
    #[comptime] t: Tiling,
) {
    let ds = comptime!(t.d + 1);
    let hst = comptime!(tile_stride(t.d));
    if t.mma {
        hm[r * hst + c] = H::cast_from(val);
    } else {
        s[r * ds + c] = val;
    }
}

/// Loads the `kc` keys and values from position `kstart` of row `bkv` (`b * kvh + kv head`)
/// of `k`, `v` `[b, kvh, nk, d]` into their tiles ([`put`]); zeros past `nk`, past the `left`
/// keys of the block, and everywhere unless `ok`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_kv<F: Float, H: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    k_s: &mut SharedMemory<f32>,
    v_s: &mut SharedMemory<f32>,
    k_h: &mut SharedMemory<H>,
    v_h: &mut SharedMemory<H>,
    bkv: usize,
    kstart: usize,
    nk: usize,
    ok: bool,
    left: usize,
    #[comptime] t: Tiling,
) {
    let mut e = UNIT_POS as usize;
    while e < t.kc * t.d {
        let j = e / t.d;
        let p = kstart + j;
        put_pair::<F, H>(
            k,
            v,
            k_s,
            v_s,
            k_h,
            v_h,
            e,
            bkv * nk + p,
            p < nk && ok && j < left,
            t,
        );
        e += t.threads;
    }
}

/// Element `e` (key `e / d`, feature `e mod d`) of the key and value tiles: from row `row` of
/// `k`, `v` (`[.., d]`) where `ok`, else zero.
#[cube]
#[allow(clippy::too_many_arguments)]
fn put_pair<F: Float, H: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    k_s: &mut SharedMemory<f32>,
    v_s: &mut SharedMemory<f32>,
    k_h: &mut SharedMemory<H>,
    v_h: &mut SharedMemory<H>,
    e: usize,
    row: usize,
    ok: bool,
    #[comptime] t: Tiling,
) {
    let d = t.d;
    let mut kv = 0.0f32;
    let mut vv = 0.0f32;
    if ok {
        let off = row * d + e % d;
        kv = f32::cast_from(k[off]);
        vv = f32::cast_from(v[off]);
    }
    put::<H>(k_s, k_h, e / d, e % d, kv, t);
    put::<H>(v_s, v_h, e / d, e % d, vv, t);
}

/// Loads the rows of a query-centric cube from `src` `[b, h, n, d]` into a tile ([`put`]):
/// row `r` is position `t0 + r / group_heads` of head row `bh0 + r % group_heads`, zero past `n`, times `scale`
/// with `scaled`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_rows<F: Float, H: Float>(
    src: &Tensor<F>,
    s: &mut SharedMemory<f32>,
    hm: &mut SharedMemory<H>,
    t0: usize,
    bh0: usize,
    n: usize,
    scale: f32,
    #[comptime] scaled: bool,
    #[comptime] t: Tiling,
) {
    let d = t.d;
    let group_heads = t.group_heads;
    let rows = comptime!(t.rows());
    let nt = t.threads;
    let mut e = UNIT_POS as usize;
    while e < rows * d {
        let r = e / d;
        let tt = t0 + r / group_heads;
        let mut val = 0.0f32;
        if tt < n {
            let off = ((bh0 + r % group_heads) * n + tt) * d + e % d;
            if scaled {
                val = f32::cast_from(src[off]) * scale;
            } else {
                val = f32::cast_from(src[off]);
            }
        }
        put::<H>(s, hm, r, e % d, val, t);
        e += nt;
    }
}

/// One unit's register tile of scores `dot = q · kᵀ` and, with `dual`, of `dp = dout · vᵀ`
/// (backward) for rows `rg * qr ..` and keys `kg + kgroups * jj` of the scalar path's tiles
/// (row stride `d + 1`). `dot` and `dp` hold `qr × qk` values, row-major (`dp` is not touched
/// without `dual`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn score_tile(
    q_s: &SharedMemory<f32>,
    do_s: &SharedMemory<f32>,
    k_s: &SharedMemory<f32>,
    v_s: &SharedMemory<f32>,
    rg: usize,
    kg: usize,
    dot: &mut Array<f32>,
    dp: &mut Array<f32>,
    #[comptime] dual: bool,
    #[comptime] t: Tiling,
) {
    let d = t.d;
    let ds = comptime!(t.d + 1);
    let qr = t.qr;
    let qk = t.qk;
    let sn = comptime!(t.qr * t.qk);
    let kgroups = comptime!(t.kc / t.qk);
    let vn = comptime!(if dual { t.qk } else { 1 });
    #[unroll]
    for i in 0..sn {
        dot[i] = 0.0;
        if dual {
            dp[i] = 0.0;
        }
    }
    for dd in 0..d {
        let mut kreg = Array::<f32>::new(qk);
        let mut vreg = Array::<f32>::new(vn);
        #[unroll]
        for jj in 0..qk {
            kreg[jj] = k_s[(kg + kgroups * jj) * ds + dd];
            if dual {
                vreg[jj] = v_s[(kg + kgroups * jj) * ds + dd];
            }
        }
        #[unroll]
        for i in 0..qr {
            let qv = q_s[(rg * qr + i) * ds + dd];
            #[unroll]
            for jj in 0..qk {
                dot[i * qk + jj] += qv * kreg[jj];
            }
            if dual {
                let ov = do_s[(rg * qr + i) * ds + dd];
                #[unroll]
                for jj in 0..qk {
                    dp[i * qk + jj] += ov * vreg[jj];
                }
            }
        }
    }
}

/// The probability `p = exp(dot · gate - lse)` of a score and its gradient
/// `ds = p (dp - delta)` (times `gate` with `gate_ds`); zeros unless `ok`.
#[cube]
pub fn grad_pair(
    dot: f32,
    dp: f32,
    gate: f32,
    lse: f32,
    delta: f32,
    ok: bool,
    #[comptime] gate_ds: bool,
) -> (f32, f32) {
    let mut prob = 0.0f32;
    let mut ds = 0.0f32;
    if ok {
        prob = (dot * gate - lse).exp();
        if gate_ds {
            ds = prob * (dp - delta) * gate;
        } else {
            ds = prob * (dp - delta);
        }
    }
    (prob, ds)
}

/// The unit's `it`-th register tile of a `[x, d]` product tiled `pr × pd` ([`unit_tile`]).
#[derive(CubeType, Clone, Copy)]
pub struct UnitTile {
    /// The tile exists (`tiles` tiles strided over the units).
    pub live: bool,
    /// Its first row: rows `x0 ..= x0 + pr - 1`.
    pub x0: usize,
    /// Its first dim: dims `dg + dgroups * u`, `dgroups = d / pd`.
    pub dg: usize,
    /// Its first accumulator: values `base + i * pd + u`.
    pub base: usize,
}

/// The unit's `it`-th of `tiles` register tiles: tile `g = unit + it * threads` holds rows
/// `(g / dgroups) * pr ..` and dims `g % dgroups + dgroups * u`.
#[cube]
pub fn unit_tile(it: usize, #[comptime] tiles: usize, #[comptime] t: Tiling) -> UnitTile {
    let g = UNIT_POS as usize + it * t.threads;
    let dgroups = comptime!(t.d / t.pd);
    UnitTile {
        live: g < tiles,
        x0: (g / dgroups) * t.pr,
        dg: g % dgroups,
        base: it * t.pr * t.pd,
    }
}

/// `acc += A · B` for the unit's `pr × pd` output tiles of a query-centric cube (scalar path):
/// `A` `[rows, kc]` (row stride `kc + 1`), `B` `[kc, d]` (row stride `d + 1`), `B` times `gate`
/// with `gated`. Tile `g` holds rows `(g / dgroups) * pr ..` and dims `g % dgroups + dgroups * u`.
#[cube]
pub fn add_product(
    acc: &mut Array<f32>,
    a_s: &SharedMemory<f32>,
    b_s: &SharedMemory<f32>,
    gate: f32,
    #[comptime] gated: bool,
    #[comptime] t: Tiling,
) {
    let ds = comptime!(t.d + 1);
    let ps = comptime!(t.kc + 1);
    let pr = t.pr;
    let pd = t.pd;
    let dgroups = comptime!(t.d / t.pd);
    #[unroll]
    for it in 0..comptime!(t.out_tiles().div_ceil(t.threads)) {
        let tile = unit_tile(it, comptime!(t.out_tiles()), t);
        if tile.live {
            for j in 0..t.kc {
                let mut breg = Array::<f32>::new(pd);
                #[unroll]
                for u in 0..pd {
                    let at = j * ds + tile.dg + dgroups * u;
                    if gated {
                        breg[u] = b_s[at] * gate;
                    } else {
                        breg[u] = b_s[at];
                    }
                }
                #[unroll]
                for i in 0..pr {
                    let av = a_s[(tile.x0 + i) * ps + j];
                    #[unroll]
                    for u in 0..pd {
                        acc[tile.base + i * pd + u] += av * breg[u];
                    }
                }
            }
        }
    }
}

/// `acc += buf` for the unit's `pr × pd` register tiles of a `[x, d]` product in `buf`
/// (stride `acc_stride(d)`; read only on the tensor-core path, zero on the scalar one), or
/// with `rescale` `acc = acc · a_s[row] + buf` (the forward's online softmax). Tile `g`
/// holds rows `(g / dgroups) * pr ..` and dims `g % dgroups + dgroups * u`, `tiles` tiles
/// strided over the units.
#[cube]
pub fn add_tiles(
    buf: &SharedMemory<f32>,
    acc: &mut Array<f32>,
    a_s: &SharedMemory<f32>,
    #[comptime] tiles: usize,
    #[comptime] rescale: bool,
    #[comptime] t: Tiling,
) {
    let os = comptime!(acc_stride(t.d));
    let dgroups = comptime!(t.d / t.pd);
    #[unroll]
    for it in 0..comptime!(tiles.div_ceil(t.threads)) {
        let tile = unit_tile(it, tiles, t);
        if tile.live {
            #[unroll]
            for i in 0..t.pr {
                let mut a = 1.0f32;
                if rescale {
                    a = a_s[tile.x0 + i];
                }
                #[unroll]
                for u in 0..t.pd {
                    let at = tile.base + i * t.pd + u;
                    let mut add = 0.0f32;
                    if t.mma {
                        add = buf[(tile.x0 + i) * os + tile.dg + dgroups * u];
                    }
                    if rescale {
                        acc[at] = acc[at] * a + add;
                    } else {
                        acc[at] += add;
                    }
                }
            }
        }
    }
}

/// Writes the unit's output tiles `acc` of a query-centric cube to `out` `[b, h, n, d]`
/// (row `r`: position `t0 + r / group_heads` of head row `bh0 + r % group_heads`, none past `n`), times
/// `1 / l_s[r]` with `normalise`, else times `scale`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_rows<F: Float>(
    acc: &Array<f32>,
    out: &mut Tensor<F>,
    l_s: &SharedMemory<f32>,
    t0: usize,
    bh0: usize,
    n: usize,
    scale: f32,
    #[comptime] normalise: bool,
    #[comptime] t: Tiling,
) {
    let d = t.d;
    let group_heads = t.group_heads;
    let pd = t.pd;
    let dgroups = comptime!(t.d / t.pd);
    #[unroll]
    for it in 0..comptime!(t.out_tiles().div_ceil(t.threads)) {
        let tile = unit_tile(it, comptime!(t.out_tiles()), t);
        if tile.live {
            #[unroll]
            for i in 0..t.pr {
                let r = tile.x0 + i;
                let tt = t0 + r / group_heads;
                if tt < n {
                    let mut f = scale;
                    if normalise {
                        f = 1.0f32 / l_s[r];
                    }
                    #[unroll]
                    for u in 0..pd {
                        let at = ((bh0 + r % group_heads) * n + tt) * d + tile.dg + dgroups * u;
                        out[at] = F::cast_from(acc[tile.base + i * pd + u] * f);
                    }
                }
            }
        }
    }
}
