// attention_inputs_ok: splitkv/attention.py's argument checks of a varlen batch
// in one C++ call, their fast path on CUDA inputs (host time of a decode step).
#include <cmath>

#include "bindings.h"

namespace py = pybind11;

namespace {

using splitkv_binding::finite_positive_scale;
using splitkv_binding::unpack_tensor;

// Whether the varlen attention arguments pass every check of
// check_attention_inputs in splitkv/attention.py (with prefix_k and prefix_v,
// also its checks of cascade's shared prefix KV), for CUDA tensors whose
// cu_seqlens are on the GPU too (their values are then trusted). The checks are
// the same; this one C++ call costs a fraction of their Python host time. False
// means "not sure": Python runs its checks and raises the error that names the
// argument.
bool attention_inputs_ok(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle cu_seqlens_q_obj,
                         py::handle cu_seqlens_k_obj, py::handle max_seqlen_q, py::handle max_seqlen_k,
                         py::handle softmax_scale, py::handle prefix_k_obj, py::handle prefix_v_obj) {
  at::Tensor q, k, v, cu_seqlens_q, cu_seqlens_k;
  if (!unpack_tensor(q_obj, q) || !unpack_tensor(k_obj, k) || !unpack_tensor(v_obj, v) ||
      !unpack_tensor(cu_seqlens_q_obj, cu_seqlens_q) || !unpack_tensor(cu_seqlens_k_obj, cu_seqlens_k))
    return false;
  if (q.dim() != 3 || !q.is_cuda() || q.size(2) == 0) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const auto device = q.device();
  const auto contiguous_last = [](const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1; };
  if (!contiguous_last(q)) return false;
  if (k.dim() != 3 || k.size(2) != q.size(2) || k.size(1) == 0 || q.size(1) % k.size(1) != 0) return false;
  const auto like = [&](const at::Tensor& t, int64_t tokens) {
    return t.dim() == 3 && t.size(0) == tokens && t.size(1) == k.size(1) && t.size(2) == k.size(2) &&
           t.scalar_type() == dtype && t.device() == device && contiguous_last(t);
  };
  if (!like(k, k.size(0)) || !like(v, k.size(0))) return false;
  const auto seqlens_ok = [&](const at::Tensor& cu_seqlens, py::handle max_seqlen) {
    if (cu_seqlens.dim() != 1 || cu_seqlens.size(0) < 1 || !contiguous_last(cu_seqlens) ||
        cu_seqlens.scalar_type() != at::kInt || cu_seqlens.device() != device || !PyLong_CheckExact(max_seqlen.ptr()))
      return false;
    int overflow = 0;
    return PyLong_AsLongLongAndOverflow(max_seqlen.ptr(), &overflow) >= 0 && overflow == 0;
  };
  if (!seqlens_ok(cu_seqlens_q, max_seqlen_q) || !seqlens_ok(cu_seqlens_k, max_seqlen_k) ||
      cu_seqlens_k.size(0) != cu_seqlens_q.size(0))
    return false;
  double scale = 0;
  // expect_scale's rule (anything else goes to Python for the check and its message).
  if (!softmax_scale.is_none() && !finite_positive_scale(softmax_scale, scale)) return false;
  if (prefix_k_obj.is_none() && prefix_v_obj.is_none()) return true;
  at::Tensor prefix_k, prefix_v;
  if (!unpack_tensor(prefix_k_obj, prefix_k) || !unpack_tensor(prefix_v_obj, prefix_v)) return false;
  return prefix_k.dim() == 3 && like(prefix_k, prefix_k.size(0)) && like(prefix_v, prefix_k.size(0));
}

}  // namespace

void splitkv_binding::add_attention_checks(py::module_& m) {
  m.def("attention_inputs_ok", &attention_inputs_ok,
        "Whether the varlen attention arguments pass splitkv's checks (False: not sure, check in Python)");
}
