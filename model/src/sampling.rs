//! Choosing the next token from logits, on the host: greedy, temperature, top-k (as the
//! reference's `thres` fraction or as a count), top-p, and the reference's Gumbel sampling
//! (`argmax(logits / temperature + gumbel noise)`), seeded for reproducible output.

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
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: Some(TopK::Threshold(0.9)),
            top_p: None,
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
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
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
        Ok(())
    }

    /// Picks a token from `logits` (one row). NaN logits count as `-inf`.
    pub fn sample(&self, logits: &[f32], rng: &mut SplitMix64) -> usize {
        if self.temperature <= 0.0 {
            return argmax(logits.iter().copied());
        }
        let v = logits.len();
        let mut keep: Vec<usize> = (0..v).collect();
        let key = |i: &usize| {
            let x = logits[*i];
            if x.is_nan() {
                f32::NEG_INFINITY
            } else {
                x
            }
        };
        let k = match self.top_k {
            Some(TopK::Threshold(t)) => ((1.0 - t) * v as f64).ceil() as usize,
            Some(TopK::Count(c)) => c,
            None => v,
        }
        .clamp(1, v);
        // the k most likely (O(v)), then sorted, most likely first
        let by_logit = |a: &usize, b: &usize| key(b).total_cmp(&key(a)).then(a.cmp(b));
        if k < v {
            keep.select_nth_unstable_by(k - 1, by_logit);
            keep.truncate(k);
        }
        keep.sort_by(by_logit);
        let scaled: Vec<f64> = keep
            .iter()
            .map(|i| key(i) as f64 / self.temperature.max(1e-10))
            .collect();
        let mut n = keep.len();
        if let Some(p) = self.top_p {
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
        // Gumbel-max: argmax(logits / T + g), g = -log(-log(u))
        let best = argmax(scaled[..n].iter().map(|s| {
            let u = rng.uniform().max(1e-20);
            (s - (-u.ln()).max(1e-20).ln()) as f32
        }));
        keep[best]
    }
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
    fn top_p_keeps_the_nucleus_and_sampling_follows_probabilities() {
        let logits = [2.0f32.ln(), 1.0f32.ln(), 1.0f32.ln(), (1e-3f32).ln()];
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.7),
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
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 / 5.0).collect();
        let s = Sampling {
            temperature: 0.8,
            top_k: Some(TopK::Count(10)),
            top_p: None,
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
