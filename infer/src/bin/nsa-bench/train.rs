//! The train suite: a training step of the seed model (forward, backward, AdamW).

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use nsa_model::{kernels, TransformerConfig};

use crate::measure::{device_pool, stats, sync};
use crate::rows::{row_of, Job, Row};

pub fn train_row<B: AutodiffBackend>(job: &Job, device: &B::Device, started: Instant) -> Row {
    let mut row = row_of(job);
    row.kernels = Some(kernels::registered::<B>() && job.options.fused);
    B::seed(device, 42);
    let mut config = TransformerConfig::new(21128, 512, 6);
    if job.imp == "full" {
        config.attention = nsa_model::AttentionKind::Full;
    }
    let mut model = match config.init::<B>(device) {
        Ok(m) => m.with_kernel_options(job.options),
        Err(e) => {
            row.status = "error".into();
            row.note = e.to_string();
            return row;
        }
    };
    let mut optim = AdamWConfig::new().init::<B, nsa_model::Transformer<B>>();
    let ids = Tensor::<B, 2, Int>::random(
        [job.batch, job.seq + 1],
        Distribution::Uniform(0.0, 21128.0),
        device,
    );
    let mut times = Vec::new();
    let mut ends = Vec::new();
    let mut peak = None;
    for _ in 0..job.warmup + job.runs {
        sync::<B>(device);
        let t = Instant::now();
        let loss = model.loss(ids.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        sync::<B>(device);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ends.push(started.elapsed().as_secs_f64());
        if let Some((reserved, _)) = device_pool(device) {
            peak = Some(peak.unwrap_or(0).max(reserved));
        }
    }
    let timed = &times[job.warmup..];
    let (median, min) = stats(timed);
    row.ms_first = Some(times[0]);
    row.ms_median = Some(median);
    row.ms_min = Some(min);
    row.ms_all = timed.to_vec();
    row.reserved_mem_bytes = peak;
    row.tokens_per_s = Some((job.seq * job.batch) as f64 / (median / 1e3));
    row.startup_s = times
        .iter()
        .zip(&ends)
        .find(|(t, _)| **t <= median * 1.1)
        .map(|(_, e)| *e);
    row.status = "ok".into();
    row
}
