//! DSA with the fused kernels on wgpu (software Vulkan in CI): the device token ranking against
//! the host rule (`rules::dsa_selected_tokens`), on rows made of ties, zeros of both signs, NaN
//! and infinities, through both of its passes (keys in registers, scores read again), and the
//! reference fixtures through the whole model with the ranking on the device.
//!
//! `cargo test -p nsa-model --features wgpu,kernels --test wgpu_dsa`
#![cfg(all(feature = "wgpu", feature = "kernels"))]

mod common;

use burn::backend::wgpu::{Wgpu, WgpuDevice, WgpuRuntime};
use burn::backend::Autodiff;
use burn::prelude::*;
use common::*;
use nsa_model::kernels::{self, KernelOptions, Kernels};
use nsa_model::rules::dsa_selected_tokens;

type Plain = burn::backend::wgpu::CubeBackend<WgpuRuntime, f32, i32, u32>;

fn register() {
    kernels::register_cube::<WgpuRuntime, f32, i32, u32>();
}

/// Deterministic values drawn from a small set (so that rows hold many exact ties), with zeros
/// of both signs, NaN and infinities among them.
struct Draw(u64);
impl Draw {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (self.0 >> 33) as u32;
        match r % 23 {
            0 => 0.0,
            1 => -0.0,
            2 => f32::NAN,
            3 => f32::NEG_INFINITY,
            4 => f32::INFINITY,
            5..=10 => (r % 7) as f32 * 0.25 - 0.75,
            _ => ((r >> 5) % 100_000) as f32 / 1000.0 - 50.0,
        }
    }
}

/// The host rule's blocked mask of `scores` `[b, n, m]` (row-major) for queries at
/// `offset..offset + n`.
fn host_blocked(scores: &[f32], [b, n, m]: [usize; 3], offset: usize, top_k: usize) -> Vec<bool> {
    let mut blocked = vec![true; b * n * m];
    for (row, (s, out)) in scores
        .chunks_exact(m)
        .zip(blocked.chunks_exact_mut(m))
        .enumerate()
    {
        let s: Vec<f64> = s.iter().map(|&x| x as f64).collect();
        for p in dsa_selected_tokens(&s, offset + row % n, top_k) {
            if p < m {
                out[p] = false;
            }
        }
    }
    blocked
}

fn check_ranking<B: Backend>(kernels: &Kernels<B>, device: &B::Device, seed: u64) {
    let fused = kernels.fused().expect("kernels registered for the backend");
    let mut draw = Draw(seed);
    // (shape, offset, top_k): prefixes shorter than top_k, top_k 1 and 2, offsets past the
    // keys (a chunk of a prompt), rows long enough that the keys no longer fit in registers
    let cases = [
        ([2, 9, 9], 0, 4),
        ([1, 6, 40], 34, 1),
        ([1, 5, 40], 30, 2),
        ([3, 4, 17], 13, 100),
        ([1, 7, 300], 293, 37),
        ([2, 3, 1000], 997, 64),
        ([1, 2, 40_000], 39_998, 700),
        // more kept than the row's +inf (1 in 23): the boundary among finite scores
        ([1, 2, 40_000], 39_998, 5000),
    ];
    for ([b, n, m], offset, top_k) in cases {
        let values: Vec<f32> = (0..b * n * m).map(|_| draw.next()).collect();
        let want = host_blocked(&values, [b, n, m], offset, top_k);
        let scores = Tensor::<B, 3>::from_data(TensorData::new(values, [b, n, m]), device);
        let got = fused
            .token_blocked(&scores, offset, top_k)
            .expect("the kernel covers the case");
        let got: Vec<bool> = got
            .int()
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x != 0)
            .collect();
        let wrong = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(
            wrong,
            0,
            "shape {:?}, offset {offset}, top_k {top_k}: {wrong} entries differ",
            [b, n, m]
        );
        // every row keeps min(top_k, position + 1) tokens (each case's positions are < m)
        let kept = got.iter().filter(|&&x| !x).count();
        let expect: usize = (0..b * n)
            .map(|r| top_k.min(offset + r % n + 1).min(m))
            .sum();
        assert_eq!(kept, expect, "shape {:?}: tokens kept", [b, n, m]);
    }
}

#[test]
fn device_token_ranking_equals_the_host_rule() {
    register();
    let device = WgpuDevice::default();
    let options = KernelOptions::default();
    check_ranking(&Kernels::<Wgpu>::new(&options), &device, 3);
    check_ranking(&Kernels::<Plain>::new(&options), &device, 5);
    // the autodiff backend ranks the inner tensor; a folded grid (2 cubes per dimension)
    let folded = KernelOptions {
        grid_limit: 2,
        ..options
    };
    check_ranking(&Kernels::<Autodiff<Wgpu>>::new(&folded), &device, 7);
}

#[test]
fn dsa_fixtures_match_the_reference_with_device_ranking() {
    register();
    let device = WgpuDevice::default();
    assert!(kernels::registered::<Autodiff<Wgpu>>());
    for name in ["dsa_gqa_window_seq40", "dsa_nowindow_seq30"] {
        let e = transformer_errors::<Autodiff<Wgpu>>(name, &device);
        println!(
            "wgpu kernels {name:24} logits {:.2e}  loss {:.2e}  grad(params) {:.2e} ({})",
            e.logits, e.loss, e.grads.0, e.grads.1
        );
        assert!(e.within(WGPU_TOLERANCE), "{name}: {e:?}");
    }
}

/// The decode step's ranking (`token_positions`: one query per row at the last key) keeps the
/// host rule's positions, ascending.
#[test]
fn device_token_positions_equal_the_host_rule() {
    register();
    let device = WgpuDevice::default();
    let kernels = Kernels::<Wgpu>::new(&KernelOptions::default());
    let fused = kernels.fused().expect("kernels registered");
    let mut draw = Draw(13);
    for (b, m, top_k) in [
        (2, 9, 4),
        (1, 40, 1),
        (3, 40, 2),
        (2, 17, 100),
        (1, 300, 37),
        (2, 2000, 64),
        (1, 40_000, 700),
        (1, 40_000, 5000),
    ] {
        let position = m - 1;
        let values: Vec<f32> = (0..b * m).map(|_| draw.next()).collect();
        let count = top_k.min(position + 1);
        let mut want = Vec::new();
        for row in values.chunks_exact(m) {
            let s: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            let mut kept = dsa_selected_tokens(&s, position, top_k);
            kept.sort_unstable();
            want.extend(kept.into_iter().map(|p| p as i64));
        }
        let scores = Tensor::<Wgpu, 3>::from_data(TensorData::new(values, [b, 1, m]), &device);
        let got = fused
            .token_positions(&scores, position, top_k)
            .expect("the kernel covers the case");
        assert_eq!(got.dims(), [b, count]);
        let got: Vec<i64> = got.into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(got, want, "b {b}, m {m}, top_k {top_k}");
    }
}

/// Cached decoding of a DSA model with the device ranking equals the full forward (wgpu, the
/// inference backend without autodiff).
#[test]
fn dsa_cached_decoding_with_device_ranking_equals_recompute() {
    register();
    let err = cached_decoding_error::<Wgpu>("dsa_gqa_window_seq40", 5, &WgpuDevice::default());
    println!("wgpu kernels: DSA steps vs forward {err:.2e}");
    assert!(err <= 1e-4, "a step differs by {err}");
}

/// The selection as positions (`token_others`: every query of a chunk, the own token left to
/// the selected attention's own block) keeps the host rule's others, ascending, `-1` after.
#[test]
fn device_token_others_equal_the_host_rule() {
    register();
    let device = WgpuDevice::default();
    let kernels = Kernels::<Wgpu>::new(&KernelOptions::default());
    let fused = kernels.fused().expect("kernels registered");
    let mut draw = Draw(17);
    // (shape, offset, top_k): short prefixes (padding), top_k 2, a chunk at an offset, rows
    // whose keys no longer fit in registers
    for ([b, n, m], offset, top_k) in [
        ([2, 9, 9], 0, 4),
        ([1, 6, 40], 34, 2),
        ([3, 4, 17], 13, 100),
        ([1, 7, 300], 293, 37),
        ([2, 3, 2000], 1997, 64),
        ([1, 2, 40_000], 39_998, 700),
        ([1, 2, 40_000], 39_998, 5000),
    ] {
        let values: Vec<f32> = (0..b * n * m).map(|_| draw.next()).collect();
        let count = top_k - 1;
        let mut want = Vec::new();
        for (r, row) in values.chunks_exact(m).enumerate() {
            let position = offset + r % n;
            let s: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            let mut kept: Vec<i64> = dsa_selected_tokens(&s, position, top_k)
                .into_iter()
                .filter(|&p| p != position)
                .map(|p| p as i64)
                .collect();
            kept.sort_unstable();
            kept.resize(count, -1);
            want.extend(kept);
        }
        let scores = Tensor::<Wgpu, 3>::from_data(TensorData::new(values, [b, n, m]), &device);
        let got = fused
            .token_others(&scores, offset, top_k)
            .expect("the kernel covers the case");
        assert_eq!(got.dims(), [b, n, count]);
        let got: Vec<i64> = got.into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(
            got,
            want,
            "shape {:?}, offset {offset}, top_k {top_k}",
            [b, n, m]
        );
    }
}

/// Every float parameter drawn from N(0, 0.5²) now.
struct Normal;
impl<B: Backend> burn::module::ModuleMapper<B> for Normal {
    fn map_float<const D: usize>(
        &mut self,
        p: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let shape = p.dims();
        p.map(|t| {
            Tensor::random(
                shape,
                burn::tensor::Distribution::Normal(0.0, 0.5),
                &t.device(),
            )
            .require_grad()
        })
    }
}

/// The sparse stage through the fused kernels (selection as positions, the global branch as
/// selected attention over one-token blocks, the local branch as the sliding kernel) equals
/// the tensor ops' masked attention: output, the input's gradient, the indexer loss over the
/// selected tokens and its gradient, with and without the local branch, `top_k` below and
/// above the sequence, GQA.
#[test]
fn fused_sparse_stage_equals_tensor_ops() {
    use burn::tensor::Distribution;
    use nsa_model::rope::Rotation;
    use nsa_model::{DsaAttention, DsaSettings, DsaStage};
    type A = Autodiff<Wgpu>;
    register();
    let device = WgpuDevice::default();
    for (top_k, window, n) in [(5, 3, 37), (9, 0, 23), (64, 4, 40), (2, 2, 19), (64, 0, 40)] {
        A::seed(&device, 11);
        let settings = DsaSettings {
            index_heads: 2,
            index_dim_head: Some(16),
            top_k,
            window,
        };
        // parameters drawn now (a clone of a lazily initialised parameter draws its own)
        let fused = DsaAttention::<A>::new(32, 16, 4, 2, &settings, &device).map(&mut Normal);
        assert!(Kernels::<A>::new(&fused.kernel_options).fused().is_some());
        let mut ops = fused.clone();
        ops.kernel_options = KernelOptions::tensor_ops();
        let x = Tensor::<A, 3>::random([2, n, 32], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<A, 3>::random([2, n, 32], Distribution::Normal(0.0, 1.0), &device);
        let rotation = Rotation::new(16, 0, n, &device);
        // the output times `w` plus the indexer loss: gradients of the layer (dx, to_q) and of
        // the indexer (its query projection, through the loss alone)
        // `limit`: the fused path in one chunk of queries, or in chunks of 3 queries
        let run = |layer: &DsaAttention<A>, limit: Option<usize>| {
            let x = x.clone().require_grad();
            let out = if let Some(limit) = limit {
                layer
                    .forward_fused(&layer.kernels(), x.clone(), &rotation, true, limit)
                    .expect("the fused kernels take the case")
            } else {
                layer.forward_rotated(
                    &layer.kernels(),
                    x.clone(),
                    &rotation,
                    DsaStage::Sparse,
                    true,
                )
            };
            let loss = out.indexer_loss.expect("indexer loss");
            let grads = ((out.out.clone() * w.clone()).sum() + loss.clone()).backward();
            let dx = x.grad(&grads).expect("input gradient");
            let dq = layer.attn.to_q.weight.grad(&grads).expect("to_q gradient");
            let di = layer
                .indexer
                .to_q
                .weight
                .grad(&grads)
                .expect("indexer gradient");
            let loss: f32 = loss.inner().into_scalar();
            (out.out.inner(), dx, dq, di, loss)
        };
        let (o2, dx2, dq2, di2, l2) = run(&ops, None);
        // 3 queries of the indexer's products [2, 2, 3, n] or of the gathered keys
        let per_query = top_k * (2 * 16 + 16 + 4 + 2);
        for limit in [usize::MAX, 2 * 2 * 3 * n, 2 * 3 * per_query] {
            let (o1, dx1, dq1, di1, l1) = run(&fused, Some(limit));
            let diff = |a: Tensor<Wgpu, 3>, b: Tensor<Wgpu, 3>| -> f32 {
                let scale: f32 = b.clone().abs().max().into_scalar();
                let d: f32 = (a - b).abs().max().into_scalar();
                d / scale.max(1e-6)
            };
            let e_out = diff(o1, o2.clone());
            let e_dx = diff(dx1, dx2.clone());
            let e_dq = diff(dq1.unsqueeze(), dq2.clone().unsqueeze());
            let e_di = diff(di1.unsqueeze(), di2.clone().unsqueeze());
            let e_loss = (l1 - l2).abs() / l2.abs().max(1e-6);
            println!(
                "top_k {top_k} window {window} n {n} limit {limit}: out {e_out:.2e} dx {e_dx:.2e} dq {e_dq:.2e} \
             indexer loss {l2:.4} ({e_loss:.2e}) grad {e_di:.2e}"
            );
            assert!(
                l2 > 0.0 || top_k >= n,
                "a loss of zero with a real selection: {l2}"
            );
            for (what, e) in [
                ("output", e_out),
                ("dx", e_dx),
                ("d to_q", e_dq),
                ("indexer loss", e_loss),
                ("d indexer to_q", e_di),
            ] {
                assert!(
                    e.is_finite() && e <= 1e-4,
                    "top_k {top_k}, window {window}, limit {limit}: {what} {e}"
                );
            }
        }
    }
}
