// TritonLaunchCache: launches the kernels that triton compiled
// (splitkv/_triton_launch.py) from C++ through csrc/compiled_launch.h, without
// triton's per-launch Python.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <string>
#include <unordered_map>

#include "bindings.h"
#include "compiled_launch.h"

namespace py = pybind11;

namespace {

// Python side of compiled_launch.h: the kernels that triton compiled, each kept
// under what triton specialises a launch on (splitkv/_triton_launch.py says which
// launches come here). The key is built from the arguments in C++ because doing
// so in Python cost as much host time as the rest of the launch.
class TritonLaunchCache {
 public:
  // `scratch_params`: the pointers triton's launcher passes after the kernel's
  // arguments (its global and profile scratch buffers, null here).
  explicit TritonLaunchCache(int scratch_params) : scratch_params_(scratch_params) {}

  // Launches the kernel known for this specialisation of `args` (the kernel's
  // runtime arguments in order) under `config` (the launcher's number for the
  // constexprs and launch options) on CUDA device `device_index`, on its
  // current stream. Returns 1 if it launched, 0 if no kernel is known for the
  // specialisation, -1 if the known kernel needs triton's runner.
  int launch(int64_t config, c10::DeviceIndex device_index, py::tuple grid, py::tuple args) {
    Args values;
    const Entry* found = find(config, device_index, args, values);
    if (found == nullptr) return 0;
    const Entry& entry = *found;
    if (entry.function == nullptr) return -1;
    unsigned grid_dims[3] = {1, 1, 1};
    const size_t grid_size = grid.size();
    if (grid_size < 1 || grid_size > 3) throw py::value_error("TritonLaunchCache.launch: a grid of 1 to 3 dimensions expected");
    for (size_t i = 0; i < grid_size; ++i) grid_dims[i] = grid[i].cast<unsigned>();
    splitkv::LaunchParams params;
    for (size_t i = 0; i < entry.kinds.size(); ++i) {
      switch (entry.kinds[i]) {
        case splitkv::kPointer: params.add(values.pointer[i]); break;
        case splitkv::kInt32: params.add(static_cast<int32_t>(values.integer[i])); break;
        case splitkv::kInt64: params.add(values.integer[i]); break;
        case splitkv::kFloat32: params.add(static_cast<float>(values.real[i])); break;
        default: break;  // a constant of the compiled kernel: not passed
      }
    }
    for (int i = 0; i < scratch_params_; ++i) params.add(static_cast<void*>(nullptr));
    // The kernel was loaded into this device's primary context, which the guard makes current.
    const c10::cuda::CUDAGuard guard(device_index);
    const CUresult result = splitkv::launch_compiled(entry.function, grid_dims, entry.threads, entry.shared,
                                                     c10::cuda::getCurrentCUDAStream(device_index).stream(), params);
    if (result != CUDA_SUCCESS)
      throw std::runtime_error("TritonLaunchCache.launch: cuLaunchKernel failed with CUresult " + std::to_string(result));
    return 1;
  }

  // Keeps the kernel that triton launched for these arguments: `entry` is
  // (function handle, threads per block, dynamic shared bytes, kinds) as
  // splitkv/_triton_launch.py builds it, or None for a kernel that needs triton's
  // runner. The kernel is launched from C++ only if the kinds fit the arguments'
  // specialisation and the driver confirms that the kernel's parameters are those
  // kinds, byte for byte, plus the scratch pointers; else triton keeps it.
  void add(int64_t config, c10::DeviceIndex device_index, py::tuple args, py::object entry) {
    Args values;
    std::string key;
    if (!specialise(config, device_index, args, values, key)) return;
    Entry kept;
    if (!entry.is_none()) {
      const auto fields = entry.cast<py::tuple>();
      const auto function = reinterpret_cast<CUfunction>(fields[0].cast<uintptr_t>());
      const std::string kinds = fields[3].cast<std::string>();
      if (fits(kinds, values, args.size()) &&
          splitkv::params_match(function, kinds.data(), kinds.size(), scratch_params_)) {
        kept.function = function;
        kept.threads = fields[1].cast<unsigned>();
        kept.shared = fields[2].cast<unsigned>();
        kept.kinds = kinds;
      }
    }
    entries_[key] = std::move(kept);
  }

  // The function handle launched from C++ for these arguments, 0 if none (for the tests).
  uintptr_t function(int64_t config, c10::DeviceIndex device_index, py::tuple args) {
    Args values;
    const Entry* found = find(config, device_index, args, values);
    return found == nullptr ? 0 : reinterpret_cast<uintptr_t>(found->function);
  }

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    CUfunction function = nullptr;  // null: triton's runner launches it
    unsigned threads = 0, shared = 0;
    std::string kinds;
  };

  // Specialisation codes of the arguments (what triton compiles a kernel for):
  // an int is 1 (code 4), or else divisible by 16 (+1) and within 32 bits (+2); a
  // float is always float32; a tensor is its dtype and whether its data pointer
  // is 16-byte aligned.
  static constexpr uint8_t kIsOne = 4, kFloat = 8, kTensor = 0x80;
  struct Args {
    uint8_t code[splitkv::kMaxLaunchParams];
    void* pointer[splitkv::kMaxLaunchParams];
    int64_t integer[splitkv::kMaxLaunchParams];
    double real[splitkv::kMaxLaunchParams];
  };

  // The entry kept for this specialisation of `args` (whose values it reads into
  // `values`), or null.
  const Entry* find(int64_t config, c10::DeviceIndex device_index, const py::tuple& args, Args& values) const {
    std::string key;
    if (!specialise(config, device_index, args, values, key)) return nullptr;
    const auto found = entries_.find(key);
    return found == entries_.end() ? nullptr : &found->second;
  }

  // Fills `values` and `key`; false for arguments the key does not describe
  // (other types, ints beyond 64 bits, too many), which triton then launches.
  static bool specialise(int64_t config, c10::DeviceIndex device_index, const py::tuple& args, Args& values,
                         std::string& key) {
    const size_t n = args.size();
    if (n > static_cast<size_t>(splitkv::kMaxLaunchParams)) return false;
    key.reserve(sizeof(config) + sizeof(device_index) + n);
    key.append(reinterpret_cast<const char*>(&config), sizeof(config));
    key.append(reinterpret_cast<const char*>(&device_index), sizeof(device_index));
    for (size_t i = 0; i < n; ++i) {
      PyObject* arg = PyTuple_GET_ITEM(args.ptr(), i);
      uint8_t code;
      if (PyLong_CheckExact(arg)) {
        int overflow = 0;
        const long long value = PyLong_AsLongLongAndOverflow(arg, &overflow);
        if (overflow != 0) return false;
        const bool fits_32 = value >= std::numeric_limits<int32_t>::min() && value <= std::numeric_limits<int32_t>::max();
        code = value == 1 ? kIsOne : static_cast<uint8_t>(((value & 15) == 0) + 2 * fits_32);
        values.integer[i] = value;
      } else if (PyFloat_CheckExact(arg)) {
        code = kFloat;
        values.real[i] = PyFloat_AS_DOUBLE(arg);
      } else if (THPVariable_Check(arg)) {
        const at::Tensor& tensor = THPVariable_Unpack(arg);
        const int dtype = static_cast<int>(tensor.scalar_type());
        if (dtype < 0 || dtype >= 64) return false;
        void* data = tensor.data_ptr();
        code = static_cast<uint8_t>(kTensor | (dtype << 1) |
                                    ((reinterpret_cast<uintptr_t>(data) & 15) == 0));
        values.pointer[i] = data;
      } else {
        return false;
      }
      values.code[i] = code;
      key.push_back(static_cast<char>(code));
    }
    return true;
  }

  // Whether triton's kinds of a specialisation agree with the codes of its arguments.
  static bool fits(const std::string& kinds, const Args& values, size_t n) {
    if (kinds.size() != n) return false;
    for (size_t i = 0; i < n; ++i) {
      const uint8_t code = values.code[i];
      bool ok;
      switch (kinds[i]) {
        case splitkv::kPointer: ok = (code & kTensor) != 0; break;
        case splitkv::kInt32: ok = code < kIsOne && (code & 2) != 0; break;
        case splitkv::kInt64: ok = code < kIsOne; break;
        case splitkv::kFloat32: ok = code == kFloat; break;
        case splitkv::kConstant: ok = code == kIsOne; break;
        default: ok = false;
      }
      if (!ok) return false;
    }
    return true;
  }

  int scratch_params_;
  std::unordered_map<std::string, Entry> entries_;
};

}  // namespace

void splitkv_binding::add_triton_launch(py::module_& m) {
  py::class_<TritonLaunchCache>(m, "TritonLaunchCache",
                                "Kernels compiled by triton, launched from C++ (splitkv/_triton_launch.py)")
      .def(py::init<int>(), py::arg("scratch_params") = 2)
      .def("launch", &TritonLaunchCache::launch)
      .def("add", &TritonLaunchCache::add)
      .def("function", &TritonLaunchCache::function)
      .def("__len__", &TritonLaunchCache::size);
}
