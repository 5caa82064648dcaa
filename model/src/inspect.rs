//! Which key blocks each query of a sequence selects, layer by layer, and how close each choice
//! was: the tool for explaining a difference between two backends.
//!
//! Top-n selection is discontinuous. Where the `n`-th and `(n+1)`-th block importances of a
//! query differ by less than the rounding noise of a backend (its `exp`, its summation order),
//! two correct backends can keep different blocks, and that query's output, and everything
//! after it in later layers, then differs by far more than the noise. [`Transformer::selections`]
//! returns the chosen blocks with that margin so that a comparison can tell such a flip from a
//! numerical fault.

use burn::prelude::*;

use crate::nsa::{Qkv, SparseAttention};
use crate::rules;
use crate::select::importance;
use crate::transformer::{Attention, Transformer};

/// The selection of one NSA layer over a whole sequence (queries at `0..seq`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSelection {
    /// Rows: `batch * selection_heads * seq`, in that order (`seq` fastest).
    pub rows: usize,
    /// Blocks kept per row (`num_selected_blocks`, at most the number of complete blocks).
    pub count: usize,
    /// The kept blocks of every row whose importance is above the validity threshold, in
    /// ascending order, padded with `-1`: `[rows, count]`.
    pub blocks: Vec<i64>,
    /// Per row, the importance of the last kept block minus the best one left out, where that
    /// choice decides something (both above the validity threshold); `f32::INFINITY` elsewhere.
    pub margin: Vec<f32>,
}

impl LayerSelection {
    /// The kept blocks of row `r`.
    pub fn row(&self, r: usize) -> &[i64] {
        &self.blocks[r * self.count..(r + 1) * self.count]
    }

    /// Ranks `probs` `[rows, complete]` (host values, row-major) as [`crate::select::select_top`]
    /// does: the `count` largest ([`rules::ranks_before`]), valid per [`rules::block_is_valid`].
    pub fn from_probs(probs: &[f32], rows: usize, complete: usize, count: usize) -> Self {
        let count = rules::selected_count(count, complete);
        let mut blocks = Vec::with_capacity(rows * count);
        let mut margin = Vec::with_capacity(rows);
        let mut order: Vec<usize> = Vec::with_capacity(complete);
        for r in 0..rows {
            let p = &probs[r * complete..(r + 1) * complete];
            order.clear();
            order.extend(0..complete);
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let mut kept: Vec<i64> = order[..count]
                .iter()
                .filter(|&&j| rules::block_is_valid(p[j]))
                .map(|&j| j as i64)
                .collect();
            kept.sort_unstable();
            kept.resize(count, -1);
            blocks.extend(kept);
            let decides = count > 0 && count < complete && rules::block_is_valid(p[order[count]]);
            margin.push(if decides {
                p[order[count - 1]] - p[order[count]]
            } else {
                f32::INFINITY
            });
        }
        Self {
            rows,
            count,
            blocks,
            margin,
        }
    }
}

impl<B: Backend> SparseAttention<B> {
    /// The block selection of every query of `x` `[batch, seq, dim]` (the layer's input), with
    /// the tensor-op path's importance; `None` when nothing can be selected.
    pub fn selections(&self, x: Tensor<B, 3>) -> Option<LayerSelection> {
        let c = &self.config;
        if c.num_selected_blocks == 0 {
            return None;
        }
        let kernels = self.kernels();
        let x = self.normed(x);
        let Qkv { q, k, v } = self.qkv(&kernels, x);
        let b = q.dims()[0];
        let compressed = self.compress.compress(&kernels, k, v);
        let (ck, cv) = self.compress.with_memory(b, compressed);
        let logits = self
            .compress
            .attend(&kernels, q, ck, cv, 0, self.scale())
            .importance?;
        let probs = importance(logits, c, 0)?;
        let [b, hs, n, complete] = probs.dims();
        let host = probs.into_data().convert::<f32>().into_vec::<f32>().ok()?;
        Some(LayerSelection::from_probs(
            &host,
            b * hs * n,
            complete,
            c.num_selected_blocks,
        ))
    }
}

impl<B: Backend> Transformer<B> {
    /// The block selection of every NSA layer for `ids` `[batch, seq]` (`None` for dense layers
    /// and layers that select nothing), computed on this backend.
    pub fn selections(&self, ids: Tensor<B, 2, Int>) -> Vec<Option<LayerSelection>> {
        let kernels = self.kernels();
        let rotation = self.rotation(0, ids.dims()[1], &ids.device());
        let mut x = self.token_emb.forward(ids);
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            out.push(match &layer.attn {
                Attention::Nsa(a) => a.selections(x.clone()),
                Attention::Full(_) | Attention::Dsa(_) => None,
            });
            x = layer.forward(&kernels, x, &rotation);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_like_select_top_with_margins() {
        // row 0: blocks 2 and 0 kept, 1 left out by 0.05; row 1: only one block visible
        let probs = [0.3, 0.25, 0.4, 0.0, 0.5, 0.0];
        let s = LayerSelection::from_probs(&probs, 2, 3, 2);
        assert_eq!(s.row(0), &[0, 2]);
        assert!((s.margin[0] - 0.05).abs() < 1e-6);
        assert_eq!(s.row(1), &[1, -1]);
        assert_eq!(s.margin[1], f32::INFINITY);
    }

    #[test]
    fn ties_keep_the_lower_block() {
        let s = LayerSelection::from_probs(&[0.2, 0.2, 0.2], 1, 3, 2);
        assert_eq!(s.row(0), &[0, 1]);
        assert_eq!(s.margin[0], 0.0);
    }
}
