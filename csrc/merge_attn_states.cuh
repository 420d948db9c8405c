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
// Work split: one thread owns one vector of up to 16 bytes of one row; a block
// owns whole rows. Owning whole rows lets the block read every input lse before
// a barrier and write the merged lse after it, so output_lse may alias an input
// lse (in-place merge) without a cross-warp race. Output vectors may alias the
// input vectors they are computed from: each thread reads before it writes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cfloat>
#include <cstdint>
#include <type_traits>

namespace splitkv {

// fp8 output types (e4m3 "fn" and e5m2 as torch stores them): the merged value
// divided by the output scale, saturated to the finite range (NaN stays NaN).
struct Fp8E4M3 {
  __nv_fp8_storage_t bits;
};
struct Fp8E5M2 {
  __nv_fp8_storage_t bits;
};

struct MergeParams {
  void* output;            // [tokens, heads, head_dim], the inputs' type or fp8
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
  float lse_scale = 1.f;  // stored lse * lse_scale = natural log (ln 2 for log2); the merged lse is stored / lse_scale
  // fp8 outputs only: the stored value is output / scale, the scale being
  // *output_scale_ptr when that is set, else output_scale.
  float output_scale = 1.f;
  const float* output_scale_ptr = nullptr;
};

struct MergeNParams {
  void* output;            // [tokens, heads, head_dim]: float32 states may merge into half/bfloat16, any into fp8
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
  float lse_scale = 1.f;  // as in MergeParams
  float output_scale = 1.f;  // as in MergeParams
  const float* output_scale_ptr = nullptr;
};

// Backward of the two-state merge: with w the merge weights,
//   d prefix_output = w_prefix * d output,
//   d prefix_lse = w_prefix * (lse_scale * <d output, prefix_output - output> + d output_lse),
// the same for the suffix; output and the weights are recomputed from the inputs.
struct MergeBackwardParams {
  void* grad_prefix_output;  // [tokens, heads, head_dim], written
  float* grad_prefix_lse;    // [heads, tokens], written
  void* grad_suffix_output;
  float* grad_suffix_lse;
  const void* grad_output;  // [tokens, heads, head_dim]
  const float* grad_lse;    // [heads, tokens], or nullptr when the merged lse is unused
  const void* prefix_output;
  const float* prefix_lse;
  const void* suffix_output;
  const float* suffix_lse;
  int64_t num_tokens, num_heads, head_dim;
  int64_t grad_prefix_stride_token, grad_prefix_stride_head;
  int64_t grad_suffix_stride_token, grad_suffix_stride_head;
  int64_t grad_output_stride_token, grad_output_stride_head;
  int64_t prefix_stride_token, prefix_stride_head;
  int64_t suffix_stride_token, suffix_stride_head;
  int64_t grad_prefix_lse_stride_head, grad_prefix_lse_stride_token;
  int64_t grad_suffix_lse_stride_head, grad_suffix_lse_stride_token;
  int64_t grad_lse_stride_head, grad_lse_stride_token;
  int64_t prefix_lse_stride_head, prefix_lse_stride_token;
  int64_t suffix_lse_stride_head, suffix_lse_stride_token;
  float lse_scale = 1.f;
};

// Backward of the N-way merge, in one pass over the states: the weights come from
// the merged lse and <d output, output> from the merged output of the forward.
struct MergeNBackwardParams {
  void* grad_states;        // [states, tokens, heads, head_dim] (the states' dtype), written
  float* grad_lses;         // [states, heads, tokens], written
  const void* grad_output;  // [tokens, heads, head_dim] (the output's dtype)
  const float* grad_lse;    // [heads, tokens], or nullptr
  const void* states;
  const float* lses;
  const void* output;       // the merged output and lse that the forward returned
  const float* output_lse;
  int64_t num_states, num_tokens, num_heads, head_dim;
  int64_t grad_states_stride_state, grad_states_stride_token, grad_states_stride_head;
  int64_t grad_output_stride_token, grad_output_stride_head;
  int64_t states_stride_state, states_stride_token, states_stride_head;
  int64_t output_stride_token, output_stride_head;
  int64_t grad_lses_stride_state, grad_lses_stride_head, grad_lses_stride_token;
  int64_t grad_lse_stride_head, grad_lse_stride_token;
  int64_t lses_stride_state, lses_stride_head, lses_stride_token;
  int64_t output_lse_stride_head, output_lse_stride_token;
  float lse_scale = 1.f;
};

namespace detail {

// Threads per block of each kernel, by its parameter type. The N-way kernel runs
// 128: on the H100 as fast as 256 for 8 states of 4096 x 32 x 128 bf16 and
// faster with few states or few rows (2 states; 129 states of one token x 32
// heads). The sweep's figures are in benchmarks/NOTES.md's git history.
template <typename Params>
constexpr int kThreadsPerBlock = 256;
template <>
constexpr int kThreadsPerBlock<MergeNParams> = 128;

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

// fp8 is only ever written.
template <>
struct Convert<Fp8E4M3> {
  static constexpr __nv_fp8_interpretation_t kFormat = __NV_E4M3;
  __device__ __forceinline__ static Fp8E4M3 from_float(float x) { return {__nv_cvt_float_to_fp8(x, __NV_SATFINITE, kFormat)}; }
};

template <>
struct Convert<Fp8E5M2> {
  static constexpr __nv_fp8_interpretation_t kFormat = __NV_E5M2;
  __device__ __forceinline__ static Fp8E5M2 from_float(float x) { return {__nv_cvt_float_to_fp8(x, __NV_SATFINITE, kFormat)}; }
};

template <typename T>
constexpr bool kIsFp8 = std::is_same_v<T, Fp8E4M3> || std::is_same_v<T, Fp8E5M2>;

// What an output is divided by before its conversion to TOut: the output scale for fp8
// (with its reciprocal), 1 (and not applied) otherwise. `by_reciprocal`: the reciprocal is
// a normal float (the scale is neither infinite nor subnormal, nor NaN or zero), so that
// fp8_vector may divide through it.
struct OutputDivisor {
  float divisor = 1.f, reciprocal = 1.f;
  bool by_reciprocal = true;
};

template <typename TOut, typename Params>
__device__ __forceinline__ OutputDivisor output_divisor(const Params& p) {
  if constexpr (kIsFp8<TOut>) {
    const float divisor = p.output_scale_ptr != nullptr ? __ldg(p.output_scale_ptr) : p.output_scale;
    const float reciprocal = 1.f / divisor;
    return {divisor, reciprocal, isfinite(reciprocal) && fabsf(reciprocal) >= FLT_MIN};
  } else {
    return {};
  }
}

// The machine word moved by one load or store of BYTES bytes.
template <int BYTES>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned int; };
template <>
struct Word<2> { using type = unsigned short; };
template <>
struct Word<1> { using type = unsigned char; };

template <typename T, int ELEMS>
union Vec {
  using WordType = typename Word<ELEMS * static_cast<int>(sizeof(T))>::type;
  WordType word;
  T elems[ELEMS];
};

// The fp8 vector of the merged floats value[0 .. ELEMS-1], each divided by the output
// scale: as the product with the reciprocal plus one fma residual step (Markstein), which
// rounds as the division does for finite quotients (the torch and Triton merges divide; a
// 1-ulp float32 difference is an fp8 step where a value sits on a rounding edge) in 3
// instructions instead of the division's sequence: with a division per element the fp8
// merge of 65536 x 32 x 128 bf16 ran 414 us, slower than the bf16 one
// (benchmarks/NOTES.md). An infinite product is kept (the residual would be NaN). A scale
// whose reciprocal is not a normal float (an infinite one: 0 x inf in the residual; a
// subnormal one: 0 x inf in the product) takes the division. That choice is made once
// per vector, not per element (a branch per element made the two-state fp8 kernel 1544
// SASS instructions, 73 of them reconvergence pairs; 1368 and 45 now), and pairs of
// elements convert in one instruction (cvt.rn.satfinite.e4m3x2.f32, sm_89 and later).
// The 16-bit results convert at their call sites: routed through an array here, the
// two-state bf16 kernel grew from 480 to 512 instructions.
template <typename TOut, int ELEMS>
__device__ __forceinline__ Vec<TOut, ELEMS> fp8_vector(const float (&value)[ELEMS], OutputDivisor scale) {
  static_assert(kIsFp8<TOut>, "fp8_vector writes fp8");
  float q[ELEMS];
  if (scale.by_reciprocal) {
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) {
      const float product = value[i] * scale.reciprocal;
      const float residual = fmaf(-product, scale.divisor, value[i]);
      q[i] = isinf(product) ? product : fmaf(residual, scale.reciprocal, product);
    }
  } else {
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) q[i] = value[i] / scale.divisor;
  }
  Vec<TOut, ELEMS> out;
  if constexpr (ELEMS % 2 == 0) {
    // Element 2j in pair j's low byte, as in memory.
    union {
      typename Vec<TOut, ELEMS>::WordType word;
      __nv_fp8x2_storage_t pairs[ELEMS / 2];
    } packed;
#pragma unroll
    for (int j = 0; j < ELEMS / 2; ++j)
      packed.pairs[j] =
          __nv_cvt_float2_to_fp8x2(make_float2(q[2 * j], q[2 * j + 1]), __NV_SATFINITE, Convert<TOut>::kFormat);
    out.word = packed.word;
  } else {
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) out.elems[i] = Convert<TOut>::from_float(q[i]);
  }
  return out;
}

// Inputs and outputs are touched once: stream them past L1 and mark them
// evict-first in L2 so they do not push out data other kernels reuse.
template <typename T, int ELEMS>
__device__ __forceinline__ Vec<T, ELEMS> load_streaming(const T* ptr) {
  Vec<T, ELEMS> v;
  v.word = __ldcs(reinterpret_cast<const typename Vec<T, ELEMS>::WordType*>(ptr));
  return v;
}

template <typename T, int ELEMS>
__device__ __forceinline__ void store_streaming(T* ptr, const Vec<T, ELEMS>& v) {
  __stcs(reinterpret_cast<typename Vec<T, ELEMS>::WordType*>(ptr), v.word);
}

// Plain loads and stores, for the two-state merge: on the H200 they moved 65536 x 32 x
// 128 bf16 in 405 against 435 us with the streaming hints above, while the N-way merge
// lost with them (32 float32 states of 64 x 32 x 128: 18.5 against 15.7 us;
// merge_sweep.cu, benchmarks/NOTES.md). Not the non-coherent path: outputs may alias inputs.
template <typename T, int ELEMS>
__device__ __forceinline__ Vec<T, ELEMS> load_plain(const T* ptr) {
  Vec<T, ELEMS> v;
  v.word = *reinterpret_cast<const typename Vec<T, ELEMS>::WordType*>(ptr);
  return v;
}

template <typename T, int ELEMS>
__device__ __forceinline__ void store_plain(T* ptr, const Vec<T, ELEMS>& v) {
  *reinterpret_cast<typename Vec<T, ELEMS>::WordType*>(ptr) = v.word;
}

// flash-attn 2 reports +inf for a row that saw no key; both infinities mean "empty".
__device__ __forceinline__ bool is_empty_state(float lse) { return isinf(lse); }

// The two-state merge of one row's natural-log lses: the weights of both outputs and
// the merged lse. The empty side drops out exactly (weight 0); both empty give
// weights 0 and lse -inf; a NaN lse gives NaN weights and lse (fmaxf would drop it).
struct TwoStateWeights {
  bool prefix_empty, suffix_empty;
  float prefix_weight = 0.f, suffix_weight = 0.f, lse = -INFINITY;

  __device__ __forceinline__ TwoStateWeights(float prefix_lse, float suffix_lse)
      : prefix_empty(is_empty_state(prefix_lse)), suffix_empty(is_empty_state(suffix_lse)) {
    if (prefix_empty && suffix_empty) return;
    const float m = prefix_empty ? suffix_lse : (suffix_empty ? prefix_lse : fmaxf(prefix_lse, suffix_lse));
    const float prefix_scale = prefix_empty ? 0.f : expf(prefix_lse - m);
    const float suffix_scale = suffix_empty ? 0.f : expf(suffix_lse - m);
    const float total = prefix_scale + suffix_scale;
    const float inv_total = __fdividef(1.f, total);
    prefix_weight = prefix_scale * inv_total;
    suffix_weight = suffix_scale * inv_total;
    lse = m + logf(total);
    if (isnan(prefix_lse) || isnan(suffix_lse)) prefix_weight = suffix_weight = lse = NAN;
  }
};

// The offset of element (token, head) of a tensor with those strides, computed in Index
// (int32_t where the launch checked that every offset fits: fewer instructions per row).
template <typename Index>
__device__ __forceinline__ Index offset_of(int token, int head, int64_t stride_token, int64_t stride_head) {
  return static_cast<Index>(token) * static_cast<Index>(stride_token) +
         static_cast<Index>(head) * static_cast<Index>(stride_head);
}

// The two-state weights of row (token, head) of a forward or backward merge's inputs.
template <typename Index = int64_t, typename Params>
__device__ __forceinline__ TwoStateWeights row_weights(const Params& p, int token, int head) {
  return TwoStateWeights(
      __ldg(p.prefix_lse + offset_of<Index>(token, head, p.prefix_lse_stride_token, p.prefix_lse_stride_head)) *
          p.lse_scale,
      __ldg(p.suffix_lse + offset_of<Index>(token, head, p.suffix_lse_stride_token, p.suffix_lse_stride_head)) *
          p.lse_scale);
}

constexpr int kWarp = 32;
constexpr int kBackwardThreads = 256;

// The backward kernels give each (token, head) row a segment of `lanes` lanes of
// one warp (a power of two up to 32: one vector of the row each where it has at
// most 32), so that a row of 16 vectors (head_dim 128 in 16-bit types) does not
// leave half a warp idle; the dot products over head_dim are summed with shuffles
// inside the segment.
struct BackwardRow {
  int token = 0, head = 0;
  int lane = 0;              // within the row's segment
  unsigned segment_mask = 0;  // the segment's lanes in the warp
  bool valid = false;        // false past the last row
};

__device__ __forceinline__ BackwardRow backward_row(int64_t num_tokens, int64_t num_heads, int lanes) {
  BackwardRow r;
  // rows = tokens * heads < 2^31 is checked on the host.
  const int row = blockIdx.x * (kBackwardThreads / lanes) + threadIdx.x / lanes;
  r.lane = threadIdx.x % lanes;
  const int first_lane = (threadIdx.x % kWarp) - r.lane;
  r.segment_mask = (lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1u)) << first_lane;
  r.valid = row < num_tokens * num_heads;
  r.token = row / static_cast<int>(num_heads);
  r.head = row - r.token * static_cast<int>(num_heads);
  return r;
}

// A backward launch over `rows` rows of head_dim / elems vectors: lanes per row (a
// power of two, one vector each up to a warp) and blocks of kBackwardThreads.
struct BackwardLaunch {
  int lanes;
  unsigned blocks;
};

inline BackwardLaunch backward_launch(int64_t rows, int64_t head_dim, int elems) {
  const int64_t vecs = (head_dim + elems - 1) / elems;
  int lanes = 1;
  while (lanes < kWarp && lanes < vecs) lanes *= 2;
  const int64_t rows_per_block = kBackwardThreads / lanes;
  return {lanes, static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block)};
}

enum class LseStoreOrder { kNone, kWarpBarrier, kBlockBarrier };

// Division of dividends below 2^31 by a divisor fixed at launch, as a multiply-high and a
// shift (Granlund and Montgomery, "Division by invariant integers using multiplication"):
// the row index's split into (token, head) without the hardware's long integer-division
// sequence, which sat in the two-state merge's prologue (the small merges under graph
// replay are prologue-bound: benchmarks/NOTES.md). With l = ceil(log2 d), the multiplier
// m = ceil(2^(31+l) / d) < 2^32 is off by e = m d - 2^(31+l) < d, so for n < 2^31 the
// error n e / 2^(31+l) < d / 2^l <= 1 never carries floor(n m / 2^(31+l)) past n / d.
struct FastDivisor {
  uint32_t divisor = 1;
  uint32_t multiplier = 0;  // unused for divisor 1
  uint32_t shift = 0;       // l - 1: the product's high word is shifted right by it

  FastDivisor() = default;
  // 1 <= d < 2^31.
  constexpr explicit FastDivisor(uint32_t d) : divisor(d) {
    if (d == 1) return;
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d);
    shift = l - 1;
  }

  // n / divisor, for 0 <= n < 2^31. The high word of a 32 x 32-bit product: one
  // wide multiply on the GPU, and a constant expression (compile_check.cu tests it).
  __host__ __device__ constexpr uint32_t quotient(uint32_t n) const {
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
    return divisor == 1 ? n : high >> shift;
  }
};

struct RowLayout {
  int threads_per_row;  // threads that share one (token, head) row (per slice)
  int rows_per_block;
  int slices = 1;  // thread groups that split one row's states (merge_states_sliced_kernel)
  // Set by launch_rows: tokens x heads, and the divisor that splits a row index into
  // (token, head) in the order below (by tokens when heads are outermost, else by heads).
  int rows = 0;
  FastDivisor row_divisor;
  // Row order: heads outermost (a block's rows are consecutive tokens of one head)
  // when the lse tensors are [heads, tokens] with unit token stride, so that the
  // rows' lse loads and stores fill whole 32-byte sectors; else tokens outermost.
  // Scattered 4-byte lse stores cost the H200 a read-modify-write of a sector each.
  bool heads_outer = false;
  // How the merged lse store waits for the input lse reads of its row (output_lse may
  // alias an input lse; a row's lse is read and written by that row's threads alone):
  // not at all when output_lse overlaps no input lse; a warp barrier when every row's
  // threads lie in one warp; else a block barrier. Measured in benchmarks/NOTES.md.
  LseStoreOrder lse_order = LseStoreOrder::kBlockBarrier;
};

// Waits, as the layout says, until this thread's row has read its input lse values.
// Uniform over the block: every thread of it reaches the same barrier.
__device__ __forceinline__ void order_lse_store(const RowLayout& layout) {
  if (layout.lse_order == LseStoreOrder::kBlockBarrier) {
    __syncthreads();
  } else if (layout.lse_order == LseStoreOrder::kWarpBarrier) {
    __syncwarp();
  }
}

// The (token, head) of a row in the layout's order.
__device__ __forceinline__ void row_position(int row, const RowLayout& layout, int& token, int& head) {
  const int outer = static_cast<int>(layout.row_divisor.quotient(static_cast<uint32_t>(row)));
  const int inner = row - outer * static_cast<int>(layout.row_divisor.divisor);
  token = layout.heads_outer ? inner : outer;
  head = layout.heads_outer ? outer : inner;
}

// The block of every row kernel: threadIdx.x the thread's place in its row (lanes,
// then slices), threadIdx.y the row within the block.
struct BlockRow {
  int local_row, within_row, row;
  bool active;  // false past the last row
};

__device__ __forceinline__ BlockRow block_row(const RowLayout& layout) {
  const int local_row = static_cast<int>(threadIdx.y);
  const int row = static_cast<int>(blockIdx.x) * layout.rows_per_block + local_row;
  return {local_row, static_cast<int>(threadIdx.x), row, row < layout.rows};
}

}  // namespace detail

// Two-state merge; each thread moves ELEMS elements per access and VECS such
// vectors of its row per turn (all loaded before any is combined, so that their
// round trips to memory overlap: 16 bytes per input per thread in flight left the
// H200's memory under-used, see benchmarks/NOTES.md).
// TOut: T, or an fp8 type (then the output does not alias an input). Index: the type of
// element offsets, int32_t when the launch found that every offset fits.
template <typename T, typename TOut, int ELEMS, int VECS, typename Index>
__global__ void __launch_bounds__(detail::kThreadsPerBlock<MergeParams>)
    merge_attn_states_kernel(const MergeParams p, const detail::RowLayout layout) {
  using Conv = detail::Convert<T>;
  using V = detail::Vec<T, ELEMS>;
  constexpr int kElems = ELEMS;

  const detail::BlockRow r = detail::block_row(layout);
  const int lane = r.within_row;
  int token = 0, head = 0;
  if (r.active) detail::row_position(r.row, layout, token, head);

  float merged_lse = 0.f;
  if (r.active) {
    const T* prefix_row = static_cast<const T*>(p.prefix_output) +
                          detail::offset_of<Index>(token, head, p.prefix_stride_token, p.prefix_stride_head);
    const T* suffix_row = static_cast<const T*>(p.suffix_output) +
                          detail::offset_of<Index>(token, head, p.suffix_stride_token, p.suffix_stride_head);
    TOut* output_row = static_cast<TOut*>(p.output) +
                       detail::offset_of<Index>(token, head, p.output_stride_token, p.output_stride_head);
    const detail::OutputDivisor output_divisor = detail::output_divisor<TOut>(p);
    // lane < threads per row, so every thread owns at least its first vector.
    // The first turn's loads are issued before the lse arithmetic so that the data
    // and the lse round trips to memory overlap instead of running back to back.
    const Index head_dim = static_cast<Index>(p.head_dim);
    const Index first = static_cast<Index>(lane) * kElems;
    const Index step = static_cast<Index>(layout.threads_per_row) * kElems;
    V a[VECS], b[VECS];
    const auto load_turn = [&](Index base) {
#pragma unroll
      for (int v = 0; v < VECS; ++v) {
        const Index d = base + v * step;
        if (v == 0 || d < head_dim) {
          a[v] = detail::load_plain<T, ELEMS>(prefix_row + d);
          b[v] = detail::load_plain<T, ELEMS>(suffix_row + d);
        }
      }
    };
    load_turn(first);

    const detail::TwoStateWeights w = detail::row_weights<Index>(p, token, head);
    const bool prefix_empty = w.prefix_empty, suffix_empty = w.suffix_empty;
    const float prefix_weight = w.prefix_weight, suffix_weight = w.suffix_weight;
    merged_lse = w.lse / p.lse_scale;

    // An empty state contributes nothing, not 0 * (whatever its output holds).
    const auto store_turn = [&](Index base) {
#pragma unroll
      for (int v = 0; v < VECS; ++v) {
        const Index d = base + v * step;
        if (v > 0 && d >= head_dim) continue;
        float merged[kElems];
        detail::Vec<TOut, ELEMS> out;
#pragma unroll
        for (int i = 0; i < kElems; ++i) {
          const float from_prefix = prefix_empty ? 0.f : Conv::to_float(a[v].elems[i]) * prefix_weight;
          const float from_suffix = suffix_empty ? 0.f : Conv::to_float(b[v].elems[i]) * suffix_weight;
          merged[i] = from_prefix + from_suffix;
          if constexpr (!detail::kIsFp8<TOut>) out.elems[i] = detail::Convert<TOut>::from_float(merged[i]);
        }
        if constexpr (detail::kIsFp8<TOut>) out = detail::fp8_vector<TOut, ELEMS>(merged, output_divisor);
        detail::store_plain<TOut, ELEMS>(output_row + d, out);
      }
    };
    store_turn(first);
    // Only head dims wider than a whole block of turns get here.
    for (Index base = first + VECS * step; base < head_dim; base += VECS * step) {
      load_turn(base);
      store_turn(base);
    }
  }

  if (p.output_lse != nullptr) {
    detail::order_lse_store(layout);
    if (r.active && lane == 0) {
      p.output_lse[detail::offset_of<Index>(token, head, p.output_lse_stride_token, p.output_lse_stride_head)] =
          merged_lse;
    }
  }
}

namespace detail {

// States folded per step of the N-way merge (see RunningMerge).
constexpr int kMergeGroup = 4;

// One thread's running merge of its vector over some of a row's states, for the
// N-way kernels below. The states may be float32 partials (as split-KV kernels
// keep them) merged into a float16/bfloat16 output: TIn and TOut differ then.
//
// An online softmax over groups of kMergeGroup states: the group's lse values
// and data vectors are loaded together (none waits for another), the running
// max m moves to the group's largest lse, the accumulator and the running sum
// of exp(lse - m) are rescaled to it, and the group is added. On the H100 for 8
// states of 4096 x 32 x 128 bf16 (L2 flushed) this was faster than an earlier
// kernel, which walked all lse values for the max before it loaded any data (two
// round trips to memory). At most 64 registers (the launch bound: 1024 threads
// per multiprocessor) matter as much as the single round trip: the same code at
// 70 registers, 768 threads per multiprocessor, was slower than both.
template <typename TIn, int ELEMS>
struct RunningMerge {
  float acc[ELEMS];
  float m = -INFINITY;  // largest non-empty lse folded so far
  float total = 0.f;    // sum of exp(lse - m) over the states folded so far
  bool any_nan = false;

  __device__ __forceinline__ RunningMerge() {
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) acc[i] = 0.f;
  }

  // Folds in states s0 .. s0 + kMergeGroup - 1 (those below num_states) of the
  // row whose lse values start at row_lse, at this thread's vector state_vec.
  __device__ __forceinline__ void add_group(const MergeNParams& p, const float* row_lse, const TIn* state_vec,
                                            int64_t s0) {
    float lse[kMergeGroup];
    Vec<TIn, ELEMS> v[kMergeGroup];
#pragma unroll
    for (int u = 0; u < kMergeGroup; ++u) {
      const bool present = s0 + u < p.num_states;
      lse[u] = present ? __ldg(row_lse + (s0 + u) * p.lses_stride_state) : -INFINITY;
      if (present) v[u] = load_streaming<TIn, ELEMS>(state_vec + (s0 + u) * p.states_stride_state);
    }
    // Scaled only after every load is issued: a multiply inside the loop above
    // waits for its lse and holds back the next state's loads (seen in the SASS;
    // 8 states of 4096 x 32 x 128 ran 109 us with it, 83 us without).
#pragma unroll
    for (int u = 0; u < kMergeGroup; ++u) lse[u] *= p.lse_scale;
    // Empty states (lse +-inf) and NaN ones stay out of the max; a NaN lse
    // still reaches the sums below (as NaN weights) and the merged lse.
    float group_max = m;
#pragma unroll
    for (int u = 0; u < kMergeGroup; ++u) {
      any_nan |= isnan(lse[u]);
      if (!is_empty_state(lse[u])) group_max = fmaxf(group_max, lse[u]);
    }
    if (group_max == -INFINITY) return;  // every state so far is empty
    rescale_to(group_max);
#pragma unroll
    for (int u = 0; u < kMergeGroup; ++u) {
      // An empty state contributes nothing, not 0 * (whatever its output holds).
      if (is_empty_state(lse[u])) continue;
      const float w = expf(lse[u] - m);
      total += w;
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) acc[i] += Convert<TIn>::to_float(v[u].elems[i]) * w;
    }
  }

  // Folds in another thread's running merge of other states of the same vector.
  __device__ __forceinline__ void add(float other_m, float other_total, const float* other_acc, bool other_nan) {
    any_nan |= other_nan;
    if (other_m == -INFINITY) return;  // it folded only empty states
    if (other_m > m) rescale_to(other_m);
    const float w = expf(other_m - m);
    total += other_total * w;
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) acc[i] += other_acc[i] * w;
  }

  // Stores the merged vector at out_vec and returns the merged natural-log lse: 0
  // and -inf when every state is empty, NaN for both when any lse is NaN.
  template <typename TOut>
  __device__ __forceinline__ float finish(TOut* out_vec, OutputDivisor output_divisor) const {
    const bool all_empty = (m == -INFINITY) && !any_nan;
    const float inv_total = any_nan ? NAN : (all_empty ? 0.f : __fdividef(1.f, total));
    float merged[ELEMS];
    Vec<TOut, ELEMS> out;
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) {
      merged[i] = acc[i] * inv_total;
      if constexpr (!kIsFp8<TOut>) out.elems[i] = Convert<TOut>::from_float(merged[i]);
    }
    if constexpr (kIsFp8<TOut>) out = fp8_vector<TOut, ELEMS>(merged, output_divisor);
    store_streaming<TOut, ELEMS>(out_vec, out);
    return all_empty ? -INFINITY : (any_nan ? NAN : m + logf(total));
  }

 private:
  __device__ __forceinline__ void rescale_to(float new_m) {
    const float rescale = expf(m - new_m);  // 0 while m is still -inf
    total *= rescale;
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) acc[i] *= rescale;
    m = new_m;
  }
};

}  // namespace detail

// N-way merge over states stacked on a leading axis, in one pass over the data:
// the threads of a row fold all its states, one group after another.
template <typename TIn, typename TOut, int ELEMS>
__global__ void __launch_bounds__(detail::kThreadsPerBlock<MergeNParams>, 8)
    merge_states_kernel(const MergeNParams p, const detail::RowLayout layout) {
  const detail::BlockRow r = detail::block_row(layout);
  const int lane = r.within_row;
  int token = 0, head = 0;
  if (r.active) detail::row_position(r.row, layout, token, head);

  float merged_lse = 0.f;
  if (r.active) {
    const float* row_lse = p.lses + head * p.lses_stride_head + token * p.lses_stride_token;
    const TIn* state_row = static_cast<const TIn*>(p.states) + token * p.states_stride_token +
                           head * p.states_stride_head;
    TOut* output_row =
        static_cast<TOut*>(p.output) + token * p.output_stride_token + head * p.output_stride_head;
    // Only head dims wider than a whole block of vectors take a second turn.
    for (int64_t d = static_cast<int64_t>(lane) * ELEMS; d < p.head_dim;
         d += static_cast<int64_t>(layout.threads_per_row) * ELEMS) {
      detail::RunningMerge<TIn, ELEMS> merge;
      for (int64_t s0 = 0; s0 < p.num_states; s0 += detail::kMergeGroup) merge.add_group(p, row_lse, state_row + d, s0);
      merged_lse = merge.finish(output_row + d, detail::output_divisor<TOut>(p));
    }
  }

  if (p.output_lse != nullptr) {
    detail::order_lse_store(layout);
    if (r.active && lane == 0) {
      p.output_lse[head * p.output_lse_stride_head + token * p.output_lse_stride_token] = merged_lse / p.lse_scale;
    }
  }
}

// The N-way merge for few rows and many states (decode: one token per sequence,
// one state per KV chunk), where the rows alone are too few to keep the GPU's
// memory busy and each row's groups of states would be loaded one round trip
// after another: `layout.slices` thread groups share each row, each folds every
// slices-th group of its states, and the first adds up their running merges
// through shared memory. Each lane owns exactly one vector (the launch takes
// this kernel only when a row's vectors fit one thread group).
template <typename TIn, typename TOut, int ELEMS>
__global__ void __launch_bounds__(detail::kThreadsPerBlock<MergeNParams>, 8)
    merge_states_sliced_kernel(const MergeNParams p, const detail::RowLayout layout) {
  constexpr int kThreads = detail::kThreadsPerBlock<MergeNParams>;
  __shared__ float shared_acc[ELEMS][kThreads];
  __shared__ float shared_m[kThreads];
  __shared__ float shared_total[kThreads];
  __shared__ bool shared_nan[kThreads];

  const detail::BlockRow r = detail::block_row(layout);
  const bool active = r.active;
  const int slice = r.within_row / layout.threads_per_row;
  const int lane = r.within_row - slice * layout.threads_per_row;
  const int tid = r.local_row * static_cast<int>(blockDim.x) + r.within_row;  // this thread's shared slots
  int token = 0, head = 0;
  if (active) detail::row_position(r.row, layout, token, head);
  const int64_t d = static_cast<int64_t>(lane) * ELEMS;

  detail::RunningMerge<TIn, ELEMS> merge;
  if (active) {
    const float* row_lse = p.lses + head * p.lses_stride_head + token * p.lses_stride_token;
    const TIn* state_vec = static_cast<const TIn*>(p.states) + token * p.states_stride_token +
                           head * p.states_stride_head + d;
    for (int64_t s0 = static_cast<int64_t>(slice) * detail::kMergeGroup; s0 < p.num_states;
         s0 += static_cast<int64_t>(layout.slices) * detail::kMergeGroup)
      merge.add_group(p, row_lse, state_vec, s0);
  }
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) shared_acc[i][tid] = merge.acc[i];
  shared_m[tid] = merge.m;
  shared_total[tid] = merge.total;
  shared_nan[tid] = merge.any_nan;
  // Every state and input lse of the block has been read before any output is
  // written, so outputs may alias inputs (in-place merges).
  __syncthreads();
  if (active && slice == 0) {
    for (int j = 1; j < layout.slices; ++j) {
      const int other = tid + j * layout.threads_per_row;
      float other_acc[ELEMS];
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) other_acc[i] = shared_acc[i][other];
      merge.add(shared_m[other], shared_total[other], other_acc, shared_nan[other]);
    }
    TOut* output_row =
        static_cast<TOut*>(p.output) + token * p.output_stride_token + head * p.output_stride_head;
    const float merged_lse = merge.finish(output_row + d, detail::output_divisor<TOut>(p));
    if (lane == 0 && p.output_lse != nullptr)
      p.output_lse[head * p.output_lse_stride_head + token * p.output_lse_stride_token] = merged_lse / p.lse_scale;
  }
}

namespace detail {

// The backward kernels give each (token, head) row one warp: its lanes split the
// row's vectors, and the dot products over head_dim are summed with shuffles.
// The sum of x over a row's segment (BackwardRow), every lane of it getting the sum.
__device__ __forceinline__ float segment_sum(float x, const BackwardRow& r, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(r.segment_mask, x, offset);
  return x;
}

template <typename T, int ELEMS>
__device__ __forceinline__ float dot_vec(const Vec<T, ELEMS>& x, const float* y) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) sum += Convert<T>::to_float(x.elems[i]) * y[i];
  return sum;
}

// PLAIN: plain loads and stores (the two-state backward), else the streaming hints.
template <bool PLAIN, typename T, int ELEMS>
__device__ __forceinline__ void store_scaled(T* ptr, const float* values, float scale) {
  Vec<T, ELEMS> out;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) out.elems[i] = Convert<T>::from_float(values[i] * scale);
  if constexpr (PLAIN) {
    store_plain<T, ELEMS>(ptr, out);
  } else {
    store_streaming<T, ELEMS>(ptr, out);
  }
}

template <bool PLAIN, typename T, int ELEMS>
__device__ __forceinline__ void load_floats(const T* ptr, float* values) {
  const Vec<T, ELEMS> v = PLAIN ? load_plain<T, ELEMS>(ptr) : load_streaming<T, ELEMS>(ptr);
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) values[i] = Convert<T>::to_float(v.elems[i]);
}

}  // namespace detail

template <typename T, int ELEMS>
__global__ void __launch_bounds__(detail::kBackwardThreads)
    merge_attn_states_backward_kernel(const MergeBackwardParams p, const int lanes) {
  const detail::BackwardRow r = detail::backward_row(p.num_tokens, p.num_heads, lanes);
  if (!r.valid) return;  // the whole segment: its shuffles name its own lanes only
  const int token = r.token, head = r.head;
  const detail::TwoStateWeights w = detail::row_weights(p, token, head);
  const float prefix_weight = w.prefix_weight, suffix_weight = w.suffix_weight;

  const T* prefix_row = static_cast<const T*>(p.prefix_output) + token * p.prefix_stride_token +
                        head * p.prefix_stride_head;
  const T* suffix_row = static_cast<const T*>(p.suffix_output) + token * p.suffix_stride_token +
                        head * p.suffix_stride_head;
  const T* grad_row = static_cast<const T*>(p.grad_output) + token * p.grad_output_stride_token +
                      head * p.grad_output_stride_head;
  T* grad_prefix_row = static_cast<T*>(p.grad_prefix_output) + token * p.grad_prefix_stride_token +
                       head * p.grad_prefix_stride_head;
  T* grad_suffix_row = static_cast<T*>(p.grad_suffix_output) + token * p.grad_suffix_stride_token +
                       head * p.grad_suffix_stride_head;
  float prefix_dot = 0.f, suffix_dot = 0.f;
  for (int64_t d = static_cast<int64_t>(r.lane) * ELEMS; d < p.head_dim; d += static_cast<int64_t>(lanes) * ELEMS) {
    // Both outputs are read whether or not their state is empty, so that these loads
    // need not wait for the lse values (an empty state's dot product is dropped below).
    float grad[ELEMS];
    detail::load_floats<true, T, ELEMS>(grad_row + d, grad);
    prefix_dot += detail::dot_vec<T, ELEMS>(detail::load_plain<T, ELEMS>(prefix_row + d), grad);
    suffix_dot += detail::dot_vec<T, ELEMS>(detail::load_plain<T, ELEMS>(suffix_row + d), grad);
    detail::store_scaled<true, T, ELEMS>(grad_prefix_row + d, grad, prefix_weight);
    detail::store_scaled<true, T, ELEMS>(grad_suffix_row + d, grad, suffix_weight);
  }
  // An empty state's output may hold anything (NaN): it stays out of the dot products.
  prefix_dot = w.prefix_empty ? 0.f : detail::segment_sum(prefix_dot, r, lanes);
  suffix_dot = w.suffix_empty ? 0.f : detail::segment_sum(suffix_dot, r, lanes);
  if (r.lane == 0) {
    const float grad_lse =
        p.grad_lse == nullptr ? 0.f : p.grad_lse[head * p.grad_lse_stride_head + token * p.grad_lse_stride_token];
    const float merged_dot = prefix_weight * prefix_dot + suffix_weight * suffix_dot;  // <d output, output>
    p.grad_prefix_lse[head * p.grad_prefix_lse_stride_head + token * p.grad_prefix_lse_stride_token] =
        prefix_weight * (p.lse_scale * (prefix_dot - merged_dot) + grad_lse);
    p.grad_suffix_lse[head * p.grad_suffix_lse_stride_head + token * p.grad_suffix_lse_stride_token] =
        suffix_weight * (p.lse_scale * (suffix_dot - merged_dot) + grad_lse);
  }
}

// TIn: the states' (and their gradient's) dtype; TOut: the output's (and d output's).
// The states go kMergeGroup at a time: a group's loads are all issued before any of
// its dot products is summed, so that their round trips to memory overlap.
template <typename TIn, typename TOut, int ELEMS>
__global__ void __launch_bounds__(detail::kBackwardThreads)
    merge_states_backward_kernel(const MergeNBackwardParams p, const int lanes) {
  constexpr int kGroup = detail::kMergeGroup;
  const detail::BackwardRow r = detail::backward_row(p.num_tokens, p.num_heads, lanes);
  if (!r.valid) return;  // the whole segment: its shuffles name its own lanes only
  const int token = r.token, head = r.head;
  const int64_t first = static_cast<int64_t>(r.lane) * ELEMS, step = static_cast<int64_t>(lanes) * ELEMS;

  float merged_lse =
      __ldg(p.output_lse + head * p.output_lse_stride_head + token * p.output_lse_stride_token) * p.lse_scale;
  // Every state is empty where the merged lse is -inf (their weights are 0 then).
  if (merged_lse == -INFINITY) merged_lse = 0.f;
  const TOut* grad_row = static_cast<const TOut*>(p.grad_output) + token * p.grad_output_stride_token +
                         head * p.grad_output_stride_head;
  const TOut* output_row =
      static_cast<const TOut*>(p.output) + token * p.output_stride_token + head * p.output_stride_head;
  float merged_dot = 0.f;
  for (int64_t d = first; d < p.head_dim; d += step) {
    float grad[ELEMS];
    detail::load_floats<false, TOut, ELEMS>(grad_row + d, grad);
    merged_dot += detail::dot_vec<TOut, ELEMS>(detail::load_streaming<TOut, ELEMS>(output_row + d), grad);
  }
  merged_dot = detail::segment_sum(merged_dot, r, lanes);
  const float grad_lse =
      p.grad_lse == nullptr ? 0.f : __ldg(p.grad_lse + head * p.grad_lse_stride_head + token * p.grad_lse_stride_token);

  const TIn* state_base = static_cast<const TIn*>(p.states) + token * p.states_stride_token + head * p.states_stride_head;
  TIn* grad_state_base = static_cast<TIn*>(p.grad_states) + token * p.grad_states_stride_token +
                         head * p.grad_states_stride_head;
  const float* lse_base = p.lses + head * p.lses_stride_head + token * p.lses_stride_token;
  for (int64_t s0 = 0; s0 < p.num_states; s0 += kGroup) {
    float weight[kGroup], dot[kGroup];
    bool empty[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const bool present = s0 + u < p.num_states;
      const float lse = present ? __ldg(lse_base + (s0 + u) * p.lses_stride_state) * p.lse_scale : -INFINITY;
      empty[u] = detail::is_empty_state(lse);
      weight[u] = empty[u] ? 0.f : expf(lse - merged_lse);  // NaN when either is NaN
      dot[u] = 0.f;
    }
    for (int64_t d = first; d < p.head_dim; d += step) {
      // d output is read once per group; after the first it comes from the caches.
      detail::Vec<TOut, ELEMS> g;
      g.word = __ldg(reinterpret_cast<const typename detail::Vec<TOut, ELEMS>::WordType*>(grad_row + d));
      float grad[ELEMS];
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) grad[i] = detail::Convert<TOut>::to_float(g.elems[i]);
      // Read whether or not the state is empty (no wait for its lse); its dot is dropped below.
      detail::Vec<TIn, ELEMS> v[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u)
        if (s0 + u < p.num_states) v[u] = detail::load_streaming<TIn, ELEMS>(state_base + (s0 + u) * p.states_stride_state + d);
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        if (s0 + u >= p.num_states) continue;
        dot[u] += detail::dot_vec<TIn, ELEMS>(v[u], grad);
        detail::store_scaled<false, TIn, ELEMS>(grad_state_base + (s0 + u) * p.grad_states_stride_state + d, grad, weight[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      if (s0 + u >= p.num_states) break;  // uniform over the segment
      // An empty state's output may hold anything (NaN): it stays out of its dot product.
      const float row_dot = empty[u] ? 0.f : detail::segment_sum(dot[u], r, lanes);
      if (r.lane == 0)
        p.grad_lses[(s0 + u) * p.grad_lses_stride_state + head * p.grad_lses_stride_head +
                    token * p.grad_lses_stride_token] = weight[u] * (p.lse_scale * (row_dot - merged_dot) + grad_lse);
    }
  }
}

namespace detail {

// Alignment in bytes that every address and stride in `bits` shares.
inline uint64_t alignment_bits(const void* const* ptrs, int num_ptrs, const int64_t* strides, int num_strides,
                               int64_t head_dim, int elem_size) {
  uint64_t bits = static_cast<uint64_t>(head_dim) * elem_size;
  for (int i = 0; i < num_ptrs; ++i) bits |= reinterpret_cast<uintptr_t>(ptrs[i]);
  for (int i = 0; i < num_strides; ++i) bits |= static_cast<uint64_t>(strides[i]) * elem_size;
  return bits;
}

// Elements per access: as many as fit 16 bytes of TIn, halved until every
// row start and the row length of the inputs and of the output are aligned
// to the access width (so a misaligned view still runs, with narrower loads).
template <typename TIn, typename TOut>
inline int vector_elems(uint64_t in_bits, uint64_t out_bits) {
  int elems = 16 / static_cast<int>(sizeof(TIn));
  while (elems > 1 && ((in_bits & (elems * sizeof(TIn) - 1)) != 0 || (out_bits & (elems * sizeof(TOut) - 1)) != 0))
    elems /= 2;
  return elems;
}

// `slices` thread groups share each row (merge_states_sliced_kernel); a row's
// vectors spread over at most one block.
inline RowLayout row_layout(int64_t head_dim, int elems, int max_threads, int slices = 1) {
  const int64_t vecs_per_row = (head_dim + elems - 1) / elems;
  RowLayout layout;
  layout.threads_per_row = static_cast<int>(vecs_per_row < max_threads ? vecs_per_row : max_threads);
  layout.slices = slices;
  layout.rows_per_block = max_threads / (layout.threads_per_row * slices);
  return layout;
}

// Whether every element offset of a [tokens, heads, inner] tensor (inner contiguous) with
// these strides lies within int32_t's range: the two-state merge then computes its offsets
// in 32 bits (merge_attn_states_kernel's Index).
inline bool offsets_fit_int32(int64_t tokens, int64_t heads, int64_t inner, int64_t stride_token,
                              int64_t stride_head) {
  const auto magnitude = [](int64_t x) { return x < 0 ? -x : x; };
  return (tokens - 1) * magnitude(stride_token) + (heads - 1) * magnitude(stride_head) + inner <= INT32_MAX;
}

// Whether two float32 tensors of up to three axes (sizes and non-negative strides in
// elements) share any bytes: their spans from first to last element overlap.
struct LseExtent {
  const float* base;
  int64_t sizes[3], strides[3];
};

inline bool extents_overlap(const LseExtent& a, const LseExtent& b) {
  const auto span_end = [](const LseExtent& e) {
    int64_t last = 0;
    for (int i = 0; i < 3; ++i) {
      if (e.sizes[i] == 0) return e.base;  // empty: spans nothing
      last += (e.sizes[i] - 1) * e.strides[i];
    }
    return e.base + last + 1;
  };
  const float* a_end = span_end(a);
  const float* b_end = span_end(b);
  return a.base < b_end && b.base < a_end && a_end != a.base && b_end != b.base;
}

// The barrier the merged lse store needs (RowLayout::lse_order).
inline LseStoreOrder lse_store_order(bool output_lse_overlaps_input, const RowLayout& layout) {
  if (!output_lse_overlaps_input) return LseStoreOrder::kNone;
  return kWarp % (layout.threads_per_row * layout.slices) == 0 ? LseStoreOrder::kWarpBarrier
                                                                : LseStoreOrder::kBlockBarrier;
}

inline int64_t row_blocks(const RowLayout& layout, int64_t rows) {
  return (rows + layout.rows_per_block - 1) / layout.rows_per_block;
}

// Launches `kernel` over all tokens x heads rows (< 2^31, checked on the host) in the
// layout's blocks (BlockRow), the layout's row count and divisor filled in.
template <typename Params, typename Kernel>
inline cudaError_t launch_rows(Kernel kernel, const Params& p, RowLayout layout, cudaStream_t stream) {
  const int64_t rows = p.num_tokens * p.num_heads;
  layout.rows = static_cast<int>(rows);
  layout.row_divisor = FastDivisor(static_cast<uint32_t>(layout.heads_outer ? p.num_tokens : p.num_heads));
  const dim3 threads(layout.threads_per_row * layout.slices, layout.rows_per_block);
  kernel<<<static_cast<unsigned int>(row_blocks(layout, rows)), threads, 0, stream>>>(p, layout);
  return cudaGetLastError();
}

// Multiprocessors of the current device, asked once per device.
inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0 && cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess)
    counts[device].store(count, std::memory_order_relaxed);
  return count;
}

// The N-way merge doubles the thread groups per row while a row's vectors still
// fit one block, every group gets a whole group of states, and the blocks are
// fewer than four per multiprocessor (too few rows to keep the memory busy): on the
// H200, 32 float32 states of 64 x 32 x 128 into bf16 (512 blocks of one group per row)
// took 15.7 us, 12.6 under graph replay, and 14.9 / 10.8 with two groups per row
// (merge_sweep.cu, benchmarks/NOTES.md); four groups were slower (15.7 / 11.6).
template <typename TIn, typename TOut, int ELEMS>
inline cudaError_t launch_merge_states(const MergeNParams& p, cudaStream_t stream) {
  constexpr int kThreads = kThreadsPerBlock<MergeNParams>;
  const int64_t rows = p.num_tokens * p.num_heads;
  const int64_t few_blocks = 4 * static_cast<int64_t>(multiprocessor_count());
  RowLayout layout = row_layout(p.head_dim, ELEMS, kThreads);
  // Tokens outermost (heads_outer stays false): with heads outermost, the N-way merge
  // of 8 states of 4096 x 32 x 128 bf16 took 109 us on the H200 against 84 us in this
  // order (benchmarks/NOTES.md): a row's S state reads then land 8 KB apart instead of
  // next to the block's other rows, and the LSE bytes it saves are 1/64 of the traffic.
  while (2 * layout.slices * kMergeGroup <= p.num_states && row_blocks(layout, rows) < few_blocks) {
    const RowLayout wider = row_layout(p.head_dim, ELEMS, kThreads, 2 * layout.slices);
    if (wider.rows_per_block == 0) break;
    layout = wider;
  }
  if (layout.slices == 1) {
    const bool overlaps =
        p.output_lse != nullptr &&
        extents_overlap({p.output_lse, {1, p.num_heads, p.num_tokens}, {0, p.output_lse_stride_head, p.output_lse_stride_token}},
                        {p.lses, {p.num_states, p.num_heads, p.num_tokens},
                         {p.lses_stride_state, p.lses_stride_head, p.lses_stride_token}});
    layout.lse_order = lse_store_order(overlaps, layout);
    return launch_rows(merge_states_kernel<TIn, TOut, ELEMS>, p, layout, stream);
  }
  return launch_rows(merge_states_sliced_kernel<TIn, TOut, ELEMS>, p, layout, stream);
}

template <int N>
using Elems = std::integral_constant<int, N>;

// Dispatch by vector width: `launch(Elems<N>{})` launches the kernel
// instantiation that moves N elements of TIn per access.
template <typename TIn, typename Launch>
inline cudaError_t launch_with_vector_elems(int elems, Launch launch) {
  switch (elems) {
    case 8:
      if constexpr (sizeof(TIn) <= 2) return launch(Elems<8>{});
      break;
    case 4: return launch(Elems<4>{});
    case 2: return launch(Elems<2>{});
    case 1: return launch(Elems<1>{});
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail

// Host entry points. The caller has validated shapes, dtypes and devices and
// guarantees tokens * heads < 2^31. Returns the launch status.
// The two-state merge's row layout, from merge_sweep.cu on the H200 with its lean
// prologue (benchmarks/NOTES.md). Rows of at least kVecsFrom vectors (head_dim 128 in
// 16-bit types): below kManyRows rows, each thread moves two vectors per turn and heads
// are outermost (1024 x 32 x 128 bf16 under graph replay: 4.45 us, against 5.25 tokens
// outermost and 5.96 with one vector); from kManyRows, one vector each, tokens outermost
// (65536 x 32 x 128: 381.6 against 385.4 us with two, 406.6 heads outermost; 4096 x 32
// x 128: 30.7 against 31.6), except into fp8, which keeps two (65536 x 32 x 128 bf16
// into e4m3: 343 against 437 us with one). Shorter rows (head_dim 64): one vector, heads
// outermost. Heads go outermost only where every lse has unit token stride
// (RowLayout::heads_outer).
constexpr int64_t kVecsFrom = 16;
constexpr int64_t kManyRows = 65536;

// TOut: T, or Fp8E4M3 / Fp8E5M2.
template <typename T, typename TOut = T>
cudaError_t merge_attn_states(const MergeParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  const void* in_ptrs[] = {p.prefix_output, p.suffix_output};
  const int64_t in_strides[] = {p.prefix_stride_token, p.prefix_stride_head, p.suffix_stride_token,
                                p.suffix_stride_head};
  const void* out_ptrs[] = {p.output};
  const int64_t out_strides[] = {p.output_stride_token, p.output_stride_head};
  const uint64_t in_bits = detail::alignment_bits(in_ptrs, 2, in_strides, 4, p.head_dim, sizeof(T));
  const uint64_t out_bits = detail::alignment_bits(out_ptrs, 1, out_strides, 2, p.head_dim, sizeof(TOut));
  return detail::launch_with_vector_elems<T>(detail::vector_elems<T, TOut>(in_bits, out_bits), [&](auto e) {
    constexpr int kElems = decltype(e)::value;
    constexpr int kThreads = detail::kThreadsPerBlock<MergeParams>;
    // The layout of kVecsFrom / kManyRows above.
    const bool long_rows = p.head_dim / kElems >= kVecsFrom;
    const bool many_rows = p.num_tokens * p.num_heads >= kManyRows;
    const int vecs = long_rows && (!many_rows || detail::kIsFp8<TOut>) ? 2 : 1;
    const bool heads_outer = !(long_rows && many_rows) && p.prefix_lse_stride_token == 1 &&
                             p.suffix_lse_stride_token == 1 &&
                             (p.output_lse == nullptr || p.output_lse_stride_token == 1);
    detail::RowLayout layout = detail::row_layout(p.head_dim, vecs * kElems, kThreads);
    layout.heads_outer = heads_outer;
    const auto lse_extent = [&](const float* base, int64_t stride_head, int64_t stride_token) {
      return detail::LseExtent{base, {1, p.num_heads, p.num_tokens}, {0, stride_head, stride_token}};
    };
    const detail::LseExtent output_lse =
        lse_extent(p.output_lse, p.output_lse_stride_head, p.output_lse_stride_token);
    const bool overlaps =
        p.output_lse != nullptr &&
        (detail::extents_overlap(output_lse, lse_extent(p.prefix_lse, p.prefix_lse_stride_head, p.prefix_lse_stride_token)) ||
         detail::extents_overlap(output_lse, lse_extent(p.suffix_lse, p.suffix_lse_stride_head, p.suffix_lse_stride_token)));
    layout.lse_order = detail::lse_store_order(overlaps, layout);
    const auto launch = [&](auto index) {
      using Index = decltype(index);
      if (vecs == 2) return detail::launch_rows(merge_attn_states_kernel<T, TOut, kElems, 2, Index>, p, layout, stream);
      return detail::launch_rows(merge_attn_states_kernel<T, TOut, kElems, 1, Index>, p, layout, stream);
    };
    const auto fits = [&](int64_t inner, int64_t stride_token, int64_t stride_head) {
      return detail::offsets_fit_int32(p.num_tokens, p.num_heads, inner, stride_token, stride_head);
    };
    // The kernel's offset within a row runs up to a turn (VECS vectors of every thread of
    // the row) past head_dim before its loop ends, in Index too.
    const int64_t row_extent = p.head_dim + static_cast<int64_t>(vecs) * layout.threads_per_row * kElems;
    const bool int32_offsets =
        fits(row_extent, p.prefix_stride_token, p.prefix_stride_head) &&
        fits(row_extent, p.suffix_stride_token, p.suffix_stride_head) &&
        fits(row_extent, p.output_stride_token, p.output_stride_head) &&
        fits(1, p.prefix_lse_stride_token, p.prefix_lse_stride_head) &&
        fits(1, p.suffix_lse_stride_token, p.suffix_lse_stride_head) &&
        (p.output_lse == nullptr || fits(1, p.output_lse_stride_token, p.output_lse_stride_head));
    return int32_offsets ? launch(int32_t{}) : launch(int64_t{});
  });
}

template <typename TIn, typename TOut>
cudaError_t merge_states(const MergeNParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  if constexpr (std::is_same_v<TIn, TOut> || detail::kIsFp8<TOut>) {
    // Two states take the two-state kernel, which streams them faster (4096 x 32 x
    // 128 bf16 on the H200: 32.7 against 39.2 us, merge_sweep.cu at be83365); both
    // kernels give empty and NaN states the same meaning.
    if (p.num_states == 2) {
      MergeParams two;
      two.output = p.output;
      two.output_lse = p.output_lse;
      two.prefix_output = p.states;
      two.suffix_output = static_cast<const TIn*>(p.states) + p.states_stride_state;
      two.prefix_lse = p.lses;
      two.suffix_lse = p.lses + p.lses_stride_state;
      two.num_tokens = p.num_tokens;
      two.num_heads = p.num_heads;
      two.head_dim = p.head_dim;
      two.output_stride_token = p.output_stride_token;
      two.output_stride_head = p.output_stride_head;
      two.prefix_stride_token = two.suffix_stride_token = p.states_stride_token;
      two.prefix_stride_head = two.suffix_stride_head = p.states_stride_head;
      two.output_lse_stride_head = p.output_lse_stride_head;
      two.output_lse_stride_token = p.output_lse_stride_token;
      two.prefix_lse_stride_head = two.suffix_lse_stride_head = p.lses_stride_head;
      two.prefix_lse_stride_token = two.suffix_lse_stride_token = p.lses_stride_token;
      two.lse_scale = p.lse_scale;
      two.output_scale = p.output_scale;
      two.output_scale_ptr = p.output_scale_ptr;
      return merge_attn_states<TIn, TOut>(two, stream);
    }
  }
  const void* in_ptrs[] = {p.states};
  const int64_t in_strides[] = {p.states_stride_state, p.states_stride_token, p.states_stride_head};
  const void* out_ptrs[] = {p.output};
  const int64_t out_strides[] = {p.output_stride_token, p.output_stride_head};
  const uint64_t in_bits = detail::alignment_bits(in_ptrs, 1, in_strides, 3, p.head_dim, sizeof(TIn));
  const uint64_t out_bits = detail::alignment_bits(out_ptrs, 1, out_strides, 2, p.head_dim, sizeof(TOut));
  return detail::launch_with_vector_elems<TIn>(detail::vector_elems<TIn, TOut>(in_bits, out_bits), [&](auto e) {
    return detail::launch_merge_states<TIn, TOut, decltype(e)::value>(p, stream);
  });
}


template <typename T>
cudaError_t merge_attn_states_backward(const MergeBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.num_tokens * p.num_heads;
  if (rows == 0 || p.head_dim == 0) return cudaSuccess;
  const void* ptrs[] = {p.grad_prefix_output, p.grad_suffix_output, p.grad_output, p.prefix_output, p.suffix_output};
  const int64_t strides[] = {p.grad_prefix_stride_token, p.grad_prefix_stride_head, p.grad_suffix_stride_token,
                             p.grad_suffix_stride_head,  p.grad_output_stride_token, p.grad_output_stride_head,
                             p.prefix_stride_token,      p.prefix_stride_head,       p.suffix_stride_token,
                             p.suffix_stride_head};
  const uint64_t bits = detail::alignment_bits(ptrs, 5, strides, 10, p.head_dim, sizeof(T));
  const int elems = detail::vector_elems<T, T>(bits, bits);
  const detail::BackwardLaunch launch = detail::backward_launch(rows, p.head_dim, elems);
  return detail::launch_with_vector_elems<T>(elems, [&](auto e) {
    merge_attn_states_backward_kernel<T, decltype(e)::value>
        <<<launch.blocks, detail::kBackwardThreads, 0, stream>>>(p, launch.lanes);
    return cudaGetLastError();
  });
}

template <typename TIn, typename TOut>
cudaError_t merge_states_backward(const MergeNBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.num_tokens * p.num_heads;
  if (rows == 0 || p.head_dim == 0) return cudaSuccess;
  const void* in_ptrs[] = {p.grad_states, p.states};
  const int64_t in_strides[] = {p.grad_states_stride_state, p.grad_states_stride_token, p.grad_states_stride_head,
                                p.states_stride_state,      p.states_stride_token,      p.states_stride_head};
  const void* out_ptrs[] = {p.grad_output, p.output};
  const int64_t out_strides[] = {p.grad_output_stride_token, p.grad_output_stride_head, p.output_stride_token,
                                 p.output_stride_head};
  const uint64_t in_bits = detail::alignment_bits(in_ptrs, 2, in_strides, 6, p.head_dim, sizeof(TIn));
  const uint64_t out_bits = detail::alignment_bits(out_ptrs, 2, out_strides, 4, p.head_dim, sizeof(TOut));
  const int elems = detail::vector_elems<TIn, TOut>(in_bits, out_bits);
  const detail::BackwardLaunch launch = detail::backward_launch(rows, p.head_dim, elems);
  return detail::launch_with_vector_elems<TIn>(elems, [&](auto e) {
    merge_states_backward_kernel<TIn, TOut, decltype(e)::value>
        <<<launch.blocks, detail::kBackwardThreads, 0, stream>>>(p, launch.lanes);
    return cudaGetLastError();
  });
}

}  // namespace splitkv
