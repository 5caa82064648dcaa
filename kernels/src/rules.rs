//! The rules of NSA (and of DSA's token selection) that every implementation shares: the tensor-op model (training and
//! decode), the CubeCL kernels (training and decode) and the CPU decode step. Each rule is
//! written here once, as a plain function on sizes (usable from host code, from tensor code and
//! as a `#[comptime]` value of a CubeCL kernel), and every implementation calls it; the parity
//! tests then check the implementations against each other, not the rules' copies.
//!
//! Legend: `t` a query's position, `p` a key's position, `w` the sliding window, `l` the
//! compression block, `s` its stride, `l'` the selection block, `n` the selected-block count,
//! `mem` the memory slots in front of the compressed keys.

/// DSA's token selection: the positions of `0..=position` the query at `position` attends in
/// the global branch (not in order), by the indexer's `scores` of the keys `0..position`.
///
/// **Rule** (the model's host path calls this; the CubeCL ranking implements it): at most
/// `top_k` tokens of `0..=t`: the own token always, then the others by descending score, of two
/// equal scores the earlier position first (−0 equals +0; NaN ranks with −inf, last). A prefix
/// of at most `top_k` tokens is selected whole, so the first `top_k` positions attend densely;
/// future tokens are never selected. `scores` may be longer than `position` (the later entries
/// are ignored) or shorter (only its keys are ranked).
pub fn dsa_selected_tokens(scores: &[f64], position: usize, top_k: usize) -> Vec<usize> {
    let earlier = position.min(scores.len());
    let others = top_k.saturating_sub(1);
    let mut order: Vec<usize> = (0..earlier).collect();
    if others < earlier {
        // higher score first, then the lower position: a total order (f64 holds every float
        // type exactly), the first `others` found in linear time
        let key = |s: f64| {
            if s.is_nan() {
                f64::NEG_INFINITY
            } else {
                s + 0.0
            }
        };
        let before =
            |&i: &usize, &j: &usize| key(scores[j]).total_cmp(&key(scores[i])).then(i.cmp(&j));
        if others > 0 {
            order.select_nth_unstable_by(others - 1, before);
        }
        order.truncate(others);
    }
    order.push(position);
    order
}

/// The constant logit appended to every row of the selection softmax (as the reference does):
/// a block whose importance is far below it gets a probability of about zero.
pub const SINK_LOGIT: f32 = -1000.0;

/// A selected block is attended only when its probability is above this (below it, the block
/// was not visible to the query: its logits were masked out).
pub const VALID_PROBABILITY: f32 = 1e-10;

/// Whether a selected block with probability `p` may be attended.
pub fn block_is_valid(p: f32) -> bool {
    p > VALID_PROBABILITY
}

/// The first key the sliding window of the query at `t` sees: keys `t - w ..= t`.
pub fn window_start(t: usize, window: usize) -> usize {
    t.saturating_sub(window)
}

/// Whether the key at `p` lies in the sliding window of the query at `t`.
pub fn in_window(p: usize, t: usize, window: usize) -> bool {
    p <= t && p + window >= t
}

/// Compression blocks complete among the first `len` tokens: block `j` covers the `l` tokens
/// ending at `(j + 1) · s - 1`, so a block is formed every `s` tokens.
pub fn compressed_blocks(len: usize, stride: usize) -> usize {
    len / stride
}

/// Whether compressed block `j` (after the memory slots) is visible to the query at `t`:
/// strictly after the block's last token, `(j + 1) · s <= t`.
pub fn compressed_visible(j: usize, t: usize, stride: usize) -> bool {
    (j + 1) * stride <= t
}

/// Compression blocks per selection block (`l' / s`, at least 1): the selection importance of
/// a block is the mean of the logits of the compression blocks it is made of.
pub fn compressed_per_selection(selection_block: usize, stride: usize) -> usize {
    (selection_block / stride).max(1)
}

/// Complete selection blocks among `compressed` compression blocks.
pub fn selection_blocks(compressed: usize, selection_block: usize, stride: usize) -> usize {
    compressed / compressed_per_selection(selection_block, stride)
}

/// The number of blocks a query selects when `complete` selection blocks exist: top-n is
/// `min(n, complete blocks)`.
pub fn selected_count(num_selected: usize, complete: usize) -> usize {
    num_selected.min(complete)
}

/// The selection block holding the token at `t` (the query's own block, attended causally and
/// never ranked).
pub fn own_block(t: usize, selection_block: usize) -> usize {
    t / selection_block
}

/// The ranking order of the top-n selection: descending importance, and of two blocks with the
/// same importance the lower index first. `true` when block `a` (importance `va`) ranks before
/// block `b` (`vb`).
pub fn ranks_before(va: f32, a: usize, vb: f32, b: usize) -> bool {
    va > vb || (va == vb && a < b)
}

/// The sizes of an NSA layer that the kernels need (the `NsaConfig` of the model, as plain
/// numbers): what every rule above is applied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseSizes {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Features per head.
    pub dim_head: usize,
    /// Compression block length `l`.
    pub compress_block: usize,
    /// Compression stride `s`.
    pub stride: usize,
    /// Selection block length `l'`.
    pub selection_block: usize,
    /// Selected blocks per query `n`.
    pub num_selected: usize,
    /// Sliding window `w`.
    pub window: usize,
    /// The query heads of a GQA group share one selection.
    pub share_selection: bool,
    /// Keys of selected blocks are gated by their probability (straight-through top-k).
    pub diff_topk: bool,
}

impl SparseSizes {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Heads that select independently: `kv_heads` when a group shares its selection, else
    /// `heads`.
    pub fn selection_heads(&self) -> usize {
        if self.share_selection {
            self.kv_heads
        } else {
            self.heads
        }
    }

    /// [`compressed_per_selection`] of these sizes.
    pub fn per_selection(&self) -> usize {
        compressed_per_selection(self.selection_block, self.stride)
    }

    /// [`selection_blocks`] of `compressed` blocks.
    pub fn selection_blocks(&self, compressed: usize) -> usize {
        selection_blocks(compressed, self.selection_block, self.stride)
    }

    /// [`selected_count`] when `complete` selection blocks exist.
    pub fn selected(&self, complete: usize) -> usize {
        selected_count(self.num_selected, complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_visibility() {
        assert_eq!(window_start(3, 16), 0);
        assert_eq!(window_start(40, 16), 24);
        assert!(in_window(24, 40, 16) && !in_window(23, 40, 16) && !in_window(41, 40, 16));
        // block 0 with stride 16 ends at token 15: visible from 16 on
        assert!(!compressed_visible(0, 15, 16) && compressed_visible(0, 16, 16));
    }

    #[test]
    fn selection_counts() {
        assert_eq!(compressed_per_selection(64, 16), 4);
        assert_eq!(compressed_per_selection(8, 16), 1);
        assert_eq!(selection_blocks(9, 64, 16), 2);
        assert_eq!(selected_count(16, 2), 2);
        assert_eq!(selected_count(4, 30), 4);
        assert!(ranks_before(0.5, 3, 0.25, 1) && ranks_before(0.5, 1, 0.5, 3));
        assert!(!ranks_before(0.5, 3, 0.5, 1));
        assert!(block_is_valid(2e-10) && !block_is_valid(1e-10));
    }
}
