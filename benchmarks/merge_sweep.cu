// Launch-shape sweep of the CUDA two-state merge, torch-free: the header's kernel
// launched with other row layouts (threads per block, vectors per thread, row order,
// the lse store's barrier) beside the header's own choice, on the same inputs.
// Build and run on a GPU machine (benchmarks/device_run.sh step "sweep"):
//   nvcc -std=c++17 -O3 -arch=sm_90 -I csrc benchmarks/merge_sweep.cu -o /tmp/merge_sweep && /tmp/merge_sweep
// Prints one line per (shape, layout): median microseconds over 50 launches, each
// after an L2 flush, and TB/s of the counted bytes (2 inputs + 1 output + 3 lse);
// then CUDA-graph replay per launch (L2 warm) for the small shapes; then fp8 (e4m3)
// results by row layout, taking turns with the bf16 result; then the N-way
// merge through the header's launch (2 to 16 states of 4096 x 32 x 128, and 32 float32
// states of 64 x 32 x 128 into bf16, a decode step's split-KV merge).
// `merge_sweep ncu` runs, for ncu, the header's two-state launch at 4096 x 32 x 128 and
// 1024 x 32 x 128 and one N-way launch of 8 states, each once
// (benchmarks/device_run.sh step ncu-merge).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "merge_attn_states.cuh"

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t err_ = (x);                                                               \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(err_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

using T = __nv_bfloat16;
using splitkv::detail::LseStoreOrder;
using splitkv::detail::RowLayout;

struct Variant {
  const char* name;
  int threads;  // 0: the header's own launch (splitkv::merge_attn_states)
  int vecs;
  bool heads_outer;
  LseStoreOrder order;
  bool int64_offsets = false;  // the kernel's 64-bit offsets (the header takes 32 bits where they fit)
};

template <typename Index>
static cudaError_t launch_with(const Variant& v, const splitkv::MergeParams& p, cudaStream_t stream) {
  RowLayout layout = splitkv::detail::row_layout(p.head_dim, v.vecs * 8, v.threads);
  layout.heads_outer = v.heads_outer;
  layout.lse_order = v.order;
  if (v.vecs == 2)
    return splitkv::detail::launch_rows(splitkv::merge_attn_states_kernel<T, T, 8, 2, Index>, p, layout, stream);
  return splitkv::detail::launch_rows(splitkv::merge_attn_states_kernel<T, T, 8, 1, Index>, p, layout, stream);
}

static cudaError_t launch(const Variant& v, const splitkv::MergeParams& p, cudaStream_t stream) {
  if (v.threads == 0) return splitkv::merge_attn_states<T>(p, stream);
  return v.int64_offsets ? launch_with<int64_t>(v, p, stream) : launch_with<int32_t>(v, p, stream);
}

static float median(std::vector<float> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

int main(int argc, char** argv) {
  const bool ncu_only = argc > 1 && std::string(argv[1]) == "ncu";
  const Variant variants[] = {
      {"header", 0, 0, false, LseStoreOrder::kNone},
      {"t256 v2 tokens-outer none i64", 256, 2, false, LseStoreOrder::kNone, true},
      {"t256 v2 tokens-outer none", 256, 2, false, LseStoreOrder::kNone},
      {"t256 v2 tokens-outer block-barrier", 256, 2, false, LseStoreOrder::kBlockBarrier},
      {"t256 v2 heads-outer none", 256, 2, true, LseStoreOrder::kNone},
      {"t256 v1 tokens-outer none", 256, 1, false, LseStoreOrder::kNone},
      {"t256 v1 heads-outer none", 256, 1, true, LseStoreOrder::kNone},
      {"t256 v1 heads-outer none i64", 256, 1, true, LseStoreOrder::kNone, true},
      {"t128 v1 heads-outer none", 128, 1, true, LseStoreOrder::kNone},
      {"t128 v2 tokens-outer none", 128, 2, false, LseStoreOrder::kNone},
      {"t128 v2 heads-outer none", 128, 2, true, LseStoreOrder::kNone},
      {"t64 v1 heads-outer none", 64, 1, true, LseStoreOrder::kNone},
      {"t64 v2 tokens-outer none", 64, 2, false, LseStoreOrder::kNone},
  };
  struct Shape {
    int64_t tokens, heads, head_dim;
  };
  const Shape shapes[] = {{65536, 32, 128}, {16384, 32, 128}, {4096, 32, 128}, {4096, 48, 128}, {4096, 16, 128},
                          {4096, 32, 256},  {4096, 32, 64},   {1024, 32, 128}, {512, 32, 128},  {256, 16, 128}};

  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  const size_t max_elems = 65536ull * 32 * 128;
  const size_t max_rows = 65536ull * 32;
  T *a, *b, *out;
  float *lse_a, *lse_b, *lse_out;
  CHECK(cudaMalloc(&a, max_elems * sizeof(T)));
  CHECK(cudaMalloc(&b, max_elems * sizeof(T)));
  CHECK(cudaMalloc(&out, max_elems * sizeof(T)));
  CHECK(cudaMalloc(&lse_a, max_rows * 4));
  CHECK(cudaMalloc(&lse_b, max_rows * 4));
  CHECK(cudaMalloc(&lse_out, max_rows * 4));
  CHECK(cudaMemset(a, 0x3c, max_elems * sizeof(T)));  // bf16 0x3c3c: about 0.0115
  CHECK(cudaMemset(b, 0x3d, max_elems * sizeof(T)));
  CHECK(cudaMemset(lse_a, 0, max_rows * 4));  // lse 0 for both states
  CHECK(cudaMemset(lse_b, 0, max_rows * 4));
  const size_t flush_bytes = 256ull << 20;  // over the H200's 60 MB L2
  void* flush;
  CHECK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  // Median microseconds of `reps` runs of `work` (which enqueues on `stream`), each
  // after an L2 flush and timed alone; `per_run` divides each time (launches per run).
  const auto median_us = [&](int reps, bool flush_l2, int per_run, auto work) {
    std::vector<float> times;
    for (int i = 0; i < reps; ++i) {
      if (flush_l2) CHECK(cudaMemsetAsync(flush, i, flush_bytes, stream));
      CHECK(cudaEventRecord(start, stream));
      work();
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms * 1000.f / per_run);
    }
    return median(times);
  };

  // Device-to-device copy of the largest shape's bytes, the ceiling the merge is held to.
  {
    const float us = median_us(20, true, 1, [&] {
      CHECK(cudaMemcpyAsync(out, a, max_elems * sizeof(T), cudaMemcpyDeviceToDevice, stream));
    });
    std::printf("copy %zu MB: %.1f us, %.3f TB/s (read + write)\n", max_elems * sizeof(T) >> 20, us,
                2.0 * max_elems * sizeof(T) / us / 1e6);
  }

  for (const Shape& s : shapes) {
    splitkv::MergeParams p{};
    p.output = out;
    p.output_lse = lse_out;
    p.prefix_output = a;
    p.suffix_output = b;
    p.prefix_lse = lse_a;
    p.suffix_lse = lse_b;
    p.num_tokens = s.tokens;
    p.num_heads = s.heads;
    p.head_dim = s.head_dim;
    p.output_stride_token = p.prefix_stride_token = p.suffix_stride_token = s.heads * s.head_dim;
    p.output_stride_head = p.prefix_stride_head = p.suffix_stride_head = s.head_dim;
    p.output_lse_stride_head = p.prefix_lse_stride_head = p.suffix_lse_stride_head = s.tokens;
    p.output_lse_stride_token = p.prefix_lse_stride_token = p.suffix_lse_stride_token = 1;
    const double bytes = 3.0 * s.tokens * s.heads * s.head_dim * sizeof(T) + 3.0 * s.tokens * s.heads * 4;
    if (ncu_only) {
      if (s.heads == 32 && s.head_dim == 128 && (s.tokens == 4096 || s.tokens == 1024)) {
        CHECK(launch(variants[0], p, stream));
        CHECK(cudaStreamSynchronize(stream));
      }
      continue;
    }
    for (const Variant& v : variants) {
      if (v.threads != 0 && s.head_dim / 8 / v.vecs > v.threads) continue;
      CHECK(launch(v, p, stream));  // warm-up
      const float us = median_us(50, true, 1, [&] { CHECK(launch(v, p, stream)); });
      float graph_us = 0.f;
      if (s.tokens * s.heads <= 1024 * 32) {
        // Graph replay, L2 warm: 200 launches captured back to back, per launch.
        constexpr int kLaunches = 200;
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < kLaunches; ++i) CHECK(launch(v, p, stream));
        CHECK(cudaStreamEndCapture(stream, &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        CHECK(cudaGraphLaunch(exec, stream));
        graph_us = median_us(20, false, kLaunches, [&] { CHECK(cudaGraphLaunch(exec, stream)); });
        CHECK(cudaGraphExecDestroy(exec));
        CHECK(cudaGraphDestroy(graph));
      }
      std::printf("%6lld x %2lld x %3lld  %-36s %8.2f us  %5.3f TB/s", static_cast<long long>(s.tokens),
                  static_cast<long long>(s.heads), static_cast<long long>(s.head_dim), v.name, us, bytes / us / 1e6);
      if (graph_us > 0.f) std::printf("  graph %6.2f us", graph_us);
      std::printf("\n");
    }
  }
  if (!ncu_only) {
    // fp8 (e4m3) output, scale 0.5: the header's launch against its row layouts forced,
    // with the bf16 result's header launch beside it, taking turns over 5 rounds (the
    // fp8 rows of `bench merge` read 333-425 us at 65536 x 32 x 128 from one run to the
    // next, benchmarks/NOTES.md).
    struct Fp8Variant {
      const char* name;
      bool fp8;  // else the bf16 result
      int vecs;  // 0: the header's launch
      bool heads_outer;
    };
    const Fp8Variant fp8_variants[] = {{"header bf16", false, 0, false},      {"header fp8", true, 0, false},
                                       {"fp8 v2 tokens-outer", true, 2, false}, {"fp8 v1 tokens-outer", true, 1, false},
                                       {"fp8 v2 heads-outer", true, 2, true},   {"fp8 v1 heads-outer", true, 1, true}};
    for (const int64_t tokens : {65536, 4096}) {
      splitkv::MergeParams p{};
      p.output = out;
      p.output_lse = lse_out;
      p.prefix_output = a;
      p.suffix_output = b;
      p.prefix_lse = lse_a;
      p.suffix_lse = lse_b;
      p.num_tokens = tokens;
      p.num_heads = 32;
      p.head_dim = 128;
      p.output_stride_token = p.prefix_stride_token = p.suffix_stride_token = 32 * 128;
      p.output_stride_head = p.prefix_stride_head = p.suffix_stride_head = 128;
      p.output_lse_stride_head = p.prefix_lse_stride_head = p.suffix_lse_stride_head = tokens;
      p.output_lse_stride_token = p.prefix_lse_stride_token = p.suffix_lse_stride_token = 1;
      p.output_scale = 0.5f;
      const auto run = [&](const Fp8Variant& v) {
        using Fp8 = splitkv::Fp8E4M3;
        if (v.vecs == 0) {
          CHECK((v.fp8 ? splitkv::merge_attn_states<T, Fp8>(p, stream) : splitkv::merge_attn_states<T>(p, stream)));
          return;
        }
        RowLayout layout = splitkv::detail::row_layout(p.head_dim, v.vecs * 8, 256);
        layout.heads_outer = v.heads_outer;
        layout.lse_order = LseStoreOrder::kNone;
        CHECK((v.vecs == 2
                  ? splitkv::detail::launch_rows(splitkv::merge_attn_states_kernel<T, Fp8, 8, 2, int32_t>, p, layout, stream)
                  : splitkv::detail::launch_rows(splitkv::merge_attn_states_kernel<T, Fp8, 8, 1, int32_t>, p, layout, stream)));
      };
      std::vector<std::vector<float>> rounds(std::size(fp8_variants));
      for (int round = 0; round < 5; ++round) {
        for (size_t i = 0; i < std::size(fp8_variants); ++i) {
          run(fp8_variants[i]);  // warm-up
          rounds[i].push_back(median_us(30, true, 1, [&] { run(fp8_variants[i]); }));
        }
      }
      for (size_t i = 0; i < std::size(fp8_variants); ++i) {
        const double out_bytes = fp8_variants[i].fp8 ? 1.0 : sizeof(T);
        const double bytes = tokens * 32.0 * (128 * (2 * sizeof(T) + out_bytes) + 3 * 4);
        const float us = median(rounds[i]);
        std::printf("fp8 %6lld x 32 x 128  %-24s %8.2f us  %5.3f TB/s  (rounds %.1f-%.1f)\n",
                    static_cast<long long>(tokens), fp8_variants[i].name, us, bytes / us / 1e6,
                    *std::min_element(rounds[i].begin(), rounds[i].end()),
                    *std::max_element(rounds[i].begin(), rounds[i].end()));
      }
    }
  }
  // N-way parameters for `states` dense [states, tokens, 32, 128] states in `a` (lses
  // [states, 32, tokens] in lse_a) merged into `out` / lse_out.
  const auto nway_params = [&](int64_t states, int64_t tokens) {
    constexpr int64_t kHeads = 32, kDim = 128;
    splitkv::MergeNParams p{};
    p.output = out;
    p.output_lse = lse_out;
    p.states = a;
    p.lses = lse_a;
    p.num_states = states;
    p.num_tokens = tokens;
    p.num_heads = kHeads;
    p.head_dim = kDim;
    p.output_stride_token = p.states_stride_token = kHeads * kDim;
    p.output_stride_head = p.states_stride_head = kDim;
    p.states_stride_state = tokens * kHeads * kDim;
    p.output_lse_stride_head = p.lses_stride_head = tokens;
    p.output_lse_stride_token = p.lses_stride_token = 1;
    p.lses_stride_state = kHeads * tokens;
    return p;
  };
  // The N-way merge: `states` bf16 states of 4096 x 32 x 128 (16 of them fill `a`).
  const std::vector<int64_t> state_counts = ncu_only ? std::vector<int64_t>{8} : std::vector<int64_t>{2, 4, 8, 16};
  for (const int64_t states : state_counts) {
    const splitkv::MergeNParams p = nway_params(states, 4096);
    const auto merge = [&] { CHECK((splitkv::merge_states<T, T>(p, stream))); };
    if (ncu_only) {
      merge();
      CHECK(cudaStreamSynchronize(stream));
      continue;
    }
    merge();  // warm-up
    const float us = median_us(50, true, 1, merge);
    const double bytes = (states + 1.0) * p.num_tokens * p.num_heads * (p.head_dim * sizeof(T) + 4);
    std::printf("N-way %2lld states of 4096 x 32 x 128 (header)       %8.2f us  %5.3f TB/s\n",
                static_cast<long long>(states), us, bytes / us / 1e6);
  }
  if (!ncu_only) {
    // Decode-shaped (issue 18): 32 float32 split states of 64 tokens x 32 x 128 into bf16,
    // the states in `a` reinterpreted (32 x 64 x 32 x 128 x 4 bytes fit).
    // The header's launch, then one, two and four thread groups per row forced (the sliced
    // kernel for two and four). Folding 8 states per step instead of 4 was measured once
    // and lost (benchmarks/NOTES.md, 2026-12-03).
    const splitkv::MergeNParams p = nway_params(32, 64);
    const double rows = static_cast<double>(p.num_tokens * p.num_heads);
    const double bytes = rows * (p.num_states * (p.head_dim * 4.0 + 4) + p.head_dim * sizeof(T) + 4);
    for (const int slices : {0, 1, 2, 4}) {
      const auto merge = [&] {
        if (slices == 0) {
          CHECK((splitkv::merge_states<float, T>(p, stream)));
          return;
        }
        const RowLayout layout = splitkv::detail::row_layout(p.head_dim, 4, 128, slices);
        if (slices == 1) {
          CHECK(splitkv::detail::launch_rows(splitkv::merge_states_kernel<float, T, 4>, p, layout, stream));
        } else {
          CHECK(splitkv::detail::launch_rows(splitkv::merge_states_sliced_kernel<float, T, 4>, p, layout, stream));
        }
      };
      merge();  // warm-up
      const float us = median_us(50, true, 1, merge);
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      constexpr int kLaunches = 100;
      CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < kLaunches; ++i) merge();
      CHECK(cudaStreamEndCapture(stream, &graph));
      CHECK(cudaGraphInstantiate(&exec, graph, 0));
      CHECK(cudaGraphLaunch(exec, stream));
      const float graph_us = median_us(20, false, kLaunches, [&] { CHECK(cudaGraphLaunch(exec, stream)); });
      CHECK(cudaGraphExecDestroy(exec));
      CHECK(cudaGraphDestroy(graph));
      std::printf("N-way 32 fp32 states of 64 x 32 x 128 into bf16 (%s %d) %8.2f us  %5.3f TB/s  graph %6.2f us\n",
                  slices == 0 ? "header" : "slices", slices, us, bytes / us / 1e6, graph_us);
    }
  }
  return 0;
}
