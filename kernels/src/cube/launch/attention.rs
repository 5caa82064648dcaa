//! Launches of the attention kernels (the three branches' forward and backward, the block
//! lists of the dk/dv pass, top-k): problems, tiling choice within the shared-memory budget,
//! buffers.

use super::*;

use crate::cube::attention::{self as attn, Tiling, COMPRESSED, SELECTED, SLIDING};
use crate::options::{KernelOptions, SelectedOrder, TensorCores};

/// One attention problem (all three branches are instances).
#[derive(Clone, Debug)]
pub struct Problem {
    /// [`SELECTED`], [`SLIDING`] or [`COMPRESSED`].
    pub mode: u32,
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub n: usize,
    /// The position of the first query row (a chunk of a prompt's queries over all its keys;
    /// 0 for a whole sequence, the only case the backward and the by-block forward take).
    pub q0: usize,
    /// Key rows.
    pub nk: usize,
    pub d: usize,
    /// Heads per selection group (selected) or per kv head (others).
    pub group_heads: usize,
    /// Selected blocks per query.
    pub count: usize,
    /// Window (sliding) or stride (compressed).
    pub span: usize,
    /// Memory slots (compressed).
    pub mem: usize,
    /// Selection block (selected).
    pub sel: usize,
    /// Gated keys (selected with differentiable top-k).
    pub gated: bool,
    /// Selected mode: one selection for every head (`idx` `[b, 1, n, count]`, DSA's), while a
    /// cube's rows are the `group_heads` heads of one kv head.
    pub shared_all: bool,
    pub scale: f64,
    /// Compressed mode: rank the selection blocks too.
    pub select: Option<SelectSpec>,
    /// How the launches may run (tensor cores per pass, exact products, dk/dv split).
    pub run: RunChoices,
}

/// The parts of [`KernelOptions`] that reach the attention launches.
#[derive(Clone, Copy, Debug)]
pub struct RunChoices {
    /// The passes that may use tensor cores.
    pub tensor_cores: TensorCores,
    /// f32 products stay f32 (no TF32 fragments).
    pub exact: bool,
    /// Forced dk/dv split (`0`: from the shape).
    pub dkdv_splits: usize,
    /// How the selected forward walks its work.
    pub selected_order: SelectedOrder,
    /// Cubes per grid dimension at most (`0`: the device's limit).
    pub grid_limit: u32,
}

impl From<&KernelOptions> for RunChoices {
    fn from(o: &KernelOptions) -> Self {
        Self {
            tensor_cores: o.tensor_cores,
            exact: o.exact_matmul,
            dkdv_splits: o.dkdv_splits,
            selected_order: o.selected_order,
            grid_limit: o.grid_limit,
        }
    }
}

/// Block selection fused into the compressed forward.
#[derive(Clone, Copy, Debug)]
pub struct SelectSpec {
    /// Blocks kept per query (`min(num_selected, complete)`).
    pub topk: usize,
    /// Complete selection blocks (`(seq / stride) / per_block`).
    pub complete: usize,
    /// Compressed slots per selection block.
    pub per_block: usize,
    /// Heads per selection group.
    pub sel_group: usize,
    /// Selection block size.
    pub sel: usize,
}

impl Problem {
    pub(super) fn gk(&self) -> usize {
        self.h / self.kvh
    }

    fn groups(&self) -> usize {
        self.h / self.group_heads
    }

    /// Heads of the selection tensors `[b, hs, n, count]`.
    pub(super) fn selection_heads(&self) -> usize {
        if self.shared_all {
            1
        } else {
            self.groups()
        }
    }

    /// Key/value heads with lists of their own in the key-centric backward (one list for all
    /// with [`Problem::shared_all`]).
    fn list_heads(&self) -> usize {
        if self.shared_all {
            1
        } else {
            self.kvh
        }
    }
}

#[derive(Clone, Copy)]
enum Pass {
    Fwd,
    Dq,
    Dkdv,
}

/// The tensor-core tile element for storage `dtype` on this device and its size in bytes:
/// bf16 / f16 itself (16 × 16 × 16 fragments), tf32 for f32 (16 × 16 × 8, unless `exact`
/// products are asked for), where CubeCL lists the fragment for the device (CUDA's WMMA;
/// checked on an H200); `None` elsewhere (WGSL has none).
fn mma_elem<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: DType,
    exact: bool,
) -> Option<(StorageType, usize)> {
    let (elem, bytes, k): (StorageType, usize, u32) = match dtype {
        DType::BF16 | DType::F16 => (dtype.into(), 2, 16),
        // f32-exact products asked for (`--exact-matmul`): no TF32 operands here either
        DType::F32 if exact => return None,
        DType::F32 => (
            cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::TF32).into(),
            4,
            8,
        ),
        _ => return None,
    };
    let config = cubecl::ir::features::MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: DType::F32.into(),
        m: 16,
        n: 16,
        k,
    };
    client
        .properties()
        .features
        .matmul
        .cmma
        .contains(&config)
        .then_some((elem, bytes))
}

/// [`mma_elem`] for `pass`, where `p`'s options let that pass use tensor cores.
fn mma_for<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: DType,
    pass: Pass,
    p: &Problem,
) -> Option<(StorageType, usize)> {
    let cores = p.run.tensor_cores;
    let wanted = match pass {
        Pass::Fwd => cores.fwd,
        Pass::Dq => cores.dq,
        Pass::Dkdv => cores.dkdv,
    };
    mma_elem(client, dtype, p.run.exact).filter(|_| wanted)
}

/// Selection blocks shorter than this are packed several to a chunk of the query-centric
/// forward and dq ([`Tiling::pack`]; DSA's one-token blocks): a chunk per block would hold one
/// key. By-block runs ([`super::by_block`]) take only longer blocks.
pub const PACK_BELOW: usize = 8;

/// Keys per packed chunk.
const PACKED_CHUNK: usize = 32;

/// Whether selection blocks of `sel` keys are packed ([`PACK_BELOW`]).
pub fn packs(sel: usize) -> bool {
    sel < PACK_BELOW
}

/// The largest tiles that fit the shared-memory budget; `mma`: the bytes of the tensor-core
/// tile element where the device has one ([`mma_for`]), used where the shapes are multiples
/// of the fragment (all but the selected forward and dq, which have one query position per
/// cube).
fn tiling(p: &Problem, pass: Pass, budget: usize, mma: Option<usize>) -> Option<Tiling> {
    let gk = p.gk();
    let select = p.select.filter(|_| matches!(pass, Pass::Fwd));
    let sel = match (p.mode, select) {
        (SELECTED, _) => p.sel,
        (_, Some(s)) => s.sel,
        _ => 1,
    };
    // short blocks (forward and dq, ungated): several to a chunk
    let packed = p.mode == SELECTED && !matches!(pass, Pass::Dkdv) && !p.gated && packs(p.sel);
    let mut kc = match (p.mode, select) {
        (SELECTED, _) if packed => PACKED_CHUNK,
        (SELECTED, _) => p.sel.min(64),
        // chunks of whole selection blocks
        (_, Some(s)) => s.per_block * (32 / s.per_block).max(1),
        _ => 32,
    };
    // query positions per cube (forward and dq) or per key-centric batch
    let mut tq = match (p.mode, pass) {
        (SELECTED, Pass::Dkdv) => (16 / gk).max(1),
        (SELECTED, _) => 1,
        (_, Pass::Dkdv) => (16 / gk).max(1),
        _ => (64 / p.group_heads).clamp(1, 16),
    };
    loop {
        let t = Tiling {
            mode: p.mode,
            d: p.d,
            kc,
            tq,
            group_heads: p.group_heads,
            gk,
            sel,
            shared_all: p.shared_all,
            gated: p.gated,
            threads: THREADS,
            select: select.is_some(),
            topk: select.map_or(1, |s| s.topk),
            per_block: select.map_or(1, |s| s.per_block),
            sel_group: select.map_or(1, |s| s.sel_group),
            qr: 1,
            qk: 1,
            pr: 1,
            pd: 1,
            units_per_row: 1,
            mma: false,
            tile_bytes: mma.unwrap_or(2),
            pack: if packed && kc > sel && kc.is_multiple_of(sel) {
                kc / sel
            } else {
                1
            },
        };
        let frag = crate::cube::mma::FRAG;
        let t = Tiling {
            mma: mma.is_some()
                && match pass {
                    // one query position per cube in the selected forward and dq
                    Pass::Fwd | Pass::Dq => p.mode != SELECTED && t.rows().is_multiple_of(frag),
                    Pass::Dkdv => t.bwd_rows().is_multiple_of(frag),
                }
                && kc.is_multiple_of(frag)
                && p.d.is_multiple_of(frag),
            ..t
        };
        let t = match pass {
            Pass::Fwd | Pass::Dq => t.with_register_tiles(),
            Pass::Dkdv => t.with_dkdv_tiles(),
        };
        let bytes = match pass {
            Pass::Fwd => t.fwd_shared(),
            Pass::Dq => t.dq_shared(),
            Pass::Dkdv => t.dkdv_shared(),
        };
        if bytes <= budget {
            return Some(t);
        }
        if t.mma {
            // stay tensor-core sized: chunks down to one fragment, then fewer rows
            let rows = match pass {
                Pass::Dkdv => t.bwd_rows(),
                Pass::Fwd | Pass::Dq => t.rows(),
            };
            if kc >= 2 * frag && select.is_none_or(|s| (kc / 2).is_multiple_of(s.per_block)) {
                kc /= 2;
                continue;
            }
            if tq > 1 && (rows / 2).is_multiple_of(frag) {
                tq /= 2;
                continue;
            }
        }
        if let Some(s) = select {
            // keep whole selection blocks per chunk
            if kc > s.per_block {
                kc -= s.per_block;
            } else if tq > 1 {
                tq /= 2;
            } else {
                return None;
            }
            continue;
        }
        if kc > 8 {
            kc /= 2;
        } else if tq > 1 && (p.mode != SELECTED || matches!(pass, Pass::Dkdv)) {
            tq /= 2;
        } else if kc > 1 {
            kc /= 2;
        } else {
            return None;
        }
    }
}

/// Whether the kernels can run `p` on this device (shapes fit the shared-memory budget).
pub fn supported<R: CubeRuntime>(client: &ComputeClient<R>, p: &Problem) -> bool {
    let budget = shared_budget(client);
    [Pass::Fwd, Pass::Dq, Pass::Dkdv]
        .iter()
        .all(|&pass| tiling(p, pass, budget, None).is_some())
        && p.h.is_multiple_of(p.kvh)
        && p.h.is_multiple_of(p.group_heads)
        // entries `(head * n + t) * count + slot` and row offsets `(b * h + head) * n + t`
        // are u32
        && p.n < u32::MAX as usize / (p.b.max(1) * p.h.max(p.count).max(1))
}

/// What the forward kernel returns.
pub struct Forward<R: CubeRuntime> {
    /// `[b, h, n, d]`
    pub out: CubeTensor<R>,
    /// `[b, h, n]` f32
    pub lse: CubeTensor<R>,
    /// With [`Problem::select`]: the kept blocks `[b, hs, n, topk]` (`-1`: not valid) in
    /// `int_dtype`, and their probabilities (same shape, the float dtype).
    pub selection: Option<(CubeTensor<R>, CubeTensor<R>)>,
}

/// Forward of `p`; `int_dtype` is the backend's integer type (for the selected blocks).
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    gates: Option<CubeTensor<R>>,
    p: &Problem,
    int_dtype: DType,
) -> Forward<R> {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let dtype = q.dtype;
    let mma = mma_for(&q.client, dtype, Pass::Fwd, p);
    let budget = shared_budget(&q.client);
    if let Some(t) = super::by_block::chosen(p, dtype, budget, mma.map(|m| m.1)) {
        let idx = idx.map(into_contiguous);
        return super::by_block::forward(q, k, v, idx, gates, p, t, mma, int_dtype);
    }
    let t = tiling(p, Pass::Fwd, budget, mma.map(|m| m.1)).expect("checked by `supported`");
    let tile_elem = mma.map_or(dtype.into(), |m| m.0);
    let idx = idx
        .map(into_contiguous)
        .unwrap_or_else(|| dummy(&q, int_dtype));
    let gates = gates
        .map(into_contiguous)
        .unwrap_or_else(|| dummy(&q, dtype));
    let out = empty(&q, vec![p.b, p.h, p.n, p.d], dtype);
    let lse = empty(&q, vec![p.b, p.h, p.n], DType::F32);
    let selection = p.select.map(|s| {
        let shape = vec![p.b, p.h / s.sel_group, p.n, s.topk];
        (empty(&q, shape.clone(), idx.dtype), empty(&q, shape, dtype))
    });
    let (sel_idx, sel_score) = match &selection {
        Some((i, s)) => (i.clone(), s.clone()),
        None => (dummy(&q, idx.dtype), dummy(&q, dtype)),
    };
    let limit = p.run.grid_limit;
    let count = grid(&q.client, p.n.div_ceil(t.tq), p.b * p.groups(), limit);
    let idt = idx.dtype;
    // SAFETY: every index the kernel forms is bounded by the shapes checked above.
    unsafe {
        attn::attn_fwd::launch_unchecked::<R>(
            &q.client,
            count,
            CubeDim::new_1d(t.threads as u32),
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            idx.into_tensor_arg(),
            gates.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            sel_idx.into_tensor_arg(),
            sel_score.into_tensor_arg(),
            p.n,
            p.q0,
            p.nk,
            p.h,
            p.kvh,
            p.count,
            p.span,
            p.mem,
            p.select.map_or(0, |s| s.complete),
            p.scale as f32,
            t,
            [dtype.into(), idt.into(), tile_elem],
        );
    }
    Forward {
        out,
        lse,
        selection,
    }
}

/// Gradients `(dq, dk, dv, dgates)` from the output gradient `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    gates: Option<CubeTensor<R>>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    dout: CubeTensor<R>,
    p: &Problem,
) -> (
    CubeTensor<R>,
    CubeTensor<R>,
    CubeTensor<R>,
    Option<CubeTensor<R>>,
) {
    assert_eq!(p.q0, 0, "the backward takes whole sequences");
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let (out, dout) = (into_contiguous(out), into_contiguous(dout));
    let dtype = q.dtype;
    let client = q.client.clone();
    let budget = shared_budget(&client);
    let gated = gates.is_some();
    let idx = idx
        .map(into_contiguous)
        .unwrap_or_else(|| dummy(&q, DType::I32));
    let gates = gates
        .map(into_contiguous)
        .unwrap_or_else(|| dummy(&q, dtype));
    let idt = idx.dtype;

    // delta = rowsum(dout * out)
    let rows = p.b * p.h * p.n;
    let delta = empty(&q, vec![p.b, p.h, p.n], DType::F32);
    // SAFETY: one unit per row, guarded by `rows`.
    unsafe {
        attn::attn_delta::launch_unchecked::<R>(
            &client,
            folded(&client, rows, 256, p.run.grid_limit),
            CubeDim::new_1d(256),
            out.into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            rows,
            p.d,
            dtype.into(),
        );
    }

    // dq (and dgates); by key block, the dk/dv kernel writes per-slot partials of dq instead
    let dkdv_mma = mma_for(&client, dtype, Pass::Dkdv, p);
    let dq_by_block = super::by_block::dq_by_block(p, dtype, gated, dkdv_mma.as_ref().map(|m| m.1));
    let mma = mma_for(&client, dtype, Pass::Dq, p);
    let t = tiling(p, Pass::Dq, budget, mma.map(|m| m.1)).expect("checked by `supported`");
    let tile_elem = mma.map_or(dtype.into(), |m| m.0);
    let mut dq = empty(&q, vec![p.b, p.h, p.n, p.d], dtype);
    let dgates = if gated {
        empty(&q, vec![p.b, p.groups(), p.n, p.count], dtype)
    } else {
        dummy(&q, dtype)
    };
    // SAFETY: as the forward.
    if !dq_by_block {
        unsafe {
            attn::attn_bwd_dq::launch_unchecked::<R>(
                &client,
                grid(
                    &client,
                    p.n.div_ceil(t.tq),
                    p.b * p.groups(),
                    p.run.grid_limit,
                ),
                CubeDim::new_1d(t.threads as u32),
                q.clone().into_tensor_arg(),
                k.clone().into_tensor_arg(),
                v.clone().into_tensor_arg(),
                idx.clone().into_tensor_arg(),
                gates.clone().into_tensor_arg(),
                dout.clone().into_tensor_arg(),
                lse.clone().into_tensor_arg(),
                delta.clone().into_tensor_arg(),
                dq.clone().into_tensor_arg(),
                dgates.clone().into_tensor_arg(),
                p.n,
                p.nk,
                p.h,
                p.kvh,
                p.count,
                p.span,
                p.mem,
                p.scale as f32,
                t,
                [dtype.into(), idt.into(), tile_elem],
            );
        }
    }

    // the queries of every key block (selected mode)
    let mma = dkdv_mma;
    let t = tiling(p, Pass::Dkdv, budget, mma.map(|m| m.1)).expect("checked by `supported`");
    let tile_elem = mma.map_or(dtype.into(), |m| m.0);
    let nb = p.nk.div_ceil(p.sel.max(1));
    let (offsets, entries) = if p.mode == SELECTED && p.count > 0 {
        csr(&idx, p, nb)
    } else {
        (
            zeros_u32(&q, 2, p.run.grid_limit),
            zeros_u32(&q, 1, p.run.grid_limit),
        )
    };
    let chunks = if p.mode == SELECTED {
        nb * p.sel.div_ceil(t.kc)
    } else {
        p.nk.div_ceil(t.kc)
    };
    let len = p.b * p.kvh * p.nk * p.d;
    let splits = dkdv_splits(p, t.tq, len);
    let dk_part = empty(&k, vec![splits * len], DType::F32);
    let dv_part = empty(&k, vec![splits * len], DType::F32);
    let slots = p.count + 1;
    let dq_part = if dq_by_block {
        empty(&q, vec![p.b * p.h * p.n * slots * p.d], dtype)
    } else {
        dummy(&q, dtype)
    };
    // SAFETY: as the forward; entries and offsets come from `csr`.
    unsafe {
        attn::attn_bwd_dkdv::launch_unchecked::<R>(
            &client,
            grid(&client, chunks * splits, p.b * p.kvh, p.run.grid_limit),
            CubeDim::new_1d(t.threads as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            gates.into_tensor_arg(),
            dout.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            offsets.into_tensor_arg(),
            entries.into_tensor_arg(),
            dk_part.clone().into_tensor_arg(),
            dv_part.clone().into_tensor_arg(),
            dq_part.clone().into_tensor_arg(),
            splits,
            slots,
            len,
            p.n,
            p.nk,
            p.h,
            p.kvh,
            p.count.max(1),
            p.span,
            p.mem,
            p.scale as f32,
            t,
            dq_by_block,
            [dtype.into(), tile_elem],
        );
    }
    if dq_by_block {
        dq = super::by_block::sum_dq_parts(&idx, dq_part, p);
    }
    let dk = empty(&dk_part, vec![p.b, p.kvh, p.nk, p.d], dtype);
    let dv = empty(&dk_part, vec![p.b, p.kvh, p.nk, p.d], dtype);
    for (part, out) in [(&dk_part, &dk), (&dv_part, &dv)] {
        // SAFETY: one unit per element, guarded by `len`; `part` holds `splits * len` values.
        unsafe {
            attn::sum_splits::launch_unchecked::<R>(
                &client,
                folded(&client, len, 256, p.run.grid_limit),
                CubeDim::new_1d(256),
                part.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
                len,
                splits,
                dtype.into(),
            );
        }
    }
    (dq, dk, dv, gated.then_some(dgates))
}

/// How many cubes share the queries of one key chunk in the dk/dv kernel. Early key chunks
/// of the compressed branch (and of dense attention) are seen by almost every query (one cube walked 64k queries while
/// the grid had one wave of cubes), and early selection blocks are chosen far more often than
/// late ones; splitting their query lists evens the work. Partial sums cost `splits × len`
/// f32 values per output, capped at 256 MiB each. The options may force a split (tests: small
/// problems never split on their own).
fn dkdv_splits(p: &Problem, tq: usize, len: usize) -> usize {
    let forced = p.run.dkdv_splits;
    if forced > 0 {
        return forced;
    }
    let wanted = match p.mode {
        // a key chunk is seen by the `span` queries after it: one cube for a window of
        // hundreds, splits for a window as long as the sequence (dense attention)
        SLIDING => p.span.div_ceil(tq.max(1) * 256),
        // about 256 query batches per cube for the first chunk
        COMPRESSED => p.n.div_ceil(tq.max(1) * 256),
        _ => p.n.div_ceil(4096),
    };
    let cap = ((64usize << 20) / len.max(1)).max(1);
    wanted.clamp(1, 32).min(cap)
}

/// For every `(batch, kv head, block)`, the selections `(head, query, slot)` that chose it, as
/// offsets `[b * kvh * nb + 1]` into a list of entries.
pub(super) fn csr<R: CubeRuntime>(
    idx: &CubeTensor<R>,
    p: &Problem,
    nb: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let client = idx.client.clone();
    let segments = p.b * p.list_heads() * nb;
    let total = p.b * p.selection_heads() * p.n * p.count;
    let limit = p.run.grid_limit;
    let counts = zeros_u32(idx, segments, limit);
    let cursor = zeros_u32(idx, segments, limit);
    let offsets = empty(idx, vec![segments + 1], DType::U32);
    let entries = empty(idx, vec![total.max(1)], DType::U32);
    let cubes = folded(&client, total, 256, limit);
    let idt = idx.dtype;
    // SAFETY: one unit per selection, guarded by `total`; blocks are `< nb`.
    unsafe {
        attn::csr_count::launch_unchecked::<R>(
            &client,
            cubes.clone(),
            CubeDim::new_1d(256),
            idx.clone().into_tensor_arg(),
            counts.clone().into_tensor_arg(),
            total,
            p.n,
            p.selection_heads(),
            p.list_heads(),
            p.count,
            nb,
            p.group_heads,
            p.gk(),
            idt.into(),
        );
        attn::csr_scan::launch_unchecked::<R>(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(256),
            counts.into_tensor_arg(),
            offsets.clone().into_tensor_arg(),
            segments,
            256,
        );
        attn::csr_fill::launch_unchecked::<R>(
            &client,
            cubes,
            CubeDim::new_1d(256),
            idx.clone().into_tensor_arg(),
            offsets.clone().into_tensor_arg(),
            cursor.into_tensor_arg(),
            entries.clone().into_tensor_arg(),
            total,
            p.n,
            p.selection_heads(),
            p.list_heads(),
            p.count,
            nb,
            p.group_heads,
            p.gk(),
            idt.into(),
        );
    }
    (offsets, entries)
}

#[allow(unused)]
/// Top-`k` along the last axis of `x` `[.., len]` (any rank, made contiguous): values in `x`'s
/// dtype and indices in `int_dtype`, both `[.., k]`. `k <= len`, `k <= MAX_TOP_K`.
pub fn top_k<R: CubeRuntime>(
    x: CubeTensor<R>,
    k: usize,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let x = into_contiguous(x);
    let dims = x.meta.shape().to_vec();
    let len = *dims.last().expect("rank >= 1");
    let rows = dims.iter().product::<usize>() / len.max(1);
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = k;
    let values = empty(&x, out_dims.clone(), x.dtype);
    let indices = empty(&x, out_dims, int_dtype);
    let client = x.client.clone();
    let dtype = x.dtype;
    // SAFETY: one unit per row, guarded by `rows`; `k` entries written per row.
    unsafe {
        attn::top_k::launch_unchecked::<R>(
            &client,
            folded(&client, rows, 64, 0),
            CubeDim::new_1d(64),
            x.into_tensor_arg(),
            values.clone().into_tensor_arg(),
            indices.clone().into_tensor_arg(),
            rows,
            len,
            k,
            [dtype.into(), int_dtype.into()],
        );
    }
    (values, indices)
}

/// Largest `k` of [`top_k`] (one compiled kernel per `k`; the register list is `k` long).
pub const MAX_TOP_K: usize = 64;

fn _modes() -> [u32; 3] {
    [SELECTED, SLIDING, COMPRESSED]
}
