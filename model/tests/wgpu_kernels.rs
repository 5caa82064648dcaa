//! The fused CubeCL kernels (feature `kernels`) against the tensor-op path, on wgpu (software
//! Vulkan in CI; tiny shapes). The oracle runs the tensor ops on the CPU backend (ndarray) from
//! the same host data, so no global switch is flipped while tests run in parallel.
//!
//! `cargo test -p nsa-model --features wgpu,kernels --test wgpu_kernels`
#![cfg(all(feature = "wgpu", feature = "kernels"))]

mod common;

use burn::backend::wgpu::{Wgpu, WgpuDevice, WgpuRuntime};
use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use common::*;
use nsa_model::compress::Compressor;
use nsa_model::interop::HostTensor;
use nsa_model::kernels::cube::PACK_BELOW;
use nsa_model::kernels::{KernelOptions, Kernels, Projection, SelectedOrder};
use nsa_model::select::{selected_attention, Selection};
use nsa_model::sliding::sliding_attention;
use nsa_model::{kernels, NsaConfig};

/// The inference backend's autodiff: `Fusion<CubeBackend>` when Burn's `fusion` feature is on
/// (as in the binaries and the workspace test build), the plain `CubeBackend` otherwise.
type Gpu = Autodiff<Wgpu>;
/// The plain `CubeBackend` (no fusion), checked too when `Gpu` is the fused one.
type Plain = Autodiff<burn::backend::wgpu::CubeBackend<WgpuRuntime, f32, i32, u32>>;
type Cpu = Autodiff<NdArray>;

fn register() {
    kernels::register_cube::<WgpuRuntime, f32, i32, u32>();
}

/// Whether `B` is one of the GPU backends under test, whose kernels must then be registered
/// and on (asserted, so that a broken registration cannot turn a kernel check into tensor ops
/// against tensor ops); the CPU oracle must have none.
fn expect_kernels<B: Backend>() -> bool {
    let gpu = std::any::type_name::<B>().contains("Wgpu")
        || std::any::type_name::<B>().contains("CubeBackend");
    if gpu {
        assert!(
            kernels::registered::<B>(),
            "no kernels registered for {}",
            std::any::type_name::<B>()
        );
    } else {
        assert!(
            !kernels::registered::<B>(),
            "the CPU oracle {} must run tensor ops",
            std::any::type_name::<B>()
        );
    }
    gpu
}

/// Deterministic pseudo-random numbers in `[-1, 1)`.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f64) as usize % n.max(1)
    }
    fn host(&mut self, shape: &[usize]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            values: (0..shape.iter().product::<usize>())
                .map(|_| self.next() as f32)
                .collect(),
        }
    }
}

/// Selected blocks of every query: distinct complete blocks before its own block; when too few
/// exist the rest are invalid (random index, as a top-k over zero probabilities would give).
struct HostSelection {
    shape: [usize; 4],
    indices: Vec<i64>,
    valid: Vec<bool>,
    scores: HostTensor,
}

fn random_selection(
    rng: &mut Rng,
    b: usize,
    hs: usize,
    n: usize,
    sel: usize,
    count: usize,
) -> HostSelection {
    let mut indices = Vec::new();
    let mut valid = Vec::new();
    let mut scores = Vec::new();
    for _ in 0..b * hs {
        for t in 0..n {
            let avail = t / sel;
            let mut chosen: Vec<usize> = Vec::new();
            for _ in 0..count {
                if chosen.len() < avail {
                    let mut c = rng.below(avail);
                    while chosen.contains(&c) {
                        c = (c + 1) % avail;
                    }
                    chosen.push(c);
                    indices.push(c as i64);
                    valid.push(true);
                } else {
                    indices.push(rng.below(n.div_ceil(sel)) as i64);
                    valid.push(false);
                }
                scores.push((rng.next() as f32 + 1.0) * 0.5);
            }
        }
    }
    HostSelection {
        shape: [b, hs, n, count],
        indices,
        valid,
        scores: HostTensor {
            shape: vec![b, hs, n, count],
            values: scores,
        },
    }
}

struct Grads {
    out: HostTensor,
    dq: HostTensor,
    dk: HostTensor,
    dv: HostTensor,
    dscores: Option<HostTensor>,
}

#[allow(clippy::too_many_arguments)]
fn run_selected<B: AutodiffBackend>(
    device: &B::Device,
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    w: &HostTensor,
    selection: Option<&HostSelection>,
    config: &NsaConfig,
    scale: f64,
    opts: &KernelOptions,
) -> Grads {
    let handle = Kernels::<B>::new(opts);
    let q = to_tensor::<B, 4>(q, device).require_grad();
    let k = to_tensor::<B, 4>(k, device).require_grad();
    let v = to_tensor::<B, 4>(v, device).require_grad();
    let scores = selection.map(|s| to_tensor::<B, 4>(&s.scores, device).require_grad());
    let sel = selection.map(|s| Selection {
        indices: Tensor::from_data(TensorData::new(s.indices.clone(), s.shape), device),
        valid: Tensor::from_data(TensorData::new(s.valid.clone(), s.shape), device),
        scores: scores.clone().unwrap(),
    });
    if expect_kernels::<B>() {
        // the fused path really runs for this case
        let fused = handle.fused().unwrap().selected_attention(
            &q,
            &k,
            &v,
            sel.as_ref(),
            0,
            &config.sizes(),
            scale,
        );
        assert!(fused.is_some(), "the selected-attention kernel declined");
    }
    let out = selected_attention(
        &handle,
        q.clone(),
        k.clone(),
        v.clone(),
        sel,
        0,
        config,
        scale,
    );
    let loss = (out.clone() * to_tensor::<B, 4>(w, device)).sum();
    let grads = loss.backward();
    Grads {
        out: HostTensor::from_tensor(out),
        dq: HostTensor::from_tensor(q.grad(&grads).unwrap()),
        dk: HostTensor::from_tensor(k.grad(&grads).unwrap()),
        dv: HostTensor::from_tensor(v.grad(&grads).unwrap()),
        dscores: scores
            .filter(|_| config.use_diff_topk)
            .map(|s| HostTensor::from_tensor(s.grad(&grads).unwrap())),
    }
}

/// `ours` within `tol` of `reference`, relative to the reference's largest magnitude
/// ([`rel_err`], floor [`FLOOR`]); fails on NaN.
fn check(name: &str, what: &str, ours: &HostTensor, reference: &HostTensor, tol: f64) {
    let err = rel_err(ours, reference);
    println!("{name:40} {what:8} rel err {err:.2e}");
    assert!(err <= tol, "{name} {what}: relative error {err}");
}

#[test]
fn selected_attention_kernel_matches_tensor_ops() {
    selected_cases::<Gpu>(&KernelOptions::default());
}

/// With Burn's `fusion` on, every kernel also on the plain backend (the other registration).
#[test]
#[cfg(feature = "fusion")]
fn kernels_without_fusion_match_tensor_ops() {
    assert_ne!(
        std::any::TypeId::of::<Gpu>(),
        std::any::TypeId::of::<Plain>(),
        "Wgpu is the fused backend here"
    );
    selected_cases::<Plain>(&KernelOptions::default());
    sliding_cases::<Plain>(&KernelOptions::default());
    compressed_cases::<Plain>(&KernelOptions::default());
}

/// What a selected case ran when asked to run by key block (the forward: one selection per kv
/// head; dq: also some blocks selected and no gates), and our output and dq.
struct ByBlockCase {
    forward: bool,
    dq: bool,
    out: HostTensor,
}

/// Every selected case against the tensor ops.
fn selected_cases<G: AutodiffBackend<Device = WgpuDevice>>(
    opts: &KernelOptions,
) -> Vec<ByBlockCase> {
    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let mut rng = Rng(7);
    let mut outs = Vec::new();
    // (heads, kv heads, n, d, sel, count, share, diff top-k)
    let cases = [
        (4, 1, 37, 8, 8, 2, true, false),
        (4, 2, 45, 8, 8, 3, true, true),
        (4, 4, 29, 16, 4, 2, true, false),
        (4, 2, 41, 8, 8, 2, false, true),
        (2, 1, 20, 8, 16, 2, true, false),
        (4, 2, 19, 8, 8, 0, true, false),
        // blocks packed several to a chunk (DSA's one-token blocks): two chunks, one padded
        (4, 2, 70, 8, 1, 40, true, false),
        (2, 2, 33, 8, 2, 20, false, false),
        // short gated blocks stay one to a chunk
        (4, 2, 27, 8, 2, 5, true, true),
    ];
    for (i, &(h, kvh, n, d, sel, count, share, diff)) in cases.iter().enumerate() {
        let b = if i % 2 == 0 { 1 } else { 2 };
        let mut config =
            NsaConfig::new(h * d, d, h, 8, sel, sel, sel, count.max(1)).with_kv_heads(kvh);
        config.query_heads_share_selected_kv = share;
        config.use_diff_topk = diff;
        let hs = if share { kvh } else { h };
        let q = rng.host(&[b, h, n, d]);
        let k = rng.host(&[b, kvh, n, d]);
        let v = rng.host(&[b, kvh, n, d]);
        let w = rng.host(&[b, h, n, d]);
        let selection = (count > 0).then(|| random_selection(&mut rng, b, hs, n, sel, count));
        let scale = (d as f64).powf(-0.5);
        let name = format!("selected h{h} kv{kvh} n{n} d{d} sel{sel} c{count} s{share} g{diff}");
        let ours = run_selected::<G>(
            &gpu,
            &q,
            &k,
            &v,
            &w,
            selection.as_ref(),
            &config,
            scale,
            opts,
        );
        let reference = run_selected::<Cpu>(
            &cpu,
            &q,
            &k,
            &v,
            &w,
            selection.as_ref(),
            &config,
            scale,
            opts,
        );
        check(&name, "out", &ours.out, &reference.out, 1e-4);
        check(&name, "dq", &ours.dq, &reference.dq, 1e-4);
        check(&name, "dk", &ours.dk, &reference.dk, 1e-4);
        check(&name, "dv", &ours.dv, &reference.dv, 1e-4);
        if let (Some(a), Some(r)) = (&ours.dscores, &reference.dscores) {
            check(&name, "dgates", a, r, 1e-4);
        }
        // by block where a selection is a kv head's and the blocks are not packed
        let forward = (share || kvh == h) && sel >= PACK_BELOW;
        outs.push(ByBlockCase {
            forward,
            dq: forward && count > 0 && !diff,
            out: ours.out,
        });
    }
    outs
}

/// The selected branch by key block (forward: per-block partials merged per query; dq: the
/// dk/dv kernel's per-slot partials summed, in the ungated cases), asked for, against the tensor
/// ops. That the forward really ran by block: where the shape allows it, the output differs in
/// the last bits from the query-centric kernel's (another order of sums); where it does not,
/// the launch runs by query and the outputs are identical. (dq differs wherever the forward
/// does, through `lse`; which cases take dq by block is the unit test of the launch's rule.)
#[test]
fn selected_attention_by_block_matches_tensor_ops() {
    let order = |selected_order| KernelOptions {
        selected_order,
        ..Default::default()
    };
    let blocks = selected_cases::<Gpu>(&order(SelectedOrder::ByBlock));
    let queries = selected_cases::<Gpu>(&order(SelectedOrder::ByQuery));
    assert!(blocks.iter().any(|c| c.forward) && blocks.iter().any(|c| c.dq));
    for (i, (a, q)) in blocks.iter().zip(&queries).enumerate() {
        let out = a.out.values != q.out.values;
        assert_eq!(
            a.forward, out,
            "case {i}: forward by block {}, out differs {out}",
            a.forward
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn run_sliding<B: AutodiffBackend>(
    device: &B::Device,
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    w: &HostTensor,
    window: usize,
    scale: f64,
    opts: &KernelOptions,
) -> Grads {
    let handle = Kernels::<B>::new(opts);
    let q = to_tensor::<B, 4>(q, device).require_grad();
    let k = to_tensor::<B, 4>(k, device).require_grad();
    let v = to_tensor::<B, 4>(v, device).require_grad();
    if expect_kernels::<B>() {
        let fused = handle
            .fused()
            .unwrap()
            .sliding_attention(&q, &k, &v, 0, window, scale);
        assert!(fused.is_some(), "the sliding-window kernel declined");
    }
    let out = sliding_attention(&handle, q.clone(), k.clone(), v.clone(), 0, window, scale);
    let loss = (out.clone() * to_tensor::<B, 4>(w, device)).sum();
    let grads = loss.backward();
    Grads {
        out: HostTensor::from_tensor(out),
        dq: HostTensor::from_tensor(q.grad(&grads).unwrap()),
        dk: HostTensor::from_tensor(k.grad(&grads).unwrap()),
        dv: HostTensor::from_tensor(v.grad(&grads).unwrap()),
        dscores: None,
    }
}

#[test]
fn sliding_attention_kernel_matches_tensor_ops() {
    sliding_cases::<Gpu>(&KernelOptions::default());
}

fn sliding_cases<G: AutodiffBackend<Device = WgpuDevice>>(opts: &KernelOptions) {
    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let mut rng = Rng(11);
    // (heads, kv heads, n, d, window)
    for &(h, kvh, n, d, window) in &[
        (4, 1, 50, 8, 8),
        (4, 2, 33, 8, 16),
        (2, 2, 70, 16, 5),
        (4, 4, 9, 8, 32),
    ] {
        let b = 2;
        let q = rng.host(&[b, h, n, d]);
        let k = rng.host(&[b, kvh, n, d]);
        let v = rng.host(&[b, kvh, n, d]);
        let w = rng.host(&[b, h, n, d]);
        let scale = (d as f64).powf(-0.5);
        let name = format!("sliding h{h} kv{kvh} n{n} d{d} w{window}");
        let ours = run_sliding::<G>(&gpu, &q, &k, &v, &w, window, scale, opts);
        let reference = run_sliding::<Cpu>(&cpu, &q, &k, &v, &w, window, scale, opts);
        check(&name, "out", &ours.out, &reference.out, 1e-4);
        check(&name, "dq", &ours.dq, &reference.dq, 1e-4);
        check(&name, "dk", &ours.dk, &reference.dk, 1e-4);
        check(&name, "dv", &ours.dv, &reference.dv, 1e-4);
    }
}

/// A dense attention layer (`attention = "full"`) with the given weights `[wq, wk, wv, wo,
/// norm]`: its output for `x` and the gradients of `x` and of the query projection under the
/// loss `sum(out * w)`.
fn run_full<B: AutodiffBackend>(
    device: &B::Device,
    weights: [&HostTensor; 5],
    x: &HostTensor,
    w: &HostTensor,
    [heads, kv_heads, dim_head]: [usize; 3],
) -> [HostTensor; 3] {
    let [wq, wk, wv, wo, nw] = weights;
    let layer = nsa_model::FullAttention::<B> {
        norm: norm_on(nw, device),
        to_q: linear_on(wq, None, 0, device),
        to_k: linear_on(wk, None, 0, device),
        to_v: linear_on(wv, None, 0, device),
        to_out: linear_on(wo, None, 0, device),
        heads,
        kv_heads,
        dim_head,
        kernel_options: KernelOptions::default(),
    };
    let handle = Kernels::<B>::new(&KernelOptions::default());
    let [b, n, _] = [x.shape[0], x.shape[1], x.shape[2]];
    if expect_kernels::<B>() {
        // the layer's fused path: the sliding-window kernel over the whole sequence
        let q = Tensor::<B, 4>::zeros([b, heads, n, dim_head], device);
        let k = Tensor::<B, 4>::zeros([b, kv_heads, n, dim_head], device);
        let fused = handle
            .fused()
            .unwrap()
            .sliding_attention(&q, &k, &k, 0, n, 1.0);
        assert!(fused.is_some(), "the kernel declined dense attention");
    }
    let x = to_tensor::<B, 3>(x, device).require_grad();
    let out = layer.forward_with(&handle, x.clone());
    let grads = (out.clone() * to_tensor::<B, 3>(w, device))
        .sum()
        .backward();
    [
        HostTensor::from_tensor(out),
        HostTensor::from_tensor(x.grad(&grads).unwrap()),
        HostTensor::from_tensor(layer.to_q.weight.val().grad(&grads).unwrap()),
    ]
}

/// Dense causal attention on the fused kernel (no `[n, n]` scores) against the tensor ops, with
/// GQA (the reference's pairing of query head `i` with kv head `i % kv_heads`) and without.
#[test]
fn full_attention_kernel_matches_tensor_ops() {
    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let mut rng = Rng(31);
    // (heads, kv heads, n, dim_head)
    for &(h, kvh, n, d) in &[(4, 2, 37, 8), (2, 2, 70, 16), (4, 1, 19, 8)] {
        let dim = 16;
        let weights = [
            rng.host(&[dim, h * d]),
            rng.host(&[dim, kvh * d]),
            rng.host(&[dim, kvh * d]),
            rng.host(&[h * d, dim]),
            rng.host(&[dim]),
        ];
        let x = rng.host(&[2, n, dim]);
        let w = rng.host(&[2, n, dim]);
        let ws = [
            &weights[0],
            &weights[1],
            &weights[2],
            &weights[3],
            &weights[4],
        ];
        let ours = run_full::<Gpu>(&gpu, ws, &x, &w, [h, kvh, d]);
        let reference = run_full::<Cpu>(&cpu, ws, &x, &w, [h, kvh, d]);
        let name = format!("full h{h} kv{kvh} n{n} d{d}");
        for (what, (a, r)) in ["out", "dx", "dwq"].iter().zip(ours.iter().zip(&reference)) {
            check(&name, what, a, r, 1e-4);
        }
    }
}

struct CompressedRun {
    out: HostTensor,
    dq: HostTensor,
    dck: HostTensor,
    dcv: HostTensor,
    /// per (batch, selection head, query): valid blocks and their probabilities, by block
    selection: Option<Vec<Vec<(i64, f32)>>>,
}

fn run_compressed<B: AutodiffBackend>(
    device: &B::Device,
    tensors: [&HostTensor; 4],
    config: &NsaConfig,
    scale: f64,
    opts: &KernelOptions,
) -> CompressedRun {
    let handle = Kernels::<B>::new(opts);
    let [q, ck, cv, w] = tensors;
    let q = to_tensor::<B, 4>(q, device).require_grad();
    let ck = to_tensor::<B, 4>(ck, device).require_grad();
    let cv = to_tensor::<B, 4>(cv, device).require_grad();
    let compressor = Compressor::<B>::new(config, device);
    if expect_kernels::<B>() {
        let fused = handle.fused().unwrap().compressed_and_selection(
            &q,
            &ck,
            &cv,
            0,
            compressor.num_mem(),
            &config.sizes(),
            scale,
        );
        assert!(fused.is_some(), "the compressed kernel declined");
    }
    let (out, selection) =
        compressor.attend_and_select(&handle, q.clone(), ck.clone(), cv.clone(), 0, config, scale);
    let loss = (out.clone() * to_tensor::<B, 4>(w, device)).sum();
    let grads = loss.backward();
    let selection = selection.map(|s| {
        let [b, hs, n, k] = s.indices.dims();
        let idx: Vec<i64> = s.indices.into_data().convert::<i64>().into_vec().unwrap();
        let valid: Vec<bool> = s.valid.into_data().convert::<bool>().into_vec().unwrap();
        let scores = HostTensor::from_tensor(s.scores).values;
        (0..b * hs * n)
            .map(|row| {
                let mut v: Vec<(i64, f32)> = (0..k)
                    .filter(|&i| valid[row * k + i])
                    .map(|i| (idx[row * k + i], scores[row * k + i]))
                    .collect();
                v.sort_by_key(|e| e.0);
                v
            })
            .collect()
    });
    CompressedRun {
        out: HostTensor::from_tensor(out),
        dq: HostTensor::from_tensor(q.grad(&grads).unwrap()),
        dck: HostTensor::from_tensor(ck.grad(&grads).unwrap()),
        dcv: HostTensor::from_tensor(cv.grad(&grads).unwrap()),
        selection,
    }
}

#[test]
fn compressed_attention_and_selection_kernel_match_tensor_ops() {
    compressed_cases::<Gpu>(&KernelOptions::default());
}

/// Every attention kernel with its grid folded: at most 3 cubes along a grid dimension (the
/// device's limit, 65,535 on Vulkan and Metal, stands in for it at long sequences), so the
/// launches fold their cubes into a second dimension and the padding cubes end at once.
#[test]
fn kernels_fold_grids_longer_than_the_device_allows() {
    let folded = KernelOptions {
        grid_limit: 3,
        ..Default::default()
    };
    selected_cases::<Gpu>(&folded);
    selected_cases::<Gpu>(&KernelOptions {
        selected_order: SelectedOrder::ByBlock,
        ..folded
    });
    sliding_cases::<Gpu>(&folded);
    compressed_cases::<Gpu>(&folded);
}

/// The dk/dv kernel (and the by-block forward) with every key chunk's queries split over 3
/// cubes (partial sums), which only long sequences choose on their own. The split does not change the result, so the
/// other tests of this binary stay valid whichever setting they see.
#[test]
fn dkdv_kernel_with_split_query_lists_matches_tensor_ops() {
    let split = KernelOptions {
        dkdv_splits: 3,
        ..Default::default()
    };
    selected_cases::<Gpu>(&split);
    compressed_cases::<Gpu>(&split);
    // the by-block forward splits a block's queries the same way
    selected_cases::<Gpu>(&KernelOptions {
        selected_order: SelectedOrder::ByBlock,
        ..split
    });
}

fn compressed_cases<G: AutodiffBackend<Device = WgpuDevice>>(opts: &KernelOptions) {
    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let mut rng = Rng(23);
    // (heads, kv heads, n, d, stride, selection block, memory slots, selected, share)
    for &(h, kvh, n, d, stride, sel, mem, count, share) in &[
        (4, 2, 77, 8, 4, 8, 1, 2, true),
        (4, 1, 64, 8, 4, 4, 2, 3, true),
        (4, 2, 90, 8, 4, 12, 1, 2, false),
        (2, 2, 40, 16, 8, 16, 1, 4, true),
        (4, 4, 10, 8, 16, 16, 1, 2, true),
    ] {
        let b = 2;
        let mut config =
            NsaConfig::new(h * d, d, h, 8, stride, stride, sel, count).with_kv_heads(kvh);
        config.query_heads_share_selected_kv = share;
        config.num_compressed_mem_kv = mem;
        let slots = mem + n / stride;
        let q = rng.host(&[b, h, n, d]);
        let ck = rng.host(&[b, kvh, slots, d]);
        let cv = rng.host(&[b, kvh, slots, d]);
        let w = rng.host(&[b, h, n, d]);
        let scale = (d as f64).powf(-0.5);
        let name = format!("compressed h{h} kv{kvh} n{n} d{d} s{stride} sel{sel} m{mem} c{count}");
        let ours = run_compressed::<G>(&gpu, [&q, &ck, &cv, &w], &config, scale, opts);
        let reference = run_compressed::<Cpu>(&cpu, [&q, &ck, &cv, &w], &config, scale, opts);
        check(&name, "out", &ours.out, &reference.out, 1e-4);
        check(&name, "dq", &ours.dq, &reference.dq, 1e-4);
        check(&name, "dck", &ours.dck, &reference.dck, 1e-4);
        check(&name, "dcv", &ours.dcv, &reference.dcv, 1e-4);
        match (&ours.selection, &reference.selection) {
            (None, None) => println!("{name:40} no selection"),
            (Some(a), Some(r)) => {
                assert_eq!(a.len(), r.len());
                let mut worst = 0.0f32;
                for (row, (a, r)) in a.iter().zip(r).enumerate() {
                    let ia: Vec<i64> = a.iter().map(|e| e.0).collect();
                    let ir: Vec<i64> = r.iter().map(|e| e.0).collect();
                    assert_eq!(ia, ir, "{name}: selected blocks of row {row}");
                    for (x, y) in a.iter().zip(r) {
                        let d = (x.1 - y.1).abs();
                        // a NaN stays the worst
                        if d.is_nan() || d > worst {
                            worst = d;
                        }
                    }
                }
                println!("{name:40} selection equal, scores max abs err {worst:.2e}");
                assert!(worst <= 1e-5, "{name}: scores {worst}");
            }
            _ => panic!("{name}: one path selected, the other did not"),
        }
    }
}

#[test]
fn layer_fixtures_match_the_reference_with_kernels() {
    register();
    assert!(kernels::registered::<Gpu>());
    let device = WgpuDevice::default();
    // every layer fixture: GQA 1/2/4, overlapping blocks, no/many selected blocks, memory
    // slots, differentiable top-k, lengths that are not multiples of the blocks
    for name in layer_fixtures() {
        let name = name.as_str();
        let e = layer_errors::<Gpu>(name, &device);
        println!(
            "wgpu+kernels {name:28} output {:.2e}  grad(input) {:.2e}  grad(params) {:.2e} ({})",
            e.output, e.grad_input, e.grad_params.0, e.grad_params.1
        );
        assert!(e.within(WGPU_TOLERANCE), "{name}: {e:?}");
    }
}

#[test]
fn top_k_kernel_matches_burn_topk() {
    register();
    let device = WgpuDevice::default();
    let handle = Kernels::<Wgpu>::new(&KernelOptions::default());
    let kernels = handle
        .fused()
        .expect("registered for the inference backend");
    let mut rng = Rng(11);
    for (shape, k) in [([2, 3, 5, 37], 4), ([1, 2, 3, 16], 16), ([1, 1, 2, 9], 1)] {
        let host = rng.host(&shape);
        let x = to_tensor::<Wgpu, 4>(&host, &device);
        let (values, indices) = kernels.top_k(&x, k).expect("covered");
        let (want_v, want_i) =
            nsa_model::select::top_blocks(to_tensor::<NdArray, 4>(&host, &Default::default()), k);
        let got_i: Vec<i64> = indices.into_data().convert::<i64>().to_vec().unwrap();
        let want_i: Vec<i64> = want_i.into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(got_i, want_i, "indices, shape {shape:?}, k {k}");
        check(
            "top_k",
            "values",
            &HostTensor::from_tensor(values),
            &HostTensor::from_tensor(want_v),
            0.0,
        );
    }
    // ties: the lower index first; k > len is not covered
    let x = Tensor::<Wgpu, 4>::from_data(
        TensorData::new(vec![0.5f32, 1.0, 0.5, 1.0, 0.0], [1, 1, 1, 5]),
        &device,
    );
    let (_, indices) = kernels.top_k(&x, 3).expect("covered");
    let got: Vec<i64> = indices.into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!(got, vec![1, 3, 0]);
    assert!(kernels.top_k(&x, 6).is_none());
    // a long row of exact ties, as the host rule orders it
    let row: Vec<f32> = (0..40).map(|i| [0.5, 0.1, 0.2, 0.9, 0.3][i % 5]).collect();
    let x = Tensor::<Wgpu, 4>::from_data(TensorData::new(row, [1, 1, 1, 40]), &device);
    let (_, indices) = kernels.top_k(&x, 11).expect("covered");
    let got: Vec<i64> = indices.into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!(got, vec![3, 8, 13, 18, 23, 28, 33, 38, 0, 5, 10]);
}

/// Exact ties of the block importance break the same way on every path (the lower block
/// first, `select::select_top`): one-token compression and selection blocks over one repeated
/// token make every complete block's key equal in the first layer, so every query's top-n is
/// a choice among exact ties; the blocks differ only in their positions (rotated keys of the
/// selected branch), so another choice changes the output. The CPU's tensor ops (forward and
/// cached decoding), the fused kernels' forward on wgpu and the decode kernel must agree.
#[test]
fn exact_ties_select_the_same_blocks_on_every_path() {
    use burn::module::Module;
    use common::random::Randomise;

    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let mut c = nsa_model::TransformerConfig::new(40, 16, 1);
    c.dim_head = 8;
    c.heads = 2;
    c.kv_heads = Some(1);
    let s = &mut c.sparse;
    s.sliding_window_size = 1;
    s.compress_block_size = 1;
    s.compress_block_sliding_stride = 1;
    s.selection_block_size = 1;
    s.num_selected_blocks = 3;
    let cpu_model = c
        .init::<NdArray>(&cpu)
        .unwrap()
        .map(&mut Randomise::<NdArray> {
            device: cpu,
            std: 0.5,
        });
    let gpu_model = c
        .init::<Wgpu>(&gpu)
        .unwrap()
        .load_reference(cpu_model.reference_state())
        .unwrap();
    // 30 equal tokens: rows of up to 29 tied blocks (longer than Burn's insertion-sort rows)
    let (total, prompt) = (30, 4);
    let data = TensorData::new(vec![7i64; total], [1, total]);
    let cpu_ids = Tensor::<NdArray, 2, Int>::from_data(data.clone(), &cpu);
    let gpu_ids = Tensor::<Wgpu, 2, Int>::from_data(data, &gpu);
    let want = HostTensor::from_tensor(cpu_model.forward(cpu_ids.clone()));
    let got = HostTensor::from_tensor(gpu_model.forward(gpu_ids.clone()));
    let err = max_abs_diff(&got, &want);
    println!("exact ties: fused forward vs CPU tensor ops {err:.2e}");
    assert!(
        err <= 1e-4,
        "the fused forward chose other tied blocks: {err}"
    );
    // cached decoding: the decode kernel on wgpu, the tensor-op step on the CPU
    let (_, mut cpu_cache) = cpu_model.prefill(cpu_ids.clone().narrow(1, 0, prompt), total);
    let (_, mut gpu_cache) = gpu_model.prefill(gpu_ids.clone().narrow(1, 0, prompt), total);
    for pos in prompt..total {
        let (a, next) = cpu_model.step(cpu_ids.clone().narrow(1, pos, 1).reshape([1]), cpu_cache);
        cpu_cache = next;
        let (b, next) = gpu_model.step(gpu_ids.clone().narrow(1, pos, 1).reshape([1]), gpu_cache);
        gpu_cache = next;
        let a = HostTensor::from_tensor(a);
        let row = HostTensor {
            shape: a.shape.clone(),
            values: want.values[pos * 40..(pos + 1) * 40].to_vec(),
        };
        let err = max_abs_diff(&a, &row);
        assert!(
            err <= 1e-4,
            "position {pos}: the CPU step chose other tied blocks: {err}"
        );
        let err = max_abs_diff(&HostTensor::from_tensor(b), &a);
        assert!(
            err <= 1e-4,
            "position {pos}: the decode kernel chose other tied blocks: {err}"
        );
    }
}

/// Decoding on a GPU backend with the kernels registered: the whole-sequence forward runs the
/// fused branch kernels, the cached step the one-kernel decode attention; the two must
/// give the same logits at every position (lengths cross stride, block and selection-block
/// boundaries, several selected blocks compete).
#[test]
fn cached_decoding_with_kernels_equals_the_fused_forward() {
    use burn::module::Module;
    use common::random::{small_decode_config, Randomise};

    register();
    let device = WgpuDevice::default();
    let c = small_decode_config();
    let model = c
        .init::<Wgpu>(&device)
        .unwrap()
        .map(&mut Randomise::<Wgpu> {
            device: device.clone(),
            std: 0.5,
        });
    let mut rng = Rng(5);
    let (total, prompt) = (41, 3);
    let ids: Vec<i64> = (0..total).map(|_| rng.below(40) as i64).collect();
    let ids = Tensor::<Wgpu, 2, Int>::from_data(TensorData::new(ids, [1, total]), &device);
    let full = model.forward(ids.clone());
    let (_, mut cache) = model.prefill(ids.clone().narrow(1, 0, prompt), total - prompt);
    let mut worst = 0.0f32;
    for pos in prompt..total {
        let token = ids.clone().narrow(1, pos, 1).reshape([1]);
        let (step, next) = model.step(token, cache);
        cache = next;
        let want = HostTensor::from_tensor(full.clone().narrow(1, pos, 1).reshape([1, 40]));
        let got = HostTensor::from_tensor(step);
        let err = max_abs_diff(&got, &want);
        assert!(err <= 1e-3, "position {pos}: step differs by {err}");
        worst = worst.max(err);
    }
    println!("cached decoding vs fused forward on wgpu: max abs logit difference {worst:.2e}");
}

/// Random weights `N(0, 0.25)` (larger weights make attention so sharp that the tensor ops on
/// lavapipe and on the CPU already differ by 1e-4).
fn randomise<B: Backend>(device: &B::Device) -> common::random::Randomise<B> {
    common::random::Randomise {
        device: device.clone(),
        std: 0.25,
    }
}

/// The one-kernel decode step on wgpu against the tensor-op decode step on the CPU, same
/// weights, batch 2: logits at every position (lengths cross stride, compression-block and
/// selection-block boundaries, the top-n fills up and then competes), and the kernel is
/// really taken for the layers' caches.
#[test]
fn decode_kernel_matches_the_tensor_op_step() {
    use nsa_model::cache::LayerCache;
    use nsa_model::kernels::DecodeInputs;
    use nsa_model::transformer::Attention;

    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    // each config in one kernel, and with the compressed branch in parts of one selection
    // block (as long contexts run it)
    let cases = common::random::decode_configs()
        .into_iter()
        .flat_map(|(name, c)| [(name, c.clone(), 0), (name, c, 1)]);
    for (name, c, span) in cases {
        let options = KernelOptions {
            decode_span: span,
            ..Default::default()
        };
        let cpu_model = c
            .init::<NdArray>(&cpu)
            .unwrap()
            .map(&mut randomise::<NdArray>(&cpu));
        let gpu_model = c
            .init::<Wgpu>(&gpu)
            .unwrap()
            .load_reference(cpu_model.reference_state())
            .unwrap()
            .with_kernel_options(options);
        let mut rng = Rng(11);
        let (b, total, prompt) = (2, 43, 3);
        let ids: Vec<i64> = (0..b * total).map(|_| rng.below(40) as i64).collect();
        let data = TensorData::new(ids, [b, total]);
        let cpu_ids = Tensor::<NdArray, 2, Int>::from_data(data.clone(), &cpu);
        let gpu_ids = Tensor::<Wgpu, 2, Int>::from_data(data, &gpu);
        let (_, mut cpu_cache) = cpu_model.prefill(cpu_ids.clone().narrow(1, 0, prompt), 8);
        let (_, mut gpu_cache) = gpu_model.prefill(gpu_ids.clone().narrow(1, 0, prompt), 8);

        // the kernel answers for a prefilled layer cache (its last prompt token as the query)
        let LayerCache::Nsa(layer) = &gpu_cache.layers[0] else {
            panic!("an NSA layer");
        };
        let Attention::Nsa(attn) = &gpu_model.layers[0].attn else {
            panic!("an NSA layer");
        };
        let (dim, heads, d) = (32, c.heads, c.dim_head);
        let width = (heads + 2 * c.kv_heads.unwrap()) * d;
        let qkv =
            Tensor::<Wgpu, 3>::random([b, 1, width], burn::tensor::Distribution::Default, &gpu);
        let x = Tensor::<Wgpu, 3>::zeros([b, 1, dim], &gpu);
        let rotation = gpu_cache.rope.rotation(prompt, 1);
        let (cos, sin) = rotation.parts();
        let handle = Kernels::<Wgpu>::new(&options);
        let kernels = handle.fused().expect("registered");
        let sizes = attn.config.sizes();
        let inputs = DecodeInputs {
            qkv: &qkv,
            cos,
            sin,
            compressed: layer.compressed.cached(),
            num_mem: attn.compress.num_mem(),
            kv: layer.kv.cached(),
            gate_logits: &|| attn.gates.logits(&handle, x.clone()),
            sizes: &sizes,
            scale: attn.scale(),
        };
        assert!(
            kernels.decode_attention(&inputs).is_some(),
            "{name}: the decode kernel declined"
        );
        let (kb, vb) = layer.kv.buffers();
        let buffers = [
            kb.clone(),
            vb.clone(),
            layer.tail_k.clone(),
            layer.tail_v.clone(),
        ];
        assert!(
            kernels
                .decode_write(&qkv, cos, sin, buffers, heads, prompt, prompt % 8)
                .is_ok(),
            "{name}: the cache-write kernel declined"
        );
        // and the whole block as one operation, as the model's step runs it: it answers and
        // equals the block done operation by operation (attention, residual, feed-forward)
        let x = Tensor::<Wgpu, 3>::random([b, 1, dim], burn::tensor::Distribution::Default, &gpu);
        let ff = &gpu_model.layers[0].ff;
        let norm = attn.norm.as_ref().map(|n| n.row_norm());
        let ff_params = ff.params();
        let step = nsa_model::kernels::BlockStep {
            x: &x,
            norm: norm.as_ref(),
            to_qkv: &Projection::of(&attn.to_qkv),
            gates: &Projection::of(&attn.gates.proj),
            combine: &Projection::of(&attn.combine_heads),
            ff: Some(&ff_params),
            cos,
            sin,
            compressed: layer.compressed.cached(),
            num_mem: attn.compress.num_mem(),
            sizes: &sizes,
            scale: attn.scale(),
            pos: prompt,
            slot: prompt % c.sparse.compress_block_size,
        };
        let buffers = [
            kb.clone(),
            vb.clone(),
            layer.tail_k.clone(),
            layer.tail_v.clone(),
        ];
        let (whole, _) = kernels
            .decode_block(&step, buffers)
            .unwrap_or_else(|_| panic!("{name}: the block kernel declined"));
        // the oracle: the same block step with tensor ops on the CPU, from the CPU's cache
        let LayerCache::Nsa(cpu_layer) = &cpu_cache.layers[0] else {
            panic!("an NSA layer");
        };
        let Attention::Nsa(cpu_attn) = &cpu_model.layers[0].attn else {
            panic!("an NSA layer");
        };
        let cpu_x = to_tensor::<NdArray, 3>(&HostTensor::from_tensor(x.clone()), &cpu);
        let cpu_rotation = cpu_cache.rope.rotation(prompt, 1);
        let (a, _) = cpu_attn.step(cpu_x.clone(), cpu_layer.clone(), &cpu_rotation, None);
        let apart = cpu_model.layers[0]
            .ff
            .step(&Kernels::tensor_ops(), a + cpu_x);
        let err = max_abs_diff(
            &HostTensor::from_tensor(whole),
            &HostTensor::from_tensor(apart),
        );
        assert!(
            err <= 1e-5,
            "{name}: the block op differs from the CPU's tensor ops by {err}"
        );

        let (mut worst, mut largest) = (0.0f32, 0.0f32);
        for pos in prompt..total {
            let (cpu_step, next) =
                cpu_model.step(cpu_ids.clone().narrow(1, pos, 1).reshape([b]), cpu_cache);
            cpu_cache = next;
            let (gpu_step, next) =
                gpu_model.step(gpu_ids.clone().narrow(1, pos, 1).reshape([b]), gpu_cache);
            gpu_cache = next;
            let want = HostTensor::from_tensor(cpu_step);
            let err = max_abs_diff(&HostTensor::from_tensor(gpu_step), &want);
            let scale = want.values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(
                err <= 1e-5,
                "{name}, position {pos}: the kernel step differs by {err}"
            );
            worst = worst.max(err);
            largest = largest.max(scale);
        }
        println!(
            "decode kernel vs tensor-op step, {name}, span {span}: max abs logit difference \
             {worst:.2e} (largest logit {largest:.1})"
        );
    }
}

/// A linear layer with the matrix `w` `[din, dout]` (as a narrowed view of one `pad` columns
/// wider, so that its rows are strided) and the bias, if given.
fn linear_on<B: Backend>(
    w: &HostTensor,
    bias: Option<&HostTensor>,
    pad: usize,
    device: &B::Device,
) -> burn::nn::Linear<B> {
    let [din, dout] = [w.shape[0], w.shape[1]];
    let mut l = burn::nn::LinearConfig::new(din, dout)
        .with_bias(bias.is_some())
        .init::<B>(device);
    let wide = Tensor::cat(
        vec![to_tensor(w, device), Tensor::zeros([din, pad], device)],
        1,
    );
    l.weight = burn::module::Param::from_tensor(wide.narrow(1, 0, dout));
    l.bias = bias.map(|b| burn::module::Param::from_tensor(to_tensor(b, device)));
    l
}

/// An RMSNorm with the scale `nw`.
fn norm_on<B: Backend>(nw: &HostTensor, device: &B::Device) -> nsa_model::norm::RmsNorm<B> {
    let mut n = nsa_model::norm::RmsNorm::new(nw.shape[0], device);
    n.weight = burn::module::Param::from_tensor(to_tensor(nw, device));
    n
}

/// The decode step's row kernel (`act(norm(x) · W + b) + residual`) against the tensor ops on
/// the CPU, for every combination the model uses and batches of 1 and 3 rows.
#[test]
fn row_linear_kernel_matches_tensor_ops() {
    use nsa_model::kernels::RowLinear;
    use nsa_model::tensor_util::norm_linear;

    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let handle = Kernels::<Wgpu>::new(&KernelOptions::default());
    let kernels = handle.fused().expect("registered");
    let mut rng = Rng(23);
    for (rows, din, dout) in [(1, 48, 40), (3, 96, 33)] {
        for (use_norm, bias, gelu, residual) in [
            (true, false, false, false),
            (true, true, false, false),
            (true, true, true, false),
            (false, true, false, true),
            (false, false, false, false),
        ] {
            let case = format!(
                "rows {rows}, {din} → {dout}, norm {use_norm}, bias {bias}, gelu {gelu}, residual {residual}"
            );
            let x = rng.host(&[rows, 1, din]);
            let w = rng.host(&[din, dout]);
            let bvec = rng.host(&[dout]);
            let nw = rng.host(&[din]);
            let res = rng.host(&[rows, 1, dout]);
            // the matrix as a narrowed view of a wider one (on the fused backend the slice may
            // arrive copied; `row_kernel_reads_padded_rows` checks the strided read)
            let gpu_layer = linear_on::<Wgpu>(&w, bias.then_some(&bvec), 7, &gpu);
            let cpu_layer = linear_on::<NdArray>(&w, bias.then_some(&bvec), 0, &cpu);
            let (gpu_norm, cpu_norm) = (norm_on::<Wgpu>(&nw, &gpu), norm_on::<NdArray>(&nw, &cpu));
            let gx: Tensor<Wgpu, 3> = to_tensor(&x, &gpu);
            let gres: Tensor<Wgpu, 3> = to_tensor(&res, &gpu);
            let gpu_row_norm = gpu_norm.row_norm();
            let gpu_projection = Projection::of(&gpu_layer);
            let spec = RowLinear {
                norm: use_norm.then_some(&gpu_row_norm),
                layer: &gpu_projection,
                gelu,
                residual: residual.then_some(&gres),
            };
            let ours = kernels
                .row_linear(&gx, &spec)
                .unwrap_or_else(|| panic!("{case}: the row kernel declined"));
            let want = norm_linear(
                &Kernels::tensor_ops(),
                use_norm.then_some(&cpu_norm),
                &cpu_layer,
                to_tensor(&x, &cpu),
                gelu,
                residual.then(|| to_tensor(&res, &cpu)),
            );
            assert_eq!(ours.dims(), [rows, 1, dout], "{case}");
            let err = max_abs_diff(
                &HostTensor::from_tensor(ours),
                &HostTensor::from_tensor(want),
            );
            assert!(err <= 1e-5, "{case}: differs by {err}");
        }
    }
}

/// The decode step writes its cache rows in place only where nothing else holds the buffers: a
/// cache cloned before two steps must decode as if those steps never happened, including the
/// compression that reads the whole ring (whose rows the other copy's second step rewrote).
#[test]
fn decode_writes_leave_a_shared_cache_alone() {
    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let (_, c) = common::random::decode_configs().remove(0);
    let cpu_model = c
        .init::<NdArray>(&cpu)
        .unwrap()
        .map(&mut randomise::<NdArray>(&cpu));
    let gpu_model = c
        .init::<Wgpu>(&gpu)
        .unwrap()
        .load_reference(cpu_model.reference_state())
        .unwrap();
    // stride 4: the step at position 7 pools the block 0..8 from the whole ring
    let prompt = [3i64, 14, 15, 9, 26, 5, 35];
    let ids = |v: &[i64]| TensorData::new(v.to_vec(), [1, v.len()]);
    let (_, cache) = gpu_model.prefill(Tensor::from_data(ids(&prompt), &gpu), 8);
    let copy = cache.clone();
    let token = |t: i64| Tensor::<Wgpu, 1, Int>::from_data(TensorData::new(vec![t], [1]), &gpu);
    // the original goes on two tokens (rewriting ring rows 7 and 0)
    let (_, cache) = gpu_model.step(token(1), cache);
    let (_, _cache) = gpu_model.step(token(2), cache);
    // the copy takes other tokens from the prompt on
    let (_, copy) = gpu_model.step(token(30), copy);
    let (got, _) = gpu_model.step(token(31), copy);
    // the same on the CPU from scratch
    let (_, want) = cpu_model.prefill(Tensor::from_data(ids(&prompt), &cpu), 8);
    let cpu_token =
        |t: i64| Tensor::<NdArray, 1, Int>::from_data(TensorData::new(vec![t], [1]), &cpu);
    let (_, want) = cpu_model.step(cpu_token(30), want);
    let (want, _) = cpu_model.step(cpu_token(31), want);
    let err = max_abs_diff(
        &HostTensor::from_tensor(got),
        &HostTensor::from_tensor(want),
    );
    assert!(
        err <= 1e-5,
        "the copied cache was changed by the other's steps: {err}"
    );
}

/// The device sampler picks the host sampler's token for the same logits and noise key: greedy,
/// the reference's `thres` top-k, a top-k count, no filter, a low temperature; logits on a few
/// levels, so that the top-k boundary falls inside a run of ties (kept: the lower indices).
#[test]
fn device_sampler_matches_the_host_sampler() {
    register();
    // 301 logits a row: held in registers during the search; 40,000: read on every pass
    for (rows, v) in [(5, 301), (2, 40_000)] {
        sample_rounds(rows, v);
    }
}

fn sample_rounds(rows: usize, v: usize) {
    use nsa_model::sampling::TopK;
    use nsa_model::Sampling;

    let gpu = WgpuDevice::default();
    let handle = Kernels::<Wgpu>::new(&KernelOptions::default());
    let kernels = handle.fused().expect("registered");
    let mut rng = Rng(21);
    let rules = [
        ("greedy", Sampling::greedy()),
        ("thres 0.9", Sampling::default()),
        (
            "count 7, T 0.5",
            Sampling {
                temperature: 0.5,
                top_k: Some(TopK::Count(7)),
                ..Sampling::default()
            },
        ),
        (
            "no filter",
            Sampling {
                temperature: 1.0,
                top_k: None,
                ..Sampling::default()
            },
        ),
    ];
    for round in 0..4 {
        let levels = [3.0, 12.0, 1e6][round % 3];
        let logits: Vec<f32> = (0..rows * v)
            .map(|_| ((rng.next() * levels).round() / levels * 4.0) as f32)
            .collect();
        let t = Tensor::<Wgpu, 2>::from_data(TensorData::new(logits.clone(), [rows, v]), &gpu);
        for (name, s) in &rules {
            let key = 0x1234_5678_9ABC_DEF0u64.wrapping_mul(round as u64 + 1);
            let rule = s.device_rule(v).expect("no top-p");
            let got = kernels
                .sample_tokens(&t, &rule, key)
                .expect("the sampler answers")
                .into_data()
                .convert::<i64>()
                .into_vec::<i64>()
                .unwrap();
            for (r, &id) in got.iter().enumerate() {
                let row_key = (key & !0xFFFF_FFFF) | (key as u32).wrapping_add(r as u32) as u64;
                let want = s.sample_with_key(&logits[r * v..(r + 1) * v], row_key);
                assert_eq!(id as usize, want, "{name}, v {v}, round {round}, row {r}");
            }
        }
    }
}

/// Generation that samples on the device (ids fed to the next step, read in chunks) gives the
/// tokens of the host loop (a top-p of 1 keeps the host sampler, with the same choice), sampled
/// and greedy, and stops where the callback says.
#[test]
fn generation_on_the_device_equals_the_host_loop() {
    use nsa_model::Sampling;

    register();
    let gpu = WgpuDevice::default();
    let (_, c) = common::random::decode_configs().remove(0);
    let model = c
        .init::<Wgpu>(&gpu)
        .unwrap()
        .map(&mut randomise::<Wgpu>(&gpu));
    let prompt = [3u32, 14, 15, 9, 26];
    let host = |s: &Sampling| Sampling {
        top_p: Some(1.0),
        ..s.clone()
    };
    for s in [Sampling::default(), Sampling::greedy()] {
        assert!(s.device_rule(40).is_some() && host(&s).device_rule(40).is_none());
        let on_device = model.generate(&prompt, 37, &s, 5, |_| true).unwrap();
        let on_host = model.generate(&prompt, 37, &host(&s), 5, |_| true).unwrap();
        assert_eq!(on_device.len(), 37);
        assert_eq!(on_device, on_host, "{s:?}");
    }
    // a stop inside a chunk of device-sampled ids
    let mut seen = 0;
    let stopped = model
        .generate(&prompt, 37, &Sampling::default(), 5, |_| {
            seen += 1;
            seen < 20
        })
        .unwrap();
    let full = model
        .generate(&prompt, 37, &Sampling::default(), 5, |_| true)
        .unwrap();
    assert_eq!(stopped, full[..20]);
}

/// The paired projection (the NSA layer's `to_qkv` and gate projections of one normed row, one
/// launch) equals the two projections done apart with tensor ops, with and without the norm,
/// biases on either side, the second matrix with padded rows.
#[test]
fn row_linear_pair_matches_two_projections() {
    use nsa_model::tensor_util::norm_linear;

    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let handle = Kernels::<Wgpu>::new(&KernelOptions::default());
    let kernels = handle.fused().expect("registered");
    let mut rng = Rng(29);
    for (rows, din, d1, d2, use_norm, b1, b2) in [
        (1, 48, 40, 12, true, false, true),
        (3, 64, 33, 24, true, true, false),
        (2, 32, 16, 7, false, true, true),
    ] {
        let case = format!("rows {rows}, {din} → {d1} + {d2}, norm {use_norm}, bias {b1}/{b2}");
        let x = rng.host(&[rows, 1, din]);
        let nw = rng.host(&[din]);
        let (w1, w2) = (rng.host(&[din, d1]), rng.host(&[din, d2]));
        let (v1, v2) = (rng.host(&[d1]), rng.host(&[d2]));
        let (g1, g2) = (
            linear_on::<Wgpu>(&w1, b1.then_some(&v1), 0, &gpu),
            linear_on::<Wgpu>(&w2, b2.then_some(&v2), 5, &gpu),
        );
        let (c1, c2) = (
            linear_on::<NdArray>(&w1, b1.then_some(&v1), 0, &cpu),
            linear_on::<NdArray>(&w2, b2.then_some(&v2), 0, &cpu),
        );
        let (gn, cn) = (norm_on::<Wgpu>(&nw, &gpu), norm_on::<NdArray>(&nw, &cpu));
        let gx: Tensor<Wgpu, 3> = to_tensor(&x, &gpu);
        let gn = gn.row_norm();
        let (a, b) = kernels
            .row_linear_pair(
                &gx,
                use_norm.then_some(&gn),
                &Projection::of(&g1),
                &Projection::of(&g2),
            )
            .unwrap_or_else(|| panic!("{case}: the pair kernel declined"));
        let cx: Tensor<NdArray, 3> = to_tensor(&x, &cpu);
        let ops = Kernels::tensor_ops();
        let want_a = norm_linear(&ops, use_norm.then_some(&cn), &c1, cx.clone(), false, None);
        let want_b = norm_linear(&ops, use_norm.then_some(&cn), &c2, cx, false, None);
        assert_eq!(
            (a.dims(), b.dims()),
            ([rows, 1, d1], [rows, 1, d2]),
            "{case}"
        );
        for (got, want, which) in [(a, want_a, "first"), (b, want_b, "second")] {
            let err = max_abs_diff(
                &HostTensor::from_tensor(got),
                &HostTensor::from_tensor(want),
            );
            assert!(err <= 1e-5, "{case}, {which}: differs by {err}");
        }
    }
}

/// The row kernel reads a weight matrix whose rows are padded (as CUDA allocates `[512, 24]`
/// with a row stride of 32) in place, through its row stride: on the plain `CubeBackend` a
/// narrowed view reaches the kernel as such.
#[test]
fn row_kernel_reads_padded_rows() {
    use nsa_model::kernels::RowLinear;
    use nsa_model::tensor_util::norm_linear;
    type P = burn::backend::wgpu::CubeBackend<WgpuRuntime, f32, i32, u32>;

    register();
    let gpu = WgpuDevice::default();
    let cpu = Default::default();
    let handle = Kernels::<P>::new(&KernelOptions::default());
    let kernels = handle.fused().expect("registered");
    let mut rng = Rng(31);
    let (din, dout) = (40, 24);
    let (x, w) = (rng.host(&[1, 1, din]), rng.host(&[din, dout]));
    let layer = linear_on::<P>(&w, None, 8, &gpu);
    let projection = Projection::of(&layer);
    let spec = RowLinear {
        norm: None,
        layer: &projection,
        gelu: false,
        residual: None,
    };
    let got = kernels
        .row_linear(&to_tensor::<P, 3>(&x, &gpu), &spec)
        .expect("the row kernel answers");
    let cpu_layer = linear_on::<NdArray>(&w, None, 0, &cpu);
    let want = norm_linear(
        &Kernels::tensor_ops(),
        None,
        &cpu_layer,
        to_tensor(&x, &cpu),
        false,
        None,
    );
    let err = max_abs_diff(
        &HostTensor::from_tensor(got),
        &HostTensor::from_tensor(want),
    );
    assert!(err <= 1e-5, "padded rows read wrongly: {err}");
}
