// pybind11 bindings of kvpo_kernels._C. The kernels in csrc/cpu and csrc/cuda know nothing of torch or Python:
// this file turns integer pointers (tensor.data_ptr()) and the current CUDA stream (an integer handle passed from
// Python) into calls of them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "velocity_energy.h"

namespace py = pybind11;

namespace {

// velocity_energy: strides = (pred_sb, pred_st, target_sb, target_st, weight_sb, weight_st) in elements.
kvpo::VelocityEnergyArgs velocity_energy_args(std::uintptr_t pred, std::uintptr_t target, std::uintptr_t weight,
                                              int64_t batch, int64_t steps, int64_t n,
                                              const std::array<int64_t, 6>& strides, int dtype, bool mean) {
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("velocity_energy: unknown dtype code");
  return kvpo::VelocityEnergyArgs{reinterpret_cast<const void*>(pred), reinterpret_cast<const void*>(target),
                                  reinterpret_cast<const void*>(weight), batch, steps, n, strides[0], strides[1],
                                  strides[2], strides[3], strides[4], strides[5], static_cast<kvpo::DType>(dtype),
                                  mean};
}

void bind_velocity_energy(py::module_& m) {
  using Strides = std::array<int64_t, 6>;
  m.def(
      "velocity_energy_forward_cpu",
      [](std::uintptr_t energy, std::uintptr_t pred, std::uintptr_t target, std::uintptr_t weight, int64_t batch,
         int64_t steps, int64_t n, const Strides& strides, int dtype, bool mean, int num_threads) {
        kvpo::velocity_energy_forward_cpu(
            velocity_energy_args(pred, target, weight, batch, steps, n, strides, dtype, mean),
            reinterpret_cast<void*>(energy), num_threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "velocity_energy_backward_cpu",
      [](std::uintptr_t grad_pred, std::uintptr_t grad_target, std::uintptr_t grad_e, int64_t g_sb, int64_t g_st,
         std::uintptr_t pred, std::uintptr_t target, std::uintptr_t weight, int64_t batch, int64_t steps, int64_t n,
         const Strides& strides, int dtype, bool mean, int num_threads) {
        kvpo::velocity_energy_backward_cpu(
            velocity_energy_args(pred, target, weight, batch, steps, n, strides, dtype, mean),
            reinterpret_cast<const void*>(grad_e), g_sb, g_st, reinterpret_cast<void*>(grad_pred),
            reinterpret_cast<void*>(grad_target), num_threads);
      },
      py::call_guard<py::gil_scoped_release>());
#ifdef KVPO_WITH_CUDA
  m.def(
      "velocity_energy_forward_cuda",
      [](std::uintptr_t energy, std::uintptr_t partials, int64_t splits, int64_t chunk, std::uintptr_t pred,
         std::uintptr_t target, std::uintptr_t weight, int64_t batch, int64_t steps, int64_t n, const Strides& strides,
         int dtype, bool mean, std::uintptr_t stream) {
        kvpo::velocity_energy_forward_cuda(
            velocity_energy_args(pred, target, weight, batch, steps, n, strides, dtype, mean),
            reinterpret_cast<void*>(energy), reinterpret_cast<float*>(partials), splits, chunk, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "velocity_energy_backward_cuda",
      [](std::uintptr_t grad_pred, std::uintptr_t grad_target, std::uintptr_t grad_e, int64_t g_sb, int64_t g_st,
         int64_t chunk, std::uintptr_t pred, std::uintptr_t target, std::uintptr_t weight, int64_t batch,
         int64_t steps, int64_t n, const Strides& strides, int dtype, bool mean, std::uintptr_t stream) {
        kvpo::velocity_energy_backward_cuda(
            velocity_energy_args(pred, target, weight, batch, steps, n, strides, dtype, mean),
            reinterpret_cast<const void*>(grad_e), g_sb, g_st, reinterpret_cast<void*>(grad_pred),
            reinterpret_cast<void*>(grad_target), chunk, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("velocity_energy_cuda_blocks_per_sm",
        [](int dtype) { return kvpo::velocity_energy_cuda_blocks_per_sm(static_cast<kvpo::DType>(dtype)); });
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvpo_kernels native kernels (C++ CPU always, CUDA when built with nvcc)";
#ifdef KVPO_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  bind_velocity_energy(m);
}
