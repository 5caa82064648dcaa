//! The train/validation split and the windows drawn from it: random training windows that
//! resume from a step counter, and fixed validation windows.

use std::ops::Range;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::CorpusError;

/// Splits a stream of `tokens_len` tokens into training and validation ranges: validation is
/// the last `round(tokens_len * val_fraction)` tokens, training everything before it.
pub fn split(
    tokens_len: usize,
    val_fraction: f64,
) -> Result<(Range<usize>, Range<usize>), CorpusError> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(CorpusError::BadFraction(val_fraction));
    }
    let val = ((tokens_len as f64) * val_fraction).round() as usize;
    let cut = tokens_len - val.min(tokens_len);
    Ok((0..cut, cut..tokens_len))
}

/// Start offsets of the validation windows of `range`: windows of `seq_len + 1` tokens
/// starting every `seq_len` tokens (`range.start`, `range.start + seq_len`, ...), as many as
/// fit inside the range. Window `k` predicts targets `start + k·seq_len + 1 ..= start +
/// (k+1)·seq_len`, so no target is predicted twice and no window reads past `range.end`.
/// Fewer than `seq_len` targets at the end may be left over: [`eval_tail`] returns them as
/// one shorter window, so windows plus tail predict every target of the range exactly once.
pub fn eval_windows(range: Range<usize>, seq_len: usize) -> impl Iterator<Item = usize> {
    let n = full_eval_windows(&range, seq_len);
    (0..n).map(move |k| range.start + k * seq_len)
}

/// The tokens after the last [`eval_windows`] window that still hold unpredicted targets:
/// `Some(a..range.end)` (shorter than `seq_len + 1`; token `a` is context, `a+1..end` are the
/// remaining targets), or `None` when the windows cover every target.
pub fn eval_tail(range: Range<usize>, seq_len: usize) -> Option<Range<usize>> {
    if seq_len == 0 || range.len() < 2 {
        return None;
    }
    let a = range.start + full_eval_windows(&range, seq_len) * seq_len;
    (range.end - a >= 2).then_some(a..range.end)
}

fn full_eval_windows(range: &Range<usize>, seq_len: usize) -> usize {
    if seq_len == 0 || range.len() < 2 {
        0
    } else {
        (range.len() - 1) / seq_len
    }
}

/// Random training windows of `seq_len + 1` tokens inside a token range.
///
/// Window `k` starts at a uniform offset drawn from a ChaCha8 stream keyed by `seed` with
/// stream number `k`, so it depends only on `(seed, k)`: to resume training at step `k`,
/// restore the serialised sampler (or call [`WindowSampler::set_step`]) and the windows
/// continue exactly as in an uninterrupted run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SamplerState", into = "SamplerState")]
pub struct WindowSampler {
    seq_len: usize,
    range: Range<usize>,
    seed: u64,
    step: u64,
}

/// Serialised form of [`WindowSampler`] (validated when deserialised).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SamplerState {
    seq_len: usize,
    start: usize,
    end: usize,
    seed: u64,
    step: u64,
}

impl From<WindowSampler> for SamplerState {
    fn from(s: WindowSampler) -> Self {
        Self {
            seq_len: s.seq_len,
            start: s.range.start,
            end: s.range.end,
            seed: s.seed,
            step: s.step,
        }
    }
}

impl TryFrom<SamplerState> for WindowSampler {
    type Error = CorpusError;
    fn try_from(s: SamplerState) -> Result<Self, CorpusError> {
        let mut sampler = WindowSampler::new(s.start..s.end, s.seq_len, s.seed)?;
        sampler.step = s.step;
        Ok(sampler)
    }
}

impl WindowSampler {
    /// A sampler at step 0. Errors if `seq_len` is 0 or the range is shorter than
    /// `seq_len + 1` tokens.
    pub fn new(range: Range<usize>, seq_len: usize, seed: u64) -> Result<Self, CorpusError> {
        if seq_len == 0 {
            return Err(CorpusError::ZeroSeqLen);
        }
        if range.start > range.end || range.len() < seq_len + 1 {
            return Err(CorpusError::RangeTooShort {
                start: range.start,
                end: range.end,
                len: range.len(),
                window: seq_len + 1,
            });
        }
        Ok(Self {
            seq_len,
            range,
            seed,
            step: 0,
        })
    }

    /// Start of window `step`; the window is `start..start + seq_len + 1`, inside the range.
    pub fn start_at(&self, step: u64) -> usize {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(step);
        // number of valid starts: range.len() - (seq_len + 1) + 1
        let n = (self.range.len() - self.seq_len) as u128;
        // multiply-shift: uniform up to a bias below n / 2^64
        let r = ((rng.next_u64() as u128 * n) >> 64) as usize;
        self.range.start + r
    }

    /// Start of the next window; advances the step.
    pub fn next_start(&mut self) -> usize {
        let s = self.start_at(self.step);
        self.step += 1;
        s
    }

    /// Starts of the next `batch_size` windows.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        (0..batch_size).map(|_| self.next_start()).collect()
    }

    /// Number of windows drawn so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Moves to window `step` (e.g. when resuming from a checkpoint).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Tokens per window (`seq_len + 1`).
    pub fn window_len(&self) -> usize {
        self.seq_len + 1
    }

    /// The sequence length (number of predicted targets per window).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The sampled token range.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Iterator for WindowSampler {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        Some(self.next_start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_tail_validation() {
        assert_eq!(split(1000, 0.1).unwrap(), (0..900, 900..1000));
        assert_eq!(split(1000, 0.0).unwrap(), (0..1000, 1000..1000));
        assert_eq!(split(10, 0.25).unwrap(), (0..7, 7..10)); // round(2.5) = 3
        assert!(split(10, 1.0).is_err());
        assert!(split(10, -0.1).is_err());
        assert!(split(10, f64::NAN).is_err());
    }

    #[test]
    fn eval_windows_predict_every_target_once() {
        for start in [0usize, 5] {
            for len in 0..60usize {
                for seq_len in 1..12usize {
                    let range = start..start + len;
                    let mut predicted = vec![0u32; start + len];
                    for s in eval_windows(range.clone(), seq_len) {
                        assert!(
                            s >= range.start && s + seq_len < range.end,
                            "read past the end"
                        );
                        for p in &mut predicted[s + 1..=s + seq_len] {
                            *p += 1;
                        }
                    }
                    let covered: usize = predicted.iter().map(|&c| c as usize).sum();
                    let tail_targets = (len.max(1) - 1) - covered;
                    assert!(tail_targets < seq_len, "len {len} seq {seq_len}");
                    if let Some(tail) = eval_tail(range.clone(), seq_len) {
                        assert!(tail.start >= range.start && tail.end == range.end);
                        assert!(tail.len() <= seq_len, "tail is shorter than a window");
                        for p in &mut predicted[tail.start + 1..tail.end] {
                            *p += 1;
                        }
                    } else {
                        assert_eq!(tail_targets, 0);
                    }
                    for (t, &c) in predicted.iter().enumerate() {
                        let is_target = t > range.start && t < range.end;
                        assert_eq!(c, is_target as u32, "token {t} len {len} seq {seq_len}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_windows_stay_in_range() {
        for (range, seq_len) in [
            (0..9usize, 8usize),
            (100..1000, 64),
            (5..6, 0),
            (3..3000, 1),
        ] {
            let Ok(mut s) = WindowSampler::new(range.clone(), seq_len, 42) else {
                assert_eq!(seq_len, 0);
                continue;
            };
            let mut seen = std::collections::HashSet::new();
            for _ in 0..2000 {
                let start = s.next_start();
                assert!(start >= range.start && start + seq_len < range.end);
                seen.insert(start);
            }
            // the only possible start is used when the range holds exactly one window
            if range.len() == seq_len + 1 {
                assert_eq!(seen.len(), 1);
            } else {
                assert!(seen.len() > 1);
            }
        }
        let err = WindowSampler::new(10..20, 10, 0).unwrap_err().to_string();
        assert!(
            err.contains("10..20") && err.contains("10 tokens") && err.contains("11"),
            "{err}"
        );
    }

    #[test]
    fn sampler_resume_matches_uninterrupted_run() {
        let mut full = WindowSampler::new(0..100_000, 128, 7).unwrap();
        let uninterrupted: Vec<usize> = (0..50).map(|_| full.next_start()).collect();

        let mut first = WindowSampler::new(0..100_000, 128, 7).unwrap();
        let mut resumed_starts = first.next_batch(20);
        let json = serde_json::to_string(&first).unwrap();
        let mut resumed: WindowSampler = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed.step(), 20);
        resumed_starts.extend(resumed.next_batch(30));
        assert_eq!(resumed_starts, uninterrupted);

        // resuming from the step alone
        let mut by_step = WindowSampler::new(0..100_000, 128, 7).unwrap();
        by_step.set_step(33);
        assert_eq!(by_step.next_start(), uninterrupted[33]);
        assert_eq!(full.start_at(33), uninterrupted[33]);
        // another seed gives other windows
        let other = WindowSampler::new(0..100_000, 128, 8).unwrap();
        assert_ne!(
            (0..50).map(|k| other.start_at(k)).collect::<Vec<_>>(),
            uninterrupted
        );
        // invalid serialised state is rejected
        let bad = r#"{"seq_len":128,"start":0,"end":100,"seed":7,"step":0}"#;
        assert!(serde_json::from_str::<WindowSampler>(bad).is_err());
    }
}
