use burn::backend::Autodiff;
#[allow(unused_imports)]
use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::Distribution;
use std::time::Instant;

#[cfg(not(feature = "flex"))]
type B = Autodiff<NdArray<f32>>;
#[cfg(feature = "flex")]
type B = Autodiff<burn::backend::Flex>;

fn main() {
    let n = 1024;
    let d = 128;
    let v = 21128;
    let device = Default::default();
    let h = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let w = Tensor::<B, 2>::random([d, v], Distribution::Normal(0.0, 0.05), &device).require_grad();
    let t: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(t, [n]), &device);
    for _ in 0..3 {
        let s = Instant::now();
        let logits = h.clone().matmul(w.clone());
        let _ = logits.clone().into_data();
        let mm = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let logits = h.clone().matmul(w.clone()).reshape([1, n, v]);
        let loss = nsa_model::cross_entropy(logits, targets.clone().reshape([1, n]));
        let l1 = loss.clone().into_scalar();
        let g = loss.backward();
        let _ = w.grad(&g).unwrap().into_data();
        let a = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let logits = h.clone().matmul(w.clone());
        let m = logits.clone().detach().max_dim(1);
        let lse = (logits - m.clone()).exp().sum_dim(1).log() + m;
        let wt = w.clone().transpose().select(0, targets.clone());
        let tl = (h.clone() * wt).sum_dim(1);
        let loss = (lse - tl).mean();
        let l2 = loss.clone().into_scalar();
        let g = loss.backward();
        let _ = w.grad(&g).unwrap().into_data();
        let b = s.elapsed().as_secs_f64();
        println!(
            "matmul fwd {mm:.3}s | model CE fwd+bwd {a:.3}s ({l1}) | lse CE fwd+bwd {b:.3}s ({l2})"
        );
    }
}
