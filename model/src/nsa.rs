//! Native sparse attention layer: the three branches over the same queries, mixed per head by
//! learned sigmoid gates (`native_sparse_attention_pytorch.SparseAttention`, causal).
//!
//! ```text
//!              ┌─ compressed: q · pooled blocks of k/v (+ memory kv) ──┐
//! x ─ norm ─ qkv ─ selected:   q_rot · top-n blocks of k_rot/v + own ──┼─ gates ─ out
//!              └─ sliding:    q_rot · last `window` k_rot/v ──────────┘
//! ```
//!
//! Legend: `b` batch, `n` positions, `h` query heads, `kvh` key/value heads, `d` features per
//! head, `l` compression block, `s` its stride, `l'` selection block, `w` window.
//!
//! Every branch asks the [`Kernels`] handle for a fused kernel first (built from the layer's
//! [`KernelOptions`], or handed down by the model) and falls back to tensor ops.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::attend::attend;
use crate::cache::{GatherTables, KvBuffer, NsaCache};
use crate::compress::Compressor;
use crate::config::{ConfigError, NsaConfig};
use crate::gates::BranchGates;
use crate::kernels::{BlockStep, DecodeInputs, KernelOptions, Kernels, Projection};
use crate::norm::RmsNorm;
use crate::rope::Rotation;
use crate::rules;
use crate::select::{importance, select_top, selected_attention, selected_attention_step};
use crate::sliding::sliding_attention;
use crate::tensor_util::{linear, norm_linear, pad_zeros};
use crate::transformer::FeedForward;

/// One NSA layer.
#[derive(Module, Debug)]
pub struct SparseAttention<B: Backend> {
    /// Optional pre-norm of the input.
    pub norm: Option<RmsNorm<B>>,
    /// `dim → (heads + 2 kv_heads) * dim_head`, no bias.
    pub to_qkv: Linear<B>,
    /// Compressed-branch parameters.
    pub compress: Compressor<B>,
    /// Branch gates.
    pub gates: BranchGates<B>,
    /// `heads * dim_head → dim`, no bias.
    pub combine_heads: Linear<B>,
    /// The settings this layer was built with.
    pub config: NsaConfig,
    /// How the layer runs when called on its own (inside a [`crate::Transformer`], the model's
    /// options are handed down). Not saved.
    #[module(skip)]
    pub kernel_options: KernelOptions,
}

/// Queries, keys and values of a layer input, `[batch, heads | kv_heads, seq, dim_head]`.
pub(crate) struct Qkv<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

impl NsaConfig {
    /// Builds a layer with the reference's initialisation; refuses an invalid config.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<SparseAttention<B>, ConfigError> {
        self.validate()?;
        let (h, kvh, d) = (self.heads, self.kv_heads(), self.dim_head);
        Ok(SparseAttention {
            norm: self.norm.then(|| RmsNorm::new(self.dim, device)),
            to_qkv: LinearConfig::new(self.dim, (h + 2 * kvh) * d)
                .with_bias(false)
                .init(device),
            compress: Compressor::new(self, device),
            gates: BranchGates::new(self.dim, h, device),
            combine_heads: LinearConfig::new(h * d, self.dim)
                .with_bias(false)
                .init(device),
            config: self.clone(),
            kernel_options: KernelOptions::default(),
        })
    }
}

impl<B: Backend> SparseAttention<B> {
    /// Softmax scale `dim_head^-0.5`.
    pub fn scale(&self) -> f64 {
        (self.config.dim_head as f64).powf(-0.5)
    }

    pub(crate) fn normed(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }

    /// The kernels of this layer's own options.
    pub fn kernels(&self) -> Kernels<B> {
        Kernels::new(&self.kernel_options)
    }

    /// Splits the projection of `x` `[batch, seq, dim]` into heads.
    pub(crate) fn qkv(&self, kernels: &Kernels<B>, x: Tensor<B, 3>) -> Qkv<B> {
        let [b, n, _] = x.dims();
        let c = &self.config;
        let (h, kvh, d) = (c.heads, c.kv_heads(), c.dim_head);
        let qkv = linear(kernels, &self.to_qkv, x);
        let heads = |start: usize, count: usize| {
            qkv.clone()
                .narrow(2, start * d, count * d)
                .reshape([b, n, count, d])
                .swap_dims(1, 2)
        };
        Qkv {
            q: heads(0, h),
            k: heads(h, kvh),
            v: heads(h + kvh, kvh),
        }
    }

    /// Gates, merges heads and projects out: branches `[batch, heads, seq, dim_head]` →
    /// `[batch, seq, dim]`.
    pub(crate) fn mix(
        &self,
        kernels: &Kernels<B>,
        normed: Tensor<B, 3>,
        branches: [Tensor<B, 4>; 3],
    ) -> Tensor<B, 3> {
        let [b, n, _] = normed.dims();
        let out = self.gates.combine(kernels, normed, branches);
        let inner = self.config.heads * self.config.dim_head;
        linear(
            kernels,
            &self.combine_heads,
            out.swap_dims(1, 2).reshape([b, n, inner]),
        )
    }

    /// Causal forward over a whole sequence: `x` `[batch, seq, dim]` → `[batch, seq, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(&self.kernels(), x)
    }

    /// [`Self::forward`] through `kernels`.
    pub fn forward_with(&self, kernels: &Kernels<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rotation = Rotation::new(self.config.dim_head, 0, x.dims()[1], &x.device());
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
        self.forward_inner(kernels, x, None, rotation).0
    }

    /// Forward over a prompt that also returns the decode cache, with room for `extra` tokens.
    pub fn prefill(&self, x: Tensor<B, 3>, extra: usize) -> (Tensor<B, 3>, NsaCache<B>) {
        self.prefill_with(&self.kernels(), x, extra)
    }

    /// [`Self::prefill`] through `kernels`.
    pub fn prefill_with(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        extra: usize,
    ) -> (Tensor<B, 3>, NsaCache<B>) {
        let rotation = Rotation::new(self.config.dim_head, 0, x.dims()[1], &x.device());
        let (out, cache) = self.forward_inner(kernels, x, Some(extra), &rotation);
        (out, cache.expect("cache requested"))
    }

    fn forward_inner(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        cache_extra: Option<usize>,
        rotation: &Rotation<B>,
    ) -> (Tensor<B, 3>, Option<NsaCache<B>>) {
        let x = self.normed(x);
        let Qkv { q, k, v } = self.qkv(kernels, x.clone());
        let b = q.dims()[0];
        let c = &self.config;

        // the compressed keys and values, the rotated keys (and the decode cache from them)
        let compressed = self.compress.compress(kernels, k.clone(), v.clone());
        let (ck, cv) = self.compress.with_memory(b, compressed);
        let k_rot = rotation.apply(k.clone());
        let branches = self.branches(kernels, q, (&ck, &cv), (&k_rot, &v), 0, rotation);
        let cache = cache_extra.map(|extra| {
            let l = c.compress_block_size;
            NsaCache {
                kv: KvBuffer::aligned(k_rot, v.clone(), extra, c.selection_block_size),
                compressed: KvBuffer::new(ck, cv, extra / c.compress_block_sliding_stride + 1),
                tail_k: decode_ring(k, l),
                tail_v: decode_ring(v, l),
                gather: None,
            }
        });
        (self.mix(kernels, x, branches), cache)
    }

    /// The three branches of queries `q` `[batch, heads, c, dim_head]` (un-rotated) at
    /// positions `start..start + c`, over the memory and compressed keys/values `(ck, cv)`
    /// and the rotated keys and values `(k, v)` `[batch, kv_heads, rows, dim_head]` of every
    /// position before and in the chunk (rows past those: never seen); `rotation` is that of
    /// positions `start..start + c`:
    ///
    /// 1. compressed, with the block selection it drives (one fused kernel where registered);
    /// 2. selected (rotary on the queries from here on);
    /// 3. sliding window.
    pub(crate) fn branches(
        &self,
        kernels: &Kernels<B>,
        q: Tensor<B, 4>,
        (ck, cv): (&Tensor<B, 4>, &Tensor<B, 4>),
        (k, v): (&Tensor<B, 4>, &Tensor<B, 4>),
        start: usize,
        rotation: &Rotation<B>,
    ) -> [Tensor<B, 4>; 3] {
        let c = &self.config;
        let scale = self.scale();
        let (comp, selection) = self.compress.attend_and_select(
            kernels,
            q.clone(),
            ck.clone(),
            cv.clone(),
            start,
            c,
            scale,
        );
        let q = rotation.apply(q);
        let (k, v) = (k.clone(), v.clone());
        let selected = selected_attention(
            kernels,
            q.clone(),
            k.clone(),
            v.clone(),
            selection,
            start,
            c,
            scale,
        );
        let sliding = sliding_attention(kernels, q, k, v, start, c.sliding_window_size, scale);
        [comp, selected, sliding]
    }

    /// Decodes one token: `x` `[batch, 1, dim]` at position `cache.kv.len()`, rotated by
    /// `rotation` (that position's) → the attention's output `[batch, 1, dim]`; with `block`
    /// (the block's feed-forward), the whole residual block instead: `h + ff(h)` with `h = x +
    /// attention(x)`.
    ///
    /// Two paths: where the backend has the kernel and the options allow it, the whole block
    /// is one operation ([`crate::kernels::NsaKernels::decode_block`]); else the step is four
    /// operations — the normed projection with the gate logits, the cache writes, the three
    /// branches with their mix ([`crate::kernels::NsaKernels::decode_attention`]) and the
    /// output projection with the residual — each of which falls back to tensor ops on its own.
    pub fn step(
        &self,
        x: Tensor<B, 3>,
        cache: NsaCache<B>,
        rotation: &Rotation<B>,
        block: Option<&FeedForward<B>>,
    ) -> (Tensor<B, 3>, NsaCache<B>) {
        self.step_with(&self.kernels(), x, cache, rotation, block)
    }

    /// [`Self::step`] through `kernels`.
    pub fn step_with(
        &self,
        kernels: &Kernels<B>,
        x: Tensor<B, 3>,
        cache: NsaCache<B>,
        rotation: &Rotation<B>,
        block: Option<&FeedForward<B>>,
    ) -> (Tensor<B, 3>, NsaCache<B>) {
        let NsaCache {
            kv,
            mut compressed,
            tail_k,
            tail_v,
            mut gather,
        } = cache;
        let pos = kv.len();
        let c = &self.config;
        // the position's key (rotated) and value join the cache, its un-rotated key and value
        // the compression ring (position `p` in row `p % l`)
        let l = c.compress_block_size;
        let slot = pos % l;
        let (kv, (written, ring)) = kv.append_with(1, |kb, vb, at| {
            let buffers = [kb, vb, tail_k, tail_v];
            let whole = block.filter(|_| kernels.options().decode_block);
            let written = match whole {
                Some(ff) => {
                    self.whole_block(kernels, &x, ff, rotation, &compressed, at, slot, buffers)
                }
                None => Err(buffers),
            };
            let (written, [kb, vb, tk, tv]) = match written {
                Ok((out, buffers)) => (Written::Block(out), buffers),
                Err(buffers) => {
                    let (qkv, gates, buffers) =
                        self.project_and_write(kernels, &x, rotation, buffers, at, slot);
                    (Written::Projected(qkv, gates), buffers)
                }
            };
            ((kb, vb), (written, (tk, tv)))
        });
        let (tail_k, tail_v) = ring;
        let out = match written {
            Written::Block(out) => out,
            Written::Projected(qkv, gates) => {
                let parts = StepParts {
                    qkv: &qkv,
                    gates,
                    compressed: &compressed,
                    kv: &kv,
                    rotation,
                };
                let out = self.attend_step(kernels, &x, parts, &mut gather, block.is_some());
                match block {
                    Some(ff) => ff.step(kernels, out),
                    None => out,
                }
            }
        };

        // a block ending at `pos` is pooled now and seen from `pos + 1` on
        if (pos + 1) % c.compress_block_sliding_stride == 0 {
            // in position order: the oldest, `pos + 1 - l`, sits in row `(pos + 1) % l`
            let ordered = |ring: &Tensor<B, 4>| ring.clone().roll_dim((pos + 1) % l, 2);
            let (nk, nv) = self
                .compress
                .compress_one(kernels, ordered(&tail_k), ordered(&tail_v));
            compressed = compressed.push(kernels, nk, nv);
        }
        (
            out,
            NsaCache {
                kv,
                compressed,
                tail_k,
                tail_v,
                gather,
            },
        )
    }

    /// The whole decode step of the block (attention and `ff`) as one fused operation writing
    /// `buffers` (`[k cache, v cache, k ring, v ring]`) → the block's output and the written
    /// buffers; the buffers back unchanged as `Err` where no kernel covers it.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn whole_block(
        &self,
        kernels: &Kernels<B>,
        x: &Tensor<B, 3>,
        ff: &FeedForward<B>,
        rotation: &Rotation<B>,
        compressed: &KvBuffer<B>,
        pos: usize,
        slot: usize,
        buffers: [Tensor<B, 4>; 4],
    ) -> Result<(Tensor<B, 3>, [Tensor<B, 4>; 4]), [Tensor<B, 4>; 4]> {
        let Some(fused) = kernels.fused() else {
            return Err(buffers);
        };
        let (cos, sin) = rotation.parts();
        let norm = self.norm.as_ref().map(RmsNorm::row_norm);
        let ff = ff.params();
        let step = BlockStep {
            x,
            norm: norm.as_ref(),
            to_qkv: &Projection::of(&self.to_qkv),
            gates: &Projection::of(&self.gates.proj),
            combine: &Projection::of(&self.combine_heads),
            ff: Some(&ff),
            cos,
            sin,
            compressed: compressed.cached(),
            num_mem: self.compress.num_mem(),
            sizes: &self.config.sizes(),
            scale: self.scale(),
            pos,
            slot,
        };
        fused.decode_block(&step, buffers)
    }

    /// The normed projection of the decode row `x` (with the gate logits where one operation
    /// computes both) and the writes of its key and value into `buffers` at rows `pos` (cache)
    /// and `slot` (ring) → the projection row `[batch, 1, (h + 2 kvh) d]`, the gate logits if
    /// computed, and the written buffers.
    #[allow(clippy::type_complexity)]
    fn project_and_write(
        &self,
        kernels: &Kernels<B>,
        x: &Tensor<B, 3>,
        rotation: &Rotation<B>,
        buffers: [Tensor<B, 4>; 4],
        pos: usize,
        slot: usize,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>, [Tensor<B, 4>; 4]) {
        let c = &self.config;
        let (h, kvh, d) = (c.heads, c.kv_heads(), c.dim_head);
        let norm = self.norm.as_ref();
        let (cos, sin) = rotation.parts();
        let paired = kernels.fused().and_then(|k| {
            let row_norm = norm.map(RmsNorm::row_norm);
            let (to_qkv, gates) = (
                Projection::of(&self.to_qkv),
                Projection::of(&self.gates.proj),
            );
            k.row_linear_pair(x, row_norm.as_ref(), &to_qkv, &gates)
        });
        let (qkv, gates) = match paired {
            Some((qkv, gates)) => (qkv, Some(gates)),
            None => (
                norm_linear(kernels, norm, &self.to_qkv, x.clone(), false, None),
                None,
            ),
        };
        let written = match kernels.fused() {
            Some(k) => k.decode_write(&qkv, cos, sin, buffers, h, pos, slot),
            None => Err(buffers),
        };
        let buffers = written.unwrap_or_else(|[kb, vb, tk, tv]| {
            let (k, v) = (heads_of(&qkv, h, kvh, d), heads_of(&qkv, h + kvh, kvh, d));
            [
                kernels.write_rows(kb, pos, rotation.apply(k.clone())),
                kernels.write_rows(vb, pos, v.clone()),
                kernels.write_rows(tk, slot, k),
                kernels.write_rows(tv, slot, v),
            ]
        });
        (qkv, gates, buffers)
    }

    /// The attention of a decode step after the cache writes (`parts`, with `kv` holding the
    /// position) → `[batch, 1, dim]` (plus `x` when `residual`).
    fn attend_step(
        &self,
        kernels: &Kernels<B>,
        x: &Tensor<B, 3>,
        parts: StepParts<'_, B>,
        gather: &mut Option<GatherTables<B>>,
        residual: bool,
    ) -> Tensor<B, 3> {
        let StepParts {
            qkv,
            gates,
            compressed,
            kv,
            rotation,
        } = parts;
        let pos = kv.len() - 1;
        let scale = self.scale();
        let c = &self.config;
        let [b, _, _] = x.dims();
        let (h, d) = (c.heads, c.dim_head);
        let norm = self.norm.as_ref();
        let (cos, sin) = rotation.parts();
        let heads = |start: usize, count: usize| heads_of(qkv, start, count, d);
        let gate_logits = || match &gates {
            Some(g) => g.clone(),
            None => norm_linear(kernels, norm, &self.gates.proj, x.clone(), false, None),
        };
        let sizes = c.sizes();
        let fused = kernels.fused().and_then(|fused| {
            fused.decode_attention(&DecodeInputs {
                qkv,
                cos,
                sin,
                compressed: compressed.cached(),
                num_mem: self.compress.num_mem(),
                kv: kv.cached(),
                gate_logits: &gate_logits,
                sizes: &sizes,
                scale,
            })
        });
        let mixed = fused.unwrap_or_else(|| {
            let q = heads(0, h);
            // 1. compressed: memory + every block that ended before `pos`
            let (ck, cv) = compressed.all();
            let comp = self.compress.attend(kernels, q.clone(), ck, cv, pos, scale);
            // 2. selected
            let q = rotation.apply(q);
            let selection = comp
                .importance
                .and_then(|logits| importance(logits, c, pos))
                .and_then(|probs| select_top(kernels, probs, c));
            let selected =
                selected_attention_step(kernels, q.clone(), kv, selection, c, scale, gather);
            // 3. sliding window: the last `window + 1` keys
            let start = rules::window_start(pos, c.sliding_window_size);
            let (sk, sv) = kv.rows(start, pos + 1 - start);
            let sliding = attend_one(kernels, q, sk, sv, scale);
            self.gates
                .mix(gate_logits(), [comp.out, selected, sliding])
                .reshape([b, 1, h * d])
        });
        norm_linear(
            kernels,
            None,
            &self.combine_heads,
            mixed,
            false,
            residual.then(|| x.clone()),
        )
    }
}

/// What the cache write of a decode step produced: the whole block's output, or the projection
/// row (and the gate logits, where computed with it) for the attention to follow.
enum Written<B: Backend> {
    Block(Tensor<B, 3>),
    Projected(Tensor<B, 3>, Option<Tensor<B, 3>>),
}

/// The inputs of a decode step's attention after its cache writes.
struct StepParts<'a, B: Backend> {
    /// The position's projection row `[batch, 1, (h + 2 kvh) d]`.
    qkv: &'a Tensor<B, 3>,
    /// Its gate logits, when computed with the projection.
    gates: Option<Tensor<B, 3>>,
    /// Memory and compressed keys/values of the blocks that ended before the position.
    compressed: &'a KvBuffer<B>,
    /// Rotated keys/values up to and including the position.
    kv: &'a KvBuffer<B>,
    /// The position's rotation.
    rotation: &'a Rotation<B>,
}

/// Heads `start..start + count` of a decode step's projection row `[b, 1, width]` as `[b,
/// count, 1, d]` (one position: the row is `[b, count, 1, d]` in memory).
fn heads_of<B: Backend>(qkv: &Tensor<B, 3>, start: usize, count: usize, d: usize) -> Tensor<B, 4> {
    let [b, _, _] = qkv.dims();
    qkv.clone()
        .narrow(2, start * d, count * d)
        .reshape([b, count, 1, d])
}

/// Attention of one query per head `[batch, heads, 1, dim_head]` over keys and values
/// `[batch, kv_heads, n, dim_head]` (query head `i` uses kv head `i / group`), no mask.
pub(crate) fn attend_one<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, h, _, d] = q.dims();
    let kvh = k.dims()[1];
    let q = q.reshape([b, kvh, 1, h / kvh, d]);
    attend(
        kernels,
        q,
        k.unsqueeze_dim(2),
        v.unsqueeze_dim(2),
        None,
        scale,
    )
    .out
    .reshape([b, h, 1, d])
}

/// The decode ring of a prompt's last `l` un-rotated keys or values: `t` `[batch, kv_heads,
/// seq, dim_head]` → `[batch, kv_heads, l, dim_head]` with position `p` in row `p % l` (zeros
/// for positions before the start), what [`SparseAttention::step`] pools a block from.
pub(crate) fn decode_ring<B: Backend>(t: Tensor<B, 4>, l: usize) -> Tensor<B, 4> {
    let n = t.dims()[2];
    ring_ending(t, l, n)
}

/// [`decode_ring`] of rows `t` `[batch, kv_heads, rows, dim_head]` whose last is position
/// `end - 1` (and which hold zeros for positions before the start, if any).
pub(crate) fn ring_ending<B: Backend>(t: Tensor<B, 4>, l: usize, end: usize) -> Tensor<B, 4> {
    let n = t.dims()[2];
    let t = pad_zeros(t, 2, l.saturating_sub(n), 0);
    let len = t.dims()[2];
    // row `i` holds position `end - l + i`; rolled so that it sits in row `(end + i) % l`
    t.narrow(2, len - l, l).roll_dim(l - end % l, 2)
}
