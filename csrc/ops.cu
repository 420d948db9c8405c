// The torch binding: registers the merge kernels as custom ops
// (torch.ops.splitkv.*). Validation with user-facing messages happens in
// Python before the op is called; the checks here only keep a direct call of
// the raw op from touching memory it does not own.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "merge_attn_states.cuh"

namespace {

void check_output_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                       const at::Device& device) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

void check_rows(int64_t tokens, int64_t heads, int64_t head_dim, const at::Tensor& output) {
  TORCH_CHECK(tokens * heads < std::numeric_limits<int32_t>::max(), "tokens * heads must be < 2^31");
  TORCH_CHECK(head_dim <= 1 || output.stride(-1) == 1, "the head_dim axis must be contiguous");
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::ScalarType::Float: return fn(float{});
    case at::ScalarType::Half: return fn(__half{});
    case at::ScalarType::BFloat16: return fn(__nv_bfloat16{});
    default: TORCH_CHECK(false, "dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

void merge_attn_states(at::Tensor& output, const std::optional<at::Tensor>& output_lse, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse) {
  TORCH_CHECK(prefix_output.dim() == 3, "prefix_output must be [tokens, heads, head_dim]");
  TORCH_CHECK(prefix_output.is_cuda(), "prefix_output must be a CUDA tensor");
  const int64_t tokens = prefix_output.size(0), heads = prefix_output.size(1), head_dim = prefix_output.size(2);
  const auto dtype = prefix_output.scalar_type();
  const auto device = prefix_output.device();
  const std::array<int64_t, 2> lse_shape{heads, tokens};
  check_output_like(suffix_output, "suffix_output", prefix_output.sizes(), dtype, device);
  check_output_like(output, "output", prefix_output.sizes(), dtype, device);
  check_output_like(prefix_lse, "prefix_lse", lse_shape, at::kFloat, device);
  check_output_like(suffix_lse, "suffix_lse", lse_shape, at::kFloat, device);
  if (output_lse) check_output_like(*output_lse, "output_lse", lse_shape, at::kFloat, device);
  check_rows(tokens, heads, head_dim, prefix_output);
  check_rows(tokens, heads, head_dim, suffix_output);
  check_rows(tokens, heads, head_dim, output);

  splitkv::MergeParams p{};
  p.output = output.data_ptr();
  p.output_lse = output_lse ? output_lse->data_ptr<float>() : nullptr;
  p.prefix_output = prefix_output.data_ptr();
  p.prefix_lse = prefix_lse.data_ptr<float>();
  p.suffix_output = suffix_output.data_ptr();
  p.suffix_lse = suffix_lse.data_ptr<float>();
  p.num_tokens = tokens;
  p.num_heads = heads;
  p.head_dim = head_dim;
  p.output_stride_token = output.stride(0);
  p.output_stride_head = output.stride(1);
  p.prefix_stride_token = prefix_output.stride(0);
  p.prefix_stride_head = prefix_output.stride(1);
  p.suffix_stride_token = suffix_output.stride(0);
  p.suffix_stride_head = suffix_output.stride(1);
  if (output_lse) {
    p.output_lse_stride_head = output_lse->stride(0);
    p.output_lse_stride_token = output_lse->stride(1);
  }
  p.prefix_lse_stride_head = prefix_lse.stride(0);
  p.prefix_lse_stride_token = prefix_lse.stride(1);
  p.suffix_lse_stride_head = suffix_lse.stride(0);
  p.suffix_lse_stride_token = suffix_lse.stride(1);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(splitkv::merge_attn_states<T>(p, stream));
  });
}

void merge_states(at::Tensor& output, const std::optional<at::Tensor>& output_lse, const at::Tensor& states,
                  const at::Tensor& lses) {
  TORCH_CHECK(states.dim() == 4, "states must be [num_states, tokens, heads, head_dim]");
  TORCH_CHECK(states.is_cuda(), "states must be a CUDA tensor");
  const int64_t num_states = states.size(0), tokens = states.size(1), heads = states.size(2),
                head_dim = states.size(3);
  const auto dtype = states.scalar_type();
  const auto out_dtype = output.scalar_type();
  TORCH_CHECK(out_dtype == dtype || dtype == at::kFloat,
              "output must have the dtype of states, or states must be float32");
  const auto device = states.device();
  const std::array<int64_t, 3> out_shape{tokens, heads, head_dim};
  const std::array<int64_t, 3> lses_shape{num_states, heads, tokens};
  const std::array<int64_t, 2> lse_shape{heads, tokens};
  check_output_like(output, "output", out_shape, out_dtype, device);
  check_output_like(lses, "lses", lses_shape, at::kFloat, device);
  if (output_lse) check_output_like(*output_lse, "output_lse", lse_shape, at::kFloat, device);
  check_rows(tokens, heads, head_dim, states);
  check_rows(tokens, heads, head_dim, output);

  splitkv::MergeNParams p{};
  p.output = output.data_ptr();
  p.output_lse = output_lse ? output_lse->data_ptr<float>() : nullptr;
  p.states = states.data_ptr();
  p.lses = lses.data_ptr<float>();
  p.num_states = num_states;
  p.num_tokens = tokens;
  p.num_heads = heads;
  p.head_dim = head_dim;
  p.output_stride_token = output.stride(0);
  p.output_stride_head = output.stride(1);
  p.states_stride_state = states.stride(0);
  p.states_stride_token = states.stride(1);
  p.states_stride_head = states.stride(2);
  if (output_lse) {
    p.output_lse_stride_head = output_lse->stride(0);
    p.output_lse_stride_token = output_lse->stride(1);
  }
  p.lses_stride_state = lses.stride(0);
  p.lses_stride_head = lses.stride(1);
  p.lses_stride_token = lses.stride(2);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(out_dtype, [&](auto out_tag) {
    using TOut = decltype(out_tag);
    if (dtype == at::kFloat) {
      C10_CUDA_CHECK((splitkv::merge_states<float, TOut>(p, stream)));
    } else {
      C10_CUDA_CHECK((splitkv::merge_states<TOut, TOut>(p, stream)));
    }
  });
}

}  // namespace

TORCH_LIBRARY(splitkv, m) {
  m.def(
      "merge_attn_states(Tensor(a!) output, Tensor(b!)? output_lse, Tensor prefix_output, Tensor prefix_lse, "
      "Tensor suffix_output, Tensor suffix_lse) -> ()");
  m.def("merge_states(Tensor(a!) output, Tensor(b!)? output_lse, Tensor states, Tensor lses) -> ()");
}

TORCH_LIBRARY_IMPL(splitkv, CUDA, m) {
  m.impl("merge_attn_states", &merge_attn_states);
  m.impl("merge_states", &merge_states);
}
