//! Decoding on Burn's `flex` CPU backend with the registered matrix-vector product
//! (`kernels::register_flex`) gives the logits of the plain matmul path, and prefill (many rows)
//! is left to the matmul. Its own test binary: it switches the process-wide kernel registry.
#![cfg(feature = "flex")]

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

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let mut worst = 0.0f32;
    for (a, b) in a.iter().zip(b) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[test]
fn decoding_with_the_flex_matvec_equals_the_matmul_path() {
    let device = Default::default();
    // wide enough that the projections take the multi-threaded path (>= 64k weights)
    let mut c = TransformerConfig::new(300, 256, 2);
    c.dim_head = 32;
    c.heads = 8;
    c.kv_heads = Some(4);
    let s = &mut c.sparse;
    s.sliding_window_size = 4;
    s.compress_block_size = 4;
    s.compress_block_sliding_stride = 4;
    s.selection_block_size = 4;
    s.num_selected_blocks = 2;
    let model = c.init::<B>(&device).unwrap();
    let prompt: Vec<i64> = (0..7).map(|i| (i * 37 + 5) % 300).collect();
    let steps: Vec<i64> = (0..14).map(|i| (i * 91 + 11) % 300).collect();
    // the matmul path, then the registered matrix-vector product
    kernels::set_enabled(false);
    let plain = decode(&model, &prompt, &steps);
    kernels::register_flex();
    kernels::set_enabled(true);
    assert!(kernels::get::<B>().is_some());
    let fast = decode(&model, &prompt, &steps);

    // the same products summed in another order
    let d = max_diff(&plain, &fast);
    assert!(d < 1e-4, "max logit difference {d}");
    assert!(
        d > 0.0,
        "the decode steps did not take the matrix-vector product"
    );
    // the prefill logits (many rows) come from the matmul either way
    assert_eq!(plain[0], fast[0]);
}
