// velocity_energy on CPU: std::thread workers (no OpenMP: torch already ships its own libgomp), loops written so
// the compiler vectorises them (16 independent accumulators, branch-free half conversions), an AVX2 clone picked
// at load time next to the portable default (no -march=native).
//
// Determinism: every row is cut into fixed chunks of kChunk elements (independent of the thread count); each chunk
// is summed in one fixed order and the chunk sums of a row are added left to right. Threads only decide who
// computes which chunk, so E is bitwise the same for any num_threads, on every call.
#include "velocity_energy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

namespace kvpo {
namespace {

constexpr int64_t kChunk = 16384;          // elements per task (fixed: part of the summation order)
constexpr int64_t kMinWorkPerThread = 1 << 16;  // fewer elements per thread: spawning costs more than it saves
constexpr int kLanes = 16;                 // independent accumulators: enough to fill two AVX2 FMA pipes

#if defined(__x86_64__) && defined(__GNUC__)
#define KVPO_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KVPO_CPU_CLONES
#endif

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// Element traits: storage type, exact widening load, round-to-nearest-even store, accumulation type.
struct F32 {
  using Storage = float;
  using Acc = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};

struct F64 {
  using Storage = double;
  using Acc = double;
  static inline double load(double x) { return x; }
  static inline double store(double x) { return x; }
};

struct BF16 {
  using Storage = uint16_t;
  using Acc = float;
  static inline float load(uint16_t x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }
  static inline uint16_t store(float x) {
    uint32_t bits = float_to_bits(x);
    // Round to nearest even on the 16 dropped bits; NaN stays a quiet NaN.
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? ((bits >> 16) | 0x40u) : rounded);
  }
};

// IEEE half <-> float without branches or F16C (the FP16 library's bit tricks, exact in both directions).
struct F16 {
  using Storage = uint16_t;
  using Acc = float;
  static inline float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    // Normal numbers: shift exponent+mantissa into place with a bias of 127 + 112, then rescale by 2^-112.
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    // Subnormals: place the mantissa under a 0.5 exponent and subtract 0.5.
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
    return bits_to_float(result);
  }
  static inline uint16_t store(float f) {
    // Scale so that the float addition below rounds the mantissa to 10 bits (round to nearest even), saturating
    // to infinity above the half range and flushing to the right subnormal below it.
    float base = (std::abs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// sum_j (p[j] - t[j])^2 over one chunk, in a fixed order: kLanes running sums, a pairwise fold, then the tail.
template <class Tr>
inline typename Tr::Acc chunk_sum(const typename Tr::Storage* p, const typename Tr::Storage* t, int64_t n) {
  using Acc = typename Tr::Acc;
  Acc acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const Acc d = Tr::load(p[i + k]) - Tr::load(t[i + k]);
      acc[k] += d * d;
    }
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  Acc tail = 0;
  for (; i < n; ++i) {
    const Acc d = Tr::load(p[i]) - Tr::load(t[i]);
    tail += d * d;
  }
  return acc[0] + tail;
}

// grad_pred[j] = s * (p[j] - t[j]), grad_target[j] = -grad_pred[j]; either output may be skipped.
template <class Tr, bool kPred, bool kTarget>
inline void chunk_grad(const typename Tr::Storage* p, const typename Tr::Storage* t, typename Tr::Acc s,
                       typename Tr::Storage* gp, typename Tr::Storage* gt, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const typename Tr::Acc v = s * (Tr::load(p[i]) - Tr::load(t[i]));
    if (kPred) gp[i] = Tr::store(v);
    if (kTarget) gt[i] = Tr::store(-v);
  }
}

// Non-template entry points carry the ISA clones (target_clones does not mix well with templates).
KVPO_CPU_CLONES float sum_f32(const float* p, const float* t, int64_t n) { return chunk_sum<F32>(p, t, n); }
KVPO_CPU_CLONES double sum_f64(const double* p, const double* t, int64_t n) { return chunk_sum<F64>(p, t, n); }
KVPO_CPU_CLONES float sum_bf16(const uint16_t* p, const uint16_t* t, int64_t n) { return chunk_sum<BF16>(p, t, n); }
KVPO_CPU_CLONES float sum_f16(const uint16_t* p, const uint16_t* t, int64_t n) { return chunk_sum<F16>(p, t, n); }

#define KVPO_DEFINE_GRAD(NAME, TR)                                                                              \
  KVPO_CPU_CLONES void NAME(const TR::Storage* p, const TR::Storage* t, TR::Acc s, TR::Storage* gp,            \
                            TR::Storage* gt, int64_t n) {                                                      \
    if (gp != nullptr && gt != nullptr) {                                                                      \
      chunk_grad<TR, true, true>(p, t, s, gp, gt, n);                                                          \
    } else if (gp != nullptr) {                                                                                \
      chunk_grad<TR, true, false>(p, t, s, gp, gt, n);                                                         \
    } else if (gt != nullptr) {                                                                                \
      chunk_grad<TR, false, true>(p, t, s, gp, gt, n);                                                         \
    }                                                                                                          \
  }
KVPO_DEFINE_GRAD(grad_f32, F32)
KVPO_DEFINE_GRAD(grad_f64, F64)
KVPO_DEFINE_GRAD(grad_bf16, BF16)
KVPO_DEFINE_GRAD(grad_f16, F16)
#undef KVPO_DEFINE_GRAD

template <class Tr>
inline typename Tr::Acc sum_dispatch(const typename Tr::Storage* p, const typename Tr::Storage* t, int64_t n) {
  if constexpr (std::is_same_v<Tr, F32>) return sum_f32(p, t, n);
  if constexpr (std::is_same_v<Tr, F64>) return sum_f64(p, t, n);
  if constexpr (std::is_same_v<Tr, BF16>) return sum_bf16(p, t, n);
  if constexpr (std::is_same_v<Tr, F16>) return sum_f16(p, t, n);
}

template <class Tr>
inline void grad_dispatch(const typename Tr::Storage* p, const typename Tr::Storage* t, typename Tr::Acc s,
                          typename Tr::Storage* gp, typename Tr::Storage* gt, int64_t n) {
  if constexpr (std::is_same_v<Tr, F32>) grad_f32(p, t, s, gp, gt, n);
  if constexpr (std::is_same_v<Tr, F64>) grad_f64(p, t, s, gp, gt, n);
  if constexpr (std::is_same_v<Tr, BF16>) grad_bf16(p, t, s, gp, gt, n);
  if constexpr (std::is_same_v<Tr, F16>) grad_f16(p, t, s, gp, gt, n);
}

// Run fn(begin, end) over [0, tasks) on up to num_threads threads (the calling thread takes the last range).
template <class Fn>
void parallel_for(int64_t tasks, int num_threads, Fn&& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks));
  if (workers == 1) {
    fn(int64_t{0}, tasks);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t w = 0; w + 1 < workers; ++w) {
    threads.emplace_back([&fn, tasks, workers, w] { fn(tasks * w / workers, tasks * (w + 1) / workers); });
  }
  fn(tasks * (workers - 1) / workers, tasks);
  for (auto& thread : threads) thread.join();
}

int threads_for(const VelocityEnergyArgs& a, int num_threads) {
  const int64_t elements = a.batch * a.steps * a.n;
  const int64_t useful = std::max<int64_t>(1, elements / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, useful)));
}

template <class Tr>
void forward(const VelocityEnergyArgs& a, void* energy_out, int num_threads) {
  using S = typename Tr::Storage;
  using Acc = typename Tr::Acc;
  const S* pred = static_cast<const S*>(a.pred);
  const S* target = static_cast<const S*>(a.target);
  const Acc* weight = static_cast<const Acc*>(a.weight);
  Acc* energy = static_cast<Acc*>(energy_out);
  const int64_t rows = a.batch * a.steps;
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  std::vector<Acc> partial(static_cast<size_t>(rows * chunks));
  parallel_for(rows * chunks, threads_for(a, num_threads), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks, c = task % chunks;
      const int64_t b = row / a.steps, t = row % a.steps;
      const int64_t start = c * kChunk, len = std::min(kChunk, a.n - start);
      partial[task] = sum_dispatch<Tr>(pred + b * a.pred_sb + t * a.pred_st + start,
                                         target + b * a.target_sb + t * a.target_st + start, len);
    }
  });
  const Acc scale = a.mean ? Acc(1) / static_cast<Acc>(a.n) : Acc(1);
  for (int64_t row = 0; row < rows; ++row) {
    Acc sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[row * chunks + c];
    const int64_t b = row / a.steps, t = row % a.steps;
    const Acc w = weight != nullptr ? weight[b * a.w_sb + t * a.w_st] : Acc(1);
    energy[row] = w * (sum * scale);
  }
}

template <class Tr>
void backward(const VelocityEnergyArgs& a, const void* grad_e_in, int64_t g_sb, int64_t g_st, void* grad_pred,
              void* grad_target, int num_threads) {
  using S = typename Tr::Storage;
  using Acc = typename Tr::Acc;
  const S* pred = static_cast<const S*>(a.pred);
  const S* target = static_cast<const S*>(a.target);
  const Acc* weight = static_cast<const Acc*>(a.weight);
  const Acc* grad_e = static_cast<const Acc*>(grad_e_in);
  S* gp = static_cast<S*>(grad_pred);
  S* gt = static_cast<S*>(grad_target);
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  // dE/dpred = w * 2 (p - t) / n (mean) or w * 2 (p - t) (sum).
  const Acc two_over_n = a.mean ? Acc(2) / static_cast<Acc>(a.n) : Acc(2);
  parallel_for(a.batch * a.steps * chunks, threads_for(a, num_threads), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks, c = task % chunks;
      const int64_t b = row / a.steps, t = row % a.steps;
      const int64_t start = c * kChunk, len = std::min(kChunk, a.n - start);
      const Acc w = weight != nullptr ? weight[b * a.w_sb + t * a.w_st] : Acc(1);
      const Acc s = grad_e[b * g_sb + t * g_st] * w * two_over_n;
      const int64_t out = row * a.n + start;
      grad_dispatch<Tr>(pred + b * a.pred_sb + t * a.pred_st + start,
                        target + b * a.target_sb + t * a.target_st + start, s,
                        gp != nullptr ? gp + out : nullptr, gt != nullptr ? gt + out : nullptr, len);
    }
  });
}

}  // namespace

void velocity_energy_forward_cpu(const VelocityEnergyArgs& args, void* energy, int num_threads) {
  switch (args.dtype) {
    case DType::kFloat32: return forward<F32>(args, energy, num_threads);
    case DType::kFloat64: return forward<F64>(args, energy, num_threads);
    case DType::kBFloat16: return forward<BF16>(args, energy, num_threads);
    case DType::kFloat16: return forward<F16>(args, energy, num_threads);
  }
  throw std::invalid_argument("velocity_energy_forward_cpu: unsupported dtype code");
}

void velocity_energy_backward_cpu(const VelocityEnergyArgs& args, const void* grad_e, int64_t g_sb, int64_t g_st,
                                  void* grad_pred, void* grad_target, int num_threads) {
  switch (args.dtype) {
    case DType::kFloat32: return backward<F32>(args, grad_e, g_sb, g_st, grad_pred, grad_target, num_threads);
    case DType::kFloat64: return backward<F64>(args, grad_e, g_sb, g_st, grad_pred, grad_target, num_threads);
    case DType::kBFloat16: return backward<BF16>(args, grad_e, g_sb, g_st, grad_pred, grad_target, num_threads);
    case DType::kFloat16: return backward<F16>(args, grad_e, g_sb, g_st, grad_pred, grad_target, num_threads);
  }
  throw std::invalid_argument("velocity_energy_backward_cpu: unsupported dtype code");
}

}  // namespace kvpo
