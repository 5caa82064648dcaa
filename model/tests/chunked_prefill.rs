//! A prompt's prefill in chunks of query positions (`KernelOptions::prefill_chunk`) equals the
//! prefill in one piece: the last position's logits, every layer's decode cache (keys and
//! values, compressed keys and values, the compression ring) and the logits of the decode
//! steps after it, within 1e-4. Prompt lengths and chunk sizes are multiples of nothing (not of
//! the stride, the compression or selection block, nor the window), on the tensor ops
//! (ndarray), on flex with its CPU prefill kernel, and on wgpu with the fused kernels (whose
//! chunks run with queries at an offset over all the prompt's keys).

mod common;

use burn::module::Module;
use burn::prelude::*;
use nsa_model::cache::LayerCache;
use nsa_model::kernels::KernelOptions;
use nsa_model::{Comparison, Transformer, TransformerConfig};

/// Configs the chunks must get right: those of the decode kernel's tests
/// ([`common::random::decode_configs`]: GQA with a shared selection and several compression
/// slots per selection block, selection blocks longer than a kernel chunk, a selection per
/// head, straight-through gates, one slot per block), and a window longer than most chunks.
fn configs() -> Vec<(&'static str, TransformerConfig)> {
    let mut configs = common::random::decode_configs();
    let mut long_window = common::random::small_decode_config();
    long_window.sparse.sliding_window_size = 11;
    configs.push(("long window", long_window));
    configs
}

/// What a prefill hands over, on the host: the last logits, every layer's cache rows
/// (keys, values, compressed keys, compressed values, ring keys, ring values) and the logits
/// of `steps` decode steps after it.
struct Prefilled {
    logits: Vec<Vec<f32>>,
    caches: Vec<Vec<f32>>,
}

fn host<const D: usize, B: Backend>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn prefill<B: Backend>(model: &Transformer<B>, prompt: &[i64], steps: &[i64]) -> Prefilled {
    let device = model.to_logits.weight.device();
    let n = prompt.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.to_vec(), [1, n]), &device);
    let (last, mut cache) = model.prefill_last(ids, steps.len());
    let mut caches = Vec::new();
    for layer in &cache.layers {
        let LayerCache::Nsa(c) = layer else {
            panic!("an NSA layer's cache");
        };
        let (k, v) = c.kv.all();
        let (ck, cv) = c.compressed.all();
        for t in [k, v, ck, cv, c.tail_k.clone(), c.tail_v.clone()] {
            caches.push(host(t));
        }
    }
    let mut logits = vec![host(last)];
    for &t in steps {
        let id = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![t], [1]), &device);
        let (l, c) = model.step(id, cache);
        cache = c;
        logits.push(host(l));
    }
    Prefilled { logits, caches }
}

/// Largest absolute difference of two lists of rows (infinite with a NaN or an infinity on
/// either side, or rows of different lengths).
fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (a, b) in a.iter().zip(b) {
        let d = Comparison::of(a, b).map_or(f64::INFINITY, |c| c.max_abs);
        if d.is_nan() || d > worst {
            worst = if d.is_nan() { f64::INFINITY } else { d };
        }
    }
    worst
}

/// Every config, prompt length and chunk size on backend `B` with `fused` kernels or not.
fn chunked_prefill_equals_one_piece<B: Backend>(device: &B::Device, fused: bool) {
    let mut seed = 11u64;
    for (name, c) in configs() {
        let model = c
            .init::<B>(device)
            .unwrap()
            .map(&mut common::random::Randomise::<B> {
                device: device.clone(),
                std: 0.25,
            });
        let options = |prefill_chunk| KernelOptions {
            fused,
            prefill_chunk,
            ..KernelOptions::default()
        };
        let whole = model.clone().with_kernel_options(options(0));
        for n in [29, 61] {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let prompt: Vec<i64> = (0..n).map(|i| ((seed >> 33) as i64 + i * 7) % 40).collect();
            let steps = [3, 17, 5, 29, 11];
            let want = prefill(&whole, &prompt, &steps);
            for chunk in [1, 7, 13, 60] {
                let chunked = model.clone().with_kernel_options(options(chunk));
                let got = prefill(&chunked, &prompt, &steps);
                let caches = worst(&got.caches, &want.caches);
                let logits = worst(&got.logits, &want.logits);
                assert!(
                    caches <= 1e-4 && logits <= 1e-4,
                    "{name}, {n} tokens in chunks of {chunk} (fused {fused}): caches off by \
                     {caches:.2e}, logits by {logits:.2e}"
                );
            }
        }
    }
}

#[test]
fn chunked_prefill_equals_one_piece_with_tensor_ops() {
    chunked_prefill_equals_one_piece::<burn::backend::NdArray>(&Default::default(), false);
}

#[cfg(feature = "flex")]
#[test]
fn chunked_prefill_equals_one_piece_on_flex() {
    nsa_model::kernels::register_flex();
    assert!(nsa_model::kernels::registered::<burn::backend::Flex>());
    chunked_prefill_equals_one_piece::<burn::backend::Flex>(&Default::default(), true);
}

#[cfg(all(feature = "wgpu", feature = "kernels"))]
#[test]
fn chunked_prefill_equals_one_piece_with_the_fused_kernels() {
    use burn::backend::wgpu::{Wgpu, WgpuDevice, WgpuRuntime};
    nsa_model::kernels::register_cube::<WgpuRuntime, f32, i32, u32>();
    assert!(nsa_model::kernels::registered::<Wgpu>());
    let device = WgpuDevice::default();
    // the kernels take queries at an offset (else the chunks would compare tensor ops with
    // tensor ops): 3 queries at 7.. over 10 keys
    let kernels = nsa_model::kernels::Kernels::<Wgpu>::new(&KernelOptions::default());
    let fused = kernels.fused().expect("kernels registered");
    let c = common::random::small_decode_config().nsa();
    let sizes = c.sizes();
    let t = |h, n| Tensor::<Wgpu, 4>::zeros([1, h, n, c.dim_head], &device);
    let (q, k) = (t(c.heads, 3), t(c.kv_heads(), 10));
    assert!(fused.sliding_attention(&q, &k, &k, 7, 5, 0.25).is_some());
    assert!(fused
        .selected_attention(&q, &k, &k, None, 7, &sizes, 0.25)
        .is_some());
    let ck = t(c.kv_heads(), 1 + 10 / c.compress_block_sliding_stride);
    let compressed = fused.compressed_and_selection(&q, &ck, &ck, 7, 1, &sizes, 0.25);
    assert!(compressed.is_some());
    chunked_prefill_equals_one_piece::<Wgpu>(&device, true);
}
