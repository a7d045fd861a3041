#!/usr/bin/env bash
# Runs the test suite of the CUDA build (features cudnn) here, on the CPU, with no GPU or driver:
# the binaries load against build-cuda.sh's link-time driver stub, on whose every call the
# device fails to open. What this checks is the CUDA build's CPU side: that it builds, that its
# tests pass (a test that forgets `--device cpu` fails here, since a CUDA build picks the GPU
# by default), and that it says so clearly when no GPU opens. The GPU paths run only on a GPU
# (scripts/gpu/gpu-check.sh).
#   bash scripts/gpu/test-cuda-build.sh [CARGO_TEST_ARGS...]    (after make-kit.sh or build-cuda.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR=${CUDA_BUILD_HOME:-$HOME/.cache/candle-cuda}
[ -f "$HOME_DIR/env.sh" ] || { echo "test-cuda-build: no $HOME_DIR/env.sh: run scripts/gpu/build-cuda.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
. "$HOME_DIR/env.sh"
NV=$(dirname "$(dirname "$NVCC")")/..   # <site>/nvidia/cu13/bin/nvcc -> <site>/nvidia
# The stub is named libcuda.so for the linker; the loader wants the soname. Never on a GPU machine.
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
ln -s "$HOME_DIR/link/lib64/libcuda.so" "$STUB/libcuda.so.1"
export LD_LIBRARY_PATH="$STUB:$NV/cu13/lib:$NV/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda} cargo test --release --workspace --features cudnn "$@"
