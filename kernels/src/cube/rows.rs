//! Kernels for the few rows of a decode step (one per sequence of the batch), where Burn's
//! per-operation dispatch costs more than the GPU work:
//!
//! - [`row_linear`]: `y = act(norm(x) · W + bias) + residual` for `m` rows in one launch (the
//!   RMSNorm, the bias, GELU and the residual add each optional), in place of the norm's seven
//!   tensor ops, the matmul and the element-wise ops around it;
//! - [`decode_write`]: the new position's key (rotated) and value into the key/value cache and
//!   its un-rotated key and value into the compression ring, straight from the projection row,
//!   written in place.
//!
//! Layouts (contiguous): `x` `[m, din]`, norm weight `[din]`, `W` `[din, dout]` (Burn's
//! `Linear` layout; rows may be padded), bias `[dout]`, residual and `y` `[m, dout]`.

#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::reduce::cube_sum;

const SQRT_2: f32 = std::f32::consts::SQRT_2;

/// Comptime shape of one [`row_linear`] kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowTiling {
    /// Input features.
    pub din: usize,
    /// Rows the kernel holds (`m <= rows`).
    pub rows: usize,
    /// Output columns per cube (one per unit of a row group).
    pub cols: usize,
    /// Unit groups splitting the input features (strided), summed at the end.
    pub groups: usize,
    /// RMSNorm of the rows first.
    pub norm: bool,
    /// Add a bias.
    pub bias: bool,
    /// GELU (erf form, as Burn's) after the bias.
    pub gelu: bool,
    /// Add a residual last.
    pub residual: bool,
    /// A second matrix `W2` of the same normed rows (columns `dout..dout + dout2` of the grid,
    /// into `out2`; its bias when `bias2`, no GELU or residual).
    pub pair: bool,
    /// Add the second matrix's bias.
    pub bias2: bool,
}

impl RowTiling {
    /// Units per cube.
    pub fn threads(&self) -> usize {
        self.cols * self.groups
    }

    /// Shared memory in bytes.
    pub fn shared(&self) -> usize {
        4 * (self.rows * self.din
            + self.groups * self.rows * self.cols
            + self.threads()
            + self.rows)
    }
}

/// `acc[r] += Σ_i xs[r, i] · W[i, j]` over this unit's features `g, g + groups, ..` (`W`'s rows
/// `ws` apart).
#[cube]
fn column_products<F: Float>(
    xs: &SharedMemory<f32>,
    w: &Tensor<F>,
    ws: usize,
    j: usize,
    g: usize,
    acc: &mut Array<f32>,
    #[comptime] t: RowTiling,
) {
    let din = t.din;
    // unrolled, so that a unit has all of its loads of `W` in flight at once
    let steps = comptime!(t.din / t.groups);
    #[unroll]
    for s in 0..steps {
        let i = g + s * t.groups;
        let wv = f32::cast_from(w[i * ws + j]);
        #[unroll]
        for r in 0..t.rows {
            acc[r] += xs[r * din + i] * wv;
        }
    }
    if comptime!(!t.din.is_multiple_of(t.groups)) {
        let i = g + steps * t.groups;
        if i < din {
            let wv = f32::cast_from(w[i * ws + j]);
            #[unroll]
            for r in 0..t.rows {
                acc[r] += xs[r * din + i] * wv;
            }
        }
    }
}

/// Row `r`, column `c` of the tile summed over the unit groups' partial products.
#[cube]
fn group_sum(part: &SharedMemory<f32>, r: usize, c: usize, #[comptime] t: RowTiling) -> f32 {
    let mut s = 0.0f32;
    for u in 0..t.groups {
        s += part[(u * t.rows + r) * t.cols + c];
    }
    s
}

/// `out[r, j] = act(norm(x[r]) · W[:, j] + bias[j]) + res[r, j]` for `r < m`, `W`'s rows `ws`
/// apart (`ws >= dout`: CUDA pads the rows of some matrices); with [`RowTiling::pair`] also
/// `out2[r, j] = norm(x[r]) · W2[:, j] + bias2[j]` (rows `ws2` apart). Grid: x = column tile of
/// `cols` over the `dout (+ dout2)` columns; unit `(g, c)` sums the features `g, g + groups, ..`
/// of column `c`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn row_linear<F: Float>(
    x: &Tensor<F>,
    nw: &Tensor<F>,
    w: &Tensor<F>,
    bias: &Tensor<F>,
    res: &Tensor<F>,
    out: &mut Tensor<F>,
    w2: &Tensor<F>,
    bias2: &Tensor<F>,
    out2: &mut Tensor<F>,
    m: usize,
    dout: usize,
    ws: usize,
    dout2: usize,
    ws2: usize,
    din_f: f32,
    eps: f32,
    #[comptime] t: RowTiling,
    #[define(F)] _dtype: StorageType,
) {
    let din = t.din;
    let rows = t.rows;
    let cols = t.cols;
    let nt = comptime!(t.cols * t.groups);
    let tid = UNIT_POS as usize;
    let c = tid % cols;
    let g = tid / cols;
    let j = CUBE_POS_X as usize * cols + c;

    let mut xs = SharedMemory::<f32>::new(comptime!(t.rows * t.din));
    let mut part = SharedMemory::<f32>::new(comptime!(t.groups * t.rows * t.cols));
    let mut red = SharedMemory::<f32>::new(nt);
    let mut rms = SharedMemory::<f32>::new(rows);

    let mut e = tid;
    while e < comptime!(t.rows * t.din) {
        let mut val = 0.0f32;
        if e < m * din {
            val = f32::cast_from(x[e]);
        }
        xs[e] = val;
        e += nt;
    }
    sync_cube();

    if t.norm {
        // x / sqrt(mean(x²) + eps) * weight, as `norm::RmsNorm`
        #[unroll]
        for r in 0..rows {
            let mut s = 0.0f32;
            let mut i = tid;
            while i < din {
                let v = xs[r * din + i];
                s += v * v;
                i += nt;
            }
            let total = cube_sum(&mut red, s, nt, 16usize);
            if tid == 0 {
                rms[r] = (total / din_f + eps).sqrt();
            }
            sync_cube();
        }
        let mut e = tid;
        while e < comptime!(t.rows * t.din) {
            xs[e] = xs[e] / rms[e / din] * f32::cast_from(nw[e % din]);
            e += nt;
        }
        sync_cube();
    }

    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        acc[r] = 0.0;
    }
    if j < dout {
        column_products(&xs, w, ws, j, g, &mut acc, t);
    }
    if t.pair {
        if j >= dout && j < dout + dout2 {
            column_products(&xs, w2, ws2, j - dout, g, &mut acc, t);
        }
    }
    #[unroll]
    for r in 0..rows {
        part[(g * rows + r) * cols + c] = acc[r];
    }
    sync_cube();

    if g == 0 && j < dout {
        #[unroll]
        for r in 0..rows {
            if r < m {
                let mut s = group_sum(&part, r, c, t);
                if t.bias {
                    s += f32::cast_from(bias[j]);
                }
                if t.gelu {
                    s = s * (Erf::erf(s / SQRT_2) + 1.0f32) / 2.0f32;
                }
                if t.residual {
                    s += f32::cast_from(res[r * dout + j]);
                }
                out[r * dout + j] = F::cast_from(s);
            }
        }
    }
    if t.pair {
        if g == 0 && j >= dout && j < dout + dout2 {
            let j2 = j - dout;
            #[unroll]
            for r in 0..rows {
                if r < m {
                    let mut s = group_sum(&part, r, c, t);
                    if t.bias2 {
                        s += f32::cast_from(bias2[j2]);
                    }
                    out2[r * dout2 + j2] = F::cast_from(s);
                }
            }
        }
    }
}

/// Writes position `pos`'s key (rotated) and value into the cache `kc`, `vc` `[b, kvh, cap, d]`
/// and its un-rotated key and value into row `slot` of the ring `tk`, `tv` `[b, kvh, ring, d]`,
/// from the projection row `qkv` `[b, 1, width]` (keys at column `h * d`, values at `(h + kvh)
/// * d`). One unit per `(batch, kv head, feature)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode_write<F: Float>(
    qkv: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    kc: &mut Tensor<F>,
    vc: &mut Tensor<F>,
    tk: &mut Tensor<F>,
    tv: &mut Tensor<F>,
    total: usize,
    width: usize,
    h: usize,
    kvh: usize,
    pos: usize,
    cap: usize,
    ring: usize,
    slot: usize,
    #[comptime] d: usize,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS;
    if e < total {
        let i = e % d;
        let head = (e / d) % kvh;
        let b = e / (d * kvh);
        let kcol = b * width + (h + head) * d;
        let k = f32::cast_from(qkv[kcol + i]);
        let partner = f32::cast_from(qkv[kcol + i + 1 - (i % 2) * 2]);
        let v = qkv[b * width + (h + kvh + head) * d + i];
        let rot = k * f32::cast_from(cos[i]) + partner * f32::cast_from(sin[i]);
        let at = ((b * kvh + head) * cap + pos) * d + i;
        kc[at] = F::cast_from(rot);
        vc[at] = v;
        let at = ((b * kvh + head) * ring + slot) * d + i;
        tk[at] = F::cast_from(k);
        tv[at] = v;
    }
}
