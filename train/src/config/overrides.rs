//! Command-line values that replace the configuration's ([`Overrides`]).

use std::path::PathBuf;

use nsa_model::AttentionKind;

use super::{TokenizerAlgorithm, TrainConfig};

/// Values given on the command line; each replaces the configuration's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--steps`.
    pub steps: Option<u64>,
    /// `--batch-size`.
    pub batch_size: Option<usize>,
    /// `--lr`.
    pub lr: Option<f64>,
    /// `--seq-len`.
    pub seq_len: Option<usize>,
    /// `--grad-accum`.
    pub grad_accum: Option<usize>,
    /// `--recompute`.
    pub recompute: bool,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--eval-every`.
    pub eval_every: Option<u64>,
    /// `--sample-every`.
    pub sample_every: Option<u64>,
    /// `--log-every`.
    pub log_every: Option<u64>,
    /// `--attention`.
    pub attention: Option<AttentionKind>,
    /// `--data` (replaces `data.paths` when not empty).
    pub data: Vec<PathBuf>,
    /// `--tokenizer`.
    pub tokenizer: Option<PathBuf>,
    /// `--train-tokenizer`.
    pub train_tokenizer: Option<TokenizerAlgorithm>,
    /// `--vocab-size`.
    pub vocab_size: Option<usize>,
}

impl Overrides {
    /// Whether any option that changes the training recipe is set (refused with `--resume`,
    /// where the run's saved configuration is used); returns the first such flag.
    pub fn recipe_flag(&self) -> Option<&'static str> {
        [
            (self.batch_size.is_some(), "--batch-size"),
            (self.lr.is_some(), "--lr"),
            (self.seq_len.is_some(), "--seq-len"),
            (self.grad_accum.is_some(), "--grad-accum"),
            (self.seed.is_some(), "--seed"),
            (self.attention.is_some(), "--attention"),
            (!self.data.is_empty(), "--data"),
            (self.tokenizer.is_some(), "--tokenizer"),
            (self.train_tokenizer.is_some(), "--train-tokenizer"),
            (self.vocab_size.is_some(), "--vocab-size"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }
}

impl TrainConfig {
    /// Applies command-line values.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.steps {
            self.train.steps = v;
        }
        if let Some(v) = o.batch_size {
            self.train.batch_size = v;
        }
        if let Some(v) = o.lr {
            self.optim.lr = v;
        }
        if let Some(v) = o.seq_len {
            self.data.seq_len = v;
        }
        if let Some(v) = o.grad_accum {
            self.train.grad_accum = v;
        }
        if o.recompute {
            self.train.recompute = true;
        }
        if let Some(v) = o.seed {
            self.train.seed = v;
        }
        if let Some(v) = o.eval_every {
            self.train.eval_every = v;
        }
        if let Some(v) = o.sample_every {
            self.train.sample_every = v;
        }
        if let Some(v) = o.log_every {
            self.train.log_every = v;
        }
        if let Some(v) = o.attention {
            self.model.attention = v;
        }
        if !o.data.is_empty() {
            self.data.paths = o.data.clone();
        }
        if let Some(p) = &o.tokenizer {
            self.tokenizer.path = Some(p.clone());
            self.tokenizer.train = None;
        }
        if let Some(a) = o.train_tokenizer {
            self.tokenizer.train = Some(a);
            self.tokenizer.path = None;
        }
        if let Some(v) = o.vocab_size {
            self.tokenizer.vocab_size = v;
        }
    }
}
