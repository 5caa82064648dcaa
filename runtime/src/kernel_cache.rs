//! Start-up time on GPUs. Burn's CUDA and wgpu backends compile every kernel at run time (CUDA
//! through NVRTC) and, in builds with the `autotune` feature (off by default), benchmark the
//! candidate matmul kernels of every new shape; without persistent caches every process pays
//! that again (seconds on CUDA without autotuning, minutes with it). Before the first GPU call, both binaries point
//! CubeCL's compilation (PTX) and autotune caches at the user's cache directory
//! (`$NSA_CACHE_DIR`, else e.g. `~/.cache/nsa/`), so only the first run is slow.
//!
//! A `cubecl.toml` / `burn.toml` in the working directory (or a parent) takes precedence, as do
//! CubeCL's environment variables (`CUBECL_AUTOTUNE_LEVEL`, `CUBECL_DEBUG_LOG`).
//! `NSA_PROFILE_LOG=FILE` writes CubeCL's per-kernel timings to FILE.

use std::path::PathBuf;

/// What the process is about to do; inference prefers a quick start over the last percent of
/// kernel speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Long-running training: full autotuning pays off.
    Training,
    /// Interactive generation: minimal autotuning.
    Inference,
}

/// The cache root used for kernels and autotune results.
pub fn cache_root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NSA_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    dirs::cache_dir().map(|d| d.join("nsa"))
}

/// Configures CubeCL's caches; call once at start-up, before any GPU work. Returns the cache
/// directory in use, or `None` when a user config file decides (or no GPU backend is compiled).
/// Only the first call of a process takes effect.
pub fn configure(workload: Workload) -> Option<PathBuf> {
    // CubeCL's configuration can be set once per process: later calls return the first answer
    static DONE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| configure_once(workload)).clone()
}

fn configure_once(workload: Workload) -> Option<PathBuf> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        use burn::cubecl::config::autotune::AutotuneLevel;
        use burn::cubecl::config::cache::CacheConfig;
        use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

        let cwd = std::env::current_dir().ok()?;
        let user_file = cwd.ancestors().any(|dir| {
            ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"]
                .iter()
                .any(|f| dir.join(f).is_file())
        });
        if user_file {
            return None;
        }
        let root = cache_root()?;
        if std::fs::create_dir_all(&root).is_err() {
            return None;
        }
        let mut config = CubeClRuntimeConfig::default();
        config.compilation.cache = Some(CacheConfig::File(root.join("kernels")));
        config.autotune.cache = CacheConfig::File(root.join("autotune"));
        if workload == Workload::Inference {
            config.autotune.level = AutotuneLevel::Minimal;
        }
        // `NSA_PROFILE_LOG=FILE`: CubeCL's per-kernel timing summary (at every device sync) to
        // FILE, without the compilation log that `CUBECL_DEBUG_LOG` also turns on
        if let Some(path) = std::env::var_os("NSA_PROFILE_LOG") {
            use burn::cubecl::config::profiling::ProfilingLogLevel;
            config.profiling.logger.level = ProfilingLogLevel::Basic;
            config.profiling.logger.file = Some(PathBuf::from(path));
        }
        // environment variables still win
        let config = config.override_from_env();
        CubeClRuntimeConfig::set(config);
        Some(root)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = workload;
        None
    }
}
