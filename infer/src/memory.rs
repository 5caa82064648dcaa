//! Memory as a feature of the commands: what a run held (`--stats`), and refusing up front a
//! generation whose caches cannot fit where the model lives.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::Element;
use nsa_model::cache::cache_bytes;
use nsa_model::TransformerConfig;
use nsa_runtime::backend::{device_pool, human_bytes, peak_rss, BackendChoice};
use serde::Serialize;

/// The most memory a run was seen to hold: the device pool (CubeCL's reserved bytes, and the
/// bytes in live tensors, at the largest sample) and the process's peak resident set.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct MemoryStats {
    /// Device memory reserved by the pool (CUDA, wgpu), largest sample.
    pub device_reserved_bytes: Option<u64>,
    /// Bytes in live tensors at that sample.
    pub device_in_use_bytes: Option<u64>,
    /// The process's peak resident set (the CPU backends' tensors are in it).
    pub peak_rss_bytes: Option<u64>,
}

impl MemoryStats {
    /// Takes a sample of `device`'s pool (and the process's peak).
    pub fn sample<D: 'static>(&mut self, device: &D) {
        if let Some((reserved, in_use)) = device_pool(device) {
            if self.device_reserved_bytes.is_none_or(|r| reserved >= r) {
                self.device_reserved_bytes = Some(reserved);
                self.device_in_use_bytes = Some(in_use);
            }
        }
        self.peak_rss_bytes = peak_rss().or(self.peak_rss_bytes);
    }
}

impl std::fmt::Display for MemoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(r) = self.device_reserved_bytes {
            let used = self
                .device_in_use_bytes
                .map(|u| format!(", {} in live tensors", human_bytes(u)))
                .unwrap_or_default();
            parts.push(format!(
                "device memory {} reserved at most{used}",
                human_bytes(r)
            ));
        }
        if let Some(r) = self.peak_rss_bytes {
            parts.push(format!("process peak RSS {}", human_bytes(r)));
        }
        if parts.is_empty() {
            parts.push("not known on this platform".into());
        }
        write!(f, "memory: {}", parts.join("; "))
    }
}

/// Refuses a generation of `prompt + new` tokens (batch 1) whose caches need more than
/// `free` bytes ([`nsa_runtime::backend::free_memory`], measured once the model is loaded so that its weights count
/// as used), with what to change; `Ok` where `free` is unknown.
pub fn check_cache_fits<B: Backend>(
    config: &TransformerConfig,
    prompt: usize,
    new: usize,
    free: Option<u64>,
    choice: &BackendChoice,
) -> Result<()> {
    let Some(free) = free else {
        return Ok(());
    };
    let elem = <B::FloatElem as Element>::dtype();
    let tokens = prompt.saturating_add(new);
    let need = cache_bytes(config, 1, tokens, elem.size());
    if need > free {
        let place = if choice.kind.is_cpu() {
            "the host has".to_string()
        } else {
            format!("{} has", choice.device_name)
        };
        let precision = format!("{elem:?}").to_lowercase();
        let smaller = if elem.size() > 2 && !choice.kind.is_cpu() {
            ", or use --precision f16"
        } else {
            ""
        };
        bail!(
            "the caches of {tokens} tokens ({prompt} of prompt + {new} new) need {} in \
             {precision}, but {place} {} free: shorten the prompt, lower --max-new-tokens{smaller}",
            human_bytes(need),
            human_bytes(free),
        );
    }
    Ok(())
}
