//! Dense causal attention, the baseline (`transformer.py::Attention` of the reference): pre-norm,
//! separate q/k/v projections, rotary embeddings, GQA.
//!
//! GQA head pairing follows the reference, which repeats kv heads with
//! `'b h ... -> b (g h) ...'`: query head `i` uses kv head `i % kv_heads` (the sparse layer
//! pairs head `i` with kv head `i / group` instead).
//!
//! On backends with fused kernels (CUDA, wgpu) a whole sequence's attention runs on the
//! sliding-window kernel with a window as long as the sequence (no `[n, n]` scores); the
//! tensor-op path below materialises the scores and stays the oracle and the CPU's path.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::attend::attend;
use crate::cache::{FullCache, KvBuffer};
use crate::kernels::{KernelOptions, Kernels};
use crate::norm::RmsNorm;
use crate::rope::Rotation;
use crate::tensor_util::{greater_mask, linear};

/// One dense attention layer.
#[derive(Module, Debug)]
pub struct FullAttention<B: Backend> {
    /// Pre-norm.
    pub norm: RmsNorm<B>,
    /// `dim → heads * dim_head`, no bias.
    pub to_q: Linear<B>,
    /// `dim → kv_heads * dim_head`, no bias.
    pub to_k: Linear<B>,
    /// `dim → kv_heads * dim_head`, no bias.
    pub to_v: Linear<B>,
    /// `heads * dim_head → dim`, no bias.
    pub to_out: Linear<B>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// How the layer runs when called on its own (inside a [`crate::Transformer`], the model's
    /// options are handed down). Not saved.
    #[module(skip)]
    pub kernel_options: KernelOptions,
}

impl<B: Backend> FullAttention<B> {
    /// New layer (the caller validated the sizes).
    pub fn new(
        dim: usize,
        dim_head: usize,
        heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            norm: RmsNorm::new(dim, device),
            to_q: linear(dim, heads * dim_head),
            to_k: linear(dim, kv_heads * dim_head),
            to_v: linear(dim, kv_heads * dim_head),
            to_out: linear(heads * dim_head, dim),
            heads,
            kv_heads,
            dim_head,
            kernel_options: KernelOptions::default(),
        }
    }

    /// Projects a normed input `[batch, seq, dim]` to `[batch, heads | kv_heads, seq, dim_head]`.
    pub(crate) fn project(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
    ) -> [Tensor<B, 4>; 3] {
        let [b, n, _] = x.dims();
        let d = self.dim_head;
        let split = |t: Tensor<B, 3>, heads: usize| t.reshape([b, n, heads, d]).swap_dims(1, 2);
        let q = rotation.apply(split(linear(kernels, &self.to_q, x.clone()), self.heads));
        let k = rotation.apply(split(linear(kernels, &self.to_k, x.clone()), self.kv_heads));
        let v = split(linear(kernels, &self.to_v, x), self.kv_heads);
        [q, k, v]
    }

    /// Attention of rotated `q` `[batch, heads, n, dim_head]` at positions
    /// `offset..offset + n` over all keys `[batch, kv_heads, offset + n, dim_head]`, then the
    /// output projection: → `[batch, n, dim]`.
    pub(crate) fn attend_keys(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        offset: usize,
    ) -> Tensor<B, 3> {
        let [b, h, n, d] = q.dims();
        let keys = k.dims()[2];
        let g = h / self.kv_heads;
        let scale = (d as f64).powf(-0.5);
        if let Some(out) = self.attend_fused(kernels, &q, &k, &v, offset, scale) {
            return linear(
                kernels,
                &self.to_out,
                out.swap_dims(1, 2).reshape([b, n, h * d]),
            );
        }
        let blocked = (n > 1).then(|| {
            // row r = (group member, query): blocked where key j > offset + r % n
            let rows = (0..g * n).map(|r| (offset + r % n) as i64).collect();
            let cols = (0..keys as i64).collect();
            greater_mask::<B>(rows, cols, &q.device()).reshape([1, 1, 1, g * n, keys])
        });
        // head i = gi * kv_heads + kv  →  [b, kv_heads, 1, g * n, d]
        let q = q
            .reshape([b, g, self.kv_heads, n, d])
            .swap_dims(1, 2)
            .reshape([b, self.kv_heads, 1, g * n, d]);
        let out = attend(
            kernels,
            q,
            k.unsqueeze_dim(2),
            v.unsqueeze_dim(2),
            blocked,
            scale,
        )
        .out;
        let out = out
            .reshape([b, self.kv_heads, g, n, d])
            .swap_dims(1, 2)
            .reshape([b, h, n, d]);
        linear(
            kernels,
            &self.to_out,
            out.swap_dims(1, 2).reshape([b, n, h * d]),
        )
    }

    /// Causal attention over a whole sequence (`offset` 0, as many keys as queries) on the
    /// backend's fused kernel, where one is registered: the sliding-window kernel with a window
    /// that reaches the first key, so no `[n, n]` scores are materialised (memory linear in the
    /// sequence, a flash-style online softmax). Query heads are reordered so that the kernel's
    /// pairing of head `j` with kv head `j / g` is the reference's `i % kv_heads`, and back.
    /// `None`: the tensor-op path runs.
    fn attend_fused(
        &self,
        kernels: &Kernels<B>,
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        offset: usize,
        scale: f64,
    ) -> Option<Tensor<B, 4>> {
        let [b, h, n, d] = q.dims();
        let kvh = self.kv_heads;
        let g = h / kvh;
        if offset != 0 || n < 2 || k.dims()[2] != n {
            return None;
        }
        let fused = kernels.fused()?;
        // head i = gi * kv_heads + kv  →  j = kv * g + gi
        let q = q
            .clone()
            .reshape([b, g, kvh, n, d])
            .swap_dims(1, 2)
            .reshape([b, h, n, d]);
        let out = fused.sliding_attention(&q, k, v, 0, n, scale)?;
        Some(
            out.reshape([b, kvh, g, n, d])
                .swap_dims(1, 2)
                .reshape([b, h, n, d]),
        )
    }

    /// The kernels of this layer's own options.
    pub fn kernels(&self) -> Kernels<B> {
        Kernels::new(&self.kernel_options)
    }

    /// Causal forward: `[batch, seq, dim]` → `[batch, seq, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(&self.kernels(), x)
    }

    /// [`Self::forward`] through `kernels`.
    pub fn forward_with(&self, kernels: &Kernels<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rotation = Rotation::new(self.dim_head, 0, x.dims()[1], &x.device());
        self.forward_rotated(kernels, x, &rotation)
    }

    /// [`Self::forward_with`] with the `rotation` of positions `0..seq` (one for every layer
    /// of a model: its table is computed on the host).
    pub fn forward_rotated(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
    ) -> Tensor<B, 3> {
        let [q, k, v] = self.project(kernels, self.norm.forward(x), rotation);
        self.attend_keys(kernels, q, k, v, 0)
    }

    /// Forward over a prompt that also returns the decode cache, with room for `extra` tokens.
    pub fn prefill(&self, x: Tensor<B, 3>, extra: usize) -> (Tensor<B, 3>, FullCache<B>) {
        self.prefill_with(&self.kernels(), x, extra)
    }

    /// [`Self::prefill`] through `kernels`.
    pub fn prefill_with(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        extra: usize,
    ) -> (Tensor<B, 3>, FullCache<B>) {
        let rotation = Rotation::new(self.dim_head, 0, x.dims()[1], &x.device());
        let [q, k, v] = self.project(kernels, self.norm.forward(x), &rotation);
        let out = self.attend_keys(kernels, q, k.clone(), v.clone(), 0);
        (
            out,
            FullCache {
                kv: KvBuffer::new(k, v, extra),
            },
        )
    }

    /// Decodes one token `[batch, 1, dim]` at position `cache.kv.len()`, rotated by `rotation`.
    pub fn step(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        cache: FullCache<B>,
        rotation: &Rotation<B>,
    ) -> (Tensor<B, 3>, FullCache<B>) {
        let pos = cache.kv.len();
        let [q, k, v] = self.project(kernels, self.norm.forward(x), rotation);
        let kv = cache.kv.push(kernels, k, v);
        let (k, v) = kv.all();
        (self.attend_keys(kernels, q, k, v, pos), FullCache { kv })
    }
}
