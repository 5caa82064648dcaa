//! Small tensor helpers shared by the branches (host-built masks and indices, padding, windows).

use burn::prelude::*;

/// A boolean tensor from host values.
pub fn bool_tensor<B: Backend, const D: usize>(
    values: Vec<bool>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Bool> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// An integer tensor from host values.
pub fn int_tensor<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// A `[rows, cols]` mask built on the device, `true` where `col_values[j] > row_values[i]`.
/// Only the two vectors cross the host-device boundary; the `rows × cols` comparison runs on the
/// device (a host-built mask of a 64k-token causal attention is gigabytes).
pub fn greater_mask<B: Backend>(
    row_values: Vec<i64>,
    col_values: Vec<i64>,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let (rows, cols) = broadcast_pair::<B>(row_values, col_values, device);
    cols.greater(rows)
}

/// As [`greater_mask`], `true` where `col_values[j] == row_values[i]`.
pub fn equal_mask<B: Backend>(
    row_values: Vec<i64>,
    col_values: Vec<i64>,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let (rows, cols) = broadcast_pair::<B>(row_values, col_values, device);
    cols.equal(rows)
}

/// The row values as a column and the column values as a row, both expanded to
/// `[rows, cols]` (views, nothing copied).
fn broadcast_pair<B: Backend>(
    row_values: Vec<i64>,
    col_values: Vec<i64>,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let (r, c) = (row_values.len(), col_values.len());
    (
        int_tensor::<B, 2>(row_values, [r, 1], device).expand([r, c]),
        int_tensor::<B, 2>(col_values, [1, c], device).expand([r, c]),
    )
}

/// Pads dimension `dim` of `x` with `before` zeros in front and `after` zeros behind.
pub fn pad_zeros<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
    before: usize,
    after: usize,
) -> Tensor<B, D> {
    if before == 0 && after == 0 {
        return x;
    }
    let mut parts = Vec::with_capacity(3);
    let device = x.device();
    let mut shape = x.dims();
    if before > 0 {
        shape[dim] = before;
        parts.push(Tensor::zeros(shape, &device));
    }
    parts.push(x);
    if after > 0 {
        shape[dim] = after;
        parts.push(Tensor::zeros(shape, &device));
    }
    Tensor::cat(parts, dim)
}

/// Overlapping windows along the sequence axis: `x` `[b, h, n, d]` → `[b, h, count, size, d]`
/// where window `w` holds rows `w * step .. w * step + size` (which must exist).
pub fn windows<B: Backend>(
    x: Tensor<B, 4>,
    size: usize,
    step: usize,
    count: usize,
) -> Tensor<B, 5> {
    let [b, h, n, d] = x.dims();
    if size == step && count * size == n {
        return x.reshape([b, h, count, size, d]);
    }
    if size == step {
        return x.narrow(2, 0, count * size).reshape([b, h, count, size, d]);
    }
    if size.is_multiple_of(step) {
        // window w = rows of the `size / step` consecutive step-blocks w, w + 1, ..: each
        // shifted block view is a plain reshape, and their backward is a pad, not the scatter-add
        // of `select` (which took 100 ms per layer at 64k tokens on an H100)
        let parts: Vec<Tensor<B, 5>> = (0..size / step)
            .map(|s| {
                x.clone()
                    .narrow(2, s * step, count * step)
                    .reshape([b, h, count, step, d])
            })
            .collect();
        return Tensor::cat(parts, 3);
    }
    let idx: Vec<i64> = (0..count)
        .flat_map(|w| (0..size).map(move |t| (w * step + t) as i64))
        .collect();
    let idx = int_tensor::<B, 1>(idx, [count * size], &x.device());
    x.select(2, idx).reshape([b, h, count, size, d])
}

/// Rounds `n` up to a multiple of `m`.
pub fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// Every window equals the rows it names, for each way `windows` builds them (plain
    /// reshape, shifted step-blocks, index select).
    #[test]
    fn windows_hold_the_rows_they_name() {
        let device = Default::default();
        let (n, d) = (29, 3);
        let values: Vec<f32> = (0..2 * n * d).map(|i| i as f32).collect();
        let x = Tensor::<NdArray, 1>::from_floats(values.as_slice(), &device).reshape([1, 2, n, d]);
        for (size, step) in [(4, 4), (8, 4), (12, 4), (6, 4), (5, 2)] {
            let count = (n - size) / step + 1;
            let w = windows(x.clone(), size, step, count);
            assert_eq!(w.dims(), [1, 2, count, size, d]);
            for i in 0..count {
                let want = x.clone().narrow(2, i * step, size);
                let got = w.clone().narrow(2, i, 1).reshape([1, 2, size, d]);
                let diff = (got - want).abs().max().into_scalar();
                assert_eq!(diff, 0.0, "size {size} step {step} window {i}");
            }
        }
    }
}
