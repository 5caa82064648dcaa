//! Branch 1, compressed attention (NSA paper §3.3.1).
//!
//! Keys and values are cut into blocks of `compress_block_size` tokens every
//! `compress_block_sliding_stride` tokens (the first block is left-padded with zeros when blocks
//! overlap), a learned intra-block position is added, and a per-kv-head-shared MLP pools each
//! block into one key and one value. Queries (not rotated) attend to learned memory key/values
//! plus every compressed block that ended strictly before them. The scaled logits are kept: they
//! are the importance scores the selection branch ranks blocks by.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use crate::attend::{attend, Attended};
use crate::config::NsaConfig;
use crate::kernels::Kernels;
use crate::select::{importance, select_top, Selection};
use crate::tensor_util::{greater_mask, linear, pad_zeros, windows};

/// `Linear(block * dim_head → hidden) → ReLU → Linear(hidden → dim_head)`, shared by all heads.
#[derive(Module, Debug)]
pub struct CompressMlp<B: Backend> {
    /// First layer (with bias).
    pub fc1: Linear<B>,
    /// Second layer (with bias).
    pub fc2: Linear<B>,
}

impl<B: Backend> CompressMlp<B> {
    fn new(input: usize, hidden: usize, output: usize, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(input, hidden).init(device),
            fc2: LinearConfig::new(hidden, output).init(device),
        }
    }

    /// `[..., block * dim_head]` → `[..., dim_head]`.
    pub fn forward<const D: usize>(&self, kernels: &Kernels<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(kernels, &self.fc2, relu(linear(kernels, &self.fc1, x)))
    }
}

/// Parameters of the compressed branch.
#[derive(Module, Debug)]
pub struct Compressor<B: Backend> {
    /// Pools key blocks.
    pub k_compress: CompressMlp<B>,
    /// Pools value blocks.
    pub v_compress: CompressMlp<B>,
    /// Added to each key block before pooling, `[kv_heads, block, dim_head]` (zeros at init).
    pub k_intrablock_positions: Param<Tensor<B, 3>>,
    /// Added to each value block before pooling, `[kv_heads, block, dim_head]`.
    pub v_intrablock_positions: Param<Tensor<B, 3>>,
    /// Memory keys and values, `[2, kv_heads, mem, dim_head]` (zeros at init).
    pub compress_mem_kv: Param<Tensor<B, 4>>,
    /// Tokens per block.
    pub block: usize,
    /// Tokens between block starts.
    pub stride: usize,
}

/// Compressed branch output.
pub struct Compressed<B: Backend> {
    /// `[batch, heads, seq, dim_head]`
    pub out: Tensor<B, 4>,
    /// Importance logits over the compressed blocks (memory slots removed), masked causally,
    /// `[batch, heads, seq, blocks]`; `None` when no block is complete yet.
    pub importance: Option<Tensor<B, 4>>,
}

impl<B: Backend> Compressor<B> {
    /// New parameters for `config`.
    pub fn new(config: &NsaConfig, device: &B::Device) -> Self {
        let (kvh, l, d) = (
            config.kv_heads(),
            config.compress_block_size,
            config.dim_head,
        );
        let hidden = config.compress_hidden();
        Self {
            k_compress: CompressMlp::new(l * d, hidden, d, device),
            v_compress: CompressMlp::new(l * d, hidden, d, device),
            k_intrablock_positions: Param::from_tensor(Tensor::zeros([kvh, l, d], device)),
            v_intrablock_positions: Param::from_tensor(Tensor::zeros([kvh, l, d], device)),
            compress_mem_kv: Param::from_tensor(Tensor::zeros(
                [2, kvh, config.num_compressed_mem_kv, d],
                device,
            )),
            block: l,
            stride: config.compress_block_sliding_stride,
        }
    }

    /// Number of memory slots.
    pub fn num_mem(&self) -> usize {
        self.compress_mem_kv.dims()[2]
    }

    /// Pools complete blocks of `k`, `v` `[batch, kv_heads, seq, dim_head]` (un-rotated) into
    /// `[batch, kv_heads, seq / stride, dim_head]` each; `None` if no block is complete.
    pub fn compress(
        &self,
        kernels: &Kernels<B>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let [b, kvh, n, d] = k.dims();
        let count = n / self.stride;
        if count == 0 {
            return None;
        }
        let overlap = self.block - self.stride;
        let pool = |x: Tensor<B, 4>, pos: Tensor<B, 3>, mlp: &CompressMlp<B>| {
            let x = pad_zeros(x.narrow(2, 0, count * self.stride), 2, overlap, 0);
            let pos = pos.unsqueeze_dim::<4>(1).unsqueeze::<5>();
            let blocks = windows(x, self.block, self.stride, count) + pos;
            mlp.forward(kernels, blocks.reshape([b, kvh, count, self.block * d]))
        };
        Some((
            pool(k, self.k_intrablock_positions.val(), &self.k_compress),
            pool(v, self.v_intrablock_positions.val(), &self.v_compress),
        ))
    }

    /// Pools one block `[batch, kv_heads, block, dim_head]` (the decode path).
    pub fn compress_one(
        &self,
        kernels: &Kernels<B>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, kvh, l, d] = k.dims();
        let pool = |x: Tensor<B, 4>, pos: Tensor<B, 3>, mlp: &CompressMlp<B>| {
            mlp.forward(kernels, (x + pos.unsqueeze()).reshape([b, kvh, 1, l * d]))
        };
        (
            pool(k, self.k_intrablock_positions.val(), &self.k_compress),
            pool(v, self.v_intrablock_positions.val(), &self.v_compress),
        )
    }

    /// Memory plus compressed keys and values `[batch, kv_heads, mem + blocks, dim_head]`.
    pub fn with_memory(
        &self,
        batch: usize,
        compressed: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, kvh, m, d] = self.compress_mem_kv.dims();
        let mem = self.compress_mem_kv.val();
        let mem_k = mem.clone().narrow(0, 0, 1).expand([batch, kvh, m, d]);
        let mem_v = mem.narrow(0, 1, 1).expand([batch, kvh, m, d]);
        match compressed {
            Some((ck, cv)) => (
                Tensor::cat(vec![mem_k, ck], 2),
                Tensor::cat(vec![mem_v, cv], 2),
            ),
            None => (mem_k, mem_v),
        }
    }

    /// [`Self::attend`] for a whole sequence (queries at positions `0..seq`) and the block
    /// selection it drives ([`importance`], then [`select_top`]): the branch output and the
    /// selected blocks. A registered fused kernel does both without materialising the
    /// `[seq, blocks]` importance logits.
    pub fn attend_and_select(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        ck: Tensor<B, 4>,
        cv: Tensor<B, 4>,
        config: &NsaConfig,
        scale: f64,
    ) -> (Tensor<B, 4>, Option<Selection<B>>) {
        if let Some(fused) = kernels.fused() {
            let sizes = config.sizes();
            let done = fused.compressed_and_selection(&q, &ck, &cv, self.num_mem(), &sizes, scale);
            if let Some(done) = done {
                return done;
            }
        }
        let comp = self.attend(kernels, q, ck, cv, 0, scale);
        let selection = comp
            .importance
            .and_then(|logits| importance(logits, config, 0))
            .and_then(|probs| select_top(kernels, probs, config));
        (comp.out, selection)
    }

    /// Attention of `q` `[batch, heads, seq, dim_head]` (rows at absolute positions
    /// `offset..offset + seq`) over memory + compressed `ck`, `cv`
    /// `[batch, kv_heads, mem + blocks, dim_head]`. Block `j` (ending at token
    /// `(j + 1) * stride - 1`) is visible to queries strictly after its end.
    pub fn attend(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        ck: Tensor<B, 4>,
        cv: Tensor<B, 4>,
        offset: usize,
        scale: f64,
    ) -> Compressed<B> {
        let [b, h, n, d] = q.dims();
        let [_, kvh, slots, _] = ck.dims();
        let g = h / kvh;
        let m = self.num_mem();
        let blocks = slots - m;
        // at decode time every cached block ended before the query: no mask
        let all_visible = blocks * self.stride <= offset;
        let blocked = (blocks > 0 && !all_visible).then(|| {
            // slot j (block j - m) ends at (j - m + 1) * stride: blocked while that lies beyond
            // the query; memory slots (j < m) give a value <= 0 and are always visible
            let rows = (0..n).map(|i| (offset + i) as i64).collect();
            let cols = (0..slots)
                .map(|j| (j as i64 - m as i64 + 1) * self.stride as i64)
                .collect();
            greater_mask::<B>(rows, cols, &q.device()).reshape([1, 1, 1, n, slots])
        });
        let Attended { out, sim } = attend(
            kernels,
            q.reshape([b, kvh, g, n, d]),
            ck.unsqueeze_dim(2),
            cv.unsqueeze_dim(2),
            blocked,
            scale,
        );
        let importance = (blocks > 0).then(|| sim.reshape([b, h, n, slots]).narrow(3, m, blocks));
        Compressed {
            out: out.reshape([b, h, n, d]),
            importance,
        }
    }
}
