//! A long prompt's prefill is linear in memory (issue: 100K-token prompts in bounded memory):
//! the peak of bytes allocated while a tiny NSA model prefills 8,192 tokens against 2,048,
//! counted by this test binary's own allocator. Quadratic work (the compressed scores and the
//! block importance of every query over every block, all positions' logits) would make the
//! ratio about 16; linear, about 4. On ndarray with the tensor ops, and on flex with its
//! prefill kernel (the CPU backend of `nsa-infer`). The only test of its binary, so that
//! nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::NdArray;
use burn::prelude::*;
use nsa_model::{AttentionKind, TransformerConfig};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

type B = NdArray<f32>;

/// Bytes allocated at the peak of one prefill of `n` tokens, above what was live before.
fn prefill_peak<B: Backend>(model: &nsa_model::Transformer<B>, n: usize) -> usize {
    let device = Default::default();
    let ids: Vec<i64> = (0..n).map(|i| ((i * 7919) % 61) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let (logits, cache) = model.prefill_last(ids, 4);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let row = logits.into_data().into_vec::<f32>().unwrap();
    assert!(
        row.iter().all(|v| v.is_finite()),
        "non-finite logits at {n}"
    );
    drop(cache);
    peak
}

#[test]
fn prefill_memory_grows_linearly_with_the_prompt() {
    let device = Default::default();
    // the bundled fixture's shape: width 32, 4 heads over 2 kv heads, stride 4, blocks of 8
    let mut c = TransformerConfig::new(64, 32, 2);
    c.dim_head = 8;
    c.heads = 4;
    c.kv_heads = Some(2);
    c.attention = AttentionKind::Nsa;
    c.max_seq_len = Some(16_384);
    let s = &mut c.sparse;
    s.sliding_window_size = 8;
    s.compress_block_size = 8;
    s.compress_block_sliding_stride = 4;
    s.selection_block_size = 8;
    s.num_selected_blocks = 2;
    let model = c.init::<B>(&device).unwrap();
    let one_piece = nsa_model::kernels::KernelOptions {
        prefill_chunk: 0,
        ..Default::default()
    };
    let whole = linear(
        "ndarray, tensor ops",
        &model.clone().with_kernel_options(one_piece),
    );
    // in chunks of 512 positions: linear too, and a smaller peak (one chunk's working set)
    let options = nsa_model::kernels::KernelOptions {
        prefill_chunk: 512,
        ..Default::default()
    };
    let chunked = linear(
        "ndarray, chunks of 512",
        &model.clone().with_kernel_options(options),
    );
    assert!(
        chunked < whole,
        "chunks of 512: peak {chunked} B, not below one piece's {whole} B"
    );
    // the CPU backend of `nsa-infer --backend cpu`: flex, with its prefill kernel
    #[cfg(feature = "flex")]
    {
        nsa_model::kernels::register_flex();
        let device = Default::default();
        let model = c.init::<burn::backend::Flex>(&device).unwrap();
        linear("flex, its kernels", &model);
    }
}

/// The peak of an 8,192-token prefill of `model` is less than 6 times a 2,048-token one's;
/// returns the former.
fn linear<B: Backend>(name: &str, model: &nsa_model::Transformer<B>) -> usize {
    // warm-up: one-time allocations (thread pools, tables) do not count
    prefill_peak(model, 512);
    let small = prefill_peak(model, 2048);
    let large = prefill_peak(model, 8192);
    let ratio = large as f64 / small as f64;
    println!(
        "{name}: prefill peak: 2048 tokens {small} B, 8192 tokens {large} B, ratio {ratio:.2}"
    );
    assert!(
        ratio < 6.0,
        "{name}: prefill memory grows faster than linearly: ratio {ratio:.2}"
    );
    large
}
