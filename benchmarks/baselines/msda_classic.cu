// Baseline for benchmarks/bench_msda.py: the classical multi-scale deformable attention
// forward, one thread per output element (n, q, m, d), every thread walking all L*P samples
// with scalar loads. Locations and weights share value's dtype; math and accumulation are
// fp32 so that the correctness gate compares like with like. No torch headers: pointers and
// the stream come in as integers. Built by msda_classic.py with torch.utils.cpp_extension.load;
// compiled with nvcc here but never run (no GPU in this repo).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME unimlm_msda_classic
#endif

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// Explicit conversions: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <typename scalar_t>
__device__ float corner(const scalar_t* v, int64_t start, int h, int w, int y, int x, int64_t row_stride) {
  if (y < 0 || y >= h || x < 0 || x >= w) return 0.f;
  return to_float(v[(start + static_cast<int64_t>(y) * w + x) * row_stride]);
}

template <typename scalar_t>
__global__ void msda_classic_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                                    const scalar_t* loc, const scalar_t* attn, scalar_t* out, int64_t s, int64_t m,
                                    int64_t d, int64_t lq, int levels, int points, int64_t total) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % d;
    const int64_t nqm = idx / d;
    const int64_t head = nqm % m;
    const int64_t n = nqm / (m * lq);
    const scalar_t* v = value + (n * s * m + head) * d + c;
    const scalar_t* a = attn + nqm * levels * points;
    const scalar_t* xy = loc + nqm * levels * points * 2;
    float acc = 0.f;
    for (int l = 0; l < levels; ++l) {
      const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
      const int64_t start = starts[l];
      for (int p = 0; p < points; ++p) {
        const int i = l * points + p;
        const float x = to_float(xy[2 * i]) * w - 0.5f;
        const float y = to_float(xy[2 * i + 1]) * h - 0.5f;
        if (!(x > -1.f && y > -1.f && x < w && y < h)) continue;
        const int x0 = static_cast<int>(floorf(x)), y0 = static_cast<int>(floorf(y));
        const float fx = x - x0, fy = y - y0;
        const float val = (1.f - fy) * ((1.f - fx) * corner(v, start, h, w, y0, x0, m * d) +
                                        fx * corner(v, start, h, w, y0, x0 + 1, m * d)) +
                          fy * ((1.f - fx) * corner(v, start, h, w, y0 + 1, x0, m * d) +
                                fx * corner(v, start, h, w, y0 + 1, x0 + 1, m * d));
        acc += to_float(a[i]) * val;
      }
    }
    store(out + idx, acc);
  }
}

template <typename scalar_t>
void launch(uint64_t value, uint64_t shapes, uint64_t starts, uint64_t loc, uint64_t attn, uint64_t out, int64_t n,
            int64_t s, int64_t m, int64_t d, int64_t levels, int64_t lq, int64_t points, cudaStream_t stream) {
  const int64_t total = n * lq * m * d;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 30);
  msda_classic_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      reinterpret_cast<const scalar_t*>(value), reinterpret_cast<const int64_t*>(shapes),
      reinterpret_cast<const int64_t*>(starts), reinterpret_cast<const scalar_t*>(loc),
      reinterpret_cast<const scalar_t*>(attn), reinterpret_cast<scalar_t*>(out), s, m, d, lq,
      static_cast<int>(levels), static_cast<int>(points), total);
}

// Pointers and stream as integers (data_ptr(), cuda_stream); dtype 0 fp32, 1 fp16, 2 bf16;
// locations and weights in the same dtype as value. Writes out [N, Lq, M*D].
void classic_forward(uint64_t value, uint64_t shapes, uint64_t starts, uint64_t loc, uint64_t attn, uint64_t out,
                     int64_t n, int64_t s, int64_t m, int64_t d, int64_t levels, int64_t lq, int64_t points,
                     int dtype, uint64_t stream_ptr) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  if (dtype == 0) launch<float>(value, shapes, starts, loc, attn, out, n, s, m, d, levels, lq, points, stream);
  else if (dtype == 1) launch<__half>(value, shapes, starts, loc, attn, out, n, s, m, d, levels, lq, points, stream);
  else if (dtype == 2) {
    launch<__nv_bfloat16>(value, shapes, starts, loc, attn, out, n, s, m, d, levels, lq, points, stream);
  } else {
    throw std::invalid_argument("msda_classic: dtype must be 0, 1 or 2");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("msda_classic: ") + cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("forward", &classic_forward, "classic one-thread-per-output MSDA forward (raw pointers)");
}
