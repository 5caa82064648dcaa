//! Native sparse attention layer: the three branches over the same queries, mixed per head by
//! learned sigmoid gates (`native_sparse_attention_pytorch.SparseAttention`, causal).
//!
//! ```text
//!              ┌─ compressed: q · pooled blocks of k/v (+ memory kv) ──┐
//! x ─ norm ─ qkv ─ selected:   q_rot · top-n blocks of k_rot/v + own ──┼─ gates ─ out
//!              └─ sliding:    q_rot · last `window` k_rot/v ──────────┘
//! ```

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::attend::attend;
use crate::cache::{GatherTables, KvBuffer, NsaCache};
use crate::compress::Compressor;
use crate::config::{ConfigError, NsaConfig};
use crate::gates::BranchGates;
use crate::kernels::{write_rows, BlockStep, DecodeInputs};
use crate::norm::RmsNorm;
use crate::rope::Rotation;
use crate::select::{fine_attention, fine_attention_step, importance, select_top};
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

    /// Splits the projection of `x` `[batch, seq, dim]` into heads.
    pub(crate) fn qkv(&self, x: Tensor<B, 3>) -> Qkv<B> {
        let [b, n, _] = x.dims();
        let c = &self.config;
        let (h, kvh, d) = (c.heads, c.kv_heads(), c.dim_head);
        let qkv = linear(&self.to_qkv, x);
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
    pub(crate) fn mix(&self, normed: Tensor<B, 3>, branches: [Tensor<B, 4>; 3]) -> Tensor<B, 3> {
        let [b, n, _] = normed.dims();
        let out = self.gates.combine(normed, branches);
        let inner = self.config.heads * self.config.dim_head;
        linear(
            &self.combine_heads,
            out.swap_dims(1, 2).reshape([b, n, inner]),
        )
    }

    /// Causal forward over a whole sequence: `x` `[batch, seq, dim]` → `[batch, seq, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_inner(x, None).0
    }

    /// Forward over a prompt that also returns the decode cache, with room for `extra` tokens.
    pub fn prefill(&self, x: Tensor<B, 3>, extra: usize) -> (Tensor<B, 3>, NsaCache<B>) {
        let (out, cache) = self.forward_inner(x, Some(extra));
        (out, cache.expect("cache requested"))
    }

    fn forward_inner(
        &self,
        x: Tensor<B, 3>,
        cache_extra: Option<usize>,
    ) -> (Tensor<B, 3>, Option<NsaCache<B>>) {
        let x = self.normed(x);
        let Qkv { q, k, v } = self.qkv(x.clone());
        let [b, _, n, d] = q.dims();
        let scale = self.scale();
        let c = &self.config;

        // 1. compressed
        let compressed = self.compress.compress(k.clone(), v.clone());
        let (ck, cv) = self.compress.with_memory(b, compressed);
        // (with the block selection it drives: one fused kernel where registered)
        let (comp, selection) =
            self.compress
                .attend_and_select(q.clone(), ck.clone(), cv.clone(), c, scale);

        // 2. selected (rotary on queries and keys from here on)
        let rotation = Rotation::new(d, 0, n, &q.device());
        let q = rotation.apply(q);
        let k_rot = rotation.apply(k.clone());
        let cache = cache_extra.map(|extra| {
            let l = c.compress_block_size;
            // the last `l` un-rotated keys/values (zeros before the start) as the decode ring:
            // position `p` in row `p % l`
            let tail = |t: Tensor<B, 4>| {
                let t = pad_zeros(t, 2, l.saturating_sub(n), 0);
                let len = t.dims()[2];
                // row `i` holds position `n - l + i`; rolled so that it sits in row `(n + i) % l`
                t.narrow(2, len - l, l).roll_dim(l - n % l, 2)
            };
            NsaCache {
                kv: KvBuffer::aligned(k_rot.clone(), v.clone(), extra, c.selection_block_size),
                compressed: KvBuffer::new(ck, cv, extra / c.compress_block_sliding_stride + 1),
                tail_k: tail(k),
                tail_v: tail(v.clone()),
                gather: None,
            }
        });
        let k = k_rot;
        let fine = fine_attention(q.clone(), k.clone(), v.clone(), selection, c, scale);

        // 3. sliding window
        let sliding = sliding_attention(q, k, v, c.sliding_window_size, scale);

        (self.mix(x, [comp, fine, sliding]), cache)
    }

    /// Decodes one token: `x` `[batch, 1, dim]` at position `cache.kv.len()`, rotated by
    /// `rotation` (that position's) → the attention's output `[batch, 1, dim]`; with `block`
    /// (the block's feed-forward), the whole residual block instead: `h + ff(h)` with `h = x +
    /// attention(x)`.
    ///
    /// Where the backend registered kernels for it, a block is one operation
    /// ([`crate::kernels::NsaKernels::decode_block`]); else the attention is four: the normed
    /// projection with the gate logits, the cache writes, the three branches with their mix
    /// ([`crate::kernels::NsaKernels::decode_attention`]) and the output projection with the
    /// residual; every one falls back to tensor ops on its own.
    pub fn step(
        &self,
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
        let scale = self.scale();
        let c = &self.config;
        let (h, kvh, d) = (c.heads, c.kv_heads(), c.dim_head);
        let norm = self.norm.as_ref();
        let kernels = crate::kernels::get::<B>();

        // the position's key (rotated) and value join the cache, its un-rotated key and value
        // the compression ring (position `p` in row `p % l`)
        let l = c.compress_block_size;
        let slot = pos % l;
        let (cos, sin) = rotation.parts();
        let mut ring = None;
        let mut whole_block = None;
        let mut projected = None;
        let kv = kv.append_with(1, |kb, vb, at| {
            let mut buffers = [kb, vb, tail_k, tail_v];
            // 1. the whole block in one operation
            let whole = block.filter(|_| crate::kernels::block_enabled());
            if let (Some(k), Some(ff)) = (&kernels, whole) {
                let step = BlockStep {
                    x: &x,
                    norm,
                    to_qkv: &self.to_qkv,
                    gates: &self.gates.proj,
                    combine: &self.combine_heads,
                    ff: Some(ff),
                    cos,
                    sin,
                    compressed: &compressed,
                    num_mem: self.compress.num_mem(),
                    config: c,
                    scale,
                    pos: at,
                    slot,
                };
                match k.decode_block(&step, buffers) {
                    Ok((out, [kb, vb, tk, tv])) => {
                        whole_block = Some(out);
                        ring = Some((tk, tv));
                        return (kb, vb);
                    }
                    Err(back) => buffers = back,
                }
            }
            // 2. operation by operation: the projection and the gate logits read the same
            // normed row (one operation where a backend has it), then the writes
            let paired = kernels
                .as_ref()
                .and_then(|k| k.row_linear_pair(&x, norm, &self.to_qkv, &self.gates.proj));
            let (qkv, gates) = match paired {
                Some((qkv, gates)) => (qkv, Some(gates)),
                None => (
                    norm_linear(norm, &self.to_qkv, x.clone(), false, None),
                    None,
                ),
            };
            let written = match &kernels {
                Some(k) => k.decode_write(&qkv, cos, sin, buffers, h, at, slot),
                None => Err(buffers),
            };
            let [kb, vb, tk, tv] = written.unwrap_or_else(|[kb, vb, tk, tv]| {
                let (k, v) = (heads_of(&qkv, h, kvh, d), heads_of(&qkv, h + kvh, kvh, d));
                [
                    write_rows(kb, at, rotation.apply(k.clone())),
                    write_rows(vb, at, v.clone()),
                    write_rows(tk, slot, k),
                    write_rows(tv, slot, v),
                ]
            });
            ring = Some((tk, tv));
            projected = Some((qkv, gates));
            (kb, vb)
        });
        let (tail_k, tail_v) = ring.expect("written with the cache");
        let out = match (whole_block, projected) {
            (Some(out), _) => out,
            (None, Some((qkv, gates))) => {
                let out = self.attend_step(
                    &x,
                    &qkv,
                    gates,
                    &compressed,
                    &kv,
                    rotation,
                    &mut gather,
                    block.is_some(),
                );
                match block {
                    Some(ff) => ff.step(out),
                    None => out,
                }
            }
            (None, None) => unreachable!("the cache write runs one of the two paths"),
        };

        // a block ending at `pos` is pooled now and seen from `pos + 1` on
        if (pos + 1) % c.compress_block_sliding_stride == 0 {
            // in position order: the oldest, `pos + 1 - l`, sits in row `(pos + 1) % l`
            let ordered = |ring: &Tensor<B, 4>| ring.clone().roll_dim((pos + 1) % l, 2);
            let (nk, nv) = self
                .compress
                .compress_one(ordered(&tail_k), ordered(&tail_v));
            compressed = compressed.push(nk, nv);
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

    /// The attention of a decode step after the cache writes: `qkv` the position's projection
    /// row, `gates` its gate logits when already computed, `kv` with the position written →
    /// `[batch, 1, dim]` (plus `x` when `residual`).
    #[allow(clippy::too_many_arguments)]
    fn attend_step(
        &self,
        x: &Tensor<B, 3>,
        qkv: &Tensor<B, 3>,
        gates: Option<Tensor<B, 3>>,
        compressed: &KvBuffer<B>,
        kv: &KvBuffer<B>,
        rotation: &Rotation<B>,
        gather: &mut Option<GatherTables<B>>,
        residual: bool,
    ) -> Tensor<B, 3> {
        let pos = kv.len() - 1;
        let scale = self.scale();
        let c = &self.config;
        let [b, _, _] = x.dims();
        let (h, d) = (c.heads, c.dim_head);
        let norm = self.norm.as_ref();
        let kernels = crate::kernels::get::<B>();
        let (cos, sin) = rotation.parts();
        let heads = |start: usize, count: usize| heads_of(qkv, start, count, d);
        let gate_logits = || match &gates {
            Some(g) => g.clone(),
            None => norm_linear(norm, &self.gates.proj, x.clone(), false, None),
        };
        let fused = kernels.as_ref().and_then(|kernels| {
            kernels.decode_attention(&DecodeInputs {
                qkv,
                cos,
                sin,
                compressed,
                num_mem: self.compress.num_mem(),
                kv,
                gate_logits: &gate_logits,
                config: c,
                scale,
            })
        });
        let mixed = fused.unwrap_or_else(|| {
            let q = heads(0, h);
            // 1. compressed: memory + every block that ended before `pos`
            let (ck, cv) = compressed.all();
            let comp = self.compress.attend(q.clone(), ck, cv, pos, scale);
            // 2. selected
            let q = rotation.apply(q);
            let selection = comp
                .importance
                .and_then(|logits| importance(logits, c, pos))
                .and_then(|probs| select_top(probs, c));
            let fine = fine_attention_step(q.clone(), kv, selection, c, scale, gather);
            // 3. sliding window: the last `window + 1` keys
            let start = pos.saturating_sub(c.sliding_window_size);
            let (sk, sv) = kv.rows(start, pos + 1 - start);
            let sliding = attend_one(q, sk, sv, scale);
            self.gates
                .mix(gate_logits(), [comp.out, fine, sliding])
                .reshape([b, 1, h * d])
        });
        norm_linear(
            None,
            &self.combine_heads,
            mixed,
            false,
            residual.then(|| x.clone()),
        )
    }
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
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, h, _, d] = q.dims();
    let kvh = k.dims()[1];
    let q = q.reshape([b, kvh, 1, h / kvh, d]);
    attend(q, k.unsqueeze_dim(2), v.unsqueeze_dim(2), None, scale)
        .out
        .reshape([b, h, 1, d])
}
