//! Choosing the next token from logits: greedy, temperature, top-k (as the reference's `thres`
//! fraction or as a count), top-p, min-p, a repetition penalty, and the reference's Gumbel
//! sampling (`argmax(logits / temperature + gumbel noise)`), seeded for reproducible output.
//!
//! The order of the rules: the repetition penalty changes the logits of recent tokens, then
//! top-k keeps the most likely tokens, min-p those of them at least `min_p` times as likely as
//! the most likely one (after the temperature), top-p the nucleus of what is left, and the
//! Gumbel-max draw picks among the rest. Top-p, min-p and the penalty run on the host; the
//! device sampler covers greedy, temperature and top-k.
//!
//! The noise of token `i` is a hash of `(key, i)` ([`gumbel_noise`]) with one 64-bit key drawn
//! per sampled token, so the same rule runs on the device without a random stream
//! (`kernels::NsaKernels::sample_tokens`, used by [`crate::Transformer::generate`] where a
//! backend has it): given the same logits, host and device pick the same token (up to a
//! near-tie within float rounding of the noise).

use serde::{Deserialize, Serialize};

/// Which tokens survive the top-k filter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum TopK {
    /// The reference's `top_k(logits, thres)`: keep `ceil((1 - thres) * vocab)` tokens.
    Threshold(f64),
    /// Keep this many tokens.
    Count(usize),
}

/// Sampling settings. The default is the reference's `sample()`: top-k with `thres = 0.9`,
/// temperature 1, Gumbel sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// `0` means greedy (argmax).
    pub temperature: f64,
    /// Optional top-k filter.
    pub top_k: Option<TopK>,
    /// Optional nucleus filter: keep the most likely tokens whose probabilities add up to `p`.
    pub top_p: Option<f64>,
    /// Optional min-p filter: keep the tokens whose probability (at the temperature) is at
    /// least this fraction of the most likely token's.
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Optional repetition penalty (llama.cpp's `repeat_penalty`): a token among the recent
    /// ones has its logit divided by it when positive, multiplied when negative.
    #[serde(default)]
    pub repetition: Option<Repetition>,
}

/// The repetition penalty of [`Sampling`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Repetition {
    /// Penalty, > 0 (1 = none, > 1 discourages repeats).
    pub penalty: f64,
    /// How many of the most recent tokens (prompt included) count.
    pub last_n: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: Some(TopK::Threshold(0.9)),
            top_p: None,
            min_p: None,
            repetition: None,
        }
    }
}

/// A sampling setting out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature negative or not finite.
    #[error("temperature must be a finite number >= 0 (0 = greedy), got {0}")]
    Temperature(f64),
    /// `thres` outside `[0, 1)`.
    #[error("top-k threshold must be in [0, 1) (the reference's `thres`), got {0}")]
    Threshold(f64),
    /// Top-k count of zero.
    #[error("top-k count must be at least 1")]
    ZeroCount,
    /// Top-p outside `(0, 1]`.
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f64),
    /// Min-p outside `[0, 1]`.
    #[error("min-p must be in [0, 1], got {0}")]
    MinP(f64),
    /// Repetition penalty not a finite number > 0.
    #[error("the repetition penalty must be a finite number > 0 (1 = none), got {0}")]
    Penalty(f64),
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            ..Self::default()
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        match self.top_k {
            Some(TopK::Threshold(t)) if !(0.0..1.0).contains(&t) => {
                return Err(SamplingError::Threshold(t))
            }
            Some(TopK::Count(0)) => return Err(SamplingError::ZeroCount),
            _ => {}
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError::TopP(p));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(SamplingError::MinP(p));
            }
        }
        if let Some(r) = self.repetition {
            if !(r.penalty.is_finite() && r.penalty > 0.0) {
                return Err(SamplingError::Penalty(r.penalty));
            }
        }
        Ok(())
    }

    /// Whether the choice depends on the tokens before it (a repetition penalty is set).
    pub fn needs_history(&self) -> bool {
        self.repetition
            .is_some_and(|r| r.penalty != 1.0 && r.last_n > 0)
    }

    /// [`Sampling::sample`] after the tokens `history` (prompt and generated, oldest first):
    /// the repetition penalty applies to the last `last_n` of them.
    pub fn sample_after(&self, logits: &[f32], history: &[u32], rng: &mut SplitMix64) -> usize {
        match self.penalised(logits, history) {
            Some(row) => self.sample(&row, rng),
            None => self.sample(logits, rng),
        }
    }

    /// `logits` with the repetition penalty applied to the recent tokens of `history`; `None`
    /// when there is no penalty.
    fn penalised(&self, logits: &[f32], history: &[u32]) -> Option<Vec<f32>> {
        if !self.needs_history() {
            return None;
        }
        let r = self.repetition?;
        let mut row = logits.to_vec();
        let recent = &history[history.len().saturating_sub(r.last_n)..];
        let mut seen = std::collections::HashSet::new();
        let p = r.penalty as f32;
        for &t in recent {
            let t = t as usize;
            if t < row.len() && seen.insert(t) {
                row[t] = if row[t] > 0.0 { row[t] / p } else { row[t] * p };
            }
        }
        Some(row)
    }

    /// Picks a token from `logits` (one row). NaN logits count as `-inf`.
    pub fn sample(&self, logits: &[f32], rng: &mut SplitMix64) -> usize {
        if self.temperature <= 0.0 {
            return argmax(logits.iter().copied());
        }
        self.sample_with_key(logits, rng.next_u64())
    }

    /// [`Sampling::sample`] with the noise key given (one key per sampled token; what the
    /// device kernel gets for the same choice).
    pub fn sample_with_key(&self, logits: &[f32], noise_key: u64) -> usize {
        if self.temperature <= 0.0 {
            return argmax(logits.iter().copied());
        }
        let v = logits.len();
        let key = |i: usize| {
            let x = logits[i];
            if x.is_nan() {
                f32::NEG_INFINITY
            } else {
                x
            }
        };
        let k = self.kept(v);
        let keep = if self.top_p.is_some() {
            // the nucleus needs the kept tokens most likely first (ties: lower index first)
            let mut keep = top_k_in_index_order(logits.len(), k, key);
            keep.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            keep
        } else {
            top_k_in_index_order(logits.len(), k, key)
        };
        let mut keep = keep;
        if let Some(min_p) = self.min_p.filter(|&p| p > 0.0) {
            // p_i >= min_p * p_max  <=>  logit_i / T >= logit_max / T + ln(min_p)
            let inv_t = 1.0 / self.temperature.max(1e-10);
            let max = keep
                .iter()
                .map(|&i| key(i) as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let floor = max * inv_t + min_p.ln();
            keep.retain(|&i| key(i) as f64 * inv_t >= floor);
        }
        let mut n = keep.len();
        if let Some(p) = self.top_p {
            let scaled: Vec<f64> = keep
                .iter()
                .map(|&i| key(i) as f64 / self.temperature.max(1e-10))
                .collect();
            let max = scaled[0];
            let w: Vec<f64> = scaled.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            n = w.len();
            for (j, wj) in w.iter().enumerate() {
                acc += wj / total;
                if acc >= p {
                    n = j + 1;
                    break;
                }
            }
        }
        // Gumbel-max over the candidates: argmax(logit / T + g(key, index)), ties to the lower
        // index (the order the device reduces in)
        let inv_t = (1.0 / self.temperature.max(1e-10)) as f32;
        let mut best = (0usize, f32::NEG_INFINITY);
        for &i in &keep[..n] {
            let s = key(i) * inv_t + gumbel_noise(noise_key, i as u32);
            if s > best.1 || (s == best.1 && i < best.0) {
                best = (i, s);
            }
        }
        best.0
    }

    /// This rule as the device sampler runs it, for a vocabulary of `vocab`: `None` with top-p,
    /// min-p or a repetition penalty (host only).
    pub fn device_rule(&self, vocab: usize) -> Option<DeviceSampling> {
        if self.top_p.is_some() || self.min_p.is_some_and(|p| p > 0.0) || self.needs_history() {
            return None;
        }
        Some(DeviceSampling {
            greedy: self.temperature <= 0.0,
            kept: self.kept(vocab),
            inv_temp: (1.0 / self.temperature.max(1e-10)) as f32,
        })
    }

    /// Tokens the top-k filter keeps of `vocab`.
    fn kept(&self, vocab: usize) -> usize {
        match self.top_k {
            Some(TopK::Threshold(t)) => ((1.0 - t) * vocab as f64).ceil() as usize,
            Some(TopK::Count(c)) => c,
            None => vocab,
        }
        .clamp(1, vocab.max(1))
    }
}

/// [`Sampling`] as the device kernel takes it (no top-p).
pub use crate::kernels::DeviceSampling;

/// Murmur3's 32-bit finaliser.
fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// The Gumbel noise `-ln(-ln(u))` of token `index` under `key`, `u` in `(0, 1)` from 24 hashed
/// bits; the device kernel computes the same function in f32.
pub fn gumbel_noise(key: u64, index: u32) -> f32 {
    let (lo, hi) = (key as u32, (key >> 32) as u32);
    let h = mix32(mix32(index.wrapping_mul(0x9E37_79B9) ^ lo) ^ hi);
    let u = ((h >> 8) as f32 + 0.5) / 16_777_216.0;
    -(-u.ln()).ln()
}

/// The `k` largest of `key(0..v)` (ties at the `k`-th value: the lower indices), in index order.
/// One selection over the values instead of a sort: the sampler's cost per token on the host.
fn top_k_in_index_order(v: usize, k: usize, key: impl Fn(usize) -> f32) -> Vec<usize> {
    if k >= v {
        return (0..v).collect();
    }
    let mut values: Vec<f32> = (0..v).map(&key).collect();
    let (_, &mut kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let above = (0..v).filter(|&i| key(i).total_cmp(&kth).is_gt()).count();
    let mut ties = k - above;
    (0..v)
        .filter(|&i| match key(i).total_cmp(&kth) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal if ties > 0 => {
                ties -= 1;
                true
            }
            _ => false,
        })
        .collect()
}

fn argmax(xs: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// A small seeded generator (SplitMix64) for reproducible sampling on every backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut rng = SplitMix64(1);
        assert_eq!(Sampling::greedy().sample(&[0.1, 3.0, -1.0], &mut rng), 1);
    }

    #[test]
    fn top_k_threshold_keeps_the_reference_count() {
        // thres 0.9 over 20 tokens keeps ceil(0.1 * 20) = 2 tokens
        let logits: Vec<f32> = (0..20).map(|i| i as f32 * 0.01).collect();
        let s = Sampling::default();
        let mut rng = SplitMix64(7);
        for _ in 0..200 {
            let t = s.sample(&logits, &mut rng);
            assert!(t == 19 || t == 18, "{t}");
        }
    }

    #[test]
    fn top_k_selection_matches_a_full_sort() {
        // ties at the k-th value go to the lower indices, as a stable sort by logit would keep
        assert_eq!(
            top_k_in_index_order(5, 2, |i| [1.0, 3.0, 3.0, 3.0, 0.0][i]),
            vec![1, 2]
        );
        let mut rng = SplitMix64(9);
        for k in [1, 3, 17, 40, 63, 64] {
            // few distinct values: many ties
            let xs: Vec<f32> = (0..64)
                .map(|_| (rng.uniform() * 6.0).floor() as f32)
                .collect();
            let mut sorted: Vec<usize> = (0..64).collect();
            sorted.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
            let mut want = sorted[..k].to_vec();
            want.sort();
            assert_eq!(top_k_in_index_order(64, k, |i| xs[i]), want, "k = {k}");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_sampling_follows_probabilities() {
        let logits = [2.0f32.ln(), 1.0f32.ln(), 1.0f32.ln(), (1e-3f32).ln()];
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.7),
            ..Sampling::default()
        };
        let mut rng = SplitMix64(3);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[s.sample(&logits, &mut rng)] += 1;
        }
        // nucleus = {0, one of 1/2}: token 3 never, token 0 about 2/3
        assert_eq!(counts[3], 0);
        let p0 = counts[0] as f64 / 4000.0;
        assert!((p0 - 2.0 / 3.0).abs() < 0.05, "{p0}");
    }

    #[test]
    fn the_noise_is_gumbel_distributed() {
        // mean of Gumbel(0, 1) is Euler's constant, its variance pi^2 / 6
        let n = 100_000;
        let g: Vec<f64> = (0..n)
            .map(|i| gumbel_noise(0xABCD_1234_5678, i) as f64)
            .collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.577_215_7).abs() < 0.02, "{mean}");
        assert!(
            (var - std::f64::consts::PI.powi(2) / 6.0).abs() < 0.05,
            "{var}"
        );
        // another key, other noise
        assert_ne!(gumbel_noise(1, 5), gumbel_noise(2, 5));
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 / 5.0).collect();
        let s = Sampling {
            temperature: 0.8,
            top_k: Some(TopK::Count(10)),
            top_p: None,
            ..Sampling::default()
        };
        let run = |seed| {
            let mut rng = SplitMix64(seed);
            (0..20)
                .map(|_| s.sample(&logits, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn min_p_keeps_tokens_near_the_most_likely() {
        // probabilities 0.5, 0.3, 0.15, 0.05: min-p 0.25 keeps 0.5 and 0.3 (>= 0.125) and 0.15
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let s = Sampling {
            top_k: None,
            min_p: Some(0.25),
            ..Sampling::default()
        };
        assert!(s.device_rule(4).is_none(), "min-p runs on the host");
        let mut rng = SplitMix64(4);
        let mut counts = [0usize; 4];
        for _ in 0..6000 {
            counts[s.sample(&logits, &mut rng)] += 1;
        }
        assert_eq!(counts[3], 0, "{counts:?}");
        let p0 = counts[0] as f64 / 6000.0;
        assert!((p0 - 0.5 / 0.95).abs() < 0.03, "{p0}");
        // min-p 1 is greedy among the most likely
        let s = Sampling {
            min_p: Some(1.0),
            ..s
        };
        assert!((0..50).all(|_| s.sample(&logits, &mut rng) == 0));
    }

    #[test]
    fn the_repetition_penalty_discourages_recent_tokens() {
        let logits = [2.0f32, 1.9, -1.0, 0.5];
        let greedy = Sampling {
            repetition: Some(Repetition {
                penalty: 1.5,
                last_n: 2,
            }),
            ..Sampling::greedy()
        };
        let mut rng = SplitMix64(1);
        // token 0 is recent: 2.0 / 1.5 < 1.9
        assert_eq!(greedy.sample_after(&logits, &[3, 0], &mut rng), 1);
        // ... but not within the last 2 tokens here
        assert_eq!(greedy.sample_after(&logits, &[0, 3, 2], &mut rng), 0);
        // negative logits are multiplied, so they fall further
        assert_eq!(greedy.penalised(&logits, &[2]).unwrap()[2], -1.5);
        // a penalty of 1 changes nothing and keeps the device sampler
        let none = Sampling {
            repetition: Some(Repetition {
                penalty: 1.0,
                last_n: 64,
            }),
            ..Sampling::default()
        };
        assert!(!none.needs_history() && none.device_rule(4).is_some());
        assert!(greedy.device_rule(4).is_none());
        let bad = Sampling {
            repetition: Some(Repetition {
                penalty: 0.0,
                last_n: 64,
            }),
            ..Sampling::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut s = Sampling {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(s.validate().is_err());
        s.temperature = 1.0;
        s.top_p = Some(0.0);
        assert!(s.validate().is_err());
        s.top_p = Some(1.5);
        assert!(s.validate().is_err());
        s.top_p = None;
        s.top_k = Some(TopK::Threshold(1.0));
        assert!(s.validate().is_err());
        s.top_k = Some(TopK::Count(0));
        assert!(s.validate().is_err());
        assert!(Sampling::default().validate().is_ok());
    }
}
