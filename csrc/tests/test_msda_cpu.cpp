// ctest: the CPU MSDA kernel (csrc/kernels/msda_cpu.h) against a plain double-precision loop, and its
// backward against central finite differences of that loop, with points inside, on the border and far
// outside the levels (the sanitize build runs this under ASan / UBSan: every corner read must stay inside
// `value`). The Python tests compare both directions with torch's grid_sample reference.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "kernels/msda_cpu.h"

using unimlm::MsdaCpuDims;

namespace {

struct Case {
  MsdaCpuDims dims;
  std::vector<int64_t> shapes, starts;
  std::vector<float> value, loc, weights;
};

Case make_case(uint32_t seed) {
  Case c;
  c.shapes = {3, 4, 2, 2, 1, 1};  // (H, W) of 3 levels
  c.starts = {0, 12, 16};
  c.dims = MsdaCpuDims{2, 17, 3, 5, 3, 7, 2};
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f), where(-0.6f, 1.6f);
  const auto& d = c.dims;
  c.value.resize(d.n * d.s * d.m * d.d);
  for (auto& v : c.value) v = u(gen);
  c.loc.resize(d.n * d.lq * d.m * d.levels * d.points * 2);
  for (auto& v : c.loc) v = where(gen);
  c.loc[0] = -3.f;  // far outside: samples nothing
  c.loc[3] = 7.f;
  c.weights.resize(d.n * d.lq * d.m * d.levels * d.points);
  for (auto& v : c.weights) v = 0.5f * (u(gen) + 1.f);
  return c;
}

// out[n, q, m, :] as a plain loop in double (zero outside, align_corners=False)
std::vector<double> naive(const Case& c, const std::vector<double>& value, const std::vector<double>& loc,
                          const std::vector<double>& weights) {
  const auto& d = c.dims;
  std::vector<double> out(d.n * d.lq * d.m * d.d, 0.0);
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t q = 0; q < d.lq; ++q)
      for (int64_t m = 0; m < d.m; ++m)
        for (int64_t l = 0; l < d.levels; ++l)
          for (int64_t p = 0; p < d.points; ++p) {
            const int64_t i = (((n * d.lq + q) * d.m + m) * d.levels + l) * d.points + p;
            const int64_t h = c.shapes[2 * l], w = c.shapes[2 * l + 1];
            const double x = loc[2 * i] * w - 0.5, y = loc[2 * i + 1] * h - 0.5;
            const double x0 = std::floor(x), y0 = std::floor(y);
            for (int dy = 0; dy < 2; ++dy)
              for (int dx = 0; dx < 2; ++dx) {
                const double xi = x0 + dx, yi = y0 + dy;
                if (xi < 0 || xi >= w || yi < 0 || yi >= h) continue;
                const double cw = (1 - std::fabs(x - xi)) * (1 - std::fabs(y - yi)) * weights[i];
                const int64_t row = c.starts[l] + static_cast<int64_t>(yi) * w + static_cast<int64_t>(xi);
                for (int64_t e = 0; e < d.d; ++e)
                  out[((n * d.lq + q) * d.m + m) * d.d + e] += cw * value[((n * d.s + row) * d.m + m) * d.d + e];
              }
          }
  return out;
}

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

double dot(const std::vector<double>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

void test_forward(int threads) {
  Case c = make_case(1);
  std::vector<float> out(c.dims.n * c.dims.lq * c.dims.m * c.dims.d, -1.f);
  unimlm::msda_cpu_forward(c.value.data(), c.shapes.data(), c.starts.data(), c.loc.data(), c.weights.data(),
                           out.data(), c.dims, threads);
  auto want = naive(c, widen(c.value), widen(c.loc), widen(c.weights));
  for (size_t i = 0; i < out.size(); ++i) CHECK(std::fabs(out[i] - want[i]) < 1e-5);
}

// d(sum(out * up)) / d input by central differences of the double loop, one input element at a time
void test_backward(int threads) {
  Case c = make_case(2);
  const auto& d = c.dims;
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> up(d.n * d.lq * d.m * d.d);
  for (auto& v : up) v = u(gen);
  std::vector<float> gv(c.value.size(), 0.f), gl(c.loc.size(), 99.f), gw(c.weights.size(), 99.f);
  unimlm::msda_cpu_backward(c.value.data(), c.shapes.data(), c.starts.data(), c.loc.data(), c.weights.data(),
                            up.data(), gv.data(), gl.data(), gw.data(), d, threads);
  auto v = widen(c.value), l = widen(c.loc), w = widen(c.weights);
  const double eps = 1e-6;
  auto numeric = [&](std::vector<double>& x, size_t i) {
    const double keep = x[i];
    x[i] = keep + eps;
    const double hi = dot(naive(c, v, l, w), up);
    x[i] = keep - eps;
    const double lo = dot(naive(c, v, l, w), up);
    x[i] = keep;
    return (hi - lo) / (2 * eps);
  };
  for (size_t i = 0; i < v.size(); ++i) CHECK(std::fabs(gv[i] - numeric(v, i)) < 1e-4);
  for (size_t i = 0; i < w.size(); ++i) CHECK(std::fabs(gw[i] - numeric(w, i)) < 1e-4);
  // a location whose pixel coordinate sits within eps of an integer has a kink there: skip those
  for (size_t i = 0; i < l.size(); ++i) {
    const int64_t level = (i / 2 / d.points) % d.levels;
    const double size = c.shapes[2 * level + (i % 2 == 0 ? 1 : 0)];
    const double px = l[i] * size - 0.5;
    if (std::fabs(px - std::round(px)) < 1e-3) continue;
    CHECK(std::fabs(gl[i] - numeric(l, i)) < 1e-3 * size);
  }
  CHECK(gl[0] == 0.f && gl[1] == 0.f && gw[0] == 0.f);  // the far-outside point: no gradient, written
}

}  // namespace

int main() {
  for (int threads : {1, 2, 5}) {
    test_forward(threads);
    test_backward(threads);
  }
  return 0;
}
