// Multi-scale deformable attention forward (math: kernels/README_msda.md).
//
// Framework-free: raw pointers + cudaStream_t in, cudaError_t out (no torch), so the same
// code serves the Python op (csrc/kernels_bindings.cpp) and a TensorRT plugin.
//
// Layouts (all contiguous):
//   value              [N, S, M, D]          T
//   spatial_shapes     [L, 2]  int64         (H, W) per level
//   level_start_index  [L]     int64
//   sampling_locations [N, Lq, M, L, P, 2]   LocT, (x, y) normalised, may fall outside [0, 1]
//   attention_weights  [N, Lq, M, L, P]      LocT (logits when fused_softmax)
//   out                [N, Lq, M, D]         T
//
// Mapping: a group of D / V threads owns one (n, q, m); each thread owns V consecutive
// channels and reads them with one vector load per bilinear corner (16 bytes when D and
// the pointers allow, else V = 1 with runtime (L, P) loops). The corners of a sample are
// branch-free (clamped rows, zero weight outside), so its four loads are in flight together. L and P are template
// constants for (4, 4) and (4, 8) so the sample loops unroll; other (L, P) take the
// runtime-loop instance (kL = kP = 0).
// Accumulation, sampling-location math and the optional softmax are fp32 for every T.
//
// Compiled with nvcc (sm_80, sm_90a) and the per-thread body (msda_thread) run on the CPU
// by tests/test_msda_cuda_build.py; the kernel itself has not run on a GPU in this repo.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace unimlm {
namespace msda {

enum MsdaDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct MsdaArgs {
  const void* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  const void* sampling_locations;
  const void* attention_weights;
  void* out;
  int64_t n, s, m, d, levels, lq, points;
  bool fused_softmax;
};

__host__ __device__ __forceinline__ float to_f32(float x) { return x; }
__host__ __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__host__ __device__ __forceinline__ T from_f32(float x);
template <>
__host__ __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// V elements in one aligned load/store (ld.global.v4 for 16 bytes).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// The V channels of this thread in row `row`; `base` already points at (n, m, c0).
template <typename T, int V>
__host__ __device__ __forceinline__ Vec<T, V> load_row(const T* __restrict__ base, int64_t row, int64_t row_stride) {
  return *reinterpret_cast<const Vec<T, V>*>(base + row * row_stride);
}

// i clamped into [0, n): an out-of-range corner reads an in-range row (its weight is 0).
__host__ __device__ __forceinline__ int64_t clamp_index(int i, int n) {
  return static_cast<int64_t>(i < 0 ? 0 : (i >= n ? n - 1 : i));
}

// acc += w * x (fp32).
template <typename T, int V>
__host__ __device__ __forceinline__ void fma_row(const Vec<T, V>& x, float w, float (&acc)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = fmaf(w, to_f32(x.v[i]), acc[i]);
}

// One bilinear sample (align_corners=False, zero padding) of level (h, w, start), scaled by a.
// Branch-free: each corner index is clamped into the level (so every load is in bounds) and an
// out-of-range corner gets weight 0. The four loads are issued before any FMA, so all four are in
// flight at once (a load behind its own branch writing shared registers serialises them).
template <typename T, int V>
__host__ __device__ __forceinline__ void add_sample(const T* __restrict__ base, int64_t row_stride, int64_t start,
                                                    int h, int w, float lx, float ly, float a, float (&acc)[V]) {
  const float wf = static_cast<float>(w), hf = static_cast<float>(h);
  // Clamp far-outside points so the int cast is defined; clamped points stay fully outside.
  const float x = fminf(fmaxf(lx * wf - 0.5f, -2.0f), wf + 1.0f);
  const float y = fminf(fmaxf(ly * hf - 0.5f, -2.0f), hf + 1.0f);
  const float x0f = floorf(x), y0f = floorf(y);
  const float fx = x - x0f, fy = y - y0f;
  const int x0 = static_cast<int>(x0f), y0 = static_cast<int>(y0f);
  const int x1 = x0 + 1, y1 = y0 + 1;
  const float wx0 = (x0 >= 0 && x0 < w) ? 1.f - fx : 0.f, wx1 = (x1 >= 0 && x1 < w) ? fx : 0.f;
  const float wy0 = (y0 >= 0 && y0 < h) ? a * (1.f - fy) : 0.f, wy1 = (y1 >= 0 && y1 < h) ? a * fy : 0.f;
  const int64_t cx0 = clamp_index(x0, w), cx1 = clamp_index(x1, w);
  const int64_t ry0 = start + clamp_index(y0, h) * w, ry1 = start + clamp_index(y1, h) * w;
  const Vec<T, V> v00 = load_row<T, V>(base, ry0 + cx0, row_stride);
  const Vec<T, V> v01 = load_row<T, V>(base, ry0 + cx1, row_stride);
  const Vec<T, V> v10 = load_row<T, V>(base, ry1 + cx0, row_stride);
  const Vec<T, V> v11 = load_row<T, V>(base, ry1 + cx1, row_stride);
  fma_row<T, V>(v00, wy0 * wx0, acc);
  fma_row<T, V>(v01, wy0 * wx1, acc);
  fma_row<T, V>(v10, wy1 * wx0, acc);
  fma_row<T, V>(v11, wy1 * wx1, acc);
}

// Softmax statistics over the L*P logits of one (n, q, m): max and 1 / sum(exp(x - max)).
template <typename LocT>
__host__ __device__ __forceinline__ void softmax_stats(const LocT* __restrict__ logits, int count, float& mx,
                                                       float& inv_sum) {
  mx = -INFINITY;
  for (int i = 0; i < count; ++i) mx = fmaxf(mx, to_f32(logits[i]));
  float sum = 0.f;
  for (int i = 0; i < count; ++i) sum += expf(to_f32(logits[i]) - mx);
  inv_sum = 1.f / sum;
}

// The V output channels of thread `idx` (D / V threads per (n, q, m)). Host + device so
// tests can run the exact per-thread code on a CPU (tests/test_msda_cuda_build.py).
template <typename T, typename LocT, int V, int kL, int kP>
__host__ __device__ __forceinline__ void msda_thread(int64_t idx, const T* __restrict__ value,
                                                     const int64_t* __restrict__ shapes,
                                                     const int64_t* __restrict__ starts, const LocT* __restrict__ loc,
                                                     const LocT* __restrict__ attn, T* __restrict__ out, int64_t s,
                                                     int64_t m_heads, int64_t d, int64_t lq, int levels_rt,
                                                     int points_rt, bool fused_softmax) {
  const int levels = kL > 0 ? kL : levels_rt;
  const int points = kP > 0 ? kP : points_rt;
  const int64_t groups = d / V;
  const int64_t nqm = idx / groups;
  const int64_t c0 = (idx - nqm * groups) * V;
  const int64_t mh = nqm % m_heads;
  const int64_t n = nqm / (lq * m_heads);
  const LocT* a_ptr = attn + nqm * levels * points;
  const LocT* l_ptr = loc + nqm * levels * points * 2;
  const T* base = value + (n * s * m_heads + mh) * d + c0;
  float mx = 0.f, inv_sum = 1.f;
  if (fused_softmax) softmax_stats(a_ptr, levels * points, mx, inv_sum);
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll
  for (int l = 0; l < levels; ++l) {
    const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
    const int64_t start = starts[l];
#pragma unroll
    for (int p = 0; p < points; ++p) {
      const int i = l * points + p;
      float a = to_f32(a_ptr[i]);
      if (fused_softmax) a = expf(a - mx) * inv_sum;
      add_sample<T, V>(base, m_heads * d, start, h, w, to_f32(l_ptr[2 * i]), to_f32(l_ptr[2 * i + 1]), a, acc);
    }
  }
  Vec<T, V> o;
#pragma unroll
  for (int i = 0; i < V; ++i) o.v[i] = from_f32<T>(acc[i]);
  *reinterpret_cast<Vec<T, V>*>(out + nqm * d + c0) = o;
}

template <typename T, typename LocT, int V, int kL, int kP>
__global__ void __launch_bounds__(256) msda_forward_kernel(
    const T* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const LocT* __restrict__ loc, const LocT* __restrict__ attn, T* __restrict__ out, int64_t s, int64_t m_heads,
    int64_t d, int64_t lq, int levels_rt, int points_rt, bool fused_softmax, int64_t total) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    msda_thread<T, LocT, V, kL, kP>(idx, value, shapes, starts, loc, attn, out, s, m_heads, d, lq, levels_rt,
                                    points_rt, fused_softmax);
  }
}

template <typename T, typename LocT, int V, int kL, int kP>
cudaError_t launch_instance(const MsdaArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = a.n * a.lq * a.m * (a.d / V);
  const int64_t max_blocks = int64_t{1} << 30;  // the kernel grid-strides past this
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  msda_forward_kernel<T, LocT, V, kL, kP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.value), a.spatial_shapes, a.level_start_index,
      static_cast<const LocT*>(a.sampling_locations), static_cast<const LocT*>(a.attention_weights),
      static_cast<T*>(a.out), a.s, a.m, a.d, a.lq, static_cast<int>(a.levels), static_cast<int>(a.points),
      a.fused_softmax, total);
  return cudaGetLastError();
}

// Compile-time (L, P) for the common decoder shapes, runtime loops otherwise.
template <typename T, typename LocT, int V>
cudaError_t launch_levels_points(const MsdaArgs& a, cudaStream_t stream) {
  if (a.levels == 4 && a.points == 4) return launch_instance<T, LocT, V, 4, 4>(a, stream);
  if (a.levels == 4 && a.points == 8) return launch_instance<T, LocT, V, 4, 8>(a, stream);
  return launch_instance<T, LocT, V, 0, 0>(a, stream);
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 16-byte vectors when the channel count and both value/out pointers allow, else scalars.
template <typename T, typename LocT>
cudaError_t launch_typed(const MsdaArgs& a, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);
  auto fits = [&](int v) {
    return a.d % v == 0 && aligned_to(a.value, v * sizeof(T)) && aligned_to(a.out, v * sizeof(T));
  };
  if (fits(kWide)) return launch_levels_points<T, LocT, kWide>(a, stream);
  return launch_instance<T, LocT, 1, 0, 0>(a, stream);
}

inline bool valid_args(const MsdaArgs& a) {
  const bool positive = a.n > 0 && a.s > 0 && a.m > 0 && a.d > 0 && a.levels > 0 && a.lq > 0 && a.points > 0;
  const bool pointers = a.value && a.spatial_shapes && a.level_start_index && a.sampling_locations &&
                        a.attention_weights && a.out;
  return positive && pointers && a.levels * a.points * 2 < (int64_t{1} << 30);
}

}  // namespace msda
}  // namespace unimlm
