//! The values of the `NSA_*` environment switches that turn kernels on and off for measuring
//! (`NSA_KERNELS`, `NSA_DECODE_BLOCK`, `NSA_MMA`, `NSA_FRESH_DUMMIES`): one parser per
//! switch, used where the library reads them and by the binaries, which refuse an invalid
//! value at start-up with a clear error instead of reading it as something else.

/// A switch's value that means nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: {expected}")]
pub struct SwitchError {
    /// The variable.
    pub name: String,
    /// Its value.
    pub value: String,
    /// What it may be.
    pub expected: &'static str,
}

/// The on/off switches and what they do.
pub const FLAGS: &[(&str, &str)] = &[
    ("NSA_KERNELS", "the fused kernels (default on)"),
    (
        "NSA_DECODE_BLOCK",
        "a decode step's NSA block as one operation (default on)",
    ),
    (
        "NSA_FRESH_DUMMIES",
        "a fresh absent-operand tensor per launch (default off)",
    ),
];

const FLAG_VALUES: &str = "expected 1, 0, on, off, true, false, yes or no";
const MMA_VALUES: &str =
    "expected 1 (all), 0 (none), or a comma-separated list of fwd, dq and dkdv";

/// An on/off switch: `1`, `on`, `true`, `yes` → on; `0`, `off`, `false`, `no` → off (any case).
pub fn parse_flag(name: &str, value: &str) -> Result<bool, SwitchError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => Err(SwitchError {
            name: name.into(),
            value: value.into(),
            expected: FLAG_VALUES,
        }),
    }
}

/// The kernels that may use tensor cores, `[fwd, dq, dkdv]`, from `NSA_MMA`: an on/off value
/// for all of them, or a comma-separated subset of `fwd`, `dq`, `dkdv`.
pub fn parse_mma(value: &str) -> Result<[bool; 3], SwitchError> {
    if let Ok(all) = parse_flag("NSA_MMA", value) {
        return Ok([all; 3]);
    }
    let names = ["fwd", "dq", "dkdv"];
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    if parts.iter().any(|p| !names.contains(p)) {
        return Err(SwitchError {
            name: "NSA_MMA".into(),
            value: value.into(),
            expected: MMA_VALUES,
        });
    }
    Ok(names.map(|n| parts.contains(&n)))
}

/// Checks the value of switch `name` (a flag or `NSA_MMA`); `Ok` for a variable that is not a
/// switch.
pub fn check(name: &str, value: &str) -> Result<(), SwitchError> {
    if name == "NSA_MMA" {
        return parse_mma(value).map(drop);
    }
    if FLAGS.iter().any(|(n, _)| *n == name) {
        return parse_flag(name, value).map(drop);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_mean_one_thing_or_are_refused() {
        assert_eq!(parse_flag("NSA_KERNELS", "Off"), Ok(false));
        assert_eq!(parse_flag("NSA_KERNELS", "1"), Ok(true));
        assert!(parse_flag("NSA_KERNELS", "2").is_err());
        // `true` used to be read as a list of kernels naming none: every tensor core off
        assert_eq!(parse_mma("true"), Ok([true; 3]));
        assert_eq!(parse_mma("0"), Ok([false; 3]));
        assert_eq!(parse_mma("fwd, dkdv"), Ok([true, false, true]));
        let e = parse_mma("fwd,bwd").unwrap_err();
        assert!(e.to_string().contains("NSA_MMA=\"fwd,bwd\""), "{e}");
        assert!(check("NSA_DECODE_BLOCK", "maybe").is_err());
        assert!(check("NSA_CACHE_DIR", "/tmp").is_ok());
    }
}
