//! Small tensor helpers shared by the branches (host-built masks and indices, padding, windows).

use burn::nn::Linear;
use burn::prelude::*;

use crate::kernels::{Kernels, Projection, RowLinear};
use crate::norm::RmsNorm;

/// `x = hi + lo` with `hi` holding the leading 11 significant bits of `x` (exact in TF32) and
/// `lo` the rest, both exact in f32 (Veltkamp's split with the constant 2^13 + 1).
///
/// `γ = 2^13·x + x` rather than `8193·x`: where a backend fuses these element-wise ops into one
/// kernel, its compiler may contract `8193·x − x` into one fused multiply-add, whose unrounded
/// product breaks the split; `2^13·x` is exact, so a contraction of it changes nothing.
fn split_tf32<B: Backend, const D: usize>(x: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
    let gamma = x.clone().mul_scalar(8192.0) + x.clone();
    let hi = gamma.clone() - (gamma - x.clone());
    let lo = x - hi.clone();
    (hi, lo)
}

/// `a.matmul(b)`, f32-exact when the options ask for it (`exact_matmul`): Burn's CUDA matmul
/// (and wgpu's on GPUs with cooperative matrices) stages f32 operands as TF32 (10-bit
/// mantissa), which moves the seed model's logits by ~2e-3 against the CPU; exact, each
/// operand is split into an 11-bit head that TF32 holds exactly and a tail (Veltkamp), and
/// `a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi` restores f32 accuracy at three matmuls' cost. Off
/// by default (as PyTorch's `allow_tf32`); `nsa-infer compare` and `--exact-matmul` turn it on.
pub fn matmul<B: Backend, const D: usize>(
    kernels: &Kernels<B>,
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Tensor<B, D> {
    if !kernels.options().exact_matmul {
        return a.matmul(b);
    }
    let (a_hi, a_lo) = split_tf32(a);
    let (b_hi, b_lo) = split_tf32(b);
    a_hi.clone().matmul(b_hi.clone()) + a_hi.matmul(b_lo) + a_lo.matmul(b_hi)
}

/// `layer.forward(x)` through [`matmul`]: `[..., d_in]` → `[..., d_out]`. A single row (a
/// decode step) goes to the backend's [`NsaKernels::linear_row`] where one is registered.
///
/// [`NsaKernels::linear_row`]: crate::kernels::NsaKernels::linear_row
pub fn linear<B: Backend, const D: usize>(
    kernels: &Kernels<B>,
    layer: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let exact = kernels.options().exact_matmul;
    if !exact && dims[..D - 1].iter().all(|&n| n == 1) {
        if let Some(fused) = kernels.fused().filter(|k| k.has_linear_row()) {
            let row = x.clone().reshape([1, dims[D - 1]]);
            let bias = layer.bias.as_ref().map(|b| b.val());
            if let Some(y) = fused.linear_row(&layer.weight.val(), bias.as_ref(), &row) {
                let mut out = dims;
                out[D - 1] = y.dims()[1];
                return y.reshape(out);
            }
        }
    }
    if !exact {
        return batched_rows(kernels, x, |x| layer.forward(x));
    }
    let out = matmul(kernels, x, layer.weight.val().unsqueeze());
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze(),
        None => out,
    }
}

/// `f(x)` for a row-wise `f` (`[..., d_in]` → `[..., d_out]`), with the rows of `x` cut into
/// batches of [`KernelOptions::projection_rows`] (`[rows / r, r, d_in]`) where they are a
/// multiple of it and at least twice as many: the same result, but a projection's weight
/// gradient becomes a batch of products over `r` rows each, summed, instead of one product over
/// every row (Burn's CUDA matmul gave that one product, `[1024, 65536] · [65536, 1024]`, about
/// 12 TFLOP/s: its output has too few tiles for the GPU's cubes).
///
/// [`KernelOptions::projection_rows`]: crate::kernels::KernelOptions::projection_rows
fn batched_rows<B: Backend, const D: usize>(
    kernels: &Kernels<B>,
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let r = kernels.options().projection_rows;
    let y = if r > 0 && rows >= 2 * r && rows.is_multiple_of(r) {
        f(x.reshape([rows / r, r, dims[D - 1]]))
    } else if D == 3 {
        // as given: a batch of sequences is already a batch of products
        f(x.reshape([dims[0], dims[1], dims[2]]))
    } else {
        f(x.reshape([1, rows, dims[D - 1]]))
    };
    let mut out = dims;
    out[D - 1] = y.dims()[2];
    y.reshape(out)
}

/// `act(norm(x) · W + bias) + residual` for `x` `[batch, seq, d_in]`: one registered kernel
/// for the few rows of a decode step ([`crate::kernels::NsaKernels::row_linear`]), else
/// [`RmsNorm::forward`], [`linear`], GELU and an add.
pub fn norm_linear<B: Backend>(
    kernels: &Kernels<B>,
    norm: Option<&RmsNorm<B>>,
    layer: &Linear<B>,
    x: Tensor<B, 3>,
    gelu: bool,
    residual: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    if let Some(fused) = kernels.fused() {
        let row_norm = norm.map(RmsNorm::row_norm);
        let spec = RowLinear {
            norm: row_norm.as_ref(),
            layer: &Projection::of(layer),
            gelu,
            residual: residual.as_ref(),
        };
        if let Some(y) = fused.row_linear(&x, &spec) {
            return y;
        }
    }
    let x = match norm {
        Some(norm) => norm.forward(x),
        None => x,
    };
    let mut y = linear(kernels, layer, x);
    if gelu {
        y = self::gelu(y);
    }
    match residual {
        Some(r) => y + r,
        None => y,
    }
}

/// GELU with the exact (erf) form, `x · Φ(x) = x · (1 + erf(x / √2)) / 2`, as PyTorch's
/// `nn.GELU()` (the reference's feed-forward), built from tensor ops so that autodiff takes its
/// exact derivative `Φ(x) + x · φ(x)`. Burn 0.21's `activation::gelu` computes this forward
/// but differentiates the tanh approximation (`gelu_backward`), which put every gradient below
/// the first feed-forward 3e-4 to 1e-3 (relative) away from the reference's.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let phi = x
        .clone()
        .mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * phi
}

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

/// Per-position values `x` `[b, n, h]` as `[b, h, n, 1]` (one per head, broadcast over a head's
/// features). With one position (a decode step) a reshape, which is the same layout: Burn
/// 0.21's fused wgpu kernels read a swap of a length-1 axis followed by a reshape or an
/// unsqueeze with another batch row's values (found by `model/tests/wgpu_dsa.rs`).
pub fn heads_first<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 4> {
    let [b, n, h] = x.dims();
    if n == 1 {
        x.reshape([b, h, 1, 1])
    } else {
        x.swap_dims(1, 2).reshape([b, h, n, 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// erf by its Taylor series, in f64 (exact to ~1e-15 for |x| ≤ 2.2, the range used).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..80 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// [`gelu`]'s gradient is the analytic derivative `Φ(x) + x·φ(x)` (computed on the host in
    /// f64), where Burn 0.21's `activation::gelu` is off by up to 1e-3. The gradients are taken
    /// in f32, the element every backend trains in.
    #[test]
    fn gelu_gradient_is_exact() {
        type B = burn::backend::Autodiff<NdArray>;
        let device = Default::default();
        let xs: Vec<f64> = (0..61).map(|i| -3.0 + 0.1 * i as f64).collect();
        let grad_of = |burns: bool| -> Vec<f64> {
            let values: Vec<f32> = xs.iter().map(|&v| v as f32).collect();
            let x = Tensor::<B, 1>::from_floats(values.as_slice(), &device).require_grad();
            let y = if burns {
                burn::tensor::activation::gelu(x.clone())
            } else {
                gelu(x.clone())
            };
            let grads = y.sum().backward();
            let data = x.grad(&grads).unwrap().into_data().convert::<f64>();
            data.to_vec::<f64>().unwrap()
        };
        let (ours, burns) = (grad_of(false), grad_of(true));
        let mut burn_worst = 0.0f64;
        for (i, &v) in xs.iter().enumerate() {
            let cdf = 0.5 * (1.0 + erf_series(v * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let exact = cdf + v * pdf;
            assert!(ours[i].is_finite(), "x = {v}: {}", ours[i]);
            assert!(
                (ours[i] - exact).abs() < 1e-6,
                "x = {v}: {} vs {exact}",
                ours[i]
            );
            burn_worst = burn_worst.max((burns[i] - exact).abs());
        }
        // the reason for our own: Burn's derivative is the tanh approximation's
        assert!(
            burn_worst > 1e-4,
            "Burn's gelu gradient is exact now ({burn_worst:.1e})"
        );
    }

    /// The split matmul equals the plain one (on the CPU both are f32), and the split is exact.
    #[test]
    fn exact_matmul_equals_matmul_and_the_split_is_exact() {
        let device = Default::default();
        let vals = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.7 + seed).sin() * 3.1)
                .collect()
        };
        let a = Tensor::<NdArray, 1>::from_floats(vals(2 * 5 * 7, 0.3).as_slice(), &device)
            .reshape([2, 5, 7]);
        let b = Tensor::<NdArray, 1>::from_floats(vals(7 * 3, 1.9).as_slice(), &device)
            .reshape([1, 7, 3]);
        let (hi, lo) = split_tf32(a.clone());
        let back = (hi.clone() + lo).sub(a.clone()).abs().max().into_scalar();
        assert_eq!(back, 0.0);
        // the head keeps at most 11 significant bits
        for v in hi.into_data().to_vec::<f32>().unwrap() {
            assert_eq!(v.to_bits() & 0x1fff, 0, "{v}");
        }
        let plain = a.clone().matmul(b.clone());
        let options = crate::kernels::KernelOptions {
            exact_matmul: true,
            ..Default::default()
        };
        let exact = matmul(&Kernels::new(&options), a, b);
        let diff = (exact - plain).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    /// A projection over rows cut into batches ([`batched_rows`]) gives the output and the
    /// weight, bias and input gradients of the projection over all rows at once (an
    /// independent sum order, so within f32 rounding); rows that do not divide stay whole.
    #[test]
    fn batched_projection_rows_change_nothing_but_the_sum_order() {
        type B = burn::backend::Autodiff<NdArray>;
        let device = Default::default();
        let layer = burn::nn::LinearConfig::new(6, 5).init::<B>(&device);
        let run = |rows: usize, n: usize| {
            let options = crate::kernels::KernelOptions {
                projection_rows: rows,
                ..Default::default()
            };
            let values: Vec<f32> = (0..2 * n * 6).map(|i| (i as f32 * 0.37).sin()).collect();
            let x = Tensor::<B, 1>::from_floats(values.as_slice(), &device)
                .reshape([2, n, 6])
                .require_grad();
            let y = linear(&Kernels::new(&options), &layer, x.clone());
            assert_eq!(y.dims(), [2, n, 5]);
            let w: Vec<f32> = (0..2 * n * 5).map(|i| (i as f32 * 0.11).cos()).collect();
            let w = Tensor::<B, 1>::from_floats(w.as_slice(), &device).reshape([2, n, 5]);
            let grads = (y.clone() * w).sum().backward();
            let flat = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
            [
                flat(y.inner().reshape([2 * n, 5])),
                flat(x.grad(&grads).unwrap().reshape([2 * n, 6])),
                flat(layer.weight.val().grad(&grads).unwrap()),
                flat(
                    layer
                        .bias
                        .as_ref()
                        .unwrap()
                        .val()
                        .grad(&grads)
                        .unwrap()
                        .reshape([1, 5]),
                ),
            ]
        };
        // 2 × 24 rows in batches of 8 (6 batches), and 2 × 25 rows (50 is no multiple of 8)
        for n in [24, 25] {
            let (cut, whole) = (run(8, n), run(0, n));
            for (what, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(cut.iter().zip(&whole)) {
                assert_eq!(a.len(), b.len());
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= 1e-5 * (1.0 + v.abs()),
                        "{what} n {n}: {u} {v}"
                    );
                }
            }
        }
    }

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
