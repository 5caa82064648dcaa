//! Finding devices without running anything on them: the CUDA driver's device list (loaded at
//! run time, so a missing driver is an error, not a panic) and the wgpu adapters.

/// Names of the CUDA devices, or why CUDA cannot be used. Loads the driver library itself (no
/// panic when it is missing).
pub fn probe_cuda() -> Result<Vec<String>, String> {
    #[cfg(not(feature = "cuda"))]
    {
        Err("not compiled into this binary (feature `cuda`)".into())
    }
    #[cfg(feature = "cuda")]
    {
        cuda_driver::devices()
    }
}

#[cfg(feature = "cuda")]
mod cuda_driver {
    use std::ffi::{c_char, c_int, c_uint};

    type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;

    const LIBRARIES: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };

    pub fn devices() -> Result<Vec<String>, String> {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what every
        // CUDA program does; the symbols are called with their documented signatures.
        unsafe {
            let lib = LIBRARIES
                .iter()
                .find_map(|name| libloading::Library::new(name).ok())
                .ok_or("no NVIDIA driver (libcuda) found")?;
            let init: libloading::Symbol<CuInit> =
                lib.get(b"cuInit\0").map_err(|e| e.to_string())?;
            let count: libloading::Symbol<CuDeviceGetCount> =
                lib.get(b"cuDeviceGetCount\0").map_err(|e| e.to_string())?;
            let get: libloading::Symbol<CuDeviceGet> =
                lib.get(b"cuDeviceGet\0").map_err(|e| e.to_string())?;
            let name: libloading::Symbol<CuDeviceGetName> =
                lib.get(b"cuDeviceGetName\0").map_err(|e| e.to_string())?;
            let rc = init(0);
            if rc != 0 {
                return Err(format!(
                    "cuInit failed (CUDA error {rc}): driver present but no usable GPU"
                ));
            }
            let mut n: c_int = 0;
            if count(&mut n) != 0 || n <= 0 {
                return Err("the driver reports no CUDA device".into());
            }
            let mut names = Vec::new();
            for i in 0..n {
                let mut dev: c_int = 0;
                let mut buf = [0 as c_char; 256];
                let label = if get(&mut dev, i) == 0 && name(buf.as_mut_ptr(), 256, dev) == 0 {
                    std::ffi::CStr::from_ptr(buf.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                } else {
                    format!("CUDA device {i}")
                };
                names.push(label);
            }
            // keep the driver loaded for the rest of the process
            std::mem::forget(lib);
            Ok(names)
        }
    }
}

/// A wgpu adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Adapter name and graphics API.
    pub name: String,
    /// A CPU (software) implementation such as lavapipe or llvmpipe.
    pub software: bool,
    /// Kind used to address it (`DiscreteGpu(n)`, ...).
    pub slot: AdapterSlot,
    /// The adapter's limits (CubeCL requests the largest the adapter allows).
    pub limits: AdapterLimits,
}

/// What one wgpu adapter allows, as reported when it is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    /// Largest storage buffer a kernel may bind, in bytes: the largest tensor CubeCL allocates.
    pub max_binding: u64,
    /// Workgroups per dimension of one dispatch.
    pub max_groups: u32,
}

impl AdapterLimits {
    /// The largest single tensor, in bytes.
    pub fn max_tensor(&self) -> u64 {
        self.max_buffer.min(self.max_binding)
    }
}

/// How cubecl addresses an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterSlot {
    /// n-th discrete GPU.
    Discrete(usize),
    /// n-th integrated GPU.
    Integrated(usize),
    /// n-th virtual GPU.
    Virtual(usize),
    /// The CPU adapter.
    Cpu,
}

/// On a headless Linux machine (no `XDG_RUNTIME_DIR`), points `XDG_RUNTIME_DIR` at the temporary
/// directory: the Vulkan driver's window-system code tries to reach a Wayland display when wgpu
/// enumerates adapters, and libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set`
/// to stderr (twice per probe) when the variable is missing. With a directory that holds no
/// display socket the probe fails silently. Call at the start of `main`, before any thread.
pub fn quiet_headless_probe() {
    #[cfg(all(target_os = "linux", feature = "wgpu"))]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// wgpu adapters in the order `--device N` counts them (hardware first), or why there are none.
pub fn probe_wgpu() -> Result<Vec<Adapter>, String> {
    #[cfg(not(feature = "wgpu"))]
    {
        Err("not compiled into this binary (feature `wgpu`)".into())
    }
    #[cfg(feature = "wgpu")]
    {
        // Vulkan, Metal and DX12 only: the APIs CubeCL's wgpu runtime computes on. Asking for
        // GL too would start EGL, which looks for a Wayland/X display and prints complaints
        // (`XDG_RUNTIME_DIR is invalid`) on a headless machine.
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        descriptor.backends &= wgpu::Backends::PRIMARY;
        if descriptor.backends.is_empty() {
            descriptor.backends = wgpu::Backends::PRIMARY;
        }
        let backends = descriptor.backends;
        let instance = wgpu::Instance::new(descriptor);
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let mut counts = [0usize; 3];
        let mut found: Vec<Adapter> = adapters
            .iter()
            .map(|a| {
                let info = a.get_info();
                let mut take = |i: usize| {
                    counts[i] += 1;
                    counts[i] - 1
                };
                let slot = match info.device_type {
                    wgpu::DeviceType::DiscreteGpu => AdapterSlot::Discrete(take(0)),
                    wgpu::DeviceType::IntegratedGpu => AdapterSlot::Integrated(take(1)),
                    wgpu::DeviceType::VirtualGpu => AdapterSlot::Virtual(take(2)),
                    wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => AdapterSlot::Cpu,
                };
                let l = a.limits();
                Adapter {
                    name: format!("{} ({:?})", info.name, info.backend),
                    software: slot == AdapterSlot::Cpu,
                    slot,
                    limits: AdapterLimits {
                        max_buffer: l.max_buffer_size,
                        max_binding: l.max_storage_buffer_binding_size,
                        max_groups: l.max_compute_workgroups_per_dimension,
                    },
                }
            })
            .collect();
        found.sort_by_key(|a| a.software);
        if found.is_empty() {
            Err("no Vulkan, Metal or DX12 adapter (install a GPU driver, or mesa-vulkan-drivers for software Vulkan)".into())
        } else {
            Ok(found)
        }
    }
}
