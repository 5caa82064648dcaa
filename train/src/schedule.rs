//! The learning-rate schedule: linear warmup to the peak rate, then cosine decay to
//! `min_lr_ratio × peak` at the last planned step. A Burn [`LrScheduler`] whose record (the
//! number of steps taken) is saved with every checkpoint, so a resumed run continues the
//! schedule.
//!
//! The schedule is planned over the run's original number of steps (`optim.schedule_steps`,
//! recorded when a resumed run changes `train.steps`), so extending a run never changes the
//! learning rate of the steps it planned: steps past the plan run at the schedule's final
//! learning rate (the rate of its last planned step), a constant tail.

use burn::lr_scheduler::LrScheduler;
use burn::prelude::Backend;

use crate::config::OptimConfig;

/// Warmup + cosine schedule over `total` optimizer steps, constant after them.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupCosine {
    peak: f64,
    min: f64,
    warmup: u64,
    total: u64,
    step: u64,
}

impl WarmupCosine {
    /// A schedule at step 0. The warmup is capped at `total` steps.
    pub fn new(peak: f64, min_ratio: f64, warmup: u64, total: u64) -> Self {
        Self {
            peak,
            min: peak * min_ratio,
            warmup: warmup.min(total),
            total,
            step: 0,
        }
    }

    /// The schedule of an `[optim]` section for a run of `steps` steps: planned over
    /// `optim.schedule_steps` when set, else over `steps`.
    pub fn from_config(optim: &OptimConfig, steps: u64) -> Self {
        let total = optim.schedule_steps.unwrap_or(steps);
        Self::new(optim.lr, optim.min_lr_ratio, optim.warmup_steps, total)
    }

    /// Steps the schedule is planned over.
    pub fn planned_steps(&self) -> u64 {
        self.total
    }

    /// Learning rate of the last planned step: the rate of every step after the plan.
    pub fn final_lr(&self) -> f64 {
        self.lr_at(self.total.saturating_sub(1))
    }

    /// Learning rate of optimizer step `i` (0-based).
    pub fn lr_at(&self, i: u64) -> f64 {
        if self.total > 0 && i >= self.total {
            return self.lr_at(self.total - 1);
        }
        if i < self.warmup {
            return self.peak * (i + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((i - self.warmup) as f64 / span as f64).clamp(0.0, 1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }
}

impl LrScheduler for WarmupCosine {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        let lr = self.lr_at(self.step);
        self.step += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step as usize
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record as u64;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn::backend::NdArray<f32>;

    #[test]
    fn warmup_then_cosine() {
        let mut s = WarmupCosine::new(1e-3, 0.1, 10, 110);
        let lrs: Vec<f64> = (0..110).map(|_| s.step()).collect();
        assert!((lrs[0] - 1e-4).abs() < 1e-12);
        assert!((lrs[9] - 1e-3).abs() < 1e-12);
        assert!((lrs[10] - 1e-3).abs() < 1e-12);
        assert!((lrs[60] - 0.55e-3).abs() < 1e-9);
        assert!(lrs[109] > 1e-4 && lrs[109] < 1.01e-4);
        assert!(lrs[10..].windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn record_resumes_the_schedule() {
        let mut a = WarmupCosine::new(1e-3, 0.0, 5, 50);
        for _ in 0..17 {
            a.step();
        }
        let record = LrScheduler::to_record::<B>(&a);
        let mut b = WarmupCosine::new(1e-3, 0.0, 5, 50).load_record::<B>(record);
        for _ in 0..33 {
            assert_eq!(a.step(), b.step());
        }
    }

    #[test]
    fn warmup_longer_than_training() {
        let mut s = WarmupCosine::new(1.0, 0.0, 100, 4);
        let lrs: Vec<f64> = (0..6).map(|_| s.step()).collect();
        assert_eq!(lrs, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn constant_after_the_plan() {
        let s = WarmupCosine::new(1e-3, 0.1, 10, 110);
        assert_eq!(s.final_lr(), s.lr_at(109));
        for i in 110..130 {
            assert_eq!(s.lr_at(i), s.lr_at(109));
        }
        let mut optim = crate::config::TrainConfig::preset(crate::config::Preset::Tiny).optim;
        optim.schedule_steps = Some(20);
        let extended = WarmupCosine::from_config(&optim, 30);
        let original = WarmupCosine::from_config(
            &crate::config::OptimConfig {
                schedule_steps: None,
                ..optim
            },
            20,
        );
        assert_eq!(extended.planned_steps(), 20);
        for i in 0..20 {
            assert_eq!(extended.lr_at(i), original.lr_at(i));
        }
        for i in 20..30 {
            assert_eq!(extended.lr_at(i), original.lr_at(19));
        }
    }
}
