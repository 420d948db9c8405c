// Compiles every kernel instantiation and the compiled-kernel launch without
// torch: CI builds this with nvcc (compile only) so code that does not compile
// fails there, on a machine with no GPU.
#include "compiled_launch.h"
#include "merge_attn_states.cuh"

// FastDivisor against the hardware's division, at compile time: for each divisor, the
// dividends around its first multiples, around the largest multiples below 2^31, and
// a stride through the whole range.
constexpr bool fast_divisor_matches(uint32_t d) {
  const splitkv::detail::FastDivisor fast(d);
  const uint32_t max_n = 0x7fffffffu;
  for (uint32_t k = 0; k < 4; ++k) {
    for (uint32_t delta = 0; delta < 3; ++delta) {
      const uint64_t low = uint64_t{k} * d + delta, high = uint64_t{max_n} - (uint64_t{max_n} % d) * (k % 2) - delta;
      for (const uint64_t n : {low, low > 0 ? low - 1 : 0, high}) {
        if (n <= max_n && fast.quotient(static_cast<uint32_t>(n)) != n / d) return false;
      }
    }
  }
  for (uint64_t n = 0; n <= max_n; n += 8388593) {  // a prime stride: 256 dividends
    if (fast.quotient(static_cast<uint32_t>(n)) != n / d) return false;
  }
  return true;
}
static_assert(fast_divisor_matches(1) && fast_divisor_matches(2) && fast_divisor_matches(3) &&
              fast_divisor_matches(7) && fast_divisor_matches(32) && fast_divisor_matches(48) &&
              fast_divisor_matches(100) && fast_divisor_matches(4097) && fast_divisor_matches(65536) &&
              fast_divisor_matches(1000003) && fast_divisor_matches(0x40000001u) &&
              fast_divisor_matches(0x7fffffffu));

template cudaError_t splitkv::merge_attn_states<float>(const splitkv::MergeParams&, cudaStream_t);
template cudaError_t splitkv::merge_attn_states<__half>(const splitkv::MergeParams&, cudaStream_t);
template cudaError_t splitkv::merge_attn_states<__nv_bfloat16>(const splitkv::MergeParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<float, float>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<__half, __half>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<__nv_bfloat16, __nv_bfloat16>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<float, __half>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<float, __nv_bfloat16>(const splitkv::MergeNParams&, cudaStream_t);
// fp8 outputs, from every input type.
#define SPLITKV_FP8_OUTPUTS(TIn)                                                                              \
  template cudaError_t splitkv::merge_attn_states<TIn, splitkv::Fp8E4M3>(const splitkv::MergeParams&, cudaStream_t); \
  template cudaError_t splitkv::merge_attn_states<TIn, splitkv::Fp8E5M2>(const splitkv::MergeParams&, cudaStream_t); \
  template cudaError_t splitkv::merge_states<TIn, splitkv::Fp8E4M3>(const splitkv::MergeNParams&, cudaStream_t);     \
  template cudaError_t splitkv::merge_states<TIn, splitkv::Fp8E5M2>(const splitkv::MergeNParams&, cudaStream_t);
SPLITKV_FP8_OUTPUTS(float)
SPLITKV_FP8_OUTPUTS(__half)
SPLITKV_FP8_OUTPUTS(__nv_bfloat16)

template cudaError_t splitkv::merge_attn_states_backward<float>(const splitkv::MergeBackwardParams&, cudaStream_t);
template cudaError_t splitkv::merge_attn_states_backward<__half>(const splitkv::MergeBackwardParams&, cudaStream_t);
template cudaError_t splitkv::merge_attn_states_backward<__nv_bfloat16>(const splitkv::MergeBackwardParams&,
                                                                         cudaStream_t);
template cudaError_t splitkv::merge_states_backward<float, float>(const splitkv::MergeNBackwardParams&, cudaStream_t);
template cudaError_t splitkv::merge_states_backward<__half, __half>(const splitkv::MergeNBackwardParams&, cudaStream_t);
template cudaError_t splitkv::merge_states_backward<__nv_bfloat16, __nv_bfloat16>(const splitkv::MergeNBackwardParams&,
                                                                                   cudaStream_t);
template cudaError_t splitkv::merge_states_backward<float, __half>(const splitkv::MergeNBackwardParams&, cudaStream_t);
template cudaError_t splitkv::merge_states_backward<float, __nv_bfloat16>(const splitkv::MergeNBackwardParams&,
                                                                           cudaStream_t);

// The launch path, with every parameter kind.
CUresult launch_check(CUfunction function, CUstream stream) {
  splitkv::LaunchParams params;
  params.add(static_cast<void*>(nullptr));
  params.add(int32_t{1});
  params.add(int64_t{2});
  params.add(1.0f);
  const unsigned grid[3] = {1, 1, 1};
  params.add(static_cast<void*>(nullptr));  // triton's two scratch pointers
  params.add(static_cast<void*>(nullptr));
  return splitkv::params_match(function, "pilfx", 5, 2) ? splitkv::launch_compiled(function, grid, 128, 0, stream, params)
                                                         : CUDA_ERROR_INVALID_VALUE;
}
