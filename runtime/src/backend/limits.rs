//! The largest single tensor a device allocates, and a limit forced below it.
//!
//! GPU drivers refuse any one buffer above a limit, whatever the free memory (many Vulkan
//! drivers and Apple's Metal: 128–256 MiB for a storage binding). [`BackendChoice`] carries the
//! limit of the chosen device ([`BackendChoice::max_tensor_bytes`]); the model sizes everything
//! that grows with the tokens (the output head's logits above all) to stay within it.
//!
//! `--max-buffer-mib N` forces a lower limit, so that the chunking can be proven on any
//! machine: on wgpu the device's memory pools are then built to refuse larger buffers (with the
//! error a driver limit gives), and on every backend the model chunks to the forced size.
//!
//! [`BackendChoice`]: super::BackendChoice
//! [`BackendChoice::max_tensor_bytes`]: super::BackendChoice::max_tensor_bytes

/// Alignment of the pools' page sizes (wgpu's offset alignment is at most 256 bytes).
#[cfg(feature = "wgpu")]
const ALIGN: u64 = 256;

/// Memory pools whose largest accepted allocation is `limit` bytes: single buffers above it
/// fail with CubeCL's "can't allocate buffer of size" error, as on a device whose storage
/// bindings stop at `limit`.
#[cfg(feature = "wgpu")]
pub(crate) fn limited_pools(limit: u64) -> cubecl_runtime::memory_management::MemoryConfiguration {
    use cubecl_runtime::memory_management::{MemoryConfiguration, MemoryPoolOptions, PoolType};
    let limit = (limit / ALIGN).max(1) * ALIGN;
    let small = (limit / 4 / ALIGN).max(1) * ALIGN;
    let pool = |pool_type| MemoryPoolOptions {
        pool_type,
        dealloc_period: None,
    };
    MemoryConfiguration::Custom {
        pool_options: vec![
            // empty allocations, which cannot take an offset
            pool(PoolType::ExclusivePages { max_alloc_size: 0 }),
            // small tensors share pages of a quarter of the limit
            pool(PoolType::SlicedPages {
                page_size: small,
                max_slice_size: (small / 4).max(ALIGN),
            }),
            // up to the limit: pages of the limit, never larger
            pool(PoolType::SlicedPages {
                page_size: limit,
                max_slice_size: limit,
            }),
        ],
    }
}

/// Creates the wgpu device's client with its pools capped at `limit` bytes. Must run before
/// anything else uses `device`; once per device and process (later calls do nothing).
#[cfg(feature = "wgpu")]
pub(crate) fn init_wgpu_limited(device: &burn::backend::wgpu::WgpuDevice, limit: u64) {
    use burn::backend::wgpu::graphics::AutoGraphicsApi;
    use burn::backend::wgpu::{init_setup, RuntimeOptions};
    use std::collections::HashSet;
    use std::sync::Mutex;
    static DONE: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done
        .get_or_insert_with(HashSet::new)
        .insert(format!("{device:?}"))
    {
        let options = RuntimeOptions {
            memory_config: limited_pools(limit),
            ..Default::default()
        };
        init_setup::<AutoGraphicsApi>(device, options);
    }
}

/// `bytes` as MiB for messages ("165.1 MiB").
pub fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1024.0 * 1024.0);
    if m >= 10.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}
