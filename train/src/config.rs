//! The training configuration: TOML with presets, config-file and command-line overrides,
//! and validation with messages that name the offending option.
//!
//! A configuration is resolved in layers: a preset ([`Preset`], embedded from
//! `assets/configs/*.toml`), then an optional user TOML file with the same layout (any subset
//! of keys; it may name its base preset with a top-level `preset = "tiny"`), then
//! command-line flags ([`Overrides`]). The result is checked by [`TrainConfig::validate`].
//!
//! ```toml
//! [model]      # nsa_model::TransformerConfig; num_tokens comes from the tokenizer
//! [tokenizer]  # path = "tokenizer.json" | train = "wordpiece" / "bpe", vocab_size
//! [data]       # paths, seq_len, val_fraction, eval_windows
//! [optim]      # AdamW + warmup/cosine schedule + gradient clipping
//! [train]      # steps, batch_size, grad_accum, seed, eval_every, sample_every, ...
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nsa_model::TransformerConfig;
use serde::{Deserialize, Deserializer, Serialize};

mod overrides;
mod toml_keys;
mod validate;

pub use overrides::Overrides;
use toml_keys::{failing_key, first_difference, merge, parse_error, parse_table, readable};

/// The `tiny` preset (`assets/configs/tiny.toml`).
pub const TINY_TOML: &str = include_str!("../../assets/configs/tiny.toml");
/// The `seed` preset (`assets/configs/seed.toml`).
pub const SEED_TOML: &str = include_str!("../../assets/configs/seed.toml");

/// Why a configuration was refused. Every message is one line naming the option (and, for
/// files, the file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// TOML syntax or schema error.
    #[error("{origin}: {message}")]
    Parse {
        /// File name or preset.
        origin: String,
        /// What is wrong, with the line when known.
        message: String,
    },
    /// A value out of range.
    #[error("invalid `{key}`{}: {message}", flag.map(|f| format!(" ({f})")).unwrap_or_default())]
    Invalid {
        /// The TOML key, e.g. `optim.lr`.
        key: &'static str,
        /// The command-line flag setting it, if any.
        flag: Option<&'static str>,
        /// What is wrong and what is expected.
        message: String,
    },
    /// Unknown preset name.
    #[error("unknown preset `{0}`: expected `tiny` or `seed`")]
    UnknownPreset(String),
}

/// A built-in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A small model for a first run on the CPU.
    Tiny,
    /// The original recipe (dim 512, depth 6, seq 256, batch 4 × 4).
    #[default]
    Seed,
}

impl Preset {
    /// The preset's TOML text.
    pub fn toml(self) -> &'static str {
        match self {
            Preset::Tiny => TINY_TOML,
            Preset::Seed => SEED_TOML,
        }
    }

    /// The preset's name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Seed => "seed",
        }
    }
}

impl FromStr for Preset {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Preset::Tiny),
            "seed" => Ok(Preset::Seed),
            other => Err(ConfigError::UnknownPreset(other.to_string())),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which tokenizer to train on the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerAlgorithm {
    /// WordPiece with BERT's normalizer and pre-tokenizer.
    Wordpiece,
    /// Byte-level BPE (GPT-2 style).
    Bpe,
}

impl FromStr for TokenizerAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "wordpiece" => Ok(Self::Wordpiece),
            "bpe" => Ok(Self::Bpe),
            other => Err(format!(
                "unknown tokenizer algorithm `{other}`: expected `wordpiece` or `bpe`"
            )),
        }
    }
}

impl fmt::Display for TokenizerAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wordpiece => "wordpiece",
            Self::Bpe => "bpe",
        })
    }
}

/// What a NaN or infinite loss (or gradient norm) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Skip the optimizer step (the weights and optimizer state stay as they were) and go on;
    /// training stops after `max_non_finite` consecutive skipped steps.
    #[default]
    Skip,
    /// Stop training with a message; no checkpoint is written for the bad step.
    Stop,
}

/// `[tokenizer]`: the default is the embedded bert-base-chinese vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// A `tokenizer.json` or BERT `vocab.txt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Train a tokenizer of this kind on the training corpus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TokenizerAlgorithm>,
    /// Vocabulary size of a trained tokenizer.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
}

fn default_vocab_size() -> usize {
    8000
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            path: None,
            train: None,
            vocab_size: default_vocab_size(),
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Corpus files or directories (see `nsa_runtime::documents::read_documents`); empty = the embedded
    /// corpus.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Tokens per training sequence (windows are `seq_len + 1` tokens).
    pub seq_len: usize,
    /// Fraction of the token stream (its end) held out for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Validation windows per evaluation, spread evenly over the validation split (0 = all).
    #[serde(default)]
    pub eval_windows: usize,
}

fn default_val_fraction() -> f64 {
    0.01
}

/// `[optim]`: AdamW, linear warmup then cosine decay, global gradient-norm clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate (reached after the warmup).
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Linear warmup steps (capped at the planned steps).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Steps the warmup + cosine schedule is planned over (default: `train.steps`). Set when a
    /// resumed run changes `train.steps`, to the steps the run was planned with: the schedule
    /// of those steps is kept and later steps run at its final learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_steps: Option<u64>,
    /// Decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam β₁.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Adam β₂.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adam ε.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Maximum global L2 norm of the gradient (0 = no clipping).
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
}

fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> f64 {
    0.5
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (their gradients are averaged).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (activation checkpointing): the memory of one block's graph instead of the whole
    /// model's, for about a third more work; same gradients. For long sequences.
    #[serde(default, skip_serializing_if = "is_false")]
    pub recompute: bool,
    /// Seed of the initialisation, the data order and the samples.
    #[serde(default)]
    pub seed: u64,
    /// Validation, checkpoint and inference bundles every N optimizer steps (one Learner
    /// "epoch").
    pub eval_every: u64,
    /// Generate a sample every N steps (0 = never).
    #[serde(default)]
    pub sample_every: u64,
    /// Prompt length of a sample (tokens of a validation window).
    #[serde(default = "default_sample_prime")]
    pub sample_prime: usize,
    /// Tokens generated per sample.
    #[serde(default = "default_sample_tokens")]
    pub sample_tokens: usize,
    /// A plain-text log line every N steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Training checkpoints kept besides the best one.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// What a NaN/Inf loss does.
    #[serde(default)]
    pub on_non_finite: NonFinitePolicy,
    /// Stop after this many consecutive skipped steps.
    #[serde(default = "default_max_non_finite")]
    pub max_non_finite: u64,
    /// `[train.dsa]`: the two stages of a DSA model (no effect on the other kinds).
    #[serde(default, skip_serializing_if = "DsaTrainConfig::is_default")]
    pub dsa: DsaTrainConfig,
}

/// `[train.dsa]`: a DSA model trains dense first (the global branch sees every earlier token;
/// the indexer learns to imitate the attention by its KL loss), then sparse (the global branch
/// sees the indexer's top-k; the indexer keeps learning over them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsaTrainConfig {
    /// Optimizer steps of the dense warm-up; absent: the first 20 % of the planned steps
    /// (`train.steps`, or `optim.schedule_steps` when a resumed run extended them; the seed
    /// article's schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Only the indexer learns during the warm-up (DeepSeek's recipe for a trained dense
    /// model); otherwise the model trains densely beside it (from scratch).
    #[serde(default, skip_serializing_if = "is_false")]
    pub freeze_model: bool,
}

impl DsaTrainConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl LoopConfig {
    /// Optimizer steps of a DSA model's dense warm-up (`[train.dsa] warmup_steps`, or the
    /// first 20 % of the `planned` steps: the learning-rate schedule's length, which a resumed
    /// run with more steps keeps, so that it does not go back to the dense stage).
    pub fn dsa_warmup_steps(&self, planned: u64) -> u64 {
        self.dsa.warmup_steps.unwrap_or(planned / 5)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn one() -> usize {
    1
}
fn default_sample_prime() -> usize {
    64
}
fn default_sample_tokens() -> usize {
    128
}
fn default_log_every() -> u64 {
    10
}
fn default_keep() -> usize {
    2
}
fn default_max_non_finite() -> u64 {
    20
}

/// The whole training configuration (the layout of the preset TOML files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model; `num_tokens = 0` (or absent) means "the tokenizer's vocabulary size".
    #[serde(deserialize_with = "model_table")]
    pub model: TransformerConfig,
    /// The tokenizer.
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    /// The data.
    pub data: DataConfig,
    /// The optimizer and schedule.
    pub optim: OptimConfig,
    /// The loop.
    pub train: LoopConfig,
}

/// `[model]` is a `TransformerConfig` whose `num_tokens` may be left out.
fn model_table<'de, D: Deserializer<'de>>(d: D) -> Result<TransformerConfig, D::Error> {
    use serde::de::Error;
    let mut table = toml::Table::deserialize(d)?;
    table.entry("num_tokens").or_insert(toml::Value::Integer(0));
    table
        .try_into()
        .map_err(|e: toml::de::Error| D::Error::custom(format!("[model]: {}", e.message())))
}

impl TrainConfig {
    /// A preset.
    pub fn preset(preset: Preset) -> Self {
        Self::from_toml_str(preset.toml(), preset.name()).expect("embedded presets are valid")
    }

    /// Parses a complete configuration (`origin` names it in error messages).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| parse_error(origin, text, &e))
    }

    /// Reads a complete configuration file (e.g. a run's `config.toml`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Resolves preset + optional user file (a partial configuration merged over the preset;
    /// its top-level `preset` key picks the base when `preset` is `None`) + overrides, and
    /// validates the result.
    pub fn resolve(
        preset: Option<Preset>,
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut user = None;
        let mut base_preset = preset;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let origin = path.display().to_string();
            let mut table = parse_table(&origin, &text)?;
            if let Some(p) = table.remove("preset") {
                let name = p.as_str().ok_or_else(|| ConfigError::Parse {
                    origin: origin.clone(),
                    message: "`preset` must be a string (`tiny` or `seed`)".into(),
                })?;
                let from_file: Preset = name.parse()?;
                base_preset.get_or_insert(from_file);
            }
            user = Some((origin, table));
        }
        let base = base_preset.unwrap_or_default();
        let preset_table = parse_table(base.name(), base.toml())?;
        let mut table = preset_table.clone();
        let (origin, user_table) = match user {
            Some((origin, over)) => {
                merge(&mut table, over.clone());
                (origin, Some(over))
            }
            None => (format!("preset {}", base.name()), None),
        };
        let mut config: TrainConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    // name the key: the first value of the file that alone breaks the preset
                    let culprit = user_table
                        .as_ref()
                        .and_then(|user| failing_key(&preset_table, user));
                    ConfigError::Parse {
                        origin,
                        message: match culprit {
                            Some((key, message)) => format!("`{key}`: {message}"),
                            None => readable(e.message()),
                        },
                    }
                })?;
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    /// Keys a resumed run may change (`--steps`, `--eval-every`, `--sample-every`,
    /// `--log-every`, and the schedule's length recorded when `--steps` changes).
    pub const RESUMABLE_KEYS: [&'static str; 6] = [
        "train.steps",
        "train.recompute",
        "train.eval_every",
        "train.sample_every",
        "train.log_every",
        "optim.schedule_steps",
    ];

    /// The first key, other than [`Self::RESUMABLE_KEYS`], whose value differs between `self`
    /// (a saved run) and `other`, as `key = value in the run, value here`; `None` when they
    /// are the same recipe.
    pub fn recipe_difference(&self, other: &TrainConfig) -> Option<String> {
        first_difference(self, other, &Self::RESUMABLE_KEYS)
    }

    /// The model config for a tokenizer of `vocab_size` ids, recording the trained context.
    pub fn model_config(&self, vocab_size: usize) -> Result<TransformerConfig, ConfigError> {
        let mut model = self.model.clone();
        if model.num_tokens == 0 {
            model.num_tokens = vocab_size;
        } else if model.num_tokens < vocab_size {
            return Err(ConfigError::Invalid {
                key: "model.num_tokens",
                flag: None,
                message: format!(
                    "({}) is smaller than the tokenizer's vocabulary ({vocab_size}); \
                     leave it out to use the tokenizer's size",
                    model.num_tokens
                ),
            });
        }
        model.max_seq_len = Some(self.data.seq_len);
        model.validate().map_err(|e| ConfigError::Invalid {
            key: "model",
            flag: None,
            message: e.to_string(),
        })?;
        Ok(model)
    }

    /// Tokens per optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.train.batch_size * self.train.grad_accum * self.data.seq_len) as u64
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the training config serialises to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsa_model::AttentionKind;

    #[test]
    fn presets_parse_and_validate() {
        for p in [Preset::Tiny, Preset::Seed] {
            let c = TrainConfig::preset(p);
            c.validate().unwrap();
            // round trip through TOML
            let back = TrainConfig::from_toml_str(&c.to_toml(), "x").unwrap();
            assert_eq!(back, c);
        }
        let seed = TrainConfig::preset(Preset::Seed);
        assert_eq!(
            (seed.model.dim, seed.model.depth, seed.model.heads),
            (512, 6, 8)
        );
        assert_eq!(seed.model.dim_head, 64);
        assert_eq!(seed.model.kv_heads(), 8);
        assert_eq!(seed.data.seq_len, 256);
        assert_eq!((seed.train.batch_size, seed.train.grad_accum), (4, 4));
        assert_eq!(seed.optim.grad_clip, 0.5);
        let m = seed.model_config(21128).unwrap();
        assert_eq!(m.num_tokens, 21128);
        assert_eq!(m.max_seq_len, Some(256));
        assert_eq!(m.sparse.num_selected_blocks, 4);
    }

    #[test]
    fn layering_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("my.toml");
        std::fs::write(
            &f,
            "preset = \"tiny\"\n[train]\nsteps = 7\n[model]\ndepth = 1\n",
        )
        .unwrap();
        let o = Overrides {
            lr: Some(0.01),
            attention: Some(AttentionKind::Full),
            ..Default::default()
        };
        let c = TrainConfig::resolve(None, Some(&f), &o).unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.model.depth, 1);
        assert_eq!(c.model.dim, TrainConfig::preset(Preset::Tiny).model.dim);
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.model.attention, AttentionKind::Full);
        // --preset wins over the file's preset key
        let c = TrainConfig::resolve(Some(Preset::Seed), Some(&f), &o).unwrap();
        assert_eq!(c.model.dim, 512);
    }

    #[test]
    fn recipe_differences() {
        let a = TrainConfig::preset(Preset::Tiny);
        let mut b = a.clone();
        b.train.steps += 10;
        b.train.log_every = 1;
        b.optim.schedule_steps = Some(3);
        assert_eq!(a.recipe_difference(&b), None);
        b.data.seq_len = 7;
        let d = a.recipe_difference(&b).unwrap();
        assert!(
            d.starts_with("data.seq_len = ") && d.ends_with("7 here"),
            "{d}"
        );
        let seed = TrainConfig::preset(Preset::Seed);
        assert!(a.recipe_difference(&seed).is_some());
    }

    #[test]
    fn errors_name_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let check = |text: &str, needles: &[&str]| {
            let f = dir.path().join("bad.toml");
            std::fs::write(&f, text).unwrap();
            let msg = TrainConfig::resolve(Some(Preset::Tiny), Some(&f), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(!msg.contains('\n'), "{msg}");
            for n in needles {
                assert!(msg.contains(n), "{msg} lacks {n}");
            }
        };
        check("[model]\nheads = 0\n", &["model", "heads"]);
        check(
            "[model]\nattention = \"sparse-ish\"\n",
            &["bad.toml", "sparse-ish"],
        );
        check("[optim]\nlr = -1.0\n", &["optim.lr", "--lr", "-1"]);
        check("[train]\nstpes = 3\n", &["bad.toml", "stpes"]);
        check(
            "[train]\nsteps = \"5\"\n",
            &["bad.toml", "`train.steps`", "string", "whole number"],
        );
        check(
            "[optim]\nlr = \"fast\"\n",
            &["bad.toml", "`optim.lr`", "number"],
        );
        check("[train\n", &["bad.toml", "line 1"]);
        let msg = TrainConfig::resolve(
            Some(Preset::Tiny),
            None,
            &Overrides {
                batch_size: Some(0),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("--batch-size"), "{msg}");
        // a complete file (a run's config.toml) names the line and its key
        let mut text = TrainConfig::preset(Preset::Tiny).to_toml();
        text = text.replace("eval_every = ", "eval_every = \"x\" #");
        let msg = TrainConfig::from_toml_str(&text, "config.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("config.toml") && msg.contains("eval_every"),
            "{msg}"
        );
        let missing = dir.path().join("nope.toml");
        let msg = TrainConfig::resolve(None, Some(&missing), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nope.toml"), "{msg}");
    }
}
