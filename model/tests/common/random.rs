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

/// Maps every float parameter of a module to fresh `N(0, std)` values (`Tensor::random`).
pub struct Randomise<B: burn::prelude::Backend> {
    pub device: B::Device,
    pub std: f64,
}

impl<B: burn::prelude::Backend> burn::module::ModuleMapper<B> for Randomise<B> {
    fn map_float<const D: usize>(
        &mut self,
        p: burn::module::Param<burn::prelude::Tensor<B, D>>,
    ) -> burn::module::Param<burn::prelude::Tensor<B, D>> {
        let shape = p.dims();
        let (device, std) = (self.device.clone(), self.std);
        p.map(|_| {
            burn::prelude::Tensor::random(
                shape,
                burn::tensor::Distribution::Normal(0.0, std),
                &device,
            )
        })
    }
}

/// The small transformer of the decode tests: vocab 40, dim 32, 2 layers, 4 heads over 2 kv
/// heads of 16, stride 4, compression block 8, selection block 8 (2 slots per block), window
/// 5, 2 selected blocks, 1 memory slot.
pub fn small_decode_config() -> nsa_model::TransformerConfig {
    let mut c = nsa_model::TransformerConfig::new(40, 32, 2);
    c.dim_head = 16;
    c.heads = 4;
    c.kv_heads = Some(2);
    let s = &mut c.sparse;
    s.compress_block_sliding_stride = 4;
    s.compress_block_size = 8;
    s.selection_block_size = 8;
    s.sliding_window_size = 5;
    s.num_selected_blocks = 2;
    s.num_compressed_mem_kv = 1;
    c
}

/// Small transformer configs whose decode steps the decode kernel covers: GQA with shared
/// selection and several compression slots per selection block, separate selections per head,
/// straight-through gated keys, and one slot per block with as many kv heads as heads.
pub fn decode_configs() -> Vec<(&'static str, nsa_model::TransformerConfig)> {
    let base = small_decode_config;
    let shared = base();
    let mut separate = base();
    separate.sparse.query_heads_share_selected_kv = false;
    let mut gated = base();
    gated.sparse.use_diff_topk = true;
    let mut plain = base();
    plain.heads = 2;
    plain.kv_heads = Some(2);
    plain.sparse.selection_block_size = 4;
    plain.sparse.sliding_window_size = 6;
    plain.sparse.num_selected_blocks = 3;
    plain.sparse.num_compressed_mem_kv = 2;
    // a selection block spans two of the kernel's 32-key chunks
    let mut long = base();
    long.sparse.selection_block_size = 36;
    vec![
        ("gqa shared selection", shared),
        ("selection blocks longer than a chunk", long),
        ("selection per head", separate),
        ("diff top-k gates", gated),
        ("one slot per block, no gqa", plain),
    ]
}
