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

/// Cosines and sines of the rotation angles of positions `offset..offset + n`, row-major
/// `[n, dim_head / 2]`.
fn angles(dim_head: usize, offset: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let freqs = frequencies(dim_head);
    let mut cos = Vec::with_capacity(n * freqs.len());
    let mut sin = Vec::with_capacity(n * freqs.len());
    for p in 0..n {
        let pos = (p + offset) as f32;
        for f in &freqs {
            let angle = pos * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
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
        let (cos, sin) = angles(dim_head, start, len);
        let cos: Vec<f32> = cos.iter().flat_map(|&c| [c, c]).collect();
        let sin: Vec<f32> = sin.iter().flat_map(|&s| [-s, s]).collect();
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
