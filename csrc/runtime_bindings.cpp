// Python bindings of the runtime core (csrc/runtime).
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "runtime/block_allocator.h"

namespace py = pybind11;

namespace unimlm {
void bind_runtime(py::module_& m) {
  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int32_t>(), py::arg("num_blocks"))
      .def("allocate", &BlockAllocator::allocate)
      .def("retain", &BlockAllocator::retain, py::arg("block"))
      .def("release", &BlockAllocator::release, py::arg("block"))
      .def("refcount", &BlockAllocator::refcount, py::arg("block"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("num_free", &BlockAllocator::num_free);
}
}  // namespace unimlm
