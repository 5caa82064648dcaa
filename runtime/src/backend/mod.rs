//! Choosing the compute backend at run time: CUDA, wgpu (Vulkan / Metal / DX12) or the CPU
//! (Burn's flex or ndarray backend), all compiled into one binary (cargo features `cuda`,
//! `wgpu`, `flex`, `ndarray`, on by default).
//!
//! The names on the command line ([`BACKEND_HELP`]) are `auto`, `cuda`, `wgpu`, `cpu` and
//! `ndarray`: `cpu` is the fast CPU backend (Burn's flex when compiled in, else ndarray) and
//! `ndarray` is Burn's ndarray backend, the slower reference CPU backend of the tests.
//! `flex` (= `cpu`), `vulkan` and `metal` (= `wgpu`) are accepted but not listed.
//!
//! Code that runs on "some backend" implements [`OnBackend`] (inference) or
//! [`OnAutodiffBackend`] (training): one generic method, monomorphised once per compiled-in
//! backend, and [`dispatch`] / [`dispatch_autodiff`] call it with the backend that was chosen.
//!
//! `auto` tries CUDA, then a hardware wgpu adapter, then the CPU, and says why it skipped the
//! others. A backend that was asked for by name but is unavailable is an error, not a panic.

use std::fmt;
use std::str::FromStr;

use burn::prelude::Backend;
#[cfg(feature = "autodiff")]
use burn::tensor::backend::AutodiffBackend;

/// The backend names every help text lists, in this order.
pub const BACKEND_NAMES: &str = "auto, cuda, wgpu, cpu or ndarray";

/// Help text of a `--backend` option (both binaries).
pub const BACKEND_HELP: &str = "Backend: auto, cuda, wgpu, cpu or ndarray. auto tries CUDA, \
     then a wgpu GPU adapter, then the CPU; cpu is the fast CPU backend (Burn's flex); ndarray \
     is Burn's ndarray backend, the slower reference CPU backend of the tests";

/// The backend asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// CUDA, else wgpu, else CPU.
    #[default]
    Auto,
    /// NVIDIA CUDA (kernels compiled at run time by NVRTC).
    Cuda,
    /// wgpu: Vulkan, Metal or DX12, chosen by wgpu at run time.
    Wgpu,
    /// `ndarray`: the CPU through Burn's ndarray backend (the portable reference backend of
    /// the tests; slower).
    Ndarray,
    /// `cpu`: the CPU through Burn's flex backend (`gemm`-based, multi-threaded; the fast CPU
    /// backend). Displayed as `cpu`; `flex` is accepted as a hidden alias.
    Flex,
}

impl BackendKind {
    /// The preferred CPU backend of this binary: flex when compiled in, else ndarray.
    pub fn cpu() -> Self {
        if cfg!(feature = "flex") {
            Self::Flex
        } else {
            Self::Ndarray
        }
    }

    fn compiled(self) -> bool {
        match self {
            Self::Auto => true,
            Self::Cuda => cfg!(feature = "cuda"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Flex => cfg!(feature = "flex"),
        }
    }

    /// The cargo feature that compiles the backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Auto => "cuda,wgpu,flex",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
            Self::Ndarray => "ndarray",
            Self::Flex => "flex",
        }
    }

    /// Whether this is one of the CPU backends (`cpu`, `ndarray`).
    pub fn is_cpu(self) -> bool {
        matches!(self, Self::Ndarray | Self::Flex)
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda),
            "wgpu" | "vulkan" | "metal" => Ok(Self::Wgpu),
            "ndarray" => Ok(Self::Ndarray),
            "flex" => Ok(Self::Flex),
            "cpu" => Ok(Self::cpu()),
            other => Err(format!(
                "unknown backend `{other}`: expected {BACKEND_NAMES}"
            )),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
            Self::Ndarray => "ndarray",
            Self::Flex => "cpu",
        })
    }
}

/// Floating-point precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats (every backend).
    #[default]
    F32,
    /// IEEE half precision (CUDA, wgpu where the adapter supports `shader-f16`).
    F16,
    /// bfloat16 (CUDA).
    Bf16,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "half" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown precision `{other}`: expected f32, f16 or bf16"
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Why no backend could be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The backend was not compiled into this binary.
    #[error(
        "backend `{0}` is not compiled into this binary (rebuild with `--features {feature}`)",
        feature = .0.feature()
    )]
    NotCompiled(BackendKind),
    /// The backend is compiled in but cannot run here.
    #[error("backend `{kind}` is unavailable: {reason}")]
    Unavailable {
        /// Which backend.
        kind: BackendKind,
        /// What is missing.
        reason: String,
    },
    /// The backend does not support the precision.
    #[error("backend `{kind}` does not support {precision} here (use --precision f32{hint})")]
    Precision {
        /// Which backend.
        kind: BackendKind,
        /// Requested precision.
        precision: Precision,
        /// Extra hint.
        hint: &'static str,
    },
    /// `--devices` is not a usable list.
    #[error("--devices: {0}")]
    BadDeviceList(String),
    /// `--device` is out of range.
    #[error("backend `{kind}` has {count} device(s); --device {index} does not exist")]
    NoSuchDevice {
        /// Which backend.
        kind: BackendKind,
        /// Requested index.
        index: usize,
        /// Devices found.
        count: usize,
    },
}

/// Where the work runs, as chosen by [`select`].
#[derive(Debug, Clone, PartialEq)]
pub struct BackendChoice {
    /// The backend.
    pub kind: BackendKind,
    /// Device index within the backend.
    pub index: usize,
    /// Human-readable device name.
    pub device_name: String,
    /// Why this one (and why the others were skipped), one line.
    pub reason: String,
    /// Every device of a data-parallel run (`--devices`), the main device `index` first;
    /// just `[index]` otherwise. On the CPU backends an index may repeat: replicas of the
    /// model on the one CPU device (the data-parallel path without a speed-up, for testing).
    pub devices: Vec<usize>,
}

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceRequest {
    /// Requested backend.
    pub kind: BackendKind,
    /// Requested device index (`None` = the default device).
    pub index: Option<usize>,
}

/// Finds an available backend for `request` without running anything on it.
pub fn select(request: DeviceRequest) -> Result<BackendChoice, BackendError> {
    let index = request.index.unwrap_or(0);
    match request.kind {
        BackendKind::Auto => {
            let mut skipped = Vec::new();
            match probe_cuda() {
                Ok(devices) if index < devices.len() => {
                    return Ok(BackendChoice {
                        kind: BackendKind::Cuda,
                        index,
                        device_name: devices[index].clone(),
                        reason: "auto: CUDA device found".into(),
                        devices: vec![index],
                    })
                }
                Ok(devices) => {
                    skipped.push(format!("cuda: no device {index} ({} found)", devices.len()))
                }
                Err(e) => skipped.push(format!("cuda: {e}")),
            }
            match probe_wgpu() {
                Ok(adapters) => {
                    let hardware: Vec<&Adapter> = adapters.iter().filter(|a| !a.software).collect();
                    if let Some(a) = hardware.get(index) {
                        return Ok(BackendChoice {
                            kind: BackendKind::Wgpu,
                            index,
                            device_name: a.name.clone(),
                            reason: format!(
                                "auto: no CUDA ({}); wgpu adapter found",
                                skipped.join("; ")
                            ),
                            devices: vec![index],
                        });
                    }
                    skipped.push(format!(
                        "wgpu: no hardware adapter{}",
                        if adapters.iter().any(|a| a.software) {
                            " (only software rendering, slower than the CPU backend)"
                        } else {
                            ""
                        }
                    ));
                }
                Err(e) => skipped.push(format!("wgpu: {e}")),
            }
            let cpu = BackendKind::cpu();
            if cpu.compiled() {
                Ok(BackendChoice {
                    kind: cpu,
                    index: 0,
                    device_name: "CPU".into(),
                    reason: format!("auto: using the CPU ({})", skipped.join("; ")),
                    devices: vec![0],
                })
            } else {
                Err(BackendError::Unavailable {
                    kind: BackendKind::Auto,
                    reason: skipped.join("; "),
                })
            }
        }
        BackendKind::Cuda => {
            let devices = probe_cuda().map_err(|reason| BackendError::Unavailable {
                kind: BackendKind::Cuda,
                reason,
            })?;
            let name = devices.get(index).ok_or(BackendError::NoSuchDevice {
                kind: BackendKind::Cuda,
                index,
                count: devices.len(),
            })?;
            Ok(BackendChoice {
                kind: BackendKind::Cuda,
                index,
                device_name: name.clone(),
                reason: "requested".into(),
                devices: vec![index],
            })
        }
        BackendKind::Wgpu => {
            let adapters = probe_wgpu().map_err(|reason| BackendError::Unavailable {
                kind: BackendKind::Wgpu,
                reason,
            })?;
            let a = adapters.get(index).ok_or(BackendError::NoSuchDevice {
                kind: BackendKind::Wgpu,
                index,
                count: adapters.len(),
            })?;
            Ok(BackendChoice {
                kind: BackendKind::Wgpu,
                index,
                device_name: a.name.clone(),
                reason: "requested".into(),
                devices: vec![index],
            })
        }
        kind @ (BackendKind::Ndarray | BackendKind::Flex) => {
            if !kind.compiled() {
                return Err(BackendError::NotCompiled(kind));
            }
            if index != 0 {
                return Err(BackendError::NoSuchDevice {
                    kind,
                    index,
                    count: 1,
                });
            }
            Ok(BackendChoice {
                kind,
                index: 0,
                device_name: "CPU".into(),
                reason: "requested".into(),
                devices: vec![0],
            })
        }
    }
}

/// The devices of a data-parallel training run (`--devices 0,1` or `--devices all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    /// Every device of the backend.
    All,
    /// These device indices, the first being the main device.
    Indices(Vec<usize>),
}

impl FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        let mut indices = Vec::new();
        for part in s.split(',') {
            let i: usize = part.trim().parse().map_err(|_| {
                format!("`{s}` is not a device list: expected `all` or indices such as `0,1`")
            })?;
            indices.push(i);
        }
        Ok(Self::Indices(indices))
    }
}

/// Selects `kind` with the devices of `list` for data-parallel training: every index must
/// exist (and appear once, except on the CPU, where repeats are replicas on the one device).
pub fn select_devices(kind: BackendKind, list: &DeviceList) -> Result<BackendChoice, BackendError> {
    let count_of = |kind: BackendKind| -> Result<usize, BackendError> {
        match kind {
            BackendKind::Cuda => probe_cuda()
                .map(|d| d.len())
                .map_err(|reason| BackendError::Unavailable { kind, reason }),
            BackendKind::Wgpu => probe_wgpu()
                .map(|a| a.len())
                .map_err(|reason| BackendError::Unavailable { kind, reason }),
            _ => Ok(1),
        }
    };
    let first = match list {
        DeviceList::All => 0,
        DeviceList::Indices(v) => *v
            .first()
            .ok_or(BackendError::BadDeviceList("the list is empty".into()))?,
    };
    let mut choice = select(DeviceRequest {
        kind,
        index: Some(first),
    })?;
    let cpu = choice.kind.is_cpu();
    let count = count_of(choice.kind)?;
    let devices = match list {
        DeviceList::All => (0..count).collect(),
        DeviceList::Indices(v) => {
            for &i in v {
                if i >= count && !(cpu && i == 0) {
                    return Err(BackendError::NoSuchDevice {
                        kind: choice.kind,
                        index: i,
                        count,
                    });
                }
            }
            let mut seen = v.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != v.len() && !cpu {
                return Err(BackendError::BadDeviceList(format!(
                    "device indices repeat in {v:?}"
                )));
            }
            v.clone()
        }
    };
    if devices.len() > 1 {
        choice.reason = if cpu {
            format!(
                "{}; {} replicas on the one CPU device (data-parallel path, no speed-up)",
                choice.reason,
                devices.len()
            )
        } else {
            format!("{}; data parallel on devices {devices:?}", choice.reason)
        };
    }
    choice.devices = devices;
    Ok(choice)
}

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
                Adapter {
                    name: format!("{} ({:?})", info.name, info.backend),
                    software: slot == AdapterSlot::Cpu,
                    slot,
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

/// Work that runs on any inference backend.
pub trait OnBackend {
    /// Result of the work.
    type Output;
    /// Runs on backend `B` and `device`.
    fn run<B: Backend>(self, device: B::Device, choice: &BackendChoice) -> Self::Output;
}

/// Work that runs on any training (autodiff) backend (feature `autodiff`).
#[cfg(feature = "autodiff")]
pub trait OnAutodiffBackend {
    /// Result of the work.
    type Output;
    /// Runs on backend `B` and `devices` (the choice's devices, main device first).
    fn run<B: AutodiffBackend>(
        self,
        devices: Vec<B::Device>,
        choice: &BackendChoice,
    ) -> Self::Output;
}

#[cfg(feature = "wgpu")]
fn wgpu_device(choice: &BackendChoice) -> burn::backend::wgpu::WgpuDevice {
    wgpu_device_at(choice.index)
}

#[cfg(feature = "wgpu")]
fn wgpu_device_at(index: usize) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    let adapters = probe_wgpu().unwrap_or_default();
    match adapters.get(index).map(|a| a.slot) {
        Some(AdapterSlot::Discrete(i)) => WgpuDevice::DiscreteGpu(i),
        Some(AdapterSlot::Integrated(i)) => WgpuDevice::IntegratedGpu(i),
        Some(AdapterSlot::Virtual(i)) => WgpuDevice::VirtualGpu(i),
        Some(AdapterSlot::Cpu) => WgpuDevice::Cpu,
        None => WgpuDevice::DefaultDevice,
    }
}

/// Registers the fused CubeCL kernels of the sparse branches (feature `kernels`) for every
/// GPU backend type [`dispatch`] and [`dispatch_autodiff`] can run, and the multi-threaded
/// decode matrix-vector product for `flex` (feature `flex`); `NSA_KERNELS=0` in the
/// environment keeps the tensor-op path. Called by both; idempotent.
pub fn register_kernels() {
    #[cfg(feature = "flex")]
    nsa_model::kernels::register_flex();
    #[cfg(feature = "kernels")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            #[cfg(feature = "cuda")]
            {
                use burn::cubecl::cuda::CudaRuntime;
                use burn::tensor::{bf16, f16};
                nsa_model::kernels::register_cube::<CudaRuntime, f32, i32, u8>();
                nsa_model::kernels::register_cube::<CudaRuntime, f16, i32, u8>();
                nsa_model::kernels::register_cube::<CudaRuntime, bf16, i32, u8>();
            }
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::wgpu::WgpuRuntime;
                use burn::tensor::f16;
                nsa_model::kernels::register_cube::<WgpuRuntime, f32, i32, u32>();
                nsa_model::kernels::register_cube::<WgpuRuntime, f16, i32, u32>();
            }
        });
    }
}

/// Runs `work` on the selected backend in `precision`.
pub fn dispatch<W: OnBackend>(
    choice: &BackendChoice,
    precision: Precision,
    work: W,
) -> Result<W::Output, BackendError> {
    register_kernels();
    let kind = choice.kind;
    match (kind, precision) {
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, p) => {
            use burn::backend::cuda::{Cuda, CudaDevice};
            let device = CudaDevice::new(choice.index);
            Ok(match p {
                Precision::F32 => work.run::<Cuda<f32>>(device, choice),
                Precision::F16 => work.run::<Cuda<burn::tensor::f16>>(device, choice),
                Precision::Bf16 => work.run::<Cuda<burn::tensor::bf16>>(device, choice),
            })
        }
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, p) => {
            use burn::backend::wgpu::Wgpu;
            let device = wgpu_device(choice);
            match p {
                Precision::F32 => Ok(work.run::<Wgpu<f32>>(device, choice)),
                Precision::F16 => Ok(work.run::<Wgpu<burn::tensor::f16>>(device, choice)),
                Precision::Bf16 => Err(BackendError::Precision {
                    kind,
                    precision: p,
                    hint: " or f16",
                }),
            }
        }
        #[cfg(feature = "ndarray")]
        (BackendKind::Ndarray, Precision::F32) => {
            use burn::backend::NdArray;
            Ok(work.run::<NdArray<f32>>(Default::default(), choice))
        }
        #[cfg(feature = "flex")]
        (BackendKind::Flex, Precision::F32) => {
            use burn::backend::Flex;
            Ok(work.run::<Flex>(Default::default(), choice))
        }
        (BackendKind::Ndarray | BackendKind::Flex, p) => Err(BackendError::Precision {
            kind,
            precision: p,
            hint: "; the CPU backends compute in f32",
        }),
        (kind, _) => Err(BackendError::NotCompiled(kind)),
    }
}

/// Runs training `work` on the selected backend (f32) and devices (feature `autodiff`).
#[cfg(feature = "autodiff")]
pub fn dispatch_autodiff<W: OnAutodiffBackend>(
    choice: &BackendChoice,
    work: W,
) -> Result<W::Output, BackendError> {
    use burn::backend::Autodiff;
    register_kernels();
    let indices = if choice.devices.is_empty() {
        vec![choice.index]
    } else {
        choice.devices.clone()
    };
    match choice.kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            use burn::backend::cuda::{Cuda, CudaDevice};
            let devices = indices.iter().map(|&i| CudaDevice::new(i)).collect();
            Ok(work.run::<Autodiff<Cuda<f32>>>(devices, choice))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            use burn::backend::wgpu::Wgpu;
            let devices = indices.iter().map(|&i| wgpu_device_at(i)).collect();
            Ok(work.run::<Autodiff<Wgpu<f32>>>(devices, choice))
        }
        #[cfg(feature = "ndarray")]
        BackendKind::Ndarray => {
            use burn::backend::NdArray;
            let devices = indices.iter().map(|_| Default::default()).collect();
            Ok(work.run::<Autodiff<NdArray<f32>>>(devices, choice))
        }
        #[cfg(feature = "flex")]
        BackendKind::Flex => {
            use burn::backend::Flex;
            let devices = indices.iter().map(|_| Default::default()).collect();
            Ok(work.run::<Autodiff<Flex>>(devices, choice))
        }
        kind => Err(BackendError::NotCompiled(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("CUDA".parse::<BackendKind>(), Ok(BackendKind::Cuda));
        assert_eq!("cpu".parse::<BackendKind>(), Ok(BackendKind::cpu()));
        assert_eq!("ndarray".parse::<BackendKind>(), Ok(BackendKind::Ndarray));
        assert_eq!("flex".parse::<BackendKind>(), Ok(BackendKind::Flex));
        let err = "tpu".parse::<BackendKind>().unwrap_err();
        assert!(err.contains("tpu"), "{err}");
        assert!(
            err.ends_with("expected auto, cuda, wgpu, cpu or ndarray"),
            "{err}"
        );
        assert_eq!(BackendKind::Flex.to_string(), "cpu");
        assert!(BACKEND_HELP.contains(BACKEND_NAMES));
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("f8".parse::<Precision>().is_err());
    }

    #[test]
    fn auto_always_finds_something_with_the_cpu_compiled_in() {
        if BackendKind::cpu().compiled() {
            let s = select(DeviceRequest::default()).unwrap();
            assert!(!s.reason.is_empty());
        }
    }

    #[test]
    fn device_lists_parse_and_are_checked() {
        assert_eq!("all".parse::<DeviceList>(), Ok(DeviceList::All));
        assert_eq!(
            " 0, 1 ".parse::<DeviceList>(),
            Ok(DeviceList::Indices(vec![0, 1]))
        );
        assert!("0,x".parse::<DeviceList>().unwrap_err().contains("0,x"));
        if cfg!(feature = "ndarray") {
            let s = select_devices(BackendKind::Ndarray, &DeviceList::Indices(vec![0, 0])).unwrap();
            assert_eq!(s.devices, vec![0, 0]);
            assert!(s.reason.contains("2 replicas"), "{}", s.reason);
            let s = select_devices(BackendKind::Ndarray, &DeviceList::All).unwrap();
            assert_eq!(s.devices, vec![0]);
            let e = select_devices(BackendKind::Ndarray, &DeviceList::Indices(vec![0, 2]));
            assert!(e.unwrap_err().to_string().contains("--device 2"));
        }
    }

    #[test]
    fn cpu_has_one_device() {
        if cfg!(feature = "ndarray") {
            let err = select(DeviceRequest {
                kind: BackendKind::Ndarray,
                index: Some(3),
            })
            .unwrap_err();
            assert!(err.to_string().contains("--device 3"), "{err}");
        }
    }
}
