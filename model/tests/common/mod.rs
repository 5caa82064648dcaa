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
    fn prefixed(&self, prefix: &str) -> StateDict {
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

/// Largest absolute difference; panics on a shape mismatch or NaN.
pub fn max_abs_diff(ours: &HostTensor, reference: &HostTensor) -> f32 {
    assert_eq!(ours.shape, reference.shape, "shape mismatch");
    ours.values
        .iter()
        .zip(&reference.values)
        .map(|(a, b)| {
            assert!(a.is_finite(), "non-finite value in our output");
            (a - b).abs()
        })
        .fold(0.0, f32::max)
}

/// Result of comparing one fixture.
#[derive(Debug)]
pub struct Errors {
    pub output: f32,
    pub grad_input: f32,
    pub grad_params: f32,
}

/// Runs the layer fixture `name` on backend `B` and returns the largest errors.
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
    let output = max_abs_diff(&HostTensor::from_tensor(out.clone()), f.get("output"));
    let r = f.tensor::<B, 3>("loss_weight", device);
    let loss = (out * r).sum();
    let grads = loss.backward();
    let gx = HostTensor::from_tensor(x.grad(&grads).expect("input grad"));
    let grad_input = max_abs_diff(&gx, f.get("grad.input"));
    let ours = layer.reference_grads(&grads);
    let grad_params = compare_grads(name, &ours, &f.grads());
    Errors {
        output,
        grad_input,
        grad_params,
    }
}

/// Largest error over the parameter gradients, relative to each gradient's scale.
pub fn compare_grads(name: &str, ours: &StateDict, reference: &StateDict) -> f32 {
    let mut worst = 0.0f32;
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
        let scale = r.values.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(o, r) / scale;
        worst = worst.max(err);
    }
    worst
}

/// Runs the transformer fixture `name`: returns (logits error, loss error, grad error).
pub fn transformer_errors<B: AutodiffBackend>(name: &str, device: &B::Device) -> (f32, f32, f32) {
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
    let logits_err = max_abs_diff(&HostTensor::from_tensor(logits), f.get("output"));
    let loss = model.loss(ids);
    let loss_err = max_abs_diff(&HostTensor::from_tensor(loss.clone()), f.get("loss"));
    let grads = loss.backward();
    let grad_err = compare_grads(name, &model.reference_grads(&grads), &f.grads());
    (logits_err, loss_err, grad_err)
}
