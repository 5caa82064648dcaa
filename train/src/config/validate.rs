//! Checking a resolved configuration: every error names the key and its command-line flag.

use super::{ConfigError, TrainConfig};

impl TrainConfig {
    /// Checks every value; the error names the key and its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, flag: Option<&'static str>, message: String) -> ConfigError {
            ConfigError::Invalid { key, flag, message }
        }
        let positive = |key, flag, v: u64| {
            if v == 0 {
                Err(bad(key, flag, "must be at least 1".into()))
            } else {
                Ok(())
            }
        };
        let t = &self.train;
        positive("train.steps", Some("--steps"), t.steps)?;
        positive(
            "train.batch_size",
            Some("--batch-size"),
            t.batch_size as u64,
        )?;
        positive(
            "train.grad_accum",
            Some("--grad-accum"),
            t.grad_accum as u64,
        )?;
        positive("train.eval_every", Some("--eval-every"), t.eval_every)?;
        positive("train.log_every", Some("--log-every"), t.log_every)?;
        positive("data.seq_len", Some("--seq-len"), self.data.seq_len as u64)?;
        if t.sample_every > 0 {
            positive("train.sample_prime", None, t.sample_prime as u64)?;
            positive("train.sample_tokens", None, t.sample_tokens as u64)?;
        }
        positive("train.max_non_finite", None, t.max_non_finite)?;
        let o = &self.optim;
        if let Some(n) = o.schedule_steps {
            positive("optim.schedule_steps", None, n)?;
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(bad(
                "optim.lr",
                Some("--lr"),
                format!("must be a positive number, got {}", o.lr),
            ));
        }
        for (key, v) in [
            ("optim.min_lr_ratio", o.min_lr_ratio),
            ("optim.beta1", o.beta1),
            ("optim.beta2", o.beta2),
        ] {
            let ok = if key == "optim.min_lr_ratio" {
                (0.0..=1.0).contains(&v)
            } else {
                (0.0..1.0).contains(&v)
            };
            if !ok {
                return Err(bad(
                    key,
                    None,
                    format!(
                        "must be in [0, 1{}, got {v}",
                        if key == "optim.min_lr_ratio" {
                            "]"
                        } else {
                            ")"
                        }
                    ),
                ));
            }
        }
        for (key, v) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.grad_clip", o.grad_clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(key, None, format!("must be a number >= 0, got {v}")));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(bad(
                "optim.eps",
                None,
                format!("must be a positive number, got {}", o.eps),
            ));
        }
        let d = &self.data;
        if !(0.0..1.0).contains(&d.val_fraction) || d.val_fraction == 0.0 {
            return Err(bad(
                "data.val_fraction",
                None,
                format!(
                    "must be in (0, 1) (validation is needed for the best checkpoint), got {}",
                    d.val_fraction
                ),
            ));
        }
        let tk = &self.tokenizer;
        if tk.path.is_some() && tk.train.is_some() {
            return Err(bad(
                "tokenizer.path",
                Some("--tokenizer"),
                "cannot be combined with tokenizer.train (--train-tokenizer): choose one".into(),
            ));
        }
        if tk.train.is_some() && tk.vocab_size < 16 {
            return Err(bad(
                "tokenizer.vocab_size",
                Some("--vocab-size"),
                format!("must be at least 16, got {}", tk.vocab_size),
            ));
        }
        // the model, with a placeholder vocabulary when it comes from the tokenizer
        let mut model = self.model.clone();
        if model.num_tokens == 0 {
            model.num_tokens = 1;
        }
        model.validate().map_err(|e| ConfigError::Invalid {
            key: "model",
            flag: None,
            message: e.to_string(),
        })?;
        Ok(())
    }
}
