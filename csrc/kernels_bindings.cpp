// Launchers for csrc/kernels, bound into unimlm_engine._C. Without CUDA this binds nothing.
#include "bindings.h"

namespace unimlm {
void bind_kernels(pybind11::module_& m) { (void)m; }
}  // namespace unimlm
