//! Properties that hold for any config: causality, refused invalid configs, and that the parity
//! harness notices a wrong setting (so the parity tests can fail). Gradients against finite
//! differences are in `gradients.rs`.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::Distribution;
use common::random::{random_config, Rng};
use common::*;
use nsa_model::interop::HostTensor;
use nsa_model::{AttentionKind, NsaConfig, TransformerConfig};

type B = NdArray<f32>;

/// Random values for every parameter (zero-initialised ones included), so that every branch and
/// gate matters.
fn randomise<M: burn::module::Module<B>>(module: M, device: &burn::tensor::Device<B>) -> M {
    struct Mapper<'a>(&'a burn::tensor::Device<B>);
    impl burn::module::ModuleMapper<B> for Mapper<'_> {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            let shape = param.dims();
            let device = *self.0;
            param.map(|_| Tensor::random(shape, Distribution::Normal(0.0, 0.5), &device))
        }
    }
    module.map(&mut Mapper(device))
}

fn max_diff_prefix(a: &Tensor<B, 3>, b: &Tensor<B, 3>, upto: usize) -> f32 {
    let a = HostTensor::from_tensor(a.clone().narrow(1, 0, upto));
    let b = HostTensor::from_tensor(b.clone().narrow(1, 0, upto));
    max_abs_diff(&a, &b)
}

#[test]
fn nsa_layer_is_causal_for_random_configs_and_lengths() {
    let device = Default::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..24 {
        let config = random_config(&mut rng);
        let layer = randomise(config.init::<B>(&device).unwrap(), &device);
        let n = rng.range(1, 70);
        let t = rng.range(0, n - 1);
        let x = Tensor::<B, 3>::random([2, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let out = layer.forward(x.clone());
        // change every token after t
        let later = n - t - 1;
        let changed = if later > 0 {
            let noise = Tensor::random([2, later, 16], Distribution::Normal(0.0, 3.0), &device);
            Tensor::cat(vec![x.clone().narrow(1, 0, t + 1), noise], 1)
        } else {
            x.clone()
        };
        let out2 = layer.forward(changed);
        let diff = max_diff_prefix(&out, &out2, t + 1);
        assert!(
            diff <= 1e-6,
            "case {case}: output at positions <= {t} (n = {n}) changed by {diff} when later \
             tokens changed; config {config:?}"
        );
        // and the check itself can fail: a change at t must show up at t
        let mut bumped = HostTensor::from_tensor(x.clone());
        for v in &mut bumped.values[t * 16..(t + 1) * 16] {
            *v += 1.0;
        }
        let out3 = layer.forward(to_tensor::<B, 3>(&bumped, &device));
        assert!(
            max_diff_prefix(&out, &out3, t + 1) > 1e-4,
            "case {case}: no effect at t"
        );
    }
}

#[test]
fn transformer_is_causal_in_both_attention_modes() {
    let device = Default::default();
    let mut rng = Rng(7);
    for kind in [AttentionKind::Nsa, AttentionKind::Full] {
        for _ in 0..4 {
            let mut c = TransformerConfig::new(50, 16, 2);
            c.dim_head = 4;
            c.heads = 4;
            c.kv_heads = Some(2);
            c.attention = kind;
            c.sparse.sliding_window_size = 4;
            c.sparse.compress_block_size = 4;
            c.sparse.compress_block_sliding_stride = 2;
            c.sparse.selection_block_size = 4;
            c.sparse.num_selected_blocks = 2;
            let model = randomise(c.init::<B>(&device).unwrap(), &device);
            let n = rng.range(2, 40);
            let t = rng.range(0, n - 2);
            let ids: Vec<i64> = (0..n).map(|_| rng.range(0, 49) as i64).collect();
            let mut ids2 = ids.clone();
            for v in &mut ids2[t + 1..] {
                *v = (*v + 1 + rng.range(0, 40) as i64) % 50;
            }
            let run = |ids: Vec<i64>| {
                model.forward(Tensor::from_data(TensorData::new(ids, [1, n]), &device))
            };
            let diff = max_diff_prefix(&run(ids), &run(ids2), t + 1);
            assert!(diff <= 1e-6, "{kind}: logits at <= {t} changed by {diff}");
        }
    }
}

#[test]
fn parity_harness_detects_a_wrong_setting() {
    type AD = Autodiff<NdArray<f32>>;
    let device = Default::default();
    // the no-share fixture run with shared selection must not match
    let f = load("gqa4_noshare_seq130");
    let mut config = f.nsa_config();
    config.query_heads_share_selected_kv = true;
    let mut params = f.params();
    let layer = config
        .init::<AD>(&device)
        .unwrap()
        .load_reference(&mut params, "")
        .unwrap();
    let out = layer.forward(f.tensor::<AD, 3>("input", &device));
    let err = max_abs_diff(&HostTensor::from_tensor(out), f.get("output"));
    assert!(
        err > 1e-2,
        "sharing selection should change the output, error {err}"
    );
}

#[test]
fn invalid_configs_are_refused_at_construction() {
    let device = Default::default();
    let mut c = NsaConfig::new(16, 4, 4, 4, 4, 4, 6, 2);
    assert!(
        c.init::<B>(&device).is_err(),
        "selection not a multiple of stride"
    );
    c.selection_block_size = 8;
    c.kv_heads = Some(3);
    assert!(
        c.init::<B>(&device).is_err(),
        "heads not divisible by kv_heads"
    );
    c.kv_heads = Some(2);
    c.compress_block_sliding_stride = 8;
    assert!(c.init::<B>(&device).is_err(), "stride > block");
    c.compress_block_sliding_stride = 4;
    assert!(c.init::<B>(&device).is_ok());
    let mut t = TransformerConfig::new(10, 16, 1);
    t.heads = 0;
    let err = t.init::<B>(&device).unwrap_err().to_string();
    assert!(err.contains("heads"), "{err}");
}
