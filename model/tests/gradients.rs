//! The gradient of an NSA layer against central finite differences, in f64 on the CPU.
//!
//! In its own test binary: burn 0.21's ndarray backends share one device, and a process that
//! also runs f32 tests may create this test's tensors in f32 (then the finite differences see
//! f32 rounding).

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::Distribution;
use common::random::{random_config, Rng};

#[test]
fn gradients_match_finite_differences() {
    // f64 on the CPU, so that central differences are accurate
    type B64 = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut rng = Rng(42);
    for _ in 0..4 {
        let mut config = random_config(&mut rng);
        // straight-through top-k is a deliberately biased gradient: no finite-difference match
        config.use_diff_topk = false;
        let layer = config.init::<B64>(&device).unwrap();
        let n = rng.range(5, 40);
        let x = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let dir = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let loss = |x: Tensor<B64, 3>| (layer.forward(x) * r.clone()).sum();
        let xg = x.clone().require_grad();
        let grads = loss(xg.clone()).backward();
        let analytic: f64 = (xg.grad(&grads).unwrap() * dir.clone().inner())
            .sum()
            .into_scalar();
        let eps = 1e-5;
        let plus: f64 = loss(x.clone() + dir.clone().mul_scalar(eps)).into_scalar();
        let minus: f64 = loss(x.clone() - dir.clone().mul_scalar(eps)).into_scalar();
        let numeric = (plus - minus) / (2.0 * eps);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1.0);
        assert!(
            rel < 1e-5,
            "directional derivative {analytic} vs finite difference {numeric} ({config:?})"
        );
    }
}

type B64 = Autodiff<NdArray<f64>>;
type Layer = nsa_model::SparseAttention<B64>;
/// Picks one parameter of a layer.
type Get<const D: usize> = for<'a> fn(&'a mut Layer) -> &'a mut burn::module::Param<Tensor<B64, D>>;

/// The directional derivative of `loss` along a random direction of one parameter (picked by
/// `param`) against a central finite difference; returns the relative error.
fn parameter_error<const D: usize>(
    layer: &Layer,
    param: Get<D>,
    loss: &dyn Fn(&Layer) -> Tensor<B64, 1>,
    grads: &<B64 as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> (f64, f64, f64) {
    let device = Default::default();
    let mut probe = layer.clone();
    let value = param(&mut probe).val();
    let grad = value.grad(grads).expect("the parameter has a gradient");
    let dir = Tensor::<B64, D>::random(value.dims(), Distribution::Normal(0.0, 1.0), &device);
    let analytic: f64 = (grad * dir.clone().inner()).sum().into_scalar();
    let eps = 1e-5;
    let nudged = |sign: f64| {
        let mut l = layer.clone();
        let p = param(&mut l);
        *p = burn::module::Param::from_tensor(
            (value.clone() + dir.clone().mul_scalar(sign * eps)).detach(),
        );
        loss(&l).into_scalar()
    };
    let numeric = (nudged(1.0) - nudged(-1.0)) / (2.0 * eps);
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-6);
    (analytic, numeric, rel)
}

/// The gradients of the small parameters of the compressed branch (the compression MLPs, the
/// intra-block positions, the memory key/values) against central finite differences, one
/// parameter at a time, in f64 on the CPU; lengths with several complete blocks so that every
/// one of them is in the graph.
#[test]
fn parameter_gradients_match_finite_differences() {
    let device = Default::default();
    let mut rng = Rng(7);
    for case in 0..3 {
        let mut config = random_config(&mut rng);
        config.use_diff_topk = false;
        let mut layer = config.init::<B64>(&device).unwrap();
        // the memory and position parameters start at zero: give them values
        let c = &mut layer.compress;
        for p in [&mut c.k_intrablock_positions, &mut c.v_intrablock_positions] {
            *p = burn::module::Param::from_tensor(
                p.val().random_like(Distribution::Normal(0.0, 0.5)),
            );
        }
        c.compress_mem_kv = burn::module::Param::from_tensor(
            c.compress_mem_kv
                .val()
                .random_like(Distribution::Normal(0.0, 0.5)),
        );
        let n = rng.range(3 * config.compress_block_size + 2, 40);
        let x = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let loss = |l: &Layer| (l.forward(x.clone()) * r.clone()).sum();
        let grads = loss(&layer).backward();
        let mut checks: Vec<(&str, (f64, f64, f64))> = vec![
            (
                "k_intrablock_positions",
                parameter_error(
                    &layer,
                    |l| &mut l.compress.k_intrablock_positions,
                    &loss,
                    &grads,
                ),
            ),
            (
                "v_intrablock_positions",
                parameter_error(
                    &layer,
                    |l| &mut l.compress.v_intrablock_positions,
                    &loss,
                    &grads,
                ),
            ),
            (
                "compress_mem_kv",
                parameter_error(&layer, |l| &mut l.compress.compress_mem_kv, &loss, &grads),
            ),
        ];
        for (name, get) in [
            (
                "k_compress.fc1.weight",
                (|l: &mut Layer| &mut l.compress.k_compress.fc1.weight) as Get<2>,
            ),
            ("k_compress.fc2.weight", |l: &mut Layer| {
                &mut l.compress.k_compress.fc2.weight
            }),
            ("v_compress.fc1.weight", |l: &mut Layer| {
                &mut l.compress.v_compress.fc1.weight
            }),
            ("v_compress.fc2.weight", |l: &mut Layer| {
                &mut l.compress.v_compress.fc2.weight
            }),
        ] {
            checks.push((name, parameter_error(&layer, get, &loss, &grads)));
        }
        for (name, get) in [
            (
                "k_compress.fc1.bias",
                (|l: &mut Layer| l.compress.k_compress.fc1.bias.as_mut().unwrap()) as Get<1>,
            ),
            ("k_compress.fc2.bias", |l: &mut Layer| {
                l.compress.k_compress.fc2.bias.as_mut().unwrap()
            }),
            ("v_compress.fc1.bias", |l: &mut Layer| {
                l.compress.v_compress.fc1.bias.as_mut().unwrap()
            }),
            ("v_compress.fc2.bias", |l: &mut Layer| {
                l.compress.v_compress.fc2.bias.as_mut().unwrap()
            }),
        ] {
            checks.push((name, parameter_error(&layer, get, &loss, &grads)));
        }
        for (name, (analytic, numeric, rel)) in checks {
            println!("case {case} {name:24} analytic {analytic:+.6e} numeric {numeric:+.6e} rel {rel:.1e}");
            assert!(
                rel < 1e-5,
                "case {case}, {name}: directional derivative {analytic} vs finite difference {numeric} ({config:?})"
            );
        }
    }
}
