//! The lists of the key-centric backward (selected mode): per `(batch, kv head, block)`, the
//! selections that chose the block, as a CSR structure (`offsets`, `entries`) built by
//! [`fill_zero`], [`csr_count`], [`csr_scan`] and [`csr_fill`].

use cubecl::prelude::*;

/// Fills a u32 buffer with zeros.
#[cube(launch_unchecked)]
pub fn fill_zero(buf: &mut Tensor<u32>, len: usize) {
    if ABSOLUTE_POS < len {
        buf[ABSOLUTE_POS] = 0;
    }
}

/// Counts, per `(batch, kv head, block)`, the valid selections `idx` `[b, hs, n, count]` point
/// at (`group_heads` query heads per selection head, `gk` per kv head, `nb` blocks).
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
    #[comptime] group_heads: usize,
    #[comptime] gk: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = ABSOLUTE_POS;
    if at < total {
        let blk = i32::cast_from(idx[at]);
        if blk >= 0 {
            let hsel = (at / (count * n)) % hs;
            let b = at / (count * n * hs);
            let kvhead = (hsel * group_heads) / gk;
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
    #[comptime] group_heads: usize,
    #[comptime] gk: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = ABSOLUTE_POS;
    if at < total {
        let blk = i32::cast_from(idx[at]);
        if blk >= 0 {
            let hsel = (at / (count * n)) % hs;
            let b = at / (count * n * hs);
            let kvhead = (hsel * group_heads) / gk;
            let seg = (b * kvh + kvhead) * nb + usize::cast_from(blk);
            let slot = cursor[seg].fetch_add(1u32);
            let base = offsets[seg];
            entries[(base + slot) as usize] = (at % (count * n * hs)) as u32;
        }
    }
}
