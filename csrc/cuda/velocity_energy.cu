// velocity_energy on CUDA: raw pointers, the caller's stream, no torch.
//
// Forward: every (b, t) row is split over `splits` blocks; each block streams its chunk with 16-byte vector loads
// (4 fp32 or 8 bf16/fp16 per load, kUnroll loads in flight per input per thread), accumulates in fp32, reduces
// in a fixed tree (warp shuffles, then one warp over the warp sums) and writes one fp32 partial. A second kernel
// (one warp per row) adds a row's partials in a fixed order and applies weight and 1/n. No atomics: the result
// depends only on the shape and the chunk size, never on scheduling. With splits == 1 the first kernel writes E.
//
// Alignment: a row is read with vector loads when pred and target (and, backward, both gradients) sit at the same
// offset modulo 16 bytes; the few elements before the first 16-byte boundary (the "head") and after the last full
// vector are read one by one. Rows with different offsets take the scalar path.
//
// Backward: one fused elementwise pass, dpred = s (p - t), dtarget = -dpred with s = grad_E * w * 2 / n (or 2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "velocity_energy.h"

namespace kvpo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;

template <class T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <class T>
__host__ __device__ constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

// Sum of squared differences of the vec_elems<T>() elements of two 16-byte vectors, in element order.
template <class T>
__device__ __forceinline__ float vec_sq_diff(const uint4& x, const uint4& y) {
  const T* a = reinterpret_cast<const T*>(&x);
  const T* b = reinterpret_cast<const T*>(&y);
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < vec_elems<T>(); ++k) {
    const float d = Elem<T>::to_float(a[k]) - Elem<T>::to_float(b[k]);
    acc = fmaf(d, d, acc);
  }
  return acc;
}

// Elements before the first 16-byte boundary when both addresses share that boundary, else -1 (scalar path).
template <class T>
__device__ __forceinline__ int64_t shared_head(const void* a, const void* b, const void* c, const void* d) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(a) & 15u;
  const void* others[3] = {b, c, d};
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (others[k] != nullptr && (reinterpret_cast<uintptr_t>(others[k]) & 15u) != offset) return -1;
  }
  if (offset % sizeof(T) != 0) return -1;
  return static_cast<int64_t>(((16u - offset) & 15u) / sizeof(T));
}

// Deterministic block sum: warp butterflies, then warp 0 over the kWarps warp sums. Valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = 0.f;
  if (warp == 0) {
    value = lane < kWarps ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

__device__ __forceinline__ float row_weight(const VelocityEnergyArgs& a, int64_t b, int64_t t) {
  return a.weight != nullptr ? static_cast<const float*>(a.weight)[b * a.w_sb + t * a.w_st] : 1.f;
}

// Grid: rows * splits blocks, block (row, split) = blockIdx.x. FINAL (splits == 1): write E[row], else the partial.
template <class T, bool FINAL>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(VelocityEnergyArgs a, float* __restrict__ out, int64_t splits, int64_t chunk, float scale) {
  constexpr int V = vec_elems<T>();
  const int64_t row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int64_t b = row / a.steps, t = row % a.steps;
  const T* p = static_cast<const T*>(a.pred) + b * a.pred_sb + t * a.pred_st;
  const T* q = static_cast<const T*>(a.target) + b * a.target_sb + t * a.target_st;
  const int64_t n = a.n;
  int64_t head = shared_head<T>(p, q, nullptr, nullptr);
  const bool vectorised = head >= 0;
  head = vectorised ? (head < n ? head : n) : 0;

  float acc = 0.f;
  if (split == 0) {
    for (int64_t j = threadIdx.x; j < head; j += kThreads) {
      const float d = Elem<T>::to_float(p[j]) - Elem<T>::to_float(q[j]);
      acc = fmaf(d, d, acc);
    }
  }
  const int64_t begin = head + split * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  int64_t scalar_from = begin;
  if (vectorised && begin < end) {
    const int64_t nvec = (end - begin) / V;
    const uint4* pv = reinterpret_cast<const uint4*>(p + begin);
    const uint4* qv = reinterpret_cast<const uint4*>(q + begin);
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * kThreads < nvec; i += kUnroll * kThreads) {
      uint4 x[kUnroll], y[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        x[u] = __ldcs(pv + i + u * kThreads);
        y[u] = __ldcs(qv + i + u * kThreads);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc += vec_sq_diff<T>(x[u], y[u]);
    }
    for (; i < nvec; i += kThreads) acc += vec_sq_diff<T>(__ldcs(pv + i), __ldcs(qv + i));
    scalar_from = begin + nvec * V;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < end; j += kThreads) {
    const float d = Elem<T>::to_float(p[j]) - Elem<T>::to_float(q[j]);
    acc = fmaf(d, d, acc);
  }

  const float sum = block_sum(acc);
  if (threadIdx.x == 0) {
    if (FINAL) {
      out[row] = row_weight(a, b, t) * (sum * scale);
    } else {
      out[row * splits + split] = sum;
    }
  }
}

// One warp per row: lane k adds partials k, k + 32, ... in order, then a butterfly over the lanes.
__global__ void __launch_bounds__(kThreads)
    combine_kernel(VelocityEnergyArgs a, const float* __restrict__ partials, int64_t splits, float* __restrict__ energy,
                   float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.batch * a.steps) return;  // whole warps leave together, so the shuffles below stay full-warp
  float value = 0.f;
  for (int64_t k = lane; k < splits; k += 32) value += partials[row * splits + k];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) energy[row] = row_weight(a, row / a.steps, row % a.steps) * (value * scale);
}

template <class T>
__device__ __forceinline__ void grad_scalar(const T* p, const T* q, T* gp, T* gq, int64_t j, float s) {
  const float v = s * (Elem<T>::to_float(p[j]) - Elem<T>::to_float(q[j]));
  if (gp != nullptr) gp[j] = Elem<T>::from_float(v);
  if (gq != nullptr) gq[j] = Elem<T>::from_float(-v);
}

// Grid: rows * chunks blocks, block (row, c) = blockIdx.x writes elements [head + c * chunk, ...) of the row.
template <class T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(VelocityEnergyArgs a, const float* __restrict__ grad_e, int64_t g_sb, int64_t g_st,
                    T* __restrict__ grad_pred, T* __restrict__ grad_target, int64_t chunks, int64_t chunk,
                    float two_over_n) {
  constexpr int V = vec_elems<T>();
  const int64_t row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t b = row / a.steps, t = row % a.steps;
  const int64_t n = a.n;
  const T* p = static_cast<const T*>(a.pred) + b * a.pred_sb + t * a.pred_st;
  const T* q = static_cast<const T*>(a.target) + b * a.target_sb + t * a.target_st;
  T* gp = grad_pred != nullptr ? grad_pred + row * n : nullptr;
  T* gq = grad_target != nullptr ? grad_target + row * n : nullptr;
  const float s = grad_e[b * g_sb + t * g_st] * row_weight(a, b, t) * two_over_n;
  int64_t head = shared_head<T>(p, q, gp, gq);
  const bool vectorised = head >= 0;
  head = vectorised ? (head < n ? head : n) : 0;

  if (c == 0) {
    for (int64_t j = threadIdx.x; j < head; j += kThreads) grad_scalar(p, q, gp, gq, j, s);
  }
  const int64_t begin = head + c * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  int64_t scalar_from = begin;
  if (vectorised && begin < end) {
    const int64_t nvec = (end - begin) / V;
    const uint4* pv = reinterpret_cast<const uint4*>(p + begin);
    const uint4* qv = reinterpret_cast<const uint4*>(q + begin);
    uint4* gpv = gp != nullptr ? reinterpret_cast<uint4*>(gp + begin) : nullptr;
    uint4* gqv = gq != nullptr ? reinterpret_cast<uint4*>(gq + begin) : nullptr;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const uint4 x = __ldcs(pv + i), y = __ldcs(qv + i);
      const T* xe = reinterpret_cast<const T*>(&x);
      const T* ye = reinterpret_cast<const T*>(&y);
      uint4 dp, dq;
      T* dpe = reinterpret_cast<T*>(&dp);
      T* dqe = reinterpret_cast<T*>(&dq);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float v = s * (Elem<T>::to_float(xe[k]) - Elem<T>::to_float(ye[k]));
        dpe[k] = Elem<T>::from_float(v);
        dqe[k] = Elem<T>::from_float(-v);
      }
      if (gpv != nullptr) __stcs(gpv + i, dp);
      if (gqv != nullptr) __stcs(gqv + i, dq);
    }
    scalar_from = begin + nvec * V;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < end; j += kThreads) grad_scalar(p, q, gp, gq, j, s);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void check_chunk(int64_t chunk, int64_t count, const char* what) {
  if (chunk <= 0 || chunk % 16 != 0) {
    throw std::invalid_argument(std::string(what) + ": chunk must be a positive multiple of 16");
  }
  if (count <= 0 || count > 0x7fffffffLL) throw std::invalid_argument(std::string(what) + ": grid size out of range");
}

template <class T>
void forward(const VelocityEnergyArgs& a, float* energy, float* partials, int64_t splits, int64_t chunk,
             cudaStream_t stream) {
  const int64_t rows = a.batch * a.steps;
  const float scale = a.mean ? 1.f / static_cast<float>(a.n) : 1.f;
  check_chunk(chunk, rows * splits, "velocity_energy_forward_cuda");
  if (splits == 1) {
    forward_kernel<T, true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(a, energy, 1, chunk, scale);
    check_launch("velocity_energy forward_kernel");
    return;
  }
  if (partials == nullptr) throw std::invalid_argument("velocity_energy_forward_cuda: splits > 1 needs partials");
  forward_kernel<T, false><<<static_cast<unsigned>(rows * splits), kThreads, 0, stream>>>(a, partials, splits, chunk,
                                                                                         scale);
  check_launch("velocity_energy forward_kernel");
  combine_kernel<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(a, partials, splits,
                                                                                               energy, scale);
  check_launch("velocity_energy combine_kernel");
}

template <class T>
void backward(const VelocityEnergyArgs& a, const float* grad_e, int64_t g_sb, int64_t g_st, void* grad_pred,
              void* grad_target, int64_t chunk, cudaStream_t stream) {
  const int64_t rows = a.batch * a.steps;
  const int64_t chunks = (a.n + chunk - 1) / chunk;
  check_chunk(chunk, rows * chunks, "velocity_energy_backward_cuda");
  const float two_over_n = a.mean ? 2.f / static_cast<float>(a.n) : 2.f;
  backward_kernel<T><<<static_cast<unsigned>(rows * chunks), kThreads, 0, stream>>>(
      a, grad_e, g_sb, g_st, static_cast<T*>(grad_pred), static_cast<T*>(grad_target), chunks, chunk, two_over_n);
  check_launch("velocity_energy backward_kernel");
}

}  // namespace

int velocity_energy_cuda_blocks_per_sm(DType dtype) {
  int blocks = 0;
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, forward_kernel<float, false>, kThreads, 0);
      break;
    case DType::kBFloat16:
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, forward_kernel<__nv_bfloat16, false>, kThreads, 0);
      break;
    case DType::kFloat16:
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, forward_kernel<__half, false>, kThreads, 0);
      break;
    default: throw std::invalid_argument("velocity_energy_cuda_blocks_per_sm: fp32, bf16 and fp16 only");
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("velocity_energy occupancy: ") + cudaGetErrorString(err));
  }
  return blocks;
}

void velocity_energy_forward_cuda(const VelocityEnergyArgs& args, void* energy, float* partials, int64_t splits,
                                  int64_t chunk, std::uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  float* e = static_cast<float*>(energy);
  switch (args.dtype) {
    case DType::kFloat32: return forward<float>(args, e, partials, splits, chunk, s);
    case DType::kBFloat16: return forward<__nv_bfloat16>(args, e, partials, splits, chunk, s);
    case DType::kFloat16: return forward<__half>(args, e, partials, splits, chunk, s);
    default: throw std::invalid_argument("velocity_energy_forward_cuda: fp32, bf16 and fp16 only");
  }
}

void velocity_energy_backward_cuda(const VelocityEnergyArgs& args, const void* grad_e, int64_t g_sb, int64_t g_st,
                                   void* grad_pred, void* grad_target, int64_t chunk, std::uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float* g = static_cast<const float*>(grad_e);
  switch (args.dtype) {
    case DType::kFloat32: return backward<float>(args, g, g_sb, g_st, grad_pred, grad_target, chunk, s);
    case DType::kBFloat16: return backward<__nv_bfloat16>(args, g, g_sb, g_st, grad_pred, grad_target, chunk, s);
    case DType::kFloat16: return backward<__half>(args, g, g_sb, g_st, grad_pred, grad_target, chunk, s);
    default: throw std::invalid_argument("velocity_energy_backward_cuda: fp32, bf16 and fp16 only");
  }
}

}  // namespace kvpo
