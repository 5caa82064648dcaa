//! DeepSeek sparse attention (`attention = "dsa"`) against its PyTorch reference on the CPU
//! (ndarray, f32): every fixture of `assets/fixtures/dsa_*`, written by
//! `scripts/dsa_reference.py` in float64. Logits, the LM loss and its gradients, and for both
//! training stages (dense warm-up, sparse) the logits, the indexer's KL loss and its gradients,
//! each within `CPU_TOLERANCE` relative to the tensor's largest magnitude; the LM loss reaches
//! no indexer parameter and the indexer loss nothing else.

mod common;

use burn::backend::{Autodiff, NdArray};
use common::*;
use nsa_model::interop::HostTensor;
use nsa_model::{DsaStage, Transformer};

type B = Autodiff<NdArray<f32>>;

fn dsa_fixtures() -> Vec<String> {
    let names: Vec<String> = fixture_names("transformer")
        .into_iter()
        .filter(|n| n.starts_with("dsa_"))
        .collect();
    assert!(names.len() >= 2, "expected 2 DSA fixtures, found {names:?}");
    names
}

fn model(f: &Fixture, device: &burn::tensor::Device<B>) -> Transformer<B> {
    f.transformer_config()
        .init::<B>(device)
        .unwrap()
        .load_reference(f.params())
        .unwrap()
}

#[test]
fn dsa_fixtures_match_the_reference() {
    let device = Default::default();
    for name in dsa_fixtures() {
        let e = transformer_errors::<B>(&name, &device);
        println!(
            "{name:24} logits {:.2e}  loss {:.2e}  grad(params) {:.2e} ({})",
            e.logits, e.loss, e.grads.0, e.grads.1
        );
        assert!(e.within(CPU_TOLERANCE), "{name}: {e:?}");
        // the language-model loss reaches no indexer parameter
        let f = load(&name);
        let m = model(&f, &device);
        let grads = m.loss(f.ids::<B>(&device)).backward();
        let ours = m.reference_grads(&grads);
        let reached: Vec<&String> = ours.keys().filter(|k| k.contains("indexer.")).collect();
        assert!(
            reached.is_empty(),
            "{name}: LM-loss gradients of {reached:?}"
        );
    }
}

#[test]
fn both_stages_and_the_indexer_loss_match_the_reference() {
    let device = Default::default();
    for name in dsa_fixtures() {
        let f = load(&name);
        let m = model(&f, &device);
        let ids = f.ids::<B>(&device);
        let [_, n1] = ids.dims();
        let inputs = ids.narrow(1, 0, n1 - 1);
        for (stage, label) in [(DsaStage::Sparse, "sparse"), (DsaStage::Dense, "dense")] {
            let (h, kl) = m.hidden_staged(&m.kernels(), inputs.clone(), stage, true);
            let kl = kl.expect("a DSA model has an indexer loss");
            let logits = m.to_logits.forward(h);
            let logits = rel_err(
                &HostTensor::from_tensor(logits),
                f.get(&format!("output.{label}")),
            );
            let loss = rel_err(
                &HostTensor::from_tensor(kl.clone()),
                f.get(&format!("indexer_loss.{label}")),
            );
            let grads = kl.backward();
            let ours = m.reference_grads(&grads);
            let reference = f.prefixed(&format!("grad_kl.{label}."));
            assert!(!reference.is_empty(), "{name}: no {label} KL gradients");
            let worst = compare_grads(&name, &ours, &reference);
            println!(
                "{name:24} {label:6} logits {logits:.2e}  indexer loss {loss:.2e}  grad {:.2e} ({})",
                worst.0, worst.1
            );
            assert!(
                logits <= CPU_TOLERANCE && loss <= CPU_TOLERANCE && worst.0 <= CPU_TOLERANCE,
                "{name} {label}: logits {logits}, indexer loss {loss}, gradients {worst:?}"
            );
            // the indexer loss trains the indexer alone
            let beyond: Vec<&String> = ours.keys().filter(|k| !k.contains("indexer.")).collect();
            assert!(
                beyond.is_empty(),
                "{name} {label}: KL gradients of {beyond:?}"
            );
        }
    }
}
