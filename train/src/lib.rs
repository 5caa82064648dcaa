//! Training for NSA language models: data, tokenizer, Learner, checkpoints.
//!
//! The `nsa-train` binary is a thin command line ([`cli`]) over [`training::run`]:
//!
//! * [`config`]: the training configuration (TOML, presets, overrides, validation);
//! * [`corpus`], [`tokenizer`], [`data`]: text, tokens, the token cache and the Learner's
//!   data loaders;
//! * [`lm`]: the model's train and validation steps; [`schedule`]: the learning-rate
//!   schedule; [`metrics`]: Learner metrics and the metrics CSV;
//! * [`strategy`]: the training loop (a Burn learning strategy); [`parallel`]: the same step
//!   spread over several devices (data parallel); [`checkpoint`]: atomic
//!   checkpoints and resumption; [`bundle`]: the inference model directory;
//! * [`training`]: a run from start to end; [`report`], [`plot`]: log lines and the loss
//!   curve; [`dashboard`]: Burn's terminal dashboard with a working Ctrl-C; [`backend`]:
//!   runtime backend selection; [`failure`]: panics as one-line errors (device out of memory
//!   names the settings to lower).
pub mod backend;
pub mod bundle;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod corpus;
pub mod dashboard;
pub mod data;
pub mod environment;
pub mod failure;
pub mod kernel_cache;
pub mod lm;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod report;
pub mod schedule;
pub mod strategy;
pub mod tokenizer;
pub mod training;
