#!/usr/bin/env bash
# Builds the CUDA binary here (no GPU or toolkit needed) and lays out the folder that travels to
# the GPU machine: .gpu/{xtask, run-env.sh, bench/, mini/packed.safetensors}. Keep it < 64 MiB.
#   bash scripts/gpu/make-kit.sh [FEATURES=cuda]
set -euo pipefail
cd "$(dirname "$0")/../.."
FEATURES=${FEATURES:-cuda}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
CARGO_TARGET_DIR=target-cuda scripts/gpu/build-cuda.sh . -- build --release -p xtask --features "$FEATURES"
mkdir -p .gpu/bench
cp target-cuda/release/xtask .gpu/xtask
strip .gpu/xtask 2>/dev/null || true
cp scripts/gpu/run-env.sh .gpu/
cp ../shared/bench/ref_unet.py ../shared/bench/bench_cpu.py .gpu/bench/
if [ -d ../shared/data/anime-faces-mini ]; then
  target/release/xtask prepare-data --raw ../shared/data/anime-faces-mini --out .gpu/mini >/dev/null
  rm -rf .gpu/mini/images
fi
du -sh .gpu
