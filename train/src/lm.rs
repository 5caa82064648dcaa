//! The model as the Learner sees it: [`LanguageModel`] wraps the NSA [`Transformer`] and
//! implements Burn's [`TrainStep`] (forward + backward over the micro-batches of one optimizer
//! step, gradient averaging, global gradient-norm clipping, NaN/Inf detection) and
//! [`InferenceStep`] (validation loss).

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::{Adaptor, LossInput};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use nsa_model::head_loss::logits_budget;
pub use nsa_model::head_loss::DEFAULT_LOGITS_BYTES;
use nsa_model::{DsaTraining, Transformer};

use crate::metrics::{GradNormInput, PerplexityInput, ThroughputInput};

/// The language model trained by the Learner.
#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    /// The NSA transformer.
    pub transformer: Transformer<B>,
    /// Maximum global L2 norm of the gradient (0 = no clipping); not part of the record.
    pub grad_clip: f64,
    /// The largest chunk of `[tokens, vocabulary]` logits, in bytes
    /// ([`LanguageModel::with_logits_budget`]); not part of the record.
    pub max_logits_bytes: u64,
    /// Recompute each block in the backward pass ([`LanguageModel::with_recompute`]); not part
    /// of the record.
    pub recompute: bool,
    /// Optimizer steps of a DSA model's dense warm-up ([`LanguageModel::with_dsa_schedule`]);
    /// not part of the record.
    pub dsa_warmup_steps: u64,
    /// Whether only the indexer learns during the warm-up; not part of the record.
    pub dsa_freeze_model: bool,
}

impl<B: Backend> LanguageModel<B> {
    /// Wraps a transformer.
    pub fn new(transformer: Transformer<B>, grad_clip: f64) -> Self {
        Self {
            transformer,
            grad_clip,
            max_logits_bytes: DEFAULT_LOGITS_BYTES,
            recompute: false,
            dsa_warmup_steps: 0,
            dsa_freeze_model: false,
        }
    }

    /// A DSA model's two stages: `warmup_steps` optimizer steps with the global branch dense
    /// (the indexer learns to imitate the attention; only it when `freeze_model`), then sparse
    /// ([`DsaTraining::at_step`]). No effect on the other attention kinds.
    pub fn with_dsa_schedule(mut self, warmup_steps: u64, freeze_model: bool) -> Self {
        self.dsa_warmup_steps = warmup_steps;
        self.dsa_freeze_model = freeze_model;
        self
    }

    /// What optimizer step `step` (from 0) optimises (a model without DSA layers: always its
    /// LM loss).
    pub fn dsa_training(&self, step: u64) -> DsaTraining {
        if self.transformer.config.attention != nsa_model::AttentionKind::Dsa {
            return DsaTraining::default();
        }
        DsaTraining::at_step(step, self.dsa_warmup_steps, self.dsa_freeze_model)
    }

    /// Recomputes each block's activations in the backward pass instead of keeping them
    /// (activation checkpointing, [`Transformer::loss_backward_recomputed`]): the same
    /// gradients with the memory of one block's graph.
    pub fn with_recompute(mut self, recompute: bool) -> Self {
        self.recompute = recompute;
        self
    }

    /// Chunks the logits to at most `bytes` (a device's limit for one buffer) when that is
    /// below the default of [`DEFAULT_LOGITS_BYTES`].
    pub fn with_logits_budget(mut self, bytes: Option<u64>) -> Self {
        self.max_logits_bytes = logits_budget(bytes);
        self
    }
}

/// The windows of one optimizer step: `[micro_batches × batch, seq_len + 1]` token ids (inputs
/// and shifted targets); validation batches have one micro-batch.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    /// Token ids.
    pub ids: Tensor<B, 2, Int>,
    /// Number of micro-batches the rows are split into (gradient accumulation).
    pub micro_batches: usize,
    /// Which shard of the optimizer step this is when the step is spread over several devices
    /// ([`crate::parallel`]); 0 otherwise.
    pub shard: usize,
    /// The optimizer step (from 0) the batch belongs to: it picks a DSA model's stage
    /// ([`LanguageModel::dsa_training`]); 0 in validation batches (validation runs the model
    /// as inference does, sparse).
    pub step: u64,
}

/// What one training step or validation batch reports (loss on the host and on the device,
/// for Burn's loss metric).
#[derive(Debug, Clone)]
pub struct LmOutput<B: Backend> {
    /// Mean next-token cross-entropy `[1]` (nats), detached.
    pub loss: Tensor<B, 1>,
    /// The same value on the host.
    pub loss_value: f64,
    /// Predicted tokens.
    pub tokens: usize,
    /// Global L2 norm of the averaged gradient before clipping (training only).
    pub grad_norm: Option<f64>,
    /// The loss or the gradient was NaN/Inf: the step's gradients were dropped.
    pub non_finite: bool,
    /// Wall time of the step in seconds (set by the training loop).
    pub seconds: f64,
    /// The shard of the batch this output belongs to (see [`TokenBatch::shard`]).
    pub shard: usize,
    /// A DSA model's indexer loss (the sum over its layers of the KL divergence from the
    /// attention, [`nsa_model::dsa::kl`]), mean over the micro-batches; `None` otherwise.
    pub indexer_loss: Option<f64>,
}

impl<B: Backend> LmOutput<B> {
    /// The output of a training step (shard 0, no wall time yet).
    pub fn training(
        loss: Tensor<B, 1>,
        loss_value: f64,
        tokens: usize,
        grad_norm: f64,
        non_finite: bool,
    ) -> Self {
        Self {
            loss,
            loss_value,
            tokens,
            grad_norm: Some(grad_norm),
            non_finite,
            seconds: 0.0,
            shard: 0,
            indexer_loss: None,
        }
    }
}

impl<B: Backend> ItemLazy for LmOutput<B> {
    type ItemSync = Self;
    fn sync(self) -> Self {
        self
    }
}

impl<B: Backend> Adaptor<LossInput<B>> for LmOutput<B> {
    fn adapt(&self) -> LossInput<B> {
        LossInput::new(self.loss.clone())
    }
}

impl<B: Backend> Adaptor<PerplexityInput> for LmOutput<B> {
    fn adapt(&self) -> PerplexityInput {
        PerplexityInput {
            loss: self.loss_value,
            tokens: self.tokens,
        }
    }
}

impl<B: Backend> Adaptor<ThroughputInput> for LmOutput<B> {
    fn adapt(&self) -> ThroughputInput {
        ThroughputInput {
            tokens: self.tokens,
            seconds: self.seconds,
        }
    }
}

impl<B: Backend> Adaptor<GradNormInput> for LmOutput<B> {
    fn adapt(&self) -> GradNormInput {
        GradNormInput {
            norm: self.grad_norm.unwrap_or(f64::NAN),
        }
    }
}

/// Mean next-token cross-entropy of `ids` `[batch, seq + 1]`: the value and gradients of
/// [`Transformer::loss`], with the logits computed a chunk of tokens at a time, no chunk larger
/// than `max_logits_bytes` ([`Transformer::chunked_loss`]).
pub fn lm_loss<B: Backend>(
    transformer: &Transformer<B>,
    ids: Tensor<B, 2, Int>,
    max_logits_bytes: u64,
) -> Tensor<B, 1> {
    transformer.chunked_loss(ids, max_logits_bytes)
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

impl<B: AutodiffBackend> LanguageModel<B> {
    /// Forward and backward passes over the micro-batches of `batch`: the gradient of the mean
    /// loss (micro-batch gradients averaged; a DSA model's indexer loss added, whose gradients
    /// reach only the indexer), clipped to a global L2 norm of `grad_clip` (over both losses'
    /// gradients). When
    /// the loss or the norm is not finite the gradients are empty (the optimizer then leaves
    /// every parameter unchanged) and `non_finite` is set.
    pub fn gradients(&self, batch: TokenBatch<B>) -> (GradientsParams, LmOutput<B::InnerBackend>) {
        let [rows, width] = batch.ids.dims();
        let shard = batch.shard;
        let micro = batch.micro_batches.clamp(1, rows);
        assert!(
            rows.is_multiple_of(micro),
            "{rows} rows do not split into {micro} micro-batches"
        );
        let per = rows / micro;
        let training = self.dsa_training(batch.step);
        let mut accumulator = GradientsAccumulator::<Self>::new();
        let mut single = None;
        let mut losses = Vec::with_capacity(micro);
        let mut indexer_losses = Vec::new();
        for i in 0..micro {
            let ids = batch.ids.clone().narrow(0, i * per, per);
            if self.recompute {
                let scale = 1.0 / micro as f64;
                let (loss, kl) = self.transformer.loss_backward_recomputed_staged(
                    ids,
                    self.max_logits_bytes,
                    scale,
                    training,
                    |g| accumulator.accumulate(self, GradientsParams::from_grads(g, self)),
                );
                losses.push(loss);
                indexer_losses.extend(kl);
                continue;
            }
            let (loss, kl) = self.transformer.chunked_loss_staged(
                ids,
                self.max_logits_bytes,
                training.stage,
                true,
            );
            losses.push(loss.clone().inner());
            // the indexer loss trains the indexer alone, the LM loss everything else (their
            // gradients do not overlap); in a frozen warm-up only the indexer learns
            let objective = match (kl, training.lm_loss) {
                (Some(kl), lm) => {
                    indexer_losses.push(kl.clone().inner());
                    if lm {
                        loss + kl
                    } else {
                        kl
                    }
                }
                (None, _) => loss,
            };
            let scaled = if micro > 1 {
                objective.div_scalar(micro as f64)
            } else {
                objective
            };
            let grads = GradientsParams::from_grads(scaled.backward(), self);
            if micro == 1 {
                single = Some(grads);
            } else {
                accumulator.accumulate(self, grads);
            }
        }
        let grads = single.unwrap_or_else(|| accumulator.grads());
        let loss = Tensor::cat(losses, 0).mean();
        let loss_value = scalar(loss.clone());
        let indexer_loss =
            (!indexer_losses.is_empty()).then(|| scalar(Tensor::cat(indexer_losses, 0).mean()));
        let non_finite = indexer_loss.is_some_and(|v| !v.is_finite());
        let (grads, norm, non_finite) = self.finish_gradients(grads, 1, loss_value, non_finite);
        let output = LmOutput::training(loss, loss_value, rows * (width - 1), norm, non_finite);
        let output = LmOutput {
            shard,
            indexer_loss,
            ..output
        };
        (grads, output)
    }

    /// The end of a training step, shared by one device and data parallelism: `grads` is the
    /// sum of `parts` equal shares (1 when the micro-batches are already averaged, the device
    /// count otherwise). Returns their mean clipped to a global norm of `grad_clip`, the mean's
    /// norm before clipping, and whether the step is dropped (`non_finite` already, or a loss or
    /// norm that is NaN/Inf; the gradients are then empty).
    pub(crate) fn finish_gradients(
        &self,
        mut grads: GradientsParams,
        parts: usize,
        loss_value: f64,
        non_finite: bool,
    ) -> (GradientsParams, f64, bool) {
        let norm = global_grad_norm(self, &grads) / parts as f64;
        let non_finite = non_finite || !(loss_value.is_finite() && norm.is_finite());
        if non_finite {
            grads = GradientsParams::new();
        } else {
            let factor = clip_coefficient(norm, self.grad_clip) / parts as f64;
            if factor != 1.0 {
                scale_grads(self, &mut grads, factor);
            }
        }
        (grads, norm, non_finite)
    }
}

impl<B: AutodiffBackend> TrainStep for LanguageModel<B> {
    type Input = TokenBatch<B>;
    type Output = LmOutput<B::InnerBackend>;

    fn step(&self, batch: TokenBatch<B>) -> TrainOutput<Self::Output> {
        let (grads, item) = self.gradients(batch);
        TrainOutput { grads, item }
    }
}

impl<B: Backend> InferenceStep for LanguageModel<B> {
    type Input = TokenBatch<B>;
    type Output = LmOutput<B>;

    fn step(&self, batch: TokenBatch<B>) -> LmOutput<B> {
        let [rows, width] = batch.ids.dims();
        let shard = batch.shard;
        let loss = lm_loss(&self.transformer, batch.ids, self.max_logits_bytes);
        let loss_value = scalar(loss.clone());
        LmOutput {
            loss,
            loss_value,
            tokens: rows * (width - 1),
            grad_norm: None,
            non_finite: !loss_value.is_finite(),
            seconds: 0.0,
            shard,
            indexer_loss: None,
        }
    }
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales gradients of global L2 norm `norm` by:
/// `max_norm / (norm + 1e-6)` when that is below 1, else 1 (also when `max_norm` is 0: no
/// clipping).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = (g.clone() * g).sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

/// Global L2 norm of all parameter gradients of `module` (one device-to-host read).
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut visitor = SquaredNorm::<B> { grads, sum: None };
    module.visit(&mut visitor);
    visitor.sum.map_or(0.0, |s| scalar(s).sqrt())
}

struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Multiplies every gradient of `module` by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    module.visit(&mut ScaleGrads { grads, factor });
}
