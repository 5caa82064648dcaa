//! The lightning indexer of DeepSeek sparse attention (DeepSeek-V3.2-Exp): a cheap score of
//! every earlier token for each query,
//!
//! ```text
//! I(t, s) = Σ_j w(t, j) · ReLU(q(t, j) · k(s)),
//! ```
//!
//! with `heads` indexer query heads `q(t, j)`, one indexer key `k(s)` per token shared by all
//! of them (layer-normalised), and each query's own head weights `w(t, j)`, scaled by
//! `(heads · width)^-1/2`. The first `dim_head` features of queries and keys carry the model's
//! rotary embedding, the rest none. The scores only rank tokens ([`super::select`]): no
//! gradient reaches the indexer through the selection; training gives it its own loss
//! ([`super::kl`]).
//!
//! Dimensions: `b` batch, `n` queries, `m` keys, `j` indexer heads, `e` indexer head width.

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use crate::kernels::Kernels;
use crate::rope::Rotation;
use crate::tensor_util::{heads_first, linear, matmul};

/// The indexer's parameters.
#[derive(Module, Debug)]
pub struct Indexer<B: Backend> {
    /// `dim → heads * width`, no bias: the indexer queries.
    pub to_q: Linear<B>,
    /// `dim → width`, no bias: the indexer key of each token.
    pub to_k: Linear<B>,
    /// Layer norm of the key (with bias).
    pub k_norm: LayerNorm<B>,
    /// `dim → heads`, no bias: each query's weights of its heads.
    pub to_weights: Linear<B>,
    /// Indexer heads.
    pub heads: usize,
    /// Width of one indexer head (`e`).
    pub width: usize,
}

/// An indexer query: its heads, rotated, `[b, j, n, e]`, and their weights (scaled),
/// `[b, n, j]`.
#[derive(Debug, Clone)]
pub struct IndexQueries<B: Backend> {
    /// `[b, j, n, e]`.
    pub q: Tensor<B, 4>,
    /// `[b, n, j]`.
    pub weights: Tensor<B, 3>,
}

impl<B: Backend> Indexer<B> {
    /// New indexer over a model of width `dim`.
    pub fn new(dim: usize, heads: usize, width: usize, device: &B::Device) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            to_q: linear(dim, heads * width),
            to_k: linear(dim, width),
            k_norm: LayerNormConfig::new(width).init(device),
            to_weights: linear(dim, heads),
            heads,
            width,
        }
    }

    /// The keys of the normed input `xn` `[b, m, dim]` at the positions of `rotation` →
    /// `[b, m, e]`.
    pub fn keys(
        &self,
        kernels: &Kernels<B>,
        xn: Tensor<B, 3>,
        rotation: &Rotation<B>,
    ) -> Tensor<B, 3> {
        let [b, m, _] = xn.dims();
        let k = self.k_norm.forward(linear(kernels, &self.to_k, xn));
        rotate_prefix(k.reshape([b, 1, m, self.width]), rotation).reshape([b, m, self.width])
    }

    /// The queries of the normed input `xn` `[b, n, dim]` at the positions of `rotation`.
    pub fn queries(
        &self,
        kernels: &Kernels<B>,
        xn: Tensor<B, 3>,
        rotation: &Rotation<B>,
    ) -> IndexQueries<B> {
        let [b, n, _] = xn.dims();
        let (j, e) = (self.heads, self.width);
        let q = linear(kernels, &self.to_q, xn.clone())
            .reshape([b, n, j, e])
            .swap_dims(1, 2);
        let scale = ((j * e) as f64).powf(-0.5);
        IndexQueries {
            q: rotate_prefix(q, rotation),
            weights: linear(kernels, &self.to_weights, xn).mul_scalar(scale),
        }
    }

    /// `I(t, s)` of the queries over `keys` `[b, m, e]` → `[b, n, m]` (every pair: the caller
    /// masks the future).
    pub fn scores(
        &self,
        kernels: &Kernels<B>,
        queries: &IndexQueries<B>,
        keys: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [b, j, n, e] = queries.q.dims();
        let m = keys.dims()[1];
        // 1. every head's dot products, [b, j * n, m]
        let dots = matmul(
            kernels,
            queries.q.clone().reshape([b, j * n, e]),
            keys.swap_dims(1, 2),
        );
        // 2. ReLU, weighted by the query's weight of the head, summed over the heads
        let w = heads_first(queries.weights.clone());
        (relu(dots.reshape([b, j, n, m])) * w)
            .sum_dim(1)
            .reshape([b, n, m])
    }
}

/// Rotates the first `dim_head` features of `x` `[b, h, n, e]` (the rotation's width) and
/// keeps the rest.
fn rotate_prefix<B: Backend>(x: Tensor<B, 4>, rotation: &Rotation<B>) -> Tensor<B, 4> {
    let e = x.dims()[3];
    let d = rotation.parts().0.dims()[3];
    if e == d {
        return rotation.apply(x);
    }
    let rotated = rotation.apply(x.clone().narrow(3, 0, d));
    Tensor::cat(vec![rotated, x.narrow(3, d, e - d)], 3)
}
