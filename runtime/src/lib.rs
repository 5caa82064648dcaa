//! What NSA training (`nsa-train`) and inference (`nsa-infer`, `nsa-bench`) share, so that
//! inference does not build the training stack:
//!
//! * [`backend`]: choosing CUDA, wgpu or the CPU at run time and running generic work on it;
//! * [`bundle`]: the model directory (config, tokenizer, weights) that training writes and
//!   inference reads;
//! * [`tokenizer`]: loading (and training) tokenizers; [`documents`]: reading text documents
//!   from corpus files;
//! * [`kernel_cache`]: where the GPU kernel caches live; [`environment`]: the `NSA_*`
//!   environment switches; [`failure`]: panics and errors as one-line messages.
pub mod backend;
pub mod bundle;
pub mod documents;
pub mod environment;
pub mod failure;
pub mod kernel_cache;
pub mod reference;
pub mod tokenizer;
