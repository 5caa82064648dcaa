//! The selected branch by key block, where the options ask for it and the shape allows it:
//! the forward ([`attn::attn_fwd_blocks`], then [`attn::merge_parts`]) runs here instead of
//! query by query, and the backward's dq comes from per-slot partials that the dk/dv kernel
//! writes ([`dq_by_block`], [`sum_dq_parts`]) instead of the query-centric dq kernel.

use super::attention::{csr, packs, Forward, Problem};
use super::*;

use crate::cube::attention::{self as attn, Tiling, SELECTED};
use crate::cube::mma::FRAG;
use crate::options::SelectedOrder;

/// Sequence length from which [`SelectedOrder::Auto`] runs half-precision selected attention by
/// key block. Measured on an H100 (bf16, the issue-21 layer, commit e969256): fwd+bwd 21.1 /
/// 53.3 / 265 ms by block against 22.1 / 73.9 / 311 ms by query at 4k / 16k / 64k, the forward
/// alone 9.7 / 23.5 / 108 against 9.0 / 30.5 / 134 ms; by block holds per-slot partials (peak
/// 1.6 GiB against 0.4 GiB at 4k), so short sequences stay by query.
pub const AUTO_BLOCK_FROM: usize = 8192;

/// Whether the selected branch of `p` (storage `dtype`) runs by key block: where the options
/// ask for it, or for [`SelectedOrder::Auto`] with half-precision storage from
/// [`AUTO_BLOCK_FROM`] positions on (f32 is not timed by block yet).
pub(super) fn by_block(p: &Problem, dtype: DType) -> bool {
    // blocks packed several to a chunk (DSA's one-token blocks) stay by query: their partials
    // would hold `count + 1` rows per query and head
    p.mode == SELECTED
        && !packs(p.sel)
        && !p.shared_all
        && match p.run.selected_order {
            SelectedOrder::ByBlock => true,
            SelectedOrder::ByQuery => false,
            SelectedOrder::Auto => {
                matches!(dtype, DType::BF16 | DType::F16) && p.n >= AUTO_BLOCK_FROM
            }
        }
}

/// The tiling of the by-block forward for `p` (storage `dtype`), where [`by_block`] chooses it
/// and the shape allows it; `None`: run by query.
pub(super) fn chosen(
    p: &Problem,
    dtype: DType,
    budget: usize,
    mma: Option<usize>,
) -> Option<Tiling> {
    if p.q0 != 0 || !by_block(p, dtype) {
        return None;
    }
    tiling(p, budget, mma)
}

/// Batches of `tq × gk` rows (32 where the budget allows), one chunk per selection block. The
/// shape must have one selection per kv head (`group_heads == gk`: an entry's heads are a
/// position's rows) and blocks of at most 64 keys.
fn tiling(p: &Problem, budget: usize, mma: Option<usize>) -> Option<Tiling> {
    let gk = p.gk();
    if p.group_heads != gk || p.sel == 0 || p.sel > 64 {
        return None;
    }
    let mut tq = (32 / gk).max(1);
    loop {
        let t = Tiling {
            mode: SELECTED,
            d: p.d,
            kc: p.sel,
            tq,
            group_heads: p.group_heads,
            gk,
            sel: p.sel,
            shared_all: false,
            gated: p.gated,
            threads: THREADS,
            select: false,
            topk: 1,
            per_block: 1,
            sel_group: 1,
            qr: 1,
            qk: 1,
            pr: 1,
            pd: 1,
            units_per_row: 1,
            mma: false,
            tile_bytes: mma.unwrap_or(2),
            pack: 1,
        };
        let t = Tiling {
            mma: mma.is_some()
                && t.rows().is_multiple_of(FRAG)
                && p.sel.is_multiple_of(FRAG)
                && p.d.is_multiple_of(FRAG),
            ..t
        }
        .with_register_tiles();
        // the forward's tiles and statistics, and four words per row (gate, position, live,
        // destination)
        if t.fwd_shared() + 16 * t.rows() <= budget {
            return Some(t);
        }
        if tq == 1 {
            return None;
        }
        tq /= 2;
    }
}

/// Whether the backward of `p` (storage `dtype`) takes dq from the dk/dv kernel's per-slot
/// partials: selected mode by block ([`by_block`]), some blocks selected, no gates (the gates'
/// gradients come from the dq kernel), and not on tf32 fragments (`dkdv_tile_bytes` 4): a
/// partial `dS · K` sums terms that cancel (each row of `dS` sums to zero over the keys), and
/// tf32 operands left 1e-2 relative errors in dq against the f32 tensor ops on an H100, where
/// the query-centric dq kernel (f32 products) stays at 3e-4.
pub(super) fn dq_by_block(
    p: &Problem,
    dtype: DType,
    gated: bool,
    dkdv_tile_bytes: Option<usize>,
) -> bool {
    by_block(p, dtype) && p.count > 0 && !gated && dkdv_tile_bytes != Some(4)
}

/// `dq` `[b, h, n, d]`: the sum of the valid slots' partials `dq_part` `[b, h, n, count + 1,
/// d]` ([`attn::merge_parts`] unweighted).
pub(super) fn sum_dq_parts<R: CubeRuntime>(
    idx: &CubeTensor<R>,
    dq_part: CubeTensor<R>,
    p: &Problem,
) -> CubeTensor<R> {
    let dtype = dq_part.dtype;
    let client = dq_part.client.clone();
    let dq = empty(&dq_part, vec![p.b, p.h, p.n, p.d], dtype);
    let total = p.b * p.h * p.n * p.d;
    let unused = dummy(&dq_part, DType::F32);
    // SAFETY: one unit per element, guarded by `total`; `idx` `[b, hs, n, count]` is read for
    // slots `< count` only.
    unsafe {
        attn::merge_parts::launch_unchecked::<R>(
            &client,
            folded(&client, total, 256, p.run.grid_limit),
            CubeDim::new_1d(256),
            idx.clone().into_tensor_arg(),
            dq_part.into_tensor_arg(),
            unused.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            unused.into_tensor_arg(),
            total,
            p.n,
            p.h,
            p.count,
            p.d,
            p.group_heads,
            false,
            [dtype.into(), idx.dtype.into()],
        );
    }
    dq
}

/// Cubes sharing one block's entries: early blocks are chosen by far more queries than late
/// ones (about one split per 4096 positions, as the dk/dv kernel's; the options' forced split
/// of the dk/dv kernel applies here too).
fn splits(p: &Problem) -> usize {
    match p.run.dkdv_splits {
        0 => p.n.div_ceil(4096).clamp(1, 32),
        forced => forced,
    }
}

/// The selected forward of `p` by key block with tiling `t` (from [`chosen`]); `mma`: the
/// tensor-core element, as the query-centric launch's.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    gates: Option<CubeTensor<R>>,
    p: &Problem,
    t: Tiling,
    mma: Option<(StorageType, usize)>,
    int_dtype: DType,
) -> Forward<R> {
    let dtype = q.dtype;
    let client = q.client.clone();
    let tile_elem = mma.map_or(dtype.into(), |m| m.0);
    let nb = p.nk.div_ceil(p.sel);
    let (offsets, entries) = match &idx {
        Some(idx) if p.count > 0 => csr(idx, p, nb),
        _ => (
            zeros_u32(&q, p.b * p.kvh * nb + 1, p.run.grid_limit),
            zeros_u32(&q, 1, p.run.grid_limit),
        ),
    };
    let idx = idx.unwrap_or_else(|| dummy(&q, int_dtype));
    let gates = gates
        .map(into_contiguous)
        .unwrap_or_else(|| dummy(&q, dtype));
    let slots = p.count + 1;
    let rows = p.b * p.h * p.n;
    let part_out = empty(&q, vec![rows * slots * p.d], dtype);
    let part_lse = empty(&q, vec![rows * slots], DType::F32);
    let splits = splits(p);
    // SAFETY: blocks `< nb` (x), kv rows `< b * kvh` (y); entries and offsets come from `csr`;
    // every (row, slot) written lies in the partials' `rows * slots` rows.
    unsafe {
        attn::attn_fwd_blocks::launch_unchecked::<R>(
            &client,
            grid(&client, nb * splits, p.b * p.kvh, p.run.grid_limit),
            CubeDim::new_1d(t.threads as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            gates.into_tensor_arg(),
            offsets.into_tensor_arg(),
            entries.into_tensor_arg(),
            part_out.clone().into_tensor_arg(),
            part_lse.clone().into_tensor_arg(),
            splits,
            p.n,
            p.nk,
            p.h,
            p.kvh,
            p.count,
            p.scale as f32,
            t,
            [dtype.into(), tile_elem],
        );
    }
    let out = empty(&part_out, vec![p.b, p.h, p.n, p.d], dtype);
    let lse = empty(&part_out, vec![p.b, p.h, p.n], DType::F32);
    let total = rows * p.d;
    let idt = idx.dtype;
    // SAFETY: one unit per output element, guarded by `total`; the row's selection read only
    // for slots `< count` (an absent `idx` has none).
    unsafe {
        attn::merge_parts::launch_unchecked::<R>(
            &client,
            folded(&client, total, 256, p.run.grid_limit),
            CubeDim::new_1d(256),
            idx.into_tensor_arg(),
            part_out.into_tensor_arg(),
            part_lse.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            total,
            p.n,
            p.h,
            p.count,
            p.d,
            p.group_heads,
            true,
            [dtype.into(), idt.into()],
        );
    }
    Forward {
        out,
        lse,
        selection: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::KernelOptions;

    /// The layer: 16 query heads over 4 kv heads sharing one selection per kv head.
    fn layer(order: SelectedOrder) -> Problem {
        Problem {
            mode: SELECTED,
            b: 1,
            h: 16,
            kvh: 4,
            n: 65_536,
            q0: 0,
            nk: 65_536,
            d: 64,
            group_heads: 4,
            count: 16,
            span: 0,
            mem: 0,
            sel: 64,
            gated: false,
            shared_all: false,
            scale: 0.125,
            select: None,
            run: RunChoices::from(&KernelOptions {
                selected_order: order,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_block_order_runs_where_asked_and_the_shape_allows() {
        let budget = 48 * 1024;
        // tensor-core tiles (bf16) of 32 rows: 8 positions × 4 heads
        let bf16 = DType::BF16;
        let block = layer(SelectedOrder::ByBlock);
        let t = chosen(&block, bf16, budget, Some(2)).expect("by block");
        assert!(t.mma && t.rows() == 32 && t.kc == 64, "{t:?}");
        // scalar tiles within the budget
        let t = chosen(&block, DType::F32, budget, None).expect("scalar");
        assert!(!t.mma && t.fwd_shared() + 16 * t.rows() <= budget, "{t:?}");
        assert!(dq_by_block(&block, bf16, false, Some(2)));
        assert!(dq_by_block(&block, DType::F32, false, None));
        // gates: dq (and the gates' gradient) by query; the forward still by block
        assert!(!dq_by_block(&block, bf16, true, Some(2)));
        // tf32 fragments: dq by query
        assert!(!dq_by_block(&block, DType::F32, false, Some(4)));
        // by query when asked
        let query = layer(SelectedOrder::ByQuery);
        assert!(chosen(&query, bf16, budget, Some(2)).is_none());
        assert!(!dq_by_block(&query, bf16, false, Some(2)));
        // auto: by block for half precision from AUTO_BLOCK_FROM positions, else by query
        let auto = layer(SelectedOrder::Auto);
        assert!(chosen(&auto, bf16, budget, Some(2)).is_some());
        assert!(chosen(&auto, DType::F16, budget, Some(2)).is_some());
        assert!(dq_by_block(&auto, bf16, false, Some(2)));
        assert!(chosen(&auto, DType::F32, budget, Some(4)).is_none());
        let short = Problem {
            n: AUTO_BLOCK_FROM / 2,
            nk: AUTO_BLOCK_FROM / 2,
            ..layer(SelectedOrder::Auto)
        };
        assert!(chosen(&short, bf16, budget, Some(2)).is_none());
        assert!(!dq_by_block(&short, bf16, false, Some(2)));
        // a selection per query head (not per kv head), blocks over 64 keys: by query
        let per_head = Problem {
            group_heads: 1,
            ..layer(SelectedOrder::ByBlock)
        };
        assert!(chosen(&per_head, bf16, budget, Some(2)).is_none());
        let long = Problem {
            sel: 128,
            ..layer(SelectedOrder::ByBlock)
        };
        assert!(chosen(&long, bf16, budget, Some(2)).is_none());
        // a chunk of a prompt's queries (not from position 0): by query
        let chunk = Problem {
            q0: 4096,
            nk: 65_536 + 4096,
            ..layer(SelectedOrder::ByBlock)
        };
        assert!(chosen(&chunk, bf16, budget, Some(2)).is_none());
    }
}
