// velocity_energy kernels: torch-free declarations shared by csrc/cpu, csrc/cuda and csrc/bindings.cpp.
//
//   E[b, t] = weight[b, t] * reduce_j (pred[b, t, j] - target[b, t, j])^2,   reduce = mean | sum over j in [0, n)
//
// Layout: element (b, t, j) of pred lives at pred + b * pred_sb + t * pred_st + j (strides in elements; the trailing
// dims are contiguous, the Python launcher copies them otherwise). weight (optional, nullptr = 1) is in the
// accumulation type (float, or double for double inputs) at weight + b * w_sb + t * w_st (w_sb = 0 for a [T]
// weight); grad_e likewise. E is written contiguously as [B, T] in the accumulation type. Gradients are written
// contiguously as [B, T, n] in the inputs' dtype; a nullptr gradient is not computed.
//
// Numerics: differences and squares in fp32 (fp64 for double inputs), fixed partition of every row into chunks
// and a fixed summation order, so the same inputs give bitwise the same E on every call.
#pragma once

#include <cstdint>

namespace kvpo {

// Element types, the codes passed from Python.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

struct VelocityEnergyArgs {
  const void* pred;
  const void* target;
  const void* weight;  // nullptr: no weight
  int64_t batch, steps, n;
  int64_t pred_sb, pred_st, target_sb, target_st, w_sb, w_st;
  DType dtype;
  bool mean;
};

// CPU (csrc/cpu/velocity_energy.cpp): std::thread workers, results independent of num_threads.
void velocity_energy_forward_cpu(const VelocityEnergyArgs& args, void* energy, int num_threads);
void velocity_energy_backward_cpu(const VelocityEnergyArgs& args, const void* grad_e, int64_t g_sb, int64_t g_st,
                                  void* grad_pred, void* grad_target, int num_threads);

// CUDA (csrc/cuda/velocity_energy.cu), stream = cudaStream_t as an integer. Forward splits every row into `splits`
// chunks of `chunk` elements (chunk a multiple of 64); with splits > 1, `partials` is a float buffer of
// batch * steps * splits entries that a second, deterministic pass reduces. fp32/bf16/fp16 only.
void velocity_energy_forward_cuda(const VelocityEnergyArgs& args, void* energy, float* partials, int64_t splits,
                                  int64_t chunk, std::uintptr_t stream);
void velocity_energy_backward_cuda(const VelocityEnergyArgs& args, const void* grad_e, int64_t g_sb, int64_t g_st,
                                   void* grad_pred, void* grad_target, int64_t chunk, std::uintptr_t stream);
// Forward blocks of one SM that run at once on the current device (the launcher sizes `splits` to one wave).
int velocity_energy_cuda_blocks_per_sm(DType dtype);

}  // namespace kvpo
