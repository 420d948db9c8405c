// The merge kernels' torch binding: registers them as custom ops
// (torch.ops.splitkv.merge_*, for torch.compile and CUDA graphs) and adds their
// eager fast paths to the Python module. Validation with user-facing messages
// happens in Python (splitkv/merge.py); the checks here only say whether those
// would pass, and keep the ops from touching memory they do not own.
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/Dtype.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>

#include "bindings.h"
#include "merge_attn_states.cuh"

namespace {

using splitkv_binding::finite_positive_scale;
using splitkv_binding::unpack_tensor;


template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::ScalarType::Float: return fn(float{});
    case at::ScalarType::Half: return fn(__half{});
    case at::ScalarType::BFloat16: return fn(__nv_bfloat16{});
    default: TORCH_CHECK(false, "dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

bool is_fp8(at::ScalarType dtype) {
  return dtype == at::ScalarType::Float8_e4m3fn || dtype == at::ScalarType::Float8_e5m2;
}

// Calls fn with a value of the kernel's output type: fp8 for an fp8 output, else T.
template <typename T, typename Fn>
void dispatch_output_dtype(at::ScalarType out_dtype, Fn&& fn) {
  switch (out_dtype) {
    case at::ScalarType::Float8_e4m3fn: return fn(splitkv::Fp8E4M3{});
    case at::ScalarType::Float8_e5m2: return fn(splitkv::Fp8E5M2{});
    default: return fn(T{});
  }
}

// The fp8 output scale: a Python float, or a one-element float32 tensor on the
// output's device (read by the kernel, so that it may change under graph replay).
void set_output_scale(float& scale, const float*& scale_ptr, double output_scale,
                      const std::optional<at::Tensor>& output_scale_tensor, const at::Tensor& output) {
  scale = static_cast<float>(output_scale);
  if (!output_scale_tensor) return;
  const at::Tensor& t = *output_scale_tensor;
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == output.device(),
              "splitkv merge: output_scale must be a one-element float32 tensor on the output's device");
  scale_ptr = t.data_ptr<float>();
}

bool has_expanded_dim(const at::Tensor& t) {
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.stride(i) == 0 && t.size(i) > 1) return true;
  return false;
}

// Whether the two-state kernel may run these arguments. splitkv/merge.py checks
// the same rules and raises errors that name the argument; this predicate keeps
// the raw op and the eager fast path from touching memory they do not own, and
// sends anything doubtful back to Python for its message.
bool merge_inputs_ok(const at::Tensor& prefix_output, const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                     const at::Tensor& suffix_lse, const at::Tensor* output, const at::Tensor* output_lse,
                     bool fp8_output_allowed = false) {
  if (prefix_output.dim() != 3 || !prefix_output.is_cuda()) return false;
  const auto dtype = prefix_output.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const auto device = prefix_output.device();
  const int64_t tokens = prefix_output.size(0), heads = prefix_output.size(1), head_dim = prefix_output.size(2);
  // head_dim 0 still has lses to write, which the kernels skip: Python sends it to Triton.
  if (tokens * heads >= std::numeric_limits<int32_t>::max() || head_dim == 0) return false;
  const auto like_output = [&](const at::Tensor& t, bool fp8_allowed = false) {
    return t.sizes() == prefix_output.sizes() && (t.scalar_type() == dtype || (fp8_allowed && is_fp8(t.scalar_type()))) &&
           t.device() == device && (head_dim <= 1 || t.stride(2) == 1);
  };
  const auto like_lse = [&](const at::Tensor& t) {
    return t.dim() == 2 && t.size(0) == heads && t.size(1) == tokens && t.scalar_type() == at::kFloat &&
           t.device() == device;
  };
  if (!like_output(prefix_output) || !like_output(suffix_output) || !like_lse(prefix_lse) || !like_lse(suffix_lse))
    return false;
  if (output != nullptr && (!like_output(*output, fp8_output_allowed) || has_expanded_dim(*output))) return false;
  if (output_lse != nullptr && (!like_lse(*output_lse) || has_expanded_dim(*output_lse))) return false;
  return true;
}

void launch_merge_attn_states(const at::Tensor& output, const at::Tensor* output_lse, const at::Tensor& prefix_output,
                              const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                              const at::Tensor& suffix_lse, double lse_scale = 1.0, double output_scale = 1.0,
                              const std::optional<at::Tensor>& output_scale_tensor = std::nullopt) {
  splitkv::MergeParams p{};
  p.lse_scale = static_cast<float>(lse_scale);
  set_output_scale(p.output_scale, p.output_scale_ptr, output_scale, output_scale_tensor, output);
  p.output = output.data_ptr();
  p.output_lse = output_lse != nullptr ? output_lse->data_ptr<float>() : nullptr;
  p.prefix_output = prefix_output.data_ptr();
  p.prefix_lse = prefix_lse.data_ptr<float>();
  p.suffix_output = suffix_output.data_ptr();
  p.suffix_lse = suffix_lse.data_ptr<float>();
  p.num_tokens = prefix_output.size(0);
  p.num_heads = prefix_output.size(1);
  p.head_dim = prefix_output.size(2);
  p.output_stride_token = output.stride(0);
  p.output_stride_head = output.stride(1);
  p.prefix_stride_token = prefix_output.stride(0);
  p.prefix_stride_head = prefix_output.stride(1);
  p.suffix_stride_token = suffix_output.stride(0);
  p.suffix_stride_head = suffix_output.stride(1);
  if (output_lse != nullptr) {
    p.output_lse_stride_head = output_lse->stride(0);
    p.output_lse_stride_token = output_lse->stride(1);
  }
  p.prefix_lse_stride_head = prefix_lse.stride(0);
  p.prefix_lse_stride_token = prefix_lse.stride(1);
  p.suffix_lse_stride_head = suffix_lse.stride(0);
  p.suffix_lse_stride_token = suffix_lse.stride(1);

  const c10::cuda::CUDAGuard guard(prefix_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(prefix_output.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_output_dtype<T>(output.scalar_type(), [&](auto out_tag) {
      using TOut = decltype(out_tag);
      C10_CUDA_CHECK((splitkv::merge_attn_states<T, TOut>(p, stream)));
    });
  });
}

void merge_attn_states(at::Tensor& output, const std::optional<at::Tensor>& output_lse, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse, double lse_scale, double output_scale,
                       const std::optional<at::Tensor>& output_scale_tensor) {
  const at::Tensor* lse_out = output_lse ? &*output_lse : nullptr;
  TORCH_CHECK(merge_inputs_ok(prefix_output, prefix_lse, suffix_output, suffix_lse, &output, lse_out, true),
              "splitkv::merge_attn_states: invalid arguments (splitkv.merge_attn_states says which)");
  launch_merge_attn_states(output, lse_out, prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale,
                           output_scale, output_scale_tensor);
}

// Backward of the two-state merge into fresh gradient buffers (splitkv/merge.py
// allocates them, contiguous, and has checked the inputs).
void merge_attn_states_backward(at::Tensor& grad_prefix_output, at::Tensor& grad_prefix_lse,
                                at::Tensor& grad_suffix_output, at::Tensor& grad_suffix_lse,
                                const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_lse,
                                const at::Tensor& prefix_output, const at::Tensor& prefix_lse,
                                const at::Tensor& suffix_output, const at::Tensor& suffix_lse, double lse_scale) {
  TORCH_CHECK(merge_inputs_ok(prefix_output, prefix_lse, suffix_output, suffix_lse, &grad_prefix_output,
                              &grad_prefix_lse) &&
                  merge_inputs_ok(prefix_output, prefix_lse, suffix_output, suffix_lse, &grad_suffix_output,
                                  &grad_suffix_lse) &&
                  merge_inputs_ok(prefix_output, prefix_lse, suffix_output, suffix_lse, &grad_output,
                                  grad_lse ? &*grad_lse : nullptr),
              "splitkv::merge_attn_states_backward: invalid arguments");
  splitkv::MergeBackwardParams p{};
  p.grad_prefix_output = grad_prefix_output.data_ptr();
  p.grad_prefix_lse = grad_prefix_lse.data_ptr<float>();
  p.grad_suffix_output = grad_suffix_output.data_ptr();
  p.grad_suffix_lse = grad_suffix_lse.data_ptr<float>();
  p.grad_output = grad_output.data_ptr();
  p.grad_lse = grad_lse ? grad_lse->data_ptr<float>() : nullptr;
  p.prefix_output = prefix_output.data_ptr();
  p.prefix_lse = prefix_lse.data_ptr<float>();
  p.suffix_output = suffix_output.data_ptr();
  p.suffix_lse = suffix_lse.data_ptr<float>();
  p.num_tokens = prefix_output.size(0);
  p.num_heads = prefix_output.size(1);
  p.head_dim = prefix_output.size(2);
  p.grad_prefix_stride_token = grad_prefix_output.stride(0);
  p.grad_prefix_stride_head = grad_prefix_output.stride(1);
  p.grad_suffix_stride_token = grad_suffix_output.stride(0);
  p.grad_suffix_stride_head = grad_suffix_output.stride(1);
  p.grad_output_stride_token = grad_output.stride(0);
  p.grad_output_stride_head = grad_output.stride(1);
  p.prefix_stride_token = prefix_output.stride(0);
  p.prefix_stride_head = prefix_output.stride(1);
  p.suffix_stride_token = suffix_output.stride(0);
  p.suffix_stride_head = suffix_output.stride(1);
  p.grad_prefix_lse_stride_head = grad_prefix_lse.stride(0);
  p.grad_prefix_lse_stride_token = grad_prefix_lse.stride(1);
  p.grad_suffix_lse_stride_head = grad_suffix_lse.stride(0);
  p.grad_suffix_lse_stride_token = grad_suffix_lse.stride(1);
  if (grad_lse) {
    p.grad_lse_stride_head = grad_lse->stride(0);
    p.grad_lse_stride_token = grad_lse->stride(1);
  }
  p.prefix_lse_stride_head = prefix_lse.stride(0);
  p.prefix_lse_stride_token = prefix_lse.stride(1);
  p.suffix_lse_stride_head = suffix_lse.stride(0);
  p.suffix_lse_stride_token = suffix_lse.stride(1);
  p.lse_scale = static_cast<float>(lse_scale);
  const c10::cuda::CUDAGuard guard(prefix_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(prefix_output.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(splitkv::merge_attn_states_backward<T>(p, stream));
  });
}

// Whether autograd must see this call (an input requires grad): the eager fast
// paths leave it to the differentiable Python path.
bool grad_required(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t->requires_grad()) return true;
  return false;
}

// Whether `out` is `t` itself, as a view: the same elements in the same order
// (splitkv/_checks.py same_view).
bool same_view(const at::Tensor& out, const at::Tensor& t) {
  return out.data_ptr() == t.data_ptr() && out.scalar_type() == t.scalar_type() && out.sizes() == t.sizes() &&
         out.strides() == t.strides();
}

// Whether `out` is `stacked[i]` for some i, as a view (splitkv/_checks.py is_entry_of).
bool is_entry_of(const at::Tensor& out, const at::Tensor& stacked) {
  if (out.scalar_type() != stacked.scalar_type() || stacked.dim() != out.dim() + 1 ||
      out.sizes() != stacked.sizes().slice(1) ||
      out.strides() != stacked.strides().slice(1))
    return false;
  const int64_t step = stacked.stride(0) * static_cast<int64_t>(stacked.element_size());
  const int64_t offset = static_cast<const char*>(out.data_ptr()) - static_cast<const char*>(stacked.data_ptr());
  return step > 0 && offset >= 0 && offset % step == 0 && offset / step < stacked.size(0);
}

// Whether `out` shares storage with an input (any of the call's outputs and lses)
// without being one (`is_input`): the eager fast paths leave that case (a view that
// partly overlaps an input, which splitkv/merge.py refuses by name) to Python, and
// run an exact in-place merge.
template <typename IsInput>
bool overlaps_otherwise(const at::Tensor& out, std::initializer_list<const at::Tensor*> inputs, IsInput is_input) {
  for (const at::Tensor* t : inputs)
    if (out.storage().is_alias_of(t->storage()) && !is_input(*t)) return true;
  return false;
}

bool cuda_disabled_by_env() {
  const char* flag = std::getenv("SPLITKV_DISABLE_CUDA");
  return flag != nullptr && flag[0] != '\0' && !(flag[0] == '0' && flag[1] == '\0');
}


// The result dtype of an eager fast path: output's when given (an output_dtype
// given too must agree), else output_dtype, else the inputs'. False where the
// Python path must judge (not a torch.dtype, a disagreement).
bool eager_output_dtype(py::handle output_dtype_obj, const at::Tensor* output, at::ScalarType inputs,
                        at::ScalarType& out_dtype) {
  out_dtype = output != nullptr ? output->scalar_type() : inputs;
  if (output_dtype_obj.is_none()) return true;
  if (!THPDtype_Check(output_dtype_obj.ptr())) return false;
  const at::ScalarType requested = reinterpret_cast<THPDtype*>(output_dtype_obj.ptr())->scalar_type;
  if (output != nullptr && requested != out_dtype) return false;
  out_dtype = requested;
  return true;
}

// The fp8 scale of an eager fast path: 1 for None, else a finite positive Python
// float or int (bindings.h) that stays positive in float32, which the kernels divide
// by. False for anything else (a tensor, a bool, zero, 1e-46, a NumPy float): the
// Python path takes those, and raises where it should.
bool eager_output_scale(py::handle output_scale_obj, double& output_scale) {
  output_scale = 1.0;
  return output_scale_obj.is_none() ||
         (finite_positive_scale(output_scale_obj, output_scale) && static_cast<float>(output_scale) > 0.f);
}

// The eager fast path of splitkv.merge_attn_states(backend="auto"): one Python
// call that checks, allocates and launches, because the dispatcher and the
// Python-side checks cost more host time than the kernel takes on small inputs.
// It covers the default LSE convention with the inputs' dtype or an fp8 result
// (a float scale). Returns None for anything it does not run (CPU tensors, bad
// arguments, SPLITKV_DISABLE_CUDA=1), and the Python path takes over.
py::object merge_attn_states_eager(py::handle prefix_output_obj, py::handle prefix_lse_obj,
                                   py::handle suffix_output_obj, py::handle suffix_lse_obj, py::handle output_obj,
                                   py::handle output_lse_obj, bool return_lse, py::handle output_dtype_obj,
                                   py::handle output_scale_obj) {
  at::Tensor prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse;
  if (!unpack_tensor(prefix_output_obj, prefix_output) || !unpack_tensor(prefix_lse_obj, prefix_lse) ||
      !unpack_tensor(suffix_output_obj, suffix_output) || !unpack_tensor(suffix_lse_obj, suffix_lse))
    return py::none();
  const bool has_output = !output_obj.is_none(), has_output_lse = !output_lse_obj.is_none();
  if ((has_output && !unpack_tensor(output_obj, output)) || (has_output_lse && !unpack_tensor(output_lse_obj, output_lse)))
    return py::none();
  at::ScalarType out_dtype;
  double output_scale;
  if (!eager_output_dtype(output_dtype_obj, has_output ? &output : nullptr, prefix_output.scalar_type(), out_dtype) ||
      !(out_dtype == prefix_output.scalar_type() || is_fp8(out_dtype)) ||
      !eager_output_scale(output_scale_obj, output_scale) || (!output_scale_obj.is_none() && !is_fp8(out_dtype)))
    return py::none();
  if (!merge_inputs_ok(prefix_output, prefix_lse, suffix_output, suffix_lse, has_output ? &output : nullptr,
                       has_output_lse ? &output_lse : nullptr, /*fp8_output_allowed=*/true) ||
      cuda_disabled_by_env() || grad_required({&prefix_output, &prefix_lse, &suffix_output, &suffix_lse}) ||
      (has_output && overlaps_otherwise(output, {&prefix_output, &suffix_output, &prefix_lse, &suffix_lse},
                                        [&](const at::Tensor& t) { return same_view(output, t); })) ||
      (has_output_lse && overlaps_otherwise(output_lse, {&prefix_output, &suffix_output, &prefix_lse, &suffix_lse},
                                            [&](const at::Tensor& t) { return same_view(output_lse, t); })) ||
      (has_output && has_output_lse && output_lse.storage().is_alias_of(output.storage())))
    return py::none();
  if (!has_output) output = at::empty(prefix_output.sizes(), prefix_output.options().dtype(out_dtype));
  if (!has_output_lse && return_lse) output_lse = at::empty(prefix_lse.sizes(), prefix_lse.options());
  const bool write_lse = has_output_lse || return_lse;
  launch_merge_attn_states(output, write_lse ? &output_lse : nullptr, prefix_output, prefix_lse, suffix_output,
                           suffix_lse, /*lse_scale=*/1.0, output_scale);
  return py::make_tuple(output, write_lse ? py::cast(output_lse) : py::none());
}

// Whether the N-way kernel may run these arguments (same role as merge_inputs_ok).
// float32 states may merge into a float16/bfloat16 output, any states into fp8.
bool merge_states_inputs_ok(const at::Tensor& states, const at::Tensor& lses, const at::Tensor& output,
                            const at::Tensor* output_lse) {
  if (states.dim() != 4 || !states.is_cuda() || states.size(0) == 0) return false;
  const auto dtype = states.scalar_type(), out_dtype = output.scalar_type();
  const auto is_float = [](at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; };
  if (!is_float(dtype) || !(is_float(out_dtype) || is_fp8(out_dtype)) ||
      (out_dtype != dtype && dtype != at::kFloat && !is_fp8(out_dtype)))
    return false;
  const auto device = states.device();
  const int64_t num_states = states.size(0), tokens = states.size(1), heads = states.size(2),
                head_dim = states.size(3);
  if (tokens * heads >= std::numeric_limits<int32_t>::max() || head_dim == 0) return false;  // as merge_inputs_ok
  if (head_dim > 1 && states.stride(3) != 1) return false;
  if (lses.dim() != 3 || lses.size(0) != num_states || lses.size(1) != heads || lses.size(2) != tokens ||
      lses.scalar_type() != at::kFloat || lses.device() != device)
    return false;
  if (output.dim() != 3 || output.size(0) != tokens || output.size(1) != heads || output.size(2) != head_dim ||
      output.device() != device || (head_dim > 1 && output.stride(2) != 1) || has_expanded_dim(output))
    return false;
  if (output_lse != nullptr &&
      (output_lse->dim() != 2 || output_lse->size(0) != heads || output_lse->size(1) != tokens ||
       output_lse->scalar_type() != at::kFloat || output_lse->device() != device || has_expanded_dim(*output_lse)))
    return false;
  return true;
}

void launch_merge_states(const at::Tensor& output, const at::Tensor* output_lse, const at::Tensor& states,
                         const at::Tensor& lses, double lse_scale = 1.0, double output_scale = 1.0,
                         const std::optional<at::Tensor>& output_scale_tensor = std::nullopt) {
  splitkv::MergeNParams p{};
  p.lse_scale = static_cast<float>(lse_scale);
  set_output_scale(p.output_scale, p.output_scale_ptr, output_scale, output_scale_tensor, output);
  p.output = output.data_ptr();
  p.output_lse = output_lse != nullptr ? output_lse->data_ptr<float>() : nullptr;
  p.states = states.data_ptr();
  p.lses = lses.data_ptr<float>();
  p.num_states = states.size(0);
  p.num_tokens = states.size(1);
  p.num_heads = states.size(2);
  p.head_dim = states.size(3);
  p.output_stride_token = output.stride(0);
  p.output_stride_head = output.stride(1);
  p.states_stride_state = states.stride(0);
  p.states_stride_token = states.stride(1);
  p.states_stride_head = states.stride(2);
  if (output_lse != nullptr) {
    p.output_lse_stride_head = output_lse->stride(0);
    p.output_lse_stride_token = output_lse->stride(1);
  }
  p.lses_stride_state = lses.stride(0);
  p.lses_stride_head = lses.stride(1);
  p.lses_stride_token = lses.stride(2);

  const c10::cuda::CUDAGuard guard(states.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (is_fp8(output.scalar_type())) {
    dispatch_dtype(states.scalar_type(), [&](auto tag) {
      using TIn = decltype(tag);
      dispatch_output_dtype<TIn>(output.scalar_type(), [&](auto out_tag) {
        C10_CUDA_CHECK((splitkv::merge_states<TIn, decltype(out_tag)>(p, stream)));
      });
    });
    return;
  }
  const bool float_states = states.scalar_type() == at::kFloat;
  dispatch_dtype(output.scalar_type(), [&](auto out_tag) {
    using TOut = decltype(out_tag);
    if (float_states) {
      C10_CUDA_CHECK((splitkv::merge_states<float, TOut>(p, stream)));
    } else {
      C10_CUDA_CHECK((splitkv::merge_states<TOut, TOut>(p, stream)));
    }
  });
}

void merge_states(at::Tensor& output, const std::optional<at::Tensor>& output_lse, const at::Tensor& states,
                  const at::Tensor& lses, double lse_scale, double output_scale,
                  const std::optional<at::Tensor>& output_scale_tensor) {
  const at::Tensor* lse_out = output_lse ? &*output_lse : nullptr;
  TORCH_CHECK(merge_states_inputs_ok(states, lses, output, lse_out),
              "splitkv::merge_states: invalid arguments (splitkv.merge_states says which)");
  launch_merge_states(output, lse_out, states, lses, lse_scale, output_scale, output_scale_tensor);
}

// Backward of the N-way merge into fresh gradient buffers (see merge_attn_states_backward).
void merge_states_backward(at::Tensor& grad_states, at::Tensor& grad_lses, const at::Tensor& grad_output,
                           const std::optional<at::Tensor>& grad_lse, const at::Tensor& states,
                           const at::Tensor& lses, const at::Tensor& output, const at::Tensor& output_lse,
                           double lse_scale) {
  const bool ok = merge_states_inputs_ok(states, lses, output, &output_lse) &&
                  merge_states_inputs_ok(states, lses, grad_output, grad_lse ? &*grad_lse : nullptr) &&
                  grad_output.scalar_type() == output.scalar_type() && grad_states.sizes() == states.sizes() &&
                  grad_states.scalar_type() == states.scalar_type() && grad_states.device() == states.device() &&
                  (states.size(3) <= 1 || grad_states.stride(3) == 1) && grad_lses.sizes() == lses.sizes() &&
                  grad_lses.scalar_type() == at::kFloat && grad_lses.device() == lses.device();
  TORCH_CHECK(ok, "splitkv::merge_states_backward: invalid arguments");
  splitkv::MergeNBackwardParams p{};
  p.grad_states = grad_states.data_ptr();
  p.grad_lses = grad_lses.data_ptr<float>();
  p.grad_output = grad_output.data_ptr();
  p.grad_lse = grad_lse ? grad_lse->data_ptr<float>() : nullptr;
  p.states = states.data_ptr();
  p.lses = lses.data_ptr<float>();
  p.output = output.data_ptr();
  p.output_lse = output_lse.data_ptr<float>();
  p.num_states = states.size(0);
  p.num_tokens = states.size(1);
  p.num_heads = states.size(2);
  p.head_dim = states.size(3);
  p.grad_states_stride_state = grad_states.stride(0);
  p.grad_states_stride_token = grad_states.stride(1);
  p.grad_states_stride_head = grad_states.stride(2);
  p.grad_output_stride_token = grad_output.stride(0);
  p.grad_output_stride_head = grad_output.stride(1);
  p.states_stride_state = states.stride(0);
  p.states_stride_token = states.stride(1);
  p.states_stride_head = states.stride(2);
  p.output_stride_token = output.stride(0);
  p.output_stride_head = output.stride(1);
  p.grad_lses_stride_state = grad_lses.stride(0);
  p.grad_lses_stride_head = grad_lses.stride(1);
  p.grad_lses_stride_token = grad_lses.stride(2);
  if (grad_lse) {
    p.grad_lse_stride_head = grad_lse->stride(0);
    p.grad_lse_stride_token = grad_lse->stride(1);
  }
  p.lses_stride_state = lses.stride(0);
  p.lses_stride_head = lses.stride(1);
  p.lses_stride_token = lses.stride(2);
  p.output_lse_stride_head = output_lse.stride(0);
  p.output_lse_stride_token = output_lse.stride(1);
  p.lse_scale = static_cast<float>(lse_scale);
  const c10::cuda::CUDAGuard guard(states.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool float_states = states.scalar_type() == at::kFloat;
  dispatch_dtype(output.scalar_type(), [&](auto out_tag) {
    using TOut = decltype(out_tag);
    if (float_states) {
      C10_CUDA_CHECK((splitkv::merge_states_backward<float, TOut>(p, stream)));
    } else {
      C10_CUDA_CHECK((splitkv::merge_states_backward<TOut, TOut>(p, stream)));
    }
  });
}

// The eager fast path of splitkv.merge_states (see merge_attn_states_eager).
py::object merge_states_eager(py::handle states_obj, py::handle lses_obj, py::handle output_obj,
                              py::handle output_lse_obj, bool return_lse, py::handle output_dtype_obj,
                              py::handle output_scale_obj) {
  at::Tensor states, lses, output, output_lse;
  if (!unpack_tensor(states_obj, states) || !unpack_tensor(lses_obj, lses)) return py::none();
  const bool has_output = !output_obj.is_none(), has_output_lse = !output_lse_obj.is_none();
  if ((has_output && !unpack_tensor(output_obj, output)) || (has_output_lse && !unpack_tensor(output_lse_obj, output_lse)))
    return py::none();
  // lses' shape and the device before anything is allocated (a wrong one is Python's to name).
  if (states.dim() != 4 || lses.dim() != 3 || !states.is_cuda() || lses.size(0) != states.size(0) ||
      lses.size(1) != states.size(2) || lses.size(2) != states.size(1) || cuda_disabled_by_env() ||
      grad_required({&states, &lses}) ||
      (has_output &&
       overlaps_otherwise(output, {&states, &lses}, [&](const at::Tensor& t) { return is_entry_of(output, t); })) ||
      (has_output_lse &&
       overlaps_otherwise(output_lse, {&states, &lses}, [&](const at::Tensor& t) { return is_entry_of(output_lse, t); })) ||
      (has_output && has_output_lse && output_lse.storage().is_alias_of(output.storage())))
    return py::none();
  at::ScalarType out_dtype;
  double output_scale;
  if (!eager_output_dtype(output_dtype_obj, has_output ? &output : nullptr, states.scalar_type(), out_dtype) ||
      !eager_output_scale(output_scale_obj, output_scale) || (!output_scale_obj.is_none() && !is_fp8(out_dtype)))
    return py::none();
  if (!has_output)
    output = at::empty({states.size(1), states.size(2), states.size(3)}, states.options().dtype(out_dtype));
  if (!has_output_lse && return_lse) output_lse = at::empty({lses.size(1), lses.size(2)}, lses.options());
  const bool write_lse = has_output_lse || return_lse;
  if (!merge_states_inputs_ok(states, lses, output, write_lse ? &output_lse : nullptr)) return py::none();
  launch_merge_states(output, write_lse ? &output_lse : nullptr, states, lses, /*lse_scale=*/1.0, output_scale);
  return py::make_tuple(output, write_lse ? py::cast(output_lse) : py::none());
}

}  // namespace

TORCH_LIBRARY(splitkv, m) {
  // lse_scale: the stored lse times lse_scale is the natural log (ln 2 for log2).
  // output_scale (or the one float of output_scale_tensor): an fp8 output stores
  // output / scale, saturated; ignored for other outputs.
  m.def(
      "merge_attn_states(Tensor(a!) output, Tensor(b!)? output_lse, Tensor prefix_output, Tensor prefix_lse, "
      "Tensor suffix_output, Tensor suffix_lse, float lse_scale=1.0, float output_scale=1.0, "
      "Tensor? output_scale_tensor=None) -> ()");
  m.def("merge_states(Tensor(a!) output, Tensor(b!)? output_lse, Tensor states, Tensor lses, "
        "float lse_scale=1.0, float output_scale=1.0, Tensor? output_scale_tensor=None) -> ()");
  m.def(
      "merge_attn_states_backward(Tensor(a!) grad_prefix_output, Tensor(b!) grad_prefix_lse, "
      "Tensor(c!) grad_suffix_output, Tensor(d!) grad_suffix_lse, Tensor grad_output, Tensor? grad_lse, "
      "Tensor prefix_output, Tensor prefix_lse, Tensor suffix_output, Tensor suffix_lse, float lse_scale) -> ()");
  m.def(
      "merge_states_backward(Tensor(a!) grad_states, Tensor(b!) grad_lses, Tensor grad_output, Tensor? grad_lse, "
      "Tensor states, Tensor lses, Tensor output, Tensor output_lse, float lse_scale) -> ()");
}

TORCH_LIBRARY_IMPL(splitkv, CUDA, m) {
  m.impl("merge_attn_states", &merge_attn_states);
  m.impl("merge_states", &merge_states);
  m.impl("merge_attn_states_backward", &merge_attn_states_backward);
  m.impl("merge_states_backward", &merge_states_backward);
}

void splitkv_binding::add_merge_functions(pybind11::module_& m) {
  m.def("merge_attn_states", &merge_attn_states_eager,
        "Eager fast path of splitkv.merge_attn_states; returns None for what it does not run");
  m.def("merge_states", &merge_states_eager,
        "Eager fast path of splitkv.merge_states; returns None for what it does not run");
}
