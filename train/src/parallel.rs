//! Data-parallel training on several devices of one machine (`nsa-train --devices 0,1`).
//!
//! The work is done by Burn's own multi-device machinery: [`MultiDevicesTrainStep`] keeps one
//! worker thread per device, forks the model onto it, runs our [`TrainStep`] there and sends
//! back the gradients; [`burn::optim::GradientsParams::to_device`] brings them to the main
//! device (the first of the list) and [`GradientsAccumulator`] sums them; the optimizer runs on
//! the main device (Burn's `MultiDeviceOptim::OptimMainDevice`).
//!
//! What this module adds is what makes the result equal to one device at the same global
//! batch, which Burn's default multi-device epoch does not do for this recipe:
//!
//! * the rows of one optimizer step (`batch_size × grad_accum` windows) are split into one
//!   shard per device ([`ShardPlan`]): whole micro-batches when `grad_accum` is a multiple of
//!   the device count, otherwise every micro-batch is cut into equal parts;
//! * each device returns the gradient of the mean loss of its shard, unclipped; the main
//!   device averages them (sum / devices), and only then clips the *global* gradient norm to
//!   `grad_clip`, exactly as one device would;
//! * a non-finite loss or gradient on any device drops the whole step.
//!
//! The loss of the step is the mean of the shard losses (all shards hold the same number of
//! tokens), so logs, metrics and checkpoints are those of a one-device run.

use burn::data::dataloader::{DataLoaderIterator, Progress};
use burn::optim::GradientsAccumulator;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::train::MultiDevicesTrainStep;
use burn::train::TrainOutput;

use crate::lm::{LanguageModel, LmOutput, TokenBatch};
use crate::training::Components;

/// How the rows of one optimizer step are divided between devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPlan {
    /// Each device takes `micro_batches` whole consecutive micro-batches.
    WholeMicroBatches {
        /// Micro-batches per device.
        micro_batches: usize,
    },
    /// Each micro-batch is cut into one part of `rows` rows per device.
    SplitMicroBatches {
        /// Rows per device and micro-batch.
        rows: usize,
    },
}

impl ShardPlan {
    /// The plan for `devices` devices, micro-batches of `batch_size` rows and `grad_accum`
    /// micro-batches per step, or why the global batch does not split evenly.
    pub fn new(batch_size: usize, grad_accum: usize, devices: usize) -> Result<Self, String> {
        if devices == 0 {
            return Err("no device to train on".into());
        }
        if grad_accum.is_multiple_of(devices) {
            Ok(Self::WholeMicroBatches {
                micro_batches: grad_accum / devices,
            })
        } else if batch_size.is_multiple_of(devices) {
            Ok(Self::SplitMicroBatches {
                rows: batch_size / devices,
            })
        } else {
            Err(format!(
                "{devices} devices cannot share the global batch of {batch_size} × {grad_accum} \
                 sequences evenly: make --grad-accum or --batch-size a multiple of {devices}"
            ))
        }
    }

    /// Shard `shard` of `batch` (rows `[micro × batch_size, width]`) as a batch of its own.
    pub fn shard<B: Backend>(
        &self,
        batch: &TokenBatch<B>,
        shard: usize,
        devices: usize,
    ) -> TokenBatch<B> {
        let [rows, _] = batch.ids.dims();
        let micro = batch.micro_batches.max(1);
        let per = rows / micro;
        let ids = match *self {
            Self::WholeMicroBatches { micro_batches } => {
                let len = micro_batches * per;
                batch.ids.clone().narrow(0, shard * len, len)
            }
            Self::SplitMicroBatches { rows: part } => {
                debug_assert_eq!(part * devices, per);
                let parts = (0..micro)
                    .map(|i| batch.ids.clone().narrow(0, i * per + shard * part, part))
                    .collect();
                Tensor::cat(parts, 0)
            }
        };
        let micro_batches = match *self {
            Self::WholeMicroBatches { micro_batches } => micro_batches,
            Self::SplitMicroBatches { .. } => micro,
        };
        TokenBatch {
            ids,
            micro_batches,
            shard,
            step: batch.step,
        }
    }
}

/// A data loader iterator that yields one given item: how one shard is handed to Burn's
/// [`MultiDevicesTrainStep`], which pulls one item per device from an iterator.
struct OneItem<T>(Option<T>);

impl<T> Iterator for OneItem<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T> DataLoaderIterator<T> for OneItem<T> {
    fn progress(&self) -> Progress {
        Progress::new(usize::from(self.0.is_none()), 1)
    }
}

/// The data-parallel train step; see the module documentation.
pub struct DataParallel<B: AutodiffBackend> {
    devices: Vec<B::Device>,
    plan: ShardPlan,
    step: MultiDevicesTrainStep<Components<B>>,
}

impl<B: AutodiffBackend> DataParallel<B> {
    /// Workers on `devices` (the first is the main device, where the optimizer runs).
    pub fn new(devices: Vec<B::Device>, plan: ShardPlan) -> Self {
        let step = MultiDevicesTrainStep::<Components<B>>::new(&devices);
        Self {
            devices,
            plan,
            step,
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Always `false`: there is at least one device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Forward and backward passes of `batch` (on the main device) spread over the devices:
    /// the averaged, globally clipped gradient on the main device and the step's output.
    pub fn step(
        &self,
        model: &LanguageModel<B>,
        batch: TokenBatch<B>,
    ) -> TrainOutput<LmOutput<B::InnerBackend>> {
        let n = self.devices.len();
        let main = &self.devices[0];
        let [rows, width] = batch.ids.dims();
        let mut iterators: Vec<Box<dyn DataLoaderIterator<TokenBatch<B>>>> = (0..n)
            .map(|d| {
                let mut shard = self.plan.shard(&batch, d, n);
                shard.ids = shard.ids.to_device(&self.devices[d]);
                Box::new(OneItem(Some(shard))) as Box<dyn DataLoaderIterator<TokenBatch<B>>>
            })
            .collect();
        // the workers return unclipped gradients: clipping needs the global norm
        let mut unclipped = model.clone();
        unclipped.grad_clip = 0.0;
        let (mut outputs, _) = self.step.step(&mut iterators, &unclipped);
        assert_eq!(outputs.len(), n, "a device worker returned no output");
        // a fixed summation order, whatever order the workers finished in
        outputs.sort_by_key(|o| o.output.item.shard);

        let mut accumulator = GradientsAccumulator::<LanguageModel<B>>::new();
        let mut losses = Vec::with_capacity(n);
        let mut indexer_losses = Vec::new();
        let mut non_finite = false;
        for out in outputs {
            let item = out.output.item;
            non_finite |= item.non_finite;
            losses.push(item.loss_value);
            indexer_losses.extend(item.indexer_loss);
            let grads = out.output.grads.to_device(main, model);
            accumulator.accumulate(model, grads);
        }
        let loss_value = losses.iter().sum::<f64>() / n as f64;
        // the mean of the device gradients, clipped like one device's
        let (grads, norm, non_finite) =
            model.finish_gradients(accumulator.grads(), n, loss_value, non_finite);
        let inner = main.clone();
        let loss = Tensor::<B::InnerBackend, 1>::from_floats([loss_value as f32], &inner);
        let item = LmOutput::training(loss, loss_value, rows * (width - 1), norm, non_finite);
        let indexer_loss = (!indexer_losses.is_empty())
            .then(|| indexer_losses.iter().sum::<f64>() / indexer_losses.len() as f64);
        TrainOutput {
            grads,
            item: LmOutput {
                indexer_loss,
                ..item
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn batch(micro: usize, per: usize) -> TokenBatch<B> {
        let rows = micro * per;
        let data: Vec<i64> = (0..rows as i64 * 3).collect();
        TokenBatch {
            ids: Tensor::from_data(TensorData::new(data, [rows, 3]), &Default::default()),
            micro_batches: micro,
            shard: 0,
            step: 0,
        }
    }

    fn first_column(b: &TokenBatch<B>) -> Vec<i64> {
        let v: Vec<i64> = b.ids.to_data().to_vec().unwrap();
        v.chunks(3).map(|r| r[0] / 3).collect()
    }

    #[test]
    fn plans_split_evenly_or_explain_why_not() {
        assert_eq!(
            ShardPlan::new(16, 4, 2),
            Ok(ShardPlan::WholeMicroBatches { micro_batches: 2 })
        );
        assert_eq!(
            ShardPlan::new(16, 1, 2),
            Ok(ShardPlan::SplitMicroBatches { rows: 8 })
        );
        let err = ShardPlan::new(5, 3, 2).unwrap_err();
        assert!(
            err.contains("--grad-accum") && err.contains("5 × 3"),
            "{err}"
        );
        assert!(ShardPlan::new(4, 4, 0).is_err());
    }

    #[test]
    fn shards_cover_every_row_once_with_equal_micro_batches() {
        // 4 micro-batches of 2 rows over 2 devices: whole micro-batches
        let b = batch(4, 2);
        let plan = ShardPlan::new(2, 4, 2).unwrap();
        let s0 = plan.shard(&b, 0, 2);
        let s1 = plan.shard(&b, 1, 2);
        assert_eq!(first_column(&s0), vec![0, 1, 2, 3]);
        assert_eq!(first_column(&s1), vec![4, 5, 6, 7]);
        assert_eq!((s0.micro_batches, s1.shard), (2, 1));
        // 3 micro-batches of 4 rows over 2 devices: each micro-batch cut in half
        let b = batch(3, 4);
        let plan = ShardPlan::new(4, 3, 2).unwrap();
        let s0 = plan.shard(&b, 0, 2);
        let s1 = plan.shard(&b, 1, 2);
        assert_eq!(first_column(&s0), vec![0, 1, 4, 5, 8, 9]);
        assert_eq!(first_column(&s1), vec![2, 3, 6, 7, 10, 11]);
        assert_eq!(s0.micro_batches, 3);
    }
}
