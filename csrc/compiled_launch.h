// Launching a kernel that triton compiled, from C++: what triton's Python runner
// does for a launch (pack the parameters, cuLaunchKernel on the current stream),
// without its per-launch Python. Free of torch and of Python, so that CI can
// compile-check it with nvcc on a machine without a GPU; csrc/ops.cu unpacks the
// Python arguments into the slots this header launches.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace splitkv {

// Kinds of the kernel arguments, one character each, from triton's signature of
// the compiled specialisation: a pointer, a 32-bit or 64-bit integer, a float32,
// or an argument triton made a constant (a constexpr, an integer equal to 1),
// which is not passed.
constexpr char kPointer = 'p';
constexpr char kInt32 = 'i';
constexpr char kInt64 = 'l';
constexpr char kFloat32 = 'f';
constexpr char kConstant = 'x';

constexpr int kMaxLaunchParams = 64;

struct DriverApi {
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                            void**, void**) = nullptr;
  CUresult (*param_info)(CUfunction, size_t, size_t*, size_t*) = nullptr;
};

// The driver entry points, looked up through the runtime (no link against libcuda).
inline const DriverApi& driver_api() {
  static const DriverApi api = [] {
    DriverApi found;
    const auto lookup = [](const char* symbol, unsigned version) -> void* {
      void* fn = nullptr;
      cudaDriverEntryPointQueryResult status{};
      if (cudaGetDriverEntryPointByVersion(symbol, &fn, version, cudaEnableDefault, &status) != cudaSuccess ||
          status != cudaDriverEntryPointSuccess)
        return nullptr;
      return fn;
    };
    found.launch_kernel = reinterpret_cast<decltype(found.launch_kernel)>(lookup("cuLaunchKernel", 4000));
    found.param_info = reinterpret_cast<decltype(found.param_info)>(lookup("cuFuncGetParamInfo", 12040));
    return found;
  }();
  return api;
}

inline size_t param_bytes(char kind) {
  switch (kind) {
    case kPointer:
    case kInt64: return 8;
    case kInt32:
    case kFloat32: return 4;
    default: return 0;
  }
}

// Whether `function` takes the arguments that `kinds` describes, byte for byte,
// followed by `scratch_params` pointers (triton's launcher appends its scratch
// buffers: splitkv/_triton_launch.py says how many). Asks the driver only about
// parameters the kernel has, so no query fails (compute-sanitizer reports a failed
// cuFuncGetParamInfo as an API error). Checked once per compiled kernel.
inline bool params_match(CUfunction function, const char* kinds, size_t num_kinds, int scratch_params) {
  const DriverApi& api = driver_api();
  if (api.launch_kernel == nullptr || api.param_info == nullptr || scratch_params < 0) return false;
  size_t index = 0, offset = 0, size = 0;
  for (size_t i = 0; i < num_kinds; ++i) {
    if (kinds[i] == kConstant) continue;
    const size_t expected = param_bytes(kinds[i]);
    if (expected == 0 || api.param_info(function, index, &offset, &size) != CUDA_SUCCESS || size != expected)
      return false;
    ++index;
  }
  if (index + static_cast<size_t>(scratch_params) > static_cast<size_t>(kMaxLaunchParams)) return false;
  for (int i = 0; i < scratch_params; ++i, ++index)
    if (api.param_info(function, index, &offset, &size) != CUDA_SUCCESS || size != 8) return false;
  return true;
}

// Parameter storage for one launch: each slot holds one argument's bytes.
struct LaunchParams {
  uint64_t slots[kMaxLaunchParams];
  void* pointers[kMaxLaunchParams];
  int count = 0;

  template <typename T>
  void add(T value) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "a parameter fits one slot");
    std::memcpy(&slots[count], &value, sizeof(T));
    pointers[count] = &slots[count];
    ++count;
  }
};

// Launches a one-CTA-cluster kernel with `threads` threads per block and `shared`
// bytes of dynamic shared memory on `stream`. A thread that has not used the CUDA
// runtime yet has no current context: the runtime makes the device's primary
// context (the one torch and triton use) current, and the launch is retried once.
inline CUresult launch_compiled(CUfunction function, const unsigned grid[3], unsigned threads, unsigned shared,
                                CUstream stream, LaunchParams& params) {
  const DriverApi& api = driver_api();
  CUresult result = api.launch_kernel(function, grid[0], grid[1], grid[2], threads, 1, 1, shared, stream,
                                      params.pointers, nullptr);
  if (result == CUDA_ERROR_INVALID_CONTEXT && cudaFree(nullptr) == cudaSuccess)
    result = api.launch_kernel(function, grid[0], grid[1], grid[2], threads, 1, 1, shared, stream, params.pointers,
                               nullptr);
  return result;
}

}  // namespace splitkv
