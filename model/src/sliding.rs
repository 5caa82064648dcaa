//! Branch 3, sliding-window attention (NSA paper §3.3.3), as `local_attention.LocalAttention`
//! with `causal=True, exact_windowsize=True`: the query at position `t` sees rotated keys
//! `t - window ..= t`.
//!
//! The sequence is cut into buckets of `window` queries; each bucket attends to its own and the
//! previous bucket's keys (`2 * window`) under a mask, so work is linear in the sequence length.

use burn::prelude::*;

use crate::attend::attend;
use crate::kernels::Kernels;
use crate::rules::in_window;
use crate::tensor_util::{bool_tensor, pad_zeros, round_up, windows};

/// `q` `[batch, heads, seq, dim_head]` at positions `start..start + seq`, `k`, `v` `[batch,
/// kv_heads, keys, dim_head]` at positions `0..keys` (rotated; `keys >= start + seq`) →
/// `[batch, heads, seq, dim_head]`. `start` 0 and `keys == seq`: a whole sequence; else a chunk
/// of a prompt's queries over its keys.
pub fn sliding_attention<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
    window: usize,
    scale: f64,
) -> Tensor<B, 4> {
    if let Some(fused) = kernels.fused() {
        if let Some(out) = fused.sliding_attention(&q, &k, &v, start, window, scale) {
            return out;
        }
    }
    let n = q.dims()[2];
    if start > 0 || k.dims()[2] != n {
        // the chunk as the end of a sequence that starts `lead` positions earlier: the keys
        // from `lo` on (all its queries can see) and as many zero queries in front
        let lo = start.saturating_sub(window);
        let lead = start - lo;
        let (k, v) = (k.narrow(2, lo, lead + n), v.narrow(2, lo, lead + n));
        let q = pad_zeros(q, 2, lead, 0);
        let out = sliding_attention(kernels, q, k, v, 0, window, scale);
        return out.narrow(2, lead, n);
    }
    sliding_whole(kernels, q, k, v, window, scale)
}

/// [`sliding_attention`] of a whole sequence with tensor ops.
fn sliding_whole<B: Backend>(
    kernels: &Kernels<B>,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: usize,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, h, n, d] = q.dims();
    let kvh = k.dims()[1];
    let g = h / kvh;
    let w = window;
    let padded = round_up(n, w);
    let buckets = padded / w;
    let q = pad_zeros(q, 2, 0, padded - n);
    // one bucket of padding in front, so bucket x sees buckets x - 1 and x
    let k = windows(pad_zeros(k, 2, w, padded - n), 2 * w, w, buckets);
    let v = windows(pad_zeros(v, 2, w, padded - n), 2 * w, w, buckets);

    // The mask of bucket x, row (group member, t), key j (position x * w + j - w): blocked
    // before the sequence, after the query or more than w behind it. Only bucket 0 sees keys
    // before the sequence; every later bucket has the same pattern, built once on the host
    // ([g * w, 2 * w]) and repeated on the device.
    let pattern = |x: usize| -> Vec<bool> {
        let mut m = Vec::with_capacity(g * w * 2 * w);
        for _ in 0..g {
            for t in 0..w {
                let qp = (x * w + t) as i64;
                for j in 0..2 * w {
                    let kp = (x * w + j) as i64 - w as i64;
                    m.push(kp < 0 || !in_window(kp as usize, qp as usize, w));
                }
            }
        }
        m
    };
    let device = q.device();
    let first = bool_tensor::<B, 5>(pattern(0), [1, 1, 1, g * w, 2 * w], &device);
    let blocked = if buckets > 1 {
        let repeated = [1, 1, buckets - 1, g * w, 2 * w];
        let rest = bool_tensor::<B, 5>(pattern(1), [1, 1, 1, g * w, 2 * w], &device);
        let rest = rest.expand(repeated);
        Tensor::cat(vec![first, rest], 2)
    } else {
        first
    };

    let q = q
        .reshape([b, kvh, g, buckets, w, d])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, kvh, buckets, g * w, d]);
    let out = attend(kernels, q, k, v, Some(blocked), scale).out;
    out.reshape([b, kvh, buckets, g, w, d])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, h, padded, d])
        .narrow(2, 0, n)
}
