//! The last line of defence of the binaries: a panic hook that turns any panic (a bug in our
//! code or in a backend) into one `error:` line and a non-zero exit instead of a Rust
//! backtrace dump.
//!
//! Running out of device memory is the one panic users cause themselves: CubeCL reports a
//! failed allocation by panicking (`can't allocate buffer of size …` on CUDA, an
//! out-of-memory launch error on wgpu). It gets its own message that names the settings to
//! lower, and its own exit code ([`EXIT_OUT_OF_MEMORY`]).
//!
//! Exiting from the hook is safe for saved work: every checkpoint and bundle file is written
//! to a temporary name and renamed into place, so a process that stops half-way through a
//! write leaves the previous files intact.

use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::mib;

/// Exit code after the device ran out of memory.
pub const EXIT_OUT_OF_MEMORY: i32 = 3;
/// Exit code after any other panic (Rust's own panic exit code).
pub const EXIT_INTERNAL: i32 = 101;

/// Settings `nsa-train` users lower when the GPU runs out of memory.
pub const TRAIN_MEMORY_HINT: &str = "lower the micro-batch (--batch-size) or the sequence length \
(--seq-len) and raise --grad-accum to keep the same global batch, or use a smaller model";
/// Settings `nsa-infer` users lower when the GPU runs out of memory.
pub const INFER_MEMORY_HINT: &str = "shorten the prompt or --max-new-tokens, lower --batch-size \
(score) or the number of prompts, try --precision f16, or use --backend cpu";

/// Panic messages (lower case) that mean a device allocation failed.
const OUT_OF_MEMORY_MARKERS: &[&str] = &[
    "out of memory",
    "out-of-memory",
    "outofmemory",
    "can't allocate buffer",
    "buffertoobig",
    "cuda_error_out_of_memory",
    "not enough memory",
];

/// `true` when a panic message reports a failed device allocation.
pub fn is_out_of_memory(message: &str) -> bool {
    let lower = message.to_lowercase();
    OUT_OF_MEMORY_MARKERS.iter().any(|m| lower.contains(m))
}

/// The size CubeCL's "can't allocate buffer of size: N" names, if the message has it.
pub fn refused_buffer(message: &str) -> Option<u64> {
    let lower = message.to_lowercase();
    let rest = &lower[lower.find("can't allocate buffer of size")?..];
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The one line printed for a panic with `message` at `location` in `tool`, and the exit code.
/// `buffer_limit` is the device's largest single buffer when known: an allocation above it is
/// reported as such, not as a lack of memory.
pub fn describe_panic(
    tool: &str,
    message: &str,
    location: Option<&str>,
    memory_hint: &str,
    buffer_limit: Option<u64>,
) -> (String, i32) {
    // the first non-empty line: CubeCL's errors continue with a backtrace
    let first = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no message)");
    let over_limit = refused_buffer(message)
        .zip(buffer_limit)
        .filter(|&(size, limit)| size > limit);
    if let Some((size, limit)) = over_limit {
        (
            format!(
                "error: a {} buffer exceeds this device's {} limit for one buffer (the \
                 device has not run out of memory); {memory_hint}",
                mib(size),
                mib(limit)
            ),
            EXIT_OUT_OF_MEMORY,
        )
    } else if is_out_of_memory(message) {
        (
            format!("error: the device ran out of memory ({first}); {memory_hint}"),
            EXIT_OUT_OF_MEMORY,
        )
    } else {
        let at = location.map(|l| format!(" at {l}")).unwrap_or_default();
        (
            format!(
                "error: internal error in {tool}: {first}{at} (a bug: please report it with \
                 the command line; RUST_BACKTRACE=1 shows where)"
            ),
            EXIT_INTERNAL,
        )
    }
}

/// The one `error:` line for an error and its chain of causes: each cause is appended unless
/// its text is already part of the line (our error types often quote their source).
pub fn error_line<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut line = String::new();
    for cause in chain {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    format!("error: {}", line.replace(['\n', '\r'], " "))
}

fn payload_text(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::new()
    }
}

/// The installed hook's view of the device: tell it the device's largest single buffer once
/// the device is chosen ([`PanicHook::set_buffer_limit`]).
#[derive(Debug, Clone, Default)]
pub struct PanicHook {
    /// The limit in bytes; 0 = unknown.
    buffer_limit: Arc<AtomicU64>,
}

impl PanicHook {
    /// Records the device's largest single buffer (`None`: no such limit).
    pub fn set_buffer_limit(&self, bytes: Option<u64>) {
        self.buffer_limit
            .store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    fn buffer_limit(&self) -> Option<u64> {
        Some(self.buffer_limit.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }
}

/// Installs the hook for the binary `tool`. With `RUST_BACKTRACE` set, Rust's default report
/// is printed first (for bug reports).
pub fn install_panic_hook(tool: &'static str, memory_hint: &'static str) -> PanicHook {
    let default = std::panic::take_hook();
    let verbose = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let hook = PanicHook::default();
    let device = hook.clone();
    std::panic::set_hook(Box::new(move |info| {
        if verbose {
            default(info);
        }
        let message = payload_text(info);
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        let (line, code) = describe_panic(
            tool,
            &message,
            location.as_deref(),
            memory_hint,
            device.buffer_limit(),
        );
        eprintln!("{line}");
        exit_now(code);
    }));
    hook
}

/// Ends the process from inside the panic hook. Often the panic is on a device thread (CubeCL's
/// server): `std::process::exit` would run the atexit handlers there, and a driver's handler
/// that touches already destroyed thread-local state panics again inside the hook, which
/// aborts with SIGABRT instead of `code`. `_exit` ends the process without them (saved files
/// are complete: they are written to a temporary name and renamed).
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    {
        extern "C" {
            fn _exit(status: i32) -> !;
        }
        // SAFETY: `_exit` takes any status and does not return
        unsafe { _exit(code) }
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("training data: {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("a.txt: invalid UTF-8 at byte offset 3")]
    struct Inner;
    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the corpus")]
    struct Plain(#[source] Inner);

    #[test]
    fn error_lines_do_not_repeat_quoted_causes() {
        let e = anyhow::Error::new(Outer(Inner));
        assert_eq!(
            error_line(e.chain()),
            "error: training data: a.txt: invalid UTF-8 at byte offset 3"
        );
        let e = anyhow::Error::new(Plain(Inner)).context("reading\nfiles");
        assert_eq!(
            error_line(e.chain()),
            "error: reading files: cannot open the corpus: a.txt: invalid UTF-8 at byte offset 3"
        );
    }

    #[test]
    fn cuda_allocation_failure_names_the_settings() {
        // the panic text of CubeCL's CUDA storage when cuMemAlloc fails
        let msg = "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: \
                   85899345920\nbacktrace:\n   0: cubecl_runtime::memory_management";
        let (line, code) = describe_panic("nsa-train", msg, None, TRAIN_MEMORY_HINT, None);
        assert_eq!(code, EXIT_OUT_OF_MEMORY);
        assert!(
            line.starts_with("error: the device ran out of memory"),
            "{line}"
        );
        assert!(line.contains("85899345920"), "{line}");
        assert!(
            line.contains("--batch-size") && line.contains("--grad-accum"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_buffer_over_the_device_limit_is_not_called_out_of_memory() {
        let msg = "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: \
                   173080576\nbacktrace:\n   0: cubecl_runtime::memory_management";
        assert_eq!(refused_buffer(msg), Some(173_080_576));
        let (line, code) = describe_panic("nsa-train", msg, None, TRAIN_MEMORY_HINT, Some(1 << 27));
        assert_eq!(code, EXIT_OUT_OF_MEMORY);
        assert!(
            line.starts_with(
                "error: a 165 MiB buffer exceeds this device's 128 MiB limit for one buffer"
            ),
            "{line}"
        );
        assert!(
            line.contains("--batch-size") && !line.contains("ran out of memory"),
            "{line}"
        );
        // within the limit (or no limit known): the device ran out of memory
        for limit in [Some(1 << 30), None] {
            let (line, _) = describe_panic("nsa-train", msg, None, TRAIN_MEMORY_HINT, limit);
            assert!(
                line.starts_with("error: the device ran out of memory"),
                "{line}"
            );
        }
    }

    #[test]
    fn wgpu_and_launch_errors_are_memory_errors() {
        for msg in [
            "An out-of-memory error happened during launch\nCaused by:\n  x",
            "wgpu error: Validation Error\n\nCaused by:\n  Not enough memory left.",
            "OutOfMemory { reason: \"\" }",
        ] {
            assert!(is_out_of_memory(msg), "{msg}");
            let (line, code) = describe_panic("nsa-infer", msg, None, INFER_MEMORY_HINT, None);
            assert_eq!(code, EXIT_OUT_OF_MEMORY);
            assert!(line.contains("--max-new-tokens"), "{line}");
        }
    }

    #[test]
    fn other_panics_are_one_line_internal_errors() {
        let (line, code) = describe_panic(
            "nsa-infer",
            "index out of bounds: the len is 3 but the index is 7\nmore",
            Some("model/src/x.rs:10"),
            INFER_MEMORY_HINT,
            Some(1 << 27),
        );
        assert_eq!(code, EXIT_INTERNAL);
        assert!(!is_out_of_memory("index out of bounds"));
        assert!(line.starts_with("error: internal error in nsa-infer: index out of bounds"));
        assert!(line.contains("model/src/x.rs:10"), "{line}");
        assert!(!line.contains("more") && !line.contains('\n'), "{line}");
    }
}
