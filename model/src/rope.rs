//! Rotary position embedding exactly as `rotary_embedding_torch.RotaryEmbedding(dim_head)`:
//! frequencies `1 / 10000^(2k/d)`, each used for the adjacent pair of features `(2k, 2k+1)`
//! ("interleaved" pairing), angles computed in f32 like the reference.

use burn::prelude::*;

/// Frequencies `[dim_head / 2]` in f32, computed like the reference.
pub fn frequencies(dim_head: usize) -> Vec<f32> {
    (0..dim_head / 2)
        .map(|k| 1.0f32 / 10000f32.powf((2 * k) as f32 / dim_head as f32))
        .collect()
}

/// The tables of positions `offset..offset + n`, row-major `[n, 2 · dim_head / 2]`: cosines
/// `[c₀, c₀, c₁, c₁, …]` and signed sines `[−s₀, s₀, −s₁, s₁, …]`. Every value is computed on
/// its own (angle `position · frequency` in f32, then its cosine and sine), so splitting the
/// rows over threads gives the same tables; a long range is split over the machine's threads
/// (65,536 positions of 64 features: ≈ 60 ms on one core).
fn tables(dim_head: usize, offset: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let freqs = frequencies(dim_head);
    let width = 2 * freqs.len();
    let mut cos = vec![0f32; n * width];
    let mut sin = vec![0f32; n * width];
    if width == 0 || n == 0 {
        return (cos, sin);
    }
    let fill = |first: usize, cos: &mut [f32], sin: &mut [f32]| {
        let rows = cos.chunks_mut(width).zip(sin.chunks_mut(width));
        for (r, (c_row, s_row)) in rows.enumerate() {
            let pos = (offset + first + r) as f32;
            for (k, f) in freqs.iter().enumerate() {
                let angle = pos * f;
                let (c, s) = (angle.cos(), angle.sin());
                c_row[2 * k] = c;
                c_row[2 * k + 1] = c;
                s_row[2 * k] = -s;
                s_row[2 * k + 1] = s;
            }
        }
    };
    let threads = match n * width {
        v if v < 1 << 16 => 1,
        _ => std::thread::available_parallelism().map_or(1, |t| t.get().min(16)),
    };
    let per = n.div_ceil(threads) * width;
    std::thread::scope(|scope| {
        for (i, (c, s)) in cos.chunks_mut(per).zip(sin.chunks_mut(per)).enumerate() {
            scope.spawn(move || fill(i * per / width, c, s));
        }
    });
    (cos, sin)
}

/// The rotation of `n` consecutive positions: cosines `[c₀, c₀, c₁, c₁, …]` and signed sines
/// `[−s₀, s₀, −s₁, s₁, …]`, `[1, 1, n, dim_head]` each.
#[derive(Debug, Clone)]
pub struct Rotation<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> Rotation<B> {
    /// The rotation of positions `offset..offset + n`.
    pub fn new(dim_head: usize, offset: usize, n: usize, device: &B::Device) -> Self {
        RopeTable::new(dim_head, offset, n, device).rotation(offset, n)
    }

    /// Cosines `[c₀, c₀, c₁, c₁, …]` and signed sines `[−s₀, s₀, −s₁, s₁, …]`,
    /// `[1, 1, n, dim_head]` each.
    pub fn parts(&self) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` `[batch, heads, n, dim_head]`:
    /// `x · [c, c] + swap_pairs(x) · [−s, s]`, i.e. `(x₀c − x₁s, x₁c + x₀s)` per pair.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, n, d] = x.dims();
        let swapped = x
            .clone()
            .reshape([b, h, n, d / 2, 2])
            .flip([4])
            .reshape([b, h, n, d]);
        x * self.cos.clone() + swapped * self.sin.clone()
    }
}

/// Cosines and sines for a range of positions kept on the device, so that decoding a token
/// needs no host-to-device copy for its rotation.
#[derive(Debug, Clone)]
pub struct RopeTable<B: Backend> {
    start: usize,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTable<B> {
    /// A table for positions `start..start + len`.
    pub fn new(dim_head: usize, start: usize, len: usize, device: &B::Device) -> Self {
        let (cos, sin) = tables(dim_head, start, len);
        // in the backend's float type: an f32 table on an f64 backend would compute in f32
        let t = |v: Vec<f32>| {
            Tensor::from_data(
                TensorData::new(v, [len, dim_head]).convert::<B::FloatElem>(),
                device,
            )
        };
        Self {
            start,
            cos: t(cos),
            sin: t(sin),
        }
    }

    /// Whether positions `offset..offset + n` are in the table.
    pub fn covers(&self, offset: usize, n: usize) -> bool {
        offset >= self.start && offset + n <= self.start + self.cos.dims()[0]
    }

    /// The rotation of positions `offset..offset + n` (which the table must cover).
    pub fn rotation(&self, offset: usize, n: usize) -> Rotation<B> {
        let d = self.cos.dims()[1];
        let rows = |t: &Tensor<B, 2>| {
            t.clone()
                .narrow(0, offset - self.start, n)
                .reshape([1, 1, n, d])
        };
        Rotation {
            cos: rows(&self.cos),
            sin: rows(&self.sin),
        }
    }
}

/// Rotates `x` `[batch, heads, seq, dim_head]` whose first row sits at absolute position
/// `offset`.
pub fn rotate<B: Backend>(x: Tensor<B, 4>, offset: usize) -> Tensor<B, 4> {
    let [_, _, n, d] = x.dims();
    Rotation::new(d, offset, n, &x.device()).apply(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables of a range split over threads hold, row by row, the cosine and sine of each
    /// position's angles (the interleaved layout), as computed one value at a time.
    #[test]
    fn tables_match_each_position_computed_alone() {
        for (d, offset, n) in [(64, 0, 5), (64, 100_003, 2_049), (8, 7, 40_000), (6, 3, 1)] {
            let (cos, sin) = tables(d, offset, n);
            assert_eq!((cos.len(), sin.len()), (n * d, n * d));
            let freqs = frequencies(d);
            for p in [0, 1, n / 3, n / 2 + 1, n - 1]
                .into_iter()
                .filter(|&p| p < n)
            {
                for (k, f) in freqs.iter().enumerate() {
                    let angle = (offset + p) as f32 * f;
                    let at = p * d + 2 * k;
                    assert_eq!(cos[at], angle.cos(), "cos d {d} pos {p} freq {k}");
                    assert_eq!(cos[at + 1], angle.cos());
                    assert_eq!(sin[at], -angle.sin(), "sin d {d} pos {p} freq {k}");
                    assert_eq!(sin[at + 1], angle.sin());
                }
            }
        }
    }
}
