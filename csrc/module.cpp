// The extension module (splitkv/_cuda.py builds it): each source file adds its
// part. The merge kernels' custom ops are registered with the dispatcher by
// csrc/merge_ops.cu when the library loads.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  splitkv_binding::add_merge_functions(m);
  splitkv_binding::add_attention_checks(m);
  splitkv_binding::add_triton_launch(m);
}
