#pragma once
#include <pybind11/pybind11.h>

namespace unimlm {
// csrc/runtime_bindings.cpp: block manager, scheduler, decoder batcher, request queue.
void bind_runtime(pybind11::module_& m);
// csrc/kernels_bindings.cpp: thin launchers over csrc/kernels (the CPU kernels always, CUDA in CUDA builds).
void bind_kernels(pybind11::module_& m);
}  // namespace unimlm
