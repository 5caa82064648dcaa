//! CubeCL kernels: masked attention of query rows over chunks of keys with an online softmax
//! (forward), and its backward: query-centric for `dq` (and the gates), key-centric for `dk`
//! and `dv`, so that every gradient element has one owner and no float atomics are needed.
//!
//! Dimensions (names used in every file of this module):
//!
//! | name | meaning |
//! | --- | --- |
//! | `b` | batch |
//! | `h` | query heads |
//! | `kvh` | kv heads (`h / kvh` query heads share one) |
//! | `hs` | selection heads (`h / group_heads` in selected mode; `h / sel_group` for the fused selection) |
//! | `n` | query positions |
//! | `nk` | key positions (selected, sliding: `n`; compressed: `mem` + compressed slots) |
//! | `d` | head dimension |
//! | `group_heads` | heads per row group of a query-centric cube (selected: heads sharing a selection) |
//! | `gk` | query heads per kv head |
//! | `tq` | query positions per cube / row batch |
//! | `kc` | keys per chunk |
//! | `sel` | selection block size; `subs = ⌈sel / kc⌉` chunks per block |
//! | `count` | selected blocks per query; `topk` blocks kept by the fused selection |
//! | `span`, `mem` | sliding window / compression stride; memory slots (compressed) |
//! | `qr × qk`, `pr × pd`, `units_per_row` | a unit's register tiles (see [`Tiling`]) |
//! | `splits` | cubes sharing one key chunk's query list in the dk/dv kernel |
//!
//! Files: `tiling` (the comptime shape), `shared` (the `#[cube]` helpers the kernels
//! share), `fwd`, `fwd_blocks` (the selected forward by key block, and the merge of per-slot
//! partials), `bwd_dq` (with `delta`), `bwd_dkdv` (with the sum of the splits, and the selected
//! dq partials by block), `csr` (the selected branch's query lists per block), `topk` (the
//! fused block ranking and the top-k kernel).
//!
//! One source serves the three branches through the comptime `mode` of [`Tiling`]:
//!
//! - [`SELECTED`]: one query position per cube with the `group_heads` heads that share its selection;
//!   the keys are its selected blocks (gated, invalid ones skipped) and the causal part of its
//!   own block. By key block (`fwd_blocks`), one cube per block and its queries instead.
//! - [`SLIDING`]: `tq` consecutive query positions × `group_heads` heads of one kv head; the query at `t`
//!   sees keys `t - window ..= t`.
//! - [`COMPRESSED`]: `tq` query positions × `group_heads` heads over memory + compressed slots; slot
//!   `j >= mem` is visible from position `(j - mem + 1) * stride` on.
//!
//! The rows of a cube are `(query tl, head hl)` pairs, `r = tl * group_heads + hl`. Scores are computed
//! in f32 whatever the storage type; [`NEG`] stands for minus infinity (WGSL has no infinity
//! literal). Threads stride over the work items of each phase.
//!
//! Shared key/value tiles have a row stride of `d + 1` words: threads that take consecutive
//! keys of one dot product then read different banks (with a stride of `d` = 64 all 32 lanes
//! of a warp hit one bank).
//!
//! Tensors are contiguous: `q`, `out`, `dout` `[b, h, n, d]`, `k`, `v` `[b, kvh, nk, d]`,
//! `lse`, `delta` `[b, h, n]` (f32), `idx`, `gates` `[b, hs, n, count]` (`idx < 0`: invalid).

// `#[cube]` expands `let mut x = ..; if .. { x = .. }` into code rustc sees as dead stores;
// runtime `usize::div_ceil` has no CubeCL expansion.
#![allow(unused_assignments, clippy::manual_div_ceil, clippy::collapsible_if)]

mod bwd_dkdv;
mod bwd_dq;
mod csr;
mod fwd;
mod fwd_blocks;
mod shared;
mod tiling;
mod topk;

pub use self::bwd_dkdv::{attn_bwd_dkdv, sum_splits};
pub use self::bwd_dq::{attn_bwd_dq, attn_delta};
pub use self::csr::{csr_count, csr_fill, csr_scan, fill_zero};
pub use self::fwd::attn_fwd;
pub use self::fwd_blocks::{attn_fwd_blocks, merge_parts};
pub use self::shared::grid_x;
pub use self::tiling::Tiling;
pub use self::topk::top_k;

/// Mode: selected blocks + own block.
pub const SELECTED: u32 = 0;
/// Mode: sliding window.
pub const SLIDING: u32 = 1;
/// Mode: compressed slots.
pub const COMPRESSED: u32 = 2;

/// A finite stand-in for minus infinity.
pub const NEG: f32 = -1.0e30;
/// Scores below this are masked.
pub(crate) const NEG_HALF: f32 = -5.0e29;
