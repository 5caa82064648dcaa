//! Autoregressive generation with the KV cache: prefill the prompt once, then one cached step per
//! new token. Tokens are handed to a callback as they are produced (for streaming).

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
        let (logits, mut cache) = self.prefill(ids, max_new);
        let mut last = logits.narrow(1, n - 1, 1).reshape([1, vocab]);
        loop {
            let row = last
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 logits");
            let token = sampling.sample(&row, &mut rng) as u32;
            out.push(token);
            if !on_token(token) || out.len() == max_new {
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
