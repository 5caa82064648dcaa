//! Matrix-vector products for decoding on Burn's `flex` CPU backend.
//!
//! A decode step multiplies one row by every weight matrix of the model. Burn's `flex` matmul
//! hands that to `gemm`, which runs shapes below 192³ multiply-adds on one thread: every
//! projection of the seed model (512 × 1536, 512 × 2048, …) is such a shape, so a step read
//! about 75 MB of layer weights on one core while the other waited. Here `y = x · W + b` for
//! one row `x` `[1, d_in]` and `W` `[d_in, d_out]` (Burn's `Linear` layout, row-major) is
//! split into column blocks over Rayon's threads; each block streams its slice of every weight
//! row once, four rows at a time, into accumulators that stay in L1. The sum over `d_in` runs
//! in index order, as a plain loop would; on x86-64 the loop is compiled once more with AVX2
//! and FMA and chosen at run time.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use self::decode::{decode_attention, DecodeData};
use self::prefill::{PrefillOut, PrefillShape};
use crate::api::{DecodeInputs, DecodeShape, NsaKernels, RowLinear, Selection};
use crate::dispatch::write_rows_with_slice_assign;
use crate::options::KernelOptions;
use crate::rules::SparseSizes;

mod decode;
mod prefill;

/// The `flex` implementation of [`NsaKernels`]: the decode step's projections
/// ([`NsaKernels::linear_row`], [`NsaKernels::row_linear`]), cache writes
/// ([`NsaKernels::write_rows`], [`NsaKernels::decode_write`]) and attention
/// ([`NsaKernels::decode_attention`]).
pub struct FlexKernels;

fn flex_kernels(_: &KernelOptions) -> Arc<dyn NsaKernels<Flex>> {
    Arc::new(FlexKernels)
}

/// Registers [`FlexKernels`] for `Flex` (f32). Idempotent.
pub fn register_flex() {
    crate::dispatch::register::<Flex>(flex_kernels);
}

/// Below this many weights a product runs on the calling thread (a Rayon dispatch costs
/// microseconds; 64k weights take about as long to read).
const PARALLEL_MIN: usize = 1 << 16;

fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

fn float<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    contiguous(t.into_primitive().tensor())
}

fn flex_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    let t = FlexTensor::from_data(TensorData::new(values, shape));
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

impl NsaKernels<Flex> for FlexKernels {
    /// In place when the buffer is not shared: `flex`'s `slice_assign` copies the whole buffer
    /// (its `to_contiguous` keeps a second reference, so the copy-on-write always copies),
    /// which made every decoded token copy every layer's key/value cache.
    fn write_rows(
        &self,
        buffer: Tensor<Flex, 4>,
        start: usize,
        rows: Tensor<Flex, 4>,
    ) -> Tensor<Flex, 4> {
        let src = contiguous(rows.clone().into_primitive().tensor());
        match write_in_place(buffer.into_primitive().tensor(), start, &src) {
            Ok(t) => Tensor::from_primitive(TensorPrimitive::Float(t)),
            Err(t) => write_rows_with_slice_assign(
                Tensor::from_primitive(TensorPrimitive::Float(t)),
                start,
                rows,
            ),
        }
    }

    fn has_linear_row(&self) -> bool {
        true
    }

    fn linear_row(
        &self,
        weight: &Tensor<Flex, 2>,
        bias: Option<&Tensor<Flex, 1>>,
        x: &Tensor<Flex, 2>,
    ) -> Option<Tensor<Flex, 2>> {
        let [d_in, d_out] = weight.dims();
        if x.dims() != [1, d_in] {
            return None;
        }
        let w = float(weight.clone());
        let xs = float(x.clone());
        let b = bias.map(|b| contiguous(b.clone().into_primitive().tensor()));
        let x = xs.as_slice::<f32>()?;
        let bias = match &b {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        let out = matvec(x, w.as_slice::<f32>()?, bias, d_out);
        let out = FlexTensor::from_data(TensorData::new(out, [1, d_out]));
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// One row: RMSNorm, the matrix-vector product, GELU and the residual without a tensor op.
    fn row_linear(
        &self,
        x: &Tensor<Flex, 3>,
        spec: &RowLinear<'_, Flex>,
    ) -> Option<Tensor<Flex, 3>> {
        let [b, n, d_in] = x.dims();
        let w = float(spec.layer.weight.clone());
        let [w_in, d_out] = w.layout().shape().dims::<2>();
        if b * n != 1 || w_in != d_in || x.dtype() != DType::F32 {
            return None;
        }
        let xs = float(x.clone());
        let mut row = xs.as_slice::<f32>()?.to_vec();
        if let Some(norm) = spec.norm {
            // x / sqrt(mean(x²) + eps) * weight, as `norm::RmsNorm`
            let nw = float(norm.weight.clone());
            let nw = nw.as_slice::<f32>()?;
            let mean = row.iter().map(|v| v * v).sum::<f32>() / d_in as f32;
            let rms = (mean + norm.eps as f32).sqrt();
            row.iter_mut().zip(nw).for_each(|(v, w)| *v = *v / rms * w);
        }
        let bias = spec.layer.bias.clone().map(float);
        let bias = match &bias {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        let mut out = matvec(&row, w.as_slice::<f32>()?, bias, d_out);
        if spec.gelu {
            let sqrt2 = std::f32::consts::SQRT_2;
            out.iter_mut()
                .for_each(|v| *v = 0.5 * *v * (1.0 + burn_flex::ops::unary::erf_f32(*v / sqrt2)));
        }
        if let Some(r) = spec.residual {
            let r = float(r.clone());
            out.iter_mut()
                .zip(r.as_slice::<f32>()?)
                .for_each(|(v, r)| *v += r);
        }
        Some(flex_tensor(out, [b, n, d_out]))
    }

    fn decode_write(
        &self,
        qkv: &Tensor<Flex, 3>,
        cos: &Tensor<Flex, 4>,
        sin: &Tensor<Flex, 4>,
        buffers: [Tensor<Flex, 4>; 4],
        heads: usize,
        pos: usize,
        slot: usize,
    ) -> Result<[Tensor<Flex, 4>; 4], [Tensor<Flex, 4>; 4]> {
        let [b, _, width] = qkv.dims();
        let [_, kvh, _, d] = buffers[0].dims();
        if qkv.dtype() != DType::F32 || d % 2 != 0 || width != (heads + 2 * kvh) * d {
            return Err(buffers);
        }
        let (qkv, cos, sin) = (float(qkv.clone()), float(cos.clone()), float(sin.clone()));
        let (Some(row), Some(cos), Some(sin)) = (
            qkv.as_slice::<f32>(),
            cos.as_slice::<f32>(),
            sin.as_slice::<f32>(),
        ) else {
            return Err(buffers);
        };
        // `[b, kvh, 1, d]` keys (rotated and not) and values of the position
        let (mut k, mut k_rot, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for bi in 0..b {
            for head in 0..kvh {
                let kcol = bi * width + (heads + head) * d;
                let vcol = bi * width + (heads + kvh + head) * d;
                for i in 0..d {
                    let x = row[kcol + i];
                    k.push(x);
                    k_rot.push(x * cos[i] + row[kcol + (i ^ 1)] * sin[i]);
                    v.push(row[vcol + i]);
                }
            }
        }
        let rows = [k_rot, v.clone(), k, v]
            .map(|r| FlexTensor::from_data(TensorData::new(r, [b, kvh, 1, d])));
        let starts = [pos, pos, slot, slot];
        let mut out = buffers.map(|t| Some(t.into_primitive().tensor()));
        for i in 0..4 {
            let buf = out[i].take().expect("each once");
            // in place where nothing else holds the buffer, else Burn's copy
            let written = write_in_place(buf, starts[i], &rows[i]).unwrap_or_else(|buf| {
                let buf = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(buf));
                let r = Tensor::from_primitive(TensorPrimitive::Float(rows[i].clone()));
                write_rows_with_slice_assign(buf, starts[i], r)
                    .into_primitive()
                    .tensor()
            });
            out[i] = Some(written);
        }
        Ok(out.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t.expect("written")))))
    }

    /// A prefill's compressed branch and selection, row by row ([`prefill`]): the tensor ops
    /// form `seq × blocks` scores, masks and probabilities, in chunks.
    fn compressed_and_selection(
        &self,
        q: &Tensor<Flex, 4>,
        ck: &Tensor<Flex, 4>,
        cv: &Tensor<Flex, 4>,
        start: usize,
        num_mem: usize,
        sizes: &SparseSizes,
        scale: f64,
    ) -> Option<(Tensor<Flex, 4>, Option<Selection<Flex>>)> {
        let [b, h, n, d] = q.dims();
        let [kb, kvh, slots, kd] = ck.dims();
        let fits = (kb, kvh, kd) == (b, sizes.kv_heads, d)
            && ck.dims() == cv.dims()
            && h == sizes.heads
            && d == sizes.dim_head
            && sizes.kv_heads > 0
            && h % sizes.kv_heads == 0
            // a query before every block would see no slot at all
            && num_mem >= 1
            && slots >= num_mem
            && [q.dtype(), ck.dtype(), cv.dtype()] == [DType::F32; 3];
        if !fits {
            return None;
        }
        let (qt, kt, vt) = (float(q.clone()), float(ck.clone()), float(cv.clone()));
        let p = PrefillShape {
            b,
            n,
            start,
            slots,
            mem: num_mem,
            sizes: *sizes,
            scale: scale as f32,
        };
        let PrefillOut {
            out,
            count,
            indices,
            scores,
            valid,
        } = prefill::compressed_and_selection(&p, qt.as_slice()?, kt.as_slice()?, vt.as_slice()?);
        let device = q.device();
        let shape = [b, sizes.selection_heads(), n, count];
        let selection = (count > 0).then(|| Selection {
            indices: Tensor::from_data(TensorData::new(indices, shape), &device),
            scores: flex_tensor(scores, shape),
            valid: Tensor::from_data(TensorData::new(valid, shape), &device),
        });
        Some((flex_tensor(out, [b, h, n, d]), selection))
    }

    fn decode_attention(&self, s: &DecodeInputs<'_, Flex>) -> Option<Tensor<Flex, 3>> {
        let p = DecodeShape::of(s)?;
        if s.qkv.dtype() != DType::F32 {
            return None;
        }
        let (ck, cv) = (s.compressed.k, s.compressed.v);
        let (k, v) = (s.kv.k, s.kv.v);
        let gates = (s.gate_logits)();
        let tensors = [
            float(s.qkv.clone()),
            float(s.cos.clone()),
            float(s.sin.clone()),
            float(ck.clone()),
            float(cv.clone()),
            float(k.clone()),
            float(v.clone()),
            float(gates),
        ];
        let [qkv, cos, sin, ck, cv, k, v, gates] = tensors.each_ref().map(|t| t.as_slice::<f32>());
        let data = DecodeData {
            qkv: qkv?,
            cos: cos?,
            sin: sin?,
            ck: ck?,
            cv: cv?,
            k: k?,
            v: v?,
            gates: gates?,
        };
        Some(flex_tensor(
            decode_attention(&p, &data),
            [p.b, 1, p.h * p.d],
        ))
    }
}

/// Writes `rows` `[b, h, n, d]` into rows `start..start + n` of `buffer` `[b, h, cap, d]`
/// (both contiguous f32, `buffer` not shared); gives `buffer` back untouched otherwise.
fn write_in_place(
    mut buffer: FlexTensor,
    start: usize,
    rows: &FlexTensor,
) -> Result<FlexTensor, FlexTensor> {
    let (bs, rs) = (buffer.layout().shape(), rows.layout().shape());
    let fits = bs.num_dims() == 4
        && rs.num_dims() == 4
        && (bs[0], bs[1], bs[3]) == (rs[0], rs[1], rs[3])
        && start + rs[2] <= bs[2]
        && buffer.dtype() == DType::F32
        && buffer.is_contiguous()
        && buffer.layout().start_offset() == 0;
    let Some(src) = rows.as_slice::<f32>().filter(|_| fits) else {
        return Err(buffer);
    };
    let (cap, n, d) = (bs[2], rs[2], rs[3]);
    let Some(dst) = buffer.try_storage_mut::<f32>() else {
        return Err(buffer);
    };
    for (i, chunk) in src.chunks_exact(n * d).enumerate() {
        let at = (i * cap + start) * d;
        dst[at..at + n * d].copy_from_slice(chunk);
    }
    Ok(buffer)
}

/// `x · W + bias` for `x` `[d_in]`, `W` `[d_in, d_out]` row-major → `[d_out]`.
pub fn matvec(x: &[f32], w: &[f32], bias: Option<&[f32]>, d_out: usize) -> Vec<f32> {
    assert_eq!(w.len(), x.len() * d_out, "matvec: weight shape");
    let mut out = match bias {
        Some(b) => b.to_vec(),
        None => vec![0.0; d_out],
    };
    if w.len() < PARALLEL_MIN {
        columns(x, w, d_out, 0, &mut out);
        return out;
    }
    // about four blocks per thread, whole cache lines, at most 512 columns (2 KiB of sums)
    let threads = rayon::current_num_threads().max(1);
    let block = (d_out.div_ceil(threads * 4).div_ceil(16) * 16).clamp(16, 512);
    out.par_chunks_mut(block)
        .enumerate()
        .for_each(|(i, o)| columns(x, w, d_out, i * block, o));
    out
}

/// Adds `x · W[:, j0..j0 + out.len()]` to `out`.
fn columns(x: &[f32], w: &[f32], d_out: usize, j0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled with.
        unsafe { columns_avx2(x, w, d_out, j0, out) };
        return;
    }
    columns_plain(x, w, d_out, j0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2(x: &[f32], w: &[f32], d_out: usize, j0: usize, out: &mut [f32]) {
    columns_plain(x, w, d_out, j0, out);
}

#[inline(always)]
fn columns_plain(x: &[f32], w: &[f32], d_out: usize, j0: usize, out: &mut [f32]) {
    let n = out.len();
    let row = |i: usize| &w[i * d_out + j0..i * d_out + j0 + n];
    let mut i = 0;
    while i + 4 <= x.len() {
        let (x0, x1, x2, x3) = (x[i], x[i + 1], x[i + 2], x[i + 3]);
        let (r0, r1, r2, r3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
        for j in 0..n {
            out[j] = out[j] + x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j];
        }
        i += 4;
    }
    while i < x.len() {
        let (xi, r) = (x[i], row(i));
        for j in 0..n {
            out[j] += xi * r[j];
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, d_out: usize) -> Vec<f64> {
        (0..d_out)
            .map(|j| {
                let b = bias.map_or(0.0, |b| b[j] as f64);
                b + x
                    .iter()
                    .enumerate()
                    .map(|(i, &xi)| xi as f64 * w[i * d_out + j] as f64)
                    .sum::<f64>()
            })
            .collect()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // a small LCG: the values only need to be varied
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_for_odd_shapes() {
        // small (one thread) and large (column blocks, a ragged last block, d_in % 4 != 0)
        for (d_in, d_out) in [(3, 5), (7, 1), (515, 1000), (130, 2053)] {
            let x = values(d_in, 1);
            let w = values(d_in * d_out, 2);
            let b = values(d_out, 3);
            for bias in [None, Some(b.as_slice())] {
                let got = matvec(&x, &w, bias, d_out);
                let want = reference(&x, &w, bias, d_out);
                for (g, e) in got.iter().zip(&want) {
                    assert!((*g as f64 - e).abs() < 1e-4, "{d_in}x{d_out}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn write_rows_equals_slice_assign_and_leaves_shared_buffers_alone() {
        let device = Default::default();
        let buffer = Tensor::<Flex, 4>::from_data(
            TensorData::new(values(2 * 3 * 5 * 4, 7), [2, 3, 5, 4]),
            &device,
        );
        let rows = Tensor::<Flex, 4>::from_data(
            TensorData::new(values(2 * 3 * 2 * 4, 8), [2, 3, 2, 4]),
            &device,
        );
        let want = super::write_rows_with_slice_assign(buffer.clone(), 2, rows.clone());
        // shared: the other owner keeps its values
        let kept = buffer.clone();
        let got = FlexKernels.write_rows(buffer, 2, rows.clone());
        assert_eq!(got.to_data(), want.to_data());
        assert_ne!(kept.to_data(), want.to_data());
        // not shared: written in place, same result
        let got = FlexKernels.write_rows(kept, 2, rows);
        assert_eq!(got.into_data(), want.into_data());
    }

    #[test]
    fn linear_row_equals_the_matmul() {
        let device = Default::default();
        let w =
            Tensor::<Flex, 2>::from_data(TensorData::new(values(96 * 700, 4), [96, 700]), &device);
        let b = Tensor::<Flex, 1>::from_data(TensorData::new(values(700, 5), [700]), &device);
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(values(96, 6), [1, 96]), &device);
        let got = FlexKernels.linear_row(&w, Some(&b), &x).expect("handled");
        let want = x.clone().matmul(w.clone()) + b.unsqueeze();
        let diff = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
        // not one row: left to the matmul
        let two = Tensor::<Flex, 2>::zeros([2, 96], &device);
        assert!(FlexKernels.linear_row(&w, None, &two).is_none());
    }
}
