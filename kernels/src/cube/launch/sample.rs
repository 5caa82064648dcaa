//! Launch of the device sampler.

use super::*;

/// A [`crate::cube::sample::sample_rows`] launch: `m` rows of `v` logits.
#[derive(Clone, Debug)]
pub struct SampleProblem {
    pub m: usize,
    pub v: usize,
    pub rule: crate::api::DeviceSampling,
    pub key: u64,
}

/// Most logits a sampler unit holds in registers (beyond that every pass reads them again).
pub const SAMPLE_REGISTERS: usize = 32;

/// The next token of each row of `logits` `[m, v]` → `[m]` in `int_dtype`.
pub fn sample<R: CubeRuntime>(
    logits: CubeTensor<R>,
    p: &SampleProblem,
    int_dtype: DType,
) -> CubeTensor<R> {
    let logits = into_contiguous(logits);
    let dtype = logits.dtype;
    let out = empty(&logits, vec![p.m], int_dtype);
    let kept = p.rule.kept.clamp(1, p.v.max(1));
    // 1024 units where the device has them: each unit then scans 4x fewer logits per pass
    let big = logits.client.properties().hardware.max_units_per_cube >= 1024;
    let group = if big { 32 } else { 16 };
    let filter = !p.rule.greedy && kept < p.v;
    let per = p.v.div_ceil(group * group);
    let tiling = crate::cube::sample::SampleTiling {
        group,
        greedy: p.rule.greedy,
        filter,
        per: if filter && per <= SAMPLE_REGISTERS {
            per
        } else {
            0
        },
    };
    let bits = usize::BITS - p.v.leading_zeros();
    let client = logits.client.clone();
    // SAFETY: one cube per row (`m`), every index `< v` of its row; one id written per row.
    unsafe {
        crate::cube::sample::sample_rows::launch_unchecked::<R>(
            &client,
            CubeCount::Static(p.m as u32, 1, 1),
            CubeDim::new_1d((group * group) as u32),
            logits.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            p.v,
            kept as u32,
            bits,
            p.rule.inv_temp,
            p.key as u32,
            (p.key >> 32) as u32,
            tiling,
            [dtype.into(), int_dtype.into()],
        );
    }
    out
}
