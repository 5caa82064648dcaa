//! The check suite: the fused kernels against the tensor-op path, forward and gradients.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use nsa_model::interop::HostTensor;
use nsa_model::kernels::{self, KernelOptions, Kernels};
use nsa_runtime::backend::Precision;

use crate::rows::{row_of, Job, Row};

/// Kernel path vs tensor-op path on this device: one layer's output and gradients.
pub fn check_row<B: AutodiffBackend>(job: &Job, device: &B::Device) -> Row {
    let mut row = row_of(job);
    row.kernels = Some(kernels::registered::<B>());
    if !kernels::registered::<B>() {
        row.status = "skipped".into();
        row.note = "no fused kernels for this backend".into();
        return row;
    }
    B::seed(device, 7);
    let l = &job.layer;
    let mut worst_abs = 0.0f64;
    let mut worst_rel = 0.0f64;
    let mut notes = Vec::new();
    // the benchmark layer, a no-share GQA variant and differentiable top-k
    let mut variants = vec![("bench", l.nsa())];
    let mut c = l.nsa();
    c.query_heads_share_selected_kv = false;
    variants.push(("noshare", c));
    let mut c = l.nsa();
    c.use_diff_topk = true;
    variants.push(("difftopk", c));
    variants.retain(|(name, _)| job.variants.is_empty() || job.variants.iter().any(|v| v == name));
    if variants.len() < 3 {
        let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
        notes.push(format!("variants {}", names.join(",")));
    }
    let mut failed = false;
    for (name, config) in variants {
        let layer = match config.init::<B>(device) {
            Ok(layer) => layer,
            Err(e) => {
                // a variant that cannot be built is a failed check, not a skipped one
                notes.push(format!("{name}: {e}"));
                failed = true;
                continue;
            }
        };
        let x = Tensor::<B, 3>::random(
            [job.batch, job.seq, config.dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let w = Tensor::<B, 3>::random(
            [job.batch, job.seq, config.dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let run = |fused: bool| {
            let path = Kernels::new(&KernelOptions {
                fused,
                ..job.options
            });
            let x = x.clone().require_grad();
            let out = layer.forward_with(&path, x.clone());
            let grads = (out.clone() * w.clone()).sum().backward();
            let gx = x.grad(&grads).expect("input gradient");
            let gw = layer
                .to_qkv
                .weight
                .val()
                .grad(&grads)
                .expect("qkv gradient");
            let out = HostTensor::from_tensor(out);
            let gx = HostTensor::from_tensor(gx);
            let gw = HostTensor::from_tensor(gw);
            (out, gx, gw)
        };
        let fused = run(true);
        let reference = run(false);
        for (what, a, r) in [
            ("out", &fused.0, &reference.0),
            ("grad(x)", &fused.1, &reference.1),
            ("grad(qkv)", &fused.2, &reference.2),
        ] {
            // the shared rule: a NaN or infinity on either side is an infinite error
            let c = match a.compare(r) {
                Ok(c) => c,
                Err(e) => {
                    notes.push(format!("{name} {what}: {e}"));
                    failed = true;
                    continue;
                }
            };
            let rel = c.relative(CHECK_FLOOR);
            println!(
                "check {:5} seq {:6} {name:8} {what:9} {c}  rel {rel:.3e}",
                job.precision, job.seq
            );
            if !c.finite() {
                notes.push(format!("{name} {what}: {c}"));
            }
            // a NaN (or infinite) error stays the worst
            if c.max_abs.is_nan() || c.max_abs > worst_abs {
                worst_abs = c.max_abs;
            }
            if rel.is_nan() || rel > worst_rel {
                worst_rel = rel;
            }
        }
    }
    row.max_abs_err = Some(worst_abs);
    row.max_rel_err = Some(worst_rel);
    row.finite = Some(worst_abs.is_finite());
    let tol = check_tolerance(job.precision);
    row.status = if !failed && worst_rel <= tol {
        "ok"
    } else {
        "mismatch"
    }
    .into();
    row.note = notes.join("; ");
    row
}

/// Floor of the check's per-tensor relative errors (`max_abs / max(max|reference|, floor)`).
pub const CHECK_FLOOR: f64 = 1e-6;

/// The check's tolerance on the per-tensor relative error: f32 kernels against f32 tensor ops,
/// half-precision kernels (bf16/f16 storage, f32 accumulation) against half-precision tensor ops.
pub fn check_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-3,
        _ => 5e-2,
    }
}
