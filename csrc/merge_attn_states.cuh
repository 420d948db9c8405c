// Merge partial attention states: header-only CUDA templates, no torch.
//
// A partial state of one (token, head) row is an output vector O [head_dim] and
// its natural-log log-sum-exp `lse`. States over disjoint key sets merge exactly:
//   m = max_i lse_i,  w_i = exp(lse_i - m) / sum_j exp(lse_j - m)
//   O = sum_i w_i O_i,  lse = m + log(sum_j exp(lse_j - m))
// An lse of +inf or -inf marks an empty state (flash-attn 2 reports +inf for a
// row that saw no key): its output is never used. When every state is empty the
// result is O = 0 and lse = -inf. A NaN lse is not an empty state: it propagates.
//
// Layouts (strides in elements, any value; the head_dim axis is contiguous):
//   outputs [tokens, heads, head_dim] (N-way: [states, tokens, heads, head_dim])
//   lse     [heads, tokens] float32   (N-way: [states, heads, tokens])
//
// Work split: one thread owns one vector of VEC_BYTES bytes of one row; a block
// owns whole rows. Owning whole rows lets the block read every input lse before
// a barrier and write the merged lse after it, so output_lse may alias an input
// lse (in-place merge) without a cross-warp race. Output vectors may alias the
// input vectors they are computed from: each thread reads before it writes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace splitkv {

struct MergeParams {
  void* output;            // [tokens, heads, head_dim]
  float* output_lse;       // [heads, tokens], or nullptr to skip the lse write
  const void* prefix_output;
  const float* prefix_lse;
  const void* suffix_output;
  const float* suffix_lse;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
  int64_t output_stride_token, output_stride_head;
  int64_t prefix_stride_token, prefix_stride_head;
  int64_t suffix_stride_token, suffix_stride_head;
  int64_t output_lse_stride_head, output_lse_stride_token;
  int64_t prefix_lse_stride_head, prefix_lse_stride_token;
  int64_t suffix_lse_stride_head, suffix_lse_stride_token;
};

struct MergeNParams {
  void* output;            // [tokens, heads, head_dim]
  float* output_lse;       // [heads, tokens], or nullptr
  const void* states;      // [states, tokens, heads, head_dim]
  const float* lses;       // [states, heads, tokens]
  int64_t num_states;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
  int64_t output_stride_token, output_stride_head;
  int64_t states_stride_state, states_stride_token, states_stride_head;
  int64_t output_lse_stride_head, output_lse_stride_token;
  int64_t lses_stride_state, lses_stride_head, lses_stride_token;
};

namespace detail {

constexpr int kMaxThreadsPerBlock = 256;

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <>
struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// The machine word moved by one load or store of VEC_BYTES bytes.
template <int VEC_BYTES>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned int; };
template <>
struct Word<2> { using type = unsigned short; };

template <typename T, int VEC_BYTES>
union Vec {
  static constexpr int kElems = VEC_BYTES / static_cast<int>(sizeof(T));
  typename Word<VEC_BYTES>::type word;
  T elems[kElems];
};

// Inputs and outputs are touched once: stream them past L1 and mark them
// evict-first in L2 so they do not push out data other kernels reuse.
template <typename T, int VEC_BYTES>
__device__ __forceinline__ Vec<T, VEC_BYTES> load_streaming(const T* ptr) {
  Vec<T, VEC_BYTES> v;
  v.word = __ldcs(reinterpret_cast<const typename Word<VEC_BYTES>::type*>(ptr));
  return v;
}

template <typename T, int VEC_BYTES>
__device__ __forceinline__ void store_streaming(T* ptr, const Vec<T, VEC_BYTES>& v) {
  __stcs(reinterpret_cast<typename Word<VEC_BYTES>::type*>(ptr), v.word);
}

// flash-attn 2 reports +inf for a row that saw no key; both infinities mean "empty".
__device__ __forceinline__ bool is_empty_state(float lse) { return isinf(lse); }

struct RowLayout {
  int threads_per_row;  // threads that share one (token, head) row
  int rows_per_block;
};

}  // namespace detail

// Two-state merge. Launch geometry comes from merge_launch_layout().
template <typename T, int VEC_BYTES>
__global__ void __launch_bounds__(detail::kMaxThreadsPerBlock)
    merge_attn_states_kernel(const MergeParams p, const detail::RowLayout layout) {
  using Conv = detail::Convert<T>;
  using V = detail::Vec<T, VEC_BYTES>;
  constexpr int kElems = V::kElems;

  const int local_row = threadIdx.x / layout.threads_per_row;
  const int lane = threadIdx.x - local_row * layout.threads_per_row;
  // rows = tokens * heads < 2^31 is checked on the host.
  const int row = blockIdx.x * layout.rows_per_block + local_row;
  const bool active = local_row < layout.rows_per_block && row < p.num_tokens * p.num_heads;
  const int token = active ? row / static_cast<int>(p.num_heads) : 0;
  const int head = active ? row - token * static_cast<int>(p.num_heads) : 0;

  float merged_lse = 0.f;
  if (active) {
    const T* prefix_row = static_cast<const T*>(p.prefix_output) + token * p.prefix_stride_token +
                          head * p.prefix_stride_head;
    const T* suffix_row = static_cast<const T*>(p.suffix_output) + token * p.suffix_stride_token +
                          head * p.suffix_stride_head;
    T* output_row =
        static_cast<T*>(p.output) + token * p.output_stride_token + head * p.output_stride_head;
    // lane < vectors per row, so every thread owns at least this first vector.
    // Its loads are issued before the lse arithmetic so that the data and the
    // lse round trips to memory overlap instead of running back to back.
    const int64_t first = static_cast<int64_t>(lane) * kElems;
    const int64_t step = static_cast<int64_t>(layout.threads_per_row) * kElems;
    V a = detail::load_streaming<T, VEC_BYTES>(prefix_row + first);
    V b = detail::load_streaming<T, VEC_BYTES>(suffix_row + first);

    const float prefix_lse =
        __ldg(p.prefix_lse + head * p.prefix_lse_stride_head + token * p.prefix_lse_stride_token);
    const float suffix_lse =
        __ldg(p.suffix_lse + head * p.suffix_lse_stride_head + token * p.suffix_lse_stride_token);
    const bool prefix_empty = detail::is_empty_state(prefix_lse);
    const bool suffix_empty = detail::is_empty_state(suffix_lse);

    float prefix_weight = 0.f, suffix_weight = 0.f;
    if (prefix_empty && suffix_empty) {
      merged_lse = -INFINITY;
    } else {
      // The empty side drops out exactly; a NaN lse stays NaN through exp.
      const float m = prefix_empty ? suffix_lse : (suffix_empty ? prefix_lse : fmaxf(prefix_lse, suffix_lse));
      const float prefix_scale = prefix_empty ? 0.f : expf(prefix_lse - m);
      const float suffix_scale = suffix_empty ? 0.f : expf(suffix_lse - m);
      const float total = prefix_scale + suffix_scale;
      const float inv_total = __fdividef(1.f, total);
      prefix_weight = prefix_scale * inv_total;
      suffix_weight = suffix_scale * inv_total;
      merged_lse = m + logf(total);
      // fmaxf drops a NaN operand; put it back so a NaN lse is never hidden.
      if (isnan(prefix_lse) || isnan(suffix_lse)) merged_lse = NAN;
    }

    // An empty state contributes nothing, not 0 * (whatever its output holds).
    auto combine = [&](const V& x, const V& y) {
      V out;
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const float from_prefix = prefix_empty ? 0.f : Conv::to_float(x.elems[i]) * prefix_weight;
        const float from_suffix = suffix_empty ? 0.f : Conv::to_float(y.elems[i]) * suffix_weight;
        out.elems[i] = Conv::from_float(from_prefix + from_suffix);
      }
      return out;
    };
    detail::store_streaming<T, VEC_BYTES>(output_row + first, combine(a, b));
    // Only head dims wider than a whole block of vectors get here.
    for (int64_t d = first + step; d < p.head_dim; d += step) {
      a = detail::load_streaming<T, VEC_BYTES>(prefix_row + d);
      b = detail::load_streaming<T, VEC_BYTES>(suffix_row + d);
      detail::store_streaming<T, VEC_BYTES>(output_row + d, combine(a, b));
    }
  }

  if (p.output_lse != nullptr) {
    // Every thread of the block has read its input lse before any merged lse is written.
    __syncthreads();
    if (active && lane == 0) {
      p.output_lse[head * p.output_lse_stride_head + token * p.output_lse_stride_token] = merged_lse;
    }
  }
}

// N-way merge over states stacked on a leading axis, in one pass over the data.
template <typename T, int VEC_BYTES>
__global__ void __launch_bounds__(detail::kMaxThreadsPerBlock)
    merge_states_kernel(const MergeNParams p, const detail::RowLayout layout) {
  using Conv = detail::Convert<T>;
  using V = detail::Vec<T, VEC_BYTES>;
  constexpr int kElems = V::kElems;

  const int local_row = threadIdx.x / layout.threads_per_row;
  const int lane = threadIdx.x - local_row * layout.threads_per_row;
  const int row = blockIdx.x * layout.rows_per_block + local_row;
  const bool active = local_row < layout.rows_per_block && row < p.num_tokens * p.num_heads;
  const int token = active ? row / static_cast<int>(p.num_heads) : 0;
  const int head = active ? row - token * static_cast<int>(p.num_heads) : 0;

  float merged_lse = 0.f;
  if (active) {
    const float* row_lse = p.lses + head * p.lses_stride_head + token * p.lses_stride_token;
    // First pass over the (few, cached) lse values: the max of the non-empty
    // states, and whether any lse is NaN.
    float m = -INFINITY;
    bool any_nan = false;
    for (int64_t s = 0; s < p.num_states; ++s) {
      const float lse = __ldg(row_lse + s * p.lses_stride_state);
      any_nan |= isnan(lse);
      if (!detail::is_empty_state(lse)) m = fmaxf(m, lse);
    }
    const bool all_empty = (m == -INFINITY) && !any_nan;
    float total = 0.f;
    if (!all_empty) {
      for (int64_t s = 0; s < p.num_states; ++s) {
        const float lse = __ldg(row_lse + s * p.lses_stride_state);
        total += detail::is_empty_state(lse) ? 0.f : expf(lse - m);
      }
    }
    merged_lse = all_empty ? -INFINITY : (any_nan ? NAN : m + logf(total));
    const float inv_total = all_empty ? 0.f : __fdividef(1.f, total);

    const T* state_row = static_cast<const T*>(p.states) + token * p.states_stride_token +
                         head * p.states_stride_head;
    T* output_row =
        static_cast<T*>(p.output) + token * p.output_stride_token + head * p.output_stride_head;

    for (int64_t d = static_cast<int64_t>(lane) * kElems; d < p.head_dim;
         d += static_cast<int64_t>(layout.threads_per_row) * kElems) {
      float acc[kElems];
#pragma unroll
      for (int i = 0; i < kElems; ++i) acc[i] = 0.f;
      if (!all_empty) {
        // Four states per step keep four independent loads in flight per thread.
        constexpr int kUnroll = 4;
        int64_t s = 0;
        for (; s + kUnroll <= p.num_states; s += kUnroll) {
          V v[kUnroll];
          float w[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            v[u] = detail::load_streaming<T, VEC_BYTES>(state_row + (s + u) * p.states_stride_state + d);
            const float lse = __ldg(row_lse + (s + u) * p.lses_stride_state);
            w[u] = detail::is_empty_state(lse) ? -1.f : expf(lse - m) * inv_total;
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (w[u] < 0.f) continue;  // empty state: its output is never used
#pragma unroll
            for (int i = 0; i < kElems; ++i) acc[i] += Conv::to_float(v[u].elems[i]) * w[u];
          }
        }
        for (; s < p.num_states; ++s) {
          const float lse = __ldg(row_lse + s * p.lses_stride_state);
          if (detail::is_empty_state(lse)) continue;
          const V v = detail::load_streaming<T, VEC_BYTES>(state_row + s * p.states_stride_state + d);
          const float w = expf(lse - m) * inv_total;
#pragma unroll
          for (int i = 0; i < kElems; ++i) acc[i] += Conv::to_float(v.elems[i]) * w;
        }
      }
      V out;
#pragma unroll
      for (int i = 0; i < kElems; ++i) out.elems[i] = Conv::from_float(acc[i]);
      detail::store_streaming<T, VEC_BYTES>(output_row + d, out);
    }
  }

  if (p.output_lse != nullptr) {
    __syncthreads();
    if (active && lane == 0) {
      p.output_lse[head * p.output_lse_stride_head + token * p.output_lse_stride_token] = merged_lse;
    }
  }
}

namespace detail {

// The widest access (16, 8, 4 or 2 bytes, at least one element) that every
// row start and the row length allow: 16-byte loads whenever head_dim * size
// and all strides and base addresses are multiples of 16 bytes.
template <typename T>
inline int vector_bytes(const void* const* ptrs, int num_ptrs, const int64_t* strides, int num_strides,
                        int64_t head_dim) {
  uint64_t bits = static_cast<uint64_t>(head_dim) * sizeof(T);
  for (int i = 0; i < num_ptrs; ++i) bits |= reinterpret_cast<uintptr_t>(ptrs[i]);
  for (int i = 0; i < num_strides; ++i) bits |= static_cast<uint64_t>(strides[i]) * sizeof(T);
  int bytes = 16;
  while (bytes > static_cast<int>(sizeof(T)) && (bits & (bytes - 1)) != 0) bytes /= 2;
  return bytes;
}

inline RowLayout row_layout(int64_t head_dim, int vec_elems) {
  const int64_t vecs_per_row = (head_dim + vec_elems - 1) / vec_elems;
  RowLayout layout;
  layout.threads_per_row =
      static_cast<int>(vecs_per_row < kMaxThreadsPerBlock ? vecs_per_row : kMaxThreadsPerBlock);
  layout.rows_per_block = kMaxThreadsPerBlock / layout.threads_per_row;
  return layout;
}

template <typename T, int VEC_BYTES, typename Params, typename Kernel>
inline cudaError_t launch_rows(Kernel kernel, const Params& p, cudaStream_t stream) {
  constexpr int kElems = VEC_BYTES / static_cast<int>(sizeof(T));
  const RowLayout layout = row_layout(p.head_dim, kElems);
  const int64_t rows = p.num_tokens * p.num_heads;
  const int64_t blocks = (rows + layout.rows_per_block - 1) / layout.rows_per_block;
  const int threads = layout.threads_per_row * layout.rows_per_block;
  kernel<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(p, layout);
  return cudaGetLastError();
}

template <int N>
using VecBytes = std::integral_constant<int, N>;

// Dispatch by vector width: `kernel_for(VecBytes<N>{})` names the kernel
// instantiation that moves N bytes per access.
template <typename T, typename Params, typename KernelFor>
inline cudaError_t launch_with_vector_bytes(int vec_bytes, const Params& p, cudaStream_t stream,
                                            KernelFor kernel_for) {
  switch (vec_bytes) {
    case 16: return launch_rows<T, 16>(kernel_for(VecBytes<16>{}), p, stream);
    case 8: return launch_rows<T, 8>(kernel_for(VecBytes<8>{}), p, stream);
    case 4: return launch_rows<T, 4>(kernel_for(VecBytes<4>{}), p, stream);
    default: break;
  }
  if constexpr (sizeof(T) == 2) {
    return launch_rows<T, 2>(kernel_for(VecBytes<2>{}), p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail

// Host entry points. The caller has validated shapes, dtypes and devices and
// guarantees tokens * heads < 2^31. Returns the launch status.
template <typename T>
cudaError_t merge_attn_states(const MergeParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  const void* ptrs[] = {p.output, p.prefix_output, p.suffix_output};
  const int64_t strides[] = {p.output_stride_token, p.output_stride_head, p.prefix_stride_token,
                             p.prefix_stride_head,  p.suffix_stride_token, p.suffix_stride_head};
  const int vec_bytes = detail::vector_bytes<T>(ptrs, 3, strides, 6, p.head_dim);
  return detail::launch_with_vector_bytes<T>(
      vec_bytes, p, stream, [](auto v) { return merge_attn_states_kernel<T, decltype(v)::value>; });
}

template <typename T>
cudaError_t merge_states(const MergeNParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  const void* ptrs[] = {p.output, p.states};
  const int64_t strides[] = {p.output_stride_token, p.output_stride_head, p.states_stride_state,
                             p.states_stride_token, p.states_stride_head};
  const int vec_bytes = detail::vector_bytes<T>(ptrs, 2, strides, 5, p.head_dim);
  return detail::launch_with_vector_bytes<T>(
      vec_bytes, p, stream, [](auto v) { return merge_states_kernel<T, decltype(v)::value>; });
}

}  // namespace splitkv
