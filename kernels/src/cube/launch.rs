//! Host side of the attention kernels: tiling choice, buffers, launches.

use std::any::{Any, TypeId};
use std::sync::Mutex;
use std::thread::ThreadId;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::attn::{self, Tiling, COMPRESSED, SELECTED, SLIDING};
use crate::options::{KernelOptions, TensorCores};

/// One attention problem (all three branches are instances).
#[derive(Clone, Debug)]
pub struct Problem {
    /// [`SELECTED`], [`SLIDING`] or [`COMPRESSED`].
    pub mode: u32,
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub n: usize,
    /// Key rows.
    pub nk: usize,
    pub d: usize,
    /// Heads per selection group (selected) or per kv head (others).
    pub gq: usize,
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
}

impl From<&KernelOptions> for RunChoices {
    fn from(o: &KernelOptions) -> Self {
        Self {
            tensor_cores: o.tensor_cores,
            exact: o.exact_matmul,
            dkdv_splits: o.dkdv_splits,
        }
    }
}

/// Block selection fused into the compressed forward.
#[derive(Clone, Copy, Debug)]
pub struct SelectSpec {
    /// Blocks kept per query (`min(num_selected, fine)`).
    pub topk: usize,
    /// Complete selection blocks (`(seq / stride) / pf`).
    pub fine: usize,
    /// Compressed slots per selection block.
    pub pf: usize,
    /// Heads per selection group.
    pub sg: usize,
    /// Selection block size.
    pub sel: usize,
}

impl Problem {
    fn gk(&self) -> usize {
        self.h / self.kvh
    }

    fn groups(&self) -> usize {
        self.h / self.gq
    }
}

const THREADS: usize = 128;

/// Shared memory a kernel may use on this device: CubeCL declares shared arrays statically,
/// and CUDA caps static shared memory at 48 KiB.
fn shared_budget<R: CubeRuntime>(client: &ComputeClient<R>) -> usize {
    client
        .properties()
        .hardware
        .max_shared_memory_size
        .min(48 * 1024)
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
    let mut kc = match (p.mode, select) {
        (SELECTED, _) => p.sel.min(64),
        // chunks of whole selection blocks
        (_, Some(s)) => s.pf * (32 / s.pf).max(1),
        _ => 32,
    };
    // query positions per cube (forward and dq) or per key-centric batch
    let mut tq = match (p.mode, pass) {
        (SELECTED, Pass::Dkdv) => (16 / gk).max(1),
        (SELECTED, _) => 1,
        (_, Pass::Dkdv) => (16 / gk).max(1),
        _ => (64 / p.gq).clamp(1, 16),
    };
    loop {
        let t = Tiling {
            mode: p.mode,
            d: p.d,
            kc,
            tq,
            gq: p.gq,
            gk,
            sel,
            gated: p.gated,
            threads: THREADS,
            select: select.is_some(),
            topk: select.map_or(1, |s| s.topk),
            pf: select.map_or(1, |s| s.pf),
            sg: select.map_or(1, |s| s.sg),
            qr: 1,
            qk: 1,
            pr: 1,
            pd: 1,
            tpr: 1,
            mma: false,
            hb: mma.unwrap_or(2),
        };
        let frag = super::mma::FRAG;
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
            if kc >= 2 * frag && select.is_none_or(|s| (kc / 2).is_multiple_of(s.pf)) {
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
            if kc > s.pf {
                kc -= s.pf;
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
        && p.h.is_multiple_of(p.gq)
        // entries `(head * n + t) * count + slot` and row offsets `(b * h + head) * n + t`
        // are u32
        && p.n < u32::MAX as usize / (p.b.max(1) * p.h.max(p.count).max(1))
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

fn zeros_u32<R: CubeRuntime>(like: &CubeTensor<R>, len: usize) -> CubeTensor<R> {
    let buf = empty(like, vec![len.max(1)], DType::U32);
    let cube_dim = CubeDim::new_1d(256);
    let cubes = len.div_ceil(256).max(1) as u32;
    // SAFETY: one unit per element, guarded by `len`.
    unsafe {
        attn::fill_zero::launch_unchecked::<R>(
            &buf.client,
            CubeCount::Static(cubes, 1, 1),
            cube_dim,
            buf.clone().into_tensor_arg(),
            len,
        );
    }
    buf
}

/// Placeholder argument for an unused tensor parameter.
fn dummy<R: CubeRuntime>(like: &CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    // one per runtime, device, dtype and thread, kept for the process: a decode step passes
    // about 20 absent operands, and every allocation is a message to the runtime's server
    // thread. Kernels never touch an absent operand (comptime flags), so sharing is safe; the
    // thread in the key keeps a dummy on the stream of the thread that launches.
    type Entry = (TypeId, ThreadId, DType, Box<dyn Any + Send>);
    static DUMMIES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let (runtime, thread) = (TypeId::of::<R>(), std::thread::current().id());
    let mut dummies = DUMMIES.lock().unwrap_or_else(|e| e.into_inner());
    let found = dummies.iter().find_map(|(r, t, d, held)| {
        if (*r, *t, *d) != (runtime, thread, dtype) {
            return None;
        }
        held.downcast_ref::<CubeTensor<R>>()
            .filter(|held| held.device == like.device)
            .cloned()
    });
    found.unwrap_or_else(|| {
        let fresh = empty(like, vec![1], dtype);
        dummies.push((runtime, thread, dtype, Box::new(fresh.clone())));
        fresh
    })
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
        let shape = vec![p.b, p.h / s.sg, p.n, s.topk];
        (empty(&q, shape.clone(), idx.dtype), empty(&q, shape, dtype))
    });
    let (sel_idx, sel_score) = match &selection {
        Some((i, s)) => (i.clone(), s.clone()),
        None => (dummy(&q, idx.dtype), dummy(&q, dtype)),
    };
    let count = CubeCount::Static(p.n.div_ceil(t.tq) as u32, (p.b * p.groups()) as u32, 1);
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
            p.nk,
            p.h,
            p.kvh,
            p.count,
            p.span,
            p.mem,
            p.select.map_or(0, |s| s.fine),
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
            CubeCount::Static(rows.div_ceil(256) as u32, 1, 1),
            CubeDim::new_1d(256),
            out.into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            rows,
            p.d,
            dtype.into(),
        );
    }

    // dq (and dgates)
    let mma = mma_for(&client, dtype, Pass::Dq, p);
    let t = tiling(p, Pass::Dq, budget, mma.map(|m| m.1)).expect("checked by `supported`");
    let tile_elem = mma.map_or(dtype.into(), |m| m.0);
    let dq = empty(&q, vec![p.b, p.h, p.n, p.d], dtype);
    let dgates = if gated {
        empty(&q, vec![p.b, p.groups(), p.n, p.count], dtype)
    } else {
        dummy(&q, dtype)
    };
    // SAFETY: as the forward.
    unsafe {
        attn::attn_bwd_dq::launch_unchecked::<R>(
            &client,
            CubeCount::Static(p.n.div_ceil(t.tq) as u32, (p.b * p.groups()) as u32, 1),
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

    // the queries of every key block (selected mode)
    let mma = mma_for(&client, dtype, Pass::Dkdv, p);
    let t = tiling(p, Pass::Dkdv, budget, mma.map(|m| m.1)).expect("checked by `supported`");
    let tile_elem = mma.map_or(dtype.into(), |m| m.0);
    let nb = p.nk.div_ceil(p.sel.max(1));
    let (offsets, entries) = if p.mode == SELECTED && p.count > 0 {
        csr(&idx, p, nb)
    } else {
        (zeros_u32(&q, 2), zeros_u32(&q, 1))
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
    // SAFETY: as the forward; entries and offsets come from `csr`.
    unsafe {
        attn::attn_bwd_dkdv::launch_unchecked::<R>(
            &client,
            CubeCount::Static((chunks * splits) as u32, (p.b * p.kvh) as u32, 1),
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
            splits,
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
            [dtype.into(), tile_elem],
        );
    }
    let dk = empty(&dk_part, vec![p.b, p.kvh, p.nk, p.d], dtype);
    let dv = empty(&dk_part, vec![p.b, p.kvh, p.nk, p.d], dtype);
    for (part, out) in [(&dk_part, &dk), (&dv_part, &dv)] {
        // SAFETY: one unit per element, guarded by `len`; `part` holds `splits * len` values.
        unsafe {
            attn::sum_splits::launch_unchecked::<R>(
                &client,
                CubeCount::Static(len.div_ceil(256) as u32, 1, 1),
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
/// of the compressed branch are seen by almost every query (one cube walked 64k queries while
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
        SLIDING => 1,
        // about 256 query batches per cube for the first chunk
        COMPRESSED => p.n.div_ceil(tq.max(1) * 256),
        _ => p.n.div_ceil(4096),
    };
    let cap = ((64usize << 20) / len.max(1)).max(1);
    wanted.clamp(1, 32).min(cap)
}

/// For every `(batch, kv head, block)`, the selections `(head, query, slot)` that chose it, as
/// offsets `[b * kvh * nb + 1]` into a list of entries.
fn csr<R: CubeRuntime>(
    idx: &CubeTensor<R>,
    p: &Problem,
    nb: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let client = idx.client.clone();
    let segments = p.b * p.kvh * nb;
    let total = p.b * p.groups() * p.n * p.count;
    let counts = zeros_u32(idx, segments);
    let cursor = zeros_u32(idx, segments);
    let offsets = empty(idx, vec![segments + 1], DType::U32);
    let entries = empty(idx, vec![total.max(1)], DType::U32);
    let cubes = CubeCount::Static(total.div_ceil(256) as u32, 1, 1);
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
            p.groups(),
            p.kvh,
            p.count,
            nb,
            p.gq,
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
            p.groups(),
            p.kvh,
            p.count,
            nb,
            p.gq,
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
            CubeCount::Static(rows.div_ceil(64).max(1) as u32, 1, 1),
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

/// One decode step of a layer's attention ([`super::decode::nsa_decode`]).
pub use crate::api::DecodeShape as DecodeProblem;

/// The decode kernel's tiling for `p` within the shared-memory budget, if any.
fn decode_tiling(p: &DecodeProblem, budget: usize) -> Option<super::decode::DecodeTiling> {
    let mut kc = 32;
    loop {
        let mut t = super::decode::DecodeTiling {
            d: p.d,
            gq: p.gq,
            kc,
            nsel: p.nsel.max(1),
            fcap: 1,
            gated: p.gated,
            threads: THREADS,
            write: false,
        };
        let fixed = t.shared();
        // the rest holds the selection-block scores, in steps of 1024 (each a compiled kernel)
        let room = budget.saturating_sub(fixed) / 4 / 1024 * 1024;
        if room >= 1024 {
            t.fcap = room.min(8192);
            return Some(t);
        }
        if kc <= 8 {
            return None;
        }
        kc /= 2;
    }
}

/// Whether the decode kernel covers `p` (made by `DecodeShape::of`) on this device.
pub fn decode_supported<R: CubeRuntime>(client: &ComputeClient<R>, p: &DecodeProblem) -> bool {
    // the shapes fit together (`DecodeShape::of`); what is left is the shared memory
    decode_tiling(p, shared_budget(client)).is_some_and(|t| p.fine() <= t.fcap)
}

/// Runs the decode kernel: inputs `[qkv, cos, sin, ck, cv, k, v, gate logits]` (see
/// [`super::decode`]), output `[b, 1, h * d]` in `qkv`'s dtype.
pub fn decode<R: CubeRuntime>(inputs: [CubeTensor<R>; 8], p: &DecodeProblem) -> CubeTensor<R> {
    launch_decode(inputs.map(into_contiguous), None, p)
}

/// [`decode`] that first writes the new position into the caches, as [`decode_write`] (one
/// launch instead of two): inputs `[qkv, cos, sin, ck, cv]`, `buffers` `[kc, vc, tk, tv]` → the
/// output and the written buffers.
pub fn decode_writing<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 6],
    buffers: [CubeTensor<R>; 4],
    p: &DecodeProblem,
    w: &WriteProblem,
) -> (CubeTensor<R>, [CubeTensor<R>; 4]) {
    let [qkv, cos, sin, ck, cv, gates] = inputs.map(into_contiguous);
    let [kc, vc, tk, tv] = buffers.map(writable);
    let out = launch_decode(
        [qkv, cos, sin, ck, cv, kc.clone(), vc.clone(), gates],
        Some(([tk.clone(), tv.clone()], w)),
        p,
    );
    (out, [kc, vc, tk, tv])
}

fn launch_decode<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 8],
    write: Option<([CubeTensor<R>; 2], &WriteProblem)>,
    p: &DecodeProblem,
) -> CubeTensor<R> {
    let [qkv, cos, sin, ck, cv, k, v, gates] = inputs;
    let dtype = qkv.dtype;
    let mut t =
        decode_tiling(p, shared_budget(&qkv.client)).expect("checked by `decode_supported`");
    t.write = write.is_some();
    let out = empty(&qkv, vec![p.b, 1, p.h * p.d], dtype);
    let (ring, slot) = write.as_ref().map_or((0, 0), |(_, w)| (w.ring, w.slot));
    let [tk, tv] = match write {
        Some((ring, w)) => {
            debug_assert!(w.pos == p.pos && w.cap == p.cap, "one position, one cache");
            ring
        }
        None => [dummy(&qkv, dtype), dummy(&qkv, dtype)],
    };
    let client = qkv.client.clone();
    // SAFETY: rows read are below `nc <= capc` (compressed) and `pos < cap` (cache); the
    // selected blocks are complete blocks before the own one; `fine <= fcap`.
    unsafe {
        super::decode::nsa_decode::launch_unchecked::<R>(
            &client,
            CubeCount::Static((p.b * p.h / p.gq) as u32, 1, 1),
            CubeDim::new_1d(t.threads as u32),
            qkv.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            ck.into_tensor_arg(),
            cv.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            gates.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            tk.into_tensor_arg(),
            tv.into_tensor_arg(),
            ring,
            slot,
            p.width,
            p.h,
            p.kvh,
            p.pos,
            p.nc,
            p.capc,
            p.cap,
            p.mem,
            p.pf,
            p.sel,
            p.window,
            p.topn,
            p.scale as f32,
            (1.0 / (p.gq * p.pf) as f64) as f32,
            t,
            dtype.into(),
        );
    }
    out
}

/// A [`super::rows::row_linear`] launch: `m` rows of `din` features into `dout` columns, with
/// the norm (its weight and epsilon), bias, GELU and residual as given.
#[derive(Clone, Debug)]
pub struct RowProblem {
    pub m: usize,
    pub din: usize,
    pub dout: usize,
    /// The RMSNorm's epsilon, when the rows are normed first.
    pub norm_eps: Option<f64>,
    pub bias: bool,
    pub gelu: bool,
    pub residual: bool,
    /// A second matrix of the same normed rows ([`row_linear_pair`]): its columns and whether
    /// it has a bias.
    pub second: Option<(usize, bool)>,
}

/// Most rows of one [`row_linear`] launch (the batch of a decode step).
pub const MAX_ROWS: usize = 8;

fn row_tiling(p: &RowProblem, budget: usize) -> Option<super::rows::RowTiling> {
    if p.m == 0 || p.m > MAX_ROWS || p.din == 0 || p.dout == 0 {
        return None;
    }
    // 256 units a cube; narrow column tiles (8 columns: 32-byte row pieces of `W`) give the
    // small matrices of a decode block more cubes than the GPU has cores, wide ones (the
    // output head's 21,128 columns) fewer redundant norms
    let cols = if p.dout + p.second.map_or(0, |(d, _)| d) >= 8192 {
        32
    } else {
        8
    };
    let t = super::rows::RowTiling {
        din: p.din,
        rows: p.m.next_power_of_two(),
        cols,
        groups: 256 / cols,
        norm: p.norm_eps.is_some(),
        bias: p.bias,
        gelu: p.gelu,
        residual: p.residual,
        pair: p.second.is_some(),
        bias2: p.second.is_some_and(|(_, b)| b),
    };
    if p.second.is_some() && (p.gelu || p.residual) {
        return None;
    }
    (t.shared() <= budget).then_some(t)
}

/// Whether [`row_linear`] covers `p` on this device.
pub fn row_supported<R: CubeRuntime>(client: &ComputeClient<R>, p: &RowProblem) -> bool {
    row_tiling(p, shared_budget(client)).is_some()
}

/// A matrix `[rows, cols]` as the row kernel reads it, with its row stride: as it is when its
/// rows are dense (CUDA allocates some matrices with padded rows, e.g. `[512, 24]` with a row
/// stride of 32 and the `[512, 21128]` output head with 21248; copying those every token cost
/// a launch each, 43 MB for the head), else a contiguous copy.
fn dense_rows<R: CubeRuntime>(w: CubeTensor<R>) -> (CubeTensor<R>, usize) {
    let (shape, strides) = (w.meta.shape(), w.meta.strides());
    if shape.len() == 2 && strides[1] == 1 && strides[0] >= shape[1] {
        let ws = strides[0];
        return (w, ws);
    }
    let w = into_contiguous(w);
    let ws = *w.meta.shape().last().expect("rank >= 1");
    (w, ws)
}

/// `act(norm(x) · w + bias) + residual`: `x` `[m, din]`, `norm_w` `[din]`, `w` `[din, dout]`,
/// `bias` `[dout]`, `residual` `[m, dout]` (absent ones `None`) → `[m, dout]`.
pub fn row_linear<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm_w: Option<CubeTensor<R>>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    p: &RowProblem,
) -> CubeTensor<R> {
    row_linear_pair(x, norm_w, w, bias, residual, None, p).0
}

/// [`row_linear`], and with `second = (w2 [din, dout2], bias2)` also `norm(x) · w2 + bias2`
/// `[m, dout2]` in the same launch (`p.second` gives its sizes).
#[allow(clippy::type_complexity)]
pub fn row_linear_pair<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm_w: Option<CubeTensor<R>>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    second: Option<(CubeTensor<R>, Option<CubeTensor<R>>)>,
    p: &RowProblem,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    let (x, (w, ws)) = (into_contiguous(x), dense_rows(w));
    let dtype = x.dtype;
    let t = row_tiling(p, shared_budget(&x.client)).expect("checked by `row_supported`");
    let some =
        |o: Option<CubeTensor<R>>| o.map(into_contiguous).unwrap_or_else(|| dummy(&x, dtype));
    let (norm_w, bias, residual) = (some(norm_w), some(bias), some(residual));
    let mut shape = x.meta.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = p.dout;
    let out = empty(&x, shape.clone(), dtype);
    let dout2 = p.second.map_or(0, |(d, _)| d);
    let (w2, ws2, bias2, out2) = match second {
        Some((w2, bias2)) => {
            let (w2, ws2) = dense_rows(w2);
            *shape.last_mut().expect("rank >= 1") = dout2;
            (w2, ws2, some(bias2), Some(empty(&x, shape, dtype)))
        }
        None => (dummy(&x, dtype), 0, dummy(&x, dtype), None),
    };
    let out2_arg = out2.clone().unwrap_or_else(|| dummy(&x, dtype));
    let client = x.client.clone();
    // SAFETY: rows `< m`, columns `< dout` (`< dout2` of the second), features `< din`, as the
    // shapes given.
    unsafe {
        super::rows::row_linear::launch_unchecked::<R>(
            &client,
            CubeCount::Static((p.dout + dout2).div_ceil(t.cols) as u32, 1, 1),
            CubeDim::new_1d(t.threads() as u32),
            x.into_tensor_arg(),
            norm_w.into_tensor_arg(),
            w.into_tensor_arg(),
            bias.into_tensor_arg(),
            residual.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            w2.into_tensor_arg(),
            bias2.into_tensor_arg(),
            out2_arg.into_tensor_arg(),
            p.m,
            p.dout,
            ws,
            dout2,
            ws2,
            p.din as f32,
            p.norm_eps.unwrap_or(0.0) as f32,
            t,
            dtype.into(),
        );
    }
    (out, out2)
}

/// A [`super::rows::decode_write`] launch.
#[derive(Clone, Debug)]
pub struct WriteProblem {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    pub pos: usize,
    pub cap: usize,
    pub ring: usize,
    pub slot: usize,
}

/// A buffer the write may change: itself when nothing else holds it, else a copy.
fn writable<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.can_mut() && t.is_contiguous() {
        t
    } else {
        into_contiguous(t.copy())
    }
}

/// The decode step's cache writes from the projection row: inputs `[qkv, cos, sin]`, buffers
/// `[k cache, v cache, k ring, v ring]` (changed in place where nothing else holds them) → the
/// four buffers.
pub fn decode_write<R: CubeRuntime>(
    inputs: [CubeTensor<R>; 3],
    buffers: [CubeTensor<R>; 4],
    p: &WriteProblem,
) -> [CubeTensor<R>; 4] {
    let [qkv, cos, sin] = inputs.map(into_contiguous);
    let [kc, vc, tk, tv] = buffers.map(writable);
    let dtype = qkv.dtype;
    let total = p.b * p.kvh * p.d;
    let client = qkv.client.clone();
    // SAFETY: one unit per `(batch, kv head, feature)`, guarded by `total`; `pos < cap`,
    // `slot < ring`.
    unsafe {
        super::rows::decode_write::launch_unchecked::<R>(
            &client,
            CubeCount::Static(total.div_ceil(64) as u32, 1, 1),
            CubeDim::new_1d(64),
            qkv.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            kc.clone().into_tensor_arg(),
            vc.clone().into_tensor_arg(),
            tk.clone().into_tensor_arg(),
            tv.clone().into_tensor_arg(),
            total,
            (p.h + 2 * p.kvh) * p.d,
            p.h,
            p.kvh,
            p.pos,
            p.cap,
            p.ring,
            p.slot,
            p.d,
            dtype.into(),
        );
    }
    [kc, vc, tk, tv]
}

/// A [`super::sample::sample_rows`] launch: `m` rows of `v` logits.
#[derive(Clone, Debug)]
pub struct SampleProblem {
    pub m: usize,
    pub v: usize,
    pub rule: crate::api::DeviceSampling,
    pub key: u64,
}

/// Most logits a sampler unit holds in registers (beyond that every pass reads them again).
pub const SAMPLE_REGISTERS: usize = 32;

/// The next token of each row of `logits` `[m, v]` → `[m]` in `int_dtype`.
pub fn sample<R: CubeRuntime>(
    logits: CubeTensor<R>,
    p: &SampleProblem,
    int_dtype: DType,
) -> CubeTensor<R> {
    let logits = into_contiguous(logits);
    let dtype = logits.dtype;
    let out = empty(&logits, vec![p.m], int_dtype);
    let kept = p.rule.kept.clamp(1, p.v.max(1));
    // 1024 units where the device has them: each unit then scans 4x fewer logits per pass
    let big = logits.client.properties().hardware.max_units_per_cube >= 1024;
    let group = if big { 32 } else { 16 };
    let filter = !p.rule.greedy && kept < p.v;
    let per = p.v.div_ceil(group * group);
    let tiling = super::sample::SampleTiling {
        group,
        greedy: p.rule.greedy,
        filter,
        per: if filter && per <= SAMPLE_REGISTERS {
            per
        } else {
            0
        },
    };
    let bits = usize::BITS - p.v.leading_zeros();
    let client = logits.client.clone();
    // SAFETY: one cube per row (`m`), every index `< v` of its row; one id written per row.
    unsafe {
        super::sample::sample_rows::launch_unchecked::<R>(
            &client,
            CubeCount::Static(p.m as u32, 1, 1),
            CubeDim::new_1d((group * group) as u32),
            logits.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            p.v,
            kept as u32,
            bits,
            p.rule.inv_temp,
            p.key as u32,
            (p.key >> 32) as u32,
            tiling,
            [dtype.into(), int_dtype.into()],
        );
    }
    out
}

/// The tensors of one [`decode_block`] (see `NsaKernels::decode_block`): absent biases and
/// norms `None`.
pub struct BlockTensors<T> {
    /// `[b, 1, dim]`.
    pub x: T,
    pub norm: Option<T>,
    pub w_qkv: T,
    pub b_qkv: Option<T>,
    pub w_gates: T,
    pub b_gates: Option<T>,
    pub cos: T,
    pub sin: T,
    /// `[k cache, v cache, k ring, v ring]`, written (in place where nothing else holds them).
    pub buffers: [T; 4],
    pub ck: T,
    pub cv: T,
    pub w_comb: T,
    pub b_comb: Option<T>,
    pub ff: Option<FfTensors<T>>,
}

/// The feed-forward of a [`BlockTensors`].
pub struct FfTensors<T> {
    pub norm: T,
    pub w1: T,
    pub b1: Option<T>,
    pub w2: T,
    pub b2: Option<T>,
}

/// Which optional tensors a flattened [`BlockTensors`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub norm: bool,
    pub b_qkv: bool,
    pub b_gates: bool,
    pub b_comb: bool,
    pub ff: Option<(bool, bool)>,
}

impl<T> BlockTensors<T> {
    /// The tensors in a fixed order, and which optional ones are there.
    pub fn flatten(self) -> (Vec<T>, BlockLayout) {
        let layout = BlockLayout {
            norm: self.norm.is_some(),
            b_qkv: self.b_qkv.is_some(),
            b_gates: self.b_gates.is_some(),
            b_comb: self.b_comb.is_some(),
            ff: self.ff.as_ref().map(|f| (f.b1.is_some(), f.b2.is_some())),
        };
        let mut v = vec![self.x];
        v.extend(self.norm);
        v.push(self.w_qkv);
        v.extend(self.b_qkv);
        v.push(self.w_gates);
        v.extend(self.b_gates);
        v.extend([self.cos, self.sin]);
        v.extend(self.buffers);
        v.extend([self.ck, self.cv, self.w_comb]);
        v.extend(self.b_comb);
        if let Some(f) = self.ff {
            v.extend([f.norm, f.w1]);
            v.extend(f.b1);
            v.push(f.w2);
            v.extend(f.b2);
        }
        (v, layout)
    }

    /// [`BlockTensors::flatten`] undone.
    pub fn unflatten(v: Vec<T>, l: &BlockLayout) -> Self {
        let mut it = v.into_iter();
        let mut next = || it.next().expect("a flattened block tensor");
        let x = next();
        let norm = l.norm.then(&mut next);
        let w_qkv = next();
        let b_qkv = l.b_qkv.then(&mut next);
        let w_gates = next();
        let b_gates = l.b_gates.then(&mut next);
        let (cos, sin) = (next(), next());
        let buffers = [next(), next(), next(), next()];
        let (ck, cv, w_comb) = (next(), next(), next());
        let b_comb = l.b_comb.then(&mut next);
        let ff = l.ff.map(|(b1, b2)| {
            let (norm, w1) = (next(), next());
            let b1 = b1.then(&mut next);
            let w2 = next();
            let b2 = b2.then(&mut next);
            FfTensors {
                norm,
                w1,
                b1,
                w2,
                b2,
            }
        });
        Self {
            x,
            norm,
            w_qkv,
            b_qkv,
            w_gates,
            b_gates,
            cos,
            sin,
            buffers,
            ck,
            cv,
            w_comb,
            b_comb,
            ff,
        }
    }
}

/// The launches of one [`decode_block`], each checked on its own.
#[derive(Clone, Debug)]
pub struct BlockProblem {
    /// `to_qkv` with the gate projection as its second matrix.
    pub pair: RowProblem,
    pub write: WriteProblem,
    pub decode: DecodeProblem,
    /// `combine_heads` with the residual.
    pub combine: RowProblem,
    /// `fc1` (normed, GELU) and `fc2` (residual).
    pub ff: Option<(RowProblem, RowProblem)>,
}

/// One decode step of an NSA block (see `NsaKernels::decode_block`): the launches of the
/// separate operations in sequence, as one operation of the caller's stream → the block's
/// output `[b, 1, dim]` and the written buffers.
pub fn decode_block<R: CubeRuntime>(
    t: BlockTensors<CubeTensor<R>>,
    p: &BlockProblem,
) -> (CubeTensor<R>, [CubeTensor<R>; 4]) {
    let (qkv, gates) = row_linear_pair(
        t.x.clone(),
        t.norm,
        t.w_qkv,
        t.b_qkv,
        None,
        Some((t.w_gates, t.b_gates)),
        &p.pair,
    );
    let gates = gates.expect("a second output");
    let (att, [kc, vc, tk, tv]) = decode_writing(
        [qkv, t.cos, t.sin, t.ck, t.cv, gates],
        t.buffers,
        &p.decode,
        &p.write,
    );
    let h = row_linear(att, None, t.w_comb, t.b_comb, Some(t.x), &p.combine);
    let out = match (t.ff, &p.ff) {
        (Some(f), Some((p1, p2))) => {
            let hidden = row_linear(h.clone(), Some(f.norm), f.w1, f.b1, None, p1);
            row_linear(hidden, None, f.w2, f.b2, Some(h), p2)
        }
        _ => h,
    };
    (out, [kc, vc, tk, tv])
}
