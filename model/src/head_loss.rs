//! Next-token cross-entropy through the output layer, chunk by chunk over the tokens, so that
//! the `[tokens, vocab]` logits never exist as one tensor.
//!
//! Dimensions:
//! - `r`  rows (predicted tokens: batch × sequence)
//! - `d`  model dimension (the output layer's input)
//! - `v`  vocabulary
//! - `c`  rows per chunk ([`chunk_rows`]: one `[c, v]` tensor fits a byte budget)
//!
//! Why: a GPU driver may refuse any single buffer above a limit (128–256 MiB on many Vulkan
//! drivers and Apple's Metal, whatever the free memory); the logits of one micro-batch of the
//! tiny preset are 165 MiB. Chunking also keeps memory flat on CUDA: 346 MB of f32 logits per
//! 4096-token step otherwise.
//!
//! Training without keeping the chunks: when a gradient is asked for, each chunk computes its
//! loss and, at once, the loss's gradients with respect to the hidden rows, the weight and the
//! bias (`∂L/∂logits = softmax − onehot(target)`, divided by `r`), all on detached values. The
//! result is `L + (S − stop_grad(S))` with `S = Σ h·∂h + Σ W·∂W + Σ b·∂b`: its value is `L`, its
//! gradient the exact one, and nothing of size `[c, v]` outlives its chunk. The same code runs
//! on every backend.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;

/// The default largest chunk of logits: 64 MiB, ≈ 790 tokens of a 21,128-token vocabulary in
/// f32 (memory stays flat however many tokens a step has).
pub const DEFAULT_LOGITS_BYTES: u64 = 64 << 20;

/// The byte budget of one chunk of logits on a device whose largest single buffer is `limit`
/// (`None`: no such limit): the default, or the limit when lower.
pub fn logits_budget(limit: Option<u64>) -> u64 {
    limit.map_or(DEFAULT_LOGITS_BYTES, |l| l.min(DEFAULT_LOGITS_BYTES))
}

/// Rows per chunk so that one `[rows, vocab]` tensor of `elem_bytes`-byte values stays within
/// `max_bytes` (at least one row; at most `rows`).
pub fn chunk_rows(rows: usize, vocab: usize, elem_bytes: usize, max_bytes: u64) -> usize {
    let per_row = (vocab.max(1) * elem_bytes.max(1)) as u64;
    ((max_bytes / per_row) as usize).clamp(1, rows.max(1))
}

/// Mean cross-entropy `[1]` of the rows `h` `[r, d]` through the output layer (`weight`
/// `[d, v]`, optional `bias` `[v]`) against `targets` `[r]`, with at most `chunk` rows of
/// logits at a time. Equal to `cross_entropy(h · W + b, targets)`; differentiable in `h`,
/// `weight` and `bias` when they are tracked.
pub fn linear_cross_entropy<B: Backend>(
    h: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    chunk: usize,
) -> Tensor<B, 1> {
    let [r, d] = h.dims();
    let v = weight.dims()[1];
    let chunk = chunk.clamp(1, r.max(1));
    let tracked = h.is_require_grad()
        || weight.is_require_grad()
        || bias.as_ref().is_some_and(|b| b.is_require_grad());
    let device = h.device();
    // 1. detached operands: nothing below is recorded for the backward pass
    let (hd, wd) = (h.clone().detach(), weight.clone().detach());
    let bd = bias.clone().map(|b| b.detach().reshape([1, v]));
    let wt = tracked.then(|| wd.clone().transpose()); // [v, d]
    let inv_r = 1.0 / r as f64;

    let mut total = Tensor::<B, 1>::zeros([1], &device);
    let mut grad_h = Vec::new();
    let mut grad_w = tracked.then(|| Tensor::<B, 2>::zeros([d, v], &device));
    let mut grad_b = (tracked && bias.is_some()).then(|| Tensor::<B, 2>::zeros([1, v], &device));
    let mut start = 0;
    while start < r {
        let c = chunk.min(r - start);
        let hc = hd.clone().narrow(0, start, c); // [c, d]
        let tc = targets.clone().narrow(0, start, c).reshape([c, 1]);
        // 2. the chunk's logits [c, v] through their log-sum-exp [c, 1]
        let (e, z, lse, target) = chunk_logits(hc.clone(), wd.clone(), bd.clone(), tc.clone());
        // 3. the chunk's summed loss Σ (lse − logit of the target)
        total = total + (lse - target).sum();
        // 4. its gradients: (softmax − onehot) / r, through the layer
        if let Some(wt) = &wt {
            let ones = Tensor::<B, 2>::ones([c, 1], &device).neg();
            let g = (e / z).scatter(1, tc, ones, IndexingUpdateOp::Add) * inv_r; // [c, v]
            grad_h.push(g.clone().matmul(wt.clone())); // [c, d]
            if let Some(gb) = grad_b.take() {
                grad_b = Some(gb + g.clone().sum_dim(0));
            }
            grad_w = grad_w.map(|gw| gw + hc.transpose().matmul(g));
        }
        start += c;
    }
    let loss = total * inv_r;
    if !tracked {
        return loss;
    }
    // 5. value L, gradient ∂L: L + (S − stop_grad(S))
    let grad_h = Tensor::cat(grad_h, 0);
    let mut s = (h * grad_h).sum();
    if let Some(gw) = grad_w {
        s = s + (weight * gw).sum();
    }
    if let (Some(b), Some(gb)) = (bias, grad_b) {
        s = s + (b.reshape([1, v]) * gb).sum();
    }
    // (S − stop_grad(S)) first: exactly zero, so L keeps every bit
    loss + (s.clone() - s.detach())
}

/// Natural log-probabilities `[r]` of `targets` `[r]` under the logits `h · W + b` (shapes as in
/// [`linear_cross_entropy`]), at most `chunk` rows of logits at a time.
pub fn target_log_probs<B: Backend>(
    h: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    chunk: usize,
) -> Tensor<B, 1> {
    let r = h.dims()[0];
    let v = weight.dims()[1];
    let chunk = chunk.clamp(1, r.max(1));
    let b = bias.map(|b| b.reshape([1, v]));
    let parts: Vec<Tensor<B, 2>> = (0..r)
        .step_by(chunk)
        .map(|start| {
            let c = chunk.min(r - start);
            let hc = h.clone().narrow(0, start, c);
            let tc = targets.clone().narrow(0, start, c).reshape([c, 1]);
            let (_, _, lse, target) = chunk_logits(hc, weight.clone(), b.clone(), tc);
            target - lse
        })
        .collect();
    Tensor::cat(parts, 0).reshape([r])
}

/// One chunk's logits, kept as the pieces of their softmax: `exp(logits − max)` `[c, v]`, its
/// row sums `z` `[c, 1]`, the log-sum-exp `[c, 1]` and the target's logit `[c, 1]`.
fn chunk_logits<B: Backend>(
    hc: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 2>>,
    tc: Tensor<B, 2, Int>,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
    let mut logits = hc.matmul(w);
    if let Some(b) = bias {
        logits = logits + b;
    }
    let max = logits.clone().detach().max_dim(1);
    let e = (logits.clone() - max.clone()).exp();
    let z = e.clone().sum_dim(1);
    let lse = z.clone().log() + max;
    let target = logits.gather(1, tc);
    (e, z, lse, target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::cross_entropy;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type A = Autodiff<NdArray<f32>>;

    fn close(a: Tensor<A, 2>, b: Tensor<A, 2>) {
        let (a, b) = (a.into_data(), b.into_data());
        assert!(
            a.as_slice::<f32>().unwrap().iter().all(|x| x.is_finite()),
            "non-finite values"
        );
        a.assert_approx_eq::<f32>(&b, Tolerance::absolute(1e-5));
    }

    #[test]
    fn chunk_rows_stays_within_the_budget() {
        assert_eq!(chunk_rows(2048, 21128, 4, 64 << 20), 794);
        assert_eq!(chunk_rows(10, 21128, 4, 64 << 20), 10);
        assert_eq!(chunk_rows(10, 1 << 30, 4, 1), 1);
    }

    /// Loss and gradients (hidden rows, weight, bias) equal the whole-logits cross-entropy of
    /// the tensor ops at chunk sizes that divide the rows and ones that do not.
    #[test]
    fn chunked_loss_and_gradients_equal_the_whole_logits() {
        let device = Default::default();
        let (r, d, v) = (37, 8, 29);
        let h0 = Tensor::<A, 2>::random([r, d], Distribution::Normal(0.0, 1.0), &device);
        let w0 = Tensor::<A, 2>::random([d, v], Distribution::Normal(0.0, 1.0), &device);
        let b0 = Tensor::<A, 1>::random([v], Distribution::Normal(0.0, 1.0), &device);
        let ids: Vec<i64> = (0..r as i64).map(|i| (i * 7 + 3) % v as i64).collect();
        let t = Tensor::<A, 1, Int>::from_data(TensorData::new(ids, [r]), &device);
        let leaves = || {
            (
                h0.clone().detach().require_grad(),
                w0.clone().detach().require_grad(),
                b0.clone().detach().require_grad(),
            )
        };
        // the oracle: whole logits, log-softmax and gather
        let (h, w, b) = leaves();
        let logits = h.clone().matmul(w.clone()) + b.clone().reshape([1, v]);
        let want = cross_entropy(logits.reshape([1, r, v]), t.clone().reshape([1, r]));
        let grads_of =
            |loss: Tensor<A, 1>, (h, w, b): &(Tensor<A, 2>, Tensor<A, 2>, Tensor<A, 1>)| {
                let g = loss.backward();
                [
                    h.grad(&g).unwrap(),
                    w.grad(&g).unwrap(),
                    b.grad(&g).unwrap().reshape([1, v]),
                ]
            };
        let want_grads = grads_of(want.clone(), &(h, w, b));
        for chunk in [1, 5, 16, 37, 100] {
            let (h, w, b) = leaves();
            let got = linear_cross_entropy(h.clone(), w.clone(), Some(b.clone()), t.clone(), chunk);
            close(got.clone().reshape([1, 1]), want.clone().reshape([1, 1]));
            let got_grads = grads_of(got, &(h, w, b));
            for (a, b) in got_grads.into_iter().zip(want_grads.iter()) {
                close(Tensor::from_inner(a), Tensor::from_inner(b.clone()));
            }
            // untracked (validation): the value alone
            let plain = linear_cross_entropy(h0.clone(), w0.clone(), None, t.clone(), chunk);
            let logits = h0.clone().matmul(w0.clone());
            let want = cross_entropy(logits.reshape([1, r, v]), t.clone().reshape([1, r]));
            close(plain.reshape([1, 1]), want.reshape([1, 1]));
        }
    }

    /// The chunked log-probabilities equal the log-softmax of the whole logits.
    #[test]
    fn chunked_log_probs_equal_the_log_softmax() {
        let device = Default::default();
        let (r, d, v) = (23, 6, 17);
        let h = Tensor::<A, 2>::random([r, d], Distribution::Normal(0.0, 2.0), &device);
        let w = Tensor::<A, 2>::random([d, v], Distribution::Normal(0.0, 2.0), &device);
        let b = Tensor::<A, 1>::random([v], Distribution::Normal(0.0, 1.0), &device);
        let ids: Vec<i64> = (0..r as i64).map(|i| (i * 5 + 1) % v as i64).collect();
        let t = Tensor::<A, 1, Int>::from_data(TensorData::new(ids, [r]), &device);
        let logits = h.clone().matmul(w.clone()) + b.clone().reshape([1, v]);
        let want = burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, t.clone().reshape([r, 1]))
            .reshape([1, r]);
        for chunk in [1, 4, 23, 64] {
            let got = target_log_probs(h.clone(), w.clone(), Some(b.clone()), t.clone(), chunk);
            close(got.reshape([1, r]), want.clone());
        }
    }

    /// A NaN in the hidden rows reaches the loss (the training loop's NaN detection relies on it).
    #[test]
    fn a_nan_row_makes_the_loss_nan() {
        let device = Default::default();
        let mut h = vec![0.5f32; 6 * 4];
        h[9] = f32::NAN;
        let h = Tensor::<A, 2>::from_data(TensorData::new(h, [6, 4]), &device).require_grad();
        let w = Tensor::<A, 2>::ones([4, 5], &device);
        let t = Tensor::<A, 1, Int>::zeros([6], &device);
        let loss = linear_cross_entropy(h, w, None, t, 4).into_scalar();
        assert!(loss.is_nan());
    }
}
