//! The layer suite: one attention layer (NSA with the fused kernels, NSA with tensor ops, dense
//! attention), forward or forward and backward.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use nsa_model::{DsaAttention, DsaSettings, FullAttention};

use crate::measure::{flop_floor, time_row};
use crate::rows::{row_of, Job, Row};

#[allow(clippy::large_enum_variant)]
pub enum Layer<B: Backend> {
    Nsa(nsa_model::SparseAttention<B>),
    Full(FullAttention<B>),
    Dsa(DsaAttention<B>),
}

impl<B: Backend> Layer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Nsa(a) => a.forward(x),
            Self::Full(a) => a.forward(x),
            Self::Dsa(a) => a.forward(x),
        }
    }
}

/// The layer and a random input of the row.
pub fn layer_setup<B: Backend>(job: &Job, device: &B::Device) -> Result<(Layer<B>, Tensor<B, 3>)> {
    B::seed(device, 42);
    let l = &job.layer;
    let x = Tensor::<B, 3>::random(
        [job.batch, job.seq, l.dim],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let layer = if job.imp == "full" {
        let mut full = FullAttention::new(l.dim, l.dim_head, l.heads, l.kv_heads, device);
        full.kernel_options = job.options;
        Layer::Full(full)
    } else if job.imp == "dsa" {
        let settings = DsaSettings::default();
        let mut dsa = DsaAttention::new(l.dim, l.dim_head, l.heads, l.kv_heads, &settings, device);
        dsa.kernel_options = job.options;
        Layer::Dsa(dsa)
    } else {
        let mut nsa = l.nsa().init::<B>(device)?;
        nsa.kernel_options = job.options;
        Layer::Nsa(nsa)
    };
    Ok((layer, x))
}

/// Forward only (no autodiff).
pub fn layer_fwd_row<B: Backend>(job: &Job, device: &B::Device) -> Row {
    let row = row_of(job);
    let (layer, x) = match layer_setup::<B>(job, device) {
        Ok(s) => s,
        Err(e) => {
            return Row {
                status: "error".into(),
                note: format!("{e:#}"),
                ..row
            }
        }
    };
    let mut row = time_row::<B>(job, device, row, || drop(layer.forward(x.clone())));
    let (floor, peak) = flop_floor(job, false);
    row.flop_floor_ms = Some(floor);
    row.flop_peak_tflops = Some(peak);
    row
}

/// Forward and backward of `mean(layer(x))` (the gradients are computed and dropped).
pub fn layer_bwd_row<B: AutodiffBackend>(job: &Job, device: &B::Device) -> Row {
    let row = row_of(job);
    let (layer, x) = match layer_setup::<B>(job, device) {
        Ok(s) => s,
        Err(e) => {
            return Row {
                status: "error".into(),
                note: format!("{e:#}"),
                ..row
            }
        }
    };
    let mut row = time_row::<B>(job, device, row, || {
        let out = layer.forward(x.clone().require_grad());
        drop(out.mean().backward());
    });
    let (floor, peak) = flop_floor(job, true);
    row.flop_floor_ms = Some(floor);
    row.flop_peak_tflops = Some(peak);
    row
}
