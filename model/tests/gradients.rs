//! The gradient of an NSA layer against central finite differences, in f64 on the CPU.
//!
//! In its own test binary: burn 0.21's ndarray backends share one device, and a process that
//! also runs f32 tests may create this test's tensors in f32 (then the finite differences see
//! f32 rounding).

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::Distribution;
use nsa_model::NsaConfig;

/// Small deterministic generator (xorshift*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A random valid NSA config.
fn random_config(rng: &mut Rng) -> NsaConfig {
    let kv_heads = rng.pick(&[1, 2]);
    let heads = kv_heads * rng.pick(&[1, 2, 4]);
    let stride = rng.pick(&[2, 4]);
    let block = stride * rng.pick(&[1, 2]);
    let selection = stride * rng.pick(&[1, 2, 4]);
    let mut c = NsaConfig::new(
        16,
        4,
        heads,
        rng.pick(&[3, 4, 8]),
        block,
        stride,
        selection,
        rng.pick(&[0, 1, 2, 5]),
    )
    .with_kv_heads(kv_heads);
    c.num_compressed_mem_kv = rng.pick(&[1, 2]);
    c.use_diff_topk = rng.pick(&[false, true]);
    c.query_heads_share_selected_kv = rng.pick(&[false, true]);
    c
}

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
