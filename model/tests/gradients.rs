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
