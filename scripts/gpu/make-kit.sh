#!/usr/bin/env bash
# Builds the CUDA binary here (no GPU or toolkit needed) and lays out the folder that travels to
# the GPU machine: .gpu/{xtask.gz, run-env.sh, bench/, mini/packed.safetensors}. Keep it < 64 MiB.
#   bash scripts/gpu/make-kit.sh [FEATURES=cudnn]   (cudnn: our cuDNN convolution passes; cuda: candle's)
set -euo pipefail
cd "$(dirname "$0")/../.."
FEATURES=${FEATURES:-cudnn}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
CARGO_TARGET_DIR=target-cuda scripts/gpu/build-cuda.sh . -- build --release -p xtask --features "$FEATURES"
mkdir -p .gpu/bench
# The stripped CUDA binary is ~67 MB, over the 64 MiB that travels: ship it gzipped (~17 MB).
strip -o .gpu/xtask target-cuda/release/xtask
gzip -f -6 .gpu/xtask
cp scripts/gpu/run-env.sh .gpu/
cp ../shared/bench/ref_unet.py ../shared/bench/bench_cpu.py .gpu/bench/
if [ -d ../shared/data/anime-faces-mini ]; then
  # The CPU build (`cargo xtask-cuda` would have left a CUDA one in target/, which needs a driver).
  cargo build -q --release -p xtask
  target/release/xtask prepare-data --raw ../shared/data/anime-faces-mini --out .gpu/mini >/dev/null
  rm -rf .gpu/mini/images
fi
du -sh .gpu
