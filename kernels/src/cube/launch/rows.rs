//! Launches of the row kernels: a decode step's projections (norm, product, bias, GELU,
//! residual) for a few rows.

use super::*;

/// A [`crate::cube::rows::row_linear`] launch: `m` rows of `din` features into `dout` columns, with
/// the norm (its weight and epsilon), bias, GELU and residual as given.
#[derive(Clone, Debug)]
pub struct RowProblem {
    pub m: usize,
    pub din: usize,
    pub dout: usize,
    /// The RMSNorm's epsilon, when the rows are normed first.
    pub norm_eps: Option<f64>,
    pub bias: bool,
    pub gelu: bool,
    pub residual: bool,
    /// A second matrix of the same normed rows ([`row_linear_pair`]): its columns and whether
    /// it has a bias.
    pub second: Option<(usize, bool)>,
}

/// Most rows of one [`row_linear`] launch (the batch of a decode step).
pub const MAX_ROWS: usize = 8;

fn row_tiling(p: &RowProblem, budget: usize) -> Option<crate::cube::rows::RowTiling> {
    if p.m == 0 || p.m > MAX_ROWS || p.din == 0 || p.dout == 0 {
        return None;
    }
    // 256 units a cube; narrow column tiles (8 columns: 32-byte row pieces of `W`) give the
    // small matrices of a decode block more cubes than the GPU has cores, wide ones (the
    // output head's 21,128 columns) fewer redundant norms
    let cols = if p.dout + p.second.map_or(0, |(d, _)| d) >= 8192 {
        32
    } else {
        8
    };
    let t = crate::cube::rows::RowTiling {
        din: p.din,
        rows: p.m.next_power_of_two(),
        cols,
        groups: 256 / cols,
        norm: p.norm_eps.is_some(),
        bias: p.bias,
        gelu: p.gelu,
        residual: p.residual,
        pair: p.second.is_some(),
        bias2: p.second.is_some_and(|(_, b)| b),
    };
    if p.second.is_some() && (p.gelu || p.residual) {
        return None;
    }
    (t.shared() <= budget).then_some(t)
}

/// Whether [`row_linear`] covers `p` on this device.
pub fn row_supported<R: CubeRuntime>(client: &ComputeClient<R>, p: &RowProblem) -> bool {
    row_tiling(p, shared_budget(client)).is_some()
}

/// A matrix `[rows, cols]` as the row kernel reads it, with its row stride: as it is when its
/// rows are dense (CUDA allocates some matrices with padded rows, e.g. `[512, 24]` with a row
/// stride of 32 and the `[512, 21128]` output head with 21248; copying those every token cost
/// a launch each, 43 MB for the head), else a contiguous copy.
fn dense_rows<R: CubeRuntime>(w: CubeTensor<R>) -> (CubeTensor<R>, usize) {
    let (shape, strides) = (w.meta.shape(), w.meta.strides());
    if shape.len() == 2 && strides[1] == 1 && strides[0] >= shape[1] {
        let ws = strides[0];
        return (w, ws);
    }
    let w = into_contiguous(w);
    let ws = *w.meta.shape().last().expect("rank >= 1");
    (w, ws)
}

/// `act(norm(x) · w + bias) + residual`: `x` `[m, din]`, `norm_w` `[din]`, `w` `[din, dout]`,
/// `bias` `[dout]`, `residual` `[m, dout]` (absent ones `None`) → `[m, dout]`.
pub fn row_linear<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm_w: Option<CubeTensor<R>>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    p: &RowProblem,
) -> CubeTensor<R> {
    row_linear_pair(x, norm_w, w, bias, residual, None, p).0
}

/// [`row_linear`], and with `second = (w2 [din, dout2], bias2)` also `norm(x) · w2 + bias2`
/// `[m, dout2]` in the same launch (`p.second` gives its sizes).
#[allow(clippy::type_complexity)]
pub fn row_linear_pair<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm_w: Option<CubeTensor<R>>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    second: Option<(CubeTensor<R>, Option<CubeTensor<R>>)>,
    p: &RowProblem,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    let (x, (w, ws)) = (into_contiguous(x), dense_rows(w));
    let dtype = x.dtype;
    let t = row_tiling(p, shared_budget(&x.client)).expect("checked by `row_supported`");
    let some =
        |o: Option<CubeTensor<R>>| o.map(into_contiguous).unwrap_or_else(|| dummy(&x, dtype));
    let (norm_w, bias, residual) = (some(norm_w), some(bias), some(residual));
    let mut shape = x.meta.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = p.dout;
    let out = empty(&x, shape.clone(), dtype);
    let dout2 = p.second.map_or(0, |(d, _)| d);
    let (w2, ws2, bias2, out2) = match second {
        Some((w2, bias2)) => {
            let (w2, ws2) = dense_rows(w2);
            *shape.last_mut().expect("rank >= 1") = dout2;
            (w2, ws2, some(bias2), Some(empty(&x, shape, dtype)))
        }
        None => (dummy(&x, dtype), 0, dummy(&x, dtype), None),
    };
    let out2_arg = out2.clone().unwrap_or_else(|| dummy(&x, dtype));
    let client = x.client.clone();
    // SAFETY: rows `< m`, columns `< dout` (`< dout2` of the second), features `< din`, as the
    // shapes given.
    unsafe {
        crate::cube::rows::row_linear::launch_unchecked::<R>(
            &client,
            CubeCount::Static((p.dout + dout2).div_ceil(t.cols) as u32, 1, 1),
            CubeDim::new_1d(t.threads() as u32),
            x.into_tensor_arg(),
            norm_w.into_tensor_arg(),
            w.into_tensor_arg(),
            bias.into_tensor_arg(),
            residual.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            w2.into_tensor_arg(),
            bias2.into_tensor_arg(),
            out2_arg.into_tensor_arg(),
            p.m,
            p.dout,
            ws,
            dout2,
            ws2,
            p.din as f32,
            p.norm_eps.unwrap_or(0.0) as f32,
            t,
            dtype.into(),
        );
    }
    (out, out2)
}
