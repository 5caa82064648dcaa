//! Shared helpers of the integration tests: reference fixtures and comparisons.
#![allow(dead_code)]

pub mod random;

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use nsa_model::interop::{HostTensor, StateDict};
use nsa_model::{NsaConfig, TransformerConfig};
use safetensors::{Dtype, SafeTensors};

/// One fixture file written by `scripts/make_fixtures.py`.
pub struct Fixture {
    pub name: String,
    pub kind: String,
    pub config: String,
    pub tensors: std::collections::BTreeMap<String, HostTensor>,
    pub ids: Option<(Vec<usize>, Vec<i64>)>,
}

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/fixtures")
}

pub fn layer_fixtures() -> Vec<String> {
    fixture_names("layer")
}

pub fn fixture_names(kind: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("assets/fixtures exists")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "safetensors").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .filter(|n| load(n).kind == kind)
        .collect();
    names.sort();
    names
}

pub fn load(name: &str) -> Fixture {
    let path = fixture_dir().join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    let mut ids = None;
    for (key, view) in st.tensors() {
        let shape = view.shape().to_vec();
        match view.dtype() {
            Dtype::F32 => {
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                tensors.insert(key, HostTensor { shape, values });
            }
            Dtype::I64 => {
                let values = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                ids = Some((shape, values));
            }
            other => panic!("unexpected dtype {other:?} for {key}"),
        }
    }
    Fixture {
        name: name.to_string(),
        kind: meta.get("kind").cloned().unwrap_or_default(),
        config: meta.get("config").cloned().unwrap_or_default(),
        tensors,
        ids,
    }
}

impl Fixture {
    pub fn nsa_config(&self) -> NsaConfig {
        serde_json::from_str(&self.config).unwrap()
    }
    pub fn transformer_config(&self) -> TransformerConfig {
        serde_json::from_str(&self.config).unwrap()
    }
    /// `param.*` tensors with the prefix removed.
    pub fn params(&self) -> StateDict {
        self.prefixed("param.")
    }
    pub fn grads(&self) -> StateDict {
        self.prefixed("grad.")
            .into_iter()
            .filter(|(k, _)| k != "input")
            .collect()
    }
    pub fn prefixed(&self, prefix: &str) -> StateDict {
        self.tensors
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect()
    }
    pub fn get(&self, key: &str) -> &HostTensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        key: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        to_tensor(self.get(key), device)
    }
    pub fn ids<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let (shape, values) = self.ids.clone().expect("token ids");
        Tensor::from_data(TensorData::new(values, [shape[0], shape[1]]), device)
    }
}

pub fn to_tensor<B: Backend, const D: usize>(t: &HostTensor, device: &B::Device) -> Tensor<B, D> {
    let shape: [usize; D] = t.shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(t.values.clone(), shape), device)
}

/// Largest absolute difference ([`nsa_model::Comparison`]); panics on a shape mismatch and on a
/// NaN or infinity on either side (so `err > x` cannot pass on a broken output either).
pub fn max_abs_diff(ours: &HostTensor, reference: &HostTensor) -> f32 {
    let c = ours
        .compare(reference)
        .unwrap_or_else(|e| panic!("cannot compare: {e}"));
    assert!(c.finite(), "{c}");
    c.max_abs as f32
}

/// The floor of every relative error of the parity tests: errors are `max|ours - reference| /
/// max(max|reference|, FLOOR)` per tensor. The smallest gradient of any fixture has a largest
/// magnitude of 2.65e-3 (`transformer_nsa`'s `layers.1.0.k_intrablock_positions`); the floor is
/// well below it, so every fixture tensor is measured relative to its own scale, and only the
/// all-zero gradients (`seq1`: a compression MLP that no complete block reaches) fall back to it.
pub const FLOOR: f64 = 1e-4;

/// What the parity tests assert on the CPU (ndarray, f32 against the reference's float64):
/// every output, loss, input gradient and parameter gradient within this per-tensor relative
/// error ([`rel_err`]).
pub const CPU_TOLERANCE: f64 = 1e-4;

/// The same on wgpu (in CI: lavapipe, software Vulkan), with and without the fused kernels.
pub const WGPU_TOLERANCE: f64 = 1e-3;

/// Per-tensor relative error of `ours` against `reference` (see [`FLOOR`]); infinite when either
/// side holds a NaN or an infinity; panics on a shape mismatch.
pub fn rel_err(ours: &HostTensor, reference: &HostTensor) -> f64 {
    let c = ours
        .compare(reference)
        .unwrap_or_else(|e| panic!("cannot compare: {e}"));
    c.relative(FLOOR)
}

/// Result of comparing one fixture: per-tensor relative errors ([`rel_err`]).
#[derive(Debug)]
pub struct Errors {
    pub output: f64,
    pub grad_input: f64,
    /// The worst parameter gradient and its name.
    pub grad_params: (f64, String),
}

impl Errors {
    /// Whether every error is at most `tolerance` (false on NaN).
    pub fn within(&self, tolerance: f64) -> bool {
        [self.output, self.grad_input, self.grad_params.0]
            .iter()
            .all(|e| *e <= tolerance)
    }
}

/// Runs the layer fixture `name` on backend `B` and returns its errors.
pub fn layer_errors<B: AutodiffBackend>(name: &str, device: &B::Device) -> Errors {
    let f = load(name);
    let config = f.nsa_config();
    let mut params = f.params();
    let layer = config
        .init::<B>(device)
        .unwrap()
        .load_reference(&mut params, "")
        .unwrap();
    assert!(
        params.is_empty(),
        "{name}: unused tensors {:?}",
        params.keys()
    );
    let x = f.tensor::<B, 3>("input", device).require_grad();
    let out = layer.forward(x.clone());
    let output = rel_err(&HostTensor::from_tensor(out.clone()), f.get("output"));
    let r = f.tensor::<B, 3>("loss_weight", device);
    let loss = (out * r).sum();
    let grads = loss.backward();
    let gx = HostTensor::from_tensor(x.grad(&grads).expect("input grad"));
    let grad_input = rel_err(&gx, f.get("grad.input"));
    let ours = layer.reference_grads(&grads);
    let grad_params = compare_grads(name, &ours, &f.grads());
    Errors {
        output,
        grad_input,
        grad_params,
    }
}

/// The worst per-tensor relative error ([`rel_err`]) over the parameter gradients, and its
/// parameter.
pub fn compare_grads(name: &str, ours: &StateDict, reference: &StateDict) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for (key, r) in reference {
        // a parameter outside the graph (e.g. the compression MLP before a block is complete)
        // has no gradient here and an all-zero one in PyTorch
        let zeros = HostTensor {
            shape: r.shape.clone(),
            values: vec![0.0; r.values.len()],
        };
        let o = match ours.get(key) {
            Some(o) => o,
            None if r.values.iter().all(|v| *v == 0.0) => &zeros,
            None => panic!("{name}: no gradient for {key}"),
        };
        let err = rel_err(o, r);
        // a NaN stays the worst
        if err.is_nan() || err > worst.0 {
            worst = (err, key.clone());
        }
    }
    worst
}

/// The errors of one transformer fixture: per-tensor relative ([`rel_err`]).
#[derive(Debug)]
pub struct TransformerErrors {
    pub logits: f64,
    pub loss: f64,
    pub grads: (f64, String),
}

impl TransformerErrors {
    /// Whether every error is at most `tolerance` (false on NaN).
    pub fn within(&self, tolerance: f64) -> bool {
        [self.logits, self.loss, self.grads.0]
            .iter()
            .all(|e| *e <= tolerance)
    }
}

/// Runs the transformer fixture `name` on backend `B` and returns its errors.
pub fn transformer_errors<B: AutodiffBackend>(name: &str, device: &B::Device) -> TransformerErrors {
    let f = load(name);
    let model = f
        .transformer_config()
        .init::<B>(device)
        .unwrap()
        .load_reference(f.params())
        .unwrap();
    let ids = f.ids::<B>(device);
    let [_, n1] = ids.dims();
    let logits = model.forward(ids.clone().narrow(1, 0, n1 - 1));
    let logits = rel_err(&HostTensor::from_tensor(logits), f.get("output"));
    let loss = model.loss(ids);
    let loss_err = rel_err(&HostTensor::from_tensor(loss.clone()), f.get("loss"));
    let grads = loss.backward();
    let grads = compare_grads(name, &model.reference_grads(&grads), &f.grads());
    TransformerErrors {
        logits,
        loss: loss_err,
        grads,
    }
}

/// The largest difference between cached decoding of fixture `name` (a prefill of its first
/// `prompt` tokens, then one step per token) and the full forward's logits at the same
/// positions, on backend `B` with the model's default kernel options. Infinite when either side
/// has a NaN or infinity (`nsa_model::Comparison`).
pub fn cached_decoding_error<B: Backend>(name: &str, prompt: usize, device: &B::Device) -> f64 {
    let f = load(name);
    let model = f
        .transformer_config()
        .init::<B>(device)
        .unwrap()
        .load_reference(f.params())
        .unwrap();
    let ids = f.ids::<B>(device);
    let [batch, total] = ids.dims();
    let vocab = f.transformer_config().num_tokens;
    let full = model.forward(ids.clone());
    let (_, mut cache) = model.prefill(ids.clone().narrow(1, 0, prompt), total - prompt);
    let mut worst = 0.0f64;
    for pos in prompt..total {
        let token = ids.clone().narrow(1, pos, 1).reshape([batch]);
        let (step, next) = model.step(token, cache);
        cache = next;
        let expect = full.clone().narrow(1, pos, 1).reshape([batch, vocab]);
        let err = nsa_model::Comparison::of(
            &step.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
            &expect.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
        )
        .expect("same length")
        .max_abs;
        worst = worst.max(err);
    }
    worst
}
