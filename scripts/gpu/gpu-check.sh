#!/usr/bin/env bash
# One run on a GPU machine answers the CUDA questions of docs/GPU.md, ours and PyTorch's side by
# side on the same card. Runs from the repository root, with no Rust and no network, given a
# kit folder made here by `scripts/gpu/make-kit.sh` (the CUDA binary, run-env.sh, the PyTorch
# reference, the mini dataset packed):
#
#   OUT=/tmp/out bash scripts/gpu/gpu-check.sh [KIT=.gpu]
#
# Env knobs (defaults for an H100/H200: every step within DEADLINE_S, the later ones cut or skipped when
# time runs short; stop 25's first run, steps 1 2 2b 4, took 377 s; after it, STEPS="1 2 7 6" AB=0
# DEADLINE_S=540 under a 560 s limit measures what changed, about 9 minutes, the deadline
# cutting step 7's last parts and step 6 first):
#   DEVICE=cuda  RUNS=2  WARMUP=1  TRAIN_MINUTES=1.5  CASES=gpu  PRECISIONS="f32 bf16"  PY=python3
#   CONFIG=configs/anime64.toml  BATCH=64  GRID=16x16  AB=1 (the train128 attribution runs)
#   THREADS=$(nproc)  STEPS="1 2 2b 7 4 6" (which steps run, in the order 1 2 2b 7 4 6 5: a rerun can redo only what failed; 5 = PyTorch with
#   torch.compile, ~1 minute of compiling per precision, for when the session has time to spare;
#   6 = a CPU profile of our training step's host side, with the perf the kit carries;
#   7 = what has never run on a GPU, each checked, then timed: training steps replayed from
#   CUDA graphs (TRAIN_CUDA_GRAPH=1), bf16 1x1 convolutions as GEMMs (UNET_CONV1X1=gemm), the
#   time embedding folded into GroupNorm (UNET_FOLD_TEMB=1), all that passed together, sampling
#   from CUDA graphs (SAMPLER_CUDA_GRAPH=1), cuDNN's graph API (execution plans, UNET_CUDNN_API=graph),
#   then our per-op GPU times with what passed (plain steps), and with time left the host's
#   draws through pageable copies (DIFFUSION_UPLOAD=pageable), the sums through candle's add
#   (UNET_INPLACE_SUMS=0), the saved values kept to the backward pass's end (UNET_RELEASE_SAVED=0),
#   stop 30's kept cuDNN descriptors
#   and uploads undone, then the separate q, k, v projections (UNET_FUSED_QKV=0))
#   AB_SWAPS="..." (the A/B runs' switches; default: each of our parts; UNET_CUDNN_ALGO=find adds
#   cuDNN's Find against its heuristics, both precisions)  AB_MICRO=1 (the micro-batch run)
# Each step has its own time limit, so that one hang cannot take the whole session, and the whole
# run keeps to DEADLINE_S (default 520 s: run it under a 540 s limit): each limit is cut to what is
# left, and the profile and A/B runs give way to the training run and its grid.
# On CPU (to test this script here): KIT=.gpu-cpu DEVICE=cpu CASES=reduced-forward PRECISIONS=f32 \
#   TRAIN_MINUTES=0.3 CONFIG=configs/mini64.toml BATCH=16 GRID=4x4 RUNS=1 WARMUP=0
set -uo pipefail
KIT=${KIT:-.gpu}
OUT=${OUT:?set OUT to the folder that comes back}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-2}
WARMUP=${WARMUP:-1}
TRAIN_MINUTES=${TRAIN_MINUTES:-1.5}
CASES=${CASES:-gpu}
PRECISIONS=${PRECISIONS:-f32 bf16}
PY=${PY:-python3}
CONFIG=${CONFIG:-configs/anime64.toml}
BATCH=${BATCH:-64}
GRID=${GRID:-16x16}
AB=${AB:-1}
# The host side of our steps (noise, batches) runs on these; a GPU machine's users have them all.
THREADS=${THREADS:-$(nproc)}
STEPS=" ${STEPS:-1 2 2b 7 4 6} "
AB_MICRO=${AB_MICRO:-1}
DEADLINE_S=${DEADLINE_S:-520}
T0=$(date +%s)
left() { echo $(( T0 + DEADLINE_S - $(date +%s) )); }
# A limit of $1 seconds, cut to what is left before the deadline less $2 seconds kept for later
# steps (at least 5).
cap() { local l=$(( $(left) - ${2:-0} )); [ "$l" -lt 5 ] && l=5; echo $(( $1 < l ? $1 : l )); }
# Seconds step 4 needs (its training, the bf16 steps, the grid), kept free by the steps before it.
RESERVE4=$(awk "BEGIN{print int($TRAIN_MINUTES * 60 + 110)}")
[[ "$STEPS" == *" 4 "* ]] || RESERVE4=0
# Whether $1 seconds are left beyond $2 kept for later; says so when not.
room() { [ "$(left)" -ge $(( $1 + ${2:-0} )) ] || { echo "skipped (deadline): $3"; return 1; }; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
BIN=$KIT/xtask
mkdir -p "$OUT"
if [ ! -x "$BIN" ] && [ -f "$BIN.gz" ]; then
  BIN=/tmp/xtask-gpu-check
  gunzip -c "$KIT/xtask.gz" > "$BIN" && chmod +x "$BIN"
fi
LOG=$OUT/gpu-check.log
exec > >(tee -a "$LOG") 2>&1
step() { echo; echo "=== $(date +%T) $*"; }
# At most 8 files come back from $OUT: on exit, everything but the log and the images goes into
# one results.tgz.
pack() {
  ( cd "$OUT" && find . -type f ! -name '*.png' ! -name gpu-check.log ! -name results.tgz ! -name .packed | sort > .packed &&
    tar czf results.tgz -T .packed && xargs rm -f < .packed && rm -f .packed &&
    find . -mindepth 1 -type d -empty -delete )
  echo "files in $OUT:"; ls -la "$OUT"
}
trap pack EXIT

step "environment"
if [ "$DEVICE" != cpu ]; then
  # shellcheck disable=SC1091
  source "$KIT/run-env.sh" "$BIN"
  nvidia-smi | tee "$OUT/nvidia-smi.txt"
fi
"$BIN" --version
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || echo "no torch: PyTorch side skipped"

want 1 && {
step "1. correctness: PyTorch fixtures, then each convolution pass against the CPU, through the $DEVICE path"
# Our CUDA kernels (cuDNN convolution passes, fused GroupNorm, softmax, upsampling, in-place Adam) are checked first; should a check
# fail, the run goes on with candle's own ops for the failing part, and says so, so that the
# figures below still come back.
# Its checks run at batch 4: seconds on a GPU. The limit only stops a hang from taking the run.
selftest() { timeout "$(cap 120 "$RESERVE4")" "$BIN" self-test --device "$DEVICE" --fixtures crates/unet/tests/fixtures; }
# The switches that send the parts named in a failed self-test's output (its FAIL lines, or the
# error that stopped it) back to candle's ops.
suspects() {
  local f=$1 s=""
  grep -qiE 'FAIL.*|error' "$f" || return 0
  grep -E 'FAIL$' "$f" | grep -q '^conv ' && s="$s UNET_CUDA_CONV=candle"
  grep -E 'FAIL$' "$f" | grep -q '^group norm' && s="$s UNET_CUDA_NORM=candle"
  grep -E 'FAIL$' "$f" | grep -q '^softmax' && s="$s UNET_CUDA_SOFTMAX=candle"
  grep -E 'FAIL$' "$f" | grep -q '^upsample' && s="$s UNET_CUDA_UPSAMPLE=candle"
  grep -E 'FAIL$' "$f" | grep -q '^adam' && s="$s TRAINER_CUDA_ADAM=candle"
  # The next step queued before the last one's loss is read, its update gated on the device.
  grep -E 'FAIL$' "$f" | grep -q '^pipelined' && s="$s TRAIN_PIPELINE=0"
  # The host's draws copied to the device through kept page-locked buffers.
  grep -E 'FAIL$' "$f" | grep -q '^upload' && s="$s DIFFUSION_UPLOAD=pageable"
  # Sums written into the convolution's output buffer (Conv2d::forward_plus).
  grep -E 'FAIL$' "$f" | grep -qE '^sums? into conv' && s="$s UNET_INPLACE_SUMS=0"
  # The fixture's gradients alone wrong: the first gradients stored as they are (candle patch).
  grep -E 'FAIL$' "$f" | grep -q '^grad ' && s="$s UNET_CUDA_GRADS=candle UNET_RELEASE_SAVED=0"
  # The backward pass released nothing, or read what it had released (candle patch, stop 34).
  grep -E 'FAIL$' "$f" | grep -q '^saved values released' && s="$s UNET_RELEASE_SAVED=0"
  # Our kernels' errors say "in CUDA op: <name>" (conv, groupnorm, softmax, up2x/blocksum2x, adam).
  # (main.rs prints "error: ..."; candle's own traces say "Error".)
  local err; err=$(sed -n '/^[Ee]rror/,$p' "$f" | head -12)
  # (The bias kernels serve our convolutions only: "bias add", "channel sum".)
  case "$err" in *cudnn*|*CUDNN*|*conv*|*"bias add"*|*"channel sum"*) s="$s UNET_CUDA_CONV=candle";; esac
  case "$err" in *gn_*|*groupnorm*|*"group norm"*) s="$s UNET_CUDA_NORM=candle";; esac
  case "$err" in *softmax*) s="$s UNET_CUDA_SOFTMAX=candle";; esac
  case "$err" in *up2x*|*blocksum*|*upsampl*) s="$s UNET_CUDA_UPSAMPLE=candle";; esac
  case "$err" in *adam*|*Adam*) s="$s TRAINER_CUDA_ADAM=candle";; esac
  case "$err" in *"pinned upload"*) s="$s DIFFUSION_UPLOAD=pageable";; esac
  case "$err" in *"time embedding add"*|*"residual add in place"*|*"add into output"*|*"add-into-output"*) s="$s UNET_INPLACE_SUMS=0";; esac
  case "$err" in *"earlier backward pass released"*) s="$s UNET_RELEASE_SAVED=0";; esac
  # Attention's stacked q, k, v projections are read through strided views (candle's matmul).
  case "$err" in *MatMulNonContiguous*|*matmul*|*"strided"*) s="$s UNET_FUSED_QKV=0";; esac
  # NVRTC could not build unet's kernels: every part they serve goes back.
  case "$err" in *"unet's CUDA kernels"*) s="$s UNET_CUDA_NORM=candle UNET_CUDA_SOFTMAX=candle UNET_CUDA_UPSAMPLE=candle UNET_CUDA_CONV=candle";; esac
  echo "$s" | tr ' ' '\n' | sort -u | tr '\n' ' '
}
# Micro-batching (gradient accumulation) is checked for itself: no switch serves it, and only
# step 2b's micro-batch run uses it (for its time and memory, not its result), so its failure
# alone is reported, not retried.
only_micro_batch_failed() {
  local f=$1 rc=$2
  # Finished (exit 1 after its summary line), not stopped by a hang, a panic or a signal after
  # the micro-batch lines were printed.
  [ "$rc" = 1 ] && grep -q 'check(s) failed on' "$f" || return 1
  grep -E 'FAIL$' "$f" | grep -q '^micro-batch' || return 1
  # (A failed check ends the self-test with "error: N check(s) failed on ..."; any other error
  # stopped it before its other checks had run.)
  ! grep -E 'FAIL$' "$f" | grep -qv '^micro-batch' && ! grep -E '^[Ee]rror' "$f" | grep -qv 'check(s) failed on'
}
ALL_SWITCHES="UNET_CUDA_NORM=candle UNET_CUDA_SOFTMAX=candle UNET_CUDA_UPSAMPLE=candle UNET_CUDA_CONV=candle TRAINER_CUDA_ADAM=candle UNET_CUDA_POOL=candle UNET_CUDA_GRADS=candle UNET_FUSED_QKV=0 UNET_CUDA_PARAMS=candle TRAIN_PIPELINE=0 DIFFUSION_UPLOAD=pageable UNET_INPLACE_SUMS=0 UNET_RELEASE_SAVED=0"
selftest > "$OUT/self-test.txt" 2>&1
rc=$?
cat "$OUT/self-test.txt"
if [ "$rc" != 0 ] && only_micro_batch_failed "$OUT/self-test.txt" "$rc"; then
  echo "self-test: only the micro-batch checks failed (gradient accumulation, train --micro-batch-size): nothing to switch back; only step 2b's micro-batch run uses it (its time and memory stand, not its result)"
elif [ "$rc" != 0 ]; then
  # At most three retries (each under its own limit): for a failed convolution check the kept cuDNN
  # descriptors alone, then the parts the output names, then everything.
  # A hang (timeout's 124) names nothing: straight to everything.
  named=""
  [ "$rc" != 124 ] && named=$(suspects "$OUT/self-test.txt")
  [ "$rc" = 124 ] && echo "self-test stopped by its time limit"
  tries=()
  # A convolution check failed, or cuDNN's error stopped the run: first only the launches from
  # kept cuDNN descriptors (UNET_CUDNN_PREPARED=0, new since the last GPU run), then candle's
  # convolutions (40x slower). (Not for our bias kernels' or NVRTC's errors: it cannot help those.)
  if grep -E 'FAIL$' "$OUT/self-test.txt" | grep -q '^conv ' || sed -n '/^[Ee]rror/,$p' "$OUT/self-test.txt" | head -12 | grep -qi cudnn; then
    case "$named" in *UNET_CUDA_CONV=candle*) tries+=("${named//UNET_CUDA_CONV=candle/UNET_CUDNN_PREPARED=0}");; esac
  fi
  [ -n "${named// /}" ] && tries+=("$named")
  tries+=("$ALL_SWITCHES")
  for fallback in "${tries[@]}"; do
    echo "self-test failed: retrying with $fallback"
    # shellcheck disable=SC2086
    if env $fallback timeout "$(cap 120 "$RESERVE4")" "$BIN" self-test --device "$DEVICE" --fixtures crates/unet/tests/fixtures > "$OUT/self-test-fallback.txt" 2>&1; then
      cat "$OUT/self-test-fallback.txt"
      echo "FALLBACK in use for everything below: $fallback"
      # shellcheck disable=SC2163
      for kv in $fallback; do export "$kv"; done
      break
    fi
    cat "$OUT/self-test-fallback.txt"
  done
fi
}

want 2 && {
step "2+3. throughput and memory, ours then PyTorch, same card (cases: $CASES)"
# Each precision gets its share of what is left after step 4's reserve and ~90 s for step 2b's
# profiles and A/B runs, so that a slow f32 cannot take bf16's time (at least 60 s each, unless
# step 4's reserve leaves less).
RESERVE2B=0
want 2b && [ "$DEVICE" != cpu ] && RESERVE2B=90
np=$(echo $PRECISIONS | wc -w)
for p in $PRECISIONS; do
  share=$(( ($(left) - RESERVE4 - RESERVE2B) / np )); np=$((np - 1))
  [ "$share" -lt 60 ] && share=60
  limit=$(cap 300 "$RESERVE4"); [ "$share" -lt "$limit" ] && limit=$share
  echo "bench $p: at most $limit s"
  MEM=$OUT/gpu-mem-$p.csv
  if [ "$DEVICE" != cpu ]; then
    # utilization.gpu: the share of the driver's sample period with a kernel running, which tells
    # a host-bound run (the bench's "host queue time" near the whole run) from a full launch queue.
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 200 > "$MEM" &
    SMI=$!
  fi
  timeout "$limit" "$BIN" bench --device "$DEVICE" --precision "$p" --cases "$CASES" --runs "$RUNS" --warmup "$WARMUP" --threads "$THREADS" \
    --python "$PY" --torch-bench "$KIT/bench" --out "$OUT/bench-$p.json" || echo "bench $p failed"
  [ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null; SMI=
done
}

want 2b && {
step "2b. where the time goes: our per-op GPU times and PyTorch's profile, then ours with each of our CUDA kernels swapped for candle's"
if [ "$DEVICE" != cpu ]; then
  for p in $PRECISIONS; do
    # Ours: GPU time per op and shape of our own kernels in one training step (UNET_CUDA_PROFILE).
    room 30 "$RESERVE4" "our profile $p" || continue
    UNET_CUDA_PROFILE=1 timeout "$(cap 120 "$RESERVE4")" "$BIN" bench --device "$DEVICE" --precision "$p" --cases train128 --runs 1 --warmup 1 --threads "$THREADS" \
      --python none --out "$OUT/profile-ours-train128-$p.json" || echo "our profile $p failed"
    room 30 "$RESERVE4" "PyTorch's profile $p" || continue
    timeout "$(cap 120 "$RESERVE4")" $PY scripts/bench_torch.py --case train128 --device "$DEVICE" --precision "$p" --ref-dir "$KIT/bench" \
      --runs 1 --warmup 2 --profile "$OUT/torch-profile-train128-$p.txt" > /dev/null || echo "torch profile $p failed"
    head -45 "$OUT/torch-profile-train128-$p.txt" 2>/dev/null
  done
fi
if [ "$AB" = 1 ]; then
  AB_CASE=$([ "$DEVICE" = cpu ] && echo reduced-train || echo train128)
  # cuDNN's Find against its heuristics (the default), in both precisions with the forward pass,
  # when asked for (AB_SWAPS="UNET_CUDNN_ALGO=find ..."): stop 25 measured Find slower.
  if [[ " ${AB_SWAPS:-} " == *" UNET_CUDNN_ALGO=find "* ]]; then
    AB_CASES=$([ "$DEVICE" = cpu ] && echo reduced-train || echo train128,forward128)
    for p in $PRECISIONS; do
      room 40 "$RESERVE4" "A/B run with cuDNN's Find, $p" || continue
      UNET_CUDNN_ALGO=find timeout "$(cap 120 "$RESERVE4")" "$BIN" bench --device "$DEVICE" --precision "$p" --cases "$AB_CASES" --runs 2 --warmup 1 --threads "$THREADS" \
        --python none --out "$OUT/ab-unet_cudnn_algo-find-$p.json" || echo "A/B run with cuDNN's Find ($p) failed or ran out of time"
    done
  fi
  for swap in ${AB_SWAPS:-UNET_CUDA_CONV=candle UNET_CUDA_NORM=candle UNET_CUDA_SOFTMAX=candle UNET_CUDA_UPSAMPLE=candle TRAINER_CUDA_ADAM=candle UNET_CUDA_POOL=candle UNET_CUDA_GRADS=candle UNET_CUDNN_PREPARED=0 UNET_CUDA_PARAMS=candle DIFFUSION_UPLOAD=pageable UNET_INPLACE_SUMS=0 UNET_RELEASE_SAVED=0}; do
    [ "$swap" = UNET_CUDNN_ALGO=find ] && continue
    tag=$(echo "$swap" | tr 'A-Z=' 'a-z-')
    room 40 "$RESERVE4" "A/B run with $swap" || continue
    env $swap timeout "$(cap 120 "$RESERVE4")" "$BIN" bench --device "$DEVICE" --precision f32 --cases "$AB_CASE" --runs 2 --warmup 1 --threads "$THREADS" \
      --python none --out "$OUT/ab-$tag.json" || echo "A/B run with $swap failed or ran out of time"
  done
  # Gradient accumulation (train --micro-batch-size) for cards with less memory: the same f32 step
  # in 4 parts, ours and PyTorch's accumulating alike, time and peak memory beside the whole
  # batch's from step 2. After the A/B runs, which explain the gap to PyTorch: under the deadline
  # this one gives way first.
  MICRO=$([ "$DEVICE" = cpu ] && echo 8 || echo 32)
  if [ "$AB_MICRO" = 1 ] && room 60 "$RESERVE4" "the micro-batch run"; then
    timeout "$(cap 150 "$RESERVE4")" "$BIN" bench --device "$DEVICE" --precision f32 --cases "$AB_CASE" --micro-batch "$MICRO" --runs 2 --warmup 1 --threads "$THREADS" \
      --python "$PY" --torch-bench "$KIT/bench" --out "$OUT/micro$MICRO-$AB_CASE-f32.json" || echo "micro-batch run failed or ran out of time"
  fi
fi
}

want 7 && {
step "7. never run on a GPU before, each checked then timed: training steps from CUDA graphs (TRAIN_CUDA_GRAPH=1); bf16 1x1 convolutions as GEMMs (UNET_CONV1X1=gemm); the time embedding folded into GroupNorm (UNET_FOLD_TEMB=1); all that passed together; sampling from CUDA graphs (SAMPLER_CUDA_GRAPH=1); cuDNN's graph API (UNET_CUDNN_API=graph); our per-op profile with what passed; with time left, the host's draws through pageable copies (DIFFUSION_UPLOAD=pageable), the sums through candle's add (UNET_INPLACE_SUMS=0), the saved values kept to the backward pass's end (UNET_RELEASE_SAVED=0), stop 30 undone (UNET_CUDNN_PREPARED=0 UNET_CUDA_PARAMS=candle), then the separate q, k, v projections (UNET_FUSED_QKV=0)"
# Each use first passes its own checks, and only then is timed, beside step 2's figures; in the
# order of what they may gain, so that the deadline cuts the least. A use that fails on the
# card goes back to the plain path and says why (in the bench's JSON and log lines).
if [ "$DEVICE" = cpu ]; then
  echo "step 7 needs CUDA: skipped on the CPU"
else
  # `[VAR=value ...] timed LABEL NAME CASES RUNS PRECISION...`: the bench with the caller's
  # switches, one JSON per precision ($OUT/NAME-p.json), each run only with room left.
  timed() {
    local label=$1 name=$2 cases=$3 runs=$4 p; shift 4
    for p in "$@"; do
      room 40 "$RESERVE4" "$label, $p" || continue
      timeout "$(cap 120 "$RESERVE4")" "$BIN" bench --device "$DEVICE" --precision "$p" --cases "$cases" --runs "$runs" --warmup 1 --threads "$THREADS" \
        --python none --out "$OUT/$name-$p.json" || echo "$label ($p) failed or ran out of time"
    done
  }
  # The CUDA-graph checks (sampling: 4 images, 5 DDIM steps; training: 4 steps of the tiny
  # model, the last a smaller batch, f32, f32 in micro-batches, bf16; each against plain calls).
  CG_RC=skipped
  if room 40 "$RESERVE4" "the CUDA-graph checks"; then
    timeout "$(cap 120 "$RESERVE4")" "$BIN" self-test --device "$DEVICE" --fixtures crates/unet/tests/fixtures --only cuda-graph > "$OUT/self-test-cuda-graph.txt" 2>&1
    CG_RC=$?
    tail -16 "$OUT/self-test-cuda-graph.txt"
  fi
  # A use is timed when its checks all ran and passed (exit 0: everything passed).
  passed() { [ "$CG_RC" = 0 ] || { [ -f "$OUT/self-test-cuda-graph.txt" ] && grep -q "^$1.* ok$" "$OUT/self-test-cuda-graph.txt" && ! grep -q "^$1.*FAIL" "$OUT/self-test-cuda-graph.txt"; }; }
  TRAIN_GRAPH_OK=0
  if passed "training steps from CUDA graphs"; then
    TRAIN_GRAPH_OK=1
    # The capture falls in the warm-up run.
    TRAIN_CUDA_GRAPH=1 timed "the CUDA-graph training bench" ab-train_cuda_graph train128 3 $PRECISIONS
  else
    echo "CUDA-graph training check failed or did not run (exit $CG_RC): not timed"
  fi
  # bf16 1x1 forward convolutions as one cuBLAS GEMM each: the conv checks with it (the bf16 1x1
  # shapes go through it), then the bf16 step and forward pass.
  if room 40 "$RESERVE4" "the 1x1-GEMM check"; then
    UNET_CONV1X1=gemm timeout "$(cap 90 "$RESERVE4")" "$BIN" self-test --device "$DEVICE" --fixtures crates/unet/tests/fixtures --only conv > "$OUT/self-test-conv1x1-gemm.txt" 2>&1
    rc=$?
    grep -E 'k1 s1 fwd|FAIL|all checks|check\(s\) failed|^[Ee]rror' "$OUT/self-test-conv1x1-gemm.txt" | grep -E 'bf16|FAIL|all checks|failed|rror' | head -12
    [ "$rc" = 0 ] && GEMM_OK=1
    if [ "$rc" = 0 ]; then
      UNET_CONV1X1=gemm timed "the 1x1-GEMM bench" ab-unet_conv1x1-gemm train128,forward128 2 bf16
    else
      echo "1x1-GEMM conv check failed (exit $rc): not timed"; tail -5 "$OUT/self-test-conv1x1-gemm.txt"
    fi
  fi
  # The time embedding and conv1's bias folded into the GroupNorm that follows (UNET_FOLD_TEMB=1):
  # the model-level checks with it (forward and gradients against PyTorch's fixtures, the
  # micro-batch parts' dropout), then the step in each precision.
  FOLD_OK=0
  if room 40 "$RESERVE4" "the folded time embedding's check"; then
    UNET_FOLD_TEMB=1 timeout "$(cap 90 "$RESERVE4")" "$BIN" self-test --device "$DEVICE" --fixtures crates/unet/tests/fixtures --only fixtures,micro-batch > "$OUT/self-test-fold-temb.txt" 2>&1
    rc=$?
    grep -E 'FAIL|all checks|check\(s\) failed|^[Ee]rror' "$OUT/self-test-fold-temb.txt" | head -8
    if [ "$rc" = 0 ]; then
      FOLD_OK=1
      UNET_FOLD_TEMB=1 timed "the folded time embedding's bench" ab-unet_fold_temb train128 2 $PRECISIONS
    else
      echo "folded time embedding check failed (exit $rc): not timed"; tail -5 "$OUT/self-test-fold-temb.txt"
    fi
  fi
  # Everything that passed its checks at once: the candidate defaults, each precision.
  ALL_ENV=""
  [ "$TRAIN_GRAPH_OK" = 1 ] && ALL_ENV="$ALL_ENV TRAIN_CUDA_GRAPH=1"
  [ "${GEMM_OK:-0}" = 1 ] && ALL_ENV="$ALL_ENV UNET_CONV1X1=gemm"
  [ "$FOLD_OK" = 1 ] && ALL_ENV="$ALL_ENV UNET_FOLD_TEMB=1"
  if [ -n "$ALL_ENV" ]; then
    echo "all that passed:$ALL_ENV"
    (export $ALL_ENV; timed "the bench with all that passed" ab-all-passed train128,forward128 3 $PRECISIONS)
  fi
  # Sampling from graphs; the timed run includes the one capture (and its plain warm-up call) a
  # user's sampling run pays.
  if passed "sampling from CUDA graphs"; then
    SAMPLER_CUDA_GRAPH=1 timed "the CUDA-graph sampling bench" ab-sampler_cuda_graph ddim50x256,ddpm100x256 1 $PRECISIONS
  else
    echo "CUDA-graph sampling check failed or did not run (exit $CG_RC): not timed"
  fi
  # cuDNN's graph API: its own self-test first (the TF32 and bf16 convolution checks go through
  # the plans; exact f32 stays on the legacy calls). A pass whose plan cannot be built runs the
  # legacy calls and says so.
  if room 60 "$RESERVE4" "the graph API's self-test"; then
    UNET_CUDNN_API=graph timeout "$(cap 120 "$RESERVE4")" "$BIN" self-test --device "$DEVICE" --fixtures crates/unet/tests/fixtures > "$OUT/self-test-graph.txt" 2>&1
    rc=$?
    grep -E 'FAIL|all checks|check\(s\) failed|^[Ee]rror' "$OUT/self-test-graph.txt" | head -20
    if [ "$rc" = 0 ]; then
      GRAPH_OK=1
      UNET_CUDNN_API=graph timed "the graph API's bench" ab-unet_cudnn_api-graph train128,forward128 3 $PRECISIONS
    else
      echo "graph API self-test failed (exit $rc): not timed"; tail -15 "$OUT/self-test-graph.txt"
    fi
  fi
  # Last, our per-op GPU times (UNET_CUDA_PROFILE) with what passed, plain steps (a profile
  # times each op with events, which a replayed graph has not): the kernels rewritten after stop
  # 25 (GroupNorm, the bias passes) beside that run's profile-ours-train128-*.json, op by op.
  PROFILE_ENV=$(echo "$ALL_ENV" | tr ' ' '\n' | grep -v '^TRAIN_CUDA_GRAPH=' | tr '\n' ' ')
  for p in $PRECISIONS; do
    room 30 "$RESERVE4" "our profile with what passed, $p" || continue
    (export $PROFILE_ENV UNET_CUDA_PROFILE=1; timeout "$(cap 90 "$RESERVE4")" "$BIN" bench --device "$DEVICE" --precision "$p" --cases train128 --runs 1 --warmup 1 --threads "$THREADS" \
      --python none --out "$OUT/profile-ours-train128-$p.json") || echo "our profile $p failed"
  done
  # With any time left: the host's draws (noise, timesteps) copied from pageable memory again
  # (stop 32's kept page-locked buffers undone; the training loop's time says what they gain),
  # then stop 30's kept cuDNN descriptors and kept shape uploads (on by default,
  # so in step 2's figures) both undone, then stop 29's stacked q, k, v projections switched back
  # to the reference's three, to say what each is worth.
  if [ "${DIFFUSION_UPLOAD:-}" = pageable ]; then
    echo "the host's draws already go through pageable copies (the self-test's fallback): no A/B of them"
  else
    DIFFUSION_UPLOAD=pageable timed "the driver's copies of the host's draws' bench" ab-upload-pageable train128 2 $PRECISIONS
  fi
  # Stop 33's sums into the convolutions' own buffers undone: the peak memory and time beside step 2's.
  if [ "${UNET_INPLACE_SUMS:-}" = 0 ]; then
    echo "the sums already go through candle's add (the self-test's fallback): no A/B of them"
  else
    UNET_INPLACE_SUMS=0 timed "the sums through candle's add's bench" ab-inplace-sums-off train128 2 $PRECISIONS
  fi
  # Stop 34's release of saved values during the backward pass undone: the peak memory beside step 2's.
  if [ "${UNET_RELEASE_SAVED:-}" = 0 ]; then
    echo "the saved values are already kept (the self-test's fallback): no A/B of them"
  else
    UNET_RELEASE_SAVED=0 timed "the saved values kept to the end's bench" ab-release-saved-off train128 2 $PRECISIONS
  fi
  UNET_CUDNN_PREPARED=0 UNET_CUDA_PARAMS=candle timed "the per-call cuDNN descriptors' and uploads' bench" ab-stop30-undone train128 2 $PRECISIONS
  UNET_FUSED_QKV=0 timed "the separate q, k, v projections' bench" ab-unet_fused_qkv-0 train128,forward128 2 $PRECISIONS
fi
}

want 4 && {
step "4. a real training run on anime-faces-mini ($TRAIN_MINUTES min), then a 16x16 grid; first 20 steps of bf16 training"
if [ "$DEVICE" != cpu ]; then
  RUN_BF=$(mktemp -d)/mini-bf16
  timeout "$(cap 120 $((RESERVE4 - 40)))" "$BIN" train --config "$CONFIG" --data "$KIT/mini" --run "$RUN_BF" --device "$DEVICE" --precision bf16 \
    --max-steps 20 --batch-size "$BATCH" --sample-every 0 --no-progress --set data.test_frac=0.0 || echo "bf16 train failed"
  cp "$RUN_BF/metrics.jsonl" "$OUT/metrics-bf16.jsonl" 2>/dev/null
fi
RUN=$(mktemp -d)/mini
# TRAIN_MINUTES, or less when the deadline is nearer (keeping ~90 s for start-up, the last
# checkpoint and the grid).
TM=$(awk "BEGIN{m = $TRAIN_MINUTES; l = ($(left) - 90) / 60; f = m < 0.2 ? m : 0.2; if (l < m) m = l; if (m < f) m = f; if (m < 0.01) m = 0.01; printf \"%.2f\", m}")
echo "training for $TM minutes"
timeout "$(awk "BEGIN{print int($TM * 60 + 60)}")" "$BIN" train --config "$CONFIG" --data "$KIT/mini" --run "$RUN" --device "$DEVICE" \
  --max-minutes "$TM" --batch-size "$BATCH" --sample-every 0 --no-progress --set data.test_frac=0.0 || echo "train failed"
cp "$RUN/metrics.jsonl" "$RUN/loss.png" "$OUT/" 2>/dev/null
timeout "$(cap 180)" "$BIN" sample --checkpoint "$RUN" --device "$DEVICE" --grid "$GRID" --sampler ddim --steps 50 \
  --out "$OUT/gen" || echo "sample failed"
# Plain names only come back ('=' in the sampler's file name would not).
for f in "$OUT"/gen/*.png; do [ -f "$f" ] && mv "$f" "$OUT/sample-grid-ddim50.png"; done
rmdir "$OUT/gen" 2>/dev/null
}

want 6 && {
step "6. our training step's host side: a CPU profile (perf, sampling the timed runs only), each precision (and with the graph API when step 7 passed)"
PERF_TGZ=$KIT/perf.tgz
if [ -f "$PERF_TGZ" ] && PD=$(mktemp -d) && tar xzf "$PERF_TGZ" -C "$PD"; then
  # The kit's perf with its own libraries and loader: the GPU machine may have neither.
  PERF=("$PD/perf/ld-linux-x86-64.so.2" --library-path "$PD/perf/lib" "$PD/perf/perf")
  P6_CASE=$([ "$DEVICE" = cpu ] && echo reduced-train || echo train128)
  # Each precision as the defaults run it; then, when step 7 passed, each with the graph API.
  P6_RUNS=""
  for p in $PRECISIONS; do P6_RUNS="$P6_RUNS $p"; done
  [ "${GRAPH_OK:-0}" = 1 ] && for p in $PRECISIONS; do P6_RUNS="$P6_RUNS $p-graph"; done
  for tag in $P6_RUNS; do
    p=${tag%-graph}
    api=$([ "$tag" = "$p" ] && echo legacy || echo graph)
    room 40 "$RESERVE4" "the host profile, $tag" || continue
    CTL=$PD/ctl-$tag; mkfifo "$CTL"
    # cpu-clock: a software event, which VMs without hardware counters have. -D -1: sampling
    # starts disabled; the bench enables it around its timed runs (XTASK_PERF_CTL).
    UNET_CUDNN_API=$api XTASK_PERF_CTL=$CTL timeout "$(cap 120 "$RESERVE4")" "${PERF[@]}" record -e cpu-clock -F 4999 -D -1 --control "fifo:$CTL" -o "$OUT/perf-$P6_CASE-$tag.data" -- \
      "$BIN" bench --device "$DEVICE" --precision "$p" --cases "$P6_CASE" --runs 10 --warmup 2 --threads "$THREADS" --python none \
      --out "$OUT/perf-bench-$P6_CASE-$tag.json" || echo "host profile $tag failed (perf_event_open refused in this machine?)"
    # By library here (the binary is stripped; its symbols are read where it was built).
    "${PERF[@]}" report -i "$OUT/perf-$P6_CASE-$tag.data" --stdio --sort dso 2>/dev/null | grep -v '^#' | grep . | head -15
    "${PERF[@]}" report -i "$OUT/perf-$P6_CASE-$tag.data" --stdio --sort dso,sym 2>/dev/null | grep -v '^#' | grep . | head -40 > "$OUT/perf-$P6_CASE-$tag-top.txt"
    head -25 "$OUT/perf-$P6_CASE-$tag-top.txt"
  done
else
  echo "no perf in the kit ($PERF_TGZ): step 6 skipped"
fi
}

want 5 && {
step "5. PyTorch with torch.compile (train128, then ddim50x256), each precision"
for p in $PRECISIONS; do
  for c in train128 ddim50x256; do
    room 60 0 "torch.compile $c $p" || continue
    timeout "$(cap 240)" $PY scripts/bench_torch.py --case "$c" --device "$DEVICE" --precision "$p" --ref-dir "$KIT/bench" \
      --runs "$RUNS" --warmup "$WARMUP" --compile | tee "$OUT/torch-compile-$c-$p.json" || echo "torch.compile $c $p failed"
  done
done
}
step "done"
