// Compiles every kernel instantiation and the compiled-kernel launch without
// torch: CI builds this with nvcc (compile only) so code that does not compile
// fails there, on a machine with no GPU.
#include "compiled_launch.h"
#include "merge_attn_states.cuh"

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
