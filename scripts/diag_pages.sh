#!/usr/bin/env bash
# Which allocations make CubeCL's device pool grow (issue 22): one 100K-token prefill of the seed
# config (f32, chunks of 2,048) with CubeCL's memory log on, on the lent GPU machine (MODE=train:
# one 64k-token training step with recomputed blocks instead):
#
#   scripts/diag_pages.sh        (repository root there; carries .gpu/nsa-bench.xz and, if any,
#                                 .gpu/cache.tgz.part-*, as scripts/gpu_session.sh does)
#
# $OUT/pages.txt lists every page the pools made with the reservation that made it; the whole
# log comes back as $OUT/memlog.txt.xz. The log is switched on by a cubecl.toml in the working
# directory (CubeCL reads it at start), written here and nowhere else.
set -u
OUT=${OUT:-./diag-out}
mkdir -p /tmp/bin "$OUT"
xz -dc .gpu/nsa-bench.xz >/tmp/bin/nsa-bench && chmod +x /tmp/bin/nsa-bench
export NSA_CACHE_DIR=/tmp/nsa-cache
mkdir -p "$NSA_CACHE_DIR"
if ls .gpu/cache.tgz.part-* >/dev/null 2>&1; then
  cat .gpu/cache.tgz.part-* | tar -xzf - -C "$NSA_CACHE_DIR"
fi
case ${MODE:-prefill} in
  prefill) bench=(--suite decode --backend cuda --prompt-len 100000 -n 16 --runs 1) ;;
  # one training step of the seed model at 64k tokens, blocks recomputed (nsa-train --recompute)
  train) bench=(--suite train --backend cuda --impls nsa --train-shapes 65536x1
    --train-modes recompute --runs 1 --warmup 1) ;;
  *) echo "MODE is prefill or train" >&2; exit 2 ;;
esac
printf '[memory.logger]\nlevel = "full"\nfile = "/tmp/memlog.txt"\n' >cubecl.toml
NSA_PREFILL_CHUNK=${CHUNK:-2048} timeout 150 /tmp/bin/nsa-bench "${bench[@]}" \
  ${PRECISION:+--precision $PRECISION} >"$OUT/bench.out" 2>&1
rm -f cubecl.toml
tail -3 "$OUT/bench.out"
awk '/Reserved memory/ {last=$0} /Allocated a new memory page/ {print NR": "last" || "$0}' \
  /tmp/memlog.txt | cut -c1-300 >"$OUT/pages.txt"
grep -v "using persistent memory, $" "$OUT/pages.txt" | head -40
xz -c /tmp/memlog.txt >"$OUT/memlog.txt.xz"
