#!/usr/bin/env bash
# Benchmarks on a GPU machine: our `nsa-bench` (CUDA, and wgpu when Vulkan works) and the
# PyTorch reference (`scripts/bench_reference.py`), JSON and logs under $OUT.
#
#   scripts/gpu_bench.sh BIN [PHASE...]
#
# BIN: the nsa-bench binary (release, e.g. .gpu/nsa-bench). PHASES (default: all, in order;
# each fits one 10-minute device call on an H100, run them separately when calls are capped):
#   check      kernels vs tensor ops on CUDA, f32 and bf16, 1k and 4k tokens (max errors)
#   layer      one layer, ours: nsa (fused kernels) and nsa-tensor / full up to where they fit
#   train      training steps of the seed config, ours (NSA and dense), f32
#   ref-layer  one layer, PyTorch: reference NSA (PyTorch ops and Triton), SDPA, dense layer
#   ref-train  training steps, PyTorch reference
#   wgpu       check + small layer rows on wgpu (needs the Vulkan loader, see ../shared/GPU.md)
#   summary    merge every JSON under $OUT into $OUT/summary.md
#
# Environment: OUT (default ./bench-out), LENGTHS (default 1k,4k,16k,32k,64k,128k), RUNS (5),
# WARMUP (2), WHEELS (default ../shared/reference-wheels, else .whl), ROW_TIMEOUT (seconds, 240).
set -uo pipefail

BIN=${1:?usage: gpu_bench.sh BIN [PHASE...]}
shift
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(check layer train ref-layer ref-train summary)

OUT=${OUT:-./bench-out}
LENGTHS=${LENGTHS:-1k,4k,16k,32k,64k,128k}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-2}
ROW_TIMEOUT=${ROW_TIMEOUT:-240}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
# CubeCL kernel + autotune caches: kept on the machine between phases, not returned
export NSA_CACHE_DIR=${NSA_CACHE_DIR:-/tmp/nsa-cache}

log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_bench.log" >&2; }

{
  echo "date: $(date -Is)"
  echo "binary: $BIN ($(stat -c %s "$BIN" 2>/dev/null) bytes)"
  "$BIN" --version 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} >"$OUT/machine.txt"

python_env() {
  [ -n "${PY_READY:-}" ] && return 0
  local wheels=${WHEELS:-}
  if [ -z "$wheels" ]; then
    for w in "$HERE/../../shared/reference-wheels" "$HERE/../.whl" ./.whl; do
      if ls "$w"/*.whl >/dev/null 2>&1; then wheels=$w; break; fi
    done
  fi
  if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/nsa-site "$wheels"/*.whl \
      >>"$OUT/pip.log" 2>&1 || log "pip install of the reference wheels failed (see pip.log)"
    export PYTHONPATH=/tmp/nsa-site${PYTHONPATH:+:$PYTHONPATH}
  else
    log "no reference wheels found (set WHEELS=dir)"
  fi
  PY_READY=1
}

ours() { # name, args...
  local name=$1
  shift
  log "nsa-bench $name: $*"
  "$BIN" --warmup "$WARMUP" --runs "$RUNS" --row-timeout "$ROW_TIMEOUT" \
    --json "$OUT/$name.json" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log"
  local rc=$?
  log "nsa-bench $name: exit $rc"
  tail -n 40 "$OUT/$name.md" >&2
}

reference() { # name, args...
  local name=$1
  shift
  python_env
  log "bench_reference $name: $*"
  python3 "$HERE/bench_reference.py" --warmup "$WARMUP" --runs "$RUNS" \
    --json "$OUT/$name.json" "$@" >"$OUT/$name.tsv" 2>"$OUT/$name.log"
  local rc=$?
  log "bench_reference $name: exit $rc"
  tail -n 40 "$OUT/$name.tsv" >&2
}

for phase in "${PHASES[@]}"; do
  case $phase in
    check)
      ours check-cuda --backend cuda --suite check --lengths 1k,4k --precisions f32,bf16
      ;;
    layer)
      # the fused path everywhere; the tensor-op and dense paths stop at their first OOM
      ours layer-nsa --backend cuda --suite layer --impls nsa --lengths "$LENGTHS" \
        --precisions f32,bf16
      ours layer-tensor --backend cuda --suite layer --impls nsa-tensor,full --lengths "$LENGTHS" \
        --precisions bf16
      ;;
    train)
      ours train --backend cuda --suite train --train-shapes 256x16,4096x1 --train-precisions f32
      ;;
    ref-layer)
      reference ref-layer --suite layer --lengths "$LENGTHS" --precisions bf16 \
        --impls ref-nsa-triton,sdpa,ref-full
      reference ref-layer-f32 --suite layer --lengths 1k,4k,16k --precisions f32 \
        --impls ref-nsa,sdpa
      ;;
    ref-train)
      reference ref-train --suite train --train-shapes 256x16,4096x1 --train-impls ref-nsa,ref-full
      ;;
    wgpu)
      for f in .gl/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
      ldconfig 2>/dev/null
      export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
      ours check-wgpu --backend wgpu --suite check --lengths 1k --precisions f32
      ours layer-wgpu --backend wgpu --suite layer --impls nsa,nsa-tensor --lengths 1k,4k,16k \
        --precisions f32
      ;;
    summary)
      python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    try:
        report = json.load(open(path))
    except Exception:
        continue
    for r in report.get("rows", []):
        r["source"] = os.path.basename(path)
        rows.append(r)
def fmt(v, f="{:.2f}"):
    return f.format(v) if isinstance(v, (int, float)) else ""
print("| source | suite | impl | precision | pass | seq x batch | median ms | tok/s | peak GiB | status | note |")
print("|---|---|---|---|---|---|---:|---:|---:|---|---|")
key = lambda r: (r["suite"], r["pass"], r["seq"], r["precision"], r["impl"])
for r in sorted(rows, key=key):
    mem = r.get("peak_mem_bytes")
    print("| {} | {} | {} | {} | {} | {} x {} | {} | {} | {} | {} | {} |".format(
        r["source"], r["suite"], r["impl"], r["precision"], r["pass"], r["seq"], r["batch"],
        fmt(r.get("ms_median")), fmt(r.get("tokens_per_s"), "{:.0f}"),
        fmt(mem / 2**30 if mem else None), r.get("status", ""),
        str(r.get("note", "")).replace("|", "/")[:80]))
EOF
      log "summary: $OUT/summary.md"
      ;;
    *)
      log "unknown phase $phase"
      ;;
  esac
done
