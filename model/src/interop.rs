//! Weights in the reference's layout: PyTorch `state_dict` names and shapes of
//! `native_sparse_attention_pytorch` (`SparseAttention`, `transformer.py::Transformer`), so that
//! checkpoints move both ways. This module only maps names and layouts; reading and writing files
//! (safetensors, `.pt`) is done by the binaries.
//!
//! PyTorch stores a linear weight as `[out, in]`, Burn as `[in, out]`: loading transposes.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::compress::CompressMlp;
use crate::dsa::DsaAttention;
use crate::full::FullAttention;
use crate::norm::RmsNorm;
use crate::nsa::SparseAttention;
use crate::rope;
use crate::transformer::{Attention, Transformer};

/// A host tensor: shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

impl HostTensor {
    /// From a Burn tensor (reads it back from the device).
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data after convert");
        Self { shape, values }
    }

    /// Element-wise comparison with `reference` ([`crate::compare::Comparison`]; a shape
    /// mismatch is an error, a non-finite value on either side a failed comparison).
    pub fn compare(
        &self,
        reference: &HostTensor,
    ) -> Result<crate::compare::Comparison, crate::compare::CompareError> {
        crate::compare::Comparison::of_shaped(
            (&self.shape, &self.values),
            (&reference.shape, &reference.values),
        )
    }

    fn transposed(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut values = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                values[j * r + i] = self.values[i * c + j];
            }
        }
        Self {
            shape: vec![c, r],
            values,
        }
    }
}

/// A flat `name → tensor` map in the reference's naming.
pub type StateDict = BTreeMap<String, HostTensor>;

/// Why weights could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// A parameter the model needs is absent.
    #[error("missing tensor `{0}`")]
    Missing(String),
    /// A tensor has the wrong shape for this config.
    #[error("tensor `{name}` has shape {found:?}, the config needs {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// Tensors that no parameter of this config uses (usually a config mismatch).
    #[error("unexpected tensors (config does not match the weights?): {0}")]
    Unexpected(String),
    /// The stored rotary frequencies are not the standard ones.
    #[error("`{0}` holds rotary frequencies other than 1/10000^(2k/d); not supported")]
    Rotary(String),
    /// A value is not finite.
    #[error("tensor `{0}` contains NaN or infinite values")]
    NotFinite(String),
}

struct Reader<'a> {
    dict: &'a mut StateDict,
}

impl Reader<'_> {
    fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor, LoadError> {
        let t = self
            .dict
            .remove(name)
            .ok_or_else(|| LoadError::Missing(name.to_string()))?;
        if t.shape != expected {
            return Err(LoadError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        if t.values.iter().any(|v| !v.is_finite()) {
            return Err(LoadError::NotFinite(name.to_string()));
        }
        Ok(t)
    }

    fn param<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        param: Param<Tensor<B, D>>,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        let shape = param.dims();
        let t = self.take(name, &shape)?;
        Ok(replace(param, t))
    }

    fn linear<B: Backend>(
        &mut self,
        prefix: &str,
        mut l: Linear<B>,
    ) -> Result<Linear<B>, LoadError> {
        let [i, o] = l.weight.dims();
        let w = self
            .take(&format!("{prefix}.weight"), &[o, i])?
            .transposed();
        l.weight = replace(l.weight, w);
        if let Some(bias) = l.bias.take() {
            l.bias = Some(self.param(&format!("{prefix}.bias"), bias)?);
        }
        Ok(l)
    }

    fn norm<B: Backend>(
        &mut self,
        prefix: &str,
        mut n: RmsNorm<B>,
    ) -> Result<RmsNorm<B>, LoadError> {
        n.weight = self.param(&format!("{prefix}.weight"), n.weight)?;
        Ok(n)
    }

    fn rotary(&mut self, name: &str, dim_head: usize) -> Result<(), LoadError> {
        // the frequencies are a (frozen) parameter in the reference; we compute them
        if let Some(t) = self.dict.remove(name) {
            let ours = rope::frequencies(dim_head);
            let same = t.shape == [dim_head / 2]
                && t.values
                    .iter()
                    .zip(&ours)
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1e-6));
            if !same {
                return Err(LoadError::Rotary(name.to_string()));
            }
        }
        Ok(())
    }

    fn mlp<B: Backend>(
        &mut self,
        prefix: &str,
        mut m: CompressMlp<B>,
    ) -> Result<CompressMlp<B>, LoadError> {
        m.fc1 = self.linear(&format!("{prefix}.1"), m.fc1)?;
        m.fc2 = self.linear(&format!("{prefix}.3"), m.fc2)?;
        Ok(m)
    }
}

fn replace<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    t: HostTensor,
) -> Param<Tensor<B, D>> {
    let shape: [usize; D] = t.shape.clone().try_into().expect("shape checked");
    let id = param.id;
    let value = Tensor::from_data(
        TensorData::new(t.values, shape).convert::<B::FloatElem>(),
        &param.device(),
    );
    param.transform_for_load(value, id)
}

/// How [`Writer`] reads a parameter: its value, or its gradient.
trait Extract<B: Backend> {
    fn get<const D: usize>(&self, p: &Param<Tensor<B, D>>) -> Option<HostTensor>;
}

struct Values;

impl<B: Backend> Extract<B> for Values {
    fn get<const D: usize>(&self, p: &Param<Tensor<B, D>>) -> Option<HostTensor> {
        Some(HostTensor::from_tensor(p.val()))
    }
}

struct Grads<'a, B: AutodiffBackend>(&'a B::Gradients);

impl<B: AutodiffBackend> Extract<B> for Grads<'_, B> {
    fn get<const D: usize>(&self, p: &Param<Tensor<B, D>>) -> Option<HostTensor> {
        p.val().grad(self.0).map(HostTensor::from_tensor)
    }
}

struct Writer<E> {
    extract: E,
    dict: StateDict,
}

impl<E> Writer<E> {
    fn new(extract: E) -> Self {
        Self {
            extract,
            dict: StateDict::new(),
        }
    }

    fn put<B: Backend, const D: usize>(&mut self, name: String, p: &Param<Tensor<B, D>>)
    where
        E: Extract<B>,
    {
        if let Some(t) = self.extract.get(p) {
            self.dict.insert(name, t);
        }
    }

    fn linear<B: Backend>(&mut self, prefix: &str, l: &Linear<B>)
    where
        E: Extract<B>,
    {
        if let Some(w) = self.extract.get(&l.weight) {
            self.dict.insert(format!("{prefix}.weight"), w.transposed());
        }
        if let Some(b) = &l.bias {
            self.put(format!("{prefix}.bias"), b);
        }
    }

    fn rotary(&mut self, name: String, dim_head: usize, values: bool) {
        if values {
            self.dict.insert(
                name,
                HostTensor {
                    shape: vec![dim_head / 2],
                    values: rope::frequencies(dim_head),
                },
            );
        }
    }

    fn mlp<B: Backend>(&mut self, prefix: &str, m: &CompressMlp<B>)
    where
        E: Extract<B>,
    {
        self.linear(&format!("{prefix}.1"), &m.fc1);
        self.linear(&format!("{prefix}.3"), &m.fc2);
    }
}

fn finish(dict: &StateDict) -> Result<(), LoadError> {
    if dict.is_empty() {
        Ok(())
    } else {
        let names: Vec<&str> = dict.keys().map(String::as_str).take(8).collect();
        let more = dict.len().saturating_sub(8);
        let mut s = names.join(", ");
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        Err(LoadError::Unexpected(s))
    }
}

impl<B: Backend> SparseAttention<B> {
    /// Loads the tensors under `prefix` (e.g. `"layers.0.0."` or `""`) from `dict`, removing
    /// them; shapes must match this layer's config.
    pub fn load_reference(mut self, dict: &mut StateDict, prefix: &str) -> Result<Self, LoadError> {
        let mut r = Reader { dict };
        let p = |s: &str| format!("{prefix}{s}");
        if let Some(norm) = self.norm.take() {
            self.norm = Some(r.norm(&p("norm"), norm)?);
        }
        self.to_qkv = r.linear(&p("to_qkv"), self.to_qkv)?;
        let c = &mut self.compress;
        c.compress_mem_kv = r.param(&p("compress_mem_kv"), c.compress_mem_kv.clone())?;
        c.k_intrablock_positions = r.param(
            &p("k_intrablock_positions"),
            c.k_intrablock_positions.clone(),
        )?;
        c.v_intrablock_positions = r.param(
            &p("v_intrablock_positions"),
            c.v_intrablock_positions.clone(),
        )?;
        c.k_compress = r.mlp(&p("k_compress"), c.k_compress.clone())?;
        c.v_compress = r.mlp(&p("v_compress"), c.v_compress.clone())?;
        self.gates.proj = r.linear(&p("to_strategy_combine.0"), self.gates.proj)?;
        self.combine_heads = r.linear(&p("combine_heads"), self.combine_heads)?;
        r.rotary(&p("rotary_emb.freqs"), self.config.dim_head)?;
        Ok(self)
    }

    fn write_reference<E: Extract<B>>(&self, w: &mut Writer<E>, prefix: &str, values: bool) {
        let p = |s: &str| format!("{prefix}{s}");
        if let Some(norm) = &self.norm {
            w.put(p("norm.weight"), &norm.weight);
        }
        w.linear(&p("to_qkv"), &self.to_qkv);
        let c = &self.compress;
        w.put(p("compress_mem_kv"), &c.compress_mem_kv);
        w.put(p("k_intrablock_positions"), &c.k_intrablock_positions);
        w.put(p("v_intrablock_positions"), &c.v_intrablock_positions);
        w.mlp(&p("k_compress"), &c.k_compress);
        w.mlp(&p("v_compress"), &c.v_compress);
        w.linear(&p("to_strategy_combine.0"), &self.gates.proj);
        w.linear(&p("combine_heads"), &self.combine_heads);
        w.rotary(p("rotary_emb.freqs"), self.config.dim_head, values);
    }

    /// This layer's weights in the reference's naming (without prefix).
    pub fn reference_state(&self) -> StateDict {
        let mut w = Writer::new(Values);
        self.write_reference(&mut w, "", true);
        w.dict
    }
}

impl<B: Backend> FullAttention<B> {
    fn load_reference(mut self, r: &mut Reader, prefix: &str) -> Result<Self, LoadError> {
        let p = |s: &str| format!("{prefix}{s}");
        self.norm = r.norm(&p("norm"), self.norm)?;
        self.to_q = r.linear(&p("to_q"), self.to_q)?;
        self.to_k = r.linear(&p("to_k"), self.to_k)?;
        self.to_v = r.linear(&p("to_v"), self.to_v)?;
        self.to_out = r.linear(&p("to_out"), self.to_out)?;
        r.rotary(&p("rotary_embed.freqs"), self.dim_head)?;
        Ok(self)
    }

    fn write_reference<E: Extract<B>>(&self, w: &mut Writer<E>, prefix: &str, values: bool) {
        let p = |s: &str| format!("{prefix}{s}");
        w.put(p("norm.weight"), &self.norm.weight);
        w.linear(&p("to_q"), &self.to_q);
        w.linear(&p("to_k"), &self.to_k);
        w.linear(&p("to_v"), &self.to_v);
        w.linear(&p("to_out"), &self.to_out);
        w.rotary(p("rotary_embed.freqs"), self.dim_head, values);
    }
}

/// A DSA layer in the naming of our PyTorch reference (`scripts/dsa_reference.py`): the dense
/// layer's tensors, then `indexer.{to_q, to_k, k_norm, to_weights}` and `to_gate`.
impl<B: Backend> DsaAttention<B> {
    fn load_reference(mut self, r: &mut Reader, prefix: &str) -> Result<Self, LoadError> {
        let p = |s: &str| format!("{prefix}{s}");
        self.attn = self.attn.load_reference(r, prefix)?;
        let ix = &mut self.indexer;
        ix.to_q = r.linear(&p("indexer.to_q"), ix.to_q.clone())?;
        ix.to_k = r.linear(&p("indexer.to_k"), ix.to_k.clone())?;
        ix.k_norm.gamma = r.param(&p("indexer.k_norm.weight"), ix.k_norm.gamma.clone())?;
        if let Some(beta) = ix.k_norm.beta.take() {
            ix.k_norm.beta = Some(r.param(&p("indexer.k_norm.bias"), beta)?);
        }
        ix.to_weights = r.linear(&p("indexer.to_weights"), ix.to_weights.clone())?;
        if let Some(gate) = self.to_gate.take() {
            self.to_gate = Some(r.linear(&p("to_gate"), gate)?);
        }
        Ok(self)
    }

    fn write_reference<E: Extract<B>>(&self, w: &mut Writer<E>, prefix: &str, values: bool) {
        let p = |s: &str| format!("{prefix}{s}");
        self.attn.write_reference(w, prefix, values);
        let ix = &self.indexer;
        w.linear(&p("indexer.to_q"), &ix.to_q);
        w.linear(&p("indexer.to_k"), &ix.to_k);
        w.put(p("indexer.k_norm.weight"), &ix.k_norm.gamma);
        if let Some(beta) = &ix.k_norm.beta {
            w.put(p("indexer.k_norm.bias"), beta);
        }
        w.linear(&p("indexer.to_weights"), &ix.to_weights);
        if let Some(gate) = &self.to_gate {
            w.linear(&p("to_gate"), gate);
        }
    }
}

impl<B: Backend> Transformer<B> {
    /// Loads a reference `Transformer` state dict (all of it: leftover tensors are an error).
    pub fn load_reference(mut self, mut dict: StateDict) -> Result<Self, LoadError> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, mut layer) in std::mem::take(&mut self.layers).into_iter().enumerate() {
            let prefix = format!("layers.{i}.0.");
            layer.attn = match layer.attn {
                Attention::Nsa(a) => Attention::Nsa(a.load_reference(&mut dict, &prefix)?),
                Attention::Full(a) => {
                    Attention::Full(a.load_reference(&mut Reader { dict: &mut dict }, &prefix)?)
                }
                Attention::Dsa(a) => {
                    Attention::Dsa(a.load_reference(&mut Reader { dict: &mut dict }, &prefix)?)
                }
            };
            let mut r = Reader { dict: &mut dict };
            let ff = format!("layers.{i}.1.");
            layer.ff.norm = r.norm(&format!("{ff}0"), layer.ff.norm)?;
            layer.ff.fc1 = r.linear(&format!("{ff}1"), layer.ff.fc1)?;
            layer.ff.fc2 = r.linear(&format!("{ff}3"), layer.ff.fc2)?;
            layers.push(layer);
        }
        self.layers = layers;
        let mut r = Reader { dict: &mut dict };
        self.token_emb.weight = r.param("token_emb.weight", self.token_emb.weight)?;
        self.norm = r.norm("norm", self.norm)?;
        self.to_logits = r.linear("to_logits", self.to_logits)?;
        finish(&dict)?;
        Ok(self)
    }

    fn write_reference<E: Extract<B>>(&self, w: &mut Writer<E>, values: bool) {
        w.put("token_emb.weight".into(), &self.token_emb.weight);
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = format!("layers.{i}.0.");
            match &layer.attn {
                Attention::Nsa(a) => a.write_reference(w, &prefix, values),
                Attention::Full(a) => a.write_reference(w, &prefix, values),
                Attention::Dsa(a) => a.write_reference(w, &prefix, values),
            }
            let ff = format!("layers.{i}.1.");
            w.put(format!("{ff}0.weight"), &layer.ff.norm.weight);
            w.linear(&format!("{ff}1"), &layer.ff.fc1);
            w.linear(&format!("{ff}3"), &layer.ff.fc2);
        }
        w.put("norm.weight".into(), &self.norm.weight);
        w.linear("to_logits", &self.to_logits);
    }

    /// The model's weights as a reference `Transformer` state dict.
    pub fn reference_state(&self) -> StateDict {
        let mut w = Writer::new(Values);
        self.write_reference(&mut w, true);
        w.dict
    }
}

impl<B: AutodiffBackend> Transformer<B> {
    /// Gradients of the parameters in the reference's naming (absent ones are skipped).
    pub fn reference_grads(&self, grads: &B::Gradients) -> StateDict {
        let mut w = Writer::new(Grads::<B>(grads));
        self.write_reference(&mut w, false);
        w.dict
    }
}

impl<B: AutodiffBackend> SparseAttention<B> {
    /// Gradients of the parameters in the reference's naming (absent ones are skipped).
    pub fn reference_grads(&self, grads: &B::Gradients) -> StateDict {
        let mut w = Writer::new(Grads::<B>(grads));
        self.write_reference(&mut w, "", false);
        w.dict
    }
}
