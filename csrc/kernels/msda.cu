// C-ABI launcher for csrc/kernels/msda.cuh: pointers and the stream come in as integers
// (torch's data_ptr() / cuda_stream), errors go out as the cudaError_t value.
// Compiled with nvcc here (tests/test_msda_cuda_build.py); not run on a GPU in this repo.
#include <cstdint>

#include "kernels/msda.cuh"

namespace {

using namespace unimlm::msda;

// value/out in `dtype`; locations/weights in `loc_dtype` (== dtype, or float32).
cudaError_t dispatch_dtypes(const MsdaArgs& a, MsdaDtype dtype, MsdaDtype loc_dtype, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  const bool same = loc_dtype == dtype;
  switch (dtype) {
    case kFloat32:
      return same ? launch_typed<float, float>(a, stream) : cudaErrorInvalidValue;
    case kFloat16:
      if (same) return launch_typed<__half, __half>(a, stream);
      return loc_dtype == kFloat32 ? launch_typed<__half, float>(a, stream) : cudaErrorInvalidValue;
    case kBFloat16:
      if (same) return launch_typed<__nv_bfloat16, __nv_bfloat16>(a, stream);
      return loc_dtype == kFloat32 ? launch_typed<__nv_bfloat16, float>(a, stream) : cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" int unimlm_msda_forward(uint64_t value_ptr, uint64_t shapes_ptr, uint64_t level_start_ptr,
                                   uint64_t loc_ptr, uint64_t attn_ptr, uint64_t out_ptr, int64_t n, int64_t s,
                                   int64_t m, int64_t d, int64_t levels, int64_t lq, int64_t points, int dtype,
                                   int loc_dtype, uint64_t stream, int fused_softmax) {
  if (dtype < kFloat32 || dtype > kBFloat16 || loc_dtype < kFloat32 || loc_dtype > kBFloat16) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  MsdaArgs a{};
  a.value = reinterpret_cast<const void*>(value_ptr);
  a.spatial_shapes = reinterpret_cast<const int64_t*>(shapes_ptr);
  a.level_start_index = reinterpret_cast<const int64_t*>(level_start_ptr);
  a.sampling_locations = reinterpret_cast<const void*>(loc_ptr);
  a.attention_weights = reinterpret_cast<const void*>(attn_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.n = n;
  a.s = s;
  a.m = m;
  a.d = d;
  a.levels = levels;
  a.lq = lq;
  a.points = points;
  a.fused_softmax = fused_softmax != 0;
  const cudaError_t err = dispatch_dtypes(a, static_cast<MsdaDtype>(dtype), static_cast<MsdaDtype>(loc_dtype),
                                       reinterpret_cast<cudaStream_t>(stream));
  return static_cast<int>(err);
}

extern "C" const char* unimlm_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
