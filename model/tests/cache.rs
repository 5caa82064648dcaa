//! Incremental decoding with the KV cache equals recomputing the whole sequence, for random
//! configs and lengths that cross compression-stride, compression-block and selection-block
//! boundaries, in every attention kind (NSA, dense, DSA with selections shorter and longer
//! than the context, with and without its local window).

mod common;

use burn::backend::NdArray;
use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use common::random::Rng;
use nsa_model::{AttentionKind, Transformer, TransformerConfig};

type B = NdArray<f32>;

struct Randomise(<B as burn::tensor::backend::BackendTypes>::Device);
impl ModuleMapper<B> for Randomise {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let shape = p.dims();
        let device = self.0;
        p.map(|_| Tensor::random(shape, Distribution::Normal(0.0, 0.5), &device))
    }
}

fn random_model(rng: &mut Rng, kind: AttentionKind) -> Transformer<B> {
    let device = Default::default();
    let mut c = TransformerConfig::new(40, 16, 2);
    c.dim_head = 4;
    c.kv_heads = Some(rng.pick(&[1, 2]));
    c.heads = c.kv_heads.unwrap() * rng.pick(&[1, 2]);
    c.attention = kind;
    let s = &mut c.sparse;
    s.compress_block_sliding_stride = rng.pick(&[2, 3, 4]);
    s.compress_block_size = s.compress_block_sliding_stride * rng.pick(&[1, 2]);
    s.selection_block_size = s.compress_block_sliding_stride * rng.pick(&[1, 2]);
    s.sliding_window_size = rng.pick(&[2, 5, 8]);
    s.num_selected_blocks = rng.pick(&[0, 1, 3]);
    s.num_compressed_mem_kv = rng.pick(&[1, 2]);
    s.use_diff_topk = rng.pick(&[false, true]);
    s.query_heads_share_selected_kv = rng.pick(&[false, true]);
    let d = &mut c.dsa;
    d.index_heads = rng.pick(&[1, 2, 3]);
    d.index_dim_head = rng.pick(&[None, Some(6)]);
    d.top_k = rng.pick(&[1, 3, 7, 64]);
    d.window = rng.pick(&[0, 2, 5]);
    c.init::<B>(&device).unwrap().map(&mut Randomise(device))
}

fn host(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

#[test]
fn cached_decoding_equals_recompute() {
    let device = Default::default();
    let mut rng = Rng(0xC0FFEE);
    for case in 0..20 {
        let kind = match case % 5 {
            3 => AttentionKind::Full,
            4 => AttentionKind::Dsa,
            _ => AttentionKind::Nsa,
        };
        let model = random_model(&mut rng, kind);
        let total = rng.range(20, 48);
        let prompt = rng.range(1, 9);
        let batch = rng.range(1, 2);
        let ids: Vec<i64> = (0..batch * total)
            .map(|_| rng.range(0, 39) as i64)
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, total]), &device);
        let full = model.forward(ids.clone());
        let (logits, mut cache) = model.prefill(ids.clone().narrow(1, 0, prompt), 4);
        // infinite when either side has a NaN or infinity
        let diff = |a: Vec<f32>, b: Vec<f32>| {
            nsa_model::Comparison::of(&a, &b)
                .expect("same length")
                .max_abs
        };
        let prefill_err = diff(
            host(logits.narrow(1, prompt - 1, 1).reshape([batch, 40])),
            host(full.clone().narrow(1, prompt - 1, 1).reshape([batch, 40])),
        );
        assert!(
            prefill_err <= 1e-4,
            "case {case}: prefill differs by {prefill_err}"
        );
        for pos in prompt..total {
            let token = ids.clone().narrow(1, pos, 1).reshape([batch]);
            let (step, next) = model.step(token, cache);
            cache = next;
            let expect = full.clone().narrow(1, pos, 1).reshape([batch, 40]);
            let err = diff(host(step), host(expect));
            assert!(
                err <= 1e-4,
                "case {case} ({kind}, {:?}, {:?}): step at position {pos} differs by {err}",
                model.config.sparse,
                model.config.dsa
            );
        }
        assert_eq!(cache.len, total);
    }
}

#[test]
fn greedy_generation_is_identical_with_and_without_cache() {
    let device = Default::default();
    let mut rng = Rng(99);
    for kind in [AttentionKind::Nsa, AttentionKind::Full, AttentionKind::Dsa] {
        let model = random_model(&mut rng, kind);
        let prompt: Vec<i64> = vec![3, 1, 4, 1, 5];
        let steps = 30;
        // without cache: recompute the whole sequence each time
        let mut seq = prompt.clone();
        for _ in 0..steps {
            let n = seq.len();
            let x = Tensor::<B, 2, Int>::from_data(TensorData::new(seq.clone(), [1, n]), &device);
            let logits = model.forward(x).narrow(1, n - 1, 1).reshape([1, 40]);
            seq.push(logits.argmax(1).into_scalar() as i64);
        }
        // with cache
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.clone(), [1, 5]), &device);
        let (logits, mut cache) = model.prefill(x, steps);
        let mut next = logits
            .narrow(1, 4, 1)
            .reshape([1, 40])
            .argmax(1)
            .reshape([1]);
        let mut cached = prompt.clone();
        for _ in 0..steps {
            let token: i64 = next.clone().into_scalar();
            cached.push(token);
            let (logits, c) = model.step(next, cache);
            cache = c;
            next = logits.argmax(1).reshape([1]);
        }
        assert_eq!(seq, cached, "{kind}: greedy outputs differ");
    }
}
