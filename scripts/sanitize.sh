#!/usr/bin/env bash
# Builds the C++ tests (runtime and CPU kernels; ctest executables only, not the Python module) with
# AddressSanitizer + UndefinedBehaviorSanitizer in a separate build dir and runs them.
# Usage: scripts/sanitize.sh [build_dir]   (default: build/sanitize, git-ignored)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build/sanitize}"
# The project venv (make install) provides cmake, ninja and pybind11.
if [ -d "$ROOT/.venv/bin" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
# CMake needs pybind11 even for the tests: take it from the project venv when there is one.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pybind11 --cmakedir >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "sanitize.sh: no Python with pybind11 found (set PYTHON=...)" >&2; exit 1; }
PYBIND11_DIR="$("$PY" -m pybind11 --cmakedir)"
PY="$(command -v "$PY")"
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)

cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DUNIMLM_SANITIZE=ON -DUNIMLM_CUDA=OFF -DUNIMLM_BUILD_TESTS=ON \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$PY"

TESTS=()
for src in "$ROOT"/csrc/tests/*.cpp; do TESTS+=("$(basename "${src%.cpp}")"); done
cmake --build "$BUILD" --target "${TESTS[@]}" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$BUILD" --output-on-failure
