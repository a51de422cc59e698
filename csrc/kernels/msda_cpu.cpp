// Multi-scale deformable attention on the CPU, fp32 (see msda_cpu.h).
//
// Why a kernel: the PyTorch reference (grid_sample per level, stack, multiply by the weights, sum)
// materialises [N*M, D, Lq, L, P] twice and its broadcast multiply iterates an inner extent of L*P
// (8 at the shapes model's sizes); with its backward it took ~0.9 s of a ~3.5 s training step of
// training/train_shapes.py on the 2-core CPU (torch.profiler). Here each sample point reads its four
// corner rows of D values once and accumulates straight into the output (forward) or into the
// value gradient (backward).
#include "kernels/msda_cpu.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

namespace unimlm {
namespace {

template <typename F>
void parallel_for(int64_t total, int threads, F&& body) {
  int t = static_cast<int>(std::min<int64_t>(std::max(threads, 1), total));
  if (t <= 1) {
    body(0, total);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  int64_t chunk = (total + t - 1) / t;
  for (int i = 1; i < t; ++i) {
    int64_t lo = i * chunk, hi = std::min(total, lo + chunk);
    if (lo < hi) pool.emplace_back([&body, lo, hi] { body(lo, hi); });
  }
  body(0, std::min(total, chunk));
  for (auto& th : pool) th.join();
}

// The four corners of one sample point: their value rows (nullptr outside the level) and weights.
struct Corners {
  const float* v[4];
  float w[4];
  float fx, fy;
  int64_t idx[4];  // row of each corner within [0, S) (for the value gradient); -1 outside
};

// false when no corner is inside (nothing to sample; non-finite coordinates included)
inline bool corners(const float* value_nm, int64_t row_stride, int64_t start, int64_t h, int64_t w, float lx,
                    float ly, Corners& c) {
  float x = lx * static_cast<float>(w) - 0.5f;
  float y = ly * static_cast<float>(h) - 0.5f;
  if (!(x > -1.f && x < static_cast<float>(w) && y > -1.f && y < static_cast<float>(h))) return false;
  float x0f = std::floor(x), y0f = std::floor(y);
  int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  c.fx = x - x0f;
  c.fy = y - y0f;
  c.w[0] = (1.f - c.fy) * (1.f - c.fx);
  c.w[1] = (1.f - c.fy) * c.fx;
  c.w[2] = c.fy * (1.f - c.fx);
  c.w[3] = c.fy * c.fx;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1}, ys[4] = {y0, y0, y0 + 1, y0 + 1};
  for (int k = 0; k < 4; ++k) {
    bool in = xs[k] >= 0 && xs[k] < w && ys[k] >= 0 && ys[k] < h;
    c.idx[k] = in ? start + ys[k] * w + xs[k] : -1;
    c.v[k] = in ? value_nm + c.idx[k] * row_stride : nullptr;
  }
  return true;
}

}  // namespace

void msda_cpu_forward(const float* value, const int64_t* shapes, const int64_t* starts, const float* loc,
                      const float* weights, float* out, const MsdaCpuDims& dm, int threads) {
  const int64_t md = dm.m * dm.d, lp = dm.levels * dm.points;
  parallel_for(dm.n * dm.lq, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t n = row / dm.lq;
      float* o_row = out + row * md;
      std::fill(o_row, o_row + md, 0.f);
      for (int64_t m = 0; m < dm.m; ++m) {
        const float* vnm = value + n * dm.s * md + m * dm.d;
        const float* wq = weights + (row * dm.m + m) * lp;
        const float* xy = loc + (row * dm.m + m) * lp * 2;
        float* o = o_row + m * dm.d;
        for (int64_t l = 0; l < dm.levels; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          for (int64_t p = 0; p < dm.points; ++p) {
            const int64_t i = l * dm.points + p;
            Corners c;
            if (!corners(vnm, md, starts[l], h, w, xy[2 * i], xy[2 * i + 1], c)) continue;
            const float a = wq[i];
            for (int k = 0; k < 4; ++k) {
              if (!c.v[k]) continue;
              const float cw = a * c.w[k];
              const float* v = c.v[k];
              for (int64_t e = 0; e < dm.d; ++e) o[e] += cw * v[e];
            }
          }
        }
      }
    }
  });
}

void msda_cpu_backward(const float* value, const int64_t* shapes, const int64_t* starts, const float* loc,
                       const float* weights, const float* grad_out, float* grad_value, float* grad_loc,
                       float* grad_weights, const MsdaCpuDims& dm, int threads) {
  const int64_t md = dm.m * dm.d, lp = dm.levels * dm.points;
  parallel_for(dm.n * dm.m, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t pair = lo; pair < hi; ++pair) {
      const int64_t n = pair / dm.m, m = pair % dm.m;
      const float* vnm = value + n * dm.s * md + m * dm.d;
      float* gvnm = grad_value + n * dm.s * md + m * dm.d;
      for (int64_t q = 0; q < dm.lq; ++q) {
        const int64_t row = n * dm.lq + q;
        const float* g = grad_out + row * md + m * dm.d;
        const float* wq = weights + (row * dm.m + m) * lp;
        const float* xy = loc + (row * dm.m + m) * lp * 2;
        float* gw = grad_weights + (row * dm.m + m) * lp;
        float* gl = grad_loc + (row * dm.m + m) * lp * 2;
        for (int64_t l = 0; l < dm.levels; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          for (int64_t p = 0; p < dm.points; ++p) {
            const int64_t i = l * dm.points + p;
            Corners c;
            gw[i] = 0.f;
            gl[2 * i] = gl[2 * i + 1] = 0.f;
            if (!corners(vnm, md, starts[l], h, w, xy[2 * i], xy[2 * i + 1], c)) continue;
            const float a = wq[i];
            float dot[4] = {0.f, 0.f, 0.f, 0.f};
            for (int k = 0; k < 4; ++k) {
              if (!c.v[k]) continue;
              const float* v = c.v[k];
              float* gv = gvnm + c.idx[k] * md;
              const float cw = a * c.w[k];
              float s = 0.f;
              for (int64_t e = 0; e < dm.d; ++e) {
                s += v[e] * g[e];
                gv[e] += cw * g[e];
              }
              dot[k] = s;
            }
            gw[i] = c.w[0] * dot[0] + c.w[1] * dot[1] + c.w[2] * dot[2] + c.w[3] * dot[3];
            // d(corner weight)/dx and /dy in pixels; loc = pixel / size, so d/dloc = size * d/dpixel
            const float gx = (1.f - c.fy) * (dot[1] - dot[0]) + c.fy * (dot[3] - dot[2]);
            const float gy = (1.f - c.fx) * (dot[2] - dot[0]) + c.fx * (dot[3] - dot[1]);
            gl[2 * i] = a * gx * static_cast<float>(w);
            gl[2 * i + 1] = a * gy * static_cast<float>(h);
          }
        }
      }
    }
  });
}

}  // namespace unimlm
