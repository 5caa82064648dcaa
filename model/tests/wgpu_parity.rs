//! Reference parity on wgpu (WGSL; in CI on software Vulkan, lavapipe). Shapes are the small
//! fixtures because software Vulkan is slow. Run with `cargo test -p nsa-model --features wgpu`.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::Autodiff;
use common::*;

type B = Autodiff<Wgpu>;

#[test]
fn layer_fixtures_match_the_reference_on_wgpu() {
    let device = WgpuDevice::default();
    for name in [
        "gqa2_overlap_seq77",
        "difftopk_seq77",
        "gqa4_noshare_seq130",
    ] {
        let e = layer_errors::<B>(name, &device);
        println!(
            "wgpu {name:28} output {:.2e}  grad(input) {:.2e}  grad(params) {:.2e} ({})",
            e.output, e.grad_input, e.grad_params.0, e.grad_params.1
        );
        assert!(e.within(WGPU_TOLERANCE), "{name}: {e:?}");
    }
}

#[test]
fn transformer_fixtures_match_the_reference_on_wgpu() {
    let device = WgpuDevice::default();
    // DSA: the tensor-op path, top-k ranked on the host (wgpu_dsa.rs: ranked on the device)
    for name in [
        "transformer_nsa",
        "transformer_full",
        "dsa_gqa_window_seq40",
        "dsa_nowindow_seq30",
    ] {
        let e = transformer_errors::<B>(name, &device);
        println!(
            "wgpu {name:28} logits {:.2e}  loss {:.2e}  grad(params) {:.2e} ({})",
            e.logits, e.loss, e.grads.0, e.grads.1
        );
        assert!(e.within(WGPU_TOLERANCE), "{name}: {e:?}");
    }
}

/// Cached decoding through the tensor ops on wgpu (no kernels registered in this binary) equals
/// the full forward, for every attention kind (a step has one position: layouts of length-1 axes
/// that Burn's fused wgpu kernels misread once made DSA's steps wrong).
#[test]
fn cached_decoding_on_wgpu_equals_recompute() {
    let device = WgpuDevice::default();
    for name in [
        "transformer_nsa",
        "transformer_full",
        "dsa_gqa_window_seq40",
    ] {
        let worst = cached_decoding_error::<Wgpu>(name, 5, &device);
        println!("wgpu {name:28} steps vs forward {worst:.2e}");
        assert!(worst <= 1e-4, "{name}: a step differs by {worst}");
    }
}
