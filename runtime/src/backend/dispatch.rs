//! Running generic work on the chosen backend: [`OnBackend`] / [`dispatch`] for inference,
//! [`OnAutodiffBackend`] / [`dispatch_autodiff`] for training (feature `autodiff`), and the
//! registration of the fused kernels both do first.

use burn::prelude::Backend;
#[cfg(feature = "autodiff")]
use burn::tensor::backend::AutodiffBackend;

#[cfg(feature = "wgpu")]
use super::probe::{probe_wgpu, AdapterSlot};
use super::{BackendChoice, BackendError, BackendKind, Precision};

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
    limited(wgpu_device_at(choice.index), choice)
}

/// `device`, its memory pools capped first when the choice forces a buffer limit.
#[cfg(feature = "wgpu")]
fn limited(
    device: burn::backend::wgpu::WgpuDevice,
    choice: &BackendChoice,
) -> burn::backend::wgpu::WgpuDevice {
    if let Some(limit) = choice.forced_buffer_limit {
        super::limits::init_wgpu_limited(&device, limit);
    }
    device
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
            let devices = indices
                .iter()
                .map(|&i| limited(wgpu_device_at(i), choice))
                .collect();
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
