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

mod dispatch;
mod limits;
mod memory;
mod probe;

pub use dispatch::{dispatch, register_kernels, OnBackend};
#[cfg(feature = "autodiff")]
pub use dispatch::{dispatch_autodiff, OnAutodiffBackend};
pub use limits::mib;
pub use memory::{device_pool, free_memory, human_bytes, peak_rss};
pub use probe::{
    probe_cuda, probe_wgpu, quiet_headless_probe, Adapter, AdapterLimits, AdapterSlot,
};

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
    /// The largest single tensor the device allocates, in bytes: a wgpu adapter's storage
    /// binding limit, or the limit forced by [`BackendChoice::limit_buffers`] when lower;
    /// `None` where only the device memory bounds it (CUDA, the CPU).
    pub max_tensor_bytes: Option<u64>,
    /// A limit forced below the device's (`--max-buffer-mib`, for testing): on wgpu the
    /// device's memory pools then refuse larger buffers.
    pub forced_buffer_limit: Option<u64>,
}

impl BackendChoice {
    /// Forces the largest single buffer down to `bytes` (no change for `None`).
    pub fn limit_buffers(mut self, bytes: Option<u64>) -> Self {
        if let Some(b) = bytes {
            self.forced_buffer_limit = Some(b);
            self.max_tensor_bytes = Some(self.max_tensor_bytes.map_or(b, |m| m.min(b)));
        }
        self
    }
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
                        max_tensor_bytes: None,
                        forced_buffer_limit: None,
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
                            max_tensor_bytes: Some(a.limits.max_tensor()),
                            forced_buffer_limit: None,
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
                    max_tensor_bytes: None,
                    forced_buffer_limit: None,
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
                max_tensor_bytes: None,
                forced_buffer_limit: None,
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
                max_tensor_bytes: Some(a.limits.max_tensor()),
                forced_buffer_limit: None,
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
                max_tensor_bytes: None,
                forced_buffer_limit: None,
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
