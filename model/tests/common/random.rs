//! Deterministic randomness for property tests: a small generator, so failures reproduce, and
//! random valid NSA configs.

use nsa_model::NsaConfig;

/// Small deterministic generator (xorshift*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }

    /// A value in `[lo, hi]`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A random valid NSA config (dim 16, dim_head 4).
pub fn random_config(rng: &mut Rng) -> NsaConfig {
    let kv_heads = rng.pick(&[1, 2]);
    let heads = kv_heads * rng.pick(&[1, 2, 4]);
    let stride = rng.pick(&[2, 4]);
    let block = stride * rng.pick(&[1, 2]);
    let selection = stride * rng.pick(&[1, 2, 4]);
    let mut c = NsaConfig::new(
        16,
        4,
        heads,
        rng.pick(&[3, 4, 8]),
        block,
        stride,
        selection,
        rng.pick(&[0, 1, 2, 5]),
    )
    .with_kv_heads(kv_heads);
    c.num_compressed_mem_kv = rng.pick(&[1, 2]);
    c.use_diff_topk = rng.pick(&[false, true]);
    c.query_heads_share_selected_kv = rng.pick(&[false, true]);
    c
}
