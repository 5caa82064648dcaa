//! Batches for the Learner, as Burn [`DataLoader`]s over the memory-mapped token cache.
//!
//! * [`TrainBatches`]: the batch of global optimizer step `s` holds the `rows = batch_size ×
//!   grad_accum` random windows `s·rows .. (s+1)·rows` of a [`WindowSampler`] (window `k`
//!   depends only on `(seed, k)`). One Learner epoch is `eval_every` steps; the loader's
//!   [`StepCursor`] holds the first step of the next epoch, so a resumed run (even one that
//!   stopped in the middle of an epoch) continues the exact data stream of an uninterrupted
//!   one.
//! * [`ValidBatches`]: fixed non-overlapping validation windows ([`corpus::eval_windows`]),
//!   optionally an evenly spread subset, in batches.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::prelude::*;

use crate::corpus::{self, CorpusError, TokenCache, WindowSampler};
use crate::lm::TokenBatch;

/// The first global step of the next training epoch (shared by the training loop and the
/// loader).
#[derive(Debug, Clone, Default)]
pub struct StepCursor(Arc<AtomicU64>);

impl StepCursor {
    /// A cursor at `step`.
    pub fn new(step: u64) -> Self {
        Self(Arc::new(AtomicU64::new(step)))
    }

    /// Sets the step.
    pub fn set(&self, step: u64) {
        self.0.store(step, Ordering::SeqCst);
    }

    /// The step.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn batch_tensor<B: Backend>(
    cache: &TokenCache,
    starts: impl Iterator<Item = usize>,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut ids = Vec::new();
    let mut rows = 0;
    for s in starts {
        ids.extend(cache.get(s..s + window).into_iter().map(|t| t as i64));
        rows += 1;
    }
    Tensor::from_data(TensorData::new(ids, [rows, window]), device)
}

/// Training batches (one per optimizer step).
#[derive(Clone)]
pub struct TrainBatches<B: Backend> {
    cache: Arc<TokenCache>,
    sampler: WindowSampler,
    batch_size: usize,
    grad_accum: usize,
    total_steps: u64,
    steps_per_epoch: u64,
    cursor: StepCursor,
    /// Items of each epoch to yield (`DataLoader::slice`), relative to the epoch start.
    slice: Option<(usize, usize)>,
    device: B::Device,
}

impl<B: Backend> TrainBatches<B> {
    /// Batches of random windows of `seq_len + 1` tokens from `range` of `cache`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: Arc<TokenCache>,
        range: Range<usize>,
        seq_len: usize,
        seed: u64,
        batch_size: usize,
        grad_accum: usize,
        total_steps: u64,
        steps_per_epoch: u64,
        cursor: StepCursor,
        device: B::Device,
    ) -> Result<Self, CorpusError> {
        Ok(Self {
            sampler: WindowSampler::new(range, seq_len, seed)?,
            cache,
            batch_size,
            grad_accum,
            total_steps,
            steps_per_epoch: steps_per_epoch.max(1),
            cursor,
            slice: None,
            device,
        })
    }

    /// Rows per optimizer step.
    pub fn rows(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    /// Window starts of global step `step`.
    pub fn starts(&self, step: u64) -> Vec<usize> {
        let rows = self.rows() as u64;
        (0..rows)
            .map(|r| self.sampler.start_at(step * rows + r))
            .collect()
    }

    /// The batch of global step `step`.
    pub fn batch(&self, step: u64) -> TokenBatch<B> {
        let ids = batch_tensor::<B>(
            &self.cache,
            self.starts(step).into_iter(),
            self.sampler.window_len(),
            &self.device,
        );
        TokenBatch {
            ids,
            micro_batches: self.grad_accum,
            shard: 0,
            step,
        }
    }

    /// Steps `[first, end)` the next iteration yields and the epoch's first step.
    fn epoch_bounds(&self) -> (u64, u64, u64) {
        let next = self.cursor.get().min(self.total_steps);
        let epoch_start = next / self.steps_per_epoch * self.steps_per_epoch;
        let epoch_end = (epoch_start + self.steps_per_epoch).min(self.total_steps);
        match self.slice {
            Some((a, b)) => {
                let a = (epoch_start + a as u64).max(next).min(epoch_end);
                let b = (epoch_start + b as u64).clamp(a, epoch_end);
                (a, b, epoch_start)
            }
            None => (next, epoch_end, epoch_start),
        }
    }
}

struct TrainIter<'a, B: Backend> {
    loader: &'a TrainBatches<B>,
    next: u64,
    end: u64,
    epoch_start: u64,
}

impl<B: Backend> Iterator for TrainIter<'_, B> {
    type Item = TokenBatch<B>;
    fn next(&mut self) -> Option<TokenBatch<B>> {
        if self.next >= self.end {
            return None;
        }
        let batch = self.loader.batch(self.next);
        self.next += 1;
        Some(batch)
    }
}

impl<B: Backend> DataLoaderIterator<TokenBatch<B>> for TrainIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress::new(
            (self.next - self.epoch_start) as usize,
            (self.end - self.epoch_start) as usize,
        )
    }
}

impl<B: Backend> DataLoader<B, TokenBatch<B>> for TrainBatches<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<TokenBatch<B>> + 'a> {
        let (next, end, epoch_start) = self.epoch_bounds();
        Box::new(TrainIter {
            loader: self,
            next,
            end,
            epoch_start,
        })
    }

    fn num_items(&self) -> usize {
        let (_, end, epoch_start) = self.epoch_bounds();
        (end - epoch_start) as usize
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        let mut other = self.clone();
        other.device = device.clone();
        Arc::new(other)
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        let mut other = self.clone();
        other.slice = Some((start, end));
        Arc::new(other)
    }
}

/// The validation windows used at every evaluation: all [`corpus::eval_windows`] of `range`,
/// or `max_windows` of them spread evenly over it (`max_windows = 0` = all).
pub fn validation_windows(range: Range<usize>, seq_len: usize, max_windows: usize) -> Vec<usize> {
    let all: Vec<usize> = corpus::eval_windows(range, seq_len).collect();
    if max_windows == 0 || all.len() <= max_windows {
        return all;
    }
    (0..max_windows)
        .map(|i| all[i * all.len() / max_windows])
        .collect()
}

/// Validation batches.
#[derive(Clone)]
pub struct ValidBatches<B: Backend> {
    cache: Arc<TokenCache>,
    starts: Arc<Vec<usize>>,
    window: usize,
    batch_size: usize,
    device: B::Device,
}

impl<B: Backend> ValidBatches<B> {
    /// Batches of `batch_size` windows of `seq_len + 1` tokens starting at `starts`.
    pub fn new(
        cache: Arc<TokenCache>,
        starts: Vec<usize>,
        seq_len: usize,
        batch_size: usize,
        device: B::Device,
    ) -> Self {
        Self {
            cache,
            starts: Arc::new(starts),
            window: seq_len + 1,
            batch_size: batch_size.max(1),
            device,
        }
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.starts.len()
    }
}

struct ValidIter<'a, B: Backend> {
    loader: &'a ValidBatches<B>,
    next: usize,
    batches: usize,
}

impl<B: Backend> Iterator for ValidIter<'_, B> {
    type Item = TokenBatch<B>;
    fn next(&mut self) -> Option<TokenBatch<B>> {
        let l = self.loader;
        if self.next >= self.batches {
            return None;
        }
        let a = self.next * l.batch_size;
        let b = (a + l.batch_size).min(l.starts.len());
        self.next += 1;
        Some(TokenBatch {
            ids: batch_tensor::<B>(
                &l.cache,
                l.starts[a..b].iter().copied(),
                l.window,
                &l.device,
            ),
            micro_batches: 1,
            shard: 0,
            step: 0,
        })
    }
}

impl<B: Backend> DataLoaderIterator<TokenBatch<B>> for ValidIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress::new(self.next, self.batches)
    }
}

impl<B: Backend> DataLoader<B, TokenBatch<B>> for ValidBatches<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<TokenBatch<B>> + 'a> {
        Box::new(ValidIter {
            loader: self,
            next: 0,
            batches: self.num_items(),
        })
    }

    fn num_items(&self) -> usize {
        self.starts.len().div_ceil(self.batch_size)
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        let mut other = self.clone();
        other.device = device.clone();
        Arc::new(other)
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        let mut other = self.clone();
        let a = (start * self.batch_size).min(self.starts.len());
        let b = (end * self.batch_size).clamp(a, self.starts.len());
        other.starts = Arc::new(self.starts[a..b].to_vec());
        Arc::new(other)
    }
}

/// Entropy (nats) of the unigram distribution of the tokens in `range`: the loss of a model
/// that predicts every token by its frequency alone. Also returns the number of distinct
/// tokens.
pub fn unigram_entropy(cache: &TokenCache, range: Range<usize>) -> (f64, usize) {
    let mut counts = vec![0u64; cache.vocab_size().max(1)];
    const CHUNK: usize = 1 << 20;
    let mut a = range.start;
    while a < range.end {
        let b = (a + CHUNK).min(range.end);
        for t in cache.get(a..b) {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        a = b;
    }
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return (0.0, 0);
    }
    let n = n as f64;
    let mut h = 0.0;
    let mut distinct = 0;
    for &c in &counts {
        if c > 0 {
            let p = c as f64 / n;
            h -= p * p.ln();
            distinct += 1;
        }
    }
    (h, distinct)
}

/// The prompt of the sample generated after step `step`: the first `len` tokens of a random
/// validation window (chosen from `(seed, step)`).
pub fn sample_prime(
    cache: &TokenCache,
    range: Range<usize>,
    len: usize,
    seed: u64,
    step: u64,
) -> Vec<u32> {
    let len = len.min(range.len()).max(1);
    match WindowSampler::new(range.clone(), len - 1, seed ^ 0x9e37_79b9_7f4a_7c15) {
        Ok(s) => {
            let start = s.start_at(step);
            cache.get(start..start + len)
        }
        Err(_) => cache.get(range.start..range.start + len.min(range.len())),
    }
}
