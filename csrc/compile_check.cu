// Compiles every kernel instantiation without torch: CI builds this with nvcc
// (compile only) so a kernel that does not compile fails there, on a machine
// with no GPU.
#include "merge_attn_states.cuh"

template cudaError_t splitkv::merge_attn_states<float>(const splitkv::MergeParams&, cudaStream_t);
template cudaError_t splitkv::merge_attn_states<__half>(const splitkv::MergeParams&, cudaStream_t);
template cudaError_t splitkv::merge_attn_states<__nv_bfloat16>(const splitkv::MergeParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<float, float>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<__half, __half>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<__nv_bfloat16, __nv_bfloat16>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<float, __half>(const splitkv::MergeNParams&, cudaStream_t);
template cudaError_t splitkv::merge_states<float, __nv_bfloat16>(const splitkv::MergeNParams&, cudaStream_t);
