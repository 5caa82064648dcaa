//! The gradient of an NSA layer against central finite differences, in f64 on the CPU.
//!
//! In its own test binary: burn 0.21's ndarray backends share one device, and a process that
//! also runs f32 tests may create this test's tensors in f32 (then the finite differences see
//! f32 rounding).
//!
//! The layer is not smooth everywhere: the compression MLP has a ReLU and the selection branch a
//! top-n. A step that crosses one of those points gives a finite difference that is no
//! derivative (with steps of 1e-5 about one random draw in 40 did, and CI failed on one). Each
//! check therefore takes steps of 1e-5, 1e-6 and 1e-7: where two neighbouring steps agree the
//! loss is smooth there and the analytic value must match; where none do, the check draws a new
//! direction (a few times, then fails). A wrong gradient fails: its finite differences agree
//! with each other and not with it. The backend's generator is seeded, and the tests take
//! turns, so a failure reproduces.

mod common;

use std::sync::Mutex;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::Distribution;
use common::random::{random_config, Rng};

type B64 = Autodiff<NdArray<f64>>;

/// The backend's generator is one per process: the tests take turns so that each one's draws
/// depend on its seed alone.
static TURN: Mutex<()> = Mutex::new(());

/// Central differences with these steps, widest first. Two neighbouring steps that agree show
/// the loss smooth on the wider one's interval, and the wider one's value (less rounding) is
/// compared; rounding at 1e-7 is still ≈ 1e-9 of the loss.
const STEPS: [f64; 3] = [1e-5, 1e-6, 1e-7];
/// Directions drawn before a check gives up on finding one along which the loss is smooth.
const DIRECTIONS: usize = 4;
/// Largest relative error allowed, relative to `max(|numeric|, FLOOR)`.
const TOLERANCE: f64 = 1e-5;
const FLOOR: f64 = 1e-3;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOLERANCE * b.abs().max(FLOOR)
}

/// One directional derivative checked against finite differences.
struct Check {
    analytic: f64,
    numeric: f64,
    /// Directions left out because a step crossed a point where the loss is not smooth.
    kinks: usize,
}

impl Check {
    fn ok(&self) -> bool {
        self.analytic.is_finite() && self.numeric.is_finite() && close(self.analytic, self.numeric)
    }
}

/// Draws a direction (`draw`), takes `analytic(direction)` and central differences of
/// `loss(direction, t)` at `t = ±step` for every step of [`STEPS`]; the first two neighbouring
/// steps that agree give the numeric value. Where none do (the steps cross a kink or a jump: a
/// ReLU input or a top-n score within 1e-6 of its switch), it draws a new direction; panics when
/// no direction of [`DIRECTIONS`] is smooth.
fn check<D>(
    mut draw: impl FnMut() -> D,
    analytic: impl Fn(&D) -> f64,
    loss: impl Fn(&D, f64) -> f64,
) -> Check {
    for kinks in 0..DIRECTIONS {
        let dir = draw();
        let numeric = STEPS.map(|step| (loss(&dir, step) - loss(&dir, -step)) / (2.0 * step));
        if let Some(pair) = numeric.windows(2).find(|pair| close(pair[0], pair[1])) {
            return Check {
                analytic: analytic(&dir),
                numeric: pair[0],
                kinks,
            };
        }
    }
    panic!("{DIRECTIONS} random directions all crossed a point where the loss is not smooth");
}

#[test]
fn gradients_match_finite_differences() {
    let _turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Default::default();
    B64::seed(&device, 42);
    let mut rng = Rng(42);
    for case in 0..4 {
        let mut config = random_config(&mut rng);
        // straight-through top-k is a deliberately biased gradient: no finite-difference match
        config.use_diff_topk = false;
        let layer = config.init::<B64>(&device).unwrap();
        let n = rng.range(5, 40);
        let normal =
            || Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let x = normal();
        let r = normal();
        let loss = |x: Tensor<B64, 3>| (layer.forward(x) * r.clone()).sum();
        let xg = x.clone().require_grad();
        let grads = loss(xg.clone()).backward();
        let grad = xg.grad(&grads).unwrap();
        let c = check(
            normal,
            |dir| (grad.clone() * dir.clone().inner()).sum().into_scalar(),
            |dir, t| loss(x.clone() + dir.clone().mul_scalar(t)).into_scalar(),
        );
        println!(
            "case {case} input  analytic {:+.6e} numeric {:+.6e} ({} directions left out)",
            c.analytic, c.numeric, c.kinks
        );
        assert!(
            c.ok(),
            "case {case}: directional derivative {} vs finite difference {} ({config:?})",
            c.analytic,
            c.numeric
        );
    }
}

type Layer = nsa_model::SparseAttention<B64>;
/// Picks one parameter of a layer.
type Get<const D: usize> = for<'a> fn(&'a mut Layer) -> &'a mut burn::module::Param<Tensor<B64, D>>;

/// The directional derivative of `loss` along a random direction of one parameter (picked by
/// `param`) against central finite differences.
fn parameter_check<const D: usize>(
    layer: &Layer,
    param: Get<D>,
    loss: &dyn Fn(&Layer) -> Tensor<B64, 1>,
    grads: &<B64 as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Check {
    let device = Default::default();
    let mut probe = layer.clone();
    let value = param(&mut probe).val();
    let grad = value.grad(grads).expect("the parameter has a gradient");
    check(
        || Tensor::<B64, D>::random(value.dims(), Distribution::Normal(0.0, 1.0), &device),
        |dir| (grad.clone() * dir.clone().inner()).sum().into_scalar(),
        |dir, t| {
            let mut l = layer.clone();
            *param(&mut l) = burn::module::Param::from_tensor(
                (value.clone() + dir.clone().mul_scalar(t)).detach(),
            );
            loss(&l).into_scalar()
        },
    )
}

/// The gradients of the small parameters of the compressed branch (the compression MLPs, the
/// intra-block positions, the memory key/values) against central finite differences, one
/// parameter at a time, in f64 on the CPU; lengths with several complete blocks so that every
/// one of them is in the graph.
#[test]
fn parameter_gradients_match_finite_differences() {
    let _turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Default::default();
    B64::seed(&device, 7);
    let mut rng = Rng(7);
    for case in 0..3 {
        let mut config = random_config(&mut rng);
        config.use_diff_topk = false;
        let mut layer = config.init::<B64>(&device).unwrap();
        // the memory and position parameters start at zero: give them values
        let c = &mut layer.compress;
        for p in [&mut c.k_intrablock_positions, &mut c.v_intrablock_positions] {
            *p = burn::module::Param::from_tensor(
                p.val().random_like(Distribution::Normal(0.0, 0.5)),
            );
        }
        c.compress_mem_kv = burn::module::Param::from_tensor(
            c.compress_mem_kv
                .val()
                .random_like(Distribution::Normal(0.0, 0.5)),
        );
        let n = rng.range(3 * config.compress_block_size + 2, 40);
        let x = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<B64, 3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
        let loss = |l: &Layer| (l.forward(x.clone()) * r.clone()).sum();
        let grads = loss(&layer).backward();
        let mut checks: Vec<(&str, Check)> = vec![
            (
                "k_intrablock_positions",
                parameter_check(
                    &layer,
                    |l| &mut l.compress.k_intrablock_positions,
                    &loss,
                    &grads,
                ),
            ),
            (
                "v_intrablock_positions",
                parameter_check(
                    &layer,
                    |l| &mut l.compress.v_intrablock_positions,
                    &loss,
                    &grads,
                ),
            ),
            (
                "compress_mem_kv",
                parameter_check(&layer, |l| &mut l.compress.compress_mem_kv, &loss, &grads),
            ),
        ];
        for (name, get) in [
            (
                "k_compress.fc1.weight",
                (|l: &mut Layer| &mut l.compress.k_compress.fc1.weight) as Get<2>,
            ),
            ("k_compress.fc2.weight", |l: &mut Layer| {
                &mut l.compress.k_compress.fc2.weight
            }),
            ("v_compress.fc1.weight", |l: &mut Layer| {
                &mut l.compress.v_compress.fc1.weight
            }),
            ("v_compress.fc2.weight", |l: &mut Layer| {
                &mut l.compress.v_compress.fc2.weight
            }),
        ] {
            checks.push((name, parameter_check(&layer, get, &loss, &grads)));
        }
        for (name, get) in [
            (
                "k_compress.fc1.bias",
                (|l: &mut Layer| l.compress.k_compress.fc1.bias.as_mut().unwrap()) as Get<1>,
            ),
            ("k_compress.fc2.bias", |l: &mut Layer| {
                l.compress.k_compress.fc2.bias.as_mut().unwrap()
            }),
            ("v_compress.fc1.bias", |l: &mut Layer| {
                l.compress.v_compress.fc1.bias.as_mut().unwrap()
            }),
            ("v_compress.fc2.bias", |l: &mut Layer| {
                l.compress.v_compress.fc2.bias.as_mut().unwrap()
            }),
        ] {
            checks.push((name, parameter_check(&layer, get, &loss, &grads)));
        }
        for (name, c) in checks {
            println!(
                "case {case} {name:24} analytic {:+.6e} numeric {:+.6e} ({} directions left out)",
                c.analytic, c.numeric, c.kinks
            );
            assert!(
                c.ok(),
                "case {case}, {name}: directional derivative {} vs finite difference {} ({config:?})",
                c.analytic,
                c.numeric
            );
        }
    }
}
