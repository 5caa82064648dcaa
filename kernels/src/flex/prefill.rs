//! The compressed branch of a prefill and the block selection it drives, on the CPU over plain
//! slices (Burn's `flex` backend): what `Compressor::attend_and_select` does with tensor ops,
//! one query row at a time, so that nothing of size `seq × blocks` is ever formed and every
//! score goes through `exp` once. Rows are shared over Rayon's threads.
//!
//! Legend: `b` batch, `h` query heads, `kvh` key/value heads, `g = h / kvh`, `hs` selection
//! heads (`kvh` when a group shares its selection, else `h`), `n` queries (positions
//! `0..n`), `d` features per head, `mem` memory slots, `slots = mem + blocks`, `pf` compression
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
    /// Queries (positions `0..n`).
    pub n: usize,
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

    // one task per (batch, selection head, ROWS query rows); each writes its own rows
    let tasks: Vec<(usize, usize, usize)> = (0..p.b)
        .flat_map(|b| (0..hs).flat_map(move |sh| (0..n.div_ceil(ROWS)).map(move |c| (b, sh, c))))
        .collect();
    let results: Vec<(Vec<f32>, Vec<(usize, f32)>)> = tasks
        .par_iter()
        .map(|&(b, sh, c)| {
            let rows = c * ROWS..((c + 1) * ROWS).min(n);
            let kv = sh * gs / g;
            let kbase = (b * kvh + kv) * p.slots;
            let (k, v) = (
                &ck[kbase * d..(kbase + p.slots) * d],
                &cv[kbase * d..(kbase + p.slots) * d],
            );
            let mut outs = vec![0.0f32; rows.len() * gs * d];
            let mut picks = Vec::with_capacity(rows.len() * count);
            let mut logits = vec![0.0f32; p.slots];
            let mut imp = vec![0.0f32; complete];
            for (ri, t) in rows.clone().enumerate() {
                // memory and the blocks ended before `t` (`rules::compressed_visible`)
                let seen = p.mem + compressed_blocks(t, s.stride).min(blocks);
                // selection blocks whose compression blocks are all visible
                let vis = ((seen - p.mem) / pf).min(complete);
                imp[..vis].iter_mut().for_each(|x| *x = 0.0);
                for r in 0..gs {
                    let head = sh * gs + r;
                    let qr = &q[((b * h + head) * n + t) * d..][..d];
                    // scores, softmax, output
                    let mut max = f32::NEG_INFINITY;
                    for (j, l) in logits[..seen].iter_mut().enumerate() {
                        let kr = &k[j * d..(j + 1) * d];
                        *l = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * p.scale;
                        max = max.max(*l);
                    }
                    let o = &mut outs[(ri * gs + r) * d..][..d];
                    let mut sum = 0.0f32;
                    for (j, &l) in logits[..seen].iter().enumerate() {
                        let w = (l - max).exp();
                        sum += w;
                        for (oi, vi) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                            *oi += w * vi;
                        }
                    }
                    o.iter_mut().for_each(|x| *x /= sum);
                    // the heads' logits summed per selection block
                    for (blk, x) in imp[..vis].iter_mut().enumerate() {
                        let first = p.mem + blk * pf;
                        *x += logits[first..first + pf].iter().sum::<f32>();
                    }
                }
                select_row(&mut imp[..vis], &mut picks, t, gs * pf, count, s);
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
