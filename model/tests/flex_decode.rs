//! Decoding on Burn's `flex` CPU backend with the registered kernels (`kernels::register_flex`:
//! row products, in-place cache writes, the one-call decode attention, and the prefill's
//! compressed branch and selection row by row) gives the logits of the tensor-op path. Its own
//! test binary: it switches the process-wide kernel registry.
#![cfg(feature = "flex")]

mod common;

use burn::backend::Flex;
use burn::prelude::*;
use nsa_model::kernels;
use nsa_model::{Transformer, TransformerConfig};

type B = Flex;

/// Prefill of `prompt`, then `steps` cached decode steps; every step's logits.
fn decode(model: &Transformer<B>, prompt: &[i64], steps: &[i64]) -> Vec<Vec<f32>> {
    let device = Default::default();
    let n = prompt.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.to_vec(), [1, n]), &device);
    let (logits, mut cache) = model.prefill(ids, steps.len());
    let mut out = vec![logits.into_data().into_vec::<f32>().unwrap()];
    for &t in steps {
        let id = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![t], [1]), &device);
        let (l, c) = model.step(id, cache);
        cache = c;
        out.push(l.into_data().into_vec::<f32>().unwrap());
    }
    out
}

/// Largest absolute difference over every step ([`nsa_model::Comparison`]: infinite when
/// either side has a NaN or infinity).
fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (a, b) in a.iter().zip(b) {
        let c = nsa_model::Comparison::of(a, b).expect("same length");
        let d = c.max_abs as f32;
        if d.is_nan() || d > worst {
            worst = d;
        }
    }
    worst
}

/// Configs: wide enough for the multi-threaded product (>= 64k weights); GQA with shared
/// selection and several compression slots per selection block; a selection per head;
/// straight-through gates.
fn configs() -> Vec<(&'static str, TransformerConfig)> {
    let mut wide = TransformerConfig::new(300, 256, 2);
    wide.dim_head = 32;
    wide.heads = 8;
    wide.kv_heads = Some(4);
    let s = &mut wide.sparse;
    s.sliding_window_size = 4;
    s.compress_block_size = 4;
    s.compress_block_sliding_stride = 4;
    s.selection_block_size = 4;
    s.num_selected_blocks = 2;
    let small = common::random::small_decode_config();
    let mut separate = small.clone();
    separate.sparse.query_heads_share_selected_kv = false;
    let mut gated = small.clone();
    gated.sparse.use_diff_topk = true;
    // one-token blocks: with a repeated token (below) every top-n is a choice among exact ties
    let mut ties = TransformerConfig::new(40, 16, 1);
    ties.dim_head = 8;
    ties.heads = 2;
    ties.kv_heads = Some(1);
    let s = &mut ties.sparse;
    s.sliding_window_size = 1;
    s.compress_block_size = 1;
    s.compress_block_sliding_stride = 1;
    s.selection_block_size = 1;
    s.num_selected_blocks = 3;
    vec![
        ("wide", wide),
        ("gqa shared selection", small),
        ("selection per head", separate),
        ("diff top-k gates", gated),
        (EXACT_TIES, ties),
    ]
}

/// The config decoded over one repeated token.
const EXACT_TIES: &str = "exact ties";

/// One test (the registry switch is process-wide): for every config, the decode steps with the
/// flex kernels (row products, in-place cache writes, the one-call decode attention) give the
/// tensor-op logits at every position, and the kernels answer for a prefilled cache.
#[test]
fn decoding_with_the_flex_kernels_equals_the_tensor_ops() {
    use nsa_model::cache::LayerCache;
    use nsa_model::kernels::{DecodeInputs, KernelOptions, Kernels, Projection, RowLinear};
    use nsa_model::transformer::Attention;

    let device = Default::default();
    // the only test of this binary: seeded, its draws are the same on every run
    B::seed(&device, 17);
    kernels::register_flex();
    for (name, c) in configs() {
        let vocab = c.num_tokens as i64;
        // random weights N(0, 0.25): the gates' default zeros would hide the mix
        let model = c
            .init::<B>(&device)
            .unwrap()
            .map(&mut common::random::Randomise::<B> { device, std: 0.25 });
        let mut prompt: Vec<i64> = (0..7).map(|i| (i * 37 + 5) % vocab).collect();
        // 30 steps: past several strides, compression blocks and selection blocks
        let mut steps: Vec<i64> = (0..30).map(|i| (i * 91 + 11) % vocab).collect();
        if name == EXACT_TIES {
            prompt.fill(7);
            steps.fill(7);
        }
        let model = model.with_kernel_options(KernelOptions::tensor_ops());
        let plain = decode(&model, &prompt, &steps);
        let model = model.with_kernel_options(KernelOptions::default());
        let fast = decode(&model, &prompt, &steps);
        let d = max_diff(&plain, &fast);
        // f32 rounding of other summation orders: up to 1.05e-5 was seen with unseeded
        // weights; a wrong kernel is off by far more
        assert!(d < 5e-5, "{name}: max logit difference {d}");
        assert!(d > 0.0, "{name}: the decode steps did not take the kernels");

        // a longer prompt's prefill (every position's logits): the compressed branch and the
        // selection row by row against the tensor ops (past many strides and selection blocks;
        // a length that is a multiple of nothing)
        let long: Vec<i64> = if name == EXACT_TIES {
            vec![7; 151]
        } else {
            (0..151).map(|i| (i * 53 + 3) % vocab).collect()
        };
        let all = |m: &Transformer<B>| {
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(long.clone(), [1, 151]), &device);
            vec![m.prefill(ids, 0).0.into_data().into_vec::<f32>().unwrap()]
        };
        let fast_prefill = all(&model);
        let plain_prefill = all(&model
            .clone()
            .with_kernel_options(KernelOptions::tensor_ops()));
        let d = max_diff(&plain_prefill, &fast_prefill);
        assert!(d < 1e-5, "{name}: prefill, max logit difference {d}");

        // each kernel answers for the first layer of a prefilled cache
        let handle = Kernels::<B>::new(&KernelOptions::default());
        let k = handle.fused().expect("registered");
        let n = prompt.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.clone(), [1, n]), &device);
        let (_, cache) = model.prefill(ids, 4);
        let (LayerCache::Nsa(layer), Attention::Nsa(attn)) =
            (&cache.layers[0], &model.layers[0].attn)
        else {
            panic!("NSA layers");
        };
        let (heads, d) = (c.heads, c.dim_head);
        let width = (heads + 2 * c.kv_heads.unwrap()) * d;
        let x = Tensor::<B, 3>::random([1, 1, c.dim], burn::tensor::Distribution::Default, &device);
        let qkv =
            Tensor::<B, 3>::random([1, 1, width], burn::tensor::Distribution::Default, &device);
        let rotation = cache.rope.rotation(n, 1);
        let (cos, sin) = rotation.parts();
        let norm = attn.norm.as_ref().map(|n| n.row_norm());
        let spec = RowLinear {
            norm: norm.as_ref(),
            layer: &Projection::of(&attn.to_qkv),
            gelu: false,
            residual: None,
        };
        assert!(k.row_linear(&x, &spec).is_some(), "{name}: row_linear");
        let inputs = DecodeInputs {
            qkv: &qkv,
            cos,
            sin,
            compressed: layer.compressed.cached(),
            num_mem: attn.compress.num_mem(),
            kv: layer.kv.cached(),
            gate_logits: &|| attn.gates.logits(&handle, x.clone()),
            sizes: &attn.config.sizes(),
            scale: attn.scale(),
        };
        assert!(
            k.decode_attention(&inputs).is_some(),
            "{name}: decode_attention"
        );
        let q = Tensor::<B, 4>::random(
            [1, heads, n, d],
            burn::tensor::Distribution::Default,
            &device,
        );
        let (ck, cv) = layer.compressed.all();
        assert!(
            k.compressed_and_selection(&q, &ck, &cv, 0, inputs.num_mem, inputs.sizes, inputs.scale)
                .is_some(),
            "{name}: compressed_and_selection"
        );
        let (kb, vb) = layer.kv.buffers();
        let buffers = [
            kb.clone(),
            vb.clone(),
            layer.tail_k.clone(),
            layer.tail_v.clone(),
        ];
        let ring = c.sparse.compress_block_size;
        assert!(
            k.decode_write(&qkv, cos, sin, buffers, heads, n, n % ring)
                .is_ok(),
            "{name}: decode_write"
        );
    }
}
