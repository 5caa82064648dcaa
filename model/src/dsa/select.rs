//! Which tokens the global branch of each query attends to.
//!
//! The rule is [`crate::kernels::rules::dsa_selected_tokens`] (one place for the host path and
//! the device ranking); `selected_positions` is its name here.
//!
//! Dimensions: `b` batch, `n` queries, `m` keys.

use burn::prelude::*;

use crate::kernels::Kernels;
use crate::tensor_util::{bool_tensor, int_tensor};

pub use crate::kernels::rules::dsa_selected_tokens as selected_positions;

/// Scores `[b, n, m]` read back in f64 (which holds every float type exactly).
fn on_host<B: Backend>(scores: Tensor<B, 3>) -> Vec<f64> {
    scores
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("f64 data after convert")
}

/// The keys each query may not attend to in the global branch: `scores` `[b, n, m]` of the
/// queries at positions `offset..offset + n` over the keys `0..m` → `[b, n, m]`, `true` = not
/// selected (or in the future). Ranked by the fused kernels where `kernels` has them (no host
/// round trip), else on the host.
pub fn blocked<B: Backend>(
    kernels: &Kernels<B>,
    scores: Tensor<B, 3>,
    offset: usize,
    top_k: usize,
) -> Tensor<B, 3, Bool> {
    if let Some(fused) = kernels.fused() {
        if let Some(blocked) = fused.token_blocked(&scores, offset, top_k) {
            return blocked;
        }
    }
    let [b, n, m] = scores.dims();
    let device = scores.device();
    let host = on_host(scores);
    let mut blocked = vec![true; b * n * m];
    for (row, (scores, out)) in host
        .chunks_exact(m)
        .zip(blocked.chunks_exact_mut(m))
        .enumerate()
    {
        let position = offset + row % n;
        for s in selected_positions(scores, position, top_k) {
            if s < m {
                out[s] = false;
            }
        }
    }
    bool_tensor(blocked, [b, n, m], &device)
}

/// The positions one query per batch row selects: `scores` `[b, 1, m]` of the query at
/// `position` over the keys `0..m` → `[b, count]`, ascending, `count = min(top_k, position +
/// 1)` (the decode step gathers these keys). Ranked by the fused kernels where `kernels` has
/// them, else on the host.
pub fn gathered<B: Backend>(
    kernels: &Kernels<B>,
    scores: Tensor<B, 3>,
    position: usize,
    top_k: usize,
) -> Tensor<B, 2, Int> {
    if let Some(fused) = kernels.fused() {
        if let Some(positions) = fused.token_positions(&scores, position, top_k) {
            return positions;
        }
    }
    let [b, n, m] = scores.dims();
    assert_eq!(n, 1, "one query per row");
    let device = scores.device();
    let host = on_host(scores);
    let count = top_k.min(position + 1);
    let mut positions = Vec::with_capacity(b * count);
    for row in host.chunks_exact(m) {
        let mut chosen = selected_positions(row, position, top_k);
        chosen.sort_unstable();
        positions.extend(chosen.into_iter().map(|p| p as i64));
    }
    int_tensor(positions, [b, count], &device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_token_then_the_highest_scores_then_the_earlier_of_ties() {
        let scores = [0.5, 2.0, 0.5, 9.0, -1.0, 7.0];
        let mut got = selected_positions(&scores, 4, 3);
        got.sort();
        // position 4 (own, its score ignored), then 3 (9.0); of the others 1 (2.0)
        assert_eq!(got, vec![1, 3, 4]);
        // ties: 0 and 2 score 0.5; the earlier one wins
        let mut got = selected_positions(&scores, 3, 3);
        got.sort();
        assert_eq!(got, vec![0, 1, 3]);
        // a short prefix is selected whole, the future never
        let mut got = selected_positions(&scores, 2, 8);
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(selected_positions(&scores, 5, 1), vec![5]);
        // −0 ties with +0 (the earlier wins); NaN ranks last
        let mut got = selected_positions(&[-0.0, 0.0, 5.0], 3, 3);
        got.sort();
        assert_eq!(got, vec![0, 2, 3]);
        let mut got = selected_positions(&[f64::NAN, 1.0, 2.0], 3, 3);
        got.sort();
        assert_eq!(got, vec![1, 2, 3]);
    }
}
