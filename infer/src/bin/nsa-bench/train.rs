//! The train suite: a training step of the seed model (forward, backward, AdamW). The row's
//! pass says how the loss and gradients are computed: `train-step` (unchunked logits, one
//! graph), `train-step-chunked` (the logits a chunk at a time, as nsa-train does) and
//! `train-step-recompute` (chunked, each block recomputed in the backward pass).

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use nsa_model::head_loss::DEFAULT_LOGITS_BYTES;
use nsa_model::{kernels, DsaStage, DsaTraining, Transformer, TransformerConfig};

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
    if job.imp == "dsa" {
        config.attention = nsa_model::AttentionKind::Dsa;
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
        let grads = gradients(&model, ids.clone(), &job.pass);
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

/// The gradients of one step's loss, computed as the row's pass says (a DSA model's sparse
/// step: the LM loss and the indexer loss, as nsa-train runs it).
fn gradients<B: AutodiffBackend>(
    model: &Transformer<B>,
    ids: Tensor<B, 2, Int>,
    pass: &str,
) -> GradientsParams {
    let dsa = model.config.attention == nsa_model::AttentionKind::Dsa;
    // the LM loss with the logits chunked to `bytes`, plus the indexer loss
    let objective = |bytes: u64| {
        let (loss, kl) = model.chunked_loss_staged(ids.clone(), bytes, DsaStage::Sparse, true);
        kl.map_or(loss.clone(), |kl| loss + kl)
    };
    match pass {
        "train-step-chunked" => {
            GradientsParams::from_grads(objective(DEFAULT_LOGITS_BYTES).backward(), model)
        }
        "train-step-recompute" => {
            let mut accumulator = GradientsAccumulator::<Transformer<B>>::new();
            let training = DsaTraining::default();
            model.loss_backward_recomputed_staged(ids, DEFAULT_LOGITS_BYTES, 1.0, training, |g| {
                accumulator.accumulate(model, GradientsParams::from_grads(g, model))
            });
            accumulator.grads()
        }
        _ if dsa => GradientsParams::from_grads(objective(u64::MAX).backward(), model),
        _ => GradientsParams::from_grads(model.loss(ids).backward(), model),
    }
}
