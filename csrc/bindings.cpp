// The one pybind11 module, unimlm_engine._C. Each area registers its own bindings.
#include <pybind11/pybind11.h>

#include "bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "unimlm-engine C++ runtime";
#ifdef UNIMLM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  unimlm::bind_runtime(m);
  unimlm::bind_kernels(m);
}
