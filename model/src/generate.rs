//! Autoregressive generation with the KV cache: prefill the prompt once, then one cached step per
//! new token. Tokens are handed to a callback as they are produced (for streaming).
//!
//! Where the backend samples on the device (`NsaKernels::sample_tokens`: CUDA and wgpu), the
//! sampled id feeds the next step directly and the ids are read back in chunks (growing to
//! [`READ_EVERY`]): the host does not wait for the logits of every token, so it records the next
//! steps while the device computes. The tokens are those of the host sampler for the same logits
//! ([`crate::sampling`]); steps recorded past a stop are discarded.

use burn::prelude::*;

use crate::sampling::{Sampling, SplitMix64};
use crate::transformer::Transformer;

/// Why generation could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    /// Empty prompt.
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    /// A prompt id outside the vocabulary.
    #[error("prompt token id {id} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Bad sampling settings.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
}

/// Most tokens decoded on the device between two reads of the sampled ids. The first id is read
/// at once (the time to the first token), then chunks of 2, 4, .. up to this: every read waits
/// for the device to finish everything recorded, and the device idles until the next steps
/// arrive.
pub const READ_EVERY: usize = 64;

/// One generated token, as [`Transformer::generate_with`] hands it over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generated {
    /// The token id.
    pub id: u32,
    /// Its natural log-probability under the model (the softmax of the raw logits, before
    /// temperature, filters or penalty), when asked for.
    pub logprob: Option<f64>,
}

impl<B: Backend> Transformer<B> {
    /// Generates up to `max_new` tokens after `prompt` (one sequence). `on_token` sees every new
    /// token and may stop generation by returning `false`. Returns the new tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampling: &Sampling,
        seed: u64,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, GenerateError> {
        self.generate_with(prompt, max_new, sampling, seed, false, |g| on_token(g.id))
    }

    /// [`Transformer::generate`], handing each token with its log-probability when `logprobs`
    /// (which reads every step's logits on the host: no device sampling then).
    pub fn generate_with(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampling: &Sampling,
        seed: u64,
        logprobs: bool,
        mut on_token: impl FnMut(Generated) -> bool,
    ) -> Result<Vec<u32>, GenerateError> {
        sampling.validate()?;
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let vocab = self.config.num_tokens;
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::TokenOutOfRange { id, vocab });
        }
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        let device = self.to_logits.weight.device();
        let mut rng = SplitMix64(seed);
        let n = prompt.len();
        let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let (mut last, mut cache) = self.prefill_last(ids, max_new);
        let kernels = self.kernels();
        let on_device = kernels
            .fused()
            .zip(sampling.device_rule(vocab))
            .filter(|_| !logprobs);
        if let Some((kernels, rule)) = on_device {
            // ids stay on the device; read in growing chunks
            let mut pending = Vec::with_capacity(READ_EVERY);
            let (mut sampled, mut chunk) = (0, 1);
            loop {
                let Some(id) = kernels.sample_tokens(&last, &rule, rng.next_u64()) else {
                    break;
                };
                pending.push(id.clone());
                sampled += 1;
                if sampled < max_new {
                    let (next, c) = self.step(id, cache);
                    cache = c;
                    last = next;
                }
                if sampled == max_new || pending.len() == chunk {
                    chunk = (2 * chunk).min(READ_EVERY);
                    if deliver(&mut pending, &mut out, &mut on_token, max_new) {
                        return Ok(out);
                    }
                }
            }
            // the backend declined: the host samples from here on
            if deliver(&mut pending, &mut out, &mut on_token, max_new) {
                return Ok(out);
            }
        }
        let mut history = if sampling.needs_history() {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        loop {
            let row = last
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 logits");
            let token = if sampling.needs_history() {
                let t = sampling.sample_after(&row, &history, &mut rng) as u32;
                history.push(t);
                t
            } else {
                sampling.sample(&row, &mut rng) as u32
            };
            out.push(token);
            let logprob = logprobs.then(|| log_probability(&row, token as usize));
            if !on_token(Generated { id: token, logprob }) || out.len() == max_new {
                return Ok(out);
            }
            let id =
                Tensor::<B, 1, Int>::from_data(TensorData::new(vec![token as i64], [1]), &device);
            let (next, c) = self.step(id, cache);
            cache = c;
            last = next;
        }
    }
}

/// `ln softmax(row)[id]`, in f64 (NaN logits count as `-inf`).
pub fn log_probability(row: &[f32], id: usize) -> f64 {
    let clean = |x: f32| {
        if x.is_nan() {
            f64::NEG_INFINITY
        } else {
            x as f64
        }
    };
    let max = row
        .iter()
        .map(|&x| clean(x))
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|&x| (clean(x) - max).exp()).sum();
    clean(row[id]) - max - sum.ln()
}

/// Reads the sampled ids of `pending` (in order) into `out` and hands each to `on_token`;
/// `true` when generation is over (stopped by the callback or `max_new` reached).
fn deliver<B: Backend>(
    pending: &mut Vec<Tensor<B, 1, Int>>,
    out: &mut Vec<u32>,
    on_token: &mut impl FnMut(Generated) -> bool,
    max_new: usize,
) -> bool {
    if pending.is_empty() {
        return false;
    }
    let ids = Tensor::cat(std::mem::take(pending), 0)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("integer ids");
    for id in ids {
        out.push(id as u32);
        let token = Generated {
            id: id as u32,
            logprob: None,
        };
        if !on_token(token) || out.len() == max_new {
            return true;
        }
    }
    false
}
