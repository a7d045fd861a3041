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
# perf, for the check's host profile (step 6), with its libraries and loader (~11 MB packed): the
# GPU machine has no perf, and maybe not this glibc. Reports by symbol come back here, where the
# unstripped binary is (target-cuda/release/xtask, the same build id).
if command -v perf > /dev/null; then
  P=$(mktemp -d); mkdir -p "$P/perf/lib"
  cp "$(command -v perf)" "$P/perf/"
  for l in $(ldd "$(command -v perf)" | awk '$3 ~ /^\// {print $3}'); do cp -L "$l" "$P/perf/lib/"; done
  cp -L /lib64/ld-linux-x86-64.so.2 "$P/perf/"
  tar czf .gpu/perf.tgz -C "$P" perf && rm -rf "$P"
else
  rm -f .gpu/perf.tgz
  echo "no perf here: the kit goes without it (the check's step 6 says so)"
fi
cp ../shared/bench/ref_unet.py ../shared/bench/bench_cpu.py .gpu/bench/
if [ -d ../shared/data/anime-faces-mini ]; then
  # The CPU build (`cargo xtask-cuda` would have left a CUDA one in target/, which needs a driver).
  cargo build -q --release -p xtask
  target/release/xtask prepare-data --raw ../shared/data/anime-faces-mini --out .gpu/mini >/dev/null
  rm -rf .gpu/mini/images
fi
du -sh .gpu
