//! The Learner's training step: one step lowers the loss on a fixed batch, micro-batch
//! gradients are averaged, the global gradient norm is clipped, NaN drops the step.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use nsa_model::AttentionKind;
use nsa_runtime::tokenizer::bert_base_chinese;
use nsa_train::lm::{global_grad_norm, lm_loss, LanguageModel, TokenBatch};

type B = Autodiff<NdArray<f32>>;

/// The same weights on every call: the backend's random generator is global and the tests of
/// this binary run in parallel threads, so seeding and initialising happen under one lock (without
/// it, two threads interleaving their draws made the clipping test compare different models).
fn model(clip: f64) -> LanguageModel<B> {
    model_of(clip, 3, |_| {})
}

/// [`model`] from `seed`, with `change` applied to the tiny model config.
fn model_of(
    clip: f64,
    seed: u64,
    change: impl FnOnce(&mut nsa_model::TransformerConfig),
) -> LanguageModel<B> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    B::seed(&device, seed);
    let mut config = common::tiny_config().model_config(21128).unwrap();
    change(&mut config);
    LanguageModel::new(config.init::<B>(&device).unwrap(), clip)
}

/// `rows` windows of 33 tokens of real text.
fn batch(rows: usize, micro_batches: usize) -> TokenBatch<B> {
    let tok = bert_base_chinese();
    let text = nsa_train::corpus::default_corpus()[..40].join("");
    let ids = tok.encode(&text).unwrap();
    let data: Vec<i64> = (0..rows)
        .flat_map(|r| ids[r * 50..r * 50 + 33].iter().map(|&t| t as i64))
        .collect();
    TokenBatch {
        ids: Tensor::from_data(TensorData::new(data, [rows, 33]), &Default::default()),
        micro_batches,
        shard: 0,
        step: 0,
    }
}

#[test]
fn one_training_step_reduces_the_loss_on_a_fixed_batch() {
    let model = model(0.5);
    let mut optim = AdamWConfig::new().init::<B, LanguageModel<B>>();
    let (grads, before) = model.gradients(batch(4, 2));
    assert!(!before.non_finite);
    assert_eq!(before.tokens, 4 * 32);
    // an untrained model is close to uniform over the vocabulary
    assert!(
        (before.loss_value - (21128f64).ln()).abs() < 1.0,
        "{}",
        before.loss_value
    );
    let model = optim.step(1e-2, model, grads);
    let (_, after) = model.gradients(batch(4, 2));
    assert!(
        after.loss_value < before.loss_value - 0.05,
        "{} -> {}",
        before.loss_value,
        after.loss_value
    );
}

struct Collect<'a> {
    grads: &'a GradientsParams,
    values: Vec<Vec<f32>>,
}

impl<Bk: AutodiffBackend> ModuleVisitor<Bk> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        if let Some(g) = self.grads.get::<Bk::InnerBackend, D>(param.id) {
            self.values
                .push(g.into_data().convert::<f32>().into_vec().unwrap());
        }
    }
}

fn flat(model: &LanguageModel<B>, grads: &GradientsParams) -> Vec<Vec<f32>> {
    let mut c = Collect {
        grads,
        values: Vec::new(),
    };
    model.visit(&mut c);
    c.values
}

#[test]
fn gradient_accumulation_averages_the_micro_batches() {
    let model = model(0.0);
    let (g1, o1) = model.gradients(batch(4, 1));
    let (g2, o2) = model.gradients(batch(4, 2));
    let (g4, _) = model.gradients(batch(4, 4));
    assert!((o1.loss_value - o2.loss_value).abs() < 1e-5);
    let (a, b, c) = (flat(&model, &g1), flat(&model, &g2), flat(&model, &g4));
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        for ((p, q), r) in x.iter().zip(y).zip(z) {
            // a NaN stays the largest difference
            for d in [(p - q).abs(), (p - r).abs()] {
                if d.is_nan() || d > max {
                    max = d;
                }
            }
        }
    }
    assert!(max < 1e-5, "largest difference {max}");
    let n1 = o1.grad_norm.unwrap();
    assert!((n1 - o2.grad_norm.unwrap()).abs() < 1e-4 * n1);
}

#[test]
fn gradients_are_clipped_to_the_global_norm() {
    let unclipped = model(0.0);
    let (_, o) = unclipped.gradients(batch(2, 1));
    let norm = o.grad_norm.unwrap();
    assert!(norm > 0.02, "{norm}");
    // the same weights for certain (two calls of `model` gave different weights in about one
    // run in five of this binary's parallel tests, despite the lock)
    let clipped = LanguageModel::new(unclipped.transformer.clone(), 0.01);
    let (grads, o2) = clipped.gradients(batch(2, 1));
    // the reported norm is the one before clipping
    assert!((o2.grad_norm.unwrap() - norm).abs() < 1e-4 * norm);
    let after = global_grad_norm(&clipped, &grads);
    assert!((after - 0.01).abs() < 1e-4, "{after}");
}

#[test]
fn a_non_finite_loss_drops_the_step() {
    let mut model = model(0.5);
    model.transformer.to_logits.weight = model
        .transformer
        .to_logits
        .weight
        .map(|w| w.mul_scalar(f32::NAN));
    let (grads, out) = model.gradients(batch(2, 2));
    assert!(out.non_finite);
    assert!(out.loss_value.is_nan());
    assert!(grads.is_empty(), "no gradient may reach the optimizer");
}

/// The training loss (logits chunked over the tokens, gradients formed chunk by chunk) has the
/// value and gradients of the model's whole-logits loss, at the default budget and at budgets
/// of 1 and 7 rows (7 does not divide the 128 rows).
#[test]
fn the_training_loss_is_the_models_loss() {
    let model = model(0.0);
    let ids = batch(4, 1).ids;
    let reference = model.transformer.loss(ids.clone());
    let a = reference.clone().into_scalar() as f64;
    assert!(a.is_finite());
    let g1 = GradientsParams::from_grads(reference.backward(), &model);
    let x = flat(&model, &g1);
    let row = (model.transformer.config.num_tokens * 4) as u64;
    for budget in [nsa_train::lm::DEFAULT_LOGITS_BYTES, row, 7 * row] {
        let fast = lm_loss(&model.transformer, ids.clone(), budget);
        let b = fast.clone().into_scalar() as f64;
        assert!((a - b).abs() < 1e-5 * a, "{a} {b} (budget {budget})");
        let g2 = GradientsParams::from_grads(fast.backward(), &model);
        let y = flat(&model, &g2);
        assert_eq!(x.len(), y.len());
        let mut max = 0f32;
        for (p, q) in x.iter().zip(&y) {
            assert_eq!(p.len(), q.len());
            for (u, v) in p.iter().zip(q) {
                let d = (u - v).abs();
                // a NaN stays the largest difference
                if d.is_nan() || d > max {
                    max = d;
                }
            }
        }
        assert!(
            max < 1e-5,
            "largest gradient difference {max} (budget {budget})"
        );
    }
}

/// Burn's multi-device train step with two replicas on the CPU device: the averaged,
/// globally clipped gradient and the loss equal those of one device on the whole batch, for
/// both ways of splitting the rows (whole micro-batches; each micro-batch cut in two).
#[test]
fn data_parallel_step_equals_one_device() {
    use nsa_train::parallel::{DataParallel, ShardPlan};
    let device = burn::tensor::Device::<B>::default();
    for (rows, micro, batch_size) in [(8, 4, 2), (8, 1, 8), (6, 3, 2)] {
        for clip in [0.0, 0.05] {
            let model = model(clip);
            let (g1, o1) = model.gradients(batch(rows, micro));
            let plan = ShardPlan::new(batch_size, micro, 2).unwrap();
            let parallel = DataParallel::<B>::new(vec![device; 2], plan);
            let out = parallel.step(&model, batch(rows, micro));
            let (g2, o2) = (out.grads, out.item);
            let case = format!("rows {rows}, micro {micro}, clip {clip}, {plan:?}");
            assert!(!o2.non_finite, "{case}");
            assert_eq!(o1.tokens, o2.tokens, "{case}");
            assert!((o1.loss_value - o2.loss_value).abs() < 1e-5, "{case}");
            let (n1, n2) = (o1.grad_norm.unwrap(), o2.grad_norm.unwrap());
            assert!((n1 - n2).abs() < 1e-4 * n1, "{case}: norm {n1} vs {n2}");
            if clip > 0.0 {
                assert!(n1 > clip, "{case}: the test must clip ({n1})");
                let after = global_grad_norm(&model, &g2);
                assert!((after - clip).abs() < 1e-4, "{case}: clipped to {after}");
            }
            let (a, b) = (flat(&model, &g1), flat(&model, &g2));
            assert_eq!(a.len(), b.len(), "{case}");
            let mut max = 0f32;
            for (x, y) in a.iter().zip(&b) {
                for (p, q) in x.iter().zip(y) {
                    let d = (p - q).abs();
                    // a NaN stays the largest difference
                    if d.is_nan() || d > max {
                        max = d;
                    }
                }
            }
            assert!(max < 1e-5, "{case}: largest gradient difference {max}");
        }
    }
}

/// Largest absolute difference between two sets of gradients (NaN if any value is NaN).
fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            if d.is_nan() || d > max {
                max = d;
            }
        }
    }
    max
}

/// A DSA model of the tiny preset's size that selects 8 of the 32 tokens (the default top-k
/// is the whole window).
fn dsa(c: &mut nsa_model::TransformerConfig) {
    c.attention = AttentionKind::Dsa;
    c.dsa.top_k = 8;
    c.dsa.window = 4;
}

#[test]
fn recomputed_blocks_give_the_gradients_of_one_graph() {
    // a DSA model in both stages: step 0 of a run with one warm-up step is dense
    for (attention, warmup) in [
        (AttentionKind::Nsa, 0),
        (AttentionKind::Full, 0),
        (AttentionKind::Dsa, 0),
        (AttentionKind::Dsa, 1),
    ] {
        // three blocks: the gradient flows through recomputed blocks into earlier ones
        let model = model_of(0.0, 5, |c| {
            c.depth = 3;
            if attention == AttentionKind::Dsa {
                dsa(c);
            }
            c.attention = attention;
        })
        .with_dsa_schedule(warmup, false);
        let mut recomputing = None;
        for micro in [1, 2] {
            let (g, o) = model.gradients(batch(4, micro));
            // cloned once its parameters exist: Burn initialises parameters lazily, and a clone
            // of a parameter not yet initialised initialises itself, from the random generator
            // as it is then (a different model)
            let recomputing = recomputing.get_or_insert_with(|| model.clone().with_recompute(true));
            let (gr, or) = recomputing.gradients(batch(4, micro));
            let (a, b) = (flat(&model, &g), flat(&model, &gr));
            // every parameter has a gradient: embedding, 3 blocks, norm, output layer
            let params = model.num_params();
            let counted: usize = a.iter().map(Vec::len).sum();
            assert_eq!(
                counted, params,
                "{attention:?}: gradients of every parameter"
            );
            assert!(
                (o.loss_value - or.loss_value).abs() < 1e-5,
                "{attention:?}, {micro} micro-batches: loss {} against {}",
                o.loss_value,
                or.loss_value
            );
            let max = largest_difference(&a, &b);
            assert!(
                max < 1e-5,
                "{attention:?}, {micro} micro-batches: largest gradient difference {max}"
            );
            let norm = o.grad_norm.unwrap();
            assert!(norm > 1e-3, "{norm}");
            assert!((or.grad_norm.unwrap() - norm).abs() < 1e-4 * norm);
            // a DSA model reports its indexer loss, the same on both paths
            match (o.indexer_loss, or.indexer_loss) {
                (None, None) => assert_ne!(attention, AttentionKind::Dsa),
                (Some(a), Some(b)) => {
                    assert!(a.is_finite() && a > 0.0, "{a}");
                    assert!((a - b).abs() < 1e-5 * a.max(1.0), "indexer loss {a} vs {b}");
                }
                other => panic!("{attention:?}: indexer losses {other:?}"),
            }
        }
    }
}

/// The warm-up with the model frozen: an optimizer step changes the indexer's parameters and
/// no other, and a few steps on one batch lower the indexer's KL loss. Past the warm-up the
/// LM loss trains the model again.
#[test]
fn a_frozen_dsa_warm_up_trains_the_indexer_alone() {
    let model = model_of(0.0, 11, dsa).with_dsa_schedule(6, true);
    let before = model.transformer.reference_state();
    let mut optim = AdamWConfig::new().init::<B, LanguageModel<B>>();
    let mut model = model;
    let mut kl = Vec::new();
    for step in 0..6 {
        let mut b = batch(4, 1);
        b.step = step;
        let (grads, out) = model.gradients(b);
        assert!(!out.non_finite);
        kl.push(
            out.indexer_loss
                .expect("a DSA model reports its indexer loss"),
        );
        model = optim.step(3e-3, model, grads);
    }
    let after = model.transformer.reference_state();
    let mut changed = Vec::new();
    for (name, b) in &before {
        if after[name].values != b.values {
            changed.push(name.as_str());
        }
    }
    assert!(!changed.is_empty(), "no parameter changed");
    assert!(
        changed.iter().all(|n| n.contains(".indexer.")),
        "the warm-up changed {changed:?}"
    );
    // to_q, to_k, k_norm (weight, bias), to_weights of every layer
    assert_eq!(
        changed.len(),
        5 * model.transformer.layers.len(),
        "every indexer parameter changes: {changed:?}"
    );
    assert!(
        kl[5] < kl[0] * 0.9,
        "the indexer loss does not decrease: {kl:?}"
    );
    // step 6 is sparse: the LM loss reaches the model
    let mut b = batch(4, 1);
    b.step = 6;
    let (grads, _) = model.gradients(b);
    let counted: usize = flat(&model, &grads).iter().map(Vec::len).sum();
    assert_eq!(counted, model.num_params(), "gradients of every parameter");
    // the schedule does not touch a model without DSA layers (recomputed or not)
    for recompute in [false, true] {
        let nsa = model_of(0.0, 11, |_| {})
            .with_dsa_schedule(6, true)
            .with_recompute(recompute);
        let (grads, out) = nsa.gradients(batch(4, 1));
        assert_eq!(out.indexer_loss, None);
        let counted: usize = flat(&nsa, &grads).iter().map(Vec::len).sum();
        assert_eq!(
            counted,
            nsa.num_params(),
            "recompute {recompute}: every parameter"
        );
    }
}
