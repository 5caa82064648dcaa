//! The compressed branch of a prefill and the block selection it drives, on the CPU over plain
//! slices (Burn's `flex` backend): what `Compressor::attend_and_select` does with tensor ops,
//! one query row at a time, so that nothing of size `seq × blocks` is ever formed and every
//! score goes through `exp` once. Rows are shared over Rayon's threads.
//!
//! Legend: `b` batch, `h` query heads, `kvh` key/value heads, `g = h / kvh`, `hs` selection
//! heads (`kvh` when a group shares its selection, else `h`), `n` queries (positions
//! `start..start + n`), `d` features per head, `mem` memory slots, `slots = mem + blocks`, `pf` compression
//! blocks per selection block, `complete` selection blocks, `count` blocks selected per query.
//!
//! For the query at `t` and one selection head: the scores of its heads over the visible slots
//! (memory, and the blocks ended before `t`: [`crate::rules::compressed_visible`]), the branch output per head
//! (softmax over them), and the importance of every complete selection block: the mean of its
//! heads' and compression blocks' logits where all of them are visible and the block is not
//! the query's own (when `pf > 1`), else masked. Probabilities: a softmax over the blocks and
//! the sink slot, masked blocks at exactly zero (as their `exp` underflows in the tensor ops).
//! Top-`count` by probability ([`ranks_before`]): the positive ones, then the zero ones by index.

use rayon::prelude::*;

use crate::rules::{
    block_is_valid, compressed_blocks, own_block, ranks_before, selected_count, SparseSizes,
    SINK_LOGIT,
};

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
pub struct PrefillShape {
    pub b: usize,
    /// Queries (positions `start..start + n`).
    pub n: usize,
    /// The position of the first query.
    pub start: usize,
    /// Memory + compressed rows of `ck`, `cv`.
    pub slots: usize,
    pub mem: usize,
    pub sizes: SparseSizes,
    pub scale: f32,
}

/// What the branch gives: the output `[b, h, n, d]` and, where complete blocks exist, the
/// selection `[b, hs, n, count]` (block, probability or straight-through gate, valid).
pub struct PrefillOut {
    pub out: Vec<f32>,
    pub count: usize,
    pub indices: Vec<i64>,
    pub scores: Vec<f32>,
    pub valid: Vec<bool>,
}

/// Query rows per task.
const ROWS: usize = 64;

/// A task's outputs `[rows, heads of the selection head, d]` and picks `[rows, count]`
/// (block, probability).
type TaskOut = (Vec<f32>, Vec<(usize, f32)>);

/// The compressed branch and the selection of `q` `[b, h, n, d]` over `ck`, `cv`
/// `[b, kvh, slots, d]` (contiguous f32).
pub fn compressed_and_selection(p: &PrefillShape, q: &[f32], ck: &[f32], cv: &[f32]) -> PrefillOut {
    let s = &p.sizes;
    let (h, kvh, d, n) = (s.heads, s.kv_heads, s.dim_head, p.n);
    let g = s.group();
    let hs = s.selection_heads();
    // query heads per selection head
    let gs = h / hs;
    let pf = s.per_selection();
    let blocks = p.slots - p.mem;
    let complete = s.selection_blocks(blocks);
    let count = selected_count(s.num_selected, complete);
    let mut out = vec![0.0f32; p.b * h * n * d];
    let mut indices = vec![0i64; p.b * hs * n * count];
    let mut scores = vec![0.0f32; p.b * hs * n * count];
    let mut valid = vec![false; p.b * hs * n * count];

    // keys and values transposed, `[b, kvh, d, slots]`: a query's scores and its output are
    // then sums over contiguous runs of slots (vectorised), not dot products of `d` features
    let transpose = |x: &[f32]| {
        let mut t = vec![0.0f32; x.len()];
        for (bh, head) in x.chunks_exact(p.slots * d).enumerate() {
            let th = &mut t[bh * p.slots * d..(bh + 1) * p.slots * d];
            for (j, row) in head.chunks_exact(d).enumerate() {
                for (i, &x) in row.iter().enumerate() {
                    th[i * p.slots + j] = x;
                }
            }
        }
        t
    };
    let (kt, vt) = (transpose(ck), transpose(cv));
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;

    // one task per (batch, selection head, ROWS query rows); each writes its own rows
    let tasks: Vec<(usize, usize, usize)> = (0..p.b)
        .flat_map(|b| (0..hs).flat_map(move |sh| (0..n.div_ceil(ROWS)).map(move |c| (b, sh, c))))
        .collect();
    let results: Vec<TaskOut> = tasks
        .par_iter()
        .map(|&(b, sh, c)| {
            let rows = c * ROWS..((c + 1) * ROWS).min(n);
            let kv = sh * gs / g;
            let at = (b * kvh + kv) * p.slots * d;
            let heads = Transposed {
                k: &kt[at..at + p.slots * d],
                v: &vt[at..at + p.slots * d],
                slots: p.slots,
                avx2,
            };
            let mut outs = vec![0.0f32; rows.len() * gs * d];
            let mut picks = Vec::with_capacity(rows.len() * count);
            let mut logits = vec![0.0f32; p.slots];
            let mut weights = vec![0.0f32; p.slots];
            let mut imp = vec![0.0f32; complete];
            for (ri, t) in rows.clone().enumerate() {
                // the row's position
                let pos = p.start + t;
                // memory and the blocks ended before it (`rules::compressed_visible`)
                let seen = p.mem + compressed_blocks(pos, s.stride).min(blocks);
                // selection blocks whose compression blocks are all visible
                let vis = ((seen - p.mem) / pf).min(complete);
                imp[..vis].iter_mut().for_each(|x| *x = 0.0);
                for r in 0..gs {
                    let head = sh * gs + r;
                    let qr = &q[((b * h + head) * n + t) * d..][..d];
                    let o = &mut outs[(ri * gs + r) * d..][..d];
                    let (l, w) = (&mut logits[..seen], &mut weights[..seen]);
                    heads.attend(qr, p.scale, l, w, o);
                    // the heads' logits summed per selection block
                    for (blk, x) in imp[..vis].iter_mut().enumerate() {
                        let first = p.mem + blk * pf;
                        *x += l[first..first + pf].iter().sum::<f32>();
                    }
                }
                select_row(&mut imp[..vis], &mut picks, pos, gs * pf, count, s);
            }
            (outs, picks)
        })
        .collect();

    for (&(b, sh, c), (outs, picks)) in tasks.iter().zip(results) {
        let rows = c * ROWS..((c + 1) * ROWS).min(n);
        for (ri, t) in rows.enumerate() {
            for r in 0..gs {
                let head = sh * gs + r;
                out[((b * h + head) * n + t) * d..][..d]
                    .copy_from_slice(&outs[(ri * gs + r) * d..][..d]);
            }
            let at = ((b * hs + sh) * n + t) * count;
            for (i, &(blk, prob)) in picks[ri * count..(ri + 1) * count].iter().enumerate() {
                indices[at + i] = blk as i64;
                valid[at + i] = block_is_valid(prob);
                // the straight-through gate's forward value, as the tensor ops form it
                scores[at + i] = if s.diff_topk {
                    prob + (1.0 - prob)
                } else {
                    prob
                };
            }
        }
    }
    PrefillOut {
        out,
        count,
        indices,
        scores,
        valid,
    }
}

/// The top-`count` blocks of one query row (at `t`) from `imp`, the summed logits (`terms`
/// each) of its selection blocks whose compression blocks are all visible (the later ones are
/// masked), appended to `picks` as `(block, probability)`.
fn select_row(
    imp: &mut [f32],
    picks: &mut Vec<(usize, f32)>,
    t: usize,
    terms: usize,
    count: usize,
    s: &SparseSizes,
) {
    let pf = s.per_selection();
    let own = own_block(t, s.selection_block);
    // the query's own block is left to the selected branch's causal part
    let open = |blk: usize| !(pf > 1 && blk == own);
    let inv = 1.0 / terms as f32;
    let mut m = SINK_LOGIT;
    for (blk, x) in imp.iter_mut().enumerate() {
        if open(blk) {
            *x *= inv;
            m = m.max(*x);
        }
    }
    let mut z = (SINK_LOGIT - m).exp();
    for (blk, x) in imp.iter_mut().enumerate() {
        if open(blk) {
            *x = (*x - m).exp();
            z += *x;
        } else {
            *x = 0.0;
        }
    }
    // the best `count` positive probabilities (ranked), then zero ones by index
    let start = picks.len();
    for (blk, &e) in imp.iter().enumerate() {
        let prob = e / z;
        if prob <= 0.0 {
            continue;
        }
        let row = &mut picks[start..];
        if row.len() < count {
            picks.push((blk, prob));
        } else if ranks_before(prob, blk, row[count - 1].1, row[count - 1].0) {
            row[count - 1] = (blk, prob);
        } else {
            continue;
        }
        // keep the row sorted (insertion of the new last entry)
        let row = &mut picks[start..];
        let mut i = row.len() - 1;
        while i > 0 && ranks_before(row[i].1, row[i].0, row[i - 1].1, row[i - 1].0) {
            row.swap(i, i - 1);
            i -= 1;
        }
    }
    let mut blk = 0;
    while picks.len() - start < count {
        let positive = blk < imp.len() && imp[blk] / z > 0.0;
        if !positive {
            picks.push((blk, 0.0));
        }
        blk += 1;
    }
}

/// One kv head's keys and values, transposed: feature `i` of slot `j` at `i * slots + j`.
struct Transposed<'a> {
    k: &'a [f32],
    v: &'a [f32],
    slots: usize,
    /// The CPU has AVX2 and FMA (checked once per call, not per row).
    avx2: bool,
}

/// Lanes of the vectorised loops (one AVX register of f32).
const LANES: usize = 8;

impl Transposed<'_> {
    /// Attention of the query `q` (`d` features) over the first `l.len()` slots: their scaled
    /// logits into `l`, the softmax-weighted sum of their values into `o`; `w` is scratch.
    fn attend(&self, q: &[f32], scale: f32, l: &mut [f32], w: &mut [f32], o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: the CPU has the features the function is compiled with (`avx2`).
            unsafe { self.attend_avx2(q, scale, l, w, o) };
            return;
        }
        self.attend_plain(q, scale, l, w, o);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(
        &self,
        q: &[f32],
        scale: f32,
        l: &mut [f32],
        w: &mut [f32],
        o: &mut [f32],
    ) {
        self.attend_plain(q, scale, l, w, o);
    }

    #[inline(always)]
    fn attend_plain(&self, q: &[f32], scale: f32, l: &mut [f32], w: &mut [f32], o: &mut [f32]) {
        let seen = l.len();
        // logits: feature by feature over the slots
        l.iter_mut().for_each(|x| *x = 0.0);
        for (i, &qi) in q.iter().enumerate() {
            let row = &self.k[i * self.slots..i * self.slots + seen];
            for (x, &k) in l.iter_mut().zip(row) {
                *x += qi * k;
            }
        }
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = l.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (m, x) in lanes.iter_mut().zip(c.iter_mut()) {
                *x *= scale;
                *m = m.max(*x);
            }
        }
        let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for x in chunks.into_remainder() {
            *x *= scale;
            max = max.max(*x);
        }
        // weights and their sum
        let mut sums = [0.0f32; LANES];
        let mut wc = w.chunks_exact_mut(LANES);
        let mut lc = l.chunks_exact(LANES);
        for (wv, lv) in (&mut wc).zip(&mut lc) {
            for ((s, x), &y) in sums.iter_mut().zip(wv.iter_mut()).zip(lv) {
                *x = exp_neg(y - max);
                *s += *x;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for (x, &y) in wc.into_remainder().iter_mut().zip(lc.remainder()) {
            *x = exp_neg(y - max);
            sum += *x;
        }
        // output: per feature, the weighted sum of the values over the slots
        for (i, oi) in o.iter_mut().enumerate() {
            let row = &self.v[i * self.slots..i * self.slots + seen];
            let mut acc = [0.0f32; LANES];
            let mut rc = row.chunks_exact(LANES);
            let mut wc = w.chunks_exact(LANES);
            for (rv, wv) in (&mut rc).zip(&mut wc) {
                for ((a, &r), &x) in acc.iter_mut().zip(rv).zip(wv) {
                    *a += x * r;
                }
            }
            let mut total: f32 = acc.iter().sum();
            for (&r, &x) in rc.remainder().iter().zip(wc.remainder()) {
                total += x * r;
            }
            *oi = total / sum;
        }
    }
}

/// `exp(x)` for `x <= 0` (a logit minus its row's maximum), to about 2 ulp: `2^n · p(r)` with
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, a degree-6 polynomial for `e^r`, written without
/// library calls so that the loops around it vectorise. Below -87.3 (where `expf` is
/// subnormal) it is 0; NaN stays NaN.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to an integer
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.3);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let e = p * scale;
    // a NaN stays NaN
    if x > -87.3 {
        e
    } else if x <= -87.3 {
        0.0
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polynomial_exp_is_expf_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (exp_neg(x) as f64, (x as f64).exp());
            let rel = ((a - b) / b).abs();
            // `max` would pass over a NaN
            assert!(rel.is_finite(), "exp_neg({x}) = {a}");
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert!(exp_neg(f32::NAN).is_nan());
    }
}
