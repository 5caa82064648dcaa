#!/usr/bin/env bash
# Runs every test of the workspace: the CPU backend (ndarray) everywhere, and the wgpu tests on
# software Vulkan (lavapipe), which this script installs when missing (Debian/Ubuntu).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' \
   || ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  echo "== installing software Vulkan (mesa-vulkan-drivers, libvulkan1) for the wgpu tests"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q mesa-vulkan-drivers libvulkan1
fi

# lavapipe needs no display; keep wgpu quiet about XDG_RUNTIME_DIR
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

cargo test --workspace --features "nsa-model/wgpu" "$@"

# the published figures are the committed raw results' (benchmarks/results)
python3 scripts/bench_report --check
