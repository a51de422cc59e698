#!/usr/bin/env bash
# gpu_suite.sh: the project's one-command GPU check (issue 12), for an H100/H200 machine with torch
# (CUDA build), Triton, nvcc, cmake, ninja, pybind11 and transformers, no internet, no TensorRT.
#
#   bash benchmarks/gpu_suite.sh                     # on the GPU machine, from any directory
#   GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh     # the same control flow on a CPU (CI runs this)
#
# STATUS: first GPU run 2026-11-28 on an H200 (benchmarks/RESULTS.md, "GPU suite, first run"): build,
# check, ceilings, kernels, step and sanitize ran OK; pytest timed out and e2e failed. The fixes made
# after that run (pytest limit and compile-only tests left out; e2e memory and vocabulary) have only
# run dry on a CPU.
#
# Every step has its own time limit (the smaller of its maximum and what the budget has left),
# carries on after a failure and is skipped when the budget cannot fit its minimum. Steps
# (maximum seconds; [bg] = in the background, overlapping the next steps):
#   build         200  pip install --no-index --no-build-isolation --no-deps -e . with UNIMLM_CUDA=ON,
#                      CUDACXX=nvcc, then `gpu_suite.py --mode probe --require-cuda-build` (dry: probe only)
#   msda-classic  240  [bg] JIT build of the classic one-thread-per-output MSDA baseline (dry: skipped)
#   pytest        240  [bg] kernel test files, -m "not slow", TRITON_INTERPRET=0, junit XML
#                      (dry: tests/test_kv_cache.py under the interpreter); GPU_SUITE_PYTEST_MAX
#                      (150 s was too short on an H200 beside the check step, 2026-11-28)
#   check         170  every kernel in bf16 vs fp32 references, NaN-poisoned outputs and cache pages (110 s on
#                      the H200 2026-11-28, mostly Triton compiles; since then the layer ops and the LoRA-MoE
#                      cuBLAS base add ~20 compiles)
#   ceilings       40  D2D copy GB/s and bf16 GEMM TFLOP/s (benchmarks/common.py)
#   kernels       150  the kernel benchmarks at DESIGN.md section 6 shapes; MSDA dispatch table
#   step           90  4 Vicuna-7B layers, bf16, batch 1/16/64: eager vs CUDA graph, +/- LoRA-MoE, vs floor,
#                      and `unfused` (separate projections, eager small ops) beside the served path
#   sanitize       90  compute-sanitizer memcheck on tiny launches of every kernel (skipped without it;
#                      dry: the launches run plain)
#   e2e           150  bench_e2e.py --device cuda, text workload, 16 requests (dry: tiny, CPU)
#   train         120  training/train_shapes.py --device cuda: 20 vision-only, 20 VQA-only and 20 joint steps
#                      of the shapes model from scratch with the shipped recipe's mix and attention targets
#                      (issue 18: "minutes on a GPU"; its `s` per logged step in suite.log); skipped without
#                      scipy (dry: 2 + 2 + 2 small steps on the CPU)
# The Python side is benchmarks/gpu_suite.py (one mode per step). The summary table is printed last.
#
# Files in $OUT (default out/gpu_suite[_dry], git-ignored; the device tool brings back only $OUT),
# at most 8: suite.log summary.txt build.log pytest_cuda.xml results.json sanitizer.log
# bench_e2e.json backend_table.json (the MSDA dispatch table, $UNIMLM_BACKEND_TABLE).
#
# Knobs: GPU_SUITE_BUDGET (seconds, default 470: the suite must end within 8 minutes of device
# time), GPU_SUITE_SKIP / GPU_SUITE_ONLY (comma-separated step names: on a rerun on a warm machine,
# e.g. GPU_SUITE_ONLY=kernels,e2e), PYTHON (default:
# .venv/bin/python when it imports torch, else python3), GPU_SUITE_E2E_ARGS, GPU_SUITE_STEP_LAYERS.
# Exit status: 0 when every step that ran is OK (SKIPs allowed), 1 otherwise.
set -u -o pipefail
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$ROOT" || exit 2
DRIVER="$ROOT/benchmarks/gpu_suite.py"

do_build() {  # runs as `bash gpu_suite.sh __build` under the step's timeout
  if [ "$GPU_SUITE_DRY" = 1 ]; then
    echo "dry run: no build (the CPU module is already installed); probing it" | tee "$OUT/build.log"
    exec "$PY" "$DRIVER" --mode probe
  fi
  echo "pip editable install: UNIMLM_CUDA=$UNIMLM_CUDA CUDACXX=${CUDACXX:-unset}; full log in build.log"
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1
  local rc=$?
  grep -E "unimlm: |CUDA compiler|error:|Error|FAILED|Successfully installed" "$OUT/build.log" | tail -20
  (( rc == 0 )) || { echo "BUILD FAILED (pip rc=$rc): last lines of build.log:"; tail -30 "$OUT/build.log"; }
  "$PY" "$DRIVER" --mode probe --require-cuda-build
  local prc=$?
  (( rc == 0 )) && exit "$prc"
  exit "$rc"
}

if [ "${1:-}" = __build ]; then do_build; fi

DRY=${GPU_SUITE_DRY:-0}
BUDGET=${GPU_SUITE_BUDGET:-470}
RESERVE=8  # seconds kept for the summary
if [ "$DRY" = 1 ]; then OUT=${OUT:-$ROOT/out/gpu_suite_dry}; else OUT=${OUT:-$ROOT/out/gpu_suite}; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/{suite.log,summary.txt,build.log,pytest_cuda.xml,results.json,sanitizer.log,bench_e2e.json} \
  "$OUT"/backend_table.json "$OUT"/*.tmp
RT="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"  # logs that do not come back
START=$(date +%s)
exec > >(tee "$OUT/suite.log") 2>&1
TEE_PID=$!

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PYTHON="$ROOT/.venv/bin/python"
  fi
fi
PY=$PYTHON
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] && export CUDACXX="$NVCC"
export OUT PY GPU_SUITE_DRY="$DRY" PYTHONUNBUFFERED=1 UNIMLM_CUDA=ON
TRITON_INTERPRET=0
[ "$DRY" = 1 ] && TRITON_INTERPRET=1
export TRITON_INTERPRET
export UNIMLM_BACKEND_TABLE="$OUT/backend_table.json"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gpu_suite_triton_cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/gpu_suite_torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
STEPS="$RT/steps.tsv"
: > "$STEPS"

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) - RESERVE )); }
note_step() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$STEPS"; }
tag_of() {
  case $1 in 0) echo OK ;; 124 | 137 | 143) echo TIMEOUT ;; *) echo "FAIL($1)" ;; esac
}
skipped() {
  [[ ",${GPU_SUITE_SKIP:-}," == *",$1,"* ]] && return 0
  [ -n "${GPU_SUITE_ONLY:-}" ] && [[ ",$GPU_SUITE_ONLY," != *",$1,"* ]]
}
skip_step() { echo "=== SKIP $1: $2" >&2; note_step "$1" SKIP 0 - "$2"; }
# limit_for NAME MAX NEED: prints the step's limit, or records a SKIP and fails
limit_for() {
  local rem; rem=$(remaining)
  if skipped "$1"; then skip_step "$1" "GPU_SUITE_SKIP / GPU_SUITE_ONLY"; return 1; fi
  if (( rem < $3 )); then skip_step "$1" "budget: ${rem}s left, needs ${3}s"; return 1; fi
  echo $(( $2 < rem ? $2 : rem ))
}
# run_step NAME MAX NEED [NOTE] -- cmd...: in the foreground, output into the log
run_step() {
  local name=$1 max=$2 need=$3 note="" lim t0 rc; shift 3
  if [ "$1" != -- ]; then note=$1; shift; fi
  shift
  lim=$(limit_for "$name" "$max" "$need") || return 0
  echo; echo "=== STEP $name (limit ${lim}s) at +$(elapsed)s: $*"
  t0=$(date +%s)
  timeout -k 10 "$lim" "$@" < /dev/null
  rc=$?
  note_step "$name" "$(tag_of $rc)" $(( $(date +%s) - t0 )) "$lim" "$note"
  echo "=== END $name: $(tag_of $rc) after $(( $(date +%s) - t0 ))s"
}
# start_bg NAME MAX NEED -- cmd...: in the background, output to $RT/NAME.log; finish_bg joins it
start_bg() {
  local name=$1 max=$2 need=$3 lim; shift 4
  lim=$(limit_for "$name" "$max" "$need") || return 0
  echo; echo "=== STEP $name in the background (limit ${lim}s) at +$(elapsed)s: $*"
  date +%s > "$RT/$name.t0"
  echo "$lim" > "$RT/$name.lim"
  ( timeout -k 10 "$lim" "$@" < /dev/null > "$RT/$name.log" 2>&1 &
    echo $! > "$RT/$name.pid"
    wait $!
    rc=$?
    date +%s > "$RT/$name.t1"
    echo "$rc" > "$RT/$name.rc.tmp" && mv "$RT/$name.rc.tmp" "$RT/$name.rc" ) &
}
# finish_bg NAME [MAX_WAIT]: wait for it (stopping it after MAX_WAIT more seconds), print its log, record it
finish_bg() {
  local name=$1 wait_s=${2:-100000} rc
  [ -f "$RT/$name.t0" ] || return 0
  [ -f "$RT/$name.done" ] && return "$(cat "$RT/$name.done")"
  for (( i = 0; i < wait_s; i++ )); do [ -f "$RT/$name.rc" ] && break; sleep 1; done
  if [ ! -f "$RT/$name.rc" ]; then
    echo "=== $name still running after waiting ${wait_s}s more: stopping it"
    kill -TERM "$(cat "$RT/$name.pid")" 2> /dev/null
    for (( i = 0; i < 20; i++ )); do [ -f "$RT/$name.rc" ] && break; sleep 1; done
  fi
  rc=$(cat "$RT/$name.rc" 2> /dev/null || echo 143)
  echo; echo "----- log of $name"; cat "$RT/$name.log"
  note_step "$name" "$(tag_of "$rc")" $(( $(cat "$RT/$name.t1" 2> /dev/null || date +%s) - $(cat "$RT/$name.t0") )) \
    "$(cat "$RT/$name.lim")"
  echo "=== END $name: $(tag_of "$rc")"
  echo "$rc" > "$RT/$name.done"
  return "$rc"
}

echo "=== gpu_suite $([ "$DRY" = 1 ] && echo "DRY RUN (CPU, TRITON_INTERPRET=1, fp16, tiny shapes)" || echo GPU) at" \
  "$(date -u +%FT%TZ); commit $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo ?); budget ${BUDGET}s;" \
  "python $PY; nvcc ${NVCC:-none}; OUT=$OUT"
command -v nvidia-smi > /dev/null && nvidia-smi --format=csv \
  --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,driver_version

# 1. build (the classic MSDA baseline JIT-builds beside it, on other cores)
if [ "$DRY" = 1 ]; then
  skip_step msda-classic "dry run: the classic baseline needs nvcc and a CUDA build of torch"
else
  start_bg msda-classic 240 60 -- "$PY" -c "import sys; sys.path.insert(0, 'benchmarks/baselines');
from msda_classic import load_classic; load_classic(); print('classic MSDA baseline built')"
fi
run_step build 200 60 -- bash "$SELF" __build

# 2 + 3. the CUDA tests in the background while the driver checks every kernel
PYTEST_FILES=(tests/test_paged_attention.py tests/test_kv_cache.py tests/test_lora_moe.py tests/test_lora_moe_module.py
  tests/test_msda.py tests/test_msda_cuda_build.py tests/test_cuda_graphs.py)
[ "$DRY" = 1 ] && PYTEST_FILES=(tests/test_kv_cache.py)
PYTEST_ARGS=(-p no:cacheprovider -q -rfEs -m "not slow" --junitxml="$OUT/pytest_cuda.xml")
# the nvcc compile-only tests (msda.cu for sm_80 + sm_90a; the host harness) cost a minute or more of CPU and
# use no GPU: the build step compiles the same file and the CPU suite runs them; on the H200 (2026-11-28)
# the step reached them after ~150 s and timed out
[ "$DRY" = 1 ] || PYTEST_ARGS+=(-k "not test_msda_cu_compiles_for_sm80_and_sm90a and not test_cuda_thread_body_on_host")
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_ARGS+=(--timeout=120)
start_bg pytest "${GPU_SUITE_PYTEST_MAX:-240}" 30 -- "$PY" -m pytest "${PYTEST_ARGS[@]}" "${PYTEST_FILES[@]}"
run_step check 170 30 -- "$PY" "$DRIVER" --mode check
finish_bg pytest

# 4 + 5. ceilings, then the kernel benchmarks (classic MSDA column when its build finished)
run_step ceilings 40 10 -- "$PY" "$DRIVER" --mode ceilings
KERNEL_ARGS=()
if [ "$DRY" != 1 ] && finish_bg msda-classic 30 && grep -qs "classic MSDA baseline built" "$RT/msda-classic.log"; then
  KERNEL_ARGS=(--classic)
fi
run_step kernels 150 40 -- "$PY" "$DRIVER" --mode kernels "${KERNEL_ARGS[@]}"

# 6. the 7B-shaped decode step
STEP_NOTE=""
[ "$DRY" = 1 ] && STEP_NOTE="CUDA graph capture skipped: dry run (capture needs a GPU)"
run_step step 90 30 "$STEP_NOTE" -- "$PY" "$DRIVER" --mode step

# 7. compute-sanitizer memcheck
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || true)
if [ "$DRY" = 1 ]; then
  echo "compute-sanitizer skipped: dry run (no GPU)" > "$OUT/sanitizer.log"
  run_step sanitize 60 10 "compute-sanitizer skipped: dry run (no GPU)" -- "$PY" "$DRIVER" --mode sanitize
elif [ -z "$CS" ]; then
  skip_step sanitize "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
else
  run_step sanitize 90 30 -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool memcheck --error-exitcode 9 \
    --print-limit 20 --log-file "$OUT/sanitizer.log" "$PY" "$DRIVER" --mode sanitize
  grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/sanitizer.log" 2> /dev/null | head -20
fi

# 8. end to end
run_step e2e 150 60 -- "$PY" "$DRIVER" --mode e2e

# 9. the shapes model's training on the GPU: seconds a step (the checkpoint goes to $RT, not $OUT)
TRAIN_DEV=cuda
TRAIN_ARGS=(--vit-steps 20 --vqa-steps 20 --vqa-phase-turns 3 --steps 20 --log-every 5 --vqa-turns 3
  --mix vqa=16,det=2,seg=2,pose=5,det_text=3,seg_text=2,pose_text=3 --attn-sup 5 --attn-key-layer 0)
if [ "$DRY" = 1 ]; then
  TRAIN_DEV=cpu
  TRAIN_ARGS=(--vit-steps 2 --vqa-steps 2 --steps 2 --log-every 1 --mix vqa=2,det=1,seg=1,pose=1 --attn-sup 5
    --attn-key-layer 0)
fi
if ! "$PY" -c "import scipy" 2> /dev/null; then
  skip_step train "scipy not installed (training/train_shapes.py's Hungarian matching)"
else
  run_step train 120 45 -- "$PY" training/train_shapes.py --device "$TRAIN_DEV" --out "$RT/train" "${TRAIN_ARGS[@]}"
fi

# summary: printed last; at most 8 files in $OUT
finish_bg msda-classic 0 || true
rm -f "$OUT"/*.tmp
if (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 7 )); then
  echo "WARNING: more than 8 files in $OUT with summary.txt: the device tool brings back only 8"
fi
echo
"$PY" "$DRIVER" --mode report --steps "$STEPS" --budget "$BUDGET" || {
  echo "==== gpu_suite summary (report mode failed: raw step table) ===="
  tee "$OUT/summary.txt" < "$STEPS"
}
RC=0
cut -f2 "$STEPS" | grep -qE "^(FAIL|TIMEOUT)" && RC=1
exec 1>&- 2>&-
wait "$TEE_PID" 2> /dev/null || sleep 1
rm -rf "$RT"
exit "$RC"
