//! Reference parity on the CPU (ndarray, f32): every fixture of `assets/fixtures/`, written by
//! `scripts/make_fixtures.py` from native-sparse-attention-pytorch 0.2.3 (float64), must match:
//! every output, loss and gradient (input and each parameter) within `CPU_TOLERANCE` relative to
//! that tensor's largest magnitude (`common::rel_err`).

mod common;

use burn::backend::{Autodiff, NdArray};
use common::*;

type B = Autodiff<NdArray<f32>>;

#[test]
fn every_layer_fixture_matches_the_reference() {
    let device = Default::default();
    let names = layer_fixtures();
    assert!(
        names.len() >= 8,
        "expected at least 8 layer fixtures, found {names:?}"
    );
    let mut failures = Vec::new();
    for name in &names {
        let e = layer_errors::<B>(name, &device);
        println!(
            "{name:32} output {:.2e}  grad(input) {:.2e}  grad(params) {:.2e} ({})",
            e.output, e.grad_input, e.grad_params.0, e.grad_params.1
        );
        if !e.within(CPU_TOLERANCE) {
            failures.push(format!("{name}: {e:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn transformer_fixtures_match_the_reference() {
    let device = Default::default();
    for name in ["transformer_nsa", "transformer_full"] {
        let e = transformer_errors::<B>(name, &device);
        println!(
            "{name:32} logits {:.2e}  loss {:.2e}  grad(params) {:.2e} ({})",
            e.logits, e.loss, e.grads.0, e.grads.1
        );
        assert!(e.within(CPU_TOLERANCE), "{name}: {e:?}");
    }
}
