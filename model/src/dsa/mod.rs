//! DeepSeek sparse attention (DSA, DeepSeek-V3.2-Exp; the first seed article): a lightning
//! indexer ([`indexer`]) scores every earlier token for each query, the query attends to its
//! `top_k` tokens ([`select`]: the global branch), a sliding window of itself and the `window`
//! tokens before it (the local branch) and a learned sigmoid gate per head mixes the two:
//! `out = gate · local + (1 − gate) · global`. The attention itself is that of the dense layer
//! ([`FullAttention`]: pre-norm, q/k/v projections, rotary embedding, GQA pairing), over a
//! subset of the keys; every query head shares its token's selection.
//!
//! Training has two stages ([`DsaStage`]): a dense warm-up, where the global branch sees every
//! earlier token and the indexer learns to imitate the attention ([`kl`]), then sparse
//! training over the selected tokens. The indexer reads the layer's input detached: its loss
//! trains it alone, and the selection passes no gradient.
//!
//! This file is the tensor-op path (every backend; the oracle): it materialises the scores of
//! a chunk of queries against all keys, at most [`SCORE_LIMIT`] at once. The sparse stage runs
//! through the fused kernels where a backend has them ([`sparse`]: no `[n, m]` attention
//! scores; the indexer loss over the gathered selected tokens).
//!
//! Dimensions: `b` batch, `n` queries, `m` keys, `h` query heads, `kvh` key/value heads,
//! `g = h / kvh`, `d` head width.

pub mod indexer;
pub mod kl;
pub mod select;
mod sparse;

pub use sparse::SPARSE_LIMIT;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;

use crate::attend::{attend, Attended};
use crate::cache::{DsaCache, KvBuffer};
use crate::config::DsaSettings;
use crate::full::FullAttention;
use crate::kernels::{KernelOptions, Kernels};
use crate::rope::Rotation;
use crate::tensor_util::{greater_mask, heads_first, linear};
use indexer::{IndexQueries, Indexer};

/// The most attention scores one chunk of queries holds (per branch): 2^23 values, 32 MiB of
/// f32.
pub const SCORE_LIMIT: usize = 1 << 23;

/// Which keys the global branch sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DsaStage {
    /// Every earlier token (training's warm-up).
    Dense,
    /// The indexer's `top_k` tokens.
    #[default]
    Sparse,
}

/// What a training step of a model with DSA layers optimises: the stage of the global branch
/// and whether the language-model loss trains the model (`false`: only the indexer learns,
/// DeepSeek's warm-up with the model frozen). The indexer loss always trains the indexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsaTraining {
    /// The global branch.
    pub stage: DsaStage,
    /// The language-model loss is differentiated.
    pub lm_loss: bool,
}

impl Default for DsaTraining {
    /// Sparse, everything trained.
    fn default() -> Self {
        Self {
            stage: DsaStage::Sparse,
            lm_loss: true,
        }
    }
}

impl DsaTraining {
    /// The stage of optimizer step `step` (from 0) of a run with `warmup_steps` dense steps,
    /// the model frozen during them when `freeze_model` is set.
    pub fn at_step(step: u64, warmup_steps: u64, freeze_model: bool) -> Self {
        let dense = step < warmup_steps;
        Self {
            stage: if dense {
                DsaStage::Dense
            } else {
                DsaStage::Sparse
            },
            lm_loss: !(dense && freeze_model),
        }
    }
}

/// One DSA layer.
#[derive(Module, Debug)]
pub struct DsaAttention<B: Backend> {
    /// Pre-norm, projections and rotary embedding (those of the dense layer).
    pub attn: FullAttention<B>,
    /// The lightning indexer.
    pub indexer: Indexer<B>,
    /// `dim → heads` with bias: each head's share of the local branch (sigmoid); `None` when
    /// `window` is 0.
    pub to_gate: Option<Linear<B>>,
    /// Tokens of the global branch.
    pub top_k: usize,
    /// Tokens before the query in the local branch.
    pub window: usize,
    /// How the layer runs when called on its own. Not saved.
    #[module(skip)]
    pub kernel_options: KernelOptions,
}

/// A layer's output and, when asked for, its indexer loss.
#[derive(Debug, Clone)]
pub struct DsaOutput<B: Backend> {
    /// `[b, n, dim]`.
    pub out: Tensor<B, 3>,
    /// The indexer's KL divergence from the attention ([`kl`]), mean over the queries, `[1]`.
    pub indexer_loss: Option<Tensor<B, 1>>,
}

impl<B: Backend> DsaAttention<B> {
    /// New layer (the caller validated the sizes and `settings`).
    pub fn new(
        dim: usize,
        dim_head: usize,
        heads: usize,
        kv_heads: usize,
        settings: &DsaSettings,
        device: &B::Device,
    ) -> Self {
        Self {
            attn: FullAttention::new(dim, dim_head, heads, kv_heads, device),
            indexer: Indexer::new(
                dim,
                settings.index_heads,
                settings.index_dim_head(dim_head),
                device,
            ),
            to_gate: (settings.window > 0).then(|| LinearConfig::new(dim, heads).init(device)),
            top_k: settings.top_k,
            window: settings.window,
            kernel_options: KernelOptions::default(),
        }
    }

    /// The kernels of this layer's own options.
    pub fn kernels(&self) -> Kernels<B> {
        Kernels::new(&self.kernel_options)
    }

    /// Causal forward (sparse): `[b, n, dim]` → `[b, n, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rotation = Rotation::new(self.attn.dim_head, 0, x.dims()[1], &x.device());
        self.forward_rotated(&self.kernels(), x, &rotation, DsaStage::Sparse, false)
            .out
    }

    /// Causal forward through `kernels` with the `rotation` of positions `0..n`, the global
    /// branch of `stage`, and the indexer loss when `indexer_loss` is set.
    pub fn forward_rotated(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> DsaOutput<B> {
        let (rows, keys) = self.inputs(kernels, x, rotation, 0);
        self.attend_rows(kernels, rows, keys, stage, indexer_loss, SCORE_LIMIT)
    }

    /// The sparse causal forward through the fused kernels of `kernels` only ([`sparse`]),
    /// with the indexer loss when `indexer_loss` is set, in chunks of queries holding at most
    /// `limit` values ([`SPARSE_LIMIT`] in [`Self::forward_rotated`]; any chunking gives the
    /// same result), or `None` where the kernels do not take the case (what
    /// [`Self::forward_rotated`] then computes with tensor ops).
    pub fn forward_fused(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
        indexer_loss: bool,
        limit: usize,
    ) -> Option<DsaOutput<B>> {
        let (rows, keys) = self.inputs(kernels, x, rotation, 0);
        let [b, h, n, d] = rows.q.dims();
        let (out, loss) = sparse::attend(self, kernels, &rows, &keys, limit, indexer_loss)?;
        let out = out.swap_dims(1, 2).reshape([b, n, h * d]);
        Some(DsaOutput {
            out: linear(kernels, &self.attn.to_out, out),
            indexer_loss: loss,
        })
    }

    /// The queries and keys of the input `x` `[b, n, dim]` at positions `offset..offset + n`
    /// (`rotation`'s): the normed input, the rotated queries, keys and values, and the
    /// indexer's queries and keys, which read the input detached (only their own loss trains
    /// the indexer).
    fn inputs(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        rotation: &Rotation<B>,
        offset: usize,
    ) -> (Rows<B>, Keys<B>) {
        let xn = self.attn.norm.forward(x);
        let [q, k, v] = self.attn.project(kernels, xn.clone(), rotation);
        let detached = xn.clone().detach();
        let index = self.indexer.keys(kernels, detached.clone(), rotation);
        let queries = self.indexer.queries(kernels, detached, rotation);
        let rows = Rows {
            xn,
            q,
            queries,
            offset,
        };
        (rows, Keys { k, v, index })
    }

    /// Forward over a prompt that also returns the decode cache, with room for `extra` tokens.
    pub fn prefill_with(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        extra: usize,
    ) -> (Tensor<B, 3>, DsaCache<B>) {
        let rotation = Rotation::new(self.attn.dim_head, 0, x.dims()[1], &x.device());
        let (rows, keys) = self.inputs(kernels, x, &rotation, 0);
        let cache = DsaCache {
            kv: KvBuffer::new(keys.k.clone(), keys.v.clone(), extra),
            index_keys: keys.index.clone(),
        };
        let out = self.attend_rows(kernels, rows, keys, DsaStage::Sparse, false, SCORE_LIMIT);
        (out.out, cache)
    }

    /// Decodes one token `[b, 1, dim]` at position `cache.kv.len()`, rotated by `rotation`:
    /// the indexer scores every cached key (`O(t)` cheap products and a top-k, on the device
    /// where the kernels rank),
    /// the attention reads the `top_k` gathered keys and the `window` last ones, whatever the
    /// context.
    pub fn step(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        cache: DsaCache<B>,
        rotation: &Rotation<B>,
    ) -> (Tensor<B, 3>, DsaCache<B>) {
        let pos = cache.kv.len();
        let (rows, new) = self.inputs(kernels, x, rotation, pos);
        let Rows { xn, q, queries, .. } = rows;
        let kv = cache.kv.push(kernels, new.k, new.v);
        let index_keys = Tensor::cat(vec![cache.index_keys, new.index], 1);
        // 1. the indexer over every cached key, the selected positions [b, count]
        let scores = self.indexer.scores(kernels, &queries, index_keys.clone());
        let positions = select::gathered(kernels, scores, pos, self.top_k);
        // 2. the global branch over the gathered keys (all of them causal: no mask)
        let (k, v) = kv.all();
        let [b, kvh, _, d] = k.dims();
        let count = positions.dims()[1];
        let rows = positions
            .reshape([b, 1, count, 1])
            .expand([b, kvh, count, d]);
        let scale = (d as f64).powf(-0.5);
        let grouped = self.group(q, kvh);
        let over = |k: Tensor<B, 4>, v: Tensor<B, 4>| {
            let out = attend(
                kernels,
                grouped.clone(),
                k.unsqueeze_dim(2),
                v.unsqueeze_dim(2),
                None,
                scale,
            );
            ungroup(out.out)
        };
        let global = over(k.clone().gather(2, rows.clone()), v.clone().gather(2, rows));
        // 3. the local branch over the last `window` keys and itself
        let first = pos.saturating_sub(self.window);
        let local = self.to_gate.as_ref().map(|_| {
            let n = pos + 1 - first;
            over(k.narrow(2, first, n), v.narrow(2, first, n))
        });
        let out = self.mix(kernels, &xn, local, global);
        let [_, h, _, _] = out.dims();
        let out = out.swap_dims(1, 2).reshape([b, 1, h * d]);
        (
            linear(kernels, &self.attn.to_out, out),
            DsaCache { kv, index_keys },
        )
    }

    /// Queries `[b, h, n, d]` → `[b, kvh, g, n, d]` (head `i = gi * kvh + kv`, the dense
    /// layer's pairing).
    fn group(&self, q: Tensor<B, 4>, kvh: usize) -> Tensor<B, 5> {
        let [b, h, n, d] = q.dims();
        q.reshape([b, h / kvh, kvh, n, d]).swap_dims(1, 2)
    }

    /// `gate · local + (1 − gate) · global` with the gate of the normed input `xn` `[b, n,
    /// dim]` (branches `[b, h, n, d]`); the global branch alone without a local one.
    fn mix(
        &self,
        kernels: &Kernels<B>,
        xn: &Tensor<B, 3>,
        local: Option<Tensor<B, 4>>,
        global: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        match (&self.to_gate, local) {
            (Some(to_gate), Some(local)) => {
                // [b, n, h] → [b, h, n, 1]
                let gate = heads_first(sigmoid(linear(kernels, to_gate, xn.clone())));
                local * gate.clone() + global * (gate.ones_like() - gate)
            }
            _ => global,
        }
    }

    /// The attention of `rows` over the `keys` `0..m`, in chunks of queries of at most `limit`
    /// scores ([`SCORE_LIMIT`]; rows are independent: any chunking gives the same result),
    /// then the output projection → `[b, n, dim]`.
    fn attend_rows(
        &self,
        kernels: &Kernels<B>,
        rows: Rows<B>,
        keys: Keys<B>,
        stage: DsaStage,
        indexer_loss: bool,
        limit: usize,
    ) -> DsaOutput<B> {
        let [b, h, n, d] = rows.q.dims();
        let m = keys.k.dims()[2];
        let project = |out: Tensor<B, 4>| {
            let out = out.swap_dims(1, 2).reshape([b, n, h * d]);
            linear(kernels, &self.attn.to_out, out)
        };
        if stage == DsaStage::Sparse {
            // the fused kernels where they take the case: no `[n, m]` attention scores
            if let Some((out, loss)) =
                sparse::attend(self, kernels, &rows, &keys, SPARSE_LIMIT, indexer_loss)
            {
                return DsaOutput {
                    out: project(out),
                    indexer_loss: loss,
                };
            }
        }
        let chunk = (limit / (b * h * m).max(1)).clamp(1, n.max(1));
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut losses = Vec::new();
        for start in (0..n).step_by(chunk) {
            let c = chunk.min(n - start);
            // keys after the chunk's last query are never seen
            let seen = keys.first((rows.offset + start + c).min(m));
            let part = rows.narrow(start, c);
            let (out, loss) = self.attend_chunk(kernels, part, seen, stage, indexer_loss);
            outs.push(out);
            if let Some(loss) = loss {
                losses.push(loss.mul_scalar(c as f64 / n as f64));
            }
        }
        DsaOutput {
            out: project(Tensor::cat(outs, 2)),
            indexer_loss: (!losses.is_empty()).then(|| Tensor::cat(losses, 0).sum()),
        }
    }

    /// One chunk of [`Self::attend_rows`] → `[b, h, c, d]` and its indexer loss.
    fn attend_chunk(
        &self,
        kernels: &Kernels<B>,
        rows: Rows<B>,
        keys: Keys<B>,
        stage: DsaStage,
        indexer_loss: bool,
    ) -> (Tensor<B, 4>, Option<Tensor<B, 1>>) {
        let Keys { k, v, index } = keys;
        let [b, _, n, d] = rows.q.dims();
        let [_, kvh, m, _] = k.dims();
        let device = k.device();
        let positions: Vec<i64> = (0..n).map(|i| (rows.offset + i) as i64).collect();
        let columns: Vec<i64> = (0..m as i64).collect();
        // 1. the indexer's scores and the global branch's keys
        let scores = self.indexer.scores(kernels, &rows.queries, index);
        let future = greater_mask::<B>(positions.clone(), columns.clone(), &device);
        let global_blocked = match stage {
            DsaStage::Sparse => select::blocked(kernels, scores.clone(), rows.offset, self.top_k),
            DsaStage::Dense => future.clone().unsqueeze_dim::<3>(0).expand([b, n, m]),
        };
        // 2. both branches through the one attention core
        let grouped = self.group(rows.q, kvh);
        let scale = (d as f64).powf(-0.5);
        let branch = |k: Tensor<B, 4>, v: Tensor<B, 4>, blocked: Tensor<B, 5, Bool>| {
            attend(
                kernels,
                grouped.clone(),
                k.unsqueeze_dim(2),
                v.unsqueeze_dim(2),
                Some(blocked),
                scale,
            )
        };
        let blocked = global_blocked.clone().reshape([b, 1, 1, n, m]);
        let Attended {
            out: global, probs, ..
        } = branch(k.clone(), v.clone(), blocked);
        let loss = indexer_loss.then(|| kl::indexer_kl(probs, scores, global_blocked));
        // 3. the local branch: itself and the `window` tokens before it, over the keys
        // `first..m` that some window of the chunk reaches
        let local = self.to_gate.as_ref().map(|_| {
            let first = rows.offset.saturating_sub(self.window).min(m);
            let width = m - first;
            let keys: Vec<i64> = (first as i64..m as i64).collect();
            let before: Vec<i64> = positions
                .iter()
                .map(|&p| p - self.window as i64 - 1)
                .collect();
            // key j is in the window when p - window - 1 < j <= p
            let future = greater_mask::<B>(positions.clone(), keys.clone(), &device);
            let in_window = greater_mask::<B>(before, keys, &device);
            let blocked = future.bool_or(in_window.bool_not());
            let out = branch(
                k.narrow(2, first, width),
                v.narrow(2, first, width),
                blocked.reshape([1, 1, 1, n, width]),
            );
            ungroup(out.out)
        });
        let out = self.mix(kernels, &rows.xn, local, ungroup(global));
        (out, loss)
    }
}

/// `[b, kvh, g, n, d]` → `[b, h, n, d]` (the inverse of [`DsaAttention::group`]).
fn ungroup<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 4> {
    let [b, kvh, g, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, kvh * g, n, d])
}

/// The keys of one call at positions `0..m`: rotated keys and values `[b, kvh, m, d]`, the
/// indexer's keys `[b, m, e]`.
struct Keys<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    index: Tensor<B, 3>,
}

impl<B: Backend> Keys<B> {
    /// Positions `0..m`.
    fn first(&self, m: usize) -> Self {
        Self {
            k: self.k.clone().narrow(2, 0, m),
            v: self.v.clone().narrow(2, 0, m),
            index: self.index.clone().narrow(1, 0, m),
        }
    }
}

/// The queries of one call: normed input `[b, n, dim]`, rotated queries `[b, h, n, d]`, the
/// indexer's queries, at positions `offset..offset + n`.
struct Rows<B: Backend> {
    xn: Tensor<B, 3>,
    q: Tensor<B, 4>,
    queries: IndexQueries<B>,
    offset: usize,
}

impl<B: Backend> Rows<B> {
    /// Rows `start..start + n`.
    fn narrow(&self, start: usize, n: usize) -> Self {
        Self {
            xn: self.xn.clone().narrow(1, start, n),
            q: self.q.clone().narrow(2, start, n),
            queries: IndexQueries {
                q: self.queries.q.clone().narrow(2, start, n),
                weights: self.queries.weights.clone().narrow(1, start, n),
            },
            offset: self.offset + start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::module::{ModuleMapper, Param};
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    struct Randomise;
    impl ModuleMapper<B> for Randomise {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let shape = p.dims();
            p.map(|t| Tensor::random(shape, Distribution::Normal(0.0, 0.5), &t.device()))
        }
    }

    /// Chunks of one query row give the output and indexer loss of one chunk of all rows.
    #[test]
    fn chunks_of_queries_equal_one_chunk() {
        let device = Default::default();
        let settings = DsaSettings {
            index_heads: 2,
            index_dim_head: Some(8),
            top_k: 5,
            window: 3,
        };
        let layer = DsaAttention::<B>::new(16, 4, 4, 2, &settings, &device).map(&mut Randomise);
        let kernels = layer.kernels();
        let x = Tensor::<B, 3>::random([2, 23, 16], Distribution::Normal(0.0, 1.0), &device);
        let rotation = Rotation::new(4, 0, 23, &device);
        for stage in [DsaStage::Sparse, DsaStage::Dense] {
            let run = |limit: usize| {
                let xn = layer.attn.norm.forward(x.clone());
                let [q, k, v] = layer.attn.project(&kernels, xn.clone(), &rotation);
                let index = layer.indexer.keys(&kernels, xn.clone(), &rotation);
                let queries = layer.indexer.queries(&kernels, xn.clone(), &rotation);
                let rows = Rows {
                    xn,
                    q,
                    queries,
                    offset: 0,
                };
                let out =
                    layer.attend_rows(&kernels, rows, Keys { k, v, index }, stage, true, limit);
                let loss: f32 = out.indexer_loss.unwrap().into_scalar();
                (out.out, loss)
            };
            let (whole, whole_loss) = run(usize::MAX);
            // one row of 2 · 4 heads · at most 23 keys per chunk
            let (rows, rows_loss) = run(2 * 4 * 23);
            let err: f32 = (whole - rows).abs().max().into_scalar();
            assert!(err < 1e-5, "{stage:?}: outputs differ by {err}");
            assert!(
                (whole_loss - rows_loss).abs() < 1e-5 * whole_loss.abs().max(1.0),
                "{stage:?}: indexer losses {whole_loss} vs {rows_loss}"
            );
            assert!(whole_loss.is_finite() && whole_loss > 0.0, "{whole_loss}");
        }
    }
}
