//! How the kernels run: [`KernelOptions`], an explicit value the binaries build (from their
//! flags and the `NSA_*` switches) and hand to the model; nothing here reads the environment.
//! The switch values have one parser each ([`parse_flag`], [`parse_mma`]), which the binaries
//! use to refuse an invalid value at start-up with a clear error instead of reading it as
//! something else.

/// Which attention passes may use tensor cores (CUDA's matrix units) where the device has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorCores {
    /// The forward kernel.
    pub fwd: bool,
    /// The backward's query-gradient kernel.
    pub dq: bool,
    /// The backward's key/value-gradient kernel.
    pub dkdv: bool,
}

impl TensorCores {
    /// Every pass on (`true`) or off.
    pub fn all(on: bool) -> Self {
        Self {
            fwd: on,
            dq: on,
            dkdv: on,
        }
    }
}

impl Default for TensorCores {
    fn default() -> Self {
        Self::all(true)
    }
}

/// How the selected branch's forward kernel walks its work (CubeCL backends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SelectedOrder {
    /// Chosen by the launch from the shape and the storage: [`Self::ByBlock`] for bf16/f16 from
    /// 8,192 positions on (measured faster on an H100 from 4k, with more memory for the
    /// per-block partials), [`Self::ByQuery`] otherwise (f32 by block is not timed yet).
    #[default]
    Auto,
    /// One cube per query position reads the blocks that query selected.
    ByQuery,
    /// One cube per key block serves every query that selected it (the block read once, the
    /// queries filling tensor-core tiles); per-block partial results merged per query. Where a
    /// shape does not allow it (heads of a selection group other than those of a kv head, or
    /// tiles over the shared-memory budget), the launch runs by query; on tf32 fragments (f32
    /// storage on CUDA) dq stays by query (see `dq_by_block`).
    ByBlock,
}

/// The choices of how a model's attention runs, passed explicitly (never read from the
/// environment or kept in a static). The default is what the binaries run without flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// Use the fused kernels registered for the backend (else the tensor-op path).
    pub fused: bool,
    /// A decode step may run a whole NSA block as one operation.
    pub decode_block: bool,
    /// The attention passes that may use tensor cores.
    pub tensor_cores: TensorCores,
    /// Every product f32-exact on tensor-core backends (no TF32 operands): the tensor-op
    /// matmuls split their operands, the kernels keep scalar f32 products.
    pub exact_matmul: bool,
    /// Cubes sharing a key chunk's queries in the dk/dv kernel, and a block's queries in the
    /// by-block selected forward (`0`: chosen from the shape; tests force a split that small
    /// problems never make on their own).
    pub dkdv_splits: usize,
    /// How the selected forward walks its work.
    pub selected_order: SelectedOrder,
    /// Rows per batch of a projection over many rows (`0`: one batch). A projection of
    /// `rows` rows (a multiple of this, at least twice it) runs as `rows / projection_rows`
    /// batched products, so that its weight gradient is a batch of short products summed
    /// (split-K) instead of one product over all rows, which few GPU cubes share.
    pub projection_rows: usize,
    /// Largest number of cubes a launch puts along one grid dimension (`0`: the device's limit,
    /// 65,535 on Vulkan and Metal). Longer grids are folded into a second dimension; tests set
    /// a small limit so that the folding runs at small sizes.
    pub grid_limit: u32,
    /// Compressed rows per cube of a decode step's compressed branch (`0`: 256). Past that many
    /// the branch runs in parts, one cube each, merged by the decode kernel; tests set a small
    /// span so that the parts run at small sizes.
    pub decode_span: usize,
    /// Positions per chunk of a prompt's prefill (`0`: the whole prompt at once). A chunked
    /// prefill of an NSA model runs each chunk through every block, writing the decode caches
    /// (allocated once, for the whole generation) as it goes: besides the caches it holds one
    /// chunk's working set, where one pass holds a dozen `[seq, dim]`-sized tensors and the
    /// feed-forward's `[seq, 4 dim]` per layer.
    pub prefill_chunk: usize,
}

/// [`KernelOptions::prefill_chunk`] by default: 2,048 positions (a prompt up to that length
/// runs in one piece). On an H100 the seed model's 100K-token prompt then needs 3.7 GB of
/// device memory in f32 against 5.4 GB in chunks of 8,192 (whose `[8192, 4 dim]` activations
/// take CubeCL's larger pages), for 22 % more prefill time (`benchmarks/issue22-prefill/`).
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            fused: true,
            decode_block: true,
            tensor_cores: TensorCores::default(),
            exact_matmul: false,
            dkdv_splits: 0,
            selected_order: SelectedOrder::Auto,
            projection_rows: 4096,
            grid_limit: 0,
            decode_span: 0,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

impl KernelOptions {
    /// The tensor-op path only (the portable reference of every fused kernel).
    pub fn tensor_ops() -> Self {
        Self {
            fused: false,
            ..Self::default()
        }
    }

    /// These options with the `NSA_*` switches among `vars` applied (`NSA_KERNELS`,
    /// `NSA_DECODE_BLOCK`, `NSA_MMA`, `NSA_SELECTED_ORDER`, `NSA_PROJECTION_ROWS`,
    /// `NSA_PREFILL_CHUNK`); other variables are ignored, an invalid value is an
    /// error. The binaries pass their environment.
    pub fn with_switches<'a>(
        mut self,
        vars: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SwitchError> {
        for (name, value) in vars {
            match name {
                "NSA_KERNELS" => self.fused = parse_flag(name, value)?,
                "NSA_DECODE_BLOCK" => self.decode_block = parse_flag(name, value)?,
                "NSA_MMA" => {
                    let [fwd, dq, dkdv] = parse_mma(value)?;
                    self.tensor_cores = TensorCores { fwd, dq, dkdv };
                }
                "NSA_SELECTED_ORDER" => self.selected_order = parse_order(value)?,
                "NSA_PROJECTION_ROWS" => self.projection_rows = parse_rows(value)?,
                "NSA_PREFILL_CHUNK" => self.prefill_chunk = parse_chunk(value)?,
                _ => {}
            }
        }
        Ok(self)
    }
}

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

const ORDER_VALUES: &str = "expected auto, query or block";

/// The selected forward's order from `NSA_SELECTED_ORDER`: `auto`, `query` or `block`.
pub fn parse_order(value: &str) -> Result<SelectedOrder, SwitchError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(SelectedOrder::Auto),
        "query" => Ok(SelectedOrder::ByQuery),
        "block" => Ok(SelectedOrder::ByBlock),
        _ => Err(SwitchError {
            name: "NSA_SELECTED_ORDER".into(),
            value: value.into(),
            expected: ORDER_VALUES,
        }),
    }
}

/// Rows per projection batch from `NSA_PROJECTION_ROWS`: a count, `0` for one batch.
pub fn parse_rows(value: &str) -> Result<usize, SwitchError> {
    value.trim().parse().map_err(|_| SwitchError {
        name: "NSA_PROJECTION_ROWS".into(),
        value: value.into(),
        expected: "expected a number of rows (0: one batch)",
    })
}

/// Positions per prefill chunk from `NSA_PREFILL_CHUNK`: a count, `0` for the whole prompt.
pub fn parse_chunk(value: &str) -> Result<usize, SwitchError> {
    value.trim().parse().map_err(|_| SwitchError {
        name: "NSA_PREFILL_CHUNK".into(),
        value: value.into(),
        expected: "expected a number of positions (0: the whole prompt)",
    })
}

/// Checks the value of switch `name` (a flag, `NSA_MMA`, `NSA_SELECTED_ORDER`,
/// `NSA_PROJECTION_ROWS` or `NSA_PREFILL_CHUNK`); `Ok` for a variable that is not a switch.
pub fn check(name: &str, value: &str) -> Result<(), SwitchError> {
    if name == "NSA_PROJECTION_ROWS" {
        return parse_rows(value).map(drop);
    }
    if name == "NSA_PREFILL_CHUNK" {
        return parse_chunk(value).map(drop);
    }
    if name == "NSA_MMA" {
        return parse_mma(value).map(drop);
    }
    if name == "NSA_SELECTED_ORDER" {
        return parse_order(value).map(drop);
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
        assert_eq!(parse_order(" Block"), Ok(SelectedOrder::ByBlock));
        assert!(check("NSA_SELECTED_ORDER", "blocks").is_err());
        assert_eq!(parse_rows("0"), Ok(0));
        assert!(check("NSA_PROJECTION_ROWS", "-1").is_err());
        assert!(check("NSA_PREFILL_CHUNK", "4k").is_err());
    }

    #[test]
    fn switches_map_onto_options() {
        let o = KernelOptions::default()
            .with_switches([("NSA_KERNELS", "0"), ("NSA_MMA", "dq"), ("HOME", "/x")])
            .unwrap();
        assert!(!o.fused && o.decode_block);
        assert_eq!(
            o.tensor_cores,
            TensorCores {
                fwd: false,
                dq: true,
                dkdv: false
            }
        );
        assert!(KernelOptions::default()
            .with_switches([("NSA_DECODE_BLOCK", "sometimes")])
            .is_err());
    }
}
