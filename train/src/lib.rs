//! Training for NSA language models: data, Learner, checkpoints. What inference shares with
//! training (backend choice, the model directory, tokenizers, failure reports) is in
//! `nsa-runtime`.
//!
//! The `nsa-train` binary is a thin command line ([`cli`]) over [`training::run`]:
//!
//! * [`config`]: the training configuration (TOML, presets, overrides, validation);
//! * [`corpus`], [`data`]: the corpus source, the token cache and the Learner's data loaders
//!   (documents and tokenizers come from `nsa_runtime`);
//! * [`lm`]: the model's train and validation steps; [`schedule`]: the learning-rate
//!   schedule; [`metrics`]: Learner metrics and the metrics CSV;
//! * [`strategy`]: the training loop (a Burn learning strategy); [`parallel`]: the same step
//!   spread over several devices (data parallel); [`checkpoint`]: atomic
//!   checkpoints and resumption;
//! * [`training`]: a run from start to end; [`report`], [`plot`]: log lines and the loss
//!   curve; [`dashboard`]: Burn's terminal dashboard with a working Ctrl-C.
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod corpus;
pub mod dashboard;
pub mod data;
pub mod lm;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod report;
pub mod schedule;
pub mod strategy;
pub mod training;
