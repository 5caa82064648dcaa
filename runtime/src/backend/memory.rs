//! How much memory a run holds and how much is left: the device pool of the CubeCL backends,
//! the process's peak resident set, and the free memory where a model's caches will live (to
//! refuse, before any work, a context whose cache cannot fit).

use super::{BackendChoice, BackendKind};

/// Bytes CubeCL's allocator holds on `device`, `(reserved, in use)`: CUDA and wgpu devices;
/// `None` for the CPU backends (their tensors are in the process's resident set).
pub fn device_pool<D: 'static>(device: &D) -> Option<(u64, u64)> {
    #[allow(unused_variables)]
    let any = device as &dyn std::any::Any;
    #[cfg(feature = "cuda")]
    if let Some(d) = any.downcast_ref::<burn::backend::cuda::CudaDevice>() {
        use burn::cubecl::Runtime;
        let u = burn::cubecl::cuda::CudaRuntime::client(d)
            .memory_usage()
            .ok()?;
        return Some((u.bytes_reserved, u.bytes_in_use));
    }
    #[cfg(feature = "wgpu")]
    if let Some(d) = any.downcast_ref::<burn::backend::wgpu::WgpuDevice>() {
        use burn::cubecl::Runtime;
        let u = burn::backend::wgpu::WgpuRuntime::client(d)
            .memory_usage()
            .ok()?;
        return Some((u.bytes_reserved, u.bytes_in_use));
    }
    None
}

/// The process's peak resident set in bytes (Linux's `VmHWM`); `None` elsewhere.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmHWM:")
}

/// Free memory where `choice`'s tensors live, in bytes: the CUDA device's (the driver's
/// `cuMemGetInfo`), the host's available memory for the CPU backends (Linux's
/// `MemAvailable`); `None` where it cannot be known (wgpu has no such query).
pub fn free_memory(choice: &BackendChoice) -> Option<u64> {
    match choice.kind {
        BackendKind::Ndarray | BackendKind::Flex => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            kib_field(&info, "MemAvailable:")
        }
        BackendKind::Cuda => cuda_free(choice.index),
        BackendKind::Wgpu | BackendKind::Auto => None,
    }
}

/// The value of a `NAME:   123 kB` line of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(not(feature = "cuda"))]
fn cuda_free(_index: usize) -> Option<u64> {
    None
}

/// Free bytes of CUDA device `index`, asked of the driver in the device's primary context
/// (the one CubeCL uses: retained, made current for the call, released).
#[cfg(feature = "cuda")]
fn cuda_free(index: usize) -> Option<u64> {
    use std::ffi::{c_int, c_uint, c_void};
    type Ctx = *mut c_void;
    type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuRetain = unsafe extern "C" fn(*mut Ctx, c_int) -> c_int;
    type CuRelease = unsafe extern "C" fn(c_int) -> c_int;
    type CuPush = unsafe extern "C" fn(Ctx) -> c_int;
    type CuPop = unsafe extern "C" fn(*mut Ctx) -> c_int;
    type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    // SAFETY: the driver's documented entry points, called with their signatures; the context
    // pushed here is popped before returning, and the retain is paired with a release.
    unsafe {
        let lib = names
            .iter()
            .find_map(|n| libloading::Library::new(n).ok())?;
        let init: libloading::Symbol<CuInit> = lib.get(b"cuInit\0").ok()?;
        let get: libloading::Symbol<CuDeviceGet> = lib.get(b"cuDeviceGet\0").ok()?;
        let retain: libloading::Symbol<CuRetain> = lib.get(b"cuDevicePrimaryCtxRetain\0").ok()?;
        let release: libloading::Symbol<CuRelease> =
            lib.get(b"cuDevicePrimaryCtxRelease_v2\0").ok()?;
        let push: libloading::Symbol<CuPush> = lib.get(b"cuCtxPushCurrent_v2\0").ok()?;
        let pop: libloading::Symbol<CuPop> = lib.get(b"cuCtxPopCurrent_v2\0").ok()?;
        let info: libloading::Symbol<CuMemGetInfo> = lib.get(b"cuMemGetInfo_v2\0").ok()?;
        if init(0) != 0 {
            return None;
        }
        let mut dev: c_int = 0;
        if get(&mut dev, index as c_int) != 0 {
            return None;
        }
        let mut ctx: Ctx = std::ptr::null_mut();
        if retain(&mut ctx, dev) != 0 {
            return None;
        }
        let mut free = None;
        if push(ctx) == 0 {
            let (mut f, mut total) = (0usize, 0usize);
            if info(&mut f, &mut total) == 0 {
                free = Some(f as u64);
            }
            let mut popped: Ctx = std::ptr::null_mut();
            pop(&mut popped);
        }
        release(dev);
        // the driver stays loaded for the rest of the process (CubeCL uses it too)
        std::mem::forget(lib);
        free
    }
}

/// Bytes in a human unit: `512 MiB`, `2.41 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let b = bytes as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.0} MiB", b / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_in_bytes() {
        let text = "Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(kib_field(text, "VmHWM:"), Some(123456 * 1024));
        assert_eq!(kib_field(text, "MemAvailable:"), None);
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(5 << 29), "2.50 GiB");
    }

    #[test]
    fn this_process_has_a_peak_and_the_host_free_memory() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss().is_some_and(|b| b > 0));
        }
    }
}
