//! The raw result of one benchmark run, as committed under `benchmarks/results/` and read by
//! `scripts/bench_report`: what ran (tool, settings), where (backend, device, host), from which
//! code (commit), under which `NSA_*` switches, and the tool's own JSON result.

use std::path::Path;

use anyhow::{Context, Result};
use nsa_runtime::backend::BackendChoice;
use serde::Serialize;

/// The format version of [`Record`]; `scripts/bench_report` refuses others.
pub const SCHEMA: &str = "nsa-bench-record/1";

/// One benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub schema: &'static str,
    /// `nsa-bench`, `nsa-bench decode`, `nsa-infer compare`, ...
    pub tool: String,
    /// The commit the binary was built from (`-dirty` when it had uncommitted changes).
    pub commit: &'static str,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    /// `cuda`, `wgpu`, `cpu`, `ndarray`.
    pub backend: String,
    /// The device's name (the card).
    pub device: String,
    /// CPU threads of the host.
    pub host_cpus: usize,
    /// `NSA_*` variables in force (`NAME=value`).
    pub env: Vec<String>,
    /// The command's settings.
    pub settings: serde_json::Value,
    /// The tool's result.
    pub result: serde_json::Value,
}

impl Record {
    /// A record of `result`, measured now on `choice`.
    pub fn new(
        tool: &str,
        choice: &BackendChoice,
        settings: serde_json::Value,
        result: serde_json::Value,
    ) -> Self {
        Self::on(
            tool,
            &choice.kind.to_string(),
            &choice.device_name,
            settings,
            result,
        )
    }

    /// A record of `result`, measured now on `device` of `backend`.
    pub fn on(
        tool: &str,
        backend: &str,
        device: &str,
        settings: serde_json::Value,
        result: serde_json::Value,
    ) -> Self {
        Self {
            schema: SCHEMA,
            tool: tool.to_string(),
            commit: env!("BUILD_GIT_COMMIT"),
            date: utc_now(),
            backend: backend.to_string(),
            device: device.to_string(),
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            env: nsa_runtime::environment::settings(std::env::vars_os()),
            settings,
            result,
        }
    }

    /// Writes the record as pretty JSON (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        nsa_runtime::bundle::atomic_write(path, json.as_bytes())
            .with_context(|| format!("{}", path.display()))?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // days since 1970-01-01 → civil date (H. Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_796_515_200 + 3_661), "2026-12-06T01:01:01Z");
    }
}
