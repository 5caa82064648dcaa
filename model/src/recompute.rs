//! Training with recomputation (activation checkpointing, one block at a time): the value and
//! the gradients of [`Transformer::chunked_loss`] while the backward pass holds the graph of
//! one block, not of the whole model.
//!
//! Dimensions:
//! - `b` batch, `n` sequence (predicted tokens per row), `d` model dimension
//! - `L` depth (blocks)
//!
//! How:
//! 1. a forward pass without a graph (the inner backend) keeps every block's input `x_i`
//!    `[b, n, d]` and the last block's output `x_L`;
//! 2. the head (final norm, output layer, chunked cross-entropy) runs tracked from `x_L` as a
//!    leaf: its backward gives the parameters' gradients and `∂loss/∂x_L`;
//! 3. block `i` from the last to the first runs tracked again from `x_i` as a leaf; the backward
//!    of `Σ block_i(x_i) · ∂loss/∂x_{i+1}` gives its parameters' gradients and `∂loss/∂x_i`;
//! 4. the embedding's gradient from `Σ emb(ids) · ∂loss/∂x_0`.
//!
//! A DSA layer's indexer loss joins its block's backward in step 3 (the indexer reads the
//! block's input detached: no gradient of it flows down); in a frozen warm-up step only those
//! losses are differentiated.
//!
//! Memory: `L + 1` tensors `[b, n, d]` plus one block's graph (or the head's, whose logits are
//! chunked); cost: one more forward pass of every block (about a third of a step's work). The
//! gradients are those of the one-graph backward (the forward kernels of the first pass may
//! round differently from the tracked ones: equal within float noise, tested).

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::dsa::DsaTraining;
use crate::head_loss;
use crate::Transformer;

impl<B: AutodiffBackend> Transformer<B> {
    /// The mean next-token cross-entropy of `ids` `[batch, seq + 1]` (the value of
    /// [`Transformer::chunked_loss`] with `max_logits_bytes`), computed with recomputation; the
    /// gradients of `scale × loss` go to `sink` in `depth + 2` parts (the head, each block from
    /// the last, the embedding), whose parameter gradients add up to those of one backward pass
    /// of the whole model.
    pub fn loss_backward_recomputed(
        &self,
        ids: Tensor<B, 2, Int>,
        max_logits_bytes: u64,
        scale: f64,
        sink: impl FnMut(B::Gradients),
    ) -> Tensor<B::InnerBackend, 1> {
        let training = DsaTraining::default();
        self.loss_backward_recomputed_staged(ids, max_logits_bytes, scale, training, sink)
            .0
    }

    /// [`Self::loss_backward_recomputed`] for a step of `training` (the DSA layers' stage;
    /// without `lm_loss` only their indexer losses are differentiated): the gradients of
    /// `scale × (loss + indexer loss)` go to `sink`; returns the loss and the indexer loss
    /// (the sum over the DSA layers, `None` without them).
    pub fn loss_backward_recomputed_staged(
        &self,
        ids: Tensor<B, 2, Int>,
        max_logits_bytes: u64,
        scale: f64,
        training: DsaTraining,
        mut sink: impl FnMut(B::Gradients),
    ) -> (
        Tensor<B::InnerBackend, 1>,
        Option<Tensor<B::InnerBackend, 1>>,
    ) {
        let [b, n1] = ids.dims();
        let n = n1 - 1;
        let inputs = ids.clone().narrow(1, 0, n);
        let targets = ids.narrow(1, 1, n).reshape([b * n]);
        let kernels = self.kernels();
        let stage = training.stage;

        // 1. the forward pass without a graph, keeping each block's input
        let plain = self.valid().with_kernel_options(self.kernel_options);
        let plain_kernels = plain.kernels();
        let device = inputs.device();
        let plain_rotation = plain.rotation(0, n, &device);
        let mut x = plain.token_emb.forward(inputs.clone().inner());
        let mut saved = Vec::with_capacity(plain.layers.len());
        for layer in &plain.layers {
            saved.push(x.clone());
            x = layer
                .forward_staged(&plain_kernels, x, &plain_rotation, stage, false)
                .0;
        }
        drop(plain);

        // 2. the head from x_L (differentiated only where the LM loss trains the model)
        let h = Tensor::<B, 3>::from_inner(x).require_grad();
        let d = h.dims()[2];
        let rows = self.norm.forward(h.clone()).reshape([b * n, d]);
        let chunk = self.logits_chunk(b * n, max_logits_bytes);
        let bias = self.to_logits.bias.as_ref().map(|b| b.val());
        let loss = head_loss::linear_cross_entropy(
            rows,
            self.to_logits.weight.val(),
            bias,
            targets,
            chunk,
        );
        let value = loss.clone().inner();
        let mut grad = None;
        if training.lm_loss {
            let mut grads = loss.mul_scalar(scale).backward();
            grad = Some(leaf_grad(&h, &mut grads));
            sink(grads);
        }

        // 3. each block again, from the last, with a graph: the output against the gradient
        // from above, and the block's indexer loss (which reads its input detached)
        let rotation = self.rotation(0, n, &device);
        let mut indexer_losses = Vec::new();
        for (layer, x) in self.layers.iter().zip(saved).rev() {
            let x = Tensor::<B, 3>::from_inner(x).require_grad();
            let (out, kl) = layer.forward_staged(&kernels, x.clone(), &rotation, stage, true);
            let through = grad.take().map(|g| (out * Tensor::from_inner(g)).sum());
            if let Some(kl) = &kl {
                indexer_losses.push(kl.clone().inner());
            }
            let kl = kl.map(|kl| kl.mul_scalar(scale));
            let objective = match (through, kl) {
                (Some(t), Some(kl)) => t + kl,
                (Some(t), None) => t,
                (None, Some(kl)) => kl,
                (None, None) => continue,
            };
            let mut grads = objective.backward();
            if training.lm_loss {
                grad = Some(leaf_grad(&x, &mut grads));
            }
            sink(grads);
        }

        // 4. the embedding
        if let Some(grad) = grad {
            let emb = self.token_emb.forward(inputs);
            sink((emb * Tensor::from_inner(grad)).sum().backward());
        }
        let indexer_loss =
            (!indexer_losses.is_empty()).then(|| Tensor::cat(indexer_losses, 0).sum());
        (value, indexer_loss)
    }
}

/// The gradient of a leaf that the differentiated value depends on (every block's output and
/// the head's loss depend on their input).
fn leaf_grad<B: AutodiffBackend>(
    leaf: &Tensor<B, 3>,
    grads: &mut B::Gradients,
) -> Tensor<B::InnerBackend, 3> {
    leaf.grad_remove(grads)
        .expect("a block's output depends on its input")
}
