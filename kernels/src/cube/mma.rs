//! Tensor-core tiles: `C = A · B` between shared-memory matrices with CubeCL's cooperative
//! matrix instructions (`cmma`, CUDA's WMMA), accumulated in f32: 16 × 16 × 16 fragments of
//! bf16 / f16 for half-precision storage, 16 × 16 × 8 fragments of tf32 for f32 storage (the
//! precision of the tensor-op path's matmuls on CUDA).
//!
//! The attention kernels call [`mma_tiles`] for their products (scores `Q Kᵀ`, outputs `P V`,
//! the gradients' `dO Vᵀ`, `dS K`, `Pᵀ dO`, `dSᵀ Q`) when [`super::attention::Tiling::mma`] is set,
//! which the host does only where CubeCL lists the fragment for the device
//! (`features.matmul.cmma`: CUDA's WMMA, checked on an H200; WGSL has none). The scalar
//! products stay the path of every other device.
//!
//! Strides: WMMA wants row strides that are multiples of 16 bytes and fragment pointers aligned
//! to 32 bytes, which the strides of [`tile_stride`] / [`acc_stride`] and the fragment offsets
//! keep (the shared arrays are declared 128-byte aligned).

use cubecl::prelude::*;

/// Fragment edge (`m`, `n`); the depth `k` is [`depth`].
pub const FRAG: usize = 16;

/// Fragment depth for tile elements of `bytes` bytes: 16 for bf16/f16, 8 for tf32.
pub fn depth(bytes: usize) -> usize {
    if bytes == 4 {
        8
    } else {
        16
    }
}

/// Row stride of a shared operand tile of `cols` columns: padded by 8 elements so that the
/// rows a fragment load reads start in different banks.
pub fn tile_stride(cols: usize) -> usize {
    cols + 8
}

/// Row stride of an f32 shared tile of `cols` columns that fragments are stored to.
pub fn acc_stride(cols: usize) -> usize {
    cols + 4
}

fn layout(transposed: bool) -> cmma::MatrixLayout {
    if transposed {
        cmma::MatrixLayout::ColMajor
    } else {
        cmma::MatrixLayout::RowMajor
    }
}

/// `C[m, n] = A[m, k] · B[k, n]`, f32 `C` row-major with stride `sc` from word `c0`, every
/// plane (warp) of the cube taking 16 × 16 output tiles in turn. `A` is row-major with stride `sa` or, with `a_t`,
/// stored transposed (`[k, m]`, stride `sa`); `B` is row-major `[k, n]` with stride `sb` or,
/// with `b_t`, stored as `[n, k]`. `m`, `n` are multiples of 16, `k` of the fragment depth
/// `kf` ([`depth`] of the element `E`). Callers put a barrier
/// before (the operands written) and after (`C` read by other units).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma_tiles<E: Float>(
    a: &SharedMemory<E>,
    b: &SharedMemory<E>,
    c: &mut SharedMemory<f32>,
    #[comptime] m: usize,
    #[comptime] n: usize,
    #[comptime] k: usize,
    #[comptime] sa: usize,
    #[comptime] sb: usize,
    #[comptime] sc: usize,
    #[comptime] c0: usize,
    #[comptime] a_t: bool,
    #[comptime] b_t: bool,
    #[comptime] kf: usize,
) {
    let tn = comptime!(n / FRAG);
    let tiles = comptime!((m / FRAG) * (n / FRAG));
    let steps = comptime!(k / kf);
    let alen = a.len();
    let blen = b.len();
    let clen = c.len();
    let a_layout = comptime!(layout(a_t));
    let b_layout = comptime!(layout(b_t));
    let planes = (CUBE_DIM / PLANE_DIM) as usize;
    let mut g = (UNIT_POS / PLANE_DIM) as usize;
    while g < tiles {
        let i0 = (g / tn) * FRAG;
        let j0 = (g % tn) * FRAG;
        let acc = cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            kf,
            cmma::MatrixLayout::Undefined,
            0.0,
        );
        #[unroll]
        for s in 0..steps {
            let k0 = s * kf;
            let mut a_off = i0 * sa + k0;
            if a_t {
                a_off = k0 * sa + i0;
            }
            let mut b_off = k0 * sb + j0;
            if b_t {
                b_off = j0 * sb + k0;
            }
            let fa = cmma::Matrix::<E>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                kf,
                a_layout,
                &a.slice(a_off, alen),
                sa as u32,
            );
            let fb = cmma::Matrix::<E>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                kf,
                b_layout,
                &b.slice(b_off, blen),
                sb as u32,
            );
            cmma::execute::<E, E, f32, f32>(&fa, &fb, &acc, &acc);
        }
        let c_off = c0 + i0 * sc + j0;
        cmma::store(
            &mut c.slice_mut(c_off, clen),
            &acc,
            sc as u32,
            cmma::MatrixLayout::RowMajor,
        );
        g += planes;
    }
}
