//! The learned per-head, per-token mix of the three branches: `sigmoid(Linear(x))` with one gate
//! per (head, branch), initialised (weights 0, biases −2, −2, +2) so that the sliding window
//! leads at the start of training, as in the reference.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;

use crate::kernels::Kernels;
use crate::tensor_util::linear;

/// Gate projection `dim → 3 * heads`, output column `3 * head + branch`.
#[derive(Module, Debug)]
pub struct BranchGates<B: Backend> {
    /// The projection.
    pub proj: Linear<B>,
    /// Query heads.
    pub heads: usize,
}

impl<B: Backend> BranchGates<B> {
    /// Reference initialisation.
    pub fn new(dim: usize, heads: usize, device: &B::Device) -> Self {
        let mut proj = LinearConfig::new(dim, 3 * heads).init(device);
        proj.weight = Param::from_tensor(Tensor::zeros([dim, 3 * heads], device));
        let bias: Vec<f32> = (0..heads).flat_map(|_| [-2.0, -2.0, 2.0]).collect();
        proj.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [3 * heads]).convert::<B::FloatElem>(),
            device,
        )));
        Self { proj, heads }
    }

    /// Gate logits (before the sigmoid) of the (normed) layer input `x` `[batch, seq, dim]` →
    /// `[batch, seq, 3 * heads]`, column `3 * head + branch`.
    pub fn logits(&self, kernels: &Kernels<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear(kernels, &self.proj, x)
    }

    /// Mixes `[compressed, selected, sliding]` outputs `[batch, heads, seq, dim_head]` by the gates
    /// computed from the (normed) layer input `x` `[batch, seq, dim]`.
    pub fn combine(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        branches: [Tensor<B, 4>; 3],
    ) -> Tensor<B, 4> {
        self.mix(self.logits(kernels, x), branches)
    }

    /// Mixes the branches by the gates of `logits` `[batch, seq, 3 * heads]` ([`Self::logits`]).
    pub fn mix(&self, logits: Tensor<B, 3>, branches: [Tensor<B, 4>; 3]) -> Tensor<B, 4> {
        let [b, n, _] = logits.dims();
        let h = self.heads;
        // [batch, heads, seq, 3]
        let gates = sigmoid(logits).reshape([b, n, h, 3]).swap_dims(1, 2);
        // a weighted sum of three terms (element-wise: fuses into one kernel where the backend
        // fuses, and its backward too; a stack + [1 × 3] matmul copied every branch)
        let [compressed, selected, sliding] = branches;
        compressed * gates.clone().narrow(3, 0, 1)
            + selected * gates.clone().narrow(3, 1, 1)
            + sliding * gates.narrow(3, 2, 1)
    }
}
