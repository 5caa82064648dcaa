//! The decoder-only language model (`transformer.py::Transformer` of the reference):
//! token embedding → `depth` × (attention + pre-RMSNorm GELU feed-forward, both residual) →
//! RMSNorm → logits.

use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::cache::{Cache, LayerCache};
use crate::config::{AttentionKind, ConfigError, TransformerConfig};
use crate::dsa::{DsaAttention, DsaStage};
use crate::full::FullAttention;
use crate::head_loss;
use crate::kernels::{FeedForwardParams, KernelOptions, Kernels, Projection};
use crate::norm::RmsNorm;
use crate::nsa::SparseAttention;
use crate::rope::{RopeTable, Rotation};
use crate::tensor_util::{linear, norm_linear};

/// The attention of one block.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Attention<B: Backend> {
    /// Native sparse attention.
    Nsa(SparseAttention<B>),
    /// Dense causal attention.
    Full(FullAttention<B>),
    /// DeepSeek sparse attention.
    Dsa(DsaAttention<B>),
}

impl<B: Backend> Attention<B> {
    /// `[batch, seq, dim]` → `[batch, seq, dim]` (causal), with the `rotation` of positions
    /// `0..seq` ([`Transformer::rotation`]: one for every block).
    pub fn forward(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
    ) -> Tensor<B, 3> {
        self.forward_staged(kernels, x, rotation, DsaStage::Sparse, false)
            .0
    }

    /// [`Self::forward`] with a DSA layer's global branch of `stage` and, when `indexer_loss`
    /// is set, its indexer loss ([`crate::dsa::kl`]; `None` for the other kinds).
    pub fn forward_staged(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        match self {
            Self::Nsa(a) => (a.forward_rotated(kernels, x, rotation), None),
            Self::Full(a) => (a.forward_rotated(kernels, x, rotation), None),
            Self::Dsa(a) => {
                let out = a.forward_rotated(kernels, x, rotation, stage, indexer_loss);
                (out.out, out.indexer_loss)
            }
        }
    }

    /// Forward that also returns this layer's decode cache.
    pub fn prefill(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        extra: usize,
    ) -> (Tensor<B, 3>, LayerCache<B>) {
        match self {
            Self::Nsa(a) => {
                let (out, cache) = a.prefill_with(kernels, x, extra);
                (out, LayerCache::Nsa(cache))
            }
            Self::Full(a) => {
                let (out, cache) = a.prefill_with(kernels, x, extra);
                (out, LayerCache::Full(cache))
            }
            Self::Dsa(a) => {
                let (out, cache) = a.prefill_with(kernels, x, extra);
                (out, LayerCache::Dsa(cache))
            }
        }
    }

    /// The layer's own options (used when it is called on its own).
    fn set_kernel_options(&mut self, options: KernelOptions) {
        match self {
            Self::Nsa(a) => a.kernel_options = options,
            Self::Full(a) => a.kernel_options = options,
            Self::Dsa(a) => a.kernel_options = options,
        }
    }

    /// One decode step `[batch, 1, dim]` of the block this attention belongs to, with the
    /// rotation of its position → the block's output `h + ff(h)`, `h = x + attention(x)` (one
    /// operation for an NSA block where the backend has it).
    pub fn step(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        cache: LayerCache<B>,
        rotation: &Rotation<B>,
        ff: &FeedForward<B>,
    ) -> (Tensor<B, 3>, LayerCache<B>) {
        match (self, cache) {
            (Self::Nsa(a), LayerCache::Nsa(c)) => {
                let (out, cache) = a.step_with(kernels, x, c, rotation, Some(ff));
                (out, LayerCache::Nsa(cache))
            }
            (Self::Full(a), LayerCache::Full(c)) => {
                let (out, cache) = a.step(kernels, x.clone(), c, rotation);
                (ff.step(kernels, out + x), LayerCache::Full(cache))
            }
            (Self::Dsa(a), LayerCache::Dsa(c)) => {
                let (out, cache) = a.step(kernels, x.clone(), c, rotation);
                (ff.step(kernels, out + x), LayerCache::Dsa(cache))
            }
            _ => panic!("layer cache of the wrong attention kind"),
        }
    }
}

/// `RMSNorm → Linear(dim → hidden) → GELU → Linear(hidden → dim)` (with biases).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Pre-norm.
    pub norm: RmsNorm<B>,
    /// Up projection.
    pub fc1: Linear<B>,
    /// Down projection.
    pub fc2: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// New block part.
    pub fn new(dim: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            norm: RmsNorm::new(dim, device),
            fc1: LinearConfig::new(dim, hidden).init(device),
            fc2: LinearConfig::new(hidden, dim).init(device),
        }
    }

    /// `[..., dim]` → `[..., dim]`.
    pub fn forward<const D: usize>(&self, kernels: &Kernels<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        let hidden = linear(kernels, &self.fc1, self.norm.forward(x));
        linear(kernels, &self.fc2, crate::tensor_util::gelu(hidden))
    }

    /// `x + forward(x)` for the rows of a decode step `[batch, 1, dim]`: two operations where
    /// the backend registered row kernels.
    pub fn step(&self, kernels: &Kernels<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = norm_linear(kernels, Some(&self.norm), &self.fc1, x.clone(), true, None);
        norm_linear(kernels, None, &self.fc2, hidden, false, Some(x))
    }

    /// The parameters as the fused kernels take them.
    pub fn params(&self) -> FeedForwardParams<B> {
        FeedForwardParams {
            norm: self.norm.row_norm(),
            fc1: Projection::of(&self.fc1),
            fc2: Projection::of(&self.fc2),
        }
    }
}

/// One residual block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Attention.
    pub attn: Attention<B>,
    /// Feed-forward.
    pub ff: FeedForward<B>,
}

impl<B: Backend> Block<B> {
    /// `[batch, seq, dim]` → `[batch, seq, dim]`: `h = x + attention(x)`, then `h + ff(h)`;
    /// `rotation` is that of positions `0..seq` ([`Transformer::rotation`]: one for every
    /// block).
    pub fn forward(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
    ) -> Tensor<B, 3> {
        self.forward_staged(kernels, x, rotation, DsaStage::Sparse, false)
            .0
    }

    /// [`Self::forward`] with the stage and indexer loss of [`Attention::forward_staged`].
    pub fn forward_staged(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let (a, loss) = self
            .attn
            .forward_staged(kernels, x.clone(), rotation, stage, indexer_loss);
        let h = a + x;
        (self.ff.forward(kernels, h.clone()) + h, loss)
    }
}

/// The language model.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    /// Token embedding `[num_tokens, dim]`, `N(0, 1)` at init.
    pub token_emb: Embedding<B>,
    /// The blocks.
    pub layers: Vec<Block<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// `dim → num_tokens`, no bias.
    pub to_logits: Linear<B>,
    /// The config this model was built from.
    pub config: TransformerConfig,
    /// How the model runs (fused kernels, tensor cores, exact products); set by the binaries
    /// with [`Transformer::with_kernel_options`], not saved.
    #[module(skip)]
    pub kernel_options: KernelOptions,
}

impl TransformerConfig {
    /// Builds the model with the reference's initialisation; refuses an invalid config.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Transformer<B>, ConfigError> {
        self.validate()?;
        let layers = (0..self.depth)
            .map(|_| {
                let attn = match self.attention {
                    AttentionKind::Nsa => Attention::Nsa(self.nsa().init(device)?),
                    AttentionKind::Full => Attention::Full(FullAttention::new(
                        self.dim,
                        self.dim_head,
                        self.heads,
                        self.kv_heads(),
                        device,
                    )),
                    AttentionKind::Dsa => Attention::Dsa(DsaAttention::new(
                        self.dim,
                        self.dim_head,
                        self.heads,
                        self.kv_heads(),
                        &self.dsa,
                        device,
                    )),
                };
                Ok(Block {
                    attn,
                    ff: FeedForward::new(self.dim, self.ff_hidden(), device),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Transformer {
            token_emb: EmbeddingConfig::new(self.num_tokens, self.dim).init(device),
            layers,
            norm: RmsNorm::new(self.dim, device),
            to_logits: LinearConfig::new(self.dim, self.num_tokens)
                .with_bias(false)
                .init(device),
            config: self.clone(),
            kernel_options: KernelOptions::default(),
        })
    }
}

impl<B: Backend> Transformer<B> {
    /// The model with `options` (every layer too).
    pub fn with_kernel_options(mut self, options: KernelOptions) -> Self {
        self.kernel_options = options;
        for layer in &mut self.layers {
            layer.attn.set_kernel_options(options);
        }
        self
    }

    /// The kernels of the model's options.
    pub fn kernels(&self) -> Kernels<B> {
        Kernels::new(&self.kernel_options)
    }

    /// Final hidden states before the logits: ids `[batch, seq]` → `[batch, seq, dim]`.
    pub fn hidden(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.hidden_with(&self.kernels(), ids)
    }

    fn hidden_with(&self, kernels: &Kernels<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.hidden_staged(kernels, ids, DsaStage::Sparse, false).0
    }

    /// [`Self::hidden`] with the DSA layers' global branch of `stage` and, when
    /// `indexer_loss` is set, the sum of their indexer losses ([`crate::dsa::kl`]; `None`
    /// without DSA layers).
    pub fn hidden_staged(
        &self,
        kernels: &Kernels<B>,
        ids: Tensor<B, 2, Int>,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let rotation = self.rotation(0, ids.dims()[1], &ids.device());
        let mut x = self.token_emb.forward(ids);
        let mut losses = Vec::new();
        for layer in &self.layers {
            let (out, loss) = layer.forward_staged(kernels, x, &rotation, stage, indexer_loss);
            losses.extend(loss);
            x = out;
        }
        let loss = (!losses.is_empty()).then(|| Tensor::cat(losses, 0).sum());
        (self.norm.forward(x), loss)
    }

    /// The rotary rotation of positions `start..start + n`, made once for all blocks (its
    /// cosines and sines are computed on the host).
    pub fn rotation(&self, start: usize, n: usize, device: &B::Device) -> Rotation<B> {
        Rotation::new(self.config.dim_head, start, n, device)
    }

    /// Logits of a prompt `[batch, seq]` → `[batch, seq, num_tokens]`, and the decode cache with
    /// room for `extra` more tokens (it grows beyond that if needed).
    pub fn prefill(&self, ids: Tensor<B, 2, Int>, extra: usize) -> (Tensor<B, 3>, Cache<B>) {
        self.prefill_from(ids, extra, 0)
    }

    /// [`Self::prefill`] with the logits of the prompt's last position only, `[batch,
    /// num_tokens]` (what generation needs: all positions' logits of a 100k-token prompt
    /// would hold `seq × num_tokens` values, 8 GB at a vocabulary of 21k).
    pub fn prefill_last(&self, ids: Tensor<B, 2, Int>, extra: usize) -> (Tensor<B, 2>, Cache<B>) {
        let [b, len] = ids.dims();
        let (logits, cache) = self.prefill_from(ids, extra, len.saturating_sub(1));
        let vocab = logits.dims()[2];
        (logits.reshape([b, vocab]), cache)
    }

    /// The prefill, with logits from position `first` on.
    fn prefill_from(
        &self,
        ids: Tensor<B, 2, Int>,
        extra: usize,
        first: usize,
    ) -> (Tensor<B, 3>, Cache<B>) {
        let kernels = self.kernels();
        let [b, len] = ids.dims();
        let device = ids.device();
        let rope = RopeTable::new(self.config.dim_head, len, extra.max(1), &device);
        // a prompt longer than the options' chunk runs a chunk at a time through every block
        let chunk = self.kernel_options.prefill_chunk;
        let sparse: Option<Vec<&SparseAttention<B>>> = self
            .layers
            .iter()
            .map(|layer| match &layer.attn {
                Attention::Nsa(a) => Some(a),
                Attention::Full(_) | Attention::Dsa(_) => None,
            })
            .collect();
        if let Some(sparse) = sparse.filter(|_| chunk > 0 && len > chunk) {
            let mut caches: Vec<_> = sparse
                .iter()
                .map(|a| a.empty_cache(&kernels, b, len + extra, &device))
                .collect();
            let mut kept = Vec::new();
            for s in (0..len).step_by(chunk) {
                let n = chunk.min(len - s);
                let mut x = self.token_emb.forward(ids.clone().narrow(1, s, n));
                let rotation = self.rotation(s, n, &device);
                let mut next = Vec::with_capacity(caches.len());
                for ((a, layer), cache) in sparse.iter().zip(&self.layers).zip(caches) {
                    let (out, cache) = a.extend_block(&kernels, x, &layer.ff, cache, &rotation);
                    next.push(cache);
                    x = out;
                }
                caches = next;
                // the rows from `first` on
                if s + n > first {
                    let from = first.saturating_sub(s);
                    kept.push(x.narrow(1, from, n - from));
                }
            }
            let x = Tensor::cat(kept, 1);
            let logits = linear(&kernels, &self.to_logits, self.norm.forward(x));
            let layers = caches.into_iter().map(LayerCache::Nsa).collect();
            return (logits, Cache { layers, len, rope });
        }
        let mut x = self.token_emb.forward(ids);
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (a, cache) = layer.attn.prefill(&kernels, x.clone(), extra);
            layers.push(cache);
            x = a + x;
            x = layer.ff.forward(&kernels, x.clone()) + x;
        }
        let x = x.narrow(1, first, len - first);
        let logits = linear(&kernels, &self.to_logits, self.norm.forward(x));
        (logits, Cache { layers, len, rope })
    }

    /// Logits `[batch, num_tokens]` of the next token after `ids` `[batch]`, which sit at
    /// position `cache.len`; updates the cache. Work per token is independent of the context for
    /// the window and selection branches.
    pub fn step(&self, ids: Tensor<B, 1, Int>, cache: Cache<B>) -> (Tensor<B, 2>, Cache<B>) {
        let kernels = self.kernels();
        let [b] = ids.dims();
        let pos = cache.len;
        let mut rope = cache.rope;
        if !rope.covers(pos, 1) {
            // past the planned length: a new table twice as long (amortised O(1) per token)
            rope = RopeTable::new(self.config.dim_head, pos, pos.max(16), &ids.device());
        }
        let rotation = rope.rotation(pos, 1);
        let mut x = self.token_emb.forward(ids.reshape([b, 1]));
        let mut layers = Vec::with_capacity(self.layers.len());
        for (layer, c) in self.layers.iter().zip(cache.layers) {
            let (out, c) = layer.attn.step(&kernels, x, c, &rotation, &layer.ff);
            layers.push(c);
            x = out;
        }
        let v = self.config.num_tokens;
        let logits = norm_linear(&kernels, Some(&self.norm), &self.to_logits, x, false, None);
        let logits = logits.reshape([b, v]);
        (
            logits,
            Cache {
                layers,
                len: pos + 1,
                rope,
            },
        )
    }

    /// Logits `[batch, seq, num_tokens]` for ids `[batch, seq]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let kernels = self.kernels();
        linear(&kernels, &self.to_logits, self.hidden_with(&kernels, ids))
    }

    /// Mean next-token cross-entropy of `ids` `[batch, seq + 1]` (inputs `ids[:, :-1]`, targets
    /// `ids[:, 1:]`), like the reference's `return_loss=True`.
    pub fn loss(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [_, n1] = ids.dims();
        let inputs = ids.clone().narrow(1, 0, n1 - 1);
        let targets = ids.narrow(1, 1, n1 - 1);
        cross_entropy(self.forward(inputs), targets).reshape([1])
    }

    /// [`Transformer::loss`] with the logits computed a chunk of tokens at a time, no chunk
    /// of `[tokens, num_tokens]` logits larger than `max_logits_bytes` (see [`head_loss`]):
    /// equal value and gradients, bounded memory, and within a device's limit for one buffer.
    pub fn chunked_loss(&self, ids: Tensor<B, 2, Int>, max_logits_bytes: u64) -> Tensor<B, 1> {
        self.chunked_loss_staged(ids, max_logits_bytes, DsaStage::Sparse, false)
            .0
    }

    /// [`Transformer::chunked_loss`] with the DSA layers' global branch of `stage` and, when
    /// `indexer_loss` is set, the sum of their indexer losses ([`Self::hidden_staged`]).
    pub fn chunked_loss_staged(
        &self,
        ids: Tensor<B, 2, Int>,
        max_logits_bytes: u64,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
        let (h, targets, kl) = self.next_token_rows(ids, stage, indexer_loss);
        let chunk = self.logits_chunk(h.dims()[0], max_logits_bytes);
        let bias = self.to_logits.bias.as_ref().map(|b| b.val());
        let loss =
            head_loss::linear_cross_entropy(h, self.to_logits.weight.val(), bias, targets, chunk);
        (loss, kl)
    }

    /// Natural log-probabilities `[batch * seq]` of the next tokens of `ids` `[batch, seq + 1]`
    /// (row-major: window by window), the logits chunked as in [`Transformer::chunked_loss`].
    pub fn next_token_log_probs(
        &self,
        ids: Tensor<B, 2, Int>,
        max_logits_bytes: u64,
    ) -> Tensor<B, 1> {
        let (h, targets, _) = self.next_token_rows(ids, DsaStage::Sparse, false);
        let chunk = self.logits_chunk(h.dims()[0], max_logits_bytes);
        let bias = self.to_logits.bias.as_ref().map(|b| b.val());
        head_loss::target_log_probs(h, self.to_logits.weight.val(), bias, targets, chunk)
    }

    /// The final hidden rows `[batch * seq, dim]` of `ids[:, :-1]`, their targets `ids[:, 1:]`
    /// flattened to `[batch * seq]`, and the indexer loss ([`Self::hidden_staged`]).
    #[allow(clippy::type_complexity)]
    fn next_token_rows(
        &self,
        ids: Tensor<B, 2, Int>,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> (Tensor<B, 2>, Tensor<B, 1, Int>, Option<Tensor<B, 1>>) {
        let [b, n1] = ids.dims();
        let n = n1 - 1;
        let inputs = ids.clone().narrow(1, 0, n);
        let targets = ids.narrow(1, 1, n).reshape([b * n]);
        let (h, kl) = self.hidden_staged(&self.kernels(), inputs, stage, indexer_loss);
        let dim = h.dims()[2];
        (h.reshape([b * n, dim]), targets, kl)
    }

    /// Rows per chunk of logits for `rows` rows within `max_logits_bytes`.
    pub(crate) fn logits_chunk(&self, rows: usize, max_logits_bytes: u64) -> usize {
        let elem = core::mem::size_of::<B::FloatElem>();
        head_loss::chunk_rows(rows, self.config.num_tokens, elem, max_logits_bytes)
    }
}

/// Mean cross-entropy of logits `[batch, seq, vocab]` against targets `[batch, seq]`; returns a
/// scalar tensor `[1]`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, n, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * n, v]), 1);
    logp.gather(1, targets.reshape([b * n, 1])).mean().neg()
}
