#!/usr/bin/env bash
# Runs the test suite of the CUDA build (features cudnn) here, on the CPU, with no GPU or driver:
# the binaries load against build-cuda.sh's link-time driver stub, on whose every call the
# device fails to open. What this checks is the CUDA build's CPU side: that it builds, that its
# tests pass (a test that trains without `--device cpu` fails here, since a CUDA build's `train`
# wants the GPU), that it says so clearly when no GPU opens, and that NVRTC (a host library)
# compiles our kernels. The GPU paths run only on a GPU (scripts/gpu/gpu-check.sh).
#   bash scripts/gpu/test-cuda-build.sh [CARGO_TEST_ARGS...]    (after make-kit.sh or build-cuda.sh)
# e.g. `-p unet --lib nvrtc`; without -p, the whole workspace.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR=${CUDA_BUILD_HOME:-$HOME/.cache/candle-cuda}
[ -f "$HOME_DIR/env.sh" ] || { echo "test-cuda-build: no $HOME_DIR/env.sh: run scripts/gpu/build-cuda.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
. "$HOME_DIR/env.sh"
NV=$(dirname "$(dirname "${NVCC:?$HOME_DIR/env.sh sets no NVCC: rerun scripts/gpu/build-cuda.sh}")")/..   # <site>/nvidia/cu13/bin/nvcc -> <site>/nvidia
# The stub is named libcuda.so for the linker; the loader wants the soname. Never on a GPU machine.
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
ln -s "$HOME_DIR/link/lib64/libcuda.so" "$STUB/libcuda.so.1"
export LD_LIBRARY_PATH="$STUB:$NV/cu13/lib:$NV/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SCOPE=--workspace
for a in "$@"; do case $a in -p|--package|-p*|--package=*) SCOPE="";; esac; done
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda} cargo test --release $SCOPE --features cudnn "$@"
