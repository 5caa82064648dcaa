//! The comptime shape of an attention launch ([`Tiling`]): chunk and row-batch sizes, the
//! units' register tiles, and the shared memory each kernel declares for it.

use super::super::mma::{acc_stride, tile_stride};

/// Shape and mode of one launch (comptime: one compiled kernel per distinct value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiling {
    /// [`super::SELECTED`], [`super::SLIDING`] or [`super::COMPRESSED`].
    pub mode: u32,
    /// Head dimension.
    pub d: usize,
    /// Keys per chunk.
    pub kc: usize,
    /// Query positions per row batch (1 for [`super::SELECTED`] forward and dq).
    pub tq: usize,
    /// Heads per row group of the query-centric kernels (selected: heads sharing a selection).
    pub group_heads: usize,
    /// Query heads per kv head.
    pub gk: usize,
    /// Selection block size ([`super::SELECTED`]).
    pub sel: usize,
    /// [`super::SELECTED`]: one selection for every head (`[b, 1, n, count]`; a cube's rows are
    /// still one kv head's `group_heads` heads).
    pub shared_all: bool,
    /// Keys are gated per selected block ([`super::SELECTED`]).
    pub gated: bool,
    /// Units per cube.
    pub threads: usize,
    /// [`COMPRESSED`] forward: also rank the selection blocks and keep the top `topk`.
    pub select: bool,
    /// Blocks kept per query ([`Tiling::select`]).
    pub topk: usize,
    /// Compressed slots per selection block ([`Tiling::select`]; divides `kc`).
    pub per_block: usize,
    /// Heads per selection group ([`Tiling::select`]; divides `group_heads`).
    pub sel_group: usize,
    /// Register tiles. Forward and dq ([`Tiling::with_register_tiles`]): `qr × qk` rows × keys
    /// of the scores each unit computes, `pr × pd` rows × dims of the output it accumulates,
    /// `units_per_row` units per row of the softmax statistics. dk/dv ([`Tiling::with_dkdv_tiles`]):
    /// `qr × qk` rows × keys of the scores, `pr × pd` keys × dims of the accumulators.
    pub qr: usize,
    pub qk: usize,
    pub pr: usize,
    pub pd: usize,
    pub units_per_row: usize,
    /// Products on tensor cores ([`super::super::mma`]; the host sets it where the device has the
    /// fragments of the storage type and rows, keys and dims are multiples of 16).
    pub mma: bool,
    /// Bytes of a tensor-core tile element `H`: 2 (bf16 / f16 storage), 4 (tf32 for f32).
    pub tile_bytes: usize,
    /// [`super::SELECTED`] forward and dq: selection blocks per chunk (`kc / sel`, blocks
    /// shorter than a chunk; each key's position staged by [`super::shared::gather_keys`]), or
    /// 1 (a chunk within one block).
    pub pack: usize,
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
    /// of two per product) and accumulates a `pr × pd` block of the output; `units_per_row` units share
    /// the softmax statistics of one row.
    pub fn with_register_tiles(mut self) -> Self {
        let rows = self.rows();
        (self.qr, self.qk) = tile_pair(rows, self.kc, 4, 4, self.threads);
        (self.pr, self.pd) = tile_pair(rows, self.d, 4, 8, self.threads);
        let mut units_per_row = 1;
        while units_per_row * 2 * rows <= self.threads && units_per_row * 2 <= self.kc {
            units_per_row *= 2;
        }
        self.units_per_row = units_per_row;
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
    pub(super) fn bwd_score_tiles(&self) -> usize {
        (self.bwd_rows() / self.qr) * (self.kc / self.qk)
    }

    pub(super) fn bwd_acc_tiles(&self) -> usize {
        (self.kc / self.pr) * (self.d / self.pd)
    }

    /// Units' work items of the score tiles, of the output tiles.
    pub(super) fn score_tiles(&self) -> usize {
        (self.rows() / self.qr) * (self.kc / self.qk)
    }

    pub(super) fn out_tiles(&self) -> usize {
        (self.rows() / self.pr) * (self.d / self.pd)
    }

    /// Rows of a query-centric cube.
    pub fn rows(&self) -> usize {
        self.tq * self.group_heads
    }

    /// Rows of one key-centric batch.
    pub fn bwd_rows(&self) -> usize {
        (self.tq * self.gk).max(self.group_heads)
    }

    /// Importance rows of a selecting forward cube: `tq` positions × selection heads.
    pub fn imp_rows(&self) -> usize {
        if self.select {
            self.tq * (self.group_heads / self.sel_group)
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
            ir * (self.kc / self.per_block) + 2 * ir * self.topk + 2 * ir
        } else {
            0
        };
        let stats = 4 * r + 2 * r * self.units_per_row;
        let tiles = if self.mma {
            // tensor-core tiles of q, k, v, p and the three unused f32 tiles
            let halves = r * tile_stride(self.d) + 2 * self.kc * tile_stride(self.d);
            ((halves + r * tile_stride(self.kc)) * self.tile_bytes).div_ceil(4) + 3
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
            ((halves + r * tile_stride(self.kc)) * self.tile_bytes).div_ceil(4) + 4
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
            return 4 * ((halves * self.tile_bytes).div_ceil(4) + 6 + self.dkdv_words() + 6 * r);
        }
        4 * (2 * r * (self.d + 1) + 2 * self.kc * (self.d + 1) + 2 * r * (self.kc + 1) + 6 * r)
    }

    /// Words of an f32 tile of the scalar path, `rows × cols` with a row stride of `cols + 1`
    /// (one word on the tensor-core path, where it goes unused).
    pub(super) fn scalar_words(&self, rows: usize, cols: usize) -> usize {
        if self.mma {
            1
        } else {
            rows * (cols + 1)
        }
    }

    /// Elements of a tile of the tensor-core path, `rows × cols` with the row stride
    /// [`tile_stride`] (one element on the scalar path, where it goes unused).
    pub(super) fn half_words(&self, rows: usize, cols: usize) -> usize {
        if self.mma {
            rows * tile_stride(cols)
        } else {
            1
        }
    }
}
