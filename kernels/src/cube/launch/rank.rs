//! Launch of the DSA token ranking ([`crate::cube::rank::rank_tokens`]).

use super::*;

/// A token ranking: queries at `offset..offset + n` of `b` rows over `m` keys, `top_k` kept.
#[derive(Clone, Debug)]
pub struct RankProblem {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub offset: usize,
    pub top_k: usize,
    /// [`token_positions`] lists the query's own token too (the decode step's gather), else only
    /// the others (the selected attention's blocks; the own token is its own block).
    pub own: bool,
    /// Cubes along one grid dimension at most (`0`: the device's limit).
    pub grid_limit: u32,
}

impl RankProblem {
    /// The search's scalars: tokens kept besides the own one, and the position bisection's
    /// steps (`m < 2^bits`).
    fn search(&self) -> (u32, u32) {
        let others = self.top_k.saturating_sub(1).min(u32::MAX as usize) as u32;
        (others, usize::BITS - self.m.leading_zeros())
    }

    /// Entries per row of [`token_positions`]: `min(top_k, offset + 1)` with the own token (one
    /// query per row: every one kept), else `top_k - 1` (`-1` past the kept ones).
    pub fn count(&self) -> usize {
        if self.own {
            self.top_k.min(self.offset + 1)
        } else {
            self.top_k.saturating_sub(1)
        }
    }
}

/// Most keys a ranking unit holds in registers (beyond that every pass reads the scores again).
pub const RANK_REGISTERS: usize = 32;

/// The blocked mask of `scores` `[b, n, m]` → `[b, n, m]` in `int_dtype` (1: not attended).
pub fn rank_tokens<R: CubeRuntime>(
    scores: CubeTensor<R>,
    p: &RankProblem,
    int_dtype: DType,
) -> CubeTensor<R> {
    let scores = into_contiguous(scores);
    let dtype = scores.dtype;
    let out = empty(&scores, vec![p.b, p.n, p.m], int_dtype);
    let (group, tiling) = rank_tiling(&scores, p.m);
    let rows = p.b * p.n;
    let (others, bits) = p.search();
    let client = scores.client.clone();
    // SAFETY: one cube per row (padding cubes of a folded grid end at once), every index
    // `< m` of its row; each entry of a row written by one unit.
    unsafe {
        crate::cube::rank::rank_tokens::launch_unchecked::<R>(
            &client,
            grid(&client, rows, 1, p.grid_limit),
            CubeDim::new_1d((group * group) as u32),
            scores.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            p.n,
            p.m,
            p.offset,
            others,
            bits,
            tiling,
            [dtype.into(), int_dtype.into()],
        );
    }
    out
}

/// The positions each query keeps of `scores` `[b, n, m]` (queries at `offset..offset + n`,
/// all `< m`) → `[b, n, count]` ([`RankProblem::count`]) ascending, `-1` after the last kept
/// one, in `int_dtype`.
pub fn token_positions<R: CubeRuntime>(
    scores: CubeTensor<R>,
    p: &RankProblem,
    int_dtype: DType,
) -> CubeTensor<R> {
    let scores = into_contiguous(scores);
    let dtype = scores.dtype;
    let count = p.count();
    let out = empty(&scores, vec![p.b, p.n, count], int_dtype);
    let (group, tiling) = rank_tiling(&scores, p.m);
    let (others, bits) = p.search();
    let rows = p.b * p.n;
    let client = scores.client.clone();
    // SAFETY: one cube per row (padding cubes end at once), every index `< m` of its row;
    // each of a row's `count` entries written by one unit (the one whose segment holds that
    // token, or the one of its `-1`).
    unsafe {
        crate::cube::rank::token_positions::launch_unchecked::<R>(
            &client,
            grid(&client, rows, 1, p.grid_limit),
            CubeDim::new_1d((group * group) as u32),
            scores.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            p.n,
            p.m,
            p.offset,
            count,
            u32::from(p.own),
            others,
            bits,
            tiling,
            [dtype.into(), int_dtype.into()],
        );
    }
    out
}

/// The cube's side (`group²` units: 1,024 where the device allows) and the tiling for rows of
/// `m` scores.
fn rank_tiling<R: CubeRuntime>(
    like: &CubeTensor<R>,
    m: usize,
) -> (usize, crate::cube::rank::RankTiling) {
    let big = like.client.properties().hardware.max_units_per_cube >= 1024;
    let group = if big { 32 } else { 16 };
    let per = m.div_ceil(group * group);
    let tiling = crate::cube::rank::RankTiling {
        group,
        per: if per <= RANK_REGISTERS { per } else { 0 },
    };
    (group, tiling)
}
