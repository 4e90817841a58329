// pybind11 bindings of kvpo_kernels._C. The kernels in csrc/cpu and csrc/cuda know nothing of torch or Python:
// this file turns integer pointers (tensor.data_ptr()) and the current CUDA stream (an integer handle passed from
// Python) into calls of them.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvpo_kernels native kernels (C++ CPU always, CUDA when built with nvcc)";
#ifdef KVPO_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
