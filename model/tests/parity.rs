//! Reference parity on the CPU (ndarray, f32): every fixture of `assets/fixtures/`, written by
//! `scripts/make_fixtures.py` from native-sparse-attention-pytorch 0.2.3 (float64), must match to
//! 1e-4 (outputs) and 1e-3 (gradients).

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
            "{name:32} output {:.2e}  grad(input) {:.2e}  grad(params, rel) {:.2e}",
            e.output, e.grad_input, e.grad_params
        );
        if e.output > 1e-4 || e.grad_input > 1e-3 || e.grad_params > 1e-3 {
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
        let (logits, loss, grads) = transformer_errors::<B>(name, &device);
        println!("{name:32} logits {logits:.2e}  loss {loss:.2e}  grad(params, rel) {grads:.2e}");
        assert!(logits <= 1e-4, "{name}: logits differ by {logits}");
        assert!(loss <= 1e-4, "{name}: loss differs by {loss}");
        assert!(grads <= 1e-3, "{name}: gradients differ by {grads}");
    }
}
