// Baseline for benchmarks/bench_msda.py: the classical multi-scale deformable attention
// forward, one thread per output element (n, q, m, d), every thread walking all L*P samples
// with scalar loads. Locations and weights share value's dtype; math and accumulation are
// fp32 so that the correctness gate compares like with like. Built by msda_classic.py with
// torch.utils.cpp_extension.load; it needs a CUDA machine and has not run in this repo.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

namespace {

template <typename scalar_t>
__device__ float corner(const scalar_t* v, int64_t start, int h, int w, int y, int x, int64_t row_stride) {
  if (y < 0 || y >= h || x < 0 || x >= w) return 0.f;
  return static_cast<float>(v[(start + static_cast<int64_t>(y) * w + x) * row_stride]);
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
        const float x = static_cast<float>(xy[2 * i]) * w - 0.5f;
        const float y = static_cast<float>(xy[2 * i + 1]) * h - 0.5f;
        if (!(x > -1.f && y > -1.f && x < w && y < h)) continue;
        const int x0 = static_cast<int>(floorf(x)), y0 = static_cast<int>(floorf(y));
        const float fx = x - x0, fy = y - y0;
        const float val = (1.f - fy) * ((1.f - fx) * corner(v, start, h, w, y0, x0, m * d) +
                                        fx * corner(v, start, h, w, y0, x0 + 1, m * d)) +
                          fy * ((1.f - fx) * corner(v, start, h, w, y0 + 1, x0, m * d) +
                                fx * corner(v, start, h, w, y0 + 1, x0 + 1, m * d));
        acc += static_cast<float>(a[i]) * val;
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L], sampling_locations
// [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D]
torch::Tensor msda_classic_forward(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts,
                                   torch::Tensor loc, torch::Tensor attn) {
  TORCH_CHECK(value.is_cuda() && value.is_contiguous() && loc.is_contiguous() && attn.is_contiguous(),
              "msda_classic: contiguous CUDA tensors expected");
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "msda_classic: locations and weights must share value's dtype");
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), levels = loc.size(3), points = loc.size(4);
  auto out = torch::empty({n, lq, m * d}, value.options());
  const int64_t total = out.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 30);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_classic", [&] {
    msda_classic_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s, m, d, lq,
        static_cast<int>(levels), static_cast<int>(points), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("forward", &msda_classic_forward, "classic one-thread-per-output MSDA forward");
}
