// Multi-scale deformable attention on the CPU, fp32: forward and backward (the math of
// unimlm_engine/ops/msda.py and kernels/README_msda.md). Framework-free: raw pointers, row-major
// contiguous tensors, std::thread for the parallel loop.
//
//   value   [N, S, M, D]          shapes [L, 2] int64 (H, W)     starts [L] int64
//   loc     [N, Lq, M, L, P, 2]   (x, y) in [0, 1]; pixel x = loc_x * W - 0.5 (align_corners=False)
//   weights [N, Lq, M, L, P]      out [N, Lq, M, D]
//
// Bilinear sampling with zero padding: a corner outside the level contributes nothing, as
// F.grid_sample(padding_mode="zeros"). A non-finite location samples nothing.
#pragma once
#include <cstdint>

namespace unimlm {

struct MsdaCpuDims {
  int64_t n, s, m, d, levels, lq, points;
};

// Rows (n, q) are split over `threads` threads.
void msda_cpu_forward(const float* value, const int64_t* shapes, const int64_t* starts, const float* loc,
                      const float* weights, float* out, const MsdaCpuDims& dims, int threads);

// grad_value must be zeroed by the caller (it is accumulated); grad_loc and grad_weights are written
// in full. Work is split over the (n, m) pairs, so no two threads write the same element.
void msda_cpu_backward(const float* value, const int64_t* shapes, const int64_t* starts, const float* loc,
                       const float* weights, const float* grad_out, float* grad_value, float* grad_loc,
                       float* grad_weights, const MsdaCpuDims& dims, int threads);

}  // namespace unimlm
