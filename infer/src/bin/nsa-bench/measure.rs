//! Timing and memory: synced clocks, medians, the device pool's reserved bytes and the FLOP
//! floor of a row.

use std::time::Instant;

use burn::prelude::*;
use nsa_infer::bench_cli::LayerArgs;
use nsa_model::kernels;
use nsa_runtime::backend::Precision;

use crate::rows::{Job, Row};

pub use nsa_runtime::backend::device_pool;

pub fn sync<B: Backend>(device: &B::Device) {
    if let Err(e) = B::sync(device) {
        panic!("device sync failed: {e:?}");
    }
}

/// Median, minimum.
pub fn stats(times: &[f64]) -> (f64, f64) {
    let mut t = times.to_vec();
    t.sort_by(|a, b| a.total_cmp(b));
    let mid = t.len() / 2;
    let median = if t.len().is_multiple_of(2) {
        (t[mid - 1] + t[mid]) / 2.0
    } else {
        t[mid]
    };
    (median, t[0])
}

/// Times `run` (warm-up excluded) and fills the timing and memory fields of `row`.
pub fn time_row<B: Backend>(job: &Job, device: &B::Device, mut row: Row, run: impl Fn()) -> Row {
    row.kernels = Some(kernels::registered::<B>() && job.options.fused);
    sync::<B>(device);
    let mut times = Vec::new();
    let mut peak = device_pool(device).map(|m| m.0);
    for i in 0..job.warmup + job.runs {
        let t = Instant::now();
        run();
        sync::<B>(device);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            row.ms_first = Some(ms);
        }
        if i >= job.warmup {
            times.push(ms);
        }
        if let Some((reserved, _)) = device_pool(device) {
            peak = Some(peak.unwrap_or(0).max(reserved));
        }
    }
    let (median, min) = stats(&times);
    row.ms_median = Some(median);
    row.ms_min = Some(min);
    row.ms_all = times;
    row.reserved_mem_bytes = peak;
    row.status = "ok".into();
    row
}

/// Dense tensor-core peak of an H100/H200 SXM for `precision`, TFLOP/s: bf16 and f16 989.4,
/// f32 as TF32 494.7 (NVIDIA's H100 SXM figures without sparsity; the H200 has the same
/// compute).
pub fn peak_tflops(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 494.7,
        _ => 989.4,
    }
}

/// The FLOP floor of `job` (ms) and the peak it assumes (TFLOP/s).
pub fn flop_floor(job: &Job, backward: bool) -> (f64, f64) {
    let flops = layer_flops(&job.imp, &job.layer, job.seq) * job.batch as f64;
    let flops = if backward { flops * 3.0 } else { flops };
    let peak = peak_tflops(job.precision);
    (flops / (peak * 1e12) * 1e3, peak)
}

/// Forward FLOPs of one layer (matmuls only).
pub fn layer_flops(imp: &str, l: &LayerArgs, n: usize) -> f64 {
    let (n, h, kvh, dh, dim) = (
        n as f64,
        l.heads as f64,
        l.kv_heads as f64,
        l.dim_head as f64,
        l.dim as f64,
    );
    let proj = 2.0 * n * dim * (h + 2.0 * kvh) * dh + 2.0 * n * h * dh * dim;
    if imp == "full" {
        // causal: half of the n×n scores, QK and PV
        return proj + 2.0 * 2.0 * h * n * n * dh / 2.0;
    }
    if imp == "dsa" {
        // the default [model.dsa]: the indexer over half of the n×n pairs (4 heads of dh, its
        // own projections), then top-k and window attention
        let d = nsa_model::DsaSettings::default();
        let (j, e) = (d.index_heads as f64, dh);
        let indexer = 2.0 * n * dim * (j * e + e + j) + 2.0 * j * n * n * e / 2.0;
        let attention = 4.0 * h * n * (d.top_k as f64 + d.window as f64 + 1.0) * dh;
        return proj + indexer + attention + 2.0 * n * dim * h;
    }
    let blocks = n / l.stride as f64;
    let hidden = (l.compress_block * l.dim_head) as f64;
    let mlp = 2.0 * 2.0 * kvh * blocks * (hidden * hidden + hidden * dh);
    let compressed = 4.0 * h * n * blocks / 2.0 * dh;
    let selected = 4.0 * h * n * (l.selected as f64 + 0.5) * l.selection_block as f64 * dh;
    let sliding = 4.0 * h * n * (l.window as f64 + 1.0) * dh;
    proj + mlp + compressed + selected + sliding
}
