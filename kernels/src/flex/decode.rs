//! The decode step's attention on the CPU, over plain slices: the same algorithm as the CubeCL
//! decode kernel (`cube/decode/`) for Burn's `flex` backend, where the ≈ 130 tensor ops it
//! replaces per layer cost more in dispatch and allocation than the arithmetic (a few thousand
//! multiply-adds per head).
//!
//! For every `(batch, selection head)`: the compressed branch over memory and complete blocks
//! (un-rotated queries), the selection blocks' importance from its logits, the top-n blocks,
//! the selected branch (chosen blocks and the causal part of the own block) and the sliding
//! window (rotated queries), mixed by the sigmoid gates. Layouts as in [`DecodeShape`].

use crate::api::DecodeShape;

use crate::rules::{block_is_valid, ranks_before, window_start, SINK_LOGIT as SINK};

/// The tensors of one decode step, as contiguous f32 slices.
pub struct DecodeData<'a> {
    /// `[b, 1, width]`: queries, keys, values of the position (un-rotated).
    pub qkv: &'a [f32],
    /// `[d]` each.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Memory + compressed keys/values `[b, kvh, compressed_capacity, d]`.
    pub ck: &'a [f32],
    pub cv: &'a [f32],
    /// Rotated key/value cache `[b, kvh, cap, d]`, the position's row written.
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Gate logits `[b, 1, 3 h]`.
    pub gates: &'a [f32],
}

/// Softmax attention of `rows` queries `q` `[rows, d]` (scaled) over the keys at rows
/// `keys[j].0` of `k`/`v` (flat, row length `d`), each score multiplied by `keys[j].1`.
/// Returns the outputs `[rows, d]` and the scores `[rows, keys.len()]`.
fn attend(
    q: &[f32],
    rows: usize,
    d: usize,
    k: &[f32],
    v: &[f32],
    keys: &[(usize, f32)],
) -> (Vec<f32>, Vec<f32>) {
    let n = keys.len();
    let mut scores = vec![0.0f32; rows * n];
    let mut out = vec![0.0f32; rows * d];
    for r in 0..rows {
        let qr = &q[r * d..(r + 1) * d];
        let s = &mut scores[r * n..(r + 1) * n];
        for (sj, &(row, gate)) in s.iter_mut().zip(keys) {
            let kr = &k[row * d..(row + 1) * d];
            *sj = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * gate;
        }
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let o = &mut out[r * d..(r + 1) * d];
        let mut sum = 0.0f32;
        for (&sj, &(row, _)) in s.iter().zip(keys) {
            let p = (sj - max).exp();
            sum += p;
            for (oi, vi) in o.iter_mut().zip(&v[row * d..(row + 1) * d]) {
                *oi += p * vi;
            }
        }
        o.iter_mut().for_each(|x| *x /= sum);
    }
    (out, scores)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The mixed attention output `[b, 1, h * d]` of one decode step.
pub fn decode_attention(p: &DecodeShape, t: &DecodeData<'_>) -> Vec<f32> {
    let (d, group_heads) = (p.d, p.group_heads);
    let scale = p.scale as f32;
    let mut out = vec![0.0f32; p.b * p.h * d];
    for b in 0..p.b {
        for sh in 0..p.h / group_heads {
            let head0 = sh * group_heads;
            let kvhead = head0 / (p.h / p.kvh);
            // queries of the cube's heads: un-rotated and rotated, scaled
            let mut qs = vec![0.0f32; group_heads * d];
            let mut qr = vec![0.0f32; group_heads * d];
            for r in 0..group_heads {
                let base = b * p.width + (head0 + r) * d;
                for i in 0..d {
                    let x = t.qkv[base + i];
                    let partner = t.qkv[base + (i ^ 1)];
                    qs[r * d + i] = x * scale;
                    qr[r * d + i] = (x * t.cos[i] + partner * t.sin[i]) * scale;
                }
            }
            let chead = (b * p.kvh + kvhead) * p.compressed_capacity;
            let khead = (b * p.kvh + kvhead) * p.cap;

            // 1. compressed, and the importance of the complete selection blocks
            let slots: Vec<(usize, f32)> = (0..p.nc).map(|j| (chead + j, 1.0)).collect();
            let (compressed, logits) = attend(&qs, group_heads, d, t.ck, t.cv, &slots);
            let complete = p.complete();
            let imp_scale = 1.0 / (group_heads * p.per_block) as f32;
            let mut score: Vec<f32> = (0..complete)
                .map(|blk| {
                    let mut s = 0.0f32;
                    for u in 0..p.per_block {
                        let j = p.mem + blk * p.per_block + u;
                        for r in 0..group_heads {
                            s += logits[r * p.nc + j];
                        }
                    }
                    s * imp_scale
                })
                .collect();

            // top-n by importance (ties: the lower index); blocks not valid are
            // not attended
            let m = score.iter().fold(SINK, |m, &x| m.max(x));
            let z = (SINK - m).exp() + score.iter().map(|&x| (x - m).exp()).sum::<f32>();
            let mut keys = Vec::with_capacity((p.topn + 1) * p.sel);
            for _ in 0..p.topn {
                let mut at = 0;
                for (j, &s) in score.iter().enumerate() {
                    if ranks_before(s, j, score[at], at) {
                        at = j;
                    }
                }
                let prob = (score[at] - m).exp() / z;
                score[at] = f32::NEG_INFINITY;
                if block_is_valid(prob) {
                    // the straight-through gate's forward value, as the tensor ops form it
                    let gate = if p.gated { prob + (1.0 - prob) } else { 1.0 };
                    keys.extend((at * p.sel..(at + 1) * p.sel).map(|row| (khead + row, gate)));
                }
            }

            // 2. selected blocks and the causal part of the own block
            let own = p.pos / p.sel * p.sel;
            keys.extend((own..=p.pos).map(|row| (khead + row, 1.0)));
            let (selected, _) = attend(&qr, group_heads, d, t.k, t.v, &keys);

            // 3. sliding window
            let lo = window_start(p.pos, p.window);
            let window: Vec<(usize, f32)> = (lo..=p.pos).map(|row| (khead + row, 1.0)).collect();
            let (sliding, _) = attend(&qr, group_heads, d, t.k, t.v, &window);

            for r in 0..group_heads {
                let head = head0 + r;
                let g = |branch: usize| sigmoid(t.gates[b * 3 * p.h + head * 3 + branch]);
                let (g0, g1, g2) = (g(0), g(1), g(2));
                let o = &mut out[(b * p.h + head) * d..(b * p.h + head + 1) * d];
                let rows = r * d..(r + 1) * d;
                let branches = compressed[rows.clone()]
                    .iter()
                    .zip(&selected[rows.clone()])
                    .zip(&sliding[rows]);
                for (oi, ((c, s), w)) in o.iter_mut().zip(branches) {
                    *oi = c * g0 + s * g1 + w * g2;
                }
            }
        }
    }
    out
}
