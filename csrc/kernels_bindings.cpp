// Launchers for csrc/kernels, bound into unimlm_engine._C: the CPU kernels always, the CUDA ones in CUDA
// builds.
//
// The launchers are C-ABI functions in csrc/kernels/*.cu taking pointers and the stream as
// integers, so this file needs no CUDA headers. Pointer-level errors (a kernel launch that
// fails) come back as the cudaError_t value and are raised here as RuntimeError.
#include "bindings.h"

#include <cstdint>

#include "kernels/msda_cpu.h"

#ifdef UNIMLM_WITH_CUDA
#include <stdexcept>
#include <string>

extern "C" int unimlm_msda_forward(uint64_t value_ptr, uint64_t shapes_ptr, uint64_t level_start_ptr,
                                   uint64_t loc_ptr, uint64_t attn_ptr, uint64_t out_ptr, int64_t n, int64_t s,
                                   int64_t m, int64_t d, int64_t levels, int64_t lq, int64_t points, int dtype,
                                   int loc_dtype, uint64_t stream, int fused_softmax);
extern "C" const char* unimlm_cuda_error_string(int code);
#endif

namespace unimlm {
namespace {

// Pointers come from torch tensors the caller made contiguous fp32 (int64 for shapes / starts);
// unimlm_engine/ops/msda.py checks every shape before the call.
void msda_cpu_forward_py(uint64_t value, uint64_t shapes, uint64_t starts, uint64_t loc, uint64_t weights,
                         uint64_t out, int64_t n, int64_t s, int64_t m, int64_t d, int64_t levels, int64_t lq,
                         int64_t points, int threads) {
  pybind11::gil_scoped_release release;
  msda_cpu_forward(reinterpret_cast<const float*>(value), reinterpret_cast<const int64_t*>(shapes),
                   reinterpret_cast<const int64_t*>(starts), reinterpret_cast<const float*>(loc),
                   reinterpret_cast<const float*>(weights), reinterpret_cast<float*>(out),
                   MsdaCpuDims{n, s, m, d, levels, lq, points}, threads);
}

void msda_cpu_backward_py(uint64_t value, uint64_t shapes, uint64_t starts, uint64_t loc, uint64_t weights,
                          uint64_t grad_out, uint64_t grad_value, uint64_t grad_loc, uint64_t grad_weights,
                          int64_t n, int64_t s, int64_t m, int64_t d, int64_t levels, int64_t lq, int64_t points,
                          int threads) {
  pybind11::gil_scoped_release release;
  msda_cpu_backward(reinterpret_cast<const float*>(value), reinterpret_cast<const int64_t*>(shapes),
                    reinterpret_cast<const int64_t*>(starts), reinterpret_cast<const float*>(loc),
                    reinterpret_cast<const float*>(weights), reinterpret_cast<const float*>(grad_out),
                    reinterpret_cast<float*>(grad_value), reinterpret_cast<float*>(grad_loc),
                    reinterpret_cast<float*>(grad_weights), MsdaCpuDims{n, s, m, d, levels, lq, points}, threads);
}

}  // namespace

#ifdef UNIMLM_WITH_CUDA
namespace {

// value [N, S, M, D], locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P] -> out [N, Lq, M, D].
// dtype / loc_dtype: 0 float32, 1 float16, 2 bfloat16; loc_dtype -1 means "same as dtype".
void msda_forward(uint64_t value_ptr, uint64_t shapes_ptr, uint64_t level_start_ptr, uint64_t loc_ptr,
                  uint64_t attn_ptr, uint64_t out_ptr, int64_t n, int64_t s, int64_t m, int64_t d, int64_t levels,
                  int64_t lq, int64_t points, int dtype, uint64_t stream, bool fused_softmax, int loc_dtype) {
  if (loc_dtype < 0) loc_dtype = dtype;
  int err = 0;
  {
    pybind11::gil_scoped_release release;
    err = unimlm_msda_forward(value_ptr, shapes_ptr, level_start_ptr, loc_ptr, attn_ptr, out_ptr, n, s, m, d,
                              levels, lq, points, dtype, loc_dtype, stream, fused_softmax ? 1 : 0);
  }
  if (err != 0) {
    throw std::runtime_error(std::string("msda_forward: ") + unimlm_cuda_error_string(err) + " (dtype " +
                             std::to_string(dtype) + ", loc_dtype " + std::to_string(loc_dtype) + ")");
  }
}

}  // namespace
#endif

void bind_kernels(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("msda_cpu_forward", &msda_cpu_forward_py,
        "Multi-scale deformable attention forward on the CPU, fp32 (csrc/kernels/msda_cpu.h)", py::arg("value_ptr"),
        py::arg("shapes_ptr"), py::arg("level_start_ptr"), py::arg("loc_ptr"), py::arg("attn_ptr"),
        py::arg("out_ptr"), py::arg("N"), py::arg("S"), py::arg("M"), py::arg("D"), py::arg("L"), py::arg("Lq"),
        py::arg("P"), py::arg("threads"));
  m.def("msda_cpu_backward", &msda_cpu_backward_py,
        "Multi-scale deformable attention backward on the CPU, fp32; grad_value must be zeroed "
        "(csrc/kernels/msda_cpu.h)", py::arg("value_ptr"), py::arg("shapes_ptr"), py::arg("level_start_ptr"),
        py::arg("loc_ptr"), py::arg("attn_ptr"), py::arg("grad_out_ptr"), py::arg("grad_value_ptr"),
        py::arg("grad_loc_ptr"), py::arg("grad_attn_ptr"), py::arg("N"), py::arg("S"), py::arg("M"), py::arg("D"),
        py::arg("L"), py::arg("Lq"), py::arg("P"), py::arg("threads"));
#ifdef UNIMLM_WITH_CUDA
  m.def("msda_forward", &msda_forward, "Multi-scale deformable attention forward (csrc/kernels/msda.cuh)",
        py::arg("value_ptr"), py::arg("shapes_ptr"), py::arg("level_start_ptr"), py::arg("loc_ptr"),
        py::arg("attn_ptr"), py::arg("out_ptr"), py::arg("N"), py::arg("S"), py::arg("M"), py::arg("D"),
        py::arg("L"), py::arg("Lq"), py::arg("P"), py::arg("dtype"), py::arg("stream"),
        py::arg("fused_softmax") = false, py::arg("loc_dtype") = -1);
#endif
}

}  // namespace unimlm
