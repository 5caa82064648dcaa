//! The `NSA_*` environment variables the binaries read, checked at start-up: an invalid switch
//! value or a misspelt name is an error naming the variable, not a silent default (a typo such
//! as `NSA_KERNEL=0` would otherwise measure the kernels while meaning to measure without).
//! The binaries pass their environment in (`std::env::vars_os()`).

use nsa_model::kernels::switches;

/// The variables: the kernel switches ([`switches::FLAGS`], `NSA_MMA`, `NSA_SELECTED_ORDER`,
/// `NSA_PROJECTION_ROWS`, `NSA_PREFILL_CHUNK`) and these.
const OTHERS: &[(&str, &str)] = &[
    (
        "NSA_MMA",
        "tensor cores per kernel: 1, 0 or a list of fwd, dq, dkdv",
    ),
    (
        "NSA_SELECTED_ORDER",
        "the selected forward by query or by key block: auto, query or block",
    ),
    (
        "NSA_PROJECTION_ROWS",
        "rows per batch of a long projection (split-K weight gradients; 0: one batch)",
    ),
    (
        "NSA_PREFILL_CHUNK",
        "prompt positions per prefill chunk (0: the whole prompt; nsa-infer: --prefill-chunk)",
    ),
    ("NSA_CACHE_DIR", "directory of the kernel and token caches"),
    ("NSA_PROFILE_LOG", "file for CubeCL's per-kernel timings"),
];

/// An `NSA_*` variable that is not understood.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("environment: {0}")]
    Value(#[from] switches::SwitchError),
    #[error("environment: unknown variable {name} (known: {known})")]
    Unknown {
        /// The variable.
        name: String,
        /// The variables there are.
        known: String,
    },
}

/// Checks every `NSA_*` variable of `vars` (the binaries pass `std::env::vars_os()`; the
/// library reads no environment here).
pub fn check_vars(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<(), EnvironmentError> {
    let vars = vars
        .into_iter()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
    let known = || {
        switches::FLAGS
            .iter()
            .chain(OTHERS)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
    };
    for (name, value) in vars {
        if !name.starts_with("NSA_") {
            continue;
        }
        if !known().contains(&name.as_str()) {
            return Err(EnvironmentError::Unknown {
                name,
                known: known().join(", "),
            });
        }
        switches::check(&name, &value)?;
    }
    Ok(())
}

/// The kernel options of the run: the defaults with the switches among `vars` applied
/// (`NSA_KERNELS`, `NSA_DECODE_BLOCK`, `NSA_MMA`, `NSA_SELECTED_ORDER`,
/// `NSA_PROJECTION_ROWS`, `NSA_PREFILL_CHUNK`); an invalid value is an error.
pub fn kernel_options(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<nsa_model::kernels::KernelOptions, EnvironmentError> {
    let vars: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .collect();
    let pairs = vars.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    Ok(nsa_model::kernels::KernelOptions::default().with_switches(pairs)?)
}

/// The `NSA_*` variables of `vars`, as `NAME=value` (for the records of a benchmark).
pub fn settings(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<String> {
    let mut v: Vec<String> = vars
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("NSA_")
                .then(|| format!("{k}={}", v.to_string_lossy()))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        v.iter().map(|(a, b)| (a.into(), b.into())).collect()
    }

    #[test]
    fn misspelt_names_and_bad_values_are_refused() {
        assert!(check_vars(vars(&[("NSA_KERNELS", "0"), ("HOME", "/x")])).is_ok());
        let e = check_vars(vars(&[("NSA_KERNEL", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variable NSA_KERNEL") && e.contains("NSA_KERNELS"),
            "{e}"
        );
        let e = check_vars(vars(&[("NSA_MMA", "yes please")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NSA_MMA"), "{e}");
        assert!(check_vars(vars(&[("NSA_MMA", "true"), ("NSA_CACHE_DIR", "/c")])).is_ok());
    }
}
